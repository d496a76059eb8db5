// Launchers of the internode normal-mode kernels (src/kernels/internode.cu has the protocol). One Params struct
// per kernel. Per-node rail bases are entry indices into a rail half (InternodeRailLayout).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "protocol/device_error.hpp"
#include "protocol/internode_layout.hpp"

namespace openep::detail {

// This rank's view of its node window.
struct InternodeNodeRef {
  char* const* peer_bases;   // [M] device table: window base of each rank of my node (local rank order)
  size_t nvl_offset;         // window offset of the internode region
  InternodeNvlLayout layout;
  int local_rank, ranks_per_node, node, num_nodes;
};

// Per-node entry bases of the rail halves: records (or partials) to/from node n start at entry base[n].
struct InternodeRailBases {
  int64_t send[kMaxInternodeNodes];  // half A: this rank's records to node n / partials back from node n
  int64_t recv[kMaxInternodeNodes];  // half B: records from node n / partials to node n
};

// Increments one epoch counter (the first kernel of every internode operation).
void launch_internode_begin(uint64_t* epoch, cudaStream_t stream);

struct InternodePlanParams {
  const bool* is_token_in_rank;       // [T][R]
  const int* num_tokens_per_rank;     // [R]
  const int* num_tokens_per_rdma_rank;  // [N]
  const int* num_tokens_per_expert;   // [E]
  int num_tokens, num_ranks, ranks_per_node, num_nodes, experts_per_rank;
  int* send_pos;                      // [T][R] out
  int* send_rdma_head;                // [T][N] out
  int32_t* header_send;               // [N][header_ints] out (rail header buffer)
  int header_ints;
  WaitContext wait;
};
void launch_internode_plan(const InternodePlanParams& p, cudaStream_t stream);

struct InternodeCountParams {
  InternodeNodeRef node;
  const uint64_t* epoch;              // dispatch epoch (already incremented)
  const int32_t* header_send;         // [N][header_ints]: my headers (the own node's is read from here)
  const int32_t* header_recv;         // [N][header_ints]: headers of my rail peers, from the rail
  int header_ints, num_ranks, experts_per_rank, expert_alignment;
  const int* num_tokens_per_rdma_rank;  // [N] mine
  int num_worst_tokens;
  int64_t dispatch_capacity, combine_capacity;  // rows / records the node window holds
  int* node_prefix;                   // [R][M] out
  int* recv_gbl_rank_prefix_sum;      // [R] out
  int* recv_rdma_rank_prefix_sum;     // [N] out
  int* num_recv_tokens_per_expert;    // [El] optional out
  InternodeHostCounters* host;        // device view, or null (worst-case mode)
  int64_t host_seq;
  WaitContext wait;
};
void launch_internode_count(const InternodeCountParams& p, cudaStream_t stream);

struct InternodePackParams {
  const void* x;
  int row_bytes;                      // multiple of 16
  const uint32_t* x_scales;
  int num_scales;
  int64_t scale_token_stride, scale_hidden_stride;
  const void* topk_idx;               // null: no top-k
  bool topk_int64;
  const float* topk_weights;
  int num_topk, num_tokens, num_ranks, ranks_per_node, num_nodes;
  const int* send_pos;                // [T][R]
  const int* send_rdma_head;          // [T][N]
  char* rail;                         // rail buffer base (half A)
  InternodeRailLayout rail_layout;
  size_t record_bytes;
  InternodeRailBases bases;
  WaitContext wait;
};
void launch_internode_pack(const InternodePackParams& p, int num_blocks, cudaStream_t stream);

struct InternodeForwardParams {
  InternodeNodeRef node;
  const uint64_t* epoch;
  uint32_t* ticket;
  const char* rail;
  InternodeRailLayout rail_layout;
  InternodeRailBases bases;
  size_t record_bytes, row_out_bytes;  // rail record, node-window receive row
  int row_bytes, num_topk, num_scales, experts_per_rank;
  const int* recv_rdma_rank_prefix_sum;  // [N]
  const int* node_prefix;                // [R][M]
  int* recv_rdma_mask;                   // [records] out, or null (cached)
  int64_t dispatch_capacity;
  InternodeChunk part;                   // which records this launch forwards
  WaitContext wait;
};
void launch_internode_forward(const InternodeForwardParams& p, int num_blocks, cudaStream_t stream);

struct InternodeDrainParams {
  InternodeNodeRef node;
  const uint64_t* epoch;
  uint32_t* ticket;
  size_t row_out_bytes;
  int row_bytes, num_topk, num_scales, num_ranks, num_worst_tokens;
  const int* recv_gbl_rank_prefix_sum;  // [R]: the last entry is the row count
  void* recv_x;
  uint32_t* recv_x_scales;
  void* recv_topk_idx;
  bool topk_int64;
  float* recv_topk_weights;
  int* recv_src_idx;                    // null in cached mode
  int* recv_src_meta;                   // [rows][2], null in cached mode
  WaitContext wait;
};
void launch_internode_drain(const InternodeDrainParams& p, int num_blocks, cudaStream_t stream);

struct InternodeCombineSendParams {
  InternodeNodeRef node;
  const uint64_t* epoch;              // combine epoch
  uint32_t* ticket;
  const uint16_t* x;                  // [rows][hidden]
  const float* topk_weights;          // [rows][K] or null
  int hidden, num_topk, num_ranks;
  const int* recv_gbl_rank_prefix_sum;  // [R]
  const int* recv_src_meta;           // [rows][2]
  size_t entry_bytes;
  int64_t combine_capacity;
  WaitContext wait;
};
void launch_internode_combine_send(const InternodeCombineSendParams& p, int num_blocks, cudaStream_t stream);

struct InternodeNodeReduceParams {
  InternodeNodeRef node;
  const uint64_t* epoch;
  uint32_t* ticket;
  int hidden, num_topk;
  const int* recv_rdma_rank_prefix_sum;  // [N]
  const int* recv_rdma_mask;             // [records]
  char* rail;
  InternodeRailLayout rail_layout;
  InternodeRailBases bases;
  size_t entry_bytes;
  InternodeChunk part;                   // which records this launch reduces
  WaitContext wait;
};
void launch_internode_node_reduce(const InternodeNodeReduceParams& p, int num_blocks, cudaStream_t stream);

struct InternodeCombineFinalParams {
  const char* rail;
  InternodeRailLayout rail_layout;
  InternodeRailBases bases;
  size_t entry_bytes;
  const int* send_rdma_head;          // [T][N]
  int num_tokens, num_nodes, hidden, num_topk;
  const uint16_t* bias_0;
  const uint16_t* bias_1;
  uint16_t* combined_x;
  float* combined_topk_weights;
  WaitContext wait;
};
void launch_internode_combine_final(const InternodeCombineFinalParams& p, int num_blocks, cudaStream_t stream);

}  // namespace openep::detail
