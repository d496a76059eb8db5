// Intranode test machinery shared by the named tests (ranks/intranode_test.cu) and the soak (vrank/soak_test.cu):
// cases, inputs, the per-world reference, one rank's dispatch / cached dispatch / combine checked against it.
#pragma once

#include <gtest/gtest.h>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#include "common/gpu_util.hpp"
#include "common/ranks.hpp"
#include "common/routing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"

namespace openep::test::intranode {

enum class Route { kUniform, kHot, kOneRankGetsAll, kEmptyRank, kMinusOneRows };

struct Case {
  int num_tokens, hidden, num_topk, experts_per_rank;
  bool fp8, with_topk;
  Route route;
  IndexType index_type = IndexType::kInt64;
  int expert_alignment = 1;
  bool bias = false;
  int num_sms = 24;
};

inline std::string name(const Case& c) {
  return "tokens" + std::to_string(c.num_tokens) + "_hidden" + std::to_string(c.hidden) + "_topk" +
         std::to_string(c.num_topk) + "_epr" + std::to_string(c.experts_per_rank) + (c.fp8 ? "_fp8" : "_bf16") +
         (c.with_topk ? "_topk" : "_notopk") + "_route" + std::to_string(static_cast<int>(c.route)) +
         (c.index_type == IndexType::kInt32 ? "_i32" : "_i64") + "_sms" + std::to_string(c.num_sms);
}

inline std::vector<int64_t> routing(const Case& c, int R, uint64_t seed) {
  const int N = c.num_tokens, K = c.num_topk, E = c.experts_per_rank * R;
  switch (c.route) {
    case Route::kUniform: return uniform_routing(N, K, E, seed);
    case Route::kHot: return hot_expert_routing(N, K, E, 0, seed);
    case Route::kOneRankGetsAll: return single_rank_routing(N, K, E, R, R - 1, seed);
    case Route::kEmptyRank: return empty_ranks_routing(N, K, E, R, seed, {0});
    case Route::kMinusOneRows: return all_minus_one_rows(with_minus_one(uniform_routing(N, K, E, seed), 0.25, seed), K, 4);
  }
  return {};
}

// Every rank's inputs (one host thread per rank: the largest cases hold hundreds of MB of random rows).
inline std::vector<ref::RankInput> make_inputs(const Case& c, int R, uint64_t seed) {
  std::vector<ref::RankInput> in(R);
  const int row_bytes = c.hidden * (c.fp8 ? 1 : 2);
  auto make = [&](int r) {
    ref::RankInput& x = in[r];
    x.num_tokens = c.num_tokens;
    std::mt19937_64 rng(seed * 7919 + r);
    x.x.resize(static_cast<size_t>(c.num_tokens) * row_bytes);
    if (c.fp8) {
      for (auto& b : x.x) b = static_cast<uint8_t>(rng() & 0x7e);  // finite e4m3 bytes
      x.x_scales.resize(static_cast<size_t>(c.num_tokens) * (c.hidden / 128));
      for (auto& s : x.x_scales) {
        const float f = 0.001f + static_cast<float>(rng() % 1000) * 1e-4f;
        std::memcpy(&s, &f, 4);
      }
    } else {
      const std::vector<uint16_t> v = random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 31 + r, 1.0f);
      std::memcpy(x.x.data(), v.data(), x.x.size());
    }
    x.topk_idx = routing(c, R, seed * 131 + r);
    x.topk_weights = random_weights(static_cast<size_t>(c.num_tokens) * c.num_topk, seed * 17 + r);
  };
  if (static_cast<size_t>(c.num_tokens) * c.hidden < (1u << 20)) {
    for (int r = 0; r < R; ++r) make(r);
    return in;
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < R; ++r) threads.emplace_back(make, r);
  for (std::thread& t : threads) t.join();
  return in;
}

inline ref::NormalConfig normal_config(const Case& c, int R) {
  ref::NormalConfig cfg;
  cfg.num_ranks = R;
  cfg.num_experts = c.experts_per_rank * R;
  cfg.hidden = c.hidden;
  cfg.num_topk = c.num_topk;
  cfg.elem_bytes = c.fp8 ? 1 : 2;
  cfg.num_scales = c.fp8 ? c.hidden / 128 : 0;
  cfg.expert_alignment = c.expert_alignment;
  cfg.with_topk = c.with_topk;
  return cfg;
}

template <typename T>
inline std::vector<T> download_n(const void* p, size_t n) {
  std::vector<T> v(n);
  copy_to_host(v.data(), p, n * sizeof(T));
  return v;
}

// GPU state of one rank's dispatch.
struct Dispatched {
  Dispatched() = default;
  Dispatched(const Dispatched&) = delete;
  Dispatched& operator=(const Dispatched&) = delete;
  ~Dispatched() {
    for (void* p : pool_ptrs) {
      try {
        pool->free_recv(p, pool->comm_stream());
      } catch (const std::exception& e) {
        ADD_FAILURE() << "free_recv: " << e.what();
      }
    }
  }
  Buffer* pool = nullptr;            // outputs from pool->alloc_recv (window-backed), freed on destruction
  std::vector<void*> pool_ptrs;
  IntranodeHandle handle;
  DispatchCounts counts;
  DeviceArray<int> rank_prefix, ntok_src, send_pos, src_idx;
  DeviceArray<uint8_t> recv_x;
  DeviceArray<uint32_t> recv_scales;
  DeviceArray<int64_t> recv_topk64;
  DeviceArray<int32_t> recv_topk32;
  DeviceArray<float> recv_weights;
};

struct Runner {
  Buffer& buffer;
  const Case& c;
  int R, me;
  ref::RankInput input;
  DeviceArray<uint8_t> x;
  DeviceArray<uint32_t> scales;  // column-major [hidden/128][N] (any strides are accepted)
  DeviceArray<int64_t> topk64;
  DeviceArray<int32_t> topk32;
  DeviceArray<float> weights;
  DeviceArray<int> per_rank, per_expert;
  DeviceArray<bool> in_rank;
  bool pool = false;  // outputs from Buffer::alloc_recv (window-backed: peers store rows straight into them)

  Runner(Buffer& b, const Case& cs, const ref::RankInput& in)
      : buffer(b), c(cs), R(b.num_ranks()), me(b.rank()), input(in), x(in.x), topk64(in.topk_idx),
        weights(in.topk_weights), per_rank(R), per_expert(cs.experts_per_rank * R),
        in_rank(static_cast<size_t>(cs.num_tokens) * R) {
    if (c.fp8) {
      const int S = c.hidden / 128;
      std::vector<uint32_t> colmajor(in.x_scales.size());
      for (int t = 0; t < c.num_tokens; ++t)
        for (int j = 0; j < S; ++j) colmajor[static_cast<size_t>(j) * c.num_tokens + t] = in.x_scales[t * S + j];
      scales = DeviceArray<uint32_t>(colmajor);
    }
    std::vector<int32_t> t32(in.topk_idx.begin(), in.topk_idx.end());
    topk32 = DeviceArray<int32_t>(t32);
  }

  DispatchArgs args(bool cached) const {
    DispatchArgs a;
    a.x = x.get();
    a.num_tokens = c.num_tokens;
    a.hidden = c.hidden;
    a.x_elem_bytes = c.fp8 ? 1 : 2;
    if (c.fp8) {
      a.x_scales = scales.get();
      a.num_scales = c.hidden / 128;
      a.scale_token_stride = 1;
      a.scale_hidden_stride = c.num_tokens;
    }
    if (c.with_topk && !cached) {
      a.index_type = c.index_type;
      a.topk_idx = c.index_type == IndexType::kInt64 ? static_cast<const void*>(topk64.get()) : topk32.get();
      a.topk_weights = weights.get();
      a.num_topk = c.num_topk;
    }
    a.is_token_in_rank = in_rank.get();
    a.num_tokens_per_rank = per_rank.get();
    a.num_tokens_per_expert = per_expert.get();
    a.num_experts = c.experts_per_rank * R;
    a.expert_alignment = c.expert_alignment;
    a.config.num_sms = c.num_sms;
    return a;
  }

  void layout() {
    LayoutArgs la;
    la.topk_idx = topk64.get();
    la.num_tokens = c.num_tokens;
    la.num_topk = c.num_topk;
    la.num_experts = c.experts_per_rank * R;
    la.num_tokens_per_rank = per_rank.get();
    la.num_tokens_per_expert = per_expert.get();
    la.is_token_in_rank = in_rank.get();
    buffer.get_dispatch_layout(la, buffer.comm_stream());
  }

  // n elements: window-backed from the Buffer's pool when `pool` (asserting that it has room), else own memory.
  template <typename T>
  DeviceArray<T> output(Dispatched& d, size_t n) {
    if (!pool || n == 0) return DeviceArray<T>(n);
    void* p = buffer.alloc_recv(n * sizeof(T));
    EXPECT_NE(p, nullptr) << "alloc_recv(" << n * sizeof(T) << ") found no room; pool free bytes "
                          << buffer.recv_pool_free_bytes();
    if (!p) return DeviceArray<T>(n);
    d.pool = &buffer;
    d.pool_ptrs.push_back(p);
    return DeviceArray<T>::view(static_cast<T*>(p), n);
  }

  void allocate_outputs(Dispatched& d, int rows) {
    const int S = c.fp8 ? c.hidden / 128 : 0;
    const bool i64 = c.index_type == IndexType::kInt64;
    d.src_idx = output<int>(d, rows);
    d.recv_x = output<uint8_t>(d, static_cast<size_t>(rows) * c.hidden * (c.fp8 ? 1 : 2));
    d.recv_scales = output<uint32_t>(d, static_cast<size_t>(rows) * S);
    // only the index type in use comes from the pool (the other array is never written)
    d.recv_topk64 = i64 ? output<int64_t>(d, static_cast<size_t>(rows) * c.num_topk)
                        : DeviceArray<int64_t>(static_cast<size_t>(rows) * c.num_topk);
    d.recv_topk32 = i64 ? DeviceArray<int32_t>(static_cast<size_t>(rows) * c.num_topk)
                        : output<int32_t>(d, static_cast<size_t>(rows) * c.num_topk);
    d.recv_weights = output<float>(d, static_cast<size_t>(rows) * c.num_topk);
    d.src_idx.poison(), d.recv_x.poison(), d.recv_scales.poison(), d.recv_topk64.poison(), d.recv_topk32.poison(),
        d.recv_weights.poison();
    d.handle.recv_src_idx = d.src_idx.get();
  }

  DispatchOutputs outputs(Dispatched& d) const {
    DispatchOutputs o;
    o.recv_x = d.recv_x.get();
    o.recv_x_scales = d.recv_scales.get();
    o.recv_topk_idx = c.index_type == IndexType::kInt64 ? static_cast<void*>(d.recv_topk64.get()) : d.recv_topk32.get();
    o.recv_topk_weights = d.recv_weights.get();
    return o;
  }

  // Fresh (exact or worst-case) dispatch.
  void dispatch(Dispatched& d, int num_worst_tokens) {
    layout();
    d.rank_prefix = DeviceArray<int>(R * R), d.ntok_src = DeviceArray<int>(R);
    d.send_pos = DeviceArray<int>(static_cast<size_t>(c.num_tokens) * R);
    d.rank_prefix.poison(), d.ntok_src.poison(), d.send_pos.poison();
    d.handle.rank_prefix_matrix = d.rank_prefix.get();
    d.handle.num_tokens_per_src = d.ntok_src.get();
    d.handle.send_pos = d.send_pos.get();
    DispatchArgs a = args(false);
    a.num_worst_tokens = num_worst_tokens;
    d.counts = buffer.dispatch_prepare(a, d.handle, buffer.comm_stream());
    allocate_outputs(d, d.counts.num_recv_tokens);
    buffer.dispatch(a, d.handle, outputs(d), buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
  }
};

// Checks one rank's dispatch result against the reference (first `rows` rows; worst-case tail separately).
inline void check_dispatch(const Case& c, const Runner& run, Dispatched& d, const ref::RankRecv& e, bool cached,
                    int num_worst_tokens) {
  const int R = run.R, rows = e.num_recv_tokens;
  const int S = c.fp8 ? c.hidden / 128 : 0;
  if (num_worst_tokens == 0 && !cached) {
    ASSERT_EQ(d.counts.num_recv_tokens, rows);
    EXPECT_EQ(d.counts.num_recv_tokens_per_expert, e.num_recv_tokens_per_expert);
  }
  const std::vector<int> prefix = d.rank_prefix.download();
  for (int s = 0; s < R; ++s) ASSERT_EQ(prefix[s * R + run.me], e.rank_prefix[s]) << "rank_prefix_matrix[" << s << "]";
  const size_t row_bytes = static_cast<size_t>(c.hidden) * (c.fp8 ? 1 : 2);
  const std::vector<uint8_t> x = download_n<uint8_t>(d.recv_x.get(), rows * row_bytes);
  for (int r = 0; r < rows; ++r)
    ASSERT_EQ(0, std::memcmp(x.data() + r * row_bytes, e.x.data() + r * row_bytes, row_bytes))
        << "recv_x row " << r << " (from rank " << e.src_rank[r] << ", token " << e.src_idx[r] << ")";
  EXPECT_EQ(download_n<int>(d.src_idx.get(), rows), e.src_idx);
  if (S) EXPECT_EQ(download_n<uint32_t>(d.recv_scales.get(), static_cast<size_t>(rows) * S), e.x_scales);
  if (c.with_topk && !cached) {
    std::vector<int64_t> idx;
    if (c.index_type == IndexType::kInt64) {
      idx = download_n<int64_t>(d.recv_topk64.get(), static_cast<size_t>(rows) * c.num_topk);
    } else {
      const auto v = download_n<int32_t>(d.recv_topk32.get(), static_cast<size_t>(rows) * c.num_topk);
      idx.assign(v.begin(), v.end());
    }
    EXPECT_EQ(idx, e.topk_idx);
    EXPECT_EQ(download_n<float>(d.recv_weights.get(), static_cast<size_t>(rows) * c.num_topk), e.topk_weights);
    if (num_worst_tokens > rows) {
      const size_t n = static_cast<size_t>(num_worst_tokens) * c.num_topk;
      std::vector<int64_t> all;
      if (c.index_type == IndexType::kInt64) {
        all = download_n<int64_t>(d.recv_topk64.get(), n);
      } else {
        const auto v = download_n<int32_t>(d.recv_topk32.get(), n);
        all.assign(v.begin(), v.end());
      }
      for (size_t i = static_cast<size_t>(rows) * c.num_topk; i < n; ++i) ASSERT_EQ(all[i], -1) << "padded slot " << i;
    }
  }
}

// Everything the reference says about one case, for every rank (built once per world).
struct World {
  std::vector<ref::RankInput> inputs, inputs2;          // inputs2: new data with the same routing (cached)
  std::vector<ref::RankRecv> expect, expect2;
  std::vector<ref::CombineInput> cin;                    // combine inputs: the received rows as BF16
  std::vector<std::vector<uint16_t>> b0, b1;             // combine biases
  std::vector<ref::CombineOutput> cexp;
};

inline World make_world(const Case& c, int R, uint64_t seed) {
  World w;
  w.inputs = make_inputs(c, R, seed);
  const ref::NormalConfig cfg = normal_config(c, R);
  w.expect = ref::dispatch(w.inputs, cfg);
  w.inputs2 = make_inputs(c, R, seed + 1000);
  for (int r = 0; r < R; ++r) w.inputs2[r].topk_idx = w.inputs[r].topk_idx;
  ref::NormalConfig cfg2 = cfg;
  cfg2.with_topk = false;
  w.expect2 = ref::dispatch(w.inputs2, cfg2);
  if (!c.fp8) {
    w.cin.resize(R);
    for (int r = 0; r < R; ++r) {
      w.cin[r].x.resize(w.expect[r].x.size() / 2);
      std::memcpy(w.cin[r].x.data(), w.expect[r].x.data(), w.expect[r].x.size());
      if (c.with_topk) w.cin[r].topk_weights = w.expect[r].topk_weights;
    }
    if (c.bias) {
      for (int r = 0; r < R; ++r) {
        w.b0.push_back(random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 3 + r, 1.0f));
        w.b1.push_back(random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 5 + r, 0.5f));
      }
    }
    w.cexp = ref::combine(w.cin, w.expect, w.inputs, cfg, w.b0, w.b1);
  }
  return w;
}

// The case as one world runs it: tokens per rank are capped so that the world holds at most kWorldTokens tokens
// (EP2 8192, EP4 4096, EP8 2048 per rank). The reference of a world (built on one host, for every rank) grows
// with ranks x tokens x hidden x fan-out: uncapped, the 8192-token cases need over 20 GB of host memory at
// EP8. Chunk sizes above the minimum (more than 2048 tokens per rank) are covered at EP2 and EP4.
inline constexpr int kWorldTokens = 16384;
inline Case for_world(Case c, int R) {
  if (static_cast<long long>(c.num_tokens) * R > kWorldTokens) c.num_tokens = kWorldTokens / R;
  return c;
}

// Exact dispatch, worst-case dispatch (unless with_worst_case is false: a window too small for the batch refuses
// it), cached dispatch of new data and combine, each against the reference, outputs poisoned. Copies the exact
// dispatch's handle in *exact_handle when given (its host fields: what the rounds were sized by).
inline void run_case(Buffer& buffer, const Case& c, uint64_t seed, bool with_worst_case = true,
                     IntranodeHandle* exact_handle = nullptr, bool pool_outputs = false) {
  SCOPED_TRACE(name(c));
  const int R = buffer.num_ranks(), me = buffer.rank();
  const std::shared_ptr<const World> world = once_per_world<World>([&] { return make_world(c, R, seed); });
  const World& w = *world;

  Runner run(buffer, c, w.inputs[me]);
  run.pool = pool_outputs;
  Dispatched d;
  run.dispatch(d, 0);
  check_dispatch(c, run, d, w.expect[me], false, 0);
  if (exact_handle) *exact_handle = d.handle;
  if (::testing::Test::HasFailure()) return;

  // Worst-case mode equals exact mode on the valid rows; the tail of topk_idx is -1.
  if (c.with_topk && with_worst_case) {
    Dispatched wc;
    run.dispatch(wc, c.num_tokens * R + 3);
    check_dispatch(c, run, wc, w.expect[me], false, c.num_tokens * R + 3);
  }

  // Cached dispatch of new data with the same handle equals a fresh reference dispatch of that data.
  {
    Runner run2(buffer, c, w.inputs2[me]);
    run2.pool = pool_outputs;
    Dispatched cd;
    cd.handle = d.handle;
    run2.allocate_outputs(cd, d.counts.num_recv_tokens);
    cd.handle.recv_src_idx = d.handle.recv_src_idx;  // the handle keeps its own recv_src_idx
    cd.rank_prefix = DeviceArray<int>(R * R);
    copy_device_to_device(cd.rank_prefix.get(), d.rank_prefix.get(), sizeof(int) * R * R);
    DispatchArgs a = run2.args(true);
    DispatchOutputs o = run2.outputs(cd);
    buffer.dispatch_cached(a, d.handle, o, buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    cd.src_idx = std::move(d.src_idx);  // compare the handle's src idx (unchanged)
    Case cc = c;
    cc.with_topk = false;
    check_dispatch(cc, run2, cd, w.expect2[me], true, 0);
    d.src_idx = std::move(cd.src_idx);
    d.handle.recv_src_idx = d.src_idx.get();
  }

  // Combine (BF16): feed back the received rows (as BF16) and weights; compare bitwise with the reference. With
  // pool_outputs the input comes from the pool too, so the peers pull this rank's rows instead of it pushing them.
  if (!c.fp8) {
    Dispatched input_pieces;  // gives the pool pieces of the combine input back at the end
    DeviceArray<uint16_t> y = run.output<uint16_t>(input_pieces, w.cin[me].x.size());
    DeviceArray<float> wts = run.output<float>(input_pieces, w.cin[me].topk_weights.size());
    y.upload(w.cin[me].x), wts.upload(w.cin[me].topk_weights);
    DeviceArray<uint16_t> out(static_cast<size_t>(c.num_tokens) * c.hidden);
    DeviceArray<float> wout(static_cast<size_t>(c.num_tokens) * c.num_topk);
    DeviceArray<uint16_t> bias0(c.bias ? w.b0[me] : std::vector<uint16_t>{});
    DeviceArray<uint16_t> bias1(c.bias ? w.b1[me] : std::vector<uint16_t>{});
    out.poison(), wout.poison();
    CombineArgs ca;
    ca.x = y.get();
    ca.hidden = c.hidden;
    if (c.with_topk) ca.topk_weights = wts.get(), ca.num_topk = c.num_topk;  // may be null with 0 rows
    if (c.bias) ca.bias_0 = bias0.get(), ca.bias_1 = bias1.get();
    ca.config.num_sms = c.num_sms;
    CombineOutputs co;
    co.combined_x = out.get();
    co.combined_topk_weights = wout.get();
    buffer.combine(ca, d.handle, co, buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    const std::vector<uint16_t> got = out.download();
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], w.cexp[me].x[i]) << "combined_x[token " << i / c.hidden << "][" << i % c.hidden << "]";
    if (c.with_topk) EXPECT_EQ(wout.download(), w.cexp[me].topk_weights);
  }
}

// Sized for the case: every row a rank can receive (worst-case mode adds 3), both dispatch and combine.
inline BufferOptions options_for(const Case& c, int R, double timeout_s = 20.0) {
  BufferOptions o;
  o.num_nvl_bytes = intranode_buffer_size_hint(R, c.num_tokens + 2, c.hidden, 2, c.hidden / 128, c.num_topk);
  o.timeout_seconds = test_timeout(timeout_s);
  return o;
}

// Normal mode in rounds (IntranodeLayout::num_rounds): the Buffer is
// sized for num_tokens / fraction tokens per rank, so exact dispatch, cached dispatch and combine take about
// `fraction` rounds (more with skewed routing), and must still equal the reference bitwise.
struct RoundsCase {
  Case c;
  int fraction;
};
inline std::vector<std::pair<std::string, RoundsCase>> rounds_cases() {
  const std::vector<RoundsCase> cases = {
      {{300, 2048, 8, 8, false, true, Route::kUniform}, 3},
      {{513, 2048, 4, 8, true, true, Route::kHot}, 3},
      {{1000, 4096, 8, 8, false, true, Route::kOneRankGetsAll}, 4},
      {{257, 2048, 8, 8, false, false, Route::kUniform, IndexType::kInt64, 1, true, 8}, 7},
      {{2000, 2560, 8, 8, false, true, Route::kMinusOneRows, IndexType::kInt32, 4, true, 16}, 3},
  };
  std::vector<std::pair<std::string, RoundsCase>> named;
  for (const RoundsCase& r : cases) named.emplace_back(name(r.c) + "_window1of" + std::to_string(r.fraction), r);
  return named;
}

// Shapes, dtypes, routings, index types, alignments, biases and SM counts; the seed is part of the case.
inline std::vector<std::pair<std::string, Case>> shape_cases() {
  const std::vector<Case> cases = {
      {0, 2048, 8, 64, false, true, Route::kUniform},
      {1, 2048, 8, 64, false, true, Route::kUniform},
      {127, 2560, 4, 64, false, true, Route::kHot},
      {127, 7168, 9, 64, true, true, Route::kUniform},
      {4096, 7168, 8, 64, false, true, Route::kUniform},
      {4096, 7168, 8, 64, true, true, Route::kUniform},
      {8192, 7168, 8, 64, false, true, Route::kUniform},
      {8192, 4096, 8, 64, true, true, Route::kHot, IndexType::kInt32, 1, true, 16},
      {4096, 4096, 8, 64, false, false, Route::kOneRankGetsAll},
      {1000, 8192, 1, 64, false, true, Route::kEmptyRank},
      {513, 2048, 4, 64, true, false, Route::kMinusOneRows},
      {300, 4096, 9, 64, false, true, Route::kMinusOneRows, IndexType::kInt32, 4, true, 8},
      {2000, 2560, 8, 64, false, true, Route::kUniform, IndexType::kInt32, 128, true, 16},
      {257, 8192, 4, 64, true, true, Route::kHot, IndexType::kInt64, 1, false, 2},
  };
  std::vector<std::pair<std::string, Case>> named;
  for (const Case& c : cases) named.emplace_back(name(c), c);
  return named;
}

inline uint64_t seed_of(const Case& c) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : name(c)) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  return 42 + h % 100000;
}

}  // namespace openep::test::intranode
