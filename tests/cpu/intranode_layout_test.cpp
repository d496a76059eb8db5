// Intranode rounds on the CPU (protocol/intranode_layout.hpp, IntranodeLayout::num_rounds): round counts cover the
// need exactly, a window that holds nothing gives 0, and a window sized by the size hint for T tokens per rank
// holds a whole round of T tokens from every peer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>

#include "openep/buffer.hpp"
#include "openep/config.hpp"
#include "protocol/intranode_layout.hpp"

namespace openep::detail {
namespace {

TEST(IntranodeRounds, CountCoversTheNeedWithTheFewestRounds) {
  EXPECT_EQ(IntranodeLayout::num_rounds(0, 10), 1);
  EXPECT_EQ(IntranodeLayout::num_rounds(10, 10), 1);
  EXPECT_EQ(IntranodeLayout::num_rounds(11, 10), 2);
  EXPECT_EQ(IntranodeLayout::num_rounds(20, 10), 2);
  EXPECT_EQ(IntranodeLayout::num_rounds(21, 10), 3);
  EXPECT_EQ(IntranodeLayout::num_rounds(8163, 5819), 2);  // DeepEP's EP2 hint at hidden 7168, 8192 tokens per rank
  for (int64_t cap = 1; cap < 40; ++cap)
    for (int64_t need = 0; need < 200; ++need) {
      const int64_t k = IntranodeLayout::num_rounds(need, cap);
      EXPECT_GE(k * cap, need);                    // every unit is in some round
      EXPECT_TRUE(k == 1 || (k - 1) * cap < need);  // and no round is empty
    }
}

TEST(IntranodeRounds, NothingFitsGivesZeroRounds) {
  EXPECT_EQ(IntranodeLayout::num_rounds(1, 0), 0);
  EXPECT_EQ(IntranodeLayout::num_rounds(0, 0), 0);
  EXPECT_EQ(IntranodeLayout::dispatch_peer_rows(IntranodeLayout::kDataOffset, 16, 2), 0);
  EXPECT_EQ(IntranodeLayout::combine_stage_rows(IntranodeLayout::kDataOffset, 16, 2), 0);
}

TEST(IntranodeRounds, SizeHintHoldsOneRoundOfItsTokens) {
  for (int R : {1, 2, 4, 8})
    for (int T : {1, 100, 1365, 4096}) {
      const int H = 7168, K = 8, S = H / 128;
      const size_t bytes = intranode_buffer_size_hint(R, T, H, 2, S, K);
      const size_t dispatch_record = IntranodeLayout::dispatch_record_bytes(static_cast<size_t>(H) * 2, K, S);
      EXPECT_GE(IntranodeLayout::dispatch_peer_rows(bytes, dispatch_record, R), T);
      EXPECT_GE(IntranodeLayout::combine_stage_rows(bytes, IntranodeLayout::combine_record_bytes(H, K), R), T);
    }
}

TEST(IntranodeRounds, PeerSlotsNumberThePeersInOrder) {
  for (int R : {2, 4, 8})
    for (int me = 0; me < R; ++me) {
      int expect = 0;
      for (int p = 0; p < R; ++p)
        if (p != me) {
          EXPECT_EQ(IntranodeLayout::peer_slot(p, me), expect++) << "R " << R << " me " << me;
        }
      EXPECT_EQ(expect, IntranodeLayout::num_peer_slots(R));
    }
  EXPECT_EQ(IntranodeLayout::num_peer_slots(1), 1);
}

// The DeepSeek-V3 batch (4096 tokens, hidden 7168, top-8) in a Buffer of DeepEP V1's default size: dispatch fits one
// round at EP2/4/8 when a rank sends each peer at most ~0.99 / 0.90 / 0.66 of its tokens (uniform top-8 of 256), and
// combine at EP2 (it holds num_tokens per peer; EP4/8 take two rounds).
TEST(IntranodeRounds, DeepEPSizedBufferHoldsTheDeepSeekBatchInFewRounds) {
  const int H = 7168, K = 8, T = 4096;
  const double fanout[] = {0, 0, 0.9965, 0, 0.9036, 0, 0, 0, 0.6618};
  for (int R : {2, 4, 8}) {
    const size_t nvl = std::max(deepep_nvl_buffer_size_hint(get_dispatch_config(R), 2 * H, R),
                                deepep_nvl_buffer_size_hint(get_combine_config(R), 2 * H, R));
    const size_t record = IntranodeLayout::dispatch_record_bytes(static_cast<size_t>(H) * 2, K, 0);
    const int64_t pair_rows = static_cast<int64_t>(fanout[R] * T + 64);  // + a margin for the random draw
    EXPECT_EQ(IntranodeLayout::num_rounds(pair_rows, IntranodeLayout::dispatch_peer_rows(nvl, record, R)), 1) << R;
    const int64_t stage = IntranodeLayout::combine_stage_rows(nvl, IntranodeLayout::combine_record_bytes(H, K), R);
    EXPECT_EQ(IntranodeLayout::num_rounds(T, stage), R == 2 ? 1 : 2) << R;
  }
}

}  // namespace
}  // namespace openep::detail
