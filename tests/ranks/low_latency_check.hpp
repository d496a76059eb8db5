// Low-latency test machinery shared by the named tests (ranks/low_latency_test.cu) and the soak (vrank/soak_test.cu):
// cases, inputs, the per-world reference, one rank's dispatch + combine checked against it.
#pragma once

#include <gtest/gtest.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <string>
#include <vector>
#include "common/compare.hpp"
#include "common/gpu_util.hpp"
#include "common/ranks.hpp"
#include "common/routing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"
#include "runtime/buffer_impl.hpp"

namespace openep::test::low_latency {

enum class Route { kUniform, kHot, kMinusOne };

struct LLCase {
  int num_tokens, T, hidden, num_topk, experts_per_rank;
  bool fp8, round_scale, ue8m0;
  Route route;
  IndexType index_type = IndexType::kInt64;
};

inline std::string name(const LLCase& c) {
  return "tokens" + std::to_string(c.num_tokens) + "_T" + std::to_string(c.T) + "_hidden" + std::to_string(c.hidden) +
         "_topk" + std::to_string(c.num_topk) + (c.fp8 ? "_fp8" : "_bf16") + (c.round_scale ? "_round" : "") +
         (c.ue8m0 ? "_ue8m0" : "") + "_route" + std::to_string(static_cast<int>(c.route));
}

inline ref::LowLatencyConfig config(const LLCase& c, int R) {
  ref::LowLatencyConfig cfg;
  cfg.num_ranks = R;
  cfg.num_experts = c.experts_per_rank * R;
  cfg.hidden = c.hidden;
  cfg.num_topk = c.num_topk;
  cfg.num_max_dispatch_tokens_per_rank = c.T;
  cfg.use_fp8 = c.fp8;
  cfg.round_scale = c.round_scale;
  cfg.use_ue8m0 = c.ue8m0;
  return cfg;
}

inline std::vector<ref::LowLatencyInput> make_inputs(const LLCase& c, int R, uint64_t seed) {
  std::vector<ref::LowLatencyInput> in(R);
  const int N = c.num_tokens, K = c.num_topk, E = c.experts_per_rank * R;
  for (int r = 0; r < R; ++r) {
    in[r].num_tokens = N;
    in[r].x = random_bf16(static_cast<size_t>(N) * c.hidden, seed * 31 + r, 3.0f);
    const uint64_t s = seed * 131 + r;
    switch (c.route) {
      case Route::kUniform: in[r].topk_idx = uniform_routing(N, K, E, s); break;
      case Route::kHot: in[r].topk_idx = hot_expert_routing(N, K, E, 1, s); break;
      case Route::kMinusOne: in[r].topk_idx = all_minus_one_rows(with_minus_one(uniform_routing(N, K, E, s), 0.3, s), K, 5); break;
    }
    in[r].topk_weights = random_weights(static_cast<size_t>(N) * K, seed * 17 + r);
  }
  return in;
}

// Expert output value for (global expert, source rank, source token, channel): the same for duplicate copies.
inline uint16_t expert_value(int e, int s, int t, int c) {
  uint64_t h = (static_cast<uint64_t>(e) * 1000003u + static_cast<uint64_t>(s) * 7919u + static_cast<uint64_t>(t)) * 0x9E3779B97F4A7C15ull +
               static_cast<uint64_t>(c) * 0xBF58476D1CE4E5B9ull;
  h ^= h >> 31;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 29;
  const float f = static_cast<float>(static_cast<int64_t>(h % 2000001) - 1000000) * 1e-6f;
  return ref::float_to_bf16(f);
}

// Expert output values for the LogFMT combine: per 128-channel division one of six patterns (by division, expert
// and token), so that every rule of the format is exercised: plain values in [-1, 1] (mostly encoded; BF16 when a
// value rounds to 1.0), values up to 8 (BF16 fallback), half the channels below amax * 2^-32 (clipped), zeros
// among small values (amin == 0), all-zero divisions (BF16) or tiny values (~2^-20), a narrow range around 0.25.
// The same for duplicate copies.
inline uint16_t logfmt_expert_value(int e, int s, int t, int c) {
  const uint16_t plain = expert_value(e, s, t, c);
  const float v = ref::bf16_to_float(plain);
  switch ((c / 128 + e + t) % 6) {
    case 0: return plain;
    case 1: return ref::float_to_bf16(v * 8.0f);
    case 2: return ref::float_to_bf16(c % 2 ? v * 0x1p-40f : v * 0.5f);
    case 3: return c % 7 == 0 ? uint16_t{0} : ref::float_to_bf16(v * 0.01f);
    case 4: return t % 3 == 0 ? uint16_t{0} : ref::float_to_bf16(v * 0x1p-20f);
    default: return ref::float_to_bf16(0.25f + 0.001f * v);
  }
}

inline uint16_t expert_value(int e, int s, int t, int c, bool logfmt) {
  return logfmt ? logfmt_expert_value(e, s, t, c) : expert_value(e, s, t, c);
}

// Fills [E_local][R*T][H] expert outputs for rank d from a layout (ranges + src_info); `logfmt`: the LogFMT
// test values (logfmt_expert_value).
inline std::vector<uint16_t> expert_outputs(int d, int El, int R, int T, int H, const int64_t* range,
                                            const int* src_info, bool logfmt = false) {
  std::vector<uint16_t> out(static_cast<size_t>(El) * R * T * H, 0x7FC0);  // rows beyond the counts: NaN
  for (int i = 0; i < El; ++i)
    for (int s = 0; s < R; ++s) {
      const int64_t start = range[i * R + s] >> 32, count = range[i * R + s] & 0xFFFFFFFFLL;
      for (int64_t r = start; r < start + count; ++r) {
        const size_t row = static_cast<size_t>(i) * R * T + r;
        for (int c = 0; c < H; ++c) out[row * H + c] = expert_value(d * El + i, s, src_info[row], c, logfmt);
      }
    }
  return out;
}

// "" when the LogFMT combine `got` of rank s is within the format's error bound of the BF16 combine `bf16`
// (the reference's, on the same expert values): per element
//   |got - bf16| <= 0.0221 * sum_k |w_k y_k|  (an encoded value is within a factor 2^(step/2), step <= 32/510)
//                 + 2^-32 * sum_k |w_k|       (values below amax * 2^-32 < 2^-32 may become 0 or that bound)
//                 + 1.03 * 2^-7 * max(|got|, |bf16|)  (the two final BF16 roundings)
inline std::string logfmt_error_bound_mismatch(const std::vector<uint16_t>& got, const std::vector<uint16_t>& bf16,
                                               const ref::LowLatencyInput& in, int s, int K, int H) {
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int c = 0; c < H; ++c) {
      double magnitude = 0, weights = 0;
      for (int k = 0; k < K; ++k) {
        const int64_t e = in.topk_idx[static_cast<size_t>(t) * K + k];
        if (e < 0) continue;
        const double w = std::fabs(in.topk_weights[static_cast<size_t>(t) * K + k]);
        magnitude += w * std::fabs(ref::bf16_to_float(logfmt_expert_value(static_cast<int>(e), s, t, c)));
        weights += w;
      }
      const size_t at = static_cast<size_t>(t) * H + c;
      const double a = ref::bf16_to_float(got[at]), b = ref::bf16_to_float(bf16[at]);
      const double tol =
          0.0221 * magnitude + 0x1p-32 * weights + 1.03 * 0x1p-7 * std::max(std::fabs(a), std::fabs(b)) + 1e-30;
      if (!(std::fabs(a - b) <= tol))
        return "token " + std::to_string(t) + " column " + std::to_string(c) + ": LogFMT " + std::to_string(a) +
               ", BF16 " + std::to_string(b) + ", bound " + std::to_string(tol);
    }
  }
  return {};
}

struct LLRank {
  const LLCase& c;
  int R, me, El, RT, S;
  DeviceArray<uint16_t> x;
  DeviceArray<int64_t> topk64;
  DeviceArray<int32_t> topk32;
  DeviceArray<float> weights;
  DeviceArray<uint8_t> packed_x;
  DeviceArray<uint32_t> packed_scales;
  DeviceArray<int> count, src_info;
  DeviceArray<int64_t> range;
  DeviceArray<uint16_t> expert_out, combined;
  LowLatencyHandle handle;

  LLRank(const LLCase& cs, int num_ranks, int rank, const ref::LowLatencyInput& in)
      : c(cs), R(num_ranks), me(rank), El(cs.experts_per_rank), RT(num_ranks * cs.T), S(cs.hidden / 128),
        x(std::max<size_t>(in.x.size(), 8)), topk64(std::max<size_t>(in.topk_idx.size(), 1)),
        topk32(std::max<size_t>(in.topk_idx.size(), 1)), weights(std::max<size_t>(in.topk_weights.size(), 1)),
        packed_x(static_cast<size_t>(El) * RT * cs.hidden * (cs.fp8 ? 1 : 2)),
        packed_scales(cs.fp8 ? static_cast<size_t>(El) * RT * S : 1), count(El), src_info(static_cast<size_t>(El) * RT),
        range(static_cast<size_t>(El) * R), expert_out(static_cast<size_t>(El) * RT * cs.hidden),
        combined(std::max<size_t>(static_cast<size_t>(cs.num_tokens) * cs.hidden, 8)) {
    upload(in);
  }
  void upload(const ref::LowLatencyInput& in) {
    copy_to_device(x.get(), in.x.data(), in.x.size() * 2);
    if (!in.topk_idx.empty()) {
      copy_to_device(topk64.get(), in.topk_idx.data(), in.topk_idx.size() * 8);
      std::vector<int32_t> t32(in.topk_idx.begin(), in.topk_idx.end());
      copy_to_device(topk32.get(), t32.data(), t32.size() * 4);
      copy_to_device(weights.get(), in.topk_weights.data(), in.topk_weights.size() * 4);
    }
  }
  const void* topk() const {
    return c.index_type == IndexType::kInt64 ? static_cast<const void*>(topk64.get()) : topk32.get();
  }
  void poison_dispatch() {
    packed_x.poison(), packed_scales.poison(), count.poison(), src_info.poison(), range.poison();
  }
  LowLatencyDispatchArgs dispatch_args(bool hook) const {
    LowLatencyDispatchArgs a;
    a.x = x.get();
    a.num_tokens = c.num_tokens;
    a.hidden = c.hidden;
    a.topk_idx = topk();
    a.index_type = c.index_type;
    a.num_topk = c.num_topk;
    a.num_max_dispatch_tokens_per_rank = c.T;
    a.num_experts = El * R;
    a.use_fp8 = c.fp8;
    a.round_scale = c.round_scale;
    a.use_ue8m0 = c.ue8m0;
    a.return_recv_hook = hook;
    return a;
  }
  LowLatencyDispatchOutputs dispatch_outputs() {
    LowLatencyDispatchOutputs o;
    o.packed_recv_x = packed_x.get();
    o.packed_recv_scales = c.fp8 ? packed_scales.get() : nullptr;
    o.packed_recv_count = count.get();
    handle.src_info = src_info.get();
    handle.layout_range = range.get();
    return o;
  }
  LowLatencyCombineArgs combine_args(bool hook, bool zero_copy, bool logfmt = false) const {
    LowLatencyCombineArgs a;
    a.use_logfmt = logfmt;
    a.x = zero_copy ? nullptr : expert_out.get();
    a.topk_idx = topk();
    a.index_type = c.index_type;
    a.topk_weights = weights.get();
    a.num_tokens = c.num_tokens;
    a.num_topk = c.num_topk;
    a.zero_copy = zero_copy;
    a.return_recv_hook = hook;
    return a;
  }
};

// Compares this rank's dispatch outputs with the reference; returns "" when equal.
inline std::string check_dispatch(const LLRank& g, const ref::LowLatencyRecv& want) {
  const LLCase& c = g.c;
  const int R = g.R, El = g.El, RT = g.RT, S = g.S, H = c.hidden;
  const size_t row_bytes = static_cast<size_t>(H) * (c.fp8 ? 1 : 2);
  const std::vector<int> count = g.count.download(), src = g.src_info.download();
  const std::vector<int64_t> range = g.range.download();
  const std::vector<uint8_t> px = g.packed_x.download();
  const std::vector<uint32_t> ps = g.packed_scales.download();
  std::string err = first_mismatches(count, want.count, 0, "packed_recv_count");
  if (!err.empty()) return err;
  for (int i = 0; i < El; ++i)
    for (int s = 0; s < R; ++s) {
      const int64_t a = range[i * R + s], b = want.layout_range[i * R + s];
      if ((a & 0xFFFFFFFFLL) != (b & 0xFFFFFFFFLL) || ((b & 0xFFFFFFFFLL) != 0 && a != b))
        return "layout_range[" + std::to_string(i) + "][" + std::to_string(s) + "]: got " + std::to_string(a) +
               ", want " + std::to_string(b);
    }
  for (int i = 0; i < El; ++i) {
    const std::vector<int> rows = low_latency_canonical_rows(range.data() + i * R, src.data() + static_cast<size_t>(i) * RT, R);
    for (int j = 0; j < want.count[i]; ++j) {
      const size_t got_row = static_cast<size_t>(i) * RT + rows[j], want_row = static_cast<size_t>(i) * RT + j;
      const std::string where = "expert " + std::to_string(i) + " row " + std::to_string(j);
      if (src[got_row] != want.src_info[want_row])
        return where + ": src_info " + std::to_string(src[got_row]) + ", want " + std::to_string(want.src_info[want_row]);
      if (std::memcmp(px.data() + got_row * row_bytes, want.packed_x.data() + want_row * row_bytes, row_bytes) != 0) {
        return where + " payload: " + first_mismatches(px.data() + got_row * row_bytes, want.packed_x.data() + want_row * row_bytes,
                                                      row_bytes, 0, "bytes");
      }
      if (!c.fp8) continue;
      const int words = c.ue8m0 ? S / 4 : S;
      for (int w = 0; w < words; ++w) {
        const uint32_t got = ps[(static_cast<size_t>(i) * words + w) * RT + rows[j]];
        uint32_t expect;
        if (c.ue8m0) expect = want.packed_scales_ue8m0[want_row * words + w];
        else std::memcpy(&expect, &want.packed_scales[want_row * words + w], 4);
        if (got != expect)
          return where + " scale " + std::to_string(w) + ": got " + std::to_string(got) + ", want " + std::to_string(expect);
      }
    }
  }
  return {};
}

// Whether the low-latency tests run over the network (GIN) path: OPENEP_TEST_LL_NETWORK=1 (below).
inline bool ll_over_network() {
  const char* network = std::getenv("OPENEP_TEST_LL_NETWORK");
  return network != nullptr && std::string(network) == "1";
}

inline BufferOptions ll_options(size_t rdma_bytes, double timeout_s = 20.0) {
  BufferOptions o;
  o.num_rdma_bytes = rdma_bytes;
  o.low_latency_mode = true;
  o.timeout_seconds = test_timeout(timeout_s);
  // OPENEP_TEST_LL_NETWORK=1 (the fake-node GIN CTest tests, tests/fake_nodes.cmake): allow_network, so the
  // multi-GPU binary's low-latency tests run over GIN when its world spans fake nodes.
  o.allow_network = ll_over_network();
  return o;
}

// The reference of one case for every rank: inputs, dispatch receive, and the combine result of expert outputs
// placed by the reference's own layout (built once per world). A LogFMT world (logfmt) uses the LogFMT test
// values (logfmt_expert_value) and also holds the LogFMT combine; `combined` is then the BF16 combine of the same
// values (the error bound's baseline).
struct LLWorld {
  std::vector<ref::LowLatencyInput> inputs;
  std::vector<ref::LowLatencyRecv> want;
  std::vector<std::vector<uint16_t>> combined;
  std::vector<std::vector<uint16_t>> combined_logfmt;  // only in a LogFMT world
  std::vector<ref::LowLatencyInput> ref_inputs;        // what the reference saw: inputs, or ref::mask_ranks of them
};

// `masked` (shrink mode): the GPU ranks get the full inputs, the reference sees ref::mask_ranks(inputs, masked),
// so every rank not in `masked` must equal it.
inline LLWorld make_world(const LLCase& c, int R, uint64_t seed, bool logfmt = false,
                          const std::vector<int>& masked = {}) {
  LLWorld w;
  w.inputs = make_inputs(c, R, seed);
  const ref::LowLatencyConfig cfg = config(c, R);
  w.ref_inputs = masked.empty() ? w.inputs : ref::mask_ranks(w.inputs, cfg, masked);
  w.want = ref::low_latency_dispatch(w.ref_inputs, cfg);
  std::vector<std::vector<uint16_t>> ref_out(R);
  for (int d = 0; d < R; ++d)
    ref_out[d] = expert_outputs(d, c.experts_per_rank, R, c.T, c.hidden, w.want[d].layout_range.data(),
                                w.want[d].src_info.data(), logfmt);
  w.combined = ref::low_latency_combine(ref_out, w.want, w.ref_inputs, cfg);
  if (logfmt) w.combined_logfmt = ref::low_latency_combine(ref_out, w.want, w.ref_inputs, cfg, /*use_logfmt=*/true);
  return w;
}

// A rank that sits out a run_case round (shrink tests) still takes that round's shared world: rank 0 builds the
// worlds in call order (once_per_world), so every rank must make the same sequence of calls or a later round
// would pair with an earlier round's world.
inline void sit_out_case(const LLCase& c, int R, uint64_t seed, bool logfmt = false, const std::vector<int>& masked = {}) {
  (void)once_per_world<LLWorld>([&] { return make_world(c, R, seed, logfmt, masked); });
}

// One dispatch (hook or not) + combine (hook or not, zero-copy or not, LogFMT or not) checked against the
// reference: bit for bit (LogFMT: against the reference's LogFMT combine, and within the error bound of its BF16
// combine).
// `masked` (shrink mode): the ranks the survivors have masked; only survivors may call it then.
inline void run_case(Buffer& buffer, const LLCase& c, uint64_t seed, bool hook, bool zero_copy, bool logfmt = false,
                     const std::vector<int>& masked = {}) {
  SCOPED_TRACE(name(c) + (hook ? "_hook" : "") + (zero_copy ? "_zerocopy" : "") + (logfmt ? "_logfmt" : "") +
               (masked.empty() ? "" : "_masked"));
  const int R = buffer.num_ranks(), me = buffer.rank();
  const auto world = once_per_world<LLWorld>([&] { return make_world(c, R, seed, logfmt, masked); });
  const std::vector<ref::LowLatencyRecv>& want = world->want;
  LLRank g(c, R, me, world->inputs[me]);
  cudaStream_t stream = buffer.comm_stream();

  DeviceArray<int> stats(g.El);
  stats.zero();
  DeviceArray<int64_t> wait_stats(R);
  wait_stats.zero();
  g.poison_dispatch();
  LowLatencyDispatchArgs da = g.dispatch_args(hook);
  da.cumulative_local_expert_recv_stats = stats.get();
  da.dispatch_wait_recv_cost_stats = wait_stats.get();
  const LowLatencyDispatchOutputs dout = g.dispatch_outputs();
  LowLatencyHook h = buffer.low_latency_dispatch(da, g.handle, dout, stream);
  ASSERT_EQ(static_cast<bool>(h), hook);
  if (hook) h();
  buffer.synchronize(stream);
  const std::string err = check_dispatch(g, want[me]);
  ASSERT_EQ(err, "");
  EXPECT_EQ(stats.download(), want[me].count) << "cumulative_local_expert_recv_stats";
  for (int64_t v : wait_stats.download()) EXPECT_GE(v, 0) << "dispatch_wait_recv_cost_stats";

  // Combine: the reference uses its own placement, the GPU its own; both hold the same expert values.
  const std::vector<std::vector<uint16_t>>& expect = logfmt ? world->combined_logfmt : world->combined;
  const std::vector<int64_t> range = g.range.download();
  const std::vector<int> src = g.src_info.download();
  const std::vector<uint16_t> mine = expert_outputs(me, g.El, R, c.T, c.hidden, range.data(), src.data(), logfmt);
  if (zero_copy) {
    uint16_t* zc = buffer.get_next_low_latency_combine_buffer(g.handle);
    copy_to_device(zc, mine.data(), mine.size() * 2);
  } else {
    g.expert_out.upload(mine);
  }
  g.combined.poison();
  LowLatencyCombineOutputs co;
  co.combined_x = g.combined.get();
  LowLatencyHook ch = buffer.low_latency_combine(g.combine_args(hook, zero_copy, logfmt), g.handle, co, stream);
  ASSERT_EQ(static_cast<bool>(ch), hook);
  if (hook) ch();
  buffer.synchronize(stream);
  std::vector<uint16_t> got = g.combined.download();
  got.resize(expect[me].size());
  EXPECT_EQ(first_mismatches(got, expect[me], c.hidden, "combined_x"), "");
  if (logfmt) {
    EXPECT_EQ(logfmt_error_bound_mismatch(got, world->combined[me], world->ref_inputs[me], me, c.num_topk, c.hidden), "")
        << "LogFMT combine against the BF16 reference";
  }
}

inline std::vector<LLCase> cases() {
  return {
      {0, 128, 2048, 8, 16, false, false, false, Route::kUniform},
      {1, 128, 4096, 8, 16, true, false, false, Route::kUniform},
      {7, 128, 7168, 8, 16, true, true, false, Route::kUniform},
      {128, 128, 7168, 8, 16, true, true, true, Route::kUniform},
      {128, 128, 8192, 8, 16, false, false, false, Route::kHot},
      {128, 128, 2048, 6, 16, true, false, false, Route::kMinusOne, IndexType::kInt32},
      {192, 192, 4096, 9, 16, true, false, false, Route::kUniform},
      {100, 128, 7168, 11, 32, false, false, false, Route::kHot, IndexType::kInt32},
      {64, 128, 2560, 4, 8, true, true, false, Route::kMinusOne},
      {33, 64, 8, 2, 4, false, false, false, Route::kUniform},
      {128, 128, 2048, 8, 144, true, false, false, Route::kUniform},  // more local experts than SMs
  };
}

inline std::string case_name(const LLCase& c) {
  return name(c) + "_epr" + std::to_string(c.experts_per_rank) +
         (c.index_type == IndexType::kInt32 ? "_i32" : "_i64");
}

inline std::vector<std::pair<std::string, LLCase>> named_cases() {
  std::vector<std::pair<std::string, LLCase>> named;
  for (const LLCase& c : cases()) named.emplace_back(case_name(c), c);
  return named;
}

// The cases LogFMT applies to (hidden % 128 == 0): all but the hidden-8 one.
inline std::vector<std::pair<std::string, LLCase>> logfmt_named_cases() {
  std::vector<std::pair<std::string, LLCase>> named;
  for (const LLCase& c : cases())
    if (c.hidden % 128 == 0) named.emplace_back(case_name(c), c);
  return named;
}

inline uint64_t seed_of(const LLCase& c) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : case_name(c)) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  return 11 + h % 100000;
}

inline size_t buffer_bytes(const LLCase& c, int R) { return low_latency_buffer_size_hint(c.T, c.hidden, R, c.experts_per_rank * R); }

inline size_t buffer_bytes(int R) {
  size_t bytes = 0;
  for (const LLCase& c : cases()) bytes = std::max(bytes, buffer_bytes(c, R));
  return bytes;
}

}  // namespace openep::test::low_latency
