// Intranode rounds on the CPU (protocol/intranode_layout.hpp, IntranodeLayout::num_rounds; EXPERIMENTAL, behind
// OPENEP_EXPERIMENTAL_ROUNDS=1): round counts cover the need exactly, a window that holds nothing gives 0, and a
// window sized by the size hint for T tokens per rank holds a whole round of T tokens.
#include <gtest/gtest.h>

#include <cstdint>

#include "openep/buffer.hpp"
#include "protocol/intranode_layout.hpp"

namespace openep::detail {
namespace {

TEST(IntranodeRounds, CountCoversTheNeedWithTheFewestRounds) {
  EXPECT_EQ(IntranodeLayout::num_rounds(0, 10), 1);
  EXPECT_EQ(IntranodeLayout::num_rounds(10, 10), 1);
  EXPECT_EQ(IntranodeLayout::num_rounds(11, 10), 2);
  EXPECT_EQ(IntranodeLayout::num_rounds(20, 10), 2);
  EXPECT_EQ(IntranodeLayout::num_rounds(21, 10), 3);
  EXPECT_EQ(IntranodeLayout::num_rounds(16384, 5816), 3);  // DeepEP's EP2 hint at hidden 7168, 8192 tokens per rank
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
  EXPECT_EQ(IntranodeLayout::dispatch_capacity_rows(IntranodeLayout::kDataOffset, 16), 0);
  EXPECT_EQ(IntranodeLayout::combine_stage_rows(IntranodeLayout::kDataOffset, 16, 2), 0);
}

TEST(IntranodeRounds, SizeHintHoldsOneRoundOfItsTokens) {
  for (int R : {1, 2, 4, 8})
    for (int T : {1, 100, 1365, 4096}) {
      const int H = 7168, K = 8, S = H / 128;
      const size_t bytes = intranode_buffer_size_hint(R, T, H, 2, S, K);
      const size_t dispatch_record = IntranodeLayout::dispatch_record_bytes(static_cast<size_t>(H) * 2, K, S);
      EXPECT_GE(IntranodeLayout::dispatch_capacity_rows(bytes, dispatch_record), static_cast<int64_t>(R) * T);
      EXPECT_GE(IntranodeLayout::combine_stage_rows(bytes, IntranodeLayout::combine_record_bytes(H, K), R), T);
    }
}

}  // namespace
}  // namespace openep::detail
