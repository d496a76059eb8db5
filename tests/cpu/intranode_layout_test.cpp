// Intranode rounds on the CPU (protocol/intranode_layout.hpp, IntranodeLayout::num_rounds): round counts cover the
// need exactly, a window that holds nothing gives 0, and a window sized by the size hint for T tokens per rank
// holds a whole round of T tokens from every peer.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Combine's stage in the receiver's order: one round when the largest pair fits a part, else rounds of at most
// stage_rows owner tokens, whose rows (consecutive within a pair) never share a slot under combine_slot.
TEST(IntranodeRounds, CombineSlotsOfARoundNeverCollide) {
  EXPECT_EQ(IntranodeLayout::combine_rounds(0, 0, 0), 1);
  EXPECT_EQ(IntranodeLayout::combine_rounds(10, 100, 10), 1);
  EXPECT_EQ(IntranodeLayout::combine_rounds(11, 100, 10), 10);
  EXPECT_EQ(IntranodeLayout::combine_rounds(1, 5, 0), 0);
  for (int64_t stage = 1; stage < 12; ++stage) {
    EXPECT_EQ(IntranodeLayout::combine_slot(stage - 1, stage), stage - 1);
    for (int64_t first = 0; first < 40; ++first) {  // a round's rows: [first, first + stage) of the pair
      std::vector<bool> used(stage, false);
      for (int64_t rel = first; rel < first + stage; ++rel) {
        const int64_t j = IntranodeLayout::combine_slot(rel, stage);
        ASSERT_TRUE(j >= 0 && j < stage) << rel << " " << stage;
        EXPECT_FALSE(used[j]) << "rows " << first << ".. share slot " << j << " (stage " << stage << ")";
        used[j] = true;
      }
    }
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

// The DeepSeek-V3 batch (4096 tokens, hidden 7168, top-8) in a Buffer of DeepEP V1's default size: dispatch and
// combine fit one round at EP2/4/8 when a rank sends each peer at most ~0.99 / 0.90 / 0.66 of its tokens (uniform
// top-8 of 256): combine's stage holds each peer's rows in its receive order, so it needs the pair's rows, not the
// owner's token count (before, EP4/8 took two combine rounds).
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
    EXPECT_EQ(IntranodeLayout::combine_rounds(pair_rows, T, stage), 1) << R;
    // 8192 tokens: the pairs exceed a part, so rounds of at most `stage` owner tokens (EP2 2, EP4/8 3)
    EXPECT_EQ(IntranodeLayout::combine_rounds(2 * pair_rows, 2 * T, stage), R == 2 ? 2 : 3) << R;
  }
}

}  // namespace
}  // namespace openep::detail
