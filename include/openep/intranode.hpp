// Normal-mode (training / prefill) dispatch and combine among the ranks of one NVLink domain (EP 2..8).
//
// Semantics are DeepEP V1's (docs: deepep-v1-interface.md 2.5, 2.6, 5.1-5.7) and the CPU reference's
// (reference/openep/reference.hpp): received rows are ordered by (source rank, source token index);
// top-k indices arrive as local expert ids (-1 where the expert lives elsewhere, weight 0); combine sums each
// token's returned rows over ranks in fp32 in ascending rank order, then adds bias_0 and bias_1, so results
// are bitwise reproducible.
//
// A dispatch is two calls, so that the caller can allocate outputs whose size depends on other ranks:
//   1. Buffer::dispatch_prepare()  launches the count exchange (every rank learns how many rows it receives,
//      computes the handle's send positions) and, in exact mode, waits on the host for the counts;
//   2. Buffer::dispatch()          moves the rows into the caller's outputs.
// Worst-case mode (num_worst_tokens > 0) and cached mode (a handle from an earlier dispatch) never wait on the
// host, so both calls can be captured in a CUDA graph. combine() is one call and never waits on the host.
//
// All pointers are device pointers on the Buffer's device, row-major and contiguous unless a stride is given.
// Every call is enqueued on the stream it is given and returns without synchronising the device. Arguments
// are validated before anything is launched (openep::Error, kInvalidArgument or kBufferTooSmall naming the
// argument and the size needed); peer timeouts surface at the next synchronisation point (Buffer::synchronize).
#pragma once

#include <cstdint>
#include <vector>

#include "openep/config.hpp"
#include "openep/types.hpp"

namespace openep {

// What a later combine and a cached dispatch need (DeepEP's handle). Device arrays owned by the caller; they
// must stay alive and unmodified until the last combine or cached dispatch that uses them has completed.
struct IntranodeHandle {
  int num_tokens = 0;                 // this rank's token count in the dispatch that produced the handle
  int num_recv_tokens = 0;            // rows received (exact mode), or num_worst_tokens (worst-case mode)
  const bool* is_token_in_rank = nullptr;  // [num_tokens][R] the routing mask passed to dispatch
  int* rank_prefix_matrix = nullptr;  // [R][R] int32: [i][j] = rows rank j receives from ranks 0..i
  int* num_tokens_per_src = nullptr;  // [R] int32: token count of every rank in that dispatch
  int* send_pos = nullptr;            // [num_tokens][R] int32: row of my token t in rank r's receive order, -1
  int* recv_src_idx = nullptr;        // [num_recv_tokens] int32: source token index of every received row
  // Filled by dispatch_prepare: the most rows one rank sends another rank (over pairs s != d) and the largest token
  // count over all ranks, the same on every rank. Exact mode: the real counts; worst-case mode: the caller's bounds
  // (min(num_worst_tokens, max_tokens_per_rank or num_tokens) and max_tokens_per_rank or num_tokens). They fix how
  // many rounds a dispatch, cached dispatch or combine through a window too small for the whole batch takes.
  int max_pair_rows = 0;
  int max_num_tokens = 0;
};

struct DispatchArgs {
  const void* x = nullptr;            // [num_tokens][hidden] elements of x_elem_bytes (BF16: 2, FP8 e4m3: 1)
  int num_tokens = 0;
  int hidden = 0;
  int x_elem_bytes = 2;
  // Optional per-token scales (FP8): num_scales 4-byte words per token (float32, or packed UE8M0 int32),
  // element (t, j) at x_scales[t * scale_token_stride + j * scale_hidden_stride] (any strides, in words).
  const void* x_scales = nullptr;
  int num_scales = 0;
  int64_t scale_token_stride = 0, scale_hidden_stride = 1;
  // Optional top-k, present iff num_topk > 0 (then both arrays are required; required when
  // num_worst_tokens > 0; absent in cached mode).
  const void* topk_idx = nullptr;     // [num_tokens][num_topk], index_type, -1 = none
  IndexType index_type = IndexType::kInt64;
  const float* topk_weights = nullptr;  // [num_tokens][num_topk]
  int num_topk = 0;
  // Routing (exact and worst-case modes; ignored in cached mode): get_dispatch_layout's outputs.
  const bool* is_token_in_rank = nullptr;       // [num_tokens][R]
  const int* num_tokens_per_rank = nullptr;     // [R]
  const int* num_tokens_per_expert = nullptr;   // [num_experts]
  int num_experts = 0;                          // multiple of R, at most 1024 experts per rank
  int expert_alignment = 1;
  int num_worst_tokens = 0;           // > 0: worst-case mode, outputs have exactly this many rows
  Config config;                      // config.num_sms blocks
  // Internode only (openep/internode.hpp); ignored by intranode dispatch.
  const int* num_tokens_per_rdma_rank = nullptr;  // [num_nodes] get_dispatch_layout's output
  // Worst-case mode: the most tokens any rank passes (equal on every rank); internode: the records sent to each other
  // node; intranode: with num_worst_tokens it bounds the rows one rank sends another, which fixes the rounds when the
  // batch exceeds the Buffer. 0 = num_tokens (then every rank must pass the same num_tokens).
  int max_tokens_per_rank = 0;
};

// Results of dispatch_prepare in exact mode (empty vectors otherwise).
struct DispatchCounts {
  int num_recv_tokens = 0;                        // rows to allocate (num_worst_tokens in worst-case mode)
  std::vector<int> num_recv_tokens_per_expert;    // [E_local], rounded up to expert_alignment; empty unless exact
};

struct DispatchOutputs {
  void* recv_x = nullptr;             // [rows][hidden] of x_elem_bytes
  void* recv_x_scales = nullptr;      // [rows][num_scales] 4-byte words, contiguous (when scales are given)
  void* recv_topk_idx = nullptr;      // [rows][num_topk] of index_type (when top-k is given)
  float* recv_topk_weights = nullptr; // [rows][num_topk]
  int* num_recv_tokens_per_expert = nullptr;  // optional device copy [E_local] (aligned counts)
};

struct CombineArgs {
  const uint16_t* x = nullptr;        // [handle.num_recv_tokens][hidden] BF16, rows in dispatch receive order
  int hidden = 0;
  const float* topk_weights = nullptr;  // [handle.num_recv_tokens][num_topk], present iff num_topk > 0
  int num_topk = 0;
  const uint16_t* bias_0 = nullptr;   // optional [handle.num_tokens][hidden] BF16, added once per token
  const uint16_t* bias_1 = nullptr;   // optional, same shape
  Config config;
};

struct CombineOutputs {
  uint16_t* combined_x = nullptr;               // [handle.num_tokens][hidden] BF16
  float* combined_topk_weights = nullptr;       // [handle.num_tokens][num_topk] when topk_weights given
};

// Bytes of Buffer num_nvl_bytes with which dispatch and combine of these shapes run in ONE round (worst case: every
// rank sends all max_tokens_per_rank tokens to every rank; own rows never pass through the window, so the data
// region is (R - 1) x max_tokens_per_rank records of the larger of the dispatch and combine record). Dispatch and
// combine share the region. Exact-mode dispatch, cached dispatch of an exact-mode handle and their combine run with
// any smaller Buffer (DeepEP's Config.get_nvl_buffer_size_hint, openep/config.hpp) in rounds: each round after the
// first costs a barrier. Worst-case mode (num_worst_tokens) runs in rounds too, sized from the caller's bounds
// (DispatchArgs::max_tokens_per_rank), so with a small Buffer it may take more rounds than the batch needs.
size_t intranode_buffer_size_hint(int num_ranks, int max_tokens_per_rank, int hidden, int x_elem_bytes,
                                  int num_scales, int num_topk);

}  // namespace openep
