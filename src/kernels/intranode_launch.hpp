// Launchers of the intranode (normal-mode) kernels. See src/kernels/intranode.cu for the protocol.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "protocol/device_error.hpp"
#include "protocol/intranode_layout.hpp"

namespace openep::detail {

struct WindowRef {
  char* const* peer_bases;          // [R] device table of LSA window bases
  size_t nvl_offset;                // window offset of the normal-mode region
  size_t barrier_offset;            // window offset of the barrier counters
};

struct PrepareParams {
  WindowRef window;
  uint64_t* barrier_epoch;          // local state, this slot
  int barrier_slot;
  uint64_t* op_epoch;               // incremented once per operation (read by the main kernels)
  int rank, num_ranks;
  bool exchange;                    // false: barrier + epoch only (cached dispatch, combine)
  // Exchange inputs.
  int num_tokens;
  const int* num_tokens_per_rank;   // [R]
  const int* num_tokens_per_expert; // [E]
  const bool* is_token_in_rank;     // [N][R]
  int num_experts, expert_alignment;
  int num_worst_tokens;             // > 0: check the real count fits
  // Outputs.
  int* rank_prefix_matrix;          // [R][R]
  int* num_tokens_per_src;          // [R]
  int* send_pos;                    // [N][R]
  int* num_recv_tokens_per_expert;  // optional device copy [E_local]
  HostCounters* host;               // device view of the mapped counters, or null
  int64_t host_seq;
  WaitContext wait;
};
void launch_intranode_prepare(const PrepareParams& p, cudaStream_t stream);

struct DispatchParams {
  WindowRef window;
  const uint64_t* op_epoch;
  int rank, num_ranks, num_senders;
  const void* x;
  int num_tokens;
  int row_bytes;                    // multiple of 16
  const uint32_t* x_scales;
  int num_scales;
  int64_t scale_token_stride, scale_hidden_stride;
  const void* topk_idx;
  bool topk_int64;
  const float* topk_weights;
  int num_topk, experts_per_rank;
  const int* send_pos;              // [N][R]
  const int* rank_prefix_matrix;    // [R][R]
  const int* num_tokens_per_src;    // [R]
  void* recv_x;
  uint32_t* recv_x_scales;
  void* recv_topk_idx;
  float* recv_topk_weights;
  int* recv_src_idx;                // null in cached mode (the handle already holds it)
  int num_worst_tokens;
  int record_bytes;
  // The window part per peer (IntranodeLayout::dispatch_peer_rows) and this launch's round of num_rounds: each
  // source's rows [round * peer_rows, (round + 1) * peer_rows) of its range at d; own rows in round 0 only.
  int64_t peer_rows;
  int round, num_rounds;
  // Window-backed outputs (Buffer::alloc_recv): offsets of this rank's outputs from its window base (-1 = not in the
  // pool). out_pool: every output this dispatch writes is in the pool, so peers store rows straight into them and
  // this rank's receivers only wait. Published to the peers in every round (IntranodeLayout::OutputDesc).
  int64_t out_x, out_scales, out_topk_idx, out_topk_weights, out_src_idx;
  bool out_pool;
  WaitContext wait;
};
void launch_intranode_dispatch(const DispatchParams& p, int num_blocks, cudaStream_t stream);

struct CombineParams {
  WindowRef window;
  const uint64_t* op_epoch;
  int rank, num_ranks, num_senders;
  const uint16_t* x;                // [num_recv][hidden]
  int hidden;
  const float* topk_weights;        // [num_recv][K] or null
  int num_topk;
  const uint16_t* bias_0;
  const uint16_t* bias_1;
  int num_tokens;
  const int* send_pos;
  const int* rank_prefix_matrix;
  const int* num_tokens_per_src;
  const int* recv_src_idx;
  uint16_t* combined_x;
  float* combined_topk_weights;
  int record_bytes;
  int64_t stage_rows;               // stage slots per peer (IntranodeLayout::combine_stage_rows)
  // This launch's round of num_rounds: the owner's tokens [tok_lo, tok_hi) (all of them in one round); a peer's row
  // lo + rel of the owner's tokens is at stage slot (peer, IntranodeLayout::combine_slot(rel, stage_rows)).
  int tok_lo, tok_hi, round, num_rounds;
  // Window-backed combine input (x and, with num_topk > 0, topk_weights from Buffer::alloc_recv): offsets from this
  // rank's window base (-1 = not in the pool). in_pool: the owners pull this rank's rows (no sender blocks), and the
  // kernel's last round ends only once every peer has finished reading them (IntranodeLayout::combine_done).
  int64_t in_x, in_topk_weights;
  bool in_pool;
  uint32_t* ticket;                 // LocalState::combine_ticket
  WaitContext wait;
};
void launch_intranode_combine(const CombineParams& p, int num_blocks, cudaStream_t stream);

}  // namespace openep::detail
