// LogFMT-10 (src/protocol/logfmt.hpp, openep::ref::logfmt_encode_row / logfmt_decode_row and
// low_latency_combine(..., use_logfmt = true)): the software log2 / exp2, the division rules on hand-computed
// cases, the byte layout, and the error of the LogFMT combine against the BF16 combine on random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <common/routing.hpp>
#include <openep/reference.hpp>

#include "protocol/logfmt.hpp"

namespace {

namespace lf = openep::detail::logfmt;
using namespace openep::ref;

float bf16(uint16_t b) { return bf16_to_float(b); }
uint16_t to_bf16(float f) { return float_to_bf16(f); }

uint32_t meta_of(const std::vector<uint16_t>& division) {
  uint32_t amax = 0, amin = 0xFFFF;
  for (uint16_t v : division) {
    amax = std::max<uint32_t>(amax, v & 0x7FFF);
    amin = std::min<uint32_t>(amin, v & 0x7FFF);
  }
  return lf::make_meta(amax, amin);
}

// Code of channel i of an encoded division, read back from the documented byte positions.
uint32_t code_at(const uint8_t* division, int i) {
  return division[i] | (((division[128 + i / 4] >> (2 * (i % 4))) & 3u) << 8);
}

// ---- exactly rounded building blocks ----

TEST(LogfmtMath, MultiplyThenAddRoundsTwiceAndNeverFuses) {
  // (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds (tie, even) to 1 + 2^-11; adding -(1 + 2^-11) gives 0. A fused
  // multiply-add would keep the 2^-24.
  const float a = 1.0f + std::ldexp(1.0f, -12);
  EXPECT_EQ(lf::add_rn(lf::mul_rn(a, a), -(1.0f + std::ldexp(1.0f, -11))), 0.0f);
}

TEST(LogfmtMath, Log2IsStrictlyIncreasingAndAccurateOnEveryPositiveFiniteBf16) {
  float previous = -1e30f;
  for (uint32_t b = 1; b < 0x7F80; ++b) {  // subnormals included
    const float x = bf16(static_cast<uint16_t>(b));
    const float l = lf::log2_rn(x);
    ASSERT_GT(l, previous) << "bits 0x" << std::hex << b;
    const double exact = std::log2(static_cast<double>(x));
    ASSERT_LE(std::fabs(l - exact), 3e-7 + std::fabs(exact) * std::ldexp(1.0, -23)) << "bits 0x" << std::hex << b;
    previous = l;
  }
  EXPECT_EQ(lf::log2_rn(0.5f), -1.0f);  // powers of two are exact
  EXPECT_EQ(lf::log2_rn(std::ldexp(1.0f, -133)), -133.0f);
}

TEST(LogfmtMath, Exp2IsAccurateFromSubnormalsToOne) {
  for (double y = -160.0; y <= 1.0; y += 0.000913) {
    const float yf = static_cast<float>(y);
    const double exact = std::exp2(static_cast<double>(yf));
    const float got = lf::exp2_rn(yf);
    if (exact >= std::ldexp(1.0, -126)) {
      ASSERT_LE(std::fabs(got - exact), 3e-7 * exact) << "y = " << yf;
    } else {
      ASSERT_LE(std::fabs(got - exact), std::ldexp(1.0, -149)) << "y = " << yf;  // subnormal: one rounding
    }
  }
  EXPECT_EQ(lf::exp2_rn(-33.0f), std::ldexp(1.0f, -33));  // integers are exact
  EXPECT_EQ(lf::exp2_rn(0.0f), 1.0f);
  EXPECT_EQ(lf::exp2_rn(-200.0f), 0.0f);
}

TEST(LogfmtMath, RhoSeriesMatchesItsClosedForm) {
  // rho = 2 - log2((1 + 2^step) / 2) / step for the steps of divisions of every range (0 < step <= 32 / 510),
  // as division() evaluates it.
  for (uint32_t amin = 0x3E00; amin < 0x3F00; amin += 3) {  // amax 0.5, amin from 0.125 up: narrow ranges
    const lf::Division d = lf::division(lf::make_meta(0x3F00, amin));
    ASSERT_TRUE(d.encoded);
    const double step = d.step;
    ASSERT_NEAR(d.rho, 2.0 - std::log2((1.0 + std::exp2(step)) / 2.0) / step, 2e-7) << "amin 0x" << std::hex << amin;
  }
  // The widest division: amax 0.5, amin 0 -> lmin = -33, step = 32 / 510.
  const lf::Division d = lf::division(lf::make_meta(0x3F00, 0));
  const double step = 32.0 / 510.0;
  EXPECT_NEAR(d.rho, 2.0 - std::log2((1.0 + std::exp2(step)) / 2.0) / step, 2e-7);
}

// ---- divisions, hand-computed ----

TEST(LogfmtDivision, ZeroRowFallsBackToBf16) {
  const std::vector<uint16_t> x(256, 0x0000);
  const LogfmtRow row = logfmt_encode_row(x.data(), 256);
  EXPECT_EQ(row.meta, (std::vector<uint32_t>{0u, 0u}));
  EXPECT_FALSE(lf::encodes(row.meta[0]));
  EXPECT_EQ(row.payload, std::vector<uint8_t>(512, 0));
  EXPECT_EQ(logfmt_decode_row(row, 256), std::vector<float>(256, 0.0f));
}

TEST(LogfmtDivision, AmaxOfOneOrMoreInfAndNanFallBackToBf16Unchanged) {
  for (uint16_t big : {uint16_t{0x3F80}, uint16_t{0xC100}, uint16_t{0x7F80}, uint16_t{0x7FC0}}) {  // 1, -8, Inf, NaN
    std::vector<uint16_t> x(128);
    for (int i = 0; i < 128; ++i) x[i] = to_bf16(0.001f * (i + 1) * (i % 2 ? -1.0f : 1.0f));
    x[77] = big;
    const LogfmtRow row = logfmt_encode_row(x.data(), 128);
    EXPECT_FALSE(lf::encodes(row.meta[0])) << std::hex << big;
    EXPECT_EQ(row.meta[0] & 0xFFFF, static_cast<uint32_t>(big & 0x7FFF));
    std::vector<uint8_t> bytes(256);
    std::memcpy(bytes.data(), x.data(), 256);
    EXPECT_EQ(row.payload, bytes);
    const std::vector<float> y = logfmt_decode_row(row, 128);
    for (int i = 0; i < 128; ++i) {
      if (std::isnan(bf16(x[i]))) {
        EXPECT_TRUE(std::isnan(y[i]));
      } else {
        EXPECT_EQ(y[i], bf16(x[i])) << i;
      }
    }
  }
}

TEST(LogfmtDivision, ConstantDivisionFallsBackToBf16) {
  std::vector<uint16_t> x(128, to_bf16(0.25f));
  for (int i = 0; i < 128; i += 3) x[i] = to_bf16(-0.25f);  // |x| constant: amin == amax
  const LogfmtRow row = logfmt_encode_row(x.data(), 128);
  EXPECT_EQ(row.meta[0], lf::make_meta(0x3E80, 0x3E80));
  EXPECT_FALSE(lf::encodes(row.meta[0]));
  const std::vector<float> y = logfmt_decode_row(row, 128);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(y[i], bf16(x[i]));
}

// amax = 0.5 (log2 -1), amin = 0 -> lmin = -1 - 32 = -33, range 32, step = 32/510, inv = 15.9375 (exact).
TEST(LogfmtDivision, AminZeroClipsToAmaxTimesTwoToMinus32AndDecodesHandComputedValues) {
  std::vector<uint16_t> x(128, 0x0000);
  x[1] = 0x3F00;                              // 0.5 = amax
  x[2] = 0xBF00;                              // -0.5
  x[3] = 0x3E80;                              // 0.25: q = 31 * 15.9375 + rho = 495.557 -> code 495
  x[4] = to_bf16(std::ldexp(1.0f, -33));      // = 2^lmin: q = rho = 1.4946 -> code 1 -> exactly 2^-33
  x[5] = to_bf16(std::ldexp(1.0f, -40));      // below 2^lmin: q < 0 -> code 0 -> 0
  x[6] = to_bf16(-std::ldexp(1.0f, -40));     // negative, below: code 0 with the sign -> +0
  const LogfmtRow row = logfmt_encode_row(x.data(), 128);
  ASSERT_EQ(row.meta[0], lf::make_meta(0x3F00, 0x0000));
  ASSERT_TRUE(lf::encodes(row.meta[0]));
  const lf::Division d = lf::division(row.meta[0]);
  EXPECT_EQ(d.log_amin, -33.0f);
  EXPECT_EQ(d.inv_step, 15.9375f);
  EXPECT_EQ(d.step, 32.0f / 510.0f);
  EXPECT_NEAR(d.rho, 1.494564, 1e-6);  // 1.5 - u/8 + u^3/192, u = step ln2
  const uint8_t* div = row.payload.data();
  EXPECT_EQ(code_at(div, 0), 0u);
  EXPECT_EQ(code_at(div, 1), 511u);
  EXPECT_EQ(code_at(div, 2), 0x200u | 511u);
  EXPECT_EQ(code_at(div, 3), 495u);
  EXPECT_EQ(code_at(div, 4), 1u);
  EXPECT_EQ(code_at(div, 5), 0u);
  EXPECT_EQ(code_at(div, 6), 0x200u);
  EXPECT_EQ(std::vector<uint8_t>(div + 160, div + 256), std::vector<uint8_t>(96, 0));  // never sent
  const std::vector<float> y = logfmt_decode_row(row, 128);
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_NEAR(y[1], 0.5f, 0.5f * 1e-6f);  // the value equal to amax round-trips to amax (within 1e-6)
  EXPECT_EQ(y[2], -y[1]);                  // the sign is kept separately
  EXPECT_NEAR(y[3], std::exp2(494.0 * 32.0 / 510.0 - 33.0), 1e-6);  // 2^((c - 1) step + lmin) = 0.24932
  EXPECT_LE(std::fabs(y[3] - 0.25f), 0.25f * (std::exp2(0.5 * 32.0 / 510.0) - 1.0));  // within half a step
  EXPECT_EQ(y[4], std::ldexp(1.0f, -33));
  EXPECT_EQ(y[5], 0.0f);
  EXPECT_EQ(y[6], 0.0f);
  EXPECT_FALSE(std::signbit(y[6]));
}

TEST(LogfmtDivision, TinyAminIsClippedButALargerAminIsKept) {
  std::vector<uint16_t> x(128, to_bf16(0.125f));
  x[0] = to_bf16(0.5f);
  x[1] = to_bf16(std::ldexp(1.0f, -50));  // amin 2^-50 < 2^(log2 0.5 - 32): clipped to -33
  lf::Division d = lf::division(logfmt_encode_row(x.data(), 128).meta[0]);
  EXPECT_EQ(d.log_amin, -33.0f);
  x[1] = to_bf16(std::ldexp(1.0f, -20));  // kept: lmin = -20, range 19
  const LogfmtRow row = logfmt_encode_row(x.data(), 128);
  d = lf::division(row.meta[0]);
  EXPECT_EQ(d.log_amin, -20.0f);
  EXPECT_EQ(d.step, 19.0f / 510.0f);
  const std::vector<float> y = logfmt_decode_row(row, 128);
  EXPECT_EQ(code_at(row.payload.data(), 1), 1u);
  EXPECT_EQ(y[1], std::ldexp(1.0f, -20));  // code 1 = 2^lmin exactly
  EXPECT_NEAR(y[0], 0.5f, 1e-6f);
}

TEST(LogfmtDivision, NegativeValuesMirrorPositiveOnes) {
  std::vector<uint16_t> x(128), neg(128);
  for (int i = 0; i < 128; ++i) {
    x[i] = to_bf16(0.9f * std::exp2(-0.2f * i));
    neg[i] = x[i] ^ 0x8000;
  }
  const LogfmtRow a = logfmt_encode_row(x.data(), 128), b = logfmt_encode_row(neg.data(), 128);
  EXPECT_EQ(a.meta, b.meta);
  const std::vector<float> ya = logfmt_decode_row(a, 128), yb = logfmt_decode_row(b, 128);
  for (int i = 0; i < 128; ++i) {
    EXPECT_EQ(code_at(b.payload.data(), i), code_at(a.payload.data(), i) | 0x200u) << i;
    EXPECT_EQ(yb[i], -ya[i]) << i;
  }
}

TEST(LogfmtDivision, CodesFollowTheClosedFormAndDecodeWithinHalfAStep) {
  // Random divisions of various dynamic ranges; every code equals floor((log2|x| - lmin) / step + rho) computed in
  // double (except within 1e-2 of a threshold, where the float evaluation may round either way), and every value
  // decodes within a factor 2^(step / 2) of itself, or to 0 / 2^lmin when below 2^lmin.
  std::mt19937 rng(7);
  int checked = 0, encoded = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const float span = std::uniform_real_distribution<float>(2.0f, 45.0f)(rng);
    const float top = std::uniform_real_distribution<float>(-20.0f, -0.01f)(rng);
    std::vector<uint16_t> x(128);
    for (int i = 0; i < 128; ++i) {
      const float l = top - std::uniform_real_distribution<float>(0.0f, span)(rng);
      x[i] = to_bf16((rng() & 1 ? -1.0f : 1.0f) * std::exp2(l));
    }
    if (trial % 5 == 0) x[trial % 128] = 0;
    const LogfmtRow row = logfmt_encode_row(x.data(), 128);
    ASSERT_EQ(row.meta[0], meta_of(x));
    if (!lf::encodes(row.meta[0])) continue;
    ++encoded;
    const lf::Division d = lf::division(row.meta[0]);
    const std::vector<float> y = logfmt_decode_row(row, 128);
    const double step = d.step, lmin = d.log_amin;
    const double rho = 2.0 - std::log2((1.0 + std::exp2(step)) / 2.0) / step;
    for (int i = 0; i < 128; ++i) {
      const double a = std::fabs(static_cast<double>(bf16(x[i])));
      const uint32_t code = code_at(row.payload.data(), i);
      ASSERT_EQ(code >> 9, static_cast<uint32_t>(x[i] >> 15)) << "sign, trial " << trial << " channel " << i;
      if (a == 0) {
        ASSERT_EQ(code & 511u, 0u);
        ASSERT_EQ(y[i], 0.0f);
        continue;
      }
      const double q = (std::log2(a) - lmin) / step + rho;
      const double frac = q - std::floor(q);
      if (frac > 1e-2 && frac < 1 - 1e-2) {
        const double want = q < 1 ? 0 : std::min(511.0, std::floor(q));
        ASSERT_EQ(static_cast<double>(code & 511u), want) << "trial " << trial << " channel " << i;
        ++checked;
      }
      const double err = std::fabs(std::fabs(static_cast<double>(y[i])) - a);
      if (a >= std::exp2(lmin)) {
        ASSERT_LE(err, a * (std::exp2(step / 2) * (1 + 1e-5) - 1)) << "trial " << trial << " channel " << i;
      } else {
        ASSERT_LE(err, std::exp2(lmin) * (1 + 1e-5)) << "trial " << trial << " channel " << i;
      }
      if (y[i] != 0) {
        ASSERT_EQ(std::signbit(y[i]), std::signbit(bf16(x[i])));
      }
    }
  }
  EXPECT_GT(encoded, 250);
  EXPECT_GT(checked, 20000);
}

TEST(LogfmtRow, BytesFollowTheDocumentedPlanesAndDivisionsAreIndependent) {
  // Division 0 encoded, division 1 BF16 (holds 2.0), division 2 encoded with another range.
  std::vector<uint16_t> x(384);
  for (int i = 0; i < 384; ++i) x[i] = to_bf16((i % 3 ? 1.0f : -1.0f) * std::exp2(-1.0f - 0.05f * (i % 128)));
  x[128 + 9] = to_bf16(2.0f);
  const LogfmtRow row = logfmt_encode_row(x.data(), 384);
  ASSERT_EQ(row.meta.size(), 3u);
  EXPECT_TRUE(lf::encodes(row.meta[0]));
  EXPECT_FALSE(lf::encodes(row.meta[1]));
  EXPECT_TRUE(lf::encodes(row.meta[2]));
  for (int j : {0, 2}) {
    const lf::Division d = lf::division(row.meta[j]);
    const uint8_t* div = row.payload.data() + 256 * j;
    for (int i = 0; i < 128; ++i) {
      const uint32_t code = lf::encode(x[128 * j + i], d);
      EXPECT_EQ(div[i], code & 0xFF) << j << " " << i;
      EXPECT_EQ((div[128 + i / 4] >> (2 * (i % 4))) & 3u, code >> 8) << j << " " << i;
    }
  }
  std::vector<uint8_t> bf16_bytes(256);
  std::memcpy(bf16_bytes.data(), x.data() + 128, 256);
  EXPECT_EQ(std::vector<uint8_t>(row.payload.begin() + 256, row.payload.begin() + 512), bf16_bytes);
  // pack_group / code_of_group are inverse on every code.
  uint32_t code[8];
  for (uint32_t base = 0; base < 1024; base += 8) {
    for (int k = 0; k < 8; ++k) code[k] = (base + 131 * k) & 1023u;
    uint32_t lo, hi, high16;
    lf::pack_group(code, lo, hi, high16);
    for (int k = 0; k < 8; ++k) ASSERT_EQ(lf::code_of_group(lo, hi, high16, k), code[k]);
  }
}

TEST(LogfmtRow, RejectsHiddenNotAMultipleOf128) {
  const std::vector<uint16_t> x(200, 0);
  EXPECT_THROW(logfmt_encode_row(x.data(), 200), std::invalid_argument);
  LogfmtRow row;
  row.meta.assign(1, 0);
  row.payload.assign(100, 0);
  EXPECT_THROW(logfmt_decode_row(row, 128), std::invalid_argument);
}

// ---- the LogFMT combine ----

// R = 2, E = 4, K = 3, T = 8, hidden = 256: random routing, expert outputs with per-division dynamic ranges
// (some divisions >= 1 so they travel as BF16).
struct CombineCase {
  LowLatencyConfig cfg;
  std::vector<LowLatencyInput> in;
  std::vector<LowLatencyRecv> recv;
  std::vector<std::vector<uint16_t>> expert;
};

CombineCase combine_case(uint64_t seed, int hidden) {
  CombineCase c;
  c.cfg.num_ranks = 2;
  c.cfg.num_experts = 4;
  c.cfg.hidden = hidden;
  c.cfg.num_topk = 3;
  c.cfg.num_max_dispatch_tokens_per_rank = 8;
  c.cfg.use_fp8 = false;
  std::mt19937 rng(static_cast<uint32_t>(seed));
  c.in.resize(2);
  for (int r = 0; r < 2; ++r) {
    c.in[r].num_tokens = 8;
    c.in[r].x.assign(8 * hidden, 0x3F80);
    c.in[r].topk_idx = openep::test::with_minus_one(openep::test::uniform_routing(8, 3, 4, seed * 3 + r), 0.2,
                                                    seed * 5 + r);
    c.in[r].topk_weights = openep::test::random_weights(8 * 3, seed * 7 + r);
  }
  c.recv = low_latency_dispatch(c.in, c.cfg);
  const size_t rows = 2 * 2 * 8;  // E_local * R * T
  c.expert.assign(2, std::vector<uint16_t>(rows * hidden));
  for (auto& e : c.expert) {
    for (size_t r = 0; r < rows; ++r) {
      for (int j = 0; j < hidden / 128; ++j) {
        const float top = std::uniform_real_distribution<float>(-8.0f, 0.9f)(rng);
        const float span = std::uniform_real_distribution<float>(1.0f, 40.0f)(rng);
        for (int i = 0; i < 128; ++i) {
          const float v = std::exp2(top - std::uniform_real_distribution<float>(0.0f, span)(rng));
          e[r * hidden + 128 * j + i] = to_bf16(rng() % 17 == 0 ? 0.0f : (rng() & 1 ? v : -v));
        }
      }
    }
  }
  return c;
}

TEST(ReferenceLowLatencyLogfmt, CombineSumsTheDecodedRowsInTheBf16Order) {
  const CombineCase c = combine_case(3, 256);
  const std::vector<std::vector<uint16_t>> got = low_latency_combine(c.expert, c.recv, c.in, c.cfg, true);
  // The specification written out: acc = acc + w * decoded(row)[c] over the slots in order, one rounding.
  const int El = 2, P = 16, H = 256, K = 3;
  for (int s = 0; s < 2; ++s) {
    for (int t = 0; t < 8; ++t) {
      std::vector<float> acc(H, 0.0f);
      for (int k = 0; k < K; ++k) {
        const int64_t e = c.in[s].topk_idx[t * K + k];
        if (e < 0) continue;
        const int d = static_cast<int>(e / El), i = static_cast<int>(e % El);
        const int64_t range = c.recv[d].layout_range[i * 2 + s];
        int occurrence = 0;
        for (int k2 = 0; k2 < k; ++k2) occurrence += c.in[s].topk_idx[t * K + k2] == e;
        int64_t row = -1;
        for (int64_t r = range >> 32; r < (range >> 32) + (range & 0xFFFFFFFF); ++r)
          if (c.recv[d].src_info[i * P + r] == t && occurrence-- == 0) {
            row = i * P + r;
            break;
          }
        ASSERT_GE(row, 0);
        const std::vector<float> y =
            logfmt_decode_row(logfmt_encode_row(c.expert[d].data() + row * H, H), H);
        const float w = c.in[s].topk_weights[t * K + k];
        for (int ch = 0; ch < H; ++ch) {
          const float product = lf::mul_rn(w, y[ch]);
          acc[ch] = lf::add_rn(acc[ch], product);
        }
      }
      for (int ch = 0; ch < H; ++ch) ASSERT_EQ(got[s][t * H + ch], to_bf16(acc[ch])) << s << " " << t << " " << ch;
    }
  }
}

TEST(ReferenceLowLatencyLogfmt, CombineStaysWithinTheLogfmtErrorBoundOfTheBf16Combine) {
  // |logfmt - bf16| <= sum_k |w_k| * err_k + the two BF16 roundings (half an ulp each, <= 2^-8 relative) + the
  // float32 rounding of the sums, with err_k the bound of each decoded value (a factor 2^(step/2) for
  // |y| >= 2^lmin, 2^lmin below; exact in BF16 divisions).
  int encoded = 0, fallback = 0, unclipped = 0;
  double worst = 0;
  for (uint64_t seed = 1; seed <= 6; ++seed) {
    const int H = seed % 2 ? 2048 : 384;
    const CombineCase c = combine_case(seed, H);
    const auto lfmt = low_latency_combine(c.expert, c.recv, c.in, c.cfg, true);
    const auto base = low_latency_combine(c.expert, c.recv, c.in, c.cfg, false);
    const int El = 2, P = 16, K = 3;
    for (int s = 0; s < 2; ++s) {
      for (int t = 0; t < 8; ++t) {
        // magnitude: sum of |w y| (float32 sum errors); clip: sum of |w| 2^lmin over encoded divisions
        std::vector<double> bound(H, 0.0), magnitude(H, 0.0), clip(H, 0.0);
        for (int k = 0; k < K; ++k) {
          const int64_t e = c.in[s].topk_idx[t * K + k];
          if (e < 0) continue;
          const int d = static_cast<int>(e / El), i = static_cast<int>(e % El);
          const int64_t range = c.recv[d].layout_range[i * 2 + s];
          int occurrence = 0;
          for (int k2 = 0; k2 < k; ++k2) occurrence += c.in[s].topk_idx[t * K + k2] == e;
          int64_t row = -1;
          for (int64_t r = range >> 32; r < (range >> 32) + (range & 0xFFFFFFFF) && row < 0; ++r)
            if (c.recv[d].src_info[i * P + r] == t && occurrence-- == 0) row = i * P + r;
          ASSERT_GE(row, 0);
          const uint16_t* y = c.expert[d].data() + row * H;
          const LogfmtRow enc = logfmt_encode_row(y, H);
          const double w = std::fabs(c.in[s].topk_weights[t * K + k]);
          for (int ch = 0; ch < H; ++ch) magnitude[ch] += w * std::fabs(bf16(y[ch]));
          for (int j = 0; j < H / 128; ++j) {
            if (!lf::encodes(enc.meta[j])) {
              ++fallback;
              continue;
            }
            ++encoded;
            const lf::Division dv = lf::division(enc.meta[j]);
            for (int ch = 128 * j; ch < 128 * j + 128; ++ch) {
              const double a = std::fabs(bf16(y[ch]));
              clip[ch] += w * std::exp2(dv.log_amin);
              bound[ch] += w * (a >= std::exp2(dv.log_amin) ? a * (std::exp2(dv.step / 2) * (1 + 1e-5) - 1)
                                                              : std::exp2(dv.log_amin) * (1 + 1e-5));
            }
          }
        }
        for (int ch = 0; ch < H; ++ch) {
          const double a = bf16(lfmt[s][t * H + ch]), b = bf16(base[s][t * H + ch]);
          const double tol = bound[ch] * (1 + 1e-5) + std::ldexp(magnitude[ch], -20) +
                             1.01 * std::ldexp(std::max(std::fabs(a), std::fabs(b)), -7) + 1e-37;  // 2 half-ulps
          ASSERT_LE(std::fabs(a - b), tol) << "seed " << seed << " rank " << s << " token " << t << " channel " << ch;
          if (magnitude[ch] > 0 && clip[ch] <= 1e-3 * magnitude[ch]) {  // clipping negligible
            worst = std::max(worst, std::fabs(a - b) / magnitude[ch]);
            ++unclipped;
          }
        }
      }
    }
  }
  EXPECT_GT(encoded, 100);
  EXPECT_GT(fallback, 10);
  // Where clipping is negligible, relative to sum_k |w_k y_k|: at most ~2.2% (the widest step) + 2^-7 (the BF16
  // roundings).
  EXPECT_GT(unclipped, 1000);
  EXPECT_LT(worst, 0.0221 + 1.03 * std::ldexp(1.0, -7)) << "worst |logfmt - bf16| / sum |w y|";
  EXPECT_GT(worst, 0.0);
}

TEST(ReferenceLowLatencyLogfmt, CombineRejectsHiddenNotAMultipleOf128) {
  const CombineCase c = combine_case(1, 200);
  try {
    low_latency_combine(c.expert, c.recv, c.in, c.cfg, true);
    ADD_FAILURE() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("cfg.hidden"), std::string::npos) << e.what();
  }
}

}  // namespace
