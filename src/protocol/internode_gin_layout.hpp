// The window of the internode GIN rail (BufferOptions::internode_backend = kGin, runtime/internode_gin.hpp):
// registered on the RAIL communicator only, the same size and layout on every rank. NOT RUN on a real network (no
// RDMA NICs on the test machines); compiled and CPU-tested only.
//
//   [control]  kControlBytes: two uint64 slots per rail peer (node) n, written ONLY by n, with putValue:
//                dest_offset(n)  where, in n's window, the bytes I send n in the current exchange must land
//                dest_bytes(n)   how many bytes n expects from me
//              n writes both when its stream reaches the exchange (so every earlier read of that receive range on
//              its side is done), then raises signal ready(n) on me: the rendezvous ncclRecv gives NCCL p2p.
//   [area]     from kControlBytes: the InternodeRailArea (rail halves, headers, barrier tokens) of the Buffer.
// A slot is rewritten only in the next exchange, which n enters only after my data of this one reached it (it
// waits for my data signal first), and I read the slot before I put that data: no slot is overwritten unread.
#pragma once

#include <cstddef>
#include <cstdint>

#include "protocol/host_device.hpp"
#include "protocol/internode_layout.hpp"

namespace openep::detail {

struct GinRailLayout {
  static constexpr size_t kDestOffsets = 0;
  static constexpr size_t kDestBytes = kDestOffsets + sizeof(uint64_t) * kMaxInternodeNodes;
  static constexpr size_t kControlBytes = 4096;
  static_assert(kDestBytes + sizeof(uint64_t) * kMaxInternodeNodes <= kControlBytes, "control slots fit");

  // ---- named slots (byte offsets in the window) ----
  OPENEP_HOST_DEVICE static size_t dest_offset(int n) { return kDestOffsets + sizeof(uint64_t) * n; }
  OPENEP_HOST_DEVICE static size_t dest_bytes(int n) { return kDestBytes + sizeof(uint64_t) * n; }
  // Window offset of the InternodeRailArea, and the window size that holds an area of `area_bytes`.
  static constexpr size_t area_offset() { return kControlBytes; }
  static constexpr size_t window_bytes(size_t area_bytes) {
    return kControlBytes + (area_bytes + InternodeRailArea::kAlign - 1) / InternodeRailArea::kAlign * InternodeRailArea::kAlign;
  }
};

// GIN signal ids of the rail, on every context (ids are per context). Peer n posts everything it sends me on
// context (my rail rank mod ginContextCount), so a signal lands after every earlier put of n to me (NCCL orders a
// signal after the earlier puts on the same context to the same peer), and I poll only that context. Monotonic
// SignalAdd(1) per exchange that names the pair; never reset (the targets are device-side exchange counts).
struct GinRailSignals {
  static constexpr int ready(int src) { return src; }                     // src has posted its dest_* slots
  static constexpr int data(int num_nodes, int src) { return num_nodes + src; }  // src's bytes have landed
  static constexpr int count(int num_nodes) { return 2 * num_nodes; }
};

}  // namespace openep::detail
