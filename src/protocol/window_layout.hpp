// Layout of a Buffer's symmetric window, and the device memory private to one rank (LocalState).
//
//   [barrier]  uint64 counters [kNumBarrierSlots][kMaxNvlinkPeers]: counter (slot, p) in MY window counts
//              the arrivals of peer p at barriers of that slot (peers add to it with red.release.sys)
//   [nvl]      the normal-mode region, num_nvl_bytes (IntranodeLayout)
//   [rdma]     the low-latency region, num_rdma_bytes (LowLatencyLayout)
//   [pool]     window-backed memory for intranode dispatch outputs, num_recv_pool_bytes (Buffer::alloc_recv)
// Identical on every rank, so an offset means the same on every peer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "protocol/host_device.hpp"
#include "protocol/limits.hpp"

namespace openep::detail {

struct WindowLayout {
  size_t barrier_offset = 0;
  size_t nvl_offset = 0;
  size_t rdma_offset = 0;
  size_t pool_offset = 0;
  size_t pool_bytes = 0;
  size_t total_bytes = 0;

  static WindowLayout make(size_t num_nvl_bytes, size_t num_rdma_bytes, size_t num_pool_bytes = 0) {
    WindowLayout l;
    l.barrier_offset = 0;
    l.nvl_offset = align_up(sizeof(uint64_t) * kNumBarrierSlots * kMaxNvlinkPeers, kWindowAlignment);
    l.rdma_offset = align_up(l.nvl_offset + num_nvl_bytes, kWindowAlignment);
    l.pool_offset = align_up(l.rdma_offset + num_rdma_bytes, kWindowAlignment);
    l.pool_bytes = num_pool_bytes;
    l.total_bytes = align_up(l.pool_offset + num_pool_bytes, kWindowAlignment);
    return l;
  }
  // Window offset of barrier counter (slot, from): arrivals of rank `from` at barriers of `slot`.
  OPENEP_HOST_DEVICE static size_t barrier_counter(size_t barrier_offset, int slot, int from) {
    return barrier_offset + sizeof(uint64_t) * (static_cast<size_t>(slot) * kMaxNvlinkPeers + from);
  }
};

// Device memory private to this rank (not in the window), zeroed at Buffer creation.
struct LocalState {
  uint64_t barrier_epoch[kNumBarrierSlots];   // completed barriers per slot (monotonic)
  uint64_t op_epoch;                          // intranode operations started (monotonic)
  int32_t error_claim;                        // see device_error.hpp
  uint32_t combine_ticket;                    // last-block ticket of the intranode combine (device/ticket.cuh)
};

}  // namespace openep::detail
