// The CPU reference (layout, normal dispatch/combine, low-latency dispatch/combine) on tiny cases
// whose expected results are written out by hand, plus the shared test helpers in tests/common.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <common/compare.hpp>
#include <common/routing.hpp>
#include <cstdint>
#include <functional>
#include <openep/reference.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace openep::ref;
using openep::test::all_minus_one_rows;
using openep::test::first_mismatches;
using openep::test::random_bf16;
using openep::test::random_weights;
using openep::test::uniform_routing;
using openep::test::with_minus_one;

std::string invalid_argument_message(const std::function<void()>& call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no std::invalid_argument thrown>";
}

#define EXPECT_MESSAGE_HAS(message, text) EXPECT_NE((message).find(text), std::string::npos) << (message)

int64_t range(int64_t start, int64_t count) { return (start << 32) | count; }

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

TEST(ReferenceLayout, CountsTokenOncePerRankWhenTwoExpertsShareRank) {
  // R = 2, E = 4 (rank 0: experts 0,1; rank 1: experts 2,3), K = 2.
  const std::vector<int64_t> topk = {
      0,  1,   // t0 -> rank 0 only (two experts there)
      1,  3,   // t1 -> ranks 0 and 1
      -1, 2,   // t2 -> rank 1
      -1, -1,  // t3 -> nowhere
  };
  const Layout layout = get_dispatch_layout(topk, 4, 2, 4, 2);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{2, 2}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{1, 2, 1, 1}));
  EXPECT_EQ(layout.is_token_in_rank, (std::vector<uint8_t>{1, 0, 1, 1, 0, 1, 0, 0}));
  EXPECT_TRUE(layout.num_tokens_per_rdma_rank.empty());
}

TEST(ReferenceLayout, CountsDuplicateExpertTwicePerExpertButOncePerRank) {
  const std::vector<int64_t> topk = {2, 2, 3, -1};  // R = 2, E = 4, K = 2: t0 lists expert 2 twice
  const Layout layout = get_dispatch_layout(topk, 2, 2, 4, 2);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{0, 2}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{0, 0, 2, 1}));
  EXPECT_EQ(layout.is_token_in_rank, (std::vector<uint8_t>{0, 1, 0, 1}));
}

TEST(ReferenceLayout, CountsNodesOnceWhenMoreThanEightRanks) {
  // R = 16 (two nodes of 8), E = 16 (one expert per rank), K = 3.
  const std::vector<int64_t> topk = {
      0, 9,  15,  // ranks 0, 9, 15 -> nodes 0 and 1
      3, 5,  -1,  // ranks 3, 5     -> node 0
      8, 12, 8,   // ranks 8, 12    -> node 1 (expert 8 twice)
  };
  const Layout layout = get_dispatch_layout(topk, 3, 3, 16, 16);
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, (std::vector<int>{2, 2}));
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{1, 0, 0, 1, 0, 1, 0, 0, 2, 1, 0, 0, 1, 0, 0, 1}));
  EXPECT_EQ(layout.is_token_in_rank[0 * 16 + 9], 1);
  EXPECT_EQ(layout.is_token_in_rank[2 * 16 + 8], 1);
  EXPECT_EQ(layout.is_token_in_rank[2 * 16 + 9], 0);
}

TEST(ReferenceLayout, HasNoRdmaCountsForEightRanks) {
  const std::vector<int64_t> topk = {0, 7};
  const Layout layout = get_dispatch_layout(topk, 2, 1, 8, 8);
  EXPECT_TRUE(layout.num_tokens_per_rdma_rank.empty());
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{1, 0, 0, 0, 0, 0, 0, 1}));
}

TEST(ReferenceLayout, RejectsExpertsNotDivisibleByRanks) {
  const std::string message = invalid_argument_message([] { get_dispatch_layout({0}, 1, 1, 6, 4); });
  EXPECT_MESSAGE_HAS(message, "get_dispatch_layout");
  EXPECT_MESSAGE_HAS(message, "num_experts");
  EXPECT_MESSAGE_HAS(message, "(4)");
  EXPECT_MESSAGE_HAS(message, "got 6");
}

TEST(ReferenceLayout, RejectsExpertIdOutOfRange) {
  const std::string message = invalid_argument_message([] { get_dispatch_layout({0, 1, 8, 2}, 2, 2, 8, 2); });
  EXPECT_MESSAGE_HAS(message, "topk_idx[1][0]");
  EXPECT_MESSAGE_HAS(message, "[-1, 8)");
  EXPECT_MESSAGE_HAS(message, "got 8");
  const std::string negative = invalid_argument_message([] { get_dispatch_layout({-2}, 1, 1, 8, 2); });
  EXPECT_MESSAGE_HAS(negative, "got -2");
}

TEST(ReferenceLayout, RejectsRoutingOfWrongSizeAndRanksNotMultipleOfEight) {
  std::string message = invalid_argument_message([] { get_dispatch_layout({0, 1, 2}, 2, 2, 8, 2); });
  EXPECT_MESSAGE_HAS(message, "topk_idx.size() expected 4, got 3");
  message = invalid_argument_message([] { get_dispatch_layout({0}, 1, 1, 12, 12); });
  EXPECT_MESSAGE_HAS(message, "num_ranks");
  EXPECT_MESSAGE_HAS(message, "got 12");
}

// Layout with an explicit node size (internode normal mode): nodes of ranks_per_node consecutive ranks.

TEST(ReferenceLayoutNodes, CountsTokenOncePerNodeWithTwoRanksPerNode) {
  // R = 4, M = 2 (node 0: ranks 0, 1; node 1: ranks 2, 3), E = 4 (one expert per rank), K = 2.
  const std::vector<int64_t> topk = {
      0,  1,   // t0 -> ranks 0, 1 -> node 0 (once, though two of its ranks)
      1,  2,   // t1 -> ranks 1, 2 -> nodes 0 and 1
      3,  -1,  // t2 -> rank 3     -> node 1
      -1, -1,  // t3 -> nowhere
      2,  3,   // t4 -> ranks 2, 3 -> node 1 (once)
  };
  const Layout layout = get_dispatch_layout(topk, 5, 2, 4, 4, 2);
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, (std::vector<int>{2, 3}));
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{1, 2, 2, 2}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{1, 2, 2, 2}));
  EXPECT_EQ(layout.is_token_in_rank,
            (std::vector<uint8_t>{1, 1, 0, 0, /**/ 0, 1, 1, 0, /**/ 0, 0, 0, 1, /**/ 0, 0, 0, 0, /**/ 0, 0, 1, 1}));
  // Every field but the per-node counts matches the 5-argument overload (R = 4 is one node there).
  const Layout flat = get_dispatch_layout(topk, 5, 2, 4, 4);
  EXPECT_TRUE(flat.num_tokens_per_rdma_rank.empty());
  EXPECT_EQ(layout.num_tokens_per_rank, flat.num_tokens_per_rank);
  EXPECT_EQ(layout.num_tokens_per_expert, flat.num_tokens_per_expert);
  EXPECT_EQ(layout.is_token_in_rank, flat.is_token_in_rank);
}

TEST(ReferenceLayoutNodes, HasNoRdmaCountsForASingleNode) {
  const std::vector<int64_t> topk = {0, 1, 1, 2, 3, -1};  // R = 4, E = 4, K = 2
  const Layout layout = get_dispatch_layout(topk, 3, 2, 4, 4, 4);  // M = R: one node
  EXPECT_TRUE(layout.num_tokens_per_rdma_rank.empty());
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{1, 2, 1, 1}));
  const Layout single = get_dispatch_layout({0, -1}, 2, 1, 2, 1, 1);  // R = M = 1
  EXPECT_TRUE(single.num_tokens_per_rdma_rank.empty());
  EXPECT_EQ(single.num_tokens_per_rank, (std::vector<int>{1}));
}

TEST(ReferenceLayoutNodes, OneRankPerNodeCountsEqualPerRankCounts) {
  // R = 4, M = 1: four nodes of one rank, so each node count is that rank's count.
  const std::vector<int64_t> topk = {0, 1, 1, 2, 3, -1, 3, 3};
  const Layout layout = get_dispatch_layout(topk, 4, 2, 4, 4, 1);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{1, 2, 1, 2}));
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, layout.num_tokens_per_rank);
}

TEST(ReferenceLayoutNodes, AcceptsNodeCountsThatTheEightRankRuleRejects) {
  // R = 12 in 3 nodes of 4 (the 5-argument overload requires R % 8 == 0 above 8 ranks).
  const std::vector<int64_t> topk = {0, 11, 4, 5, 8, -1};  // E = 12, K = 2
  const Layout layout = get_dispatch_layout(topk, 3, 2, 12, 12, 4);
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, (std::vector<int>{1, 1, 2}));
  EXPECT_NE(invalid_argument_message([&] { get_dispatch_layout(topk, 3, 2, 12, 12); }),
            "<no std::invalid_argument thrown>");
}

TEST(ReferenceLayoutNodes, GroupLimitedRoutingOverFourNodes) {
  // R = 8, M = 2 (node m: ranks 2m, 2m + 1), E = 16 (2 experts per rank, so node m holds experts
  // 4m .. 4m + 3), K = 4, every token routed to at most 2 nodes (DeepSeek-style group-limited routing).
  const std::vector<int64_t> topk = {
      0,  1,  4,  5,   // ranks 0, 0, 2, 2 -> nodes 0, 1
      8,  12, 13, 9,   // ranks 4, 6, 6, 4 -> nodes 2, 3
      2,  3,  6,  7,   // ranks 1, 1, 3, 3 -> nodes 0, 1
      15, 14, -1, -1,  // rank 7           -> node 3
      0,  2,  10, 11,  // ranks 0, 1, 5, 5 -> nodes 0, 2 (two ranks of node 0, counted once)
  };
  const Layout layout = get_dispatch_layout(topk, 5, 4, 16, 8, 2);
  EXPECT_EQ(layout.num_tokens_per_rdma_rank, (std::vector<int>{3, 2, 2, 2}));
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{2, 2, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}));
  for (int t = 0; t < 5; ++t) {
    int nodes = 0;
    for (int m = 0; m < 4; ++m) {
      nodes += (layout.is_token_in_rank[t * 8 + 2 * m] | layout.is_token_in_rank[t * 8 + 2 * m + 1]) ? 1 : 0;
    }
    EXPECT_LE(nodes, 2) << "token " << t;
  }
}

TEST(ReferenceLayoutNodes, NodeCountsMatchIsTokenInRankOnRandomRouting) {
  // Per-node counts are the number of tokens with at least one rank of the node set in
  // is_token_in_rank, for every node size; the other fields never depend on the node size.
  for (int num_ranks : {1, 2, 4, 8, 16}) {
    const int num_experts = 4 * num_ranks, num_tokens = 64, num_topk = std::min(6, num_experts);
    const std::vector<int64_t> topk =
        with_minus_one(uniform_routing(num_tokens, num_topk, num_experts, 11 + num_ranks), 0.2, 5);
    const Layout flat = get_dispatch_layout(topk, num_tokens, num_topk, num_experts, num_ranks);
    for (int m : {1, 2, 4, 8}) {
      if (m > num_ranks || num_ranks % m != 0) continue;
      const Layout layout = get_dispatch_layout(topk, num_tokens, num_topk, num_experts, num_ranks, m);
      const int num_nodes = num_ranks / m;
      std::vector<int> want(num_nodes > 1 ? num_nodes : 0, 0);
      for (int t = 0; t < num_tokens && num_nodes > 1; ++t) {
        for (int n = 0; n < num_nodes; ++n) {
          bool in_node = false;
          for (int r = n * m; r < (n + 1) * m; ++r) in_node = in_node || layout.is_token_in_rank[t * num_ranks + r];
          want[n] += in_node ? 1 : 0;
        }
      }
      EXPECT_EQ(layout.num_tokens_per_rdma_rank, want) << "R " << num_ranks << " M " << m;
      EXPECT_EQ(layout.num_tokens_per_rank, flat.num_tokens_per_rank) << "R " << num_ranks << " M " << m;
      EXPECT_EQ(layout.num_tokens_per_expert, flat.num_tokens_per_expert) << "R " << num_ranks << " M " << m;
      EXPECT_EQ(layout.is_token_in_rank, flat.is_token_in_rank) << "R " << num_ranks << " M " << m;
      // The 5-argument overload is this one with M = min(R, 8).
      if (m == std::min(num_ranks, 8)) {
        EXPECT_EQ(layout.num_tokens_per_rdma_rank, flat.num_tokens_per_rdma_rank) << "R " << num_ranks;
      }
    }
  }
}

TEST(ReferenceLayoutNodes, RejectsBadRanksPerNode) {
  std::string message = invalid_argument_message([] { get_dispatch_layout({0}, 1, 1, 4, 4, 0); });
  EXPECT_MESSAGE_HAS(message, "openep::ref::get_dispatch_layout");
  EXPECT_MESSAGE_HAS(message, "ranks_per_node expected in [1, 8], got 0");
  message = invalid_argument_message([] { get_dispatch_layout({0}, 1, 1, 16, 16, 16); });
  EXPECT_MESSAGE_HAS(message, "ranks_per_node expected in [1, 8], got 16");
  message = invalid_argument_message([] { get_dispatch_layout({0}, 1, 1, 6, 6, 4); });
  EXPECT_MESSAGE_HAS(message, "num_ranks expected a multiple of ranks_per_node (4), got 6");
  message = invalid_argument_message([] { get_dispatch_layout({0}, 1, 1, 4, 4, -2); });
  EXPECT_MESSAGE_HAS(message, "got -2");
  // The shared checks still run first, with the same messages as the 5-argument overload.
  message = invalid_argument_message([] { get_dispatch_layout({0, 1, 2}, 2, 2, 8, 4, 2); });
  EXPECT_MESSAGE_HAS(message, "topk_idx.size() expected 4, got 3");
}

// ---------------------------------------------------------------------------------------------
// Normal dispatch
// ---------------------------------------------------------------------------------------------

// R = 3, E = 6 (rank 0: experts 0,1; rank 1: 2,3; rank 2: 4,5), K = 2, hidden = 2 BF16 = 4 bytes.
// Row bytes of (source rank s, token t) = {s, t, 0xA0 + s, 0xB0 + t}.
//   rank 0: t0 {0, 3} w {0.5, 0.25}   -> ranks 0, 1
//           t1 {5,-1} w {0.75, 0.1}   -> rank 2
//           t2 {1, 0} w {0.6, 0.4}    -> rank 0 (twice there, sent once)
//   rank 1: t0 {2, 4} w {0.3, 0.7}    -> ranks 1, 2
//           t1 {-1,-1}                 -> nowhere
//   rank 2: t0 {4, 5} w {0.2, 0.8}    -> rank 2
//           t1 {0, 2} w {0.9, 0.1}    -> ranks 0, 1
//           t2 {3, 1} w {0.5, 0.5}    -> ranks 1, 0
std::vector<uint8_t> tagged_row(int s, int t) {
  return {static_cast<uint8_t>(s), static_cast<uint8_t>(t), static_cast<uint8_t>(0xA0 + s),
          static_cast<uint8_t>(0xB0 + t)};
}

RankInput tagged_input(int s, std::vector<int64_t> topk, std::vector<float> weights) {
  RankInput in;
  in.num_tokens = static_cast<int>(topk.size() / 2);
  for (int t = 0; t < in.num_tokens; ++t) {
    const std::vector<uint8_t> row = tagged_row(s, t);
    in.x.insert(in.x.end(), row.begin(), row.end());
  }
  in.topk_idx = std::move(topk);
  in.topk_weights = std::move(weights);
  return in;
}

NormalConfig three_rank_config() {
  NormalConfig cfg;
  cfg.num_ranks = 3;
  cfg.num_experts = 6;
  cfg.hidden = 2;
  cfg.num_topk = 2;
  return cfg;
}

std::vector<RankInput> three_rank_inputs() {
  return {
      tagged_input(0, {0, 3, 5, -1, 1, 0}, {0.5f, 0.25f, 0.75f, 0.1f, 0.6f, 0.4f}),
      tagged_input(1, {2, 4, -1, -1}, {0.3f, 0.7f, 0.9f, 0.9f}),
      tagged_input(2, {4, 5, 0, 2, 3, 1}, {0.2f, 0.8f, 0.9f, 0.1f, 0.5f, 0.5f}),
  };
}

std::vector<uint8_t> concat_rows(const std::vector<std::pair<int, int>>& rows) {
  std::vector<uint8_t> bytes;
  for (const auto& [s, t] : rows) {
    const std::vector<uint8_t> row = tagged_row(s, t);
    bytes.insert(bytes.end(), row.begin(), row.end());
  }
  return bytes;
}

TEST(ReferenceDispatch, OrdersRowsBySourceRankThenSourceToken) {
  const std::vector<RankRecv> recv = dispatch(three_rank_inputs(), three_rank_config());
  ASSERT_EQ(recv.size(), 3u);

  EXPECT_EQ(recv[0].num_recv_tokens, 4);
  EXPECT_EQ(recv[0].src_rank, (std::vector<int>{0, 0, 2, 2}));
  EXPECT_EQ(recv[0].src_idx, (std::vector<int>{0, 2, 1, 2}));
  EXPECT_EQ(recv[0].num_recv_from_rank, (std::vector<int>{2, 0, 2}));
  EXPECT_EQ(recv[0].rank_prefix, (std::vector<int>{2, 2, 4}));
  EXPECT_EQ(first_mismatches(recv[0].x, concat_rows({{0, 0}, {0, 2}, {2, 1}, {2, 2}}), 4, "rank 0 x"), "");

  EXPECT_EQ(recv[1].num_recv_tokens, 4);
  EXPECT_EQ(recv[1].src_rank, (std::vector<int>{0, 1, 2, 2}));
  EXPECT_EQ(recv[1].src_idx, (std::vector<int>{0, 0, 1, 2}));
  EXPECT_EQ(recv[1].num_recv_from_rank, (std::vector<int>{1, 1, 2}));
  EXPECT_EQ(recv[1].rank_prefix, (std::vector<int>{1, 2, 4}));
  EXPECT_EQ(first_mismatches(recv[1].x, concat_rows({{0, 0}, {1, 0}, {2, 1}, {2, 2}}), 4, "rank 1 x"), "");

  EXPECT_EQ(recv[2].num_recv_tokens, 3);
  EXPECT_EQ(recv[2].src_rank, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(recv[2].src_idx, (std::vector<int>{1, 0, 0}));
  EXPECT_EQ(recv[2].num_recv_from_rank, (std::vector<int>{1, 1, 1}));
  EXPECT_EQ(recv[2].rank_prefix, (std::vector<int>{1, 2, 3}));
  EXPECT_EQ(first_mismatches(recv[2].x, concat_rows({{0, 1}, {1, 0}, {2, 0}}), 4, "rank 2 x"), "");

  for (const RankRecv& r : recv) EXPECT_TRUE(r.x_scales.empty());
}

TEST(ReferenceDispatch, LocalisesTopkAndZeroesForeignWeights) {
  const std::vector<RankRecv> recv = dispatch(three_rank_inputs(), three_rank_config());
  // Rank 0 owns experts 0, 1. Rows (0,0) (0,2) (2,1) (2,2).
  EXPECT_EQ(recv[0].topk_idx, (std::vector<int64_t>{0, -1, 1, 0, 0, -1, -1, 1}));
  EXPECT_EQ(recv[0].topk_weights, (std::vector<float>{0.5f, 0.0f, 0.6f, 0.4f, 0.9f, 0.0f, 0.0f, 0.5f}));
  // Rank 1 owns experts 2, 3. Rows (0,0) (1,0) (2,1) (2,2).
  EXPECT_EQ(recv[1].topk_idx, (std::vector<int64_t>{-1, 1, 0, -1, -1, 0, 1, -1}));
  EXPECT_EQ(recv[1].topk_weights, (std::vector<float>{0.0f, 0.25f, 0.3f, 0.0f, 0.0f, 0.1f, 0.5f, 0.0f}));
  // Rank 2 owns experts 4, 5. Rows (0,1) (1,0) (2,0).
  EXPECT_EQ(recv[2].topk_idx, (std::vector<int64_t>{1, -1, -1, 0, 0, 1}));
  EXPECT_EQ(recv[2].topk_weights, (std::vector<float>{0.75f, 0.0f, 0.0f, 0.7f, 0.2f, 0.8f}));
}

TEST(ReferenceDispatch, CountsRowsPerLocalExpert) {
  const std::vector<RankRecv> recv = dispatch(three_rank_inputs(), three_rank_config());
  EXPECT_EQ(recv[0].num_recv_tokens_per_expert, (std::vector<int>{3, 2}));
  EXPECT_EQ(recv[1].num_recv_tokens_per_expert, (std::vector<int>{2, 2}));
  EXPECT_EQ(recv[2].num_recv_tokens_per_expert, (std::vector<int>{2, 2}));
}

TEST(ReferenceDispatch, RecordsSendPositionOfEveryTokenPerDestination) {
  const std::vector<RankRecv> recv = dispatch(three_rank_inputs(), three_rank_config());
  EXPECT_EQ(recv[0].send_pos, (std::vector<int>{0, 0, -1, /**/ -1, -1, 0, /**/ 1, -1, -1}));
  EXPECT_EQ(recv[1].send_pos, (std::vector<int>{-1, 1, 1, /**/ -1, -1, -1}));
  EXPECT_EQ(recv[2].send_pos, (std::vector<int>{-1, -1, 2, /**/ 2, 2, -1, /**/ 3, 3, -1}));
}

TEST(ReferenceDispatch, RoundsPerExpertCountsUpToAlignmentOnly) {
  // R = 1, E = 3, K = 2: expert 0 gets 0 rows, expert 1 gets 1, expert 2 gets 5.
  NormalConfig cfg;
  cfg.num_ranks = 1;
  cfg.num_experts = 3;
  cfg.hidden = 1;
  cfg.elem_bytes = 1;
  cfg.num_topk = 2;
  cfg.expert_alignment = 4;
  RankInput in;
  in.num_tokens = 5;
  in.x = {10, 11, 12, 13, 14};
  in.topk_idx = {1, 2, 2, -1, 2, -1, 2, -1, 2, -1};
  in.topk_weights.assign(10, 1.0f);
  const std::vector<RankRecv> recv = dispatch({in}, cfg);
  EXPECT_EQ(recv[0].num_recv_tokens_per_expert, (std::vector<int>{0, 4, 8}));
  EXPECT_EQ(recv[0].num_recv_tokens, 5);  // rows are not padded
  EXPECT_EQ(recv[0].x, (std::vector<uint8_t>{10, 11, 12, 13, 14}));
}

TEST(ReferenceDispatch, CopiesFp8BytesAndScalesVerbatimWithoutTopk) {
  // R = 2, E = 2, K = 1, FP8 rows of 2 bytes with 2 scale words, no top-k returned.
  NormalConfig cfg;
  cfg.num_ranks = 2;
  cfg.num_experts = 2;
  cfg.hidden = 2;
  cfg.elem_bytes = 1;
  cfg.num_scales = 2;
  cfg.num_topk = 1;
  cfg.with_topk = false;
  RankInput r0;
  r0.num_tokens = 2;
  r0.x = {0x11, 0x12, 0x21, 0x22};
  r0.x_scales = {0x3F800000u, 0x7F7F7F7Fu, 0x40000000u, 0x01020304u};
  r0.topk_idx = {1, 0};  // t0 -> rank 1, t1 -> rank 0; no weights needed without top-k
  RankInput r1;
  r1.num_tokens = 1;
  r1.x = {0x31, 0x32};
  r1.x_scales = {0xAAAAAAAAu, 0xBBBBBBBBu};
  r1.topk_idx = {1};
  const std::vector<RankRecv> recv = dispatch({r0, r1}, cfg);

  EXPECT_EQ(recv[0].x, (std::vector<uint8_t>{0x21, 0x22}));
  EXPECT_EQ(recv[0].x_scales, (std::vector<uint32_t>{0x40000000u, 0x01020304u}));
  EXPECT_EQ(recv[1].x, (std::vector<uint8_t>{0x11, 0x12, 0x31, 0x32}));
  EXPECT_EQ(recv[1].x_scales, (std::vector<uint32_t>{0x3F800000u, 0x7F7F7F7Fu, 0xAAAAAAAAu, 0xBBBBBBBBu}));
  EXPECT_EQ(recv[1].src_rank, (std::vector<int>{0, 1}));
  for (const RankRecv& r : recv) {
    EXPECT_TRUE(r.topk_idx.empty());
    EXPECT_TRUE(r.topk_weights.empty());
  }
  EXPECT_EQ(recv[0].num_recv_tokens_per_expert, (std::vector<int>{1}));  // still counted from the routing
  EXPECT_EQ(recv[1].num_recv_tokens_per_expert, (std::vector<int>{2}));
}

TEST(ReferenceDispatch, RejectsMalformedInputsNamingTheArgument) {
  const NormalConfig cfg = three_rank_config();
  std::vector<RankInput> inputs = three_rank_inputs();

  std::string message = invalid_argument_message([&] { dispatch({inputs[0], inputs[1]}, cfg); });
  EXPECT_MESSAGE_HAS(message, "openep::ref::dispatch");
  EXPECT_MESSAGE_HAS(message, "inputs.size()");
  EXPECT_MESSAGE_HAS(message, "expected 3, got 2");

  inputs[1].x.pop_back();
  message = invalid_argument_message([&] { dispatch(inputs, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[1].x.size() expected 8, got 7");

  inputs = three_rank_inputs();
  inputs[2].topk_idx[3] = 6;
  message = invalid_argument_message([&] { dispatch(inputs, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[2].topk_idx[1][1] expected in [-1, 6), got 6");

  inputs = three_rank_inputs();
  inputs[0].topk_weights.resize(5);
  message = invalid_argument_message([&] { dispatch(inputs, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[0].topk_weights.size() expected 6, got 5");

  NormalConfig scaled = cfg;
  scaled.num_scales = 1;  // scales need 1-byte elements
  message = invalid_argument_message([&] { dispatch(three_rank_inputs(), scaled); });
  EXPECT_MESSAGE_HAS(message, "cfg.elem_bytes");

  NormalConfig aligned = cfg;
  aligned.expert_alignment = 0;
  message = invalid_argument_message([&] { dispatch(three_rank_inputs(), aligned); });
  EXPECT_MESSAGE_HAS(message, "cfg.expert_alignment expected >= 1, got 0");
}

// ---------------------------------------------------------------------------------------------
// Normal combine
// ---------------------------------------------------------------------------------------------

// R = 3, E = 3 (one expert per rank), K = 3, hidden = 2 BF16.
//   rank 0: t0 {0, 1, 2} -> ranks 0, 1, 2;  t1 {-1,-1,-1} -> nowhere;  t2 {2,-1,-1} -> rank 2
//   rank 1: t0 {1, 1,-1} -> rank 1 (duplicate expert)
//   rank 2: no tokens
// Receive order: rank 0: (0,0); rank 1: (0,0), (1,0); rank 2: (0,0), (0,2).
NormalConfig combine_config() {
  NormalConfig cfg;
  cfg.num_ranks = 3;
  cfg.num_experts = 3;
  cfg.hidden = 2;
  cfg.num_topk = 3;
  return cfg;
}

std::vector<RankInput> combine_inputs() {
  std::vector<RankInput> in(3);
  in[0].num_tokens = 3;
  in[0].x.assign(3 * 4, 0);
  in[0].topk_idx = {0, 1, 2, -1, -1, -1, 2, -1, -1};
  in[0].topk_weights = {0.5f, 0.25f, 0.125f, 0.9f, 0.9f, 0.9f, 0.7f, 0.2f, 0.1f};
  in[1].num_tokens = 1;
  in[1].x.assign(4, 0);
  in[1].topk_idx = {1, 1, -1};
  in[1].topk_weights = {0.25f, 0.5f, 0.3f};
  return in;
}

// Expert outputs per receiving rank, in receive order. BF16: 0x3080 = 2^-30, 0x3F80 = 1, 0x4000 = 2,
// 0x4040 = 3, 0xBFC0 = -1.5, 0xBF80 = -1, 0x4080 = 4, 0x3E80 = 0.25.
std::vector<CombineInput> combine_expert_outputs(const std::vector<RankRecv>& recv) {
  std::vector<CombineInput> out(3);
  out[0].x = {0x3080, 0x3F80};                  // (0,0)
  out[1].x = {0x3F80, 0x4000, 0x4040, 0xBFC0};  // (0,0), (1,0)
  out[2].x = {0xBF80, 0x4080, 0x3F80, 0x3E80};  // (0,0), (0,2)
  for (int d = 0; d < 3; ++d) out[d].topk_weights = recv[d].topk_weights;
  return out;
}

TEST(ReferenceCombine, SumsReturnedRowsInAscendingRankOrder) {
  const NormalConfig cfg = combine_config();
  const std::vector<RankInput> in = combine_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  ASSERT_EQ(recv[1].num_recv_tokens, 2);
  ASSERT_EQ(recv[2].num_recv_tokens, 2);
  EXPECT_EQ(recv[1].num_recv_tokens_per_expert, (std::vector<int>{3}));  // duplicate slot counts twice

  const std::vector<CombineOutput> out = combine(combine_expert_outputs(recv), recv, in, cfg);
  // rank 0 t0, column 0: ((0 + 2^-30) + 1) + (-1) = 0 in float32 (1 + 2^-30 rounds to 1);
  //   descending order would give 2^-30. Column 1: 1 + 2 + 4 = 7 (0x40E0).
  // rank 0 t1: sent nowhere -> 0. rank 0 t2: only rank 2's row.
  EXPECT_EQ(out[0].x, (std::vector<uint16_t>{0x0000, 0x40E0, 0x0000, 0x0000, 0x3F80, 0x3E80}));
  EXPECT_EQ(out[1].x, (std::vector<uint16_t>{0x4040, 0xBFC0}));
  EXPECT_TRUE(out[2].x.empty());
}

TEST(ReferenceCombine, AddsBias0ThenBias1AfterTheRows) {
  const NormalConfig cfg = combine_config();
  const std::vector<RankInput> in = combine_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  const std::vector<std::vector<uint16_t>> bias0 = {
      {0x0000, 0x0000, 0x3FC0, 0x0000, 0xBF80, 0x0000},  // rank 0: t1 {1.5, 0}, t2 {-1, 0}
      {0x3F80, 0x3F80},                                  // rank 1: t0 {1, 1}
      {},                                                // rank 2: no tokens
  };
  const std::vector<std::vector<uint16_t>> bias1 = {
      {0x0000, 0x0000, 0x3E80, 0xC000, 0x3080, 0x0000},  // rank 0: t1 {0.25, -2}, t2 {2^-30, 0}
      {0x0000, 0x0000},
      {},
  };
  const std::vector<CombineOutput> out = combine(combine_expert_outputs(recv), recv, in, cfg, bias0, bias1);
  // rank 0 t1 (sent nowhere): bias only: {1.5 + 0.25, -2} = {0x3FE0, 0xC000}.
  // rank 0 t2, column 0: ((0 + 1) + -1) + 2^-30 = 2^-30 (0x3080). Adding bias1 before bias0, or the
  //   biases before the row, would give 0.
  EXPECT_EQ(out[0].x, (std::vector<uint16_t>{0x0000, 0x40E0, 0x3FE0, 0xC000, 0x3080, 0x3E80}));
  EXPECT_EQ(out[1].x, (std::vector<uint16_t>{0x4080, 0xBF00}));  // {3 + 1, -1.5 + 1}
}

TEST(ReferenceCombine, SumsReturnedWeightsBackToOriginalWeights) {
  const NormalConfig cfg = combine_config();
  const std::vector<RankInput> in = combine_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  const std::vector<CombineOutput> out = combine(combine_expert_outputs(recv), recv, in, cfg);
  // Token sent nowhere gets zero weights, not its original 0.9s; -1 slots come back as 0.
  EXPECT_EQ(out[0].topk_weights, (std::vector<float>{0.5f, 0.25f, 0.125f, 0.0f, 0.0f, 0.0f, 0.7f, 0.0f, 0.0f}));
  EXPECT_EQ(out[1].topk_weights, (std::vector<float>{0.25f, 0.5f, 0.0f}));
  EXPECT_TRUE(out[2].topk_weights.empty());
}

TEST(ReferenceCombine, ReturnsNoWeightsWithoutTopk) {
  NormalConfig cfg = combine_config();
  cfg.with_topk = false;
  const std::vector<RankInput> in = combine_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  std::vector<CombineInput> expert = combine_expert_outputs(recv);  // weights empty: recv has none
  const std::vector<CombineOutput> out = combine(expert, recv, in, cfg);
  EXPECT_TRUE(out[0].topk_weights.empty());
  EXPECT_EQ(out[1].x, (std::vector<uint16_t>{0x4040, 0xBFC0}));
}

TEST(ReferenceCombine, RejectsMalformedInputsNamingTheArgument) {
  const NormalConfig cfg = combine_config();
  const std::vector<RankInput> in = combine_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  std::vector<CombineInput> expert = combine_expert_outputs(recv);

  expert[1].x.resize(3);
  std::string message = invalid_argument_message([&] { combine(expert, recv, in, cfg); });
  EXPECT_MESSAGE_HAS(message, "openep::ref::combine");
  EXPECT_MESSAGE_HAS(message, "inputs[1].x.size() expected 4, got 3");

  expert = combine_expert_outputs(recv);
  const std::vector<std::vector<uint16_t>> bias = {{0, 0, 0, 0, 0, 0}, {0}, {}};
  message = invalid_argument_message([&] { combine(expert, recv, in, cfg, {}, bias); });
  EXPECT_MESSAGE_HAS(message, "bias1[1].size() expected 2, got 1");

  expert[2].topk_weights.clear();
  message = invalid_argument_message([&] { combine(expert, recv, in, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[2].topk_weights.size() expected 6, got 0");
}

// ---------------------------------------------------------------------------------------------
// Internode combine (per node first, BF16 node partials)
// ---------------------------------------------------------------------------------------------

// R = 4 in two nodes of M = 2 (node 0: ranks 0, 1; node 1: ranks 2, 3), E = 4 (one expert per rank),
// K = 3, hidden = 2 BF16.
//   rank 0: t0 {0, 1, 2}    -> ranks 0, 1, 2 (both nodes, two ranks of node 0)
//   rank 1: t0 {2, 3,-1}    -> ranks 2, 3 (node 1 only);  t1 {-1,-1,-1} -> nowhere
//   rank 2: no tokens
//   rank 3: t0 {1, 2, 3}    -> ranks 1, 2, 3 (one rank of node 0, two of node 1)
// Receive order: rank 0: (0,0); rank 1: (0,0), (3,0); rank 2: (0,0), (1,0), (3,0); rank 3: (1,0), (3,0).
NormalConfig internode_config() {
  NormalConfig cfg;
  cfg.num_ranks = 4;
  cfg.num_experts = 4;
  cfg.hidden = 2;
  cfg.num_topk = 3;
  return cfg;
}

std::vector<RankInput> internode_inputs() {
  std::vector<RankInput> in(4);
  in[0].num_tokens = 1;
  in[0].x.assign(4, 0);
  in[0].topk_idx = {0, 1, 2};
  in[0].topk_weights = {0.5f, 0.25f, 0.125f};
  in[1].num_tokens = 2;
  in[1].x.assign(8, 0);
  in[1].topk_idx = {2, 3, -1, -1, -1, -1};
  in[1].topk_weights = {0.75f, 0.5f, 9.0f, 0.9f, 0.9f, 0.9f};
  in[3].num_tokens = 1;
  in[3].x.assign(4, 0);
  in[3].topk_idx = {1, 2, 3};
  in[3].topk_weights = {0.1f, 0.2f, 0.3f};
  return in;
}

// BF16: 0x3F80 = 1, 0x3F81 = 1 + 2^-7, 0x3B80 = 2^-8, 0x4380 = 256, 0xC380 = -256, 0x4000 = 2,
// 0xBF80 = -1, 0x3080 = 2^-30, 0x3100 = 2^-29.
// Weights (when recv has them): the dispatched (localised) weights, except the rows of rank 3's
// token, which carry rank 1 {1, 0.5, 0}, rank 2 {2^-24, 0.3f, 0}, rank 3 {2^-24, 0, 0.125}.
std::vector<CombineInput> internode_expert_outputs(const std::vector<RankRecv>& recv) {
  std::vector<CombineInput> out(4);
  out[0].x = {0x3F80, 0x4380};                                  // (0,0)
  out[1].x = {0x3B80, 0x3F80, /**/ 0x3F80, 0x3F80};             // (0,0), (3,0)
  out[2].x = {0x3B80, 0xC380, /**/ 0x3F80, 0x4000, /**/ 0x3B80, 0xBF80};  // (0,0), (1,0), (3,0)
  out[3].x = {0x3B80, 0x0000, /**/ 0x3B80, 0x3080};             // (1,0), (3,0)
  for (int d = 0; d < 4; ++d) out[d].topk_weights = recv[d].topk_weights;
  if (recv[0].topk_weights.empty()) return out;  // !with_topk: no weights
  const float tiny = std::ldexp(1.0f, -24);
  std::copy_n(std::vector<float>{1.0f, 0.5f, 0.0f}.begin(), 3, out[1].topk_weights.begin() + 1 * 3);
  std::copy_n(std::vector<float>{tiny, 0.3f, 0.0f}.begin(), 3, out[2].topk_weights.begin() + 2 * 3);
  std::copy_n(std::vector<float>{tiny, 0.0f, 0.125f}.begin(), 3, out[3].topk_weights.begin() + 1 * 3);
  return out;
}

// bias0/bias1 for internode_inputs(): rank 1 t0 {2^-8, 1} / {0, 0.5}, t1 {1.5, 0} / {0.25, -2};
// rank 3 t0 {0, 2^-30} / {0, 0}; zero for rank 0, none for rank 2 (no tokens).
std::vector<std::vector<uint16_t>> internode_bias0() {
  return {{0x0000, 0x0000}, {0x3B80, 0x3F80, 0x3FC0, 0x0000}, {}, {0x0000, 0x3080}};
}
std::vector<std::vector<uint16_t>> internode_bias1() {
  return {{0x0000, 0x0000}, {0x0000, 0x3F00, 0x3E80, 0xC000}, {}, {0x0000, 0x0000}};
}

TEST(ReferenceCombineInternode, DispatchIsTheSameAndSendPositionsLocateRows) {
  const std::vector<RankRecv> recv = dispatch(internode_inputs(), internode_config());
  EXPECT_EQ(recv[0].send_pos, (std::vector<int>{0, 0, 0, -1}));
  EXPECT_EQ(recv[1].send_pos, (std::vector<int>{-1, -1, 1, 0, /**/ -1, -1, -1, -1}));
  EXPECT_TRUE(recv[2].send_pos.empty());
  EXPECT_EQ(recv[3].send_pos, (std::vector<int>{-1, 1, 2, 1}));
}

TEST(ReferenceCombineInternode, RoundsEachNodePartialToBf16BeforeAddingNodes) {
  const NormalConfig cfg = internode_config();
  const std::vector<RankInput> in = internode_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  const std::vector<CombineInput> expert = internode_expert_outputs(recv);
  const std::vector<CombineOutput> out = combine_internode(expert, recv, in, cfg, 2);
  ASSERT_EQ(out.size(), 4u);
  // rank 0 t0 (ranks 0, 1 | 2):
  //   column 0: node 0: 1 + 2^-8 -> BF16 tie, to even: 1; node 1: 2^-8; 1 + 2^-8 -> 1 (0x3F80).
  //             Flat: (1 + 2^-8) + 2^-8 = 1 + 2^-7 (0x3F81).
  //   column 1: node 0: 256 + 1 = 257 -> BF16 tie, to even: 256; node 1: -256; 0 (0x0000). Flat: 1.
  // rank 1 t0 (node 1 only, ranks 2, 3): {1 + 2^-8 -> 1, 2 + 0 = 2}; t1: sent nowhere -> 0.
  // rank 3 t0 (rank 1 | ranks 2, 3):
  //   column 0: node 0: 1; node 1: 2^-8 + 2^-8 = 2^-7; 1 + 2^-7 (0x3F81), as flat.
  //   column 1: node 0: 1; node 1: -1 + 2^-30 = -1 in float32; 1 + -1 = 0. Flat: (1 + -1) + 2^-30 = 2^-30.
  EXPECT_EQ(out[0].x, (std::vector<uint16_t>{0x3F80, 0x0000}));
  EXPECT_EQ(out[1].x, (std::vector<uint16_t>{0x3F80, 0x4000, 0x0000, 0x0000}));
  EXPECT_TRUE(out[2].x.empty());
  EXPECT_EQ(out[3].x, (std::vector<uint16_t>{0x3F81, 0x0000}));

  // The flat order gives other bits on the same inputs.
  const std::vector<CombineOutput> flat = combine(expert, recv, in, cfg);
  EXPECT_EQ(flat[0].x, (std::vector<uint16_t>{0x3F81, 0x3F80}));
  EXPECT_EQ(flat[1].x, (std::vector<uint16_t>{0x3F80, 0x4000, 0x0000, 0x0000}));
  EXPECT_EQ(flat[3].x, (std::vector<uint16_t>{0x3F81, 0x3080}));
}

TEST(ReferenceCombineInternode, AddsBiasesAfterTheRoundedNodePartials) {
  const NormalConfig cfg = internode_config();
  const std::vector<RankInput> in = internode_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  const std::vector<CombineInput> expert = internode_expert_outputs(recv);
  const std::vector<CombineOutput> out =
      combine_internode(expert, recv, in, cfg, 2, internode_bias0(), internode_bias1());
  // rank 1 t0 (one node): column 0: node 1 partial 1 + 2^-8 -> 1, then + 2^-8 (bias0) + 0 = 1 + 2^-8
  //   -> 1 (0x3F80); flat keeps the partial in float32: 1 + 2^-8 + 2^-8 = 1 + 2^-7 (0x3F81).
  //   column 1: 2 + 1 + 0.5 = 3.5 (0x4060).
  // rank 1 t1 (sent nowhere): bias only: {1.5 + 0.25, 0 + -2} = {0x3FE0, 0xC000}.
  // rank 3 t0 column 1: 0 + 2^-30 (bias0) = 2^-30 (0x3080); flat: 2^-30 + 2^-30 = 2^-29 (0x3100).
  EXPECT_EQ(out[0].x, (std::vector<uint16_t>{0x3F80, 0x0000}));
  EXPECT_EQ(out[1].x, (std::vector<uint16_t>{0x3F80, 0x4060, 0x3FE0, 0xC000}));
  EXPECT_EQ(out[3].x, (std::vector<uint16_t>{0x3F81, 0x3080}));

  const std::vector<CombineOutput> flat = combine(expert, recv, in, cfg, internode_bias0(), internode_bias1());
  EXPECT_EQ(flat[1].x, (std::vector<uint16_t>{0x3F81, 0x4060, 0x3FE0, 0xC000}));
  EXPECT_EQ(flat[3].x, (std::vector<uint16_t>{0x3F81, 0x3100}));
}

TEST(ReferenceCombineInternode, SumsWeightsPerNodeInFloat32WithoutRounding) {
  const NormalConfig cfg = internode_config();
  const std::vector<RankInput> in = internode_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  const std::vector<CombineInput> expert = internode_expert_outputs(recv);
  const std::vector<CombineOutput> out = combine_internode(expert, recv, in, cfg, 2);
  // Dispatched weights come back as the original ones; the token sent nowhere gets zeros.
  EXPECT_EQ(out[0].topk_weights, (std::vector<float>{0.5f, 0.25f, 0.125f}));
  EXPECT_EQ(out[1].topk_weights, (std::vector<float>{0.75f, 0.5f, 0.0f, 0.0f, 0.0f, 0.0f}));
  EXPECT_TRUE(out[2].topk_weights.empty());
  // rank 3 t0, slot 0: node 0: 1; node 1: 2^-24 + 2^-24 = 2^-23; 1 + 2^-23. Flat: (1 + 2^-24) + 2^-24 = 1.
  //   slot 1: 0.5 + 0.3f in float32 (0.3f is not rounded to BF16, which would give 0.30078125).
  //   slot 2: 0.125.
  const float slot1 = 0.5f + 0.3f;
  EXPECT_EQ(out[3].topk_weights, (std::vector<float>{1.0f + std::ldexp(1.0f, -23), slot1, 0.125f}));
  EXPECT_NE(slot1, 0.5f + bf16_to_float(float_to_bf16(0.3f)));
  const std::vector<CombineOutput> flat = combine(expert, recv, in, cfg);
  EXPECT_EQ(flat[3].topk_weights, (std::vector<float>{1.0f, slot1, 0.125f}));

  NormalConfig no_topk = cfg;
  no_topk.with_topk = false;
  const std::vector<RankRecv> recv_no_topk = dispatch(in, no_topk);
  std::vector<CombineInput> expert_no_topk = internode_expert_outputs(recv_no_topk);  // weights empty
  const std::vector<CombineOutput> bare = combine_internode(expert_no_topk, recv_no_topk, in, no_topk, 2);
  EXPECT_TRUE(bare[3].topk_weights.empty());
  EXPECT_EQ(bare[3].x, (std::vector<uint16_t>{0x3F81, 0x0000}));
}

TEST(ReferenceCombineInternode, OneNodeRoundsTheWholeSumOnceBeforeTheBiases) {
  // M = R = 4: a single node, whose partial is the flat sum (ranks ascending from +0.0f) rounded to
  // BF16, then added to +0.0f and followed by the biases.
  const NormalConfig cfg = internode_config();
  const std::vector<RankInput> in = internode_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  const std::vector<CombineInput> expert = internode_expert_outputs(recv);
  // Without bias: rounding the partial and then the total is rounding once, so this equals combine.
  // rank 0 t0: {(1 + 2^-8) + 2^-8 = 1 + 2^-7, (256 + 1) + -256 = 1}; rank 3 t0: {1 + 2^-7, 2^-30}.
  const std::vector<CombineOutput> out = combine_internode(expert, recv, in, cfg, 4);
  EXPECT_EQ(out[0].x, (std::vector<uint16_t>{0x3F81, 0x3F80}));
  EXPECT_EQ(out[1].x, (std::vector<uint16_t>{0x3F80, 0x4000, 0x0000, 0x0000}));
  EXPECT_EQ(out[3].x, (std::vector<uint16_t>{0x3F81, 0x3080}));
  const std::vector<CombineOutput> flat = combine(expert, recv, in, cfg);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(out[s].x, flat[s].x) << "rank " << s;
  // One node: the weights are the flat float32 sums: 1 + 2^-24 + 2^-24 = 1 for rank 3 t0 slot 0.
  EXPECT_EQ(out[3].topk_weights, (std::vector<float>{1.0f, 0.5f + 0.3f, 0.125f}));

  // With bias the rounding of the partial shows: rank 1 t0 column 0: the partial 1 + 2^-8 rounds to
  // 1, then + 2^-8 (bias0) -> 1 + 2^-8 -> 1 (0x3F80); combine gives 1 + 2^-7 (0x3F81).
  // rank 3 t0 column 1: partial 2^-30 (exact in BF16) + 2^-30 = 2^-29 (0x3100), as combine.
  const std::vector<CombineOutput> biased =
      combine_internode(expert, recv, in, cfg, 4, internode_bias0(), internode_bias1());
  EXPECT_EQ(biased[0].x, (std::vector<uint16_t>{0x3F81, 0x3F80}));
  EXPECT_EQ(biased[1].x, (std::vector<uint16_t>{0x3F80, 0x4060, 0x3FE0, 0xC000}));
  EXPECT_EQ(biased[3].x, (std::vector<uint16_t>{0x3F81, 0x3100}));
}

// Random routing and data for R ranks: routing with some -1 slots and some tokens sent nowhere,
// and random expert rows and weights for every received row (not the dispatched weights, so that
// the weight sums really add several non-zero terms).
struct RandomCombineCase {
  NormalConfig cfg;
  std::vector<RankInput> in;
  std::vector<RankRecv> recv;
  std::vector<CombineInput> expert;
  std::vector<std::vector<uint16_t>> bias0, bias1;
};

RandomCombineCase random_combine_case(int num_ranks, bool with_topk, uint64_t seed) {
  RandomCombineCase c;
  c.cfg.num_ranks = num_ranks;
  c.cfg.num_experts = 2 * num_ranks;
  c.cfg.hidden = 24;
  c.cfg.num_topk = std::min(4, c.cfg.num_experts);
  c.cfg.with_topk = with_topk;
  const size_t hidden = static_cast<size_t>(c.cfg.hidden);
  c.in.resize(num_ranks);
  c.bias0.resize(num_ranks);
  c.bias1.resize(num_ranks);
  for (int s = 0; s < num_ranks; ++s) {
    RankInput& r = c.in[s];
    r.num_tokens = 20 + s % 3;
    r.x.assign(r.num_tokens * hidden * 2, 0);
    r.topk_idx = all_minus_one_rows(
        with_minus_one(uniform_routing(r.num_tokens, c.cfg.num_topk, c.cfg.num_experts, seed + s), 0.3, seed + 100 + s),
        c.cfg.num_topk, 7);
    r.topk_weights = random_weights(r.topk_idx.size(), seed + 200 + s);
    c.bias0[s] = random_bf16(r.num_tokens * hidden, seed + 300 + s, 0.5f);
    c.bias1[s] = random_bf16(r.num_tokens * hidden, seed + 400 + s, 0.01f);
  }
  c.recv = dispatch(c.in, c.cfg);
  c.expert.resize(num_ranks);
  for (int d = 0; d < num_ranks; ++d) {
    const size_t rows = static_cast<size_t>(c.recv[d].num_recv_tokens);
    // Rows of mixed magnitudes so that both the association and the BF16 partials matter.
    c.expert[d].x = random_bf16(rows * hidden, seed + 500 + d, d % 2 == 0 ? 64.0f : 0.25f);
    if (with_topk) c.expert[d].topk_weights = random_weights(rows * c.cfg.num_topk, seed + 600 + d);
  }
  return c;
}

TEST(ReferenceCombineInternode, OneRankPerNodeIsBitIdenticalToCombineOnRandomInputs) {
  for (int num_ranks : {1, 2, 3, 4, 8, 16}) {
    for (bool with_topk : {true, false}) {
      const RandomCombineCase c = random_combine_case(num_ranks, with_topk, 1000 + num_ranks);
      for (bool with_bias : {false, true}) {
        const std::vector<std::vector<uint16_t>> none;
        const auto& b0 = with_bias ? c.bias0 : none;
        const auto& b1 = with_bias ? c.bias1 : none;
        const std::vector<CombineOutput> want = combine(c.expert, c.recv, c.in, c.cfg, b0, b1);
        const std::vector<CombineOutput> got = combine_internode(c.expert, c.recv, c.in, c.cfg, 1, b0, b1);
        ASSERT_EQ(got.size(), want.size());
        for (int s = 0; s < num_ranks; ++s) {
          const std::string what = "R " + std::to_string(num_ranks) + (with_topk ? " topk" : "") +
                                   (with_bias ? " bias" : "") + " rank " + std::to_string(s);
          EXPECT_EQ(first_mismatches(got[s].x, want[s].x, c.cfg.hidden, (what + " x").c_str()), "");
          EXPECT_EQ(first_mismatches(got[s].topk_weights, want[s].topk_weights, c.cfg.num_topk,
                                     (what + " topk_weights").c_str()),
                    "");
        }
      }
    }
  }
}

TEST(ReferenceCombineInternode, RandomInputsAreSensitiveToTheNodeSize) {
  // The random cases above do exercise the order: with 2 ranks per node the bits differ from combine.
  const RandomCombineCase c = random_combine_case(8, true, 77);
  const std::vector<CombineOutput> flat = combine(c.expert, c.recv, c.in, c.cfg, c.bias0, c.bias1);
  const std::vector<CombineOutput> nodes = combine_internode(c.expert, c.recv, c.in, c.cfg, 2, c.bias0, c.bias1);
  size_t x_differ = 0, w_differ = 0;
  for (int s = 0; s < 8; ++s) {
    for (size_t i = 0; i < flat[s].x.size(); ++i) x_differ += flat[s].x[i] != nodes[s].x[i];
    for (size_t i = 0; i < flat[s].topk_weights.size(); ++i)
      w_differ += flat[s].topk_weights[i] != nodes[s].topk_weights[i];
  }
  EXPECT_GT(x_differ, 0u);
  EXPECT_GT(w_differ, 0u);
}

TEST(ReferenceCombineInternode, RejectsBadRanksPerNodeAndMalformedInputs) {
  const NormalConfig cfg = internode_config();
  const std::vector<RankInput> in = internode_inputs();
  const std::vector<RankRecv> recv = dispatch(in, cfg);
  std::vector<CombineInput> expert = internode_expert_outputs(recv);

  std::string message = invalid_argument_message([&] { combine_internode(expert, recv, in, cfg, 3); });
  EXPECT_MESSAGE_HAS(message, "openep::ref::combine_internode");
  EXPECT_MESSAGE_HAS(message, "cfg.num_ranks expected a multiple of ranks_per_node (3), got 4");
  message = invalid_argument_message([&] { combine_internode(expert, recv, in, cfg, 0); });
  EXPECT_MESSAGE_HAS(message, "ranks_per_node expected in [1, 8], got 0");
  message = invalid_argument_message([&] { combine_internode(expert, recv, in, cfg, 9); });
  EXPECT_MESSAGE_HAS(message, "ranks_per_node expected in [1, 8], got 9");

  // combine's checks, with this function's name.
  expert[2].x.resize(5);
  message = invalid_argument_message([&] { combine_internode(expert, recv, in, cfg, 2); });
  EXPECT_MESSAGE_HAS(message, "openep::ref::combine_internode: inputs[2].x.size() expected 6, got 5");
  expert = internode_expert_outputs(recv);
  std::vector<std::vector<uint16_t>> bias = internode_bias0();
  bias[3].pop_back();
  message = invalid_argument_message([&] { combine_internode(expert, recv, in, cfg, 2, bias); });
  EXPECT_MESSAGE_HAS(message, "bias0[3].size() expected 2, got 1");
  std::vector<RankRecv> bad = recv;
  bad[3].send_pos[2] = 3;  // rank 2 received 3 rows
  message = invalid_argument_message([&] { combine_internode(expert, bad, in, cfg, 2); });
  EXPECT_MESSAGE_HAS(message, "dispatched[3].send_pos[0][2] expected in [-1, 3), got 3");
}

// ---------------------------------------------------------------------------------------------
// Low-latency dispatch / combine
// ---------------------------------------------------------------------------------------------

// R = 2, E = 4 (rank 0: experts 0,1; rank 1: 2,3), K = 2, T = 4, hidden = 2 BF16.
//   rank 0: t0 {1, 2}  x {1.0, 0x0001}    rank 1: t0 {0, 1}  x {-1.0, 0x0101}
//           t1 {1, 1}  x {2.0, 0x0002}            t1 {3,-1}  x {-2.0, 0x0102}
//           t2 {-1, 3} x {3.0, 0x0003}
LowLatencyConfig ll_config() {
  LowLatencyConfig cfg;
  cfg.num_ranks = 2;
  cfg.num_experts = 4;
  cfg.hidden = 2;
  cfg.num_topk = 2;
  cfg.num_max_dispatch_tokens_per_rank = 4;
  cfg.use_fp8 = false;
  return cfg;
}

std::vector<LowLatencyInput> ll_inputs() {
  std::vector<LowLatencyInput> in(2);
  in[0].num_tokens = 3;
  in[0].x = {0x3F80, 0x0001, 0x4000, 0x0002, 0x4040, 0x0003};
  in[0].topk_idx = {1, 2, 1, 1, -1, 3};
  in[0].topk_weights = {0.5f, 0.25f, 0.25f, 0.75f, 9.0f, 0.5f};
  in[1].num_tokens = 2;
  in[1].x = {0xBF80, 0x0101, 0xC000, 0x0102};
  in[1].topk_idx = {0, 1, 3, -1};
  in[1].topk_weights = {1.0f, 2.0f, 0.5f, 7.0f};
  return in;
}

// Little-endian bytes of the BF16 rows above, and 8 zero rows of 4 bytes.
const std::vector<uint8_t> kRow00 = {0x80, 0x3F, 0x01, 0x00}, kRow01 = {0x00, 0x40, 0x02, 0x00},
                           kRow02 = {0x40, 0x40, 0x03, 0x00}, kRow10 = {0x80, 0xBF, 0x01, 0x01},
                           kRow11 = {0x00, 0xC0, 0x02, 0x01};

std::vector<uint8_t> packed(const std::vector<std::vector<uint8_t>>& rows_expert0,
                            const std::vector<std::vector<uint8_t>>& rows_expert1) {
  std::vector<uint8_t> bytes(2 * 8 * 4, 0);
  for (size_t i = 0; i < rows_expert0.size(); ++i)
    std::copy(rows_expert0[i].begin(), rows_expert0[i].end(), bytes.begin() + i * 4);
  for (size_t i = 0; i < rows_expert1.size(); ++i) {
    std::copy(rows_expert1[i].begin(), rows_expert1[i].end(), bytes.begin() + 32 + i * 4);
  }
  return bytes;
}

TEST(ReferenceLowLatency, DispatchCountsLayoutRangesAndSourceIndices) {
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch(ll_inputs(), ll_config());
  ASSERT_EQ(recv.size(), 2u);
  // Rank 0, expert 0: rank 1 t0. Expert 1: rank 0 t0, t1, t1 (two slots), then rank 1 t0.
  EXPECT_EQ(recv[0].count, (std::vector<int>{1, 4}));
  EXPECT_EQ(recv[0].layout_range, (std::vector<int64_t>{range(0, 0), range(0, 1), range(0, 3), range(3, 1)}));
  EXPECT_EQ(recv[0].src_info, (std::vector<int>{0, -1, -1, -1, -1, -1, -1, -1, /**/ 0, 1, 1, 0, -1, -1, -1, -1}));
  // Rank 1, expert 2: rank 0 t0. Expert 3: rank 0 t2, rank 1 t1.
  EXPECT_EQ(recv[1].count, (std::vector<int>{1, 2}));
  EXPECT_EQ(recv[1].layout_range, (std::vector<int64_t>{range(0, 1), range(1, 0), range(0, 1), range(1, 1)}));
  EXPECT_EQ(recv[1].src_info, (std::vector<int>{0, -1, -1, -1, -1, -1, -1, -1, /**/ 2, 1, -1, -1, -1, -1, -1, -1}));
}

TEST(ReferenceLowLatencyShrink, MaskedRankSendsNothingAndItsExpertsBecomeMinusOne) {
  const std::vector<LowLatencyInput> m = mask_ranks(ll_inputs(), ll_config(), {1});
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[1].num_tokens, 0);
  EXPECT_TRUE(m[1].x.empty() && m[1].topk_idx.empty() && m[1].topk_weights.empty());
  // Rank 0's slots on experts 2 and 3 (rank 1) are dropped; x and weights are unchanged.
  EXPECT_EQ(m[0].topk_idx, (std::vector<int64_t>{1, -1, 1, 1, -1, -1}));
  EXPECT_EQ(m[0].x, ll_inputs()[0].x);
  EXPECT_EQ(m[0].topk_weights, ll_inputs()[0].topk_weights);
  // What survivor rank 0 receives: expert 1 gets rank 0's t0, t1, t1 only (rank 1's t0 is gone), expert 0 nothing.
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch(m, ll_config());
  EXPECT_EQ(recv[0].count, (std::vector<int>{0, 3}));
  EXPECT_EQ(recv[0].src_info, (std::vector<int>{-1, -1, -1, -1, -1, -1, -1, -1, /**/ 0, 1, 1, -1, -1, -1, -1, -1}));
  // Nothing masked: the inputs are returned unchanged.
  const std::vector<LowLatencyInput> none = mask_ranks(ll_inputs(), ll_config(), {});
  EXPECT_EQ(none[0].topk_idx, ll_inputs()[0].topk_idx);
  EXPECT_EQ(none[1].num_tokens, 2);
}

TEST(ReferenceLowLatencyShrink, RejectsAMaskedRankOutOfRange) {
  try {
    mask_ranks(ll_inputs(), ll_config(), {2});
    ADD_FAILURE() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("mask_ranks: masked rank expected in [0, 2), got 2"), std::string::npos)
        << e.what();
  }
}

TEST(ReferenceLowLatency, DispatchCopiesBf16RowsIntoPackedSlots) {
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch(ll_inputs(), ll_config());
  EXPECT_EQ(first_mismatches(recv[0].packed_x, packed({kRow10}, {kRow00, kRow01, kRow01, kRow10}), 4, "rank 0"), "");
  EXPECT_EQ(first_mismatches(recv[1].packed_x, packed({kRow00}, {kRow02, kRow11}), 4, "rank 1"), "");
  for (const LowLatencyRecv& r : recv) {
    EXPECT_TRUE(r.packed_scales.empty());
    EXPECT_TRUE(r.packed_scales_ue8m0.empty());
  }
}

TEST(ReferenceLowLatency, DispatchCastsFp8WithOneScalePerBlock) {
  // R = 1, E = 1, K = 1, T = 2, hidden = 384: t0 goes to expert 0, t1 nowhere.
  LowLatencyConfig cfg;
  cfg.num_ranks = 1;
  cfg.num_experts = 1;
  cfg.hidden = 384;
  cfg.num_topk = 1;
  cfg.num_max_dispatch_tokens_per_rank = 2;
  LowLatencyInput in;
  in.num_tokens = 2;
  in.x.assign(2 * 384, 0x3F80);  // t1: all ones (never sent)
  std::fill(in.x.begin(), in.x.begin() + 384, 0x0000);
  in.x[0] = 0x4000;  // block 0: 2.0 (amax), 1.0
  in.x[1] = 0x3F80;
  in.x[128] = 0xC260;  // block 1: -56 (amax), 7
  in.x[129] = 0x40E0;  // block 2: zeros
  in.topk_idx = {0, -1};
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch({in}, cfg);

  EXPECT_EQ(recv[0].count, (std::vector<int>{1}));
  EXPECT_EQ(recv[0].src_info, (std::vector<int>{0, -1}));
  EXPECT_EQ(recv[0].layout_range, (std::vector<int64_t>{range(0, 1)}));
  std::vector<uint8_t> want(2 * 384, 0x00);
  want[0] = 0x7E;    // 2 * 224
  want[1] = 0x76;    // 1 * 224
  want[128] = 0xFE;  // -56 * 8
  want[129] = 0x66;  // 7 * 8
  EXPECT_EQ(first_mismatches(recv[0].packed_x, want, 384, "packed_x"), "");
  EXPECT_EQ(recv[0].packed_scales, (std::vector<float>{1.0f / 224.0f, 0.125f, 1e-4f / 448.0f, 0.0f, 0.0f, 0.0f}));
  EXPECT_TRUE(recv[0].packed_scales_ue8m0.empty());
}

TEST(ReferenceLowLatency, DispatchPacksUe8m0Scales) {
  // hidden = 512: block amaxes 2, 56, (zeros), 1 -> scales 2^-7, 2^-3, 2^-22, 2^-8
  //   -> UE8M0 bytes 120, 124, 105, 119 -> word 0x77697C78.
  LowLatencyConfig cfg;
  cfg.num_ranks = 1;
  cfg.num_experts = 1;
  cfg.hidden = 512;
  cfg.num_topk = 1;
  cfg.num_max_dispatch_tokens_per_rank = 1;
  cfg.round_scale = true;
  cfg.use_ue8m0 = true;
  LowLatencyInput in;
  in.num_tokens = 1;
  in.x.assign(512, 0x0000);
  in.x[0] = 0x4000;    // 2.0
  in.x[128] = 0x4260;  // 56.0
  in.x[384] = 0x3F80;  // 1.0
  in.topk_idx = {0};
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch({in}, cfg);

  EXPECT_EQ(recv[0].packed_scales_ue8m0, (std::vector<uint32_t>{0x77697C78u}));
  EXPECT_TRUE(recv[0].packed_scales.empty());
  EXPECT_EQ(recv[0].packed_x[0], 0x78);    // 2 * 128 = 256
  EXPECT_EQ(recv[0].packed_x[128], 0x7E);  // 56 * 8 = 448
  EXPECT_EQ(recv[0].packed_x[384], 0x78);  // 1 * 256 = 256
}

// Expert outputs for ll_inputs(): [rank][E_local = 2][P = 8][hidden = 2]; column 1 = -column 0.
std::vector<std::vector<uint16_t>> ll_expert_outputs() {
  std::vector<std::vector<uint16_t>> out(2, std::vector<uint16_t>(2 * 8 * 2, 0));
  auto set = [&](int rank, int expert, int row, uint16_t value) {
    out[rank][(expert * 8 + row) * 2] = value;
    out[rank][(expert * 8 + row) * 2 + 1] = value ^ 0x8000;
  };
  set(0, 0, 0, 0x3F00);  // rank 1 t0: 0.5
  set(0, 1, 0, 0x4000);  // rank 0 t0: 2.0
  set(0, 1, 1, 0x3F80);  // rank 0 t1, slot 0: 1.0
  set(0, 1, 2, 0x4040);  // rank 0 t1, slot 1: 3.0
  set(0, 1, 3, 0x3E00);  // rank 1 t0: 0.125
  set(1, 0, 0, 0x4080);  // rank 0 t0: 4.0
  set(1, 1, 0, 0xC000);  // rank 0 t2: -2.0
  set(1, 1, 1, 0x4100);  // rank 1 t1: 8.0
  return out;
}

TEST(ReferenceLowLatency, CombineSumsWeightedExpertRowsPerSlot) {
  const LowLatencyConfig cfg = ll_config();
  const std::vector<LowLatencyInput> in = ll_inputs();
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch(in, cfg);
  const std::vector<std::vector<uint16_t>> out = low_latency_combine(ll_expert_outputs(), recv, in, cfg);
  // rank 0 t0: 0.5 * 2 + 0.25 * 4 = 2;  t1: 0.25 * 1 + 0.75 * 3 = 2.5 (slots matched to copies in order);
  //        t2: slot 0 is -1 (weight 9 ignored), 0.5 * -2 = -1.
  EXPECT_EQ(out[0], (std::vector<uint16_t>{0x4000, 0xC000, 0x4020, 0xC020, 0xBF80, 0x3F80}));
  // rank 1 t0: 1 * 0.5 + 2 * 0.125 = 0.75;  t1: 0.5 * 8 = 4.
  EXPECT_EQ(out[1], (std::vector<uint16_t>{0x3F40, 0xBF40, 0x4080, 0xC080}));
}

TEST(ReferenceLowLatency, CombineFindsRowsThroughLayoutRangeAndSrcInfo) {
  // Same as above, but rank 0's expert 1 is laid out as a kernel might: rank 1's range first, and
  // rank 0's rows in the order t1, t1, t0 (duplicate copies keep their relative order).
  const LowLatencyConfig cfg = ll_config();
  const std::vector<LowLatencyInput> in = ll_inputs();
  std::vector<LowLatencyRecv> recv = low_latency_dispatch(in, cfg);
  std::vector<std::vector<uint16_t>> expert = ll_expert_outputs();
  recv[0].layout_range[2] = range(1, 3);          // expert 1, source rank 0
  recv[0].layout_range[3] = range(0, 1);          // expert 1, source rank 1
  const std::vector<int> old_row = {3, 1, 2, 0};  // new row j holds the old row old_row[j]
  const std::vector<std::vector<uint16_t>> before = expert;
  for (int j = 0; j < 4; ++j) {
    recv[0].src_info[8 + j] = std::vector<int>{0, 1, 1, 0}[j];
    for (int c = 0; c < 2; ++c) expert[0][(8 + j) * 2 + c] = before[0][(8 + old_row[j]) * 2 + c];
  }
  const std::vector<std::vector<uint16_t>> out = low_latency_combine(expert, recv, in, cfg);
  EXPECT_EQ(out[0], (std::vector<uint16_t>{0x4000, 0xC000, 0x4020, 0xC020, 0xBF80, 0x3F80}));
  EXPECT_EQ(out[1], (std::vector<uint16_t>{0x3F40, 0xBF40, 0x4080, 0xC080}));
}

TEST(ReferenceLowLatency, CombineMultipliesThenAddsWithoutFusedMultiplyAdd) {
  // One token, two slots. Slot 0: w = 1 + 2^-7 + 2^-17, row -1  -> acc = -(1 + 2^-7 + 2^-17), exact.
  // Slot 1: w = 1 + 2^-17, row 1 + 2^-7 (0x3F81): the product 1 + 2^-7 + 2^-17 + 2^-24 rounds (tie,
  // even) to 1 + 2^-7 + 2^-17, so acc becomes exactly 0. A fused multiply-add would give 2^-24 (0x3380).
  LowLatencyConfig cfg;
  cfg.num_ranks = 1;
  cfg.num_experts = 2;
  cfg.hidden = 1;
  cfg.num_topk = 2;
  cfg.num_max_dispatch_tokens_per_rank = 1;
  cfg.use_fp8 = false;
  LowLatencyInput in;
  in.num_tokens = 1;
  in.x = {0x3F80};
  in.topk_idx = {0, 1};
  in.topk_weights = {1.0f + std::ldexp(1.0f, -7) + std::ldexp(1.0f, -17), 1.0f + std::ldexp(1.0f, -17)};
  const std::vector<LowLatencyRecv> recv = low_latency_dispatch({in}, cfg);
  const std::vector<std::vector<uint16_t>> expert = {{0xBF80, 0x3F81}};  // expert 0 row 0, expert 1 row 0
  const std::vector<std::vector<uint16_t>> out = low_latency_combine(expert, recv, {in}, cfg);
  EXPECT_EQ(out[0], (std::vector<uint16_t>{0x0000}));
}

TEST(ReferenceLowLatency, RejectsInvalidConfigsAndInputs) {
  const std::vector<LowLatencyInput> in = ll_inputs();
  LowLatencyConfig cfg = ll_config();
  cfg.use_fp8 = true;
  cfg.use_ue8m0 = true;
  std::string message = invalid_argument_message([&] { low_latency_dispatch(in, cfg); });
  EXPECT_MESSAGE_HAS(message, "openep::ref::low_latency_dispatch");
  EXPECT_MESSAGE_HAS(message, "cfg.use_ue8m0");

  cfg = ll_config();
  cfg.use_fp8 = true;  // hidden = 2 is not a multiple of 128
  message = invalid_argument_message([&] { low_latency_dispatch(in, cfg); });
  EXPECT_MESSAGE_HAS(message, "cfg.hidden");
  EXPECT_MESSAGE_HAS(message, "got 2");

  cfg = ll_config();
  cfg.num_max_dispatch_tokens_per_rank = 2;  // rank 0 has 3 tokens
  message = invalid_argument_message([&] { low_latency_dispatch(in, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[0].num_tokens expected <= cfg.num_max_dispatch_tokens_per_rank (2), got 3");

  cfg = ll_config();
  std::vector<LowLatencyInput> dup = in;
  dup[1].topk_idx = {1, 1, 1, 1};  // 4 rows from rank 1 to expert 1, T = 4: fits
  EXPECT_NO_THROW(low_latency_dispatch(dup, cfg));
  dup[1].num_tokens = 3;
  dup[1].x.resize(6, 0);
  dup[1].topk_idx = {1, 1, 1, 1, 1, -1};  // 5 rows > T
  dup[1].topk_weights.resize(6, 0.0f);
  message = invalid_argument_message([&] { low_latency_dispatch(dup, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[1].topk_idx");
  EXPECT_MESSAGE_HAS(message, "expert 1");

  const std::vector<LowLatencyRecv> recv = low_latency_dispatch(in, cfg);
  std::vector<LowLatencyInput> no_weights = in;
  no_weights[0].topk_weights.clear();
  message = invalid_argument_message([&] { low_latency_combine(ll_expert_outputs(), recv, no_weights, cfg); });
  EXPECT_MESSAGE_HAS(message, "inputs[0].topk_weights.size() expected 6, got 0");

  std::vector<LowLatencyRecv> bad = recv;
  bad[1].layout_range[1] = range(7, 2);  // 7 + 2 > R * T = 8
  message = invalid_argument_message([&] { low_latency_combine(ll_expert_outputs(), bad, in, cfg); });
  EXPECT_MESSAGE_HAS(message, "recv[1].layout_range[0][1]");

  bad = recv;
  bad[1].src_info[8] = 5;  // expert 3's row for rank 0 t2 is gone
  message = invalid_argument_message([&] { low_latency_combine(ll_expert_outputs(), bad, in, cfg); });
  EXPECT_MESSAGE_HAS(message, "source rank 0 token 2 slot 1");
}

// ---------------------------------------------------------------------------------------------
// tests/common helpers
// ---------------------------------------------------------------------------------------------

using namespace openep::test;

TEST(TestRouting, UniformRoutingPicksDistinctExpertsAndIsSeeded) {
  const std::vector<int64_t> a = uniform_routing(64, 4, 8, 7);
  ASSERT_EQ(a.size(), 256u);
  for (int t = 0; t < 64; ++t) {
    const std::set<int64_t> experts(a.begin() + t * 4, a.begin() + t * 4 + 4);
    EXPECT_EQ(experts.size(), 4u) << "token " << t;
    EXPECT_GE(*experts.begin(), 0);
    EXPECT_LT(*experts.rbegin(), 8);
  }
  EXPECT_EQ(uniform_routing(64, 4, 8, 7), a);
  EXPECT_NE(uniform_routing(64, 4, 8, 8), a);
  EXPECT_EQ(uniform_routing(4, 8, 8, 1).size(), 32u);  // K == E: every expert once
}

TEST(TestRouting, RoundRobinRoutingIsClosedForm) {
  EXPECT_EQ(round_robin_routing(3, 2, 4), (std::vector<int64_t>{0, 1, 2, 3, 0, 1}));
}

TEST(TestRouting, HotExpertRoutingPutsHotExpertInSlotZeroOnly) {
  const std::vector<int64_t> topk = hot_expert_routing(32, 3, 6, 4, 1);
  for (int t = 0; t < 32; ++t) {
    EXPECT_EQ(topk[t * 3], 4);
    EXPECT_NE(topk[t * 3 + 1], 4);
    EXPECT_NE(topk[t * 3 + 2], 4);
    EXPECT_NE(topk[t * 3 + 1], topk[t * 3 + 2]);
  }
}

TEST(TestRouting, SingleRankRoutingTargetsOnlyThatRank) {
  // E_local = 2 < K = 3: the third slot is -1.
  const std::vector<int64_t> topk = single_rank_routing(16, 3, 8, 4, 2, 5);
  const Layout layout = get_dispatch_layout(topk, 16, 3, 8, 4);
  EXPECT_EQ(layout.num_tokens_per_rank, (std::vector<int>{0, 0, 16, 0}));
  EXPECT_EQ(layout.num_tokens_per_expert, (std::vector<int>{0, 0, 0, 0, 16, 16, 0, 0}));
  for (int t = 0; t < 16; ++t) EXPECT_EQ(topk[t * 3 + 2], -1);
}

TEST(TestRouting, EmptyRanksRoutingNeverSelectsListedRanks) {
  const std::vector<int64_t> topk = empty_ranks_routing(50, 4, 16, 4, 3, {1, 3});
  const Layout layout = get_dispatch_layout(topk, 50, 4, 16, 4);
  EXPECT_EQ(layout.num_tokens_per_rank[1], 0);
  EXPECT_EQ(layout.num_tokens_per_rank[3], 0);
  EXPECT_GT(layout.num_tokens_per_rank[0], 0);
  EXPECT_GT(layout.num_tokens_per_rank[2], 0);
  // Only 8 allowed experts remain for K = 10: two -1 slots per token.
  const std::vector<int64_t> narrow = empty_ranks_routing(2, 10, 16, 4, 3, {1, 3});
  EXPECT_EQ(std::count(narrow.begin(), narrow.end(), -1), 4);
}

TEST(TestRouting, MinusOneHelpersClearExactSlots) {
  const std::vector<int64_t> base = round_robin_routing(10, 4, 8);
  const std::vector<int64_t> some = with_minus_one(base, 0.25, 9);
  EXPECT_EQ(std::count(some.begin(), some.end(), -1), 10);  // 25% of 40 slots
  for (size_t i = 0; i < base.size(); ++i) {
    if (some[i] != -1) {
      EXPECT_EQ(some[i], base[i]);
    }
  }
  const std::vector<int64_t> rows = all_minus_one_rows(base, 4, 3);  // rows 0, 3, 6, 9
  EXPECT_EQ(std::count(rows.begin(), rows.end(), -1), 16);
  EXPECT_EQ(rows[3 * 4 + 2], -1);
  EXPECT_EQ(rows[1 * 4 + 2], base[1 * 4 + 2]);
}

TEST(TestRouting, RandomDataIsFiniteScaledAndSeeded) {
  const std::vector<uint16_t> x = random_bf16(1000, 3, 4.0f);
  float amax = 0.0f;
  for (uint16_t v : x) {
    ASSERT_TRUE(std::isfinite(bf16_to_float(v)));
    amax = std::max(amax, std::fabs(bf16_to_float(v)));
  }
  EXPECT_LE(amax, 4.0f);
  EXPECT_GT(amax, 3.0f);
  EXPECT_EQ(random_bf16(1000, 3, 4.0f), x);
  const std::vector<float> w = random_weights(1000, 3);
  for (float v : w) {
    EXPECT_GT(v, 0.0f);
    EXPECT_LE(v, 1.0f);
  }
}

TEST(TestCompare, ReportsFirstMismatchesWithRowAndColumn) {
  const std::vector<uint8_t> got = {1, 2, 3, 4, 5, 6};
  const std::vector<uint8_t> want = {1, 2, 0, 4, 5, 9};
  EXPECT_EQ(first_mismatches(got, want, 3, "x"),
            "x: 2 of 6 elements differ; (row 0, col 2): got 0x3 (3), want 0x0 (0); "
            "(row 1, col 2): got 0x6 (6), want 0x9 (9)");
  EXPECT_EQ(first_mismatches(got.data(), want.data(), 6, 3, "x", 1),
            "x: 2 of 6 elements differ; (row 0, col 2): got 0x3 (3), want 0x0 (0); ...");
  EXPECT_EQ(first_mismatches(got, got, 3, "x"), "");
  EXPECT_EQ(first_mismatches(got, std::vector<uint8_t>(5), 3, "x"), "x: size 6 differs from expected size 5");
}

TEST(TestCompare, ComparesFloatsExactlyOrWithTolerance) {
  const std::vector<float> a = {1.0f, 0.0f, 2.0f};
  const std::vector<float> b = {1.0f, -0.0f, 2.001f};
  EXPECT_NE(first_mismatches(a, b, 3, "w"), "");  // exact: -0.0 and 2.001 differ
  EXPECT_EQ(first_mismatches_close(a, b, 3, "w", 1e-3, 0.0), "");
  EXPECT_EQ(first_mismatches_close(a, b, 3, "w", 1e-4, 0.0),
            "w: 1 of 3 elements differ; (row 0, col 2): got 2, want 2.00099993");
  const std::vector<uint16_t> x = {0x3F80, 0x4000};
  const std::vector<uint16_t> y = {0x3F81, 0x4000};  // 1.0078125 vs 1.0
  EXPECT_EQ(first_mismatches_bf16_close(x.data(), y.data(), 2, 2, "bf16", 0.01, 0.0), "");
  EXPECT_NE(first_mismatches_bf16_close(x.data(), y.data(), 2, 2, "bf16", 0.001, 0.0), "");
}

TEST(TestCompare, CanonicalLowLatencyRowsFollowSourceRankThenSrcInfo) {
  // Source rank 1's rows sit at [0, 2), source rank 0's at [2, 5), unsorted.
  const std::vector<int64_t> layout_range = {range(2, 3), range(0, 2)};
  const std::vector<int> src_info = {7, 4, 9, 1, 5, -1};
  EXPECT_EQ(low_latency_canonical_rows(layout_range.data(), src_info.data(), 2), (std::vector<int>{3, 4, 2, 1, 0}));
}

}  // namespace
