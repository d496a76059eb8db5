// The send-side staging area of the network (GIN) low-latency path: a region of the window that exists only
// on a Buffer created with Transport::kGin, after everything the NVLink layout has (WindowLayout::total_bytes).
// GIN reads a put's source through the NIC, so the source must lie in a registered window: messages are
// staged here, then put to the same offsets of the receiver's low-latency region (LowLatencyLayout), which
// is unchanged. NOT YET RUN ON A REAL NETWORK (no RDMA NICs on the test machines); run only under the loopback
// GIN test plugin (fake nodes on one H200, 2026-12-02).
//
//   [control]  counts  int32 [kMaxExperts]: the dispatch rows this rank sends to each global expert
//                      (destination d's experts are the El consecutive entries from d * El)
//              dispatch_flags uint64 [kMaxGinRanks]: the flag word put to destination d
//              combine_flags  uint64 [kMaxGinRanks]: the flag word put to destination d
//   [payload]  [T] cast rows of this rank's tokens (msg_bytes - kHeaderBytes each; one per token, shared by
//              every destination)
//   [headers]  [R][T] routing headers (kHeaderBytes each; one per (destination, token))
// The combine stages its rows in the LowLatencyLayout zero-copy area instead (already in the window).
// Sizing: payload + headers <= R * T * msg_bytes = one dispatch half <= num_rdma_bytes / 2, so an area of
// kControlBytes + num_rdma_bytes / 2 holds every shape the low-latency region holds.
#pragma once

#include <cstddef>
#include <cstdint>

#include "openep/types.hpp"
#include "protocol/host_device.hpp"
#include "protocol/limits.hpp"
#include "protocol/low_latency_layout.hpp"

namespace openep::detail {

struct LowLatencyGinLayout {
  static constexpr size_t kCounts = 0;
  static constexpr size_t kDispatchFlags = sizeof(int32_t) * kMaxExperts;
  static constexpr size_t kCombineFlags = kDispatchFlags + sizeof(uint64_t) * kMaxGinRanks;
  static constexpr size_t kControlBytes =
      LowLatencyLayout::align(kCombineFlags + sizeof(uint64_t) * kMaxGinRanks, 4096);

  size_t payload_bytes = 0;  // one staged row: msg_bytes - kHeaderBytes
  size_t payload_offset = 0, header_offset = 0;
  size_t used = 0;           // bytes of the area these shapes use
  int T = 0;

  // ---- named slots (byte offsets in the staging area) ----
  // int32 [El]: the dispatch counts of destination d's experts (global experts d * El ...).
  OPENEP_HOST_DEVICE static size_t counts_of(int d, int El) { return kCounts + sizeof(int32_t) * static_cast<size_t>(d) * El; }
  OPENEP_HOST_DEVICE static size_t dispatch_flag(int d) { return kDispatchFlags + sizeof(uint64_t) * d; }
  OPENEP_HOST_DEVICE static size_t combine_flag(int d) { return kCombineFlags + sizeof(uint64_t) * d; }
  // The staged payload of my token t, and the routing header of (destination d, token t).
  OPENEP_HOST_DEVICE size_t payload(int t) const { return payload_offset + static_cast<size_t>(t) * payload_bytes; }
  OPENEP_HOST_DEVICE size_t header(int d, int t) const {
    return header_offset + (static_cast<size_t>(d) * T + t) * LowLatencyLayout::kHeaderBytes;
  }

  // Bytes of the staging area a Buffer with `num_rdma_bytes` of low-latency region reserves.
  static constexpr size_t area_bytes(size_t num_rdma_bytes) {
    return kControlBytes + LowLatencyLayout::align(num_rdma_bytes / 2, 4096);
  }
  static LowLatencyGinLayout make(int T, int hidden, int R) {
    LowLatencyGinLayout l;
    l.payload_bytes = LowLatencyLayout::message_bytes(hidden) - LowLatencyLayout::kHeaderBytes;
    l.payload_offset = kControlBytes;
    l.header_offset = LowLatencyLayout::align(l.payload_offset + static_cast<size_t>(T) * l.payload_bytes, 128);
    l.used = l.header_offset + static_cast<size_t>(R) * T * LowLatencyLayout::kHeaderBytes;
    l.T = T;
    return l;
  }
};

// GIN signal ids of the low-latency path, per context (one id per source rank and purpose). The sender
// posts every put and signal to receiver d on context (d mod ginContextCount), so a signal covers all the
// data the sender put to d before it (NCCL orders a signal after earlier puts on the same context to the
// same peer), and the receiver polls only its own context.
struct GinSignals {
  static constexpr int dispatch(int src) { return src; }
  static constexpr int combine(int num_ranks, int src) { return num_ranks + src; }
  static constexpr int barrier(int num_ranks, int src) { return 2 * num_ranks + src; }
  static constexpr int count(int num_ranks) { return 3 * num_ranks; }
  // dispatch and combine ids are reset by clean_low_latency_buffer; barrier ids are never reset.
  static constexpr int num_resettable(int num_ranks) { return 2 * num_ranks; }
};

}  // namespace openep::detail
