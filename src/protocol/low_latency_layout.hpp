// Layout of the low-latency region of the window (BufferOptions::num_rdma_bytes) and the device-side state of
// the low-latency kernels. Identical on every rank: an offset means the same thing on every peer. Offsets are
// relative to the start of the region (WindowLayout::rdma_offset); kernels take them from the named slots.
//
//   [signals]  dispatch_flags  uint64 [2 halves][kMaxExperts]: slot s (source rank) holds
//                              (epoch << 32) | (num_topk of s << 16) | num_tokens of s in that dispatch
//              combine_flags   uint64 [2 halves][kMaxExperts]: slot s (expert-side rank) holds the epoch of
//                              the combine whose rows from all of rank s's experts have arrived
//              dispatch_counts int32 [2 halves][kMaxExperts]: slot s * E_local + i holds the rows source s sent
//                              to local expert i (valid once flag s of the half carries the epoch)
//   [dispatch] two halves of [R][T] messages, one per (source rank, source token): kHeaderBytes of routing
//              (int32 per top-k slot k: (local expert << 16) | slot inside the (expert, source) range, or -1
//              when slot k's expert is not on this rank), then the payload (hidden bytes of e4m3 or 2 * hidden
//              bytes of BF16), then hidden/128 float32 scales when FP8
//   [combine]  two halves of [E][T][hidden] BF16: the row returned by expert e for my token t (with use_logfmt:
//              the row's LogFMT bytes, a 256-byte slot per 128-channel division; protocol/logfmt.hpp)
//   [meta]     two halves of [E][T][meta_row_bytes]: the LogFMT metadata of those rows (one uint32 per
//              128-channel division, padded to 16 bytes; written only by a use_logfmt combine)
//   [staging]  the zero-copy combine buffer [E_local][R*T][hidden] BF16
// The signal area does not depend on the shapes, so calls with different shapes never confuse each other:
// every signal carries a monotonic epoch and a waiter only accepts its own epoch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "openep/types.hpp"
#include "protocol/host_device.hpp"

namespace openep::detail {

struct LowLatencyLayout {
  static constexpr size_t kFlagBytes = sizeof(uint64_t) * 2 * kMaxExperts;
  static constexpr size_t kDispatchFlags = 0;
  static constexpr size_t kCombineFlags = kFlagBytes;
  static constexpr size_t kDispatchCounts = 2 * kFlagBytes;
  static constexpr size_t kCountBytes = sizeof(int32_t) * 2 * kMaxExperts;
  static constexpr size_t kSignalBytes = 2 * kFlagBytes + kCountBytes;
  // Routing header of a dispatch message: one int32 per top-k slot (kMaxLowLatencyTopk = 32 slots).
  static constexpr size_t kHeaderBytes = 128;

  size_t msg_bytes = 0;            // one dispatch message
  size_t row_bytes = 0;            // one BF16 combine row (2 * hidden)
  size_t dispatch_offset = 0, dispatch_half = 0;
  size_t combine_offset = 0, combine_half = 0;
  size_t meta_row_bytes = 0;       // LogFMT metadata of one combine row: align16(4 * (hidden / 128))
  size_t combine_meta_offset = 0, combine_meta_half = 0;
  size_t staging_offset = 0;
  size_t total = 0;
  int T = 0;                       // num_max_dispatch_tokens_per_rank

  // ---- named slots (byte offsets in the region) ----
  // uint64: (epoch << 32) | (K << 16) | num_tokens of source `src`'s dispatch in half `half`.
  OPENEP_HOST_DEVICE static size_t dispatch_flag(int half, int src) {
    return kDispatchFlags + sizeof(uint64_t) * (static_cast<size_t>(half) * kMaxExperts + src);
  }
  // uint64: epoch of the combine whose rows from all of rank `src`'s experts have arrived, half `half`.
  OPENEP_HOST_DEVICE static size_t combine_flag(int half, int src) {
    return kCombineFlags + sizeof(uint64_t) * (static_cast<size_t>(half) * kMaxExperts + src);
  }
  // int32: rows source s sent to local expert i, at index s * E_local + i (`index`), half `half`.
  OPENEP_HOST_DEVICE static size_t dispatch_count(int half, int index) {
    return kDispatchCounts + sizeof(int32_t) * (static_cast<size_t>(half) * kMaxExperts + index);
  }
  // The dispatch message of (source rank src, source token t) in half `half`.
  OPENEP_HOST_DEVICE size_t dispatch_message(int half, int src, int t) const {
    return dispatch_offset + half * dispatch_half + (static_cast<size_t>(src) * T + t) * msg_bytes;
  }
  // The combine row returned by global expert e for my token t, half `half`.
  OPENEP_HOST_DEVICE size_t combine_row(int half, int e, int t) const {
    return combine_offset + half * combine_half + (static_cast<size_t>(e) * T + t) * row_bytes;
  }
  // The LogFMT metadata (uint32 per 128-channel division) of combine_row(half, e, t).
  OPENEP_HOST_DEVICE size_t combine_meta(int half, int e, int t) const {
    return combine_meta_offset + half * combine_meta_half + (static_cast<size_t>(e) * T + t) * meta_row_bytes;
  }
  // Row `row` of the zero-copy combine buffer [E_local][R*T].
  OPENEP_HOST_DEVICE size_t zero_copy_row(size_t row) const { return staging_offset + row * row_bytes; }

  static constexpr size_t align(size_t v, size_t a) { return (v + a - 1) / a * a; }
  static constexpr size_t message_bytes(int hidden) {
    const size_t h = static_cast<size_t>(hidden);
    const size_t fp8 = h + (h / 128) * 4, bf16 = 2 * h;
    return align(kHeaderBytes + (fp8 > bf16 ? fp8 : bf16), 16);
  }
  static LowLatencyLayout make(int T, int hidden, int R, int E) {
    LowLatencyLayout l;
    const size_t e_local = static_cast<size_t>(E / R);
    l.msg_bytes = message_bytes(hidden);
    l.row_bytes = 2 * static_cast<size_t>(hidden);
    l.T = T;
    l.dispatch_offset = kSignalBytes;
    l.dispatch_half = align(static_cast<size_t>(R) * T * l.msg_bytes, 128);
    l.combine_offset = l.dispatch_offset + 2 * l.dispatch_half;
    l.combine_half = align(static_cast<size_t>(E) * T * hidden * 2, 128);
    l.meta_row_bytes = align(static_cast<size_t>(hidden / 128) * sizeof(uint32_t), 16);
    l.combine_meta_offset = l.combine_offset + 2 * l.combine_half;
    l.combine_meta_half = align(static_cast<size_t>(E) * T * l.meta_row_bytes, 128);
    l.staging_offset = l.combine_meta_offset + 2 * l.combine_meta_half;
    l.total = align(l.staging_offset + e_local * R * T * hidden * 2, 128);
    return l;
  }
};

// Device memory private to one rank, zeroed at Buffer creation and by clean_low_latency_buffer. Index 0 is
// dispatch, 1 is combine. Epochs count completed send (receive) kernels; a kernel works on epoch + 1 and the
// last block to finish stores it (a ticket counts the finished blocks and is reset by that last block).
struct LowLatencyState {
  uint64_t send_epoch[2];
  uint64_t recv_epoch[2];
  uint32_t send_ticket[2];
  uint32_t recv_ticket[2];
  int32_t slot_counter[kMaxExperts];  // dispatch: messages this rank sends to each global expert (reset by the
                                      // last send block after publishing them)
};

}  // namespace openep::detail
