// get_dispatch_layout: per-rank, per-node and per-expert token counts and the is_token_in_rank mask.
//
// One launch, no memset. Each block takes kTokensPerBlock tokens (one thread per token), counts into shared
// memory, then adds its non-zero counts into a zeroed global workspace. The last block to finish (ticket
// counter, threadfence before the ticket) copies the workspace to the outputs and zeroes the workspace and
// the ticket again, so the next call finds it clean. Expert ids outside [-1, num_experts) are reported
// through the error slot (phase get_dispatch_layout, expected = token index, observed = the value).
#include <cuda/atomic>

#include "device/wait.cuh"
#include "kernels/load.hpp"
#include "kernels/launch.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

constexpr int kTokensPerBlock = 128;

struct LayoutParams {
  const void* topk_idx;
  int num_tokens, num_topk, num_experts, num_ranks, num_rdma_ranks, ranks_per_node;
  int* num_tokens_per_rank;
  int* num_tokens_per_rdma_rank;
  int* num_tokens_per_expert;
  bool* is_token_in_rank;
  int* workspace;   // [kMaxRanks | kMaxRanks (nodes) | kMaxExperts | ticket]
  WaitContext wait;
};

template <typename Index>
__device__ __forceinline__ void count_token(const LayoutParams& p, int token, int* s_rank, int* s_rdma,
                                            int* s_expert) {
  const Index* row = static_cast<const Index*>(p.topk_idx) + static_cast<int64_t>(token) * p.num_topk;
  const int experts_per_rank = p.num_experts / p.num_ranks;
  bool* mask = p.is_token_in_rank + static_cast<int64_t>(token) * p.num_ranks;
  for (int r = 0; r < p.num_ranks; ++r) mask[r] = false;
  for (int k = 0; k < p.num_topk; ++k) {
    const int64_t e = static_cast<int64_t>(row[k]);
    if (e < 0 || e >= p.num_experts) {
      if (e != -1)
        device::record_error(p.wait, DeviceErrorCode::kBadExpertIndex, -1, Phase::kLayout, token, e);
      continue;
    }
    atomicAdd(&s_expert[e], 1);
    const int r = static_cast<int>(e) / experts_per_rank;
    // Count the token once per rank and once per node: skip if an earlier slot already hit them.
    bool rank_seen = false, node_seen = false;
    for (int j = 0; j < k; ++j) {
      const int64_t f = static_cast<int64_t>(row[j]);
      if (f < 0 || f >= p.num_experts) continue;
      const int q = static_cast<int>(f) / experts_per_rank;
      rank_seen |= (q == r);
      node_seen |= (q / p.ranks_per_node == r / p.ranks_per_node);
    }
    if (!rank_seen) {
      atomicAdd(&s_rank[r], 1);
      mask[r] = true;
    }
    if (!node_seen && p.num_rdma_ranks > 0) atomicAdd(&s_rdma[r / p.ranks_per_node], 1);
  }
}

template <typename Index>
__global__ void __launch_bounds__(kTokensPerBlock) dispatch_layout_kernel(const __grid_constant__ LayoutParams p) {
  extern __shared__ int smem[];
  int* s_rank = smem;                          // [num_ranks]
  int* s_rdma = s_rank + p.num_ranks;          // [num_rdma_ranks]
  int* s_expert = s_rdma + p.num_rdma_ranks;   // [num_experts]
  const int num_counts = p.num_ranks + p.num_rdma_ranks + p.num_experts;
  for (int i = threadIdx.x; i < num_counts; i += blockDim.x) smem[i] = 0;
  __syncthreads();

  const int token = blockIdx.x * kTokensPerBlock + threadIdx.x;
  if (token < p.num_tokens) count_token<Index>(p, token, s_rank, s_rdma, s_expert);
  __syncthreads();

  int* g_rank = p.workspace;
  int* g_rdma = g_rank + kMaxRanks;
  int* g_expert = g_rdma + kMaxRanks;
  int* ticket = g_expert + kMaxExperts;
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x)
    if (s_rank[i]) atomicAdd(&g_rank[i], s_rank[i]);
  for (int i = threadIdx.x; i < p.num_rdma_ranks; i += blockDim.x)
    if (s_rdma[i]) atomicAdd(&g_rdma[i], s_rdma[i]);
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    if (s_expert[i]) atomicAdd(&g_expert[i], s_expert[i]);

  // Last block out publishes the totals. The fence orders this block's adds before its ticket; the
  // last block's fence after the ticket orders its reads after every other block's adds.
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = (atomicAdd(ticket, 1) == static_cast<int>(gridDim.x) - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x) p.num_tokens_per_rank[i] = atomicExch(&g_rank[i], 0);
  for (int i = threadIdx.x; i < p.num_rdma_ranks; i += blockDim.x)
    p.num_tokens_per_rdma_rank[i] = atomicExch(&g_rdma[i], 0);
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x)
    p.num_tokens_per_expert[i] = atomicExch(&g_expert[i], 0);
  if (threadIdx.x == 0) *ticket = 0;
}

}  // namespace

void validate_layout_args(const LayoutArgs& a, int num_ranks, int num_nodes) {
  OPENEP_CHECK_ARG(num_ranks >= 1 && num_ranks <= kMaxRanks, "num_ranks must be in [1, ", kMaxRanks, "], got ",
                   num_ranks);
  OPENEP_CHECK_ARG(a.num_tokens >= 0, "num_tokens must be >= 0, got ", a.num_tokens);
  OPENEP_CHECK_ARG(a.num_topk >= 1 && a.num_topk <= kMaxTopk, "num_topk must be in [1, ", kMaxTopk, "], got ",
                   a.num_topk);
  OPENEP_CHECK_ARG(a.num_experts > 0 && a.num_experts <= kMaxExperts, "num_experts must be in [1, ", kMaxExperts,
                   "], got ", a.num_experts);
  OPENEP_CHECK_ARG(a.num_experts % num_ranks == 0, "num_experts (", a.num_experts,
                   ") must be a multiple of the number of ranks (", num_ranks, ")");
  OPENEP_CHECK_ARG(a.index_type == IndexType::kInt64 || a.index_type == IndexType::kInt32,
                   "topk_idx dtype must be int64 or int32");
  OPENEP_CHECK_ARG(a.num_tokens == 0 || a.topk_idx != nullptr, "topk_idx is null with num_tokens = ", a.num_tokens);
  OPENEP_CHECK_ARG(a.num_tokens_per_rank != nullptr, "num_tokens_per_rank output is null");
  OPENEP_CHECK_ARG(a.num_tokens_per_expert != nullptr, "num_tokens_per_expert output is null");
  OPENEP_CHECK_ARG(a.num_tokens == 0 || a.is_token_in_rank != nullptr, "is_token_in_rank output is null");
  if (num_nodes > 1) {
    OPENEP_CHECK_ARG(a.num_tokens_per_rdma_rank != nullptr, "num_tokens_per_rdma_rank output is required on an "
                     "internode Buffer (", num_nodes, " nodes)");
  } else {
    OPENEP_CHECK_ARG(a.num_tokens_per_rdma_rank == nullptr,
                     "num_tokens_per_rdma_rank must be null unless the Buffer is internode (one node here)");
  }
}

void launch_dispatch_layout(const LayoutArgs& a, int num_ranks, int num_nodes, int* workspace, const WaitContext& wait,
                            cudaStream_t stream) {
  LayoutParams p{};
  p.topk_idx = a.topk_idx;
  p.num_tokens = a.num_tokens;
  p.num_topk = a.num_topk;
  p.num_experts = a.num_experts;
  p.num_ranks = num_ranks;
  p.num_rdma_ranks = num_nodes > 1 ? num_nodes : 0;
  p.ranks_per_node = num_ranks / num_nodes;
  p.num_tokens_per_rank = a.num_tokens_per_rank;
  p.num_tokens_per_rdma_rank = a.num_tokens_per_rdma_rank;
  p.num_tokens_per_expert = a.num_tokens_per_expert;
  p.is_token_in_rank = a.is_token_in_rank;
  p.workspace = workspace;
  p.wait = wait;
  const int blocks = a.num_tokens == 0 ? 1 : (a.num_tokens + kTokensPerBlock - 1) / kTokensPerBlock;
  const size_t smem = sizeof(int) * (p.num_ranks + p.num_rdma_ranks + p.num_experts);
  if (a.index_type == IndexType::kInt64)
    dispatch_layout_kernel<int64_t><<<blocks, kTokensPerBlock, smem, stream>>>(p);
  else
    dispatch_layout_kernel<int32_t><<<blocks, kTokensPerBlock, smem, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void list_layout_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&dispatch_layout_kernel<int64_t>), "dispatch_layout_kernel<int64_t>"});
  out.push_back({reinterpret_cast<const void*>(&dispatch_layout_kernel<int32_t>), "dispatch_layout_kernel<int32_t>"});
}

}  // namespace openep::detail
