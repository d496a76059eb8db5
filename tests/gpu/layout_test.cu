// get_dispatch_layout on one GPU against the CPU reference, for any number of ranks (the kernel is local
// computation, so every EP size can be checked here), both index types, and adversarial routings.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/gpu_util.hpp"
#include "common/routing.hpp"
#include "kernels/launch.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"

namespace openep::test {
namespace {

enum class Routing { kUniform, kHotExpert, kEmptyRanks, kAllMinusOneRows, kMinusOneSlots };

struct LayoutCase {
  int num_tokens, num_topk, num_experts, num_ranks;
  Routing routing;
  IndexType index_type;
  int ranks_per_node = 0;  // nodes of this many ranks (internode Buffers); 0: 8 above 8 ranks, else one node
  int nodes() const { return num_ranks / (ranks_per_node > 0 ? ranks_per_node : (num_ranks > 8 ? 8 : num_ranks)); }
};

std::string case_name(const LayoutCase& c) {
  const char* routing[] = {"uniform", "hot", "empty_ranks", "all_minus_one_rows", "minus_one_slots"};
  return "tokens" + std::to_string(c.num_tokens) + "_topk" + std::to_string(c.num_topk) + "_experts" +
         std::to_string(c.num_experts) + "_ranks" + std::to_string(c.num_ranks) + "_" +
         routing[static_cast<int>(c.routing)] + (c.index_type == IndexType::kInt64 ? "_i64" : "_i32") + "_nodes" +
         std::to_string(c.nodes());
}

std::vector<int64_t> make_routing(const LayoutCase& c, uint64_t seed) {
  const int n = c.num_tokens, k = c.num_topk, e = c.num_experts, r = c.num_ranks;
  switch (c.routing) {
    case Routing::kUniform: return uniform_routing(n, k, e, seed);
    case Routing::kHotExpert: return hot_expert_routing(n, k, e, /*hot=*/e - 1, seed);
    case Routing::kEmptyRanks: return empty_ranks_routing(n, k, e, r, seed, {0, r - 1});
    case Routing::kAllMinusOneRows: return all_minus_one_rows(uniform_routing(n, k, e, seed), k, 3);
    case Routing::kMinusOneSlots: return with_minus_one(uniform_routing(n, k, e, seed), 0.3, seed + 1);
  }
  return {};
}

// Runs the kernel twice on fresh poisoned outputs (the second run checks the workspace was left clean).
void run_case(const LayoutCase& c, uint64_t seed) {
  SCOPED_TRACE(case_name(c));
  const std::vector<int64_t> topk = make_routing(c, seed);
  const ref::Layout expected =
      ref::get_dispatch_layout(topk, c.num_tokens, c.num_topk, c.num_experts, c.num_ranks, c.num_ranks / c.nodes());

  DeviceArray<int64_t> topk64(topk);
  std::vector<int32_t> topk32_host(topk.begin(), topk.end());
  DeviceArray<int32_t> topk32(topk32_host);
  const int num_rdma = c.nodes() > 1 ? c.nodes() : 0;
  DeviceArray<int> per_rank(c.num_ranks), per_rdma(num_rdma), per_expert(c.num_experts);
  DeviceArray<bool> in_rank(static_cast<size_t>(c.num_tokens) * c.num_ranks);
  DeviceArray<int> workspace(::openep::detail::layout_workspace_ints());
  TEST_CUDA_CHECK(cudaMemset(workspace.get(), 0, workspace.size() * sizeof(int)));
  ErrorSlot slot;

  for (int round = 0; round < 2; ++round) {
    per_rank.poison(), per_rdma.poison(), per_expert.poison(), in_rank.poison();
    LayoutArgs a;
    a.topk_idx = c.index_type == IndexType::kInt64 ? static_cast<const void*>(topk64.get()) : topk32.get();
    a.index_type = c.index_type;
    a.num_tokens = c.num_tokens;
    a.num_topk = c.num_topk;
    a.num_experts = c.num_experts;
    a.num_tokens_per_rank = per_rank.get();
    a.num_tokens_per_rdma_rank = num_rdma ? per_rdma.get() : nullptr;
    a.num_tokens_per_expert = per_expert.get();
    a.is_token_in_rank = in_rank.get();
    ::openep::detail::validate_layout_args(a, c.num_ranks, c.nodes());
    ::openep::detail::launch_dispatch_layout(a, c.num_ranks, c.nodes(), workspace.get(), slot.context(), nullptr);
    TEST_CUDA_CHECK(cudaDeviceSynchronize());
    ASSERT_EQ(slot.record().code, 0) << "kernel recorded an error";

    EXPECT_EQ(per_rank.download(), expected.num_tokens_per_rank) << "round " << round;
    EXPECT_EQ(per_expert.download(), expected.num_tokens_per_expert) << "round " << round;
    if (num_rdma) EXPECT_EQ(per_rdma.download(), expected.num_tokens_per_rdma_rank) << "round " << round;
    std::vector<uint8_t> mask(in_rank.size());
    if (!mask.empty())
      TEST_CUDA_CHECK(cudaMemcpy(mask.data(), in_rank.get(), mask.size(), cudaMemcpyDeviceToHost));
    ASSERT_EQ(mask.size(), expected.is_token_in_rank.size());
    for (size_t i = 0; i < mask.size(); ++i) {
      ASSERT_EQ(mask[i], expected.is_token_in_rank[i])
          << "is_token_in_rank[token " << i / c.num_ranks << "][rank " << i % c.num_ranks << "], round " << round;
    }
  }
  std::vector<int> ws = workspace.download();
  for (size_t i = 0; i < ws.size(); ++i) ASSERT_EQ(ws[i], 0) << "workspace not left clean at " << i;
}

TEST(DispatchLayoutGpu, MatchesReferenceAcrossShapesRoutingsAndIndexTypes) {
  const int token_counts[] = {0, 1, 127, 4096, 8192};
  const struct {
    int experts, ranks;
  } shapes[] = {{8, 2}, {256, 2}, {256, 4}, {512, 8}, {64, 8}, {288, 8}, {128, 16}, {512, 64}, {320, 160}};
  const int topks[] = {1, 4, 8, 9};
  const Routing routings[] = {Routing::kUniform, Routing::kHotExpert, Routing::kEmptyRanks,
                              Routing::kAllMinusOneRows, Routing::kMinusOneSlots};
  uint64_t seed = 1234;
  int cases = 0;
  for (int n : token_counts)
    for (auto s : shapes)
      for (int k : topks) {
        if (k > s.experts) continue;
        // Keep the matrix affordable: every routing for the middle sizes, uniform for the others.
        for (Routing r : routings) {
          if ((n == 8192 || s.ranks >= 64) && r != Routing::kUniform && r != Routing::kMinusOneSlots) continue;
          const IndexType it = (cases % 2) ? IndexType::kInt32 : IndexType::kInt64;
          if (r == Routing::kEmptyRanks && s.experts / s.ranks * (s.ranks - 2) < k) continue;
          run_case({n, k, s.experts, s.ranks, r, it}, seed++);
          ++cases;
          if (HasFatalFailure()) return;
        }
      }
  EXPECT_GT(cases, 300);
}

// Nodes of 1, 2 and 4 ranks (internode Buffers: num_tokens_per_rdma_rank per node of the Buffer's NVLink team).
TEST(DispatchLayoutGpu, CountsPerNodeForAnyRanksPerNode) {
  uint64_t seed = 77;
  for (int M : {1, 2, 4})
    for (int R : {4, 8, 16})
      for (Routing r : {Routing::kUniform, Routing::kEmptyRanks, Routing::kMinusOneSlots}) {
        run_case({513, 8, 16 * R, R, r, (seed % 2) ? IndexType::kInt32 : IndexType::kInt64, M}, seed++);
        if (HasFatalFailure()) return;
      }
}

TEST(DispatchLayoutGpu, BothIndexTypesAtDeepSeekShape) {
  run_case({4096, 8, 256, 2, Routing::kUniform, IndexType::kInt64}, 7);
  run_case({4096, 8, 256, 2, Routing::kUniform, IndexType::kInt32}, 7);
  run_case({4096, 8, 256, 8, Routing::kMinusOneSlots, IndexType::kInt32}, 8);
}

TEST(DispatchLayoutGpu, ReportsExpertIndexOutOfRange) {
  std::vector<int64_t> topk = uniform_routing(100, 4, 16, 3);
  topk[57 * 4 + 2] = 16;  // == num_experts: out of range
  DeviceArray<int64_t> d_topk(topk);
  DeviceArray<int> per_rank(2), per_expert(16), workspace(::openep::detail::layout_workspace_ints());
  DeviceArray<bool> in_rank(200);
  TEST_CUDA_CHECK(cudaMemset(workspace.get(), 0, workspace.size() * sizeof(int)));
  ErrorSlot slot;
  LayoutArgs a;
  a.topk_idx = d_topk.get();
  a.num_tokens = 100;
  a.num_topk = 4;
  a.num_experts = 16;
  a.num_tokens_per_rank = per_rank.get();
  a.num_tokens_per_expert = per_expert.get();
  a.is_token_in_rank = in_rank.get();
  ::openep::detail::launch_dispatch_layout(a, 2, 1, workspace.get(), slot.context(), nullptr);
  TEST_CUDA_CHECK(cudaDeviceSynchronize());
  const ::openep::detail::DeviceError rec = slot.record();
  EXPECT_EQ(rec.code, static_cast<int32_t>(::openep::detail::DeviceErrorCode::kBadExpertIndex));
  EXPECT_EQ(rec.expected, 57);
  EXPECT_EQ(rec.observed, 16);
}

}  // namespace
}  // namespace openep::test
