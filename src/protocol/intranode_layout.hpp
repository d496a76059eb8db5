// Layout of the normal-mode (intranode) region of the symmetric window. Host and device use this one struct;
// kernels take the offset of a named slot from it and do no offset arithmetic of their own. Identical on
// every rank for identical call shapes, so an offset computed locally addresses the same thing in a peer's
// window. Offsets are relative to the start of the region (WindowLayout::nvl_offset).
//
//   header (fixed size):
//     int32  counts[kMaxRanks][kMaxRanks]         counts[s][d]: tokens rank s sends to rank d (row s written by s)
//     int32  num_tokens[kMaxRanks]                 num_tokens[s]: token count of rank s
//     int32  expert_counts[kMaxRanks][kMaxLocalExperts]  tokens rank s sends to each of MY local experts
//     uint64 dispatch_flags[kMaxRanks][kMaxChunks] set to the op epoch by source s when its chunk c has landed
//     int32  dispatch_ranges[kMaxRanks][kMaxChunks][2]   (first row, row count) of source s's chunk c here
//     uint64 combine_flags[kMaxRanks][kMaxChunks]  set to the op epoch by rank d when it returned my chunk c
//     OutputDesc out_desc[kMaxRanks]               written by rank d each dispatch round: where d's outputs are
//     CombineInputDesc in_desc[kMaxRanks]          written by rank d each combine round: where d's combine input is
//     uint64 combine_done[kMaxRanks]               set to the op epoch by rank d once it stopped reading my input
//   data (from data_offset; dispatch and combine use it at different times, separated by barriers). Own rows never
//   pass through it (they go straight from the caller's input to the caller's output), so it is split among the
//   R - 1 PEERS only, peer p at slot peer_slot(p, me) (p < me ? p : p - 1):
//     dispatch: records[R - 1][peer_rows] = [row bytes | src_idx | topk idx (int32 local) x K | weights x K | scales x S];
//               round k of source s holds s's receive rows [lo_s + k * peer_rows, lo_s + (k + 1) * peer_rows) here
//     combine:  stage[R - 1][stage_rows]  = [BF16 row | weights x K] in the RECEIVER's order: slot
//               (peer_slot(d), combine_slot(row - lo, stage_rows)) holds rank d's receive row `row` of my tokens (lo:
//               d's first row from me). d's rows from me are sorted by my token, so the push is contiguous and a
//               reducer's chunk of tokens reads contiguous slots; the part needs only count[me][d] rows (not my
//               token count). Rounds (when a pair's rows exceed a part) carry my tokens [tok_lo, tok_hi), at most
//               stage_rows of them, so their rows' slots (rel mod stage_rows) never collide within a round
#pragma once

#include <cstddef>
#include <cstdint>

#include "protocol/host_device.hpp"

namespace openep::detail {

struct IntranodeLayout {
  static constexpr int kMaxRanks = 8;
  static constexpr int kMaxChunks = 128;
  static constexpr int kMaxLocalExperts = 1024;
  static constexpr int kMinChunkTokens = 16;

  static constexpr size_t kCountsOffset = 0;
  static constexpr size_t kNumTokensOffset = kCountsOffset + sizeof(int32_t) * kMaxRanks * kMaxRanks;
  static constexpr size_t kExpertCountsOffset = kNumTokensOffset + sizeof(int32_t) * kMaxRanks;
  static constexpr size_t kDispatchFlagsOffset =
      (kExpertCountsOffset + sizeof(int32_t) * kMaxRanks * kMaxLocalExperts + 255) / 256 * 256;
  static constexpr size_t kDispatchRangesOffset = kDispatchFlagsOffset + sizeof(uint64_t) * kMaxRanks * kMaxChunks;
  static constexpr size_t kCombineFlagsOffset = kDispatchRangesOffset + sizeof(int32_t) * 2 * kMaxRanks * kMaxChunks;
  static constexpr size_t kOutDescOffset = kCombineFlagsOffset + sizeof(uint64_t) * kMaxRanks * kMaxChunks;
  // Where a receiver's dispatch outputs are (offsets from its WINDOW base, -1 = not window-backed: the rows go to its
  // window part and it copies them out). Published by the receiver at every dispatch round, `epoch` (the round's op
  // epoch, st.release) last; senders read it after an acquire of `epoch`.
  struct OutputDesc {
    uint64_t epoch;
    int64_t x, scales, topk_idx, topk_weights, src_idx;
    int32_t topk_int64, pad;
  };
  // Where a rank's combine input is (offsets from its WINDOW base; x = -1: not window-backed, so the rank pushes its
  // rows into the owners' stages). When x (and the weights, if any) lie in the pool, the owners' reducers read the
  // rows straight from it (pull) and the rank pushes nothing. Published at every combine round, `epoch` last.
  struct CombineInputDesc {
    uint64_t epoch;
    int64_t x, topk_weights;
  };
  static constexpr size_t kInDescOffset = kOutDescOffset + sizeof(OutputDesc) * kMaxRanks;
  static constexpr size_t kCombineDoneOffset = kInDescOffset + sizeof(CombineInputDesc) * kMaxRanks;
  static constexpr size_t kDataOffset =
      (kCombineDoneOffset + sizeof(uint64_t) * kMaxRanks + 4095) / 4096 * 4096;

  OPENEP_HOST_DEVICE static size_t align16(size_t v) { return (v + 15) / 16 * 16; }

  // ---- named slots (byte offsets in the region) ----
  // int32: tokens rank s sends to rank d (row s of the count matrix).
  OPENEP_HOST_DEVICE static size_t count(int s, int d) {
    return kCountsOffset + sizeof(int32_t) * (static_cast<size_t>(s) * kMaxRanks + d);
  }
  // int32: token count of rank s.
  OPENEP_HOST_DEVICE static size_t num_tokens(int s) { return kNumTokensOffset + sizeof(int32_t) * s; }
  // int32: tokens rank s sends to the region owner's local expert e.
  OPENEP_HOST_DEVICE static size_t expert_count(int s, int e) {
    return kExpertCountsOffset + sizeof(int32_t) * (static_cast<size_t>(s) * kMaxLocalExperts + e);
  }
  // uint64: op epoch once source s's dispatch chunk c has landed here.
  OPENEP_HOST_DEVICE static size_t dispatch_flag(int s, int c) {
    return kDispatchFlagsOffset + sizeof(uint64_t) * (static_cast<size_t>(s) * kMaxChunks + c);
  }
  // int32[2]: (first row, row count) of source s's dispatch chunk c here.
  OPENEP_HOST_DEVICE static size_t dispatch_range(int s, int c) {
    return kDispatchRangesOffset + sizeof(int32_t) * 2 * (static_cast<size_t>(s) * kMaxChunks + c);
  }
  // uint64: op epoch once rank d has returned row block b of the region owner's tokens.
  OPENEP_HOST_DEVICE static size_t combine_flag(int d, int b) {
    return kCombineFlagsOffset + sizeof(uint64_t) * (static_cast<size_t>(d) * kMaxChunks + b);
  }
  // OutputDesc of rank d (in the region owner's header).
  OPENEP_HOST_DEVICE static size_t out_desc(int d) { return kOutDescOffset + sizeof(OutputDesc) * d; }
  // CombineInputDesc of rank d (in the region owner's header).
  OPENEP_HOST_DEVICE static size_t in_desc(int d) { return kInDescOffset + sizeof(CombineInputDesc) * d; }
  // uint64: op epoch once rank d has finished reading the region owner's combine input (last round of a combine).
  OPENEP_HOST_DEVICE static size_t combine_done(int d) { return kCombineDoneOffset + sizeof(uint64_t) * d; }
  // Dispatch record `i` of the data region (i = peer_slot(s, me) * peer_rows + row within source s's round).
  OPENEP_HOST_DEVICE static size_t dispatch_record(int64_t i, size_t record_bytes) {
    return kDataOffset + static_cast<size_t>(i) * record_bytes;
  }
  // Combine stage record (peer slot, j): j = combine_slot(rel, stage_rows) for the peer's receive row lo + rel of the
  // region owner's tokens.
  OPENEP_HOST_DEVICE static size_t combine_stage(int slot, int64_t j, int64_t stage_rows, size_t record_bytes) {
    return kDataOffset + static_cast<size_t>(static_cast<int64_t>(slot) * stage_rows + j) * record_bytes;
  }
  // Slot within a peer's stage part of the pair row `rel` (0-based among the rows the peer received from the owner).
  // One round: rel < stage_rows, the identity. Several rounds: a round's rows are < stage_rows consecutive rel, so
  // modulo never maps two of them to one slot.
  OPENEP_HOST_DEVICE static int64_t combine_slot(int64_t rel, int64_t stage_rows) {
    return rel < stage_rows ? rel : rel % stage_rows;
  }
  // Combine rounds: one when every pair's rows fit a stage part (max_pair_rows: max over s != d of the rows s sends
  // d), else rounds of at most stage_rows owner tokens each; 0 when a part holds no row but rows must move.
  OPENEP_HOST_DEVICE static int64_t combine_rounds(int64_t max_pair_rows, int64_t max_num_tokens, int64_t stage_rows) {
    if (max_pair_rows <= stage_rows) return 1;
    return num_rounds(max_num_tokens, stage_rows);
  }

  // Chunk size (tokens) a rank with num_tokens tokens uses; every rank derives it from the exchanged counts.
  OPENEP_HOST_DEVICE static int chunk_tokens(int num_tokens) {
    const int c = (num_tokens + kMaxChunks - 1) / kMaxChunks;
    return c < kMinChunkTokens ? kMinChunkTokens : c;
  }
  OPENEP_HOST_DEVICE static int num_chunks(int num_tokens) {
    const int c = chunk_tokens(num_tokens);
    return (num_tokens + c - 1) / c;
  }

  // Dispatch record: row, then metadata, each part 16-byte aligned.
  OPENEP_HOST_DEVICE static size_t dispatch_meta_bytes(int num_topk, int num_scales) {
    return align16(sizeof(int32_t) * (1 + 2 * static_cast<size_t>(num_topk) + num_scales));
  }
  OPENEP_HOST_DEVICE static size_t dispatch_record_bytes(size_t row_bytes, int num_topk, int num_scales) {
    return align16(row_bytes) + dispatch_meta_bytes(num_topk, num_scales);
  }
  OPENEP_HOST_DEVICE static size_t combine_record_bytes(int hidden, int num_topk) {
    return align16(2 * static_cast<size_t>(hidden)) + align16(sizeof(float) * static_cast<size_t>(num_topk));
  }
  // Index of source p among the R - 1 peers of rank me (p != me).
  OPENEP_HOST_DEVICE static int peer_slot(int p, int me) { return p < me ? p : p - 1; }
  OPENEP_HOST_DEVICE static int num_peer_slots(int num_ranks) { return num_ranks > 1 ? num_ranks - 1 : 1; }
  // Dispatch records per peer, and combine stage slots per peer (tokens of one round), that fit the data region.
  OPENEP_HOST_DEVICE static int64_t dispatch_peer_rows(size_t nvl_bytes, size_t record_bytes, int num_ranks) {
    return nvl_bytes <= kDataOffset
               ? 0
               : static_cast<int64_t>((nvl_bytes - kDataOffset) / (record_bytes * num_peer_slots(num_ranks)));
  }
  OPENEP_HOST_DEVICE static int64_t combine_stage_rows(size_t nvl_bytes, size_t record_bytes, int num_ranks) {
    return nvl_bytes <= kDataOffset
               ? 0
               : static_cast<int64_t>((nvl_bytes - kDataOffset) / (record_bytes * num_peer_slots(num_ranks)));
  }
  // Rounds: an operation whose largest need (dispatch: rows one rank sends another, max over pairs; combine: tokens,
  // max over ranks) exceeds what a peer's part of the region holds runs in rounds of `capacity` units, every rank
  // the same number. Round k covers units [k * capacity, (k + 1) * capacity); 0 when capacity < 1.
  OPENEP_HOST_DEVICE static int64_t num_rounds(int64_t need, int64_t capacity) {
    if (capacity < 1) return 0;
    return need <= capacity ? 1 : (need + capacity - 1) / capacity;
  }
};

// Pinned, device-mapped host memory the intranode prepare kernel fills in exact mode (the host polls `seq`).
struct HostCounters {
  int64_t seq;                      // written last: the host_seq of the prepare that filled the rest
  int32_t num_recv_tokens;
  int32_t max_pair_rows;            // max over s != d of the rows s sends d (dispatch's round count)
  int32_t max_num_tokens;           // max over every rank s of its token count (combine's round count)
  int32_t num_recv_tokens_per_expert[IntranodeLayout::kMaxLocalExperts];   // aligned counts, [E_local]
};

}  // namespace openep::detail
