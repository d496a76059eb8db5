// OpenEP CPU reference implementation. The contract is documented in openep/reference.hpp; this
// file follows it line by line and favours obviousness over speed.
//
// Compiled with -ffp-contract=off (see CMakeLists.txt): every float expression below rounds after
// each operation, exactly as the header documents (no fused multiply-add).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <limits>
#include <openep/reference.hpp>
#include <sstream>
#include <stdexcept>
#include <string>

#include "protocol/logfmt.hpp"  // the LogFMT format, shared with the kernels (src/protocol/)

namespace openep::ref {
namespace {

constexpr int kRanksPerNode = 8;     // ranks per NVLink domain (DeepEP NUM_MAX_NVL_PEERS)
constexpr int kScaleBlock = 128;     // channels per FP8 scale
constexpr int kScalesPerWord = 4;    // UE8M0 bytes per packed 32-bit word
constexpr float kE4m3Max = 448.0f;   // largest finite float8_e4m3fn
constexpr float kAmaxFloor = 1e-4f;  // lower bound of the per-block amax in the FP8 cast
constexpr int kLogfmtDivision = detail::logfmt::kDivisionChannels;  // channels per LogFMT metadata word

// ---------------------------------------------------------------------------------------------
// Error reporting: std::invalid_argument("openep::ref::<fn>: <argument> expected <x>, got <y>")
// ---------------------------------------------------------------------------------------------

std::string to_text(float v) {
  std::ostringstream os;
  os << std::setprecision(9) << v;
  return os.str();
}
std::string to_text(long long v) { return std::to_string(v); }

[[noreturn]] void fail(const char* fn, const std::string& message) {
  throw std::invalid_argument(std::string("openep::ref::") + fn + ": " + message);
}

void check_eq(const char* fn, const std::string& what, long long expected, long long seen) {
  if (expected != seen) fail(fn, what + " expected " + to_text(expected) + ", got " + to_text(seen));
}

void check_at_least(const char* fn, const std::string& what, long long minimum, long long seen) {
  if (seen < minimum) fail(fn, what + " expected >= " + to_text(minimum) + ", got " + to_text(seen));
}

void check_multiple(
    const char* fn, const std::string& what, long long value, long long divisor, const std::string& divisor_what) {
  if (value % divisor != 0) {
    fail(fn, what + " expected a multiple of " + divisor_what + " (" + to_text(divisor) + "), got " + to_text(value));
  }
}

std::string indexed(const std::string& base, size_t i) { return base + "[" + std::to_string(i) + "]"; }

// Checks a [num_tokens][num_topk] routing matrix: size and every entry in [-1, num_experts).
void check_routing(const char* fn,
                   const std::string& what,
                   const std::vector<int64_t>& topk_idx,
                   int num_tokens,
                   int num_topk,
                   int num_experts) {
  check_eq(fn, what + ".size()", static_cast<long long>(num_tokens) * num_topk,
           static_cast<long long>(topk_idx.size()));
  for (size_t i = 0; i < topk_idx.size(); ++i) {
    const int64_t e = topk_idx[i];
    if (e < -1 || e >= num_experts) {
      fail(fn, what + "[" + std::to_string(i / num_topk) + "][" + std::to_string(i % num_topk) + "] expected in [-1, " +
                   std::to_string(num_experts) + "), got " + std::to_string(e));
    }
  }
}

// Common shape checks of the (num_ranks, num_experts, num_topk) triple.
void check_group(const char* fn, const std::string& prefix, int num_ranks, int num_experts, int num_topk) {
  check_at_least(fn, prefix + "num_ranks", 1, num_ranks);
  check_at_least(fn, prefix + "num_experts", 1, num_experts);
  check_multiple(fn, prefix + "num_experts", num_experts, num_ranks, "num_ranks");
  check_at_least(fn, prefix + "num_topk", 1, num_topk);
}

// ---------------------------------------------------------------------------------------------
// Bit helpers
// ---------------------------------------------------------------------------------------------

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round a non-negative float holding at most 2^23 to an integer, ties to even. Exact: the
// subtraction x - floor(x) is exact for such values.
float round_half_even(float x) {
  const float low = std::floor(x);
  const float diff = x - low;
  if (diff > 0.5f) return low + 1.0f;
  if (diff < 0.5f) return low;
  return std::fmod(low, 2.0f) == 0.0f ? low : low + 1.0f;
}

// Whether token row `topk` (num_topk entries) selects an expert on rank `rank`.
bool token_goes_to(const int64_t* topk, int num_topk, int num_local_experts, int rank) {
  for (int k = 0; k < num_topk; ++k) {
    if (topk[k] >= 0 && topk[k] / num_local_experts == rank) return true;
  }
  return false;
}

int round_up(int value, int alignment) { return (value + alignment - 1) / alignment * alignment; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Numerics
// ---------------------------------------------------------------------------------------------

uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if (std::isnan(f)) return 0x7FFF;  // canonical NaN, as cvt.rn.bf16.f32 produces
  // Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to even; a carry into the
  // exponent is the correct result (next binade, or Inf on overflow).
  const uint32_t lowest_kept_bit = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7FFFu + lowest_kept_bit) >> 16);
}

float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

uint8_t float_to_e4m3(float f) {
  if (std::isnan(f)) return 0x7F;
  const uint8_t sign = (float_bits(f) >> 24) & 0x80u;
  const float a = std::fabs(f);
  // SATFINITE: everything above the largest finite value (also Inf, and the values in (448, 464]
  // that round-to-nearest would also send to 448) becomes 448.
  if (a > kE4m3Max) return sign | 0x7E;
  if (a < 0x1p-6f) {
    // Subnormal range: the representable values are m * 2^-9, m = 0..7, and m = 8 is the smallest
    // normal 2^-6 whose encoding happens to be 0x08 as well. a * 512 is exact.
    return sign | static_cast<uint8_t>(round_half_even(a * 512.0f));
  }
  int frexp_exp = 0;
  std::frexp(a, &frexp_exp);                         // a = m * 2^frexp_exp with m in [0.5, 1)
  int exponent = frexp_exp - 1;                      // a in [2^exponent, 2^(exponent+1)), exponent in [-6, 8]
  const float scaled = std::ldexp(a, 3 - exponent);  // in [8, 16): 1.mmm scaled by 8, exact
  int mantissa = static_cast<int>(round_half_even(scaled)) - 8;
  if (mantissa == 8) {  // rounded up into the next binade
    mantissa = 0;
    exponent += 1;
  }
  const int code = ((exponent + 7) << 3) | mantissa;
  return sign | static_cast<uint8_t>(std::min(code, 0x7E));  // a <= 448 keeps code <= 0x7E; min is a guard
}

float e4m3_to_float(uint8_t b) {
  const int exponent = (b >> 3) & 0xF;
  const int mantissa = b & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
  return (b & 0x80) ? -magnitude : magnitude;
}

void cast_row_to_fp8(const uint16_t* x_bf16, int hidden, bool round_scale, uint8_t* out, float* scales) {
  const char* fn = "cast_row_to_fp8";
  check_at_least(fn, "hidden", 1, hidden);
  check_multiple(fn, "hidden", hidden, kScaleBlock, "the scale block");
  if (x_bf16 == nullptr || out == nullptr || scales == nullptr) fail(fn, "x_bf16, out and scales must be non-null");
  for (int c = 0; c < hidden; ++c) {
    const float v = bf16_to_float(x_bf16[c]);
    if (!std::isfinite(v)) fail(fn, "x_bf16[" + std::to_string(c) + "] expected finite, got " + to_text(v));
  }
  for (int block = 0; block < hidden / kScaleBlock; ++block) {
    const uint16_t* x = x_bf16 + block * kScaleBlock;
    float amax = kAmaxFloor;
    for (int c = 0; c < kScaleBlock; ++c) amax = std::max(amax, std::fabs(bf16_to_float(x[c])));

    float scale = 0.0f;
    float scale_inv = 0.0f;
    if (!round_scale) {
      scale_inv = amax / kE4m3Max;
      scale = kE4m3Max / amax;
    } else {
      // Smallest power of two >= amax / 448: keep the exponent if the mantissa is zero, else bump it.
      // amax >= 1e-4 keeps the quotient a normal float, and a finite amax keeps the bump below Inf.
      const uint32_t v = float_bits(amax / kE4m3Max);
      const uint32_t exponent_field = ((v >> 23) & 0xFFu) + ((v & 0x7FFFFFu) != 0 ? 1u : 0u);
      scale_inv = bits_float(exponent_field << 23);
      scale = 1.0f / scale_inv;
    }
    for (int c = 0; c < kScaleBlock; ++c) {
      out[block * kScaleBlock + c] = float_to_e4m3(bf16_to_float(x[c]) * scale);
    }
    scales[block] = scale_inv;
  }
}

uint8_t float_to_ue8m0(float power_of_two) {
  const uint32_t u = float_bits(power_of_two);
  const uint32_t exponent_field = (u >> 23) & 0xFFu;
  if ((u >> 31) != 0 || (u & 0x7FFFFFu) != 0 || exponent_field == 0 || exponent_field == 0xFF) {
    fail("float_to_ue8m0", "power_of_two expected a positive normal power of two, got " + to_text(power_of_two));
  }
  return static_cast<uint8_t>(exponent_field);
}

float ue8m0_to_float(uint8_t b) { return bits_float(static_cast<uint32_t>(b) << 23); }

void pack_ue8m0(const float* scales, int num_scales, uint32_t* out) {
  const char* fn = "pack_ue8m0";
  check_at_least(fn, "num_scales", 0, num_scales);
  check_multiple(fn, "num_scales", num_scales, kScalesPerWord, "scales per word");
  if (num_scales > 0 && (scales == nullptr || out == nullptr)) fail(fn, "scales and out must be non-null");
  for (int p = 0; p < num_scales / kScalesPerWord; ++p) {
    uint32_t word = 0;
    for (int k = 0; k < kScalesPerWord; ++k) {
      word |= static_cast<uint32_t>(float_to_ue8m0(scales[p * kScalesPerWord + k])) << (8 * k);
    }
    out[p] = word;
  }
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

namespace {

// Checks a node size: 1 <= ranks_per_node <= 8 and num_ranks % ranks_per_node == 0.
void check_ranks_per_node(const char* fn, const std::string& ranks_what, int num_ranks, int ranks_per_node) {
  if (ranks_per_node < 1 || ranks_per_node > kRanksPerNode) {
    fail(fn, "ranks_per_node expected in [1, " + std::to_string(kRanksPerNode) + "], got " +
                 std::to_string(ranks_per_node));
  }
  check_multiple(fn, ranks_what, num_ranks, ranks_per_node, "ranks_per_node");
}

// The layout of validated arguments; nodes of ranks_per_node consecutive ranks (>= 1, divides R).
Layout compute_layout(
    const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
    int ranks_per_node) {
  const int num_local_experts = num_experts / num_ranks;
  const int num_nodes = num_ranks / ranks_per_node > 1 ? num_ranks / ranks_per_node : 0;  // 0: one node, no counts
  Layout layout;
  layout.num_tokens_per_rank.assign(num_ranks, 0);
  layout.num_tokens_per_rdma_rank.assign(num_nodes, 0);
  layout.num_tokens_per_expert.assign(num_experts, 0);
  layout.is_token_in_rank.assign(static_cast<size_t>(num_tokens) * num_ranks, 0);

  for (int t = 0; t < num_tokens; ++t) {
    const int64_t* topk = topk_idx.data() + static_cast<size_t>(t) * num_topk;
    std::vector<bool> in_node(num_nodes, false);
    for (int k = 0; k < num_topk; ++k) {
      if (topk[k] < 0) continue;
      layout.num_tokens_per_expert[topk[k]] += 1;
      const int rank = static_cast<int>(topk[k] / num_local_experts);
      layout.is_token_in_rank[static_cast<size_t>(t) * num_ranks + rank] = 1;
      if (num_nodes > 0) in_node[rank / ranks_per_node] = true;
    }
    for (int r = 0; r < num_ranks; ++r) layout.num_tokens_per_rank[r] += layout.is_token_in_rank[t * num_ranks + r];
    for (int n = 0; n < num_nodes; ++n) layout.num_tokens_per_rdma_rank[n] += in_node[n] ? 1 : 0;
  }
  return layout;
}

}  // namespace

Layout get_dispatch_layout(
    const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks) {
  const char* fn = "get_dispatch_layout";
  check_at_least(fn, "num_tokens", 0, num_tokens);
  check_group(fn, "", num_ranks, num_experts, num_topk);
  if (num_ranks > kRanksPerNode) check_multiple(fn, "num_ranks (> 8)", num_ranks, kRanksPerNode, "ranks per node");
  check_routing(fn, "topk_idx", topk_idx, num_tokens, num_topk, num_experts);
  // DeepEP's rule: nodes of 8 ranks; R <= 8 is a single node.
  return compute_layout(topk_idx, num_tokens, num_topk, num_experts, num_ranks, std::min(num_ranks, kRanksPerNode));
}

Layout get_dispatch_layout(const std::vector<int64_t>& topk_idx,
                           int num_tokens,
                           int num_topk,
                           int num_experts,
                           int num_ranks,
                           int ranks_per_node) {
  const char* fn = "get_dispatch_layout";
  check_at_least(fn, "num_tokens", 0, num_tokens);
  check_group(fn, "", num_ranks, num_experts, num_topk);
  check_ranks_per_node(fn, "num_ranks", num_ranks, ranks_per_node);
  check_routing(fn, "topk_idx", topk_idx, num_tokens, num_topk, num_experts);
  return compute_layout(topk_idx, num_tokens, num_topk, num_experts, num_ranks, ranks_per_node);
}

// ---------------------------------------------------------------------------------------------
// Normal dispatch / combine
// ---------------------------------------------------------------------------------------------

namespace {

void check_normal_config(const char* fn, const NormalConfig& cfg) {
  check_group(fn, "cfg.", cfg.num_ranks, cfg.num_experts, cfg.num_topk);
  check_at_least(fn, "cfg.hidden", 1, cfg.hidden);
  check_at_least(fn, "cfg.elem_bytes", 1, cfg.elem_bytes);
  check_at_least(fn, "cfg.num_scales", 0, cfg.num_scales);
  if (cfg.num_scales > 0) check_eq(fn, "cfg.elem_bytes (with cfg.num_scales > 0)", 1, cfg.elem_bytes);
  check_at_least(fn, "cfg.expert_alignment", 1, cfg.expert_alignment);
}

void check_rank_inputs(const char* fn,
                       const std::vector<RankInput>& inputs,
                       const NormalConfig& cfg,
                       const std::string& name) {
  check_eq(fn, name + ".size() (cfg.num_ranks)", cfg.num_ranks, static_cast<long long>(inputs.size()));
  const long long row_bytes = static_cast<long long>(cfg.hidden) * cfg.elem_bytes;
  for (size_t s = 0; s < inputs.size(); ++s) {
    const RankInput& in = inputs[s];
    const std::string rank = indexed(name, s);
    check_at_least(fn, rank + ".num_tokens", 0, in.num_tokens);
    check_eq(fn, rank + ".x.size()", in.num_tokens * row_bytes, static_cast<long long>(in.x.size()));
    check_eq(fn, rank + ".x_scales.size()", static_cast<long long>(in.num_tokens) * cfg.num_scales,
             static_cast<long long>(in.x_scales.size()));
    check_routing(fn, rank + ".topk_idx", in.topk_idx, in.num_tokens, cfg.num_topk, cfg.num_experts);
    if (cfg.with_topk) {
      check_eq(fn, rank + ".topk_weights.size()", static_cast<long long>(in.num_tokens) * cfg.num_topk,
               static_cast<long long>(in.topk_weights.size()));
    }
  }
}

}  // namespace

std::vector<RankRecv> dispatch(const std::vector<RankInput>& inputs, const NormalConfig& cfg) {
  const char* fn = "dispatch";
  check_normal_config(fn, cfg);
  check_rank_inputs(fn, inputs, cfg, "inputs");

  const int num_ranks = cfg.num_ranks;
  const int num_topk = cfg.num_topk;
  const int num_local_experts = cfg.num_experts / num_ranks;
  const size_t row_bytes = static_cast<size_t>(cfg.hidden) * cfg.elem_bytes;
  const size_t num_scales = static_cast<size_t>(cfg.num_scales);

  std::vector<RankRecv> recv(num_ranks);
  for (int s = 0; s < num_ranks; ++s)
    recv[s].send_pos.assign(static_cast<size_t>(inputs[s].num_tokens) * num_ranks, -1);

  for (int d = 0; d < num_ranks; ++d) {
    RankRecv& out = recv[d];
    size_t num_rows = 0;  // only to reserve memory up front
    for (const RankInput& in : inputs) {
      for (int t = 0; t < in.num_tokens; ++t) {
        num_rows +=
            token_goes_to(in.topk_idx.data() + static_cast<size_t>(t) * num_topk, num_topk, num_local_experts, d);
      }
    }
    out.x.reserve(num_rows * row_bytes);
    out.x_scales.reserve(num_rows * num_scales);
    out.num_recv_from_rank.assign(num_ranks, 0);
    out.rank_prefix.assign(num_ranks, 0);
    out.num_recv_tokens_per_expert.assign(num_local_experts, 0);
    // Receive order: source rank ascending, then source token ascending.
    for (int s = 0; s < num_ranks; ++s) {
      const RankInput& in = inputs[s];
      for (int t = 0; t < in.num_tokens; ++t) {
        const size_t slot0 = static_cast<size_t>(t) * num_topk;
        const int64_t* topk = in.topk_idx.data() + slot0;
        if (!token_goes_to(topk, num_topk, num_local_experts, d)) continue;

        const int row = out.num_recv_tokens++;
        recv[s].send_pos[static_cast<size_t>(t) * num_ranks + d] = row;
        out.src_rank.push_back(s);
        out.src_idx.push_back(t);
        out.num_recv_from_rank[s] += 1;
        out.x.insert(out.x.end(), in.x.begin() + t * row_bytes, in.x.begin() + (t + 1) * row_bytes);
        out.x_scales.insert(out.x_scales.end(), in.x_scales.begin() + t * num_scales,
                            in.x_scales.begin() + (t + 1) * num_scales);
        for (int k = 0; k < num_topk; ++k) {
          const bool local = topk[k] >= 0 && topk[k] / num_local_experts == d;
          if (local) out.num_recv_tokens_per_expert[topk[k] - static_cast<int64_t>(d) * num_local_experts] += 1;
          if (cfg.with_topk) {
            out.topk_idx.push_back(local ? topk[k] - static_cast<int64_t>(d) * num_local_experts : -1);
            out.topk_weights.push_back(local ? in.topk_weights[slot0 + k] : 0.0f);
          }
        }
      }
    }
    int running = 0;
    for (int s = 0; s < num_ranks; ++s) {
      running += out.num_recv_from_rank[s];
      out.rank_prefix[s] = running;
    }
    for (int& count : out.num_recv_tokens_per_expert) count = round_up(count, cfg.expert_alignment);
  }
  return recv;
}

namespace {

// combine's argument checks (shared with combine_internode).
void check_combine_args(const char* fn,
                        const std::vector<CombineInput>& inputs,
                        const std::vector<RankRecv>& dispatched,
                        const std::vector<RankInput>& original,
                        const NormalConfig& cfg,
                        const std::vector<std::vector<uint16_t>>& bias0,
                        const std::vector<std::vector<uint16_t>>& bias1) {
  check_group(fn, "cfg.", cfg.num_ranks, cfg.num_experts, cfg.num_topk);
  check_at_least(fn, "cfg.hidden", 1, cfg.hidden);
  const int num_ranks = cfg.num_ranks;
  const int num_topk = cfg.num_topk;

  check_eq(fn, "original.size() (cfg.num_ranks)", num_ranks, static_cast<long long>(original.size()));
  check_eq(fn, "dispatched.size() (cfg.num_ranks)", num_ranks, static_cast<long long>(dispatched.size()));
  check_eq(fn, "inputs.size() (cfg.num_ranks)", num_ranks, static_cast<long long>(inputs.size()));
  for (int d = 0; d < num_ranks; ++d) {
    const long long num_recv = dispatched[d].num_recv_tokens;
    check_eq(fn, indexed("inputs", d) + ".x.size()", num_recv * cfg.hidden, static_cast<long long>(inputs[d].x.size()));
    check_eq(fn, indexed("inputs", d) + ".topk_weights.size()", cfg.with_topk ? num_recv * num_topk : 0,
             static_cast<long long>(inputs[d].topk_weights.size()));
  }
  for (int s = 0; s < num_ranks; ++s) {
    check_at_least(fn, indexed("original", s) + ".num_tokens", 0, original[s].num_tokens);
    const std::vector<int>& send_pos = dispatched[s].send_pos;
    check_eq(fn, indexed("dispatched", s) + ".send_pos.size()",
             static_cast<long long>(original[s].num_tokens) * num_ranks, static_cast<long long>(send_pos.size()));
    for (size_t i = 0; i < send_pos.size(); ++i) {
      const int d = static_cast<int>(i % num_ranks);
      if (send_pos[i] < -1 || send_pos[i] >= dispatched[d].num_recv_tokens) {
        fail(fn, indexed("dispatched", s) + ".send_pos[" + std::to_string(i / num_ranks) + "][" + std::to_string(d) +
                     "] expected in [-1, " + std::to_string(dispatched[d].num_recv_tokens) + "), got " +
                     std::to_string(send_pos[i]));
      }
    }
  }
  for (const auto* bias : {&bias0, &bias1}) {
    const std::string name = bias == &bias0 ? "bias0" : "bias1";
    if (bias->empty()) continue;
    check_eq(fn, name + ".size() (cfg.num_ranks, or 0 for no bias)", num_ranks, static_cast<long long>(bias->size()));
    for (int s = 0; s < num_ranks; ++s) {
      check_eq(fn, indexed(name, s) + ".size()", static_cast<long long>(original[s].num_tokens) * cfg.hidden,
               static_cast<long long>((*bias)[s].size()));
    }
  }
}

}  // namespace

namespace {
// The end of every normal-mode combine row: acc (float32, one per column) += bias0 row, then += bias1 row (row t of
// source rank s, where given), then each column rounded once to BF16 into out.
void add_biases_and_round(std::vector<float>& acc, const std::vector<std::vector<uint16_t>>& bias0,
                          const std::vector<std::vector<uint16_t>>& bias1, int s, int t, uint16_t* out) {
  const size_t hidden = acc.size();
  for (const auto* bias : {&bias0, &bias1}) {
    if (bias->empty()) continue;
    const uint16_t* row = (*bias)[s].data() + static_cast<size_t>(t) * hidden;
    for (size_t c = 0; c < hidden; ++c) acc[c] += bf16_to_float(row[c]);
  }
  for (size_t c = 0; c < hidden; ++c) out[c] = float_to_bf16(acc[c]);
}
}  // namespace

std::vector<CombineOutput> combine(const std::vector<CombineInput>& inputs,
                                   const std::vector<RankRecv>& dispatched,
                                   const std::vector<RankInput>& original,
                                   const NormalConfig& cfg,
                                   const std::vector<std::vector<uint16_t>>& bias0,
                                   const std::vector<std::vector<uint16_t>>& bias1) {
  check_combine_args("combine", inputs, dispatched, original, cfg, bias0, bias1);
  const int num_ranks = cfg.num_ranks;
  const int num_topk = cfg.num_topk;
  const size_t hidden = static_cast<size_t>(cfg.hidden);

  std::vector<CombineOutput> out(num_ranks);
  for (int s = 0; s < num_ranks; ++s) {
    const int num_tokens = original[s].num_tokens;
    out[s].x.assign(static_cast<size_t>(num_tokens) * hidden, 0);
    if (cfg.with_topk) out[s].topk_weights.assign(static_cast<size_t>(num_tokens) * num_topk, 0.0f);
    for (int t = 0; t < num_tokens; ++t) {
      const int* pos = dispatched[s].send_pos.data() + static_cast<size_t>(t) * num_ranks;
      // One float32 accumulator per column; the adds for every column happen in the documented
      // order (ranks ascending, then bias0, then bias1).
      std::vector<float> acc(hidden, 0.0f);
      for (int d = 0; d < num_ranks; ++d) {
        if (pos[d] < 0) continue;
        const uint16_t* row = inputs[d].x.data() + pos[d] * hidden;
        for (size_t c = 0; c < hidden; ++c) acc[c] += bf16_to_float(row[c]);
      }
      add_biases_and_round(acc, bias0, bias1, s, t, out[s].x.data() + t * hidden);
      if (!cfg.with_topk) continue;
      for (int k = 0; k < num_topk; ++k) {
        float acc = 0.0f;
        for (int d = 0; d < num_ranks; ++d) {
          if (pos[d] >= 0) acc += inputs[d].topk_weights[static_cast<size_t>(pos[d]) * num_topk + k];
        }
        out[s].topk_weights[static_cast<size_t>(t) * num_topk + k] = acc;
      }
    }
  }
  return out;
}

std::vector<CombineOutput> combine_internode(const std::vector<CombineInput>& inputs,
                                             const std::vector<RankRecv>& dispatched,
                                             const std::vector<RankInput>& original,
                                             const NormalConfig& cfg,
                                             int ranks_per_node,
                                             const std::vector<std::vector<uint16_t>>& bias0,
                                             const std::vector<std::vector<uint16_t>>& bias1) {
  const char* fn = "combine_internode";
  check_combine_args(fn, inputs, dispatched, original, cfg, bias0, bias1);
  check_ranks_per_node(fn, "cfg.num_ranks", cfg.num_ranks, ranks_per_node);
  const int num_ranks = cfg.num_ranks;
  const int num_topk = cfg.num_topk;
  const int num_nodes = num_ranks / ranks_per_node;
  const size_t hidden = static_cast<size_t>(cfg.hidden);

  std::vector<CombineOutput> out(num_ranks);
  for (int s = 0; s < num_ranks; ++s) {
    const int num_tokens = original[s].num_tokens;
    out[s].x.assign(static_cast<size_t>(num_tokens) * hidden, 0);
    if (cfg.with_topk) out[s].topk_weights.assign(static_cast<size_t>(num_tokens) * num_topk, 0.0f);
    for (int t = 0; t < num_tokens; ++t) {
      const int* pos = dispatched[s].send_pos.data() + static_cast<size_t>(t) * num_ranks;
      std::vector<bool> node_used(num_nodes, false);  // token t went to at least one rank of the node
      for (int d = 0; d < num_ranks; ++d) {
        if (pos[d] >= 0) node_used[d / ranks_per_node] = true;
      }
      // One float32 accumulator per column: nodes ascending (each adding its BF16-rounded partial),
      // then bias0, then bias1.
      std::vector<float> acc(hidden, 0.0f);
      std::vector<float> partial(hidden);
      for (int m = 0; m < num_nodes; ++m) {
        if (!node_used[m]) continue;
        std::fill(partial.begin(), partial.end(), 0.0f);
        for (int d = m * ranks_per_node; d < (m + 1) * ranks_per_node; ++d) {
          if (pos[d] < 0) continue;
          const uint16_t* row = inputs[d].x.data() + pos[d] * hidden;
          for (size_t c = 0; c < hidden; ++c) partial[c] += bf16_to_float(row[c]);
        }
        for (size_t c = 0; c < hidden; ++c) acc[c] += bf16_to_float(float_to_bf16(partial[c]));
      }
      add_biases_and_round(acc, bias0, bias1, s, t, out[s].x.data() + t * hidden);
      if (!cfg.with_topk) continue;
      for (int k = 0; k < num_topk; ++k) {
        float total = 0.0f;
        for (int m = 0; m < num_nodes; ++m) {
          if (!node_used[m]) continue;
          float node_weight = 0.0f;  // float32, not rounded: weights travel as float32
          for (int d = m * ranks_per_node; d < (m + 1) * ranks_per_node; ++d) {
            if (pos[d] >= 0) node_weight += inputs[d].topk_weights[static_cast<size_t>(pos[d]) * num_topk + k];
          }
          total += node_weight;
        }
        out[s].topk_weights[static_cast<size_t>(t) * num_topk + k] = total;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Low-latency dispatch / combine
// ---------------------------------------------------------------------------------------------

namespace {

void check_low_latency_config(const char* fn, const LowLatencyConfig& cfg) {
  check_group(fn, "cfg.", cfg.num_ranks, cfg.num_experts, cfg.num_topk);
  check_at_least(fn, "cfg.hidden", 1, cfg.hidden);
  check_at_least(fn, "cfg.num_max_dispatch_tokens_per_rank", 1, cfg.num_max_dispatch_tokens_per_rank);
  if (cfg.use_ue8m0 && !cfg.round_scale)
    fail(fn, "cfg.use_ue8m0 expected only with cfg.round_scale, got round_scale false");
  if (cfg.use_fp8) check_multiple(fn, "cfg.hidden (use_fp8)", cfg.hidden, kScaleBlock, "the scale block");
  if (cfg.use_fp8 && cfg.use_ue8m0) {
    check_multiple(fn, "cfg.hidden (use_ue8m0)", cfg.hidden, kScaleBlock * kScalesPerWord, "4 scale blocks");
  }
}

void check_low_latency_inputs(const char* fn,
                              const std::vector<LowLatencyInput>& inputs,
                              const LowLatencyConfig& cfg,
                              bool need_weights) {
  check_eq(fn, "inputs.size() (cfg.num_ranks)", cfg.num_ranks, static_cast<long long>(inputs.size()));
  const int capacity = cfg.num_max_dispatch_tokens_per_rank;
  for (size_t s = 0; s < inputs.size(); ++s) {
    const LowLatencyInput& in = inputs[s];
    const std::string rank = indexed("inputs", s);
    check_at_least(fn, rank + ".num_tokens", 0, in.num_tokens);
    if (in.num_tokens > capacity) {
      fail(fn, rank + ".num_tokens expected <= cfg.num_max_dispatch_tokens_per_rank (" + std::to_string(capacity) +
                   "), got " + std::to_string(in.num_tokens));
    }
    check_eq(fn, rank + ".x.size()", static_cast<long long>(in.num_tokens) * cfg.hidden,
             static_cast<long long>(in.x.size()));
    check_routing(fn, rank + ".topk_idx", in.topk_idx, in.num_tokens, cfg.num_topk, cfg.num_experts);
    if (need_weights) {
      check_eq(fn, rank + ".topk_weights.size()", static_cast<long long>(in.num_tokens) * cfg.num_topk,
               static_cast<long long>(in.topk_weights.size()));
    }
    // A slot gets one of the T receive slots of (expert, source rank); only duplicates can overflow.
    std::vector<int> rows_per_expert(cfg.num_experts, 0);
    for (int64_t e : in.topk_idx) {
      if (e >= 0 && ++rows_per_expert[e] > capacity) {
        fail(fn, rank + ".topk_idx sends expected <= cfg.num_max_dispatch_tokens_per_rank (" +
                     std::to_string(capacity) + ") rows to expert " + std::to_string(e) +
                     ", got more (duplicate slots)");
      }
    }
  }
}

}  // namespace

std::vector<LowLatencyRecv> low_latency_dispatch(const std::vector<LowLatencyInput>& inputs,
                                                 const LowLatencyConfig& cfg) {
  const char* fn = "low_latency_dispatch";
  check_low_latency_config(fn, cfg);
  check_low_latency_inputs(fn, inputs, cfg, /*need_weights=*/false);

  const int num_ranks = cfg.num_ranks;
  const int num_topk = cfg.num_topk;
  const int num_local_experts = cfg.num_experts / num_ranks;
  const size_t capacity = static_cast<size_t>(num_ranks) * cfg.num_max_dispatch_tokens_per_rank;  // P = R * T
  const size_t hidden = static_cast<size_t>(cfg.hidden);
  const size_t row_bytes = hidden * (cfg.use_fp8 ? 1 : 2);
  const size_t num_scales = cfg.use_fp8 ? hidden / kScaleBlock : 0;  // floats per row
  const size_t num_scale_words = cfg.use_fp8 && cfg.use_ue8m0 ? num_scales / kScalesPerWord : 0;
  const bool float_scales = cfg.use_fp8 && !cfg.use_ue8m0;

  // Every source token's message payload, computed once (all copies of a token are identical).
  std::vector<std::vector<uint8_t>> payload(num_ranks);       // [R][N][row_bytes]
  std::vector<std::vector<float>> scales(num_ranks);          // [R][N][num_scales]
  std::vector<std::vector<uint32_t>> scale_words(num_ranks);  // [R][N][num_scale_words]
  for (int s = 0; s < num_ranks; ++s) {
    const LowLatencyInput& in = inputs[s];
    payload[s].resize(in.num_tokens * row_bytes);
    scales[s].resize(in.num_tokens * num_scales);
    scale_words[s].resize(in.num_tokens * num_scale_words);
    for (int t = 0; t < in.num_tokens; ++t) {
      const uint16_t* x = in.x.data() + t * hidden;
      if (cfg.use_fp8) {
        for (size_t c = 0; c < hidden; ++c) {
          if (!std::isfinite(bf16_to_float(x[c]))) {
            fail(fn, indexed("inputs", s) + ".x[" + std::to_string(t) + "][" + std::to_string(c) +
                         "] expected finite (use_fp8), got " + to_text(bf16_to_float(x[c])));
          }
        }
        cast_row_to_fp8(x, cfg.hidden, cfg.round_scale, payload[s].data() + t * row_bytes,
                        scales[s].data() + t * num_scales);
        if (cfg.use_ue8m0) {
          pack_ue8m0(scales[s].data() + t * num_scales, static_cast<int>(num_scales),
                     scale_words[s].data() + t * num_scale_words);
        }
      } else {
        std::memcpy(payload[s].data() + t * row_bytes, x, row_bytes);  // little-endian BF16 bytes
      }
    }
  }

  std::vector<LowLatencyRecv> recv(num_ranks);
  for (int d = 0; d < num_ranks; ++d) {
    LowLatencyRecv& out = recv[d];
    out.count.assign(num_local_experts, 0);
    out.packed_x.assign(num_local_experts * capacity * row_bytes, 0);
    if (float_scales) out.packed_scales.assign(num_local_experts * capacity * num_scales, 0.0f);
    out.packed_scales_ue8m0.assign(num_local_experts * capacity * num_scale_words, 0);
    out.src_info.assign(num_local_experts * capacity, -1);
    out.layout_range.assign(static_cast<size_t>(num_local_experts) * num_ranks, 0);

    for (int i = 0; i < num_local_experts; ++i) {
      const int64_t expert = static_cast<int64_t>(d) * num_local_experts + i;
      size_t row = 0;  // next free row of local expert i
      for (int s = 0; s < num_ranks; ++s) {
        const size_t start = row;
        for (int t = 0; t < inputs[s].num_tokens; ++t) {
          for (int k = 0; k < num_topk; ++k) {
            if (inputs[s].topk_idx[static_cast<size_t>(t) * num_topk + k] != expert) continue;
            const size_t dst = i * capacity + row;  // row index in [E_local][P]
            std::memcpy(out.packed_x.data() + dst * row_bytes, payload[s].data() + t * row_bytes, row_bytes);
            if (float_scales) {
              std::copy_n(scales[s].data() + t * num_scales, num_scales, out.packed_scales.data() + dst * num_scales);
            }
            std::copy_n(scale_words[s].data() + t * num_scale_words, num_scale_words,
                        out.packed_scales_ue8m0.data() + dst * num_scale_words);
            out.src_info[dst] = t;
            ++row;
          }
        }
        out.layout_range[static_cast<size_t>(i) * num_ranks + s] =
            (static_cast<int64_t>(start) << 32) | static_cast<int64_t>(row - start);
      }
      out.count[i] = static_cast<int>(row);
    }
  }
  return recv;
}

std::vector<LowLatencyInput> mask_ranks(const std::vector<LowLatencyInput>& inputs, const LowLatencyConfig& cfg,
                                        const std::vector<int>& masked) {
  const int R = cfg.num_ranks;
  check_eq("mask_ranks", "inputs.size()", R, static_cast<long long>(inputs.size()));
  check_at_least("mask_ranks", "num_ranks", 1, R);
  check_eq("mask_ranks", "num_experts % num_ranks", 0, cfg.num_experts % R);
  std::vector<char> is_masked(R, 0);
  for (int r : masked) {
    if (r < 0 || r >= R) fail("mask_ranks", "masked rank expected in [0, " + to_text(static_cast<long long>(R)) +
                                                "), got " + to_text(static_cast<long long>(r)));
    is_masked[r] = 1;
  }
  const int El = cfg.num_experts / R;
  std::vector<LowLatencyInput> out = inputs;
  for (int r = 0; r < R; ++r) {
    if (is_masked[r]) {
      out[r] = LowLatencyInput{};
      continue;
    }
    for (int64_t& e : out[r].topk_idx)
      if (e >= 0 && is_masked[static_cast<int>(e / El)]) e = -1;
  }
  return out;
}

std::vector<std::vector<uint16_t>> low_latency_combine(const std::vector<std::vector<uint16_t>>& expert_out,
                                                       const std::vector<LowLatencyRecv>& recv,
                                                       const std::vector<LowLatencyInput>& inputs,
                                                       const LowLatencyConfig& cfg,
                                                       bool use_logfmt) {
  const char* fn = "low_latency_combine";
  check_low_latency_config(fn, cfg);
  check_low_latency_inputs(fn, inputs, cfg, /*need_weights=*/true);
  if (use_logfmt) check_multiple(fn, "cfg.hidden (use_logfmt)", cfg.hidden, kLogfmtDivision, "the LogFMT division");

  const int num_ranks = cfg.num_ranks;
  const int num_topk = cfg.num_topk;
  const int num_local_experts = cfg.num_experts / num_ranks;
  const long long capacity = static_cast<long long>(num_ranks) * cfg.num_max_dispatch_tokens_per_rank;
  const size_t hidden = static_cast<size_t>(cfg.hidden);

  check_eq(fn, "expert_out.size() (cfg.num_ranks)", num_ranks, static_cast<long long>(expert_out.size()));
  check_eq(fn, "recv.size() (cfg.num_ranks)", num_ranks, static_cast<long long>(recv.size()));
  for (int d = 0; d < num_ranks; ++d) {
    check_eq(fn, indexed("expert_out", d) + ".size()", num_local_experts * capacity * cfg.hidden,
             static_cast<long long>(expert_out[d].size()));
    check_eq(fn, indexed("recv", d) + ".layout_range.size()", static_cast<long long>(num_local_experts) * num_ranks,
             static_cast<long long>(recv[d].layout_range.size()));
    check_eq(fn, indexed("recv", d) + ".src_info.size()", num_local_experts * capacity,
             static_cast<long long>(recv[d].src_info.size()));
    for (size_t j = 0; j < recv[d].layout_range.size(); ++j) {
      const int64_t range = recv[d].layout_range[j];
      const long long start = range >> 32;
      const long long count = range & 0xFFFFFFFFLL;
      if (start < 0 || start + count > capacity) {
        fail(fn, indexed("recv", d) + ".layout_range[" + std::to_string(j / num_ranks) + "][" +
                     std::to_string(j % num_ranks) +
                     "] expected start >= 0 and start + count <= " + std::to_string(capacity) + ", got start " +
                     std::to_string(start) + " count " + std::to_string(count));
      }
    }
  }

  std::vector<std::vector<uint16_t>> out(num_ranks);
  std::vector<const uint16_t*> rows(num_topk);  // the expert row returned for each slot (nullptr if -1)
  std::vector<std::vector<float>> decoded(num_topk);  // use_logfmt: each slot's row after the LogFMT transport
  for (int s = 0; s < num_ranks; ++s) {
    const LowLatencyInput& in = inputs[s];
    out[s].assign(in.num_tokens * hidden, 0);
    for (int t = 0; t < in.num_tokens; ++t) {
      const int64_t* topk = in.topk_idx.data() + static_cast<size_t>(t) * num_topk;
      for (int k = 0; k < num_topk; ++k) {
        rows[k] = nullptr;
        if (topk[k] < 0) continue;
        const int d = static_cast<int>(topk[k] / num_local_experts);
        const int i = static_cast<int>(topk[k] % num_local_experts);
        const int64_t range = recv[d].layout_range[static_cast<size_t>(i) * num_ranks + s];
        const long long start = range >> 32;
        const long long count = range & 0xFFFFFFFFLL;
        int occurrence = 0;  // earlier slots of this token that select the same expert
        for (int k2 = 0; k2 < k; ++k2) occurrence += topk[k2] == topk[k] ? 1 : 0;
        for (long long row = start; row < start + count && rows[k] == nullptr; ++row) {
          const size_t packed = static_cast<size_t>(i * capacity + row);
          if (recv[d].src_info[packed] == t && occurrence-- == 0) rows[k] = expert_out[d].data() + packed * hidden;
        }
        if (rows[k] == nullptr) {
          fail(fn, indexed("recv", d) + " expected a row for source rank " + std::to_string(s) + " token " +
                       std::to_string(t) + " slot " + std::to_string(k) + " (local expert " + std::to_string(i) +
                       "), got none in its layout_range");
        }
      }
      if (use_logfmt) {
        for (int k = 0; k < num_topk; ++k) {
          if (rows[k] != nullptr) decoded[k] = logfmt_decode_row(logfmt_encode_row(rows[k], cfg.hidden), cfg.hidden);
        }
      }
      for (size_t c = 0; c < hidden; ++c) {
        float acc = 0.0f;
        for (int k = 0; k < num_topk; ++k) {
          if (rows[k] == nullptr) continue;
          const float y = use_logfmt ? decoded[k][c] : bf16_to_float(rows[k][c]);
          const float product = in.topk_weights[static_cast<size_t>(t) * num_topk + k] * y;
          acc = acc + product;
        }
        out[s][t * hidden + c] = float_to_bf16(acc);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// LogFMT-10 rows (the format: src/protocol/logfmt.hpp)
// ---------------------------------------------------------------------------------------------

namespace {
namespace lf = detail::logfmt;

void check_logfmt_hidden(const char* fn, int hidden) {
  check_at_least(fn, "hidden", 1, hidden);
  check_multiple(fn, "hidden", hidden, kLogfmtDivision, "the LogFMT division");
}

uint32_t load_le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}
void store_le32(uint8_t* p, uint32_t v) {
  for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(v >> (8 * b));
}

}  // namespace

LogfmtRow logfmt_encode_row(const uint16_t* x, int hidden) {
  check_logfmt_hidden("logfmt_encode_row", hidden);
  const int num_divisions = hidden / kLogfmtDivision;
  LogfmtRow row;
  row.meta.assign(num_divisions, 0);
  row.payload.assign(static_cast<size_t>(num_divisions) * lf::kDivisionSlotBytes, 0);
  for (int j = 0; j < num_divisions; ++j) {
    const uint16_t* v = x + static_cast<size_t>(j) * kLogfmtDivision;
    uint8_t* out = row.payload.data() + static_cast<size_t>(j) * lf::kDivisionSlotBytes;
    uint32_t amax = 0, amin = 0xFFFFu;
    for (int i = 0; i < kLogfmtDivision; ++i) {
      amax = std::max(amax, lf::abs_bits(v[i]));
      amin = std::min(amin, lf::abs_bits(v[i]));
    }
    const uint32_t meta = lf::make_meta(amax, amin);
    row.meta[j] = meta;
    if (!lf::encodes(meta)) {  // BF16 fallback: the values themselves, little-endian
      for (int i = 0; i < kLogfmtDivision; ++i) {
        out[2 * i] = static_cast<uint8_t>(v[i] & 0xFF);
        out[2 * i + 1] = static_cast<uint8_t>(v[i] >> 8);
      }
      continue;
    }
    const lf::Division d = lf::division(meta);
    for (int g = 0; g < kLogfmtDivision / lf::kGroupChannels; ++g) {
      uint32_t code[lf::kGroupChannels];
      for (int k = 0; k < lf::kGroupChannels; ++k) code[k] = lf::encode(v[g * lf::kGroupChannels + k], d);
      uint32_t low_lo, low_hi, high16;
      lf::pack_group(code, low_lo, low_hi, high16);
      store_le32(out + 8 * g, low_lo);
      store_le32(out + 8 * g + 4, low_hi);
      out[lf::kLowPlaneBytes + 2 * g] = static_cast<uint8_t>(high16 & 0xFF);
      out[lf::kLowPlaneBytes + 2 * g + 1] = static_cast<uint8_t>(high16 >> 8);
    }
  }
  return row;
}

std::vector<float> logfmt_decode_row(const LogfmtRow& row, int hidden) {
  const char* fn = "logfmt_decode_row";
  check_logfmt_hidden(fn, hidden);
  const int num_divisions = hidden / kLogfmtDivision;
  check_eq(fn, "row.meta.size()", num_divisions, static_cast<long long>(row.meta.size()));
  check_eq(fn, "row.payload.size()", 2LL * hidden, static_cast<long long>(row.payload.size()));
  std::vector<float> out(hidden);
  for (int j = 0; j < num_divisions; ++j) {
    const uint8_t* in = row.payload.data() + static_cast<size_t>(j) * lf::kDivisionSlotBytes;
    float* y = out.data() + static_cast<size_t>(j) * kLogfmtDivision;
    if (!lf::encodes(row.meta[j])) {
      for (int i = 0; i < kLogfmtDivision; ++i)
        y[i] = bf16_to_float(static_cast<uint16_t>(in[2 * i] | (in[2 * i + 1] << 8)));
      continue;
    }
    const lf::Division d = lf::division(row.meta[j]);
    for (int g = 0; g < kLogfmtDivision / lf::kGroupChannels; ++g) {
      const uint32_t low_lo = load_le32(in + 8 * g), low_hi = load_le32(in + 8 * g + 4);
      const uint32_t high16 = in[lf::kLowPlaneBytes + 2 * g] | (in[lf::kLowPlaneBytes + 2 * g + 1] << 8);
      for (int k = 0; k < lf::kGroupChannels; ++k)
        y[g * lf::kGroupChannels + k] = lf::decode(lf::code_of_group(low_lo, low_hi, high16, k), d);
    }
  }
  return out;
}

}  // namespace openep::ref
