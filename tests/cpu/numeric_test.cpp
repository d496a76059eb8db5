// Bit-exact numeric conversions of the CPU reference (BF16, E4M3, per-token FP8 cast, UE8M0).
// Every expected value is written out by hand; comments show the arithmetic.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <openep/reference.hpp>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace openep::ref;

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

std::string invalid_argument_message(const std::function<void()>& call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no std::invalid_argument thrown>";
}

// ---------------------------------------------------------------------------------------------
// BF16
// ---------------------------------------------------------------------------------------------

TEST(ReferenceBf16, ConvertsExactValues) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(float_to_bf16(3.140625f), 0x4049);  // 1.5703125 * 2^1, mantissa 73/128
  EXPECT_EQ(float_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(bf16_to_float(0x4049), 3.140625f);
  EXPECT_EQ(bf16_to_float(0xBF80), -1.0f);
}

TEST(ReferenceBf16, RoundsToNearestEvenOnTies) {
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808000)), 0x3F80);  // exact tie, 0x3F80 is even: down
  EXPECT_EQ(float_to_bf16(from_bits(0x3F818000)), 0x3F82);  // exact tie, 0x3F81 is odd: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3F808001)), 0x3F81);  // just above the tie: up
  EXPECT_EQ(float_to_bf16(from_bits(0x3F807FFF)), 0x3F80);  // just below the tie: down
  EXPECT_EQ(float_to_bf16(from_bits(0xBF818000)), 0xBF82);  // negative tie, magnitude to even
}

TEST(ReferenceBf16, KeepsSubnormalsAndOverflowsToInfinity) {
  EXPECT_EQ(float_to_bf16(from_bits(0x00010000)), 0x0001);  // 2^-133, exact
  EXPECT_EQ(float_to_bf16(from_bits(0x00008000)), 0x0000);  // half of 2^-133: tie to even zero
  EXPECT_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);  // 1.5 * 2^-133: tie to even 2
  EXPECT_EQ(bf16_to_float(0x0001), std::ldexp(1.0f, -133));
  EXPECT_EQ(float_to_bf16(from_bits(0x7F7FFFFF)), 0x7F80);  // FLT_MAX rounds up to +Inf
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
}

TEST(ReferenceBf16, MapsEveryNanToCanonicalQuietNan) {
  // Same as cvt.rn.bf16.f32 on the GPU: sign and payload are not kept.
  EXPECT_EQ(float_to_bf16(from_bits(0x7FC00000)), 0x7FFF);  // quiet NaN
  EXPECT_EQ(float_to_bf16(from_bits(0xFFC00000)), 0x7FFF);  // negative quiet NaN
  EXPECT_EQ(float_to_bf16(from_bits(0x7F800001)), 0x7FFF);  // payload only in dropped bits: still NaN
  EXPECT_EQ(float_to_bf16(from_bits(0x7FA00000)), 0x7FFF);  // signalling NaN
  EXPECT_TRUE(std::isnan(bf16_to_float(0x7FFF)));
}

// ---------------------------------------------------------------------------------------------
// E4M3
// ---------------------------------------------------------------------------------------------

TEST(ReferenceE4m3, ConvertsExactValues) {
  EXPECT_EQ(float_to_e4m3(1.0f), 0x38);  // exponent field 7 (bias 7), mantissa 0
  EXPECT_EQ(float_to_e4m3(-1.0f), 0xB8);
  EXPECT_EQ(float_to_e4m3(2.0f), 0x40);
  EXPECT_EQ(float_to_e4m3(0.5f), 0x30);
  EXPECT_EQ(float_to_e4m3(240.0f), 0x77);  // 1.875 * 2^7
  EXPECT_EQ(float_to_e4m3(256.0f), 0x78);  // exponent field 15
  EXPECT_EQ(float_to_e4m3(448.0f), 0x7E);  // 1.75 * 2^8, largest finite
  EXPECT_EQ(float_to_e4m3(-448.0f), 0xFE);
  EXPECT_EQ(float_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(float_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(float_to_e4m3(0.1f), 0x1D);  // 1.6 * 2^-4 -> mantissa 12.8/8 rounds to 13/8: 1.625 * 2^-4
}

TEST(ReferenceE4m3, SaturatesAboveLargestFinite) {
  EXPECT_EQ(float_to_e4m3(449.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(464.0f), 0x7E);  // tie between 448 and (non-existent) 480
  EXPECT_EQ(float_to_e4m3(500.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(-500.0f), 0xFE);
  EXPECT_EQ(float_to_e4m3(1e30f), 0x7E);
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(float_to_e4m3(-std::numeric_limits<float>::infinity()), 0xFE);
}

TEST(ReferenceE4m3, MapsNanToCanonicalNan) {
  EXPECT_EQ(float_to_e4m3(std::numeric_limits<float>::quiet_NaN()), 0x7F);
  EXPECT_EQ(float_to_e4m3(from_bits(0xFFC00000)), 0x7F);  // negative NaN too
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xFF)));
}

TEST(ReferenceE4m3, RoundsToNearestEvenInNormalRange) {
  EXPECT_EQ(float_to_e4m3(1.0625f), 0x38);  // tie between 1.0 (0x38, even) and 1.125 (0x39)
  EXPECT_EQ(float_to_e4m3(1.1875f), 0x3A);  // tie between 1.125 (0x39) and 1.25 (0x3A, even)
  EXPECT_EQ(float_to_e4m3(17.0f), 0x58);    // tie between 16 (0x58) and 18 (0x59)
  EXPECT_EQ(float_to_e4m3(19.0f), 0x5A);    // tie between 18 (0x59) and 20 (0x5A)
  EXPECT_EQ(float_to_e4m3(424.0f), 0x7D);   // nearest is 416 = 1.625 * 2^8
  EXPECT_EQ(float_to_e4m3(432.0f), 0x7E);   // tie between 416 (0x7D) and 448 (0x7E)
  EXPECT_EQ(float_to_e4m3(440.0f), 0x7E);
  EXPECT_EQ(float_to_e4m3(15.5f), 0x58);  // tie between 15 (0x57) and 16 (0x58): carries into the next binade
}

TEST(ReferenceE4m3, RoundsToNearestEvenInSubnormalRange) {
  const float two_m9 = std::ldexp(1.0f, -9);  // smallest subnormal
  EXPECT_EQ(float_to_e4m3(two_m9), 0x01);
  EXPECT_EQ(float_to_e4m3(7 * two_m9), 0x07);            // largest subnormal
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -6)), 0x08);  // smallest normal
  EXPECT_EQ(float_to_e4m3(7.5f * two_m9), 0x08);         // tie between 0x07 and 0x08 (even)
  EXPECT_EQ(float_to_e4m3(0.5f * two_m9), 0x00);         // tie between 0 and 0x01: zero
  EXPECT_EQ(float_to_e4m3(-0.5f * two_m9), 0x80);        // ... keeping the sign
  EXPECT_EQ(float_to_e4m3(1.5f * two_m9), 0x02);         // tie between 0x01 and 0x02
  EXPECT_EQ(float_to_e4m3(0.5000001f * two_m9), 0x01);   // just above the tie
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -11)), 0x00);
  EXPECT_EQ(float_to_e4m3(from_bits(0x00000001)), 0x00);  // float subnormal
}

TEST(ReferenceE4m3, DecodesKnownCodes) {
  EXPECT_EQ(e4m3_to_float(0x38), 1.0f);
  EXPECT_EQ(e4m3_to_float(0xB8), -1.0f);
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_float(0xFE), -448.0f);
  EXPECT_EQ(e4m3_to_float(0x77), 240.0f);
  EXPECT_EQ(e4m3_to_float(0x01), 0.001953125f);  // 2^-9
  EXPECT_EQ(e4m3_to_float(0x07), 0.013671875f);  // 7 * 2^-9
  EXPECT_EQ(e4m3_to_float(0x08), 0.015625f);     // 2^-6
  EXPECT_EQ(e4m3_to_float(0x00), 0.0f);
  EXPECT_EQ(to_bits(e4m3_to_float(0x80)), 0x80000000u);  // -0.0
}

TEST(ReferenceE4m3, RoundTripsEveryFiniteCode) {
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;  // NaN codes
    EXPECT_EQ(float_to_e4m3(e4m3_to_float(static_cast<uint8_t>(b))), b) << "code " << b;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-token FP8 cast
// ---------------------------------------------------------------------------------------------

// Three 128-channel blocks:
//   block 0: 2.0, 1.0, -0.5, 0.25, bf16(0.3) = 0x3E9A = 0.30078125, then zeros   (amax 2)
//   block 1: -56.0, 7.0, then zeros                                               (amax 56)
//   block 2: all zeros                                                            (amax clamps to 1e-4)
std::vector<uint16_t> three_block_row() {
  std::vector<uint16_t> row(384, 0x0000);
  row[0] = 0x4000;    // 2.0
  row[1] = 0x3F80;    // 1.0
  row[2] = 0xBF00;    // -0.5
  row[3] = 0x3E80;    // 0.25
  row[4] = 0x3E9A;    // 0.30078125
  row[128] = 0xC260;  // -56.0
  row[129] = 0x40E0;  // 7.0
  return row;
}

TEST(ReferenceCastFp8, UsesAmaxOver448WithoutRoundScale) {
  const std::vector<uint16_t> row = three_block_row();
  std::vector<uint8_t> q(384, 0xAA);
  std::vector<float> scales(3, -1.0f);
  cast_row_to_fp8(row.data(), 384, /*round_scale=*/false, q.data(), scales.data());

  EXPECT_EQ(scales[0], 1.0f / 224.0f);   // 2 / 448
  EXPECT_EQ(scales[1], 0.125f);          // 56 / 448, exact
  EXPECT_EQ(scales[2], 1e-4f / 448.0f);  // amax floor
  // Block 0, scale 448 / 2 = 224:
  EXPECT_EQ(q[0], 0x7E);  // 2 * 224 = 448
  EXPECT_EQ(q[1], 0x76);  // 224 = 1.75 * 2^7
  EXPECT_EQ(q[2], 0xEE);  // -112 = -1.75 * 2^6
  EXPECT_EQ(q[3], 0x66);  // 56 = 1.75 * 2^5
  EXPECT_EQ(q[4], 0x68);  // 67.375 = 1.0527 * 2^6 rounds to 64
  EXPECT_EQ(q[5], 0x00);
  // Block 1, scale 8:
  EXPECT_EQ(q[128], 0xFE);  // -448
  EXPECT_EQ(q[129], 0x66);  // 56
  EXPECT_EQ(q[130], 0x00);
  // Block 2 is all zeros.
  for (int c = 256; c < 384; ++c) EXPECT_EQ(q[c], 0x00) << "column " << c;
}

TEST(ReferenceCastFp8, RoundsScaleUpToPowerOfTwoWithRoundScale) {
  const std::vector<uint16_t> row = three_block_row();
  std::vector<uint8_t> q(384, 0xAA);
  std::vector<float> scales(3, -1.0f);
  cast_row_to_fp8(row.data(), 384, /*round_scale=*/true, q.data(), scales.data());

  EXPECT_EQ(scales[0], 0.0078125f);             // 2/448 = 0.00446 -> 2^-7
  EXPECT_EQ(scales[1], 0.125f);                 // 56/448 = 2^-3 exactly: not bumped
  EXPECT_EQ(scales[2], std::ldexp(1.0f, -22));  // 1e-4/448 = 2.23e-7 -> 2^-22 = 2.38e-7
  // Block 0, scale 128:
  EXPECT_EQ(q[0], 0x78);  // 256
  EXPECT_EQ(q[1], 0x70);  // 128
  EXPECT_EQ(q[2], 0xE8);  // -64
  EXPECT_EQ(q[3], 0x60);  // 32
  EXPECT_EQ(q[4], 0x62);  // 38.5 = 1.203 * 2^5 rounds to 1.25 * 2^5 = 40
  // Block 1, scale 8:
  EXPECT_EQ(q[128], 0xFE);
  EXPECT_EQ(q[129], 0x66);
  for (int c = 256; c < 384; ++c) EXPECT_EQ(q[c], 0x00) << "column " << c;
}

TEST(ReferenceCastFp8, RejectsHiddenNotMultipleOf128) {
  std::vector<uint16_t> row(100, 0);
  std::vector<uint8_t> q(100);
  std::vector<float> scales(1);
  const std::string message =
      invalid_argument_message([&] { cast_row_to_fp8(row.data(), 100, false, q.data(), scales.data()); });
  EXPECT_NE(message.find("hidden"), std::string::npos) << message;
  EXPECT_NE(message.find("128"), std::string::npos) << message;
  EXPECT_NE(message.find("100"), std::string::npos) << message;
}

TEST(ReferenceCastFp8, RejectsNonFiniteInput) {
  std::vector<uint16_t> row(128, 0);
  row[5] = 0x7F80;  // +Inf
  std::vector<uint8_t> q(128);
  std::vector<float> scales(1);
  const std::string message =
      invalid_argument_message([&] { cast_row_to_fp8(row.data(), 128, true, q.data(), scales.data()); });
  EXPECT_NE(message.find("x_bf16[5]"), std::string::npos) << message;
}

// ---------------------------------------------------------------------------------------------
// UE8M0
// ---------------------------------------------------------------------------------------------

TEST(ReferenceUe8m0, EncodesBiasedExponent) {
  EXPECT_EQ(float_to_ue8m0(1.0f), 127);
  EXPECT_EQ(float_to_ue8m0(2.0f), 128);
  EXPECT_EQ(float_to_ue8m0(0.125f), 124);
  EXPECT_EQ(float_to_ue8m0(std::ldexp(1.0f, -22)), 105);
  EXPECT_EQ(ue8m0_to_float(127), 1.0f);
  EXPECT_EQ(ue8m0_to_float(120), 0.0078125f);
  EXPECT_EQ(ue8m0_to_float(0), 0.0f);
  EXPECT_TRUE(std::isinf(ue8m0_to_float(255)));
}

TEST(ReferenceUe8m0, PacksFourScalesPerWordLowByteFirst) {
  const std::vector<float> scales = {1.0f, 2.0f, 0.5f, 0.25f, 4.0f, 8.0f, 16.0f, 32.0f};
  std::vector<uint32_t> words(2, 0xDEADBEEF);
  pack_ue8m0(scales.data(), 8, words.data());
  EXPECT_EQ(words[0], 0x7D7E807Fu);  // bytes 127, 128, 126, 125 from low to high
  EXPECT_EQ(words[1], 0x84838281u);  // bytes 129, 130, 131, 132
}

TEST(ReferenceUe8m0, RejectsNonPowerOfTwoAndBadCounts) {
  std::string message = invalid_argument_message([] { float_to_ue8m0(3.0f); });
  EXPECT_NE(message.find("power_of_two"), std::string::npos) << message;
  EXPECT_NE(message.find("3"), std::string::npos) << message;
  message = invalid_argument_message([] { float_to_ue8m0(-1.0f); });
  EXPECT_NE(message.find("power_of_two"), std::string::npos) << message;

  const std::vector<float> scales(6, 1.0f);
  std::vector<uint32_t> words(2);
  message = invalid_argument_message([&] { pack_ue8m0(scales.data(), 6, words.data()); });
  EXPECT_NE(message.find("num_scales"), std::string::npos) << message;
  EXPECT_NE(message.find("6"), std::string::npos) << message;
}

}  // namespace
