// Intranode dispatch and combine on several GPUs against the CPU reference. Every rank rebuilds every
// rank's inputs from seeds, so the reference needs no communication. Outputs are poisoned before each run.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/gpu_util.hpp"
#include "common/mgpu.hpp"
#include "common/routing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"

namespace openep::test {
namespace {

enum class Route { kUniform, kHot, kOneRankGetsAll, kEmptyRank, kMinusOneRows };

struct Case {
  int num_tokens, hidden, num_topk, num_experts;
  bool fp8, with_topk;
  Route route;
  IndexType index_type = IndexType::kInt64;
  int expert_alignment = 1;
  bool bias = false;
  int num_sms = 24;
};

std::string name(const Case& c) {
  return "tokens" + std::to_string(c.num_tokens) + "_hidden" + std::to_string(c.hidden) + "_topk" +
         std::to_string(c.num_topk) + "_experts" + std::to_string(c.num_experts) + (c.fp8 ? "_fp8" : "_bf16") +
         (c.with_topk ? "_topk" : "_notopk") + "_route" + std::to_string(static_cast<int>(c.route)) +
         (c.index_type == IndexType::kInt32 ? "_i32" : "_i64") + "_sms" + std::to_string(c.num_sms);
}

std::vector<int64_t> routing(const Case& c, int R, uint64_t seed) {
  const int N = c.num_tokens, K = c.num_topk, E = c.num_experts;
  switch (c.route) {
    case Route::kUniform: return uniform_routing(N, K, E, seed);
    case Route::kHot: return hot_expert_routing(N, K, E, 0, seed);
    case Route::kOneRankGetsAll: return single_rank_routing(N, K, E, R, R - 1, seed);
    case Route::kEmptyRank: return empty_ranks_routing(N, K, E, R, seed, {0});
    case Route::kMinusOneRows: return all_minus_one_rows(with_minus_one(uniform_routing(N, K, E, seed), 0.25, seed), K, 4);
  }
  return {};
}

std::vector<ref::RankInput> make_inputs(const Case& c, int R, uint64_t seed) {
  std::vector<ref::RankInput> in(R);
  const int row_bytes = c.hidden * (c.fp8 ? 1 : 2);
  for (int r = 0; r < R; ++r) {
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
  }
  return in;
}

template <typename T>
std::vector<T> download_n(const void* p, size_t n) {
  std::vector<T> v(n);
  if (n) TEST_CUDA_CHECK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// GPU state of one rank's dispatch.
struct Dispatched {
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

  Runner(Buffer& b, const Case& cs, const ref::RankInput& in)
      : buffer(b), c(cs), R(b.num_ranks()), me(b.rank()), input(in), x(in.x), topk64(in.topk_idx),
        weights(in.topk_weights), per_rank(R), per_expert(cs.num_experts),
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
    a.num_experts = c.num_experts;
    a.expert_alignment = c.expert_alignment;
    a.config.num_sms = c.num_sms;
    return a;
  }

  void layout() {
    LayoutArgs la;
    la.topk_idx = topk64.get();
    la.num_tokens = c.num_tokens;
    la.num_topk = c.num_topk;
    la.num_experts = c.num_experts;
    la.num_tokens_per_rank = per_rank.get();
    la.num_tokens_per_expert = per_expert.get();
    la.is_token_in_rank = in_rank.get();
    buffer.get_dispatch_layout(la, buffer.comm_stream());
  }

  void allocate_outputs(Dispatched& d, int rows) {
    const int S = c.fp8 ? c.hidden / 128 : 0;
    d.src_idx = DeviceArray<int>(rows);
    d.recv_x = DeviceArray<uint8_t>(static_cast<size_t>(rows) * c.hidden * (c.fp8 ? 1 : 2));
    d.recv_scales = DeviceArray<uint32_t>(static_cast<size_t>(rows) * S);
    d.recv_topk64 = DeviceArray<int64_t>(static_cast<size_t>(rows) * c.num_topk);
    d.recv_topk32 = DeviceArray<int32_t>(static_cast<size_t>(rows) * c.num_topk);
    d.recv_weights = DeviceArray<float>(static_cast<size_t>(rows) * c.num_topk);
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
void check_dispatch(const Case& c, const Runner& run, Dispatched& d, const ref::RankRecv& e, bool cached,
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

void run_case(Buffer& buffer, const Case& c, uint64_t seed) {
  SCOPED_TRACE(name(c));
  const int R = buffer.num_ranks(), me = buffer.rank();
  const std::vector<ref::RankInput> inputs = make_inputs(c, R, seed);
  ref::NormalConfig cfg;
  cfg.num_ranks = R;
  cfg.num_experts = c.num_experts;
  cfg.hidden = c.hidden;
  cfg.num_topk = c.num_topk;
  cfg.elem_bytes = c.fp8 ? 1 : 2;
  cfg.num_scales = c.fp8 ? c.hidden / 128 : 0;
  cfg.expert_alignment = c.expert_alignment;
  cfg.with_topk = c.with_topk;
  const std::vector<ref::RankRecv> expect = ref::dispatch(inputs, cfg);

  Runner run(buffer, c, inputs[me]);
  Dispatched d;
  run.dispatch(d, 0);
  check_dispatch(c, run, d, expect[me], false, 0);
  if (::testing::Test::HasFailure()) return;

  // Worst-case mode equals exact mode on the valid rows; the tail of topk_idx is -1.
  if (c.with_topk) {
    Dispatched w;
    run.dispatch(w, c.num_tokens * R + 3);
    check_dispatch(c, run, w, expect[me], false, c.num_tokens * R + 3);
  }

  // Cached dispatch of new data with the same handle equals a fresh reference dispatch of that data.
  {
    Case c2 = c;
    std::vector<ref::RankInput> inputs2 = make_inputs(c2, R, seed + 1000);
    for (int r = 0; r < R; ++r) inputs2[r].topk_idx = inputs[r].topk_idx;
    ref::NormalConfig cfg2 = cfg;
    cfg2.with_topk = false;
    const std::vector<ref::RankRecv> expect2 = ref::dispatch(inputs2, cfg2);
    Runner run2(buffer, c, inputs2[me]);
    Dispatched cd;
    cd.handle = d.handle;
    run2.allocate_outputs(cd, d.counts.num_recv_tokens);
    cd.handle.recv_src_idx = d.handle.recv_src_idx;  // the handle keeps its own recv_src_idx
    cd.rank_prefix = DeviceArray<int>(R * R);
    TEST_CUDA_CHECK(cudaMemcpy(cd.rank_prefix.get(), d.rank_prefix.get(), sizeof(int) * R * R, cudaMemcpyDeviceToDevice));
    DispatchArgs a = run2.args(true);
    DispatchOutputs o = run2.outputs(cd);
    buffer.dispatch_cached(a, d.handle, o, buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    cd.src_idx = std::move(d.src_idx);  // compare the handle's src idx (unchanged)
    Case cc = c;
    cc.with_topk = false;
    check_dispatch(cc, run2, cd, expect2[me], true, 0);
    d.src_idx = std::move(cd.src_idx);
    d.handle.recv_src_idx = d.src_idx.get();
  }

  // Combine (BF16): feed back the received rows (as BF16) and weights; compare bitwise with the reference.
  if (!c.fp8) {
    std::vector<ref::CombineInput> cin(R);
    for (int r = 0; r < R; ++r) {
      cin[r].x.resize(expect[r].x.size() / 2);
      std::memcpy(cin[r].x.data(), expect[r].x.data(), expect[r].x.size());
      if (c.with_topk) cin[r].topk_weights = expect[r].topk_weights;
    }
    std::vector<std::vector<uint16_t>> b0, b1;
    if (c.bias) {
      for (int r = 0; r < R; ++r) {
        b0.push_back(random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 3 + r, 1.0f));
        b1.push_back(random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 5 + r, 0.5f));
      }
    }
    const std::vector<ref::CombineOutput> cexp = ref::combine(cin, expect, inputs, cfg, b0, b1);
    DeviceArray<uint16_t> y(cin[me].x), out(static_cast<size_t>(c.num_tokens) * c.hidden);
    DeviceArray<float> w(cin[me].topk_weights), wout(static_cast<size_t>(c.num_tokens) * c.num_topk);
    DeviceArray<uint16_t> bias0(c.bias ? b0[me] : std::vector<uint16_t>{}), bias1(c.bias ? b1[me] : std::vector<uint16_t>{});
    out.poison(), wout.poison();
    CombineArgs ca;
    ca.x = y.get();
    ca.hidden = c.hidden;
    if (c.with_topk) ca.topk_weights = w.get(), ca.num_topk = c.num_topk;  // w may be null with 0 rows
    if (c.bias) ca.bias_0 = bias0.get(), ca.bias_1 = bias1.get();
    ca.config.num_sms = c.num_sms;
    CombineOutputs co;
    co.combined_x = out.get();
    co.combined_topk_weights = wout.get();
    buffer.combine(ca, d.handle, co, buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    const std::vector<uint16_t> got = out.download();
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_EQ(got[i], cexp[me].x[i]) << "combined_x[token " << i / c.hidden << "][" << i % c.hidden << "]";
    if (c.with_topk) EXPECT_EQ(wout.download(), cexp[me].topk_weights);
  }
}

BufferOptions options(double timeout_s = 20.0) {
  BufferOptions o;
  o.num_nvl_bytes = intranode_buffer_size_hint(8, 4096 + 8, 8192, 2, 64, 9);
  o.timeout_seconds = timeout_s;
  return o;
}

TEST(IntranodeMgpu, MatchesReferenceAcrossShapesDtypesAndRoutings) {
  Buffer buffer(world_group(), options());
  const int R = buffer.num_ranks();
  const int E = 64 * R;
  std::vector<Case> cases = {
      {0, 2048, 8, E, false, true, Route::kUniform},
      {1, 2048, 8, E, false, true, Route::kUniform},
      {127, 2560, 4, E, false, true, Route::kHot},
      {127, 7168, 9, E, true, true, Route::kUniform},
      {4096, 7168, 8, E, false, true, Route::kUniform},
      {4096, 7168, 8, E, true, true, Route::kUniform},
      {8192, 7168, 8, E, false, true, Route::kUniform},
      {8192, 4096, 8, E, true, true, Route::kHot, IndexType::kInt32, 1, true, 16},
      {4096, 4096, 8, E, false, false, Route::kOneRankGetsAll},
      {1000, 8192, 1, E, false, true, Route::kEmptyRank},
      {513, 2048, 4, E, true, false, Route::kMinusOneRows},
      {300, 4096, 9, E, false, true, Route::kMinusOneRows, IndexType::kInt32, 4, true, 8},
      {2000, 2560, 8, E, false, true, Route::kUniform, IndexType::kInt32, 128, true, 16},
      {257, 8192, 4, E, true, true, Route::kHot, IndexType::kInt64, 1, false, 2},
  };
  uint64_t seed = 42;
  for (const Case& c : cases) {
    run_case(buffer, c, seed++);
    if (HasFailure()) break;
  }
}

TEST(IntranodeMgpu, ThousandBackToBackCallsWithChangingShapes) {
  Buffer buffer(world_group(), options());
  const int R = buffer.num_ranks();
  std::mt19937 rng(77);  // same sequence of shapes on every rank
  const int hiddens[] = {256, 512, 1024, 2048};
  for (int i = 0; i < 1000; ++i) {
    Case c{static_cast<int>(rng() % 97), hiddens[rng() % 4], 1 + static_cast<int>(rng() % 8), 8 * R,
           false, (rng() % 2) == 0, Route::kUniform};
    c.num_sms = 2 * (1 + static_cast<int>(rng() % 8));
    const std::vector<ref::RankInput> inputs = make_inputs(c, R, 5000 + i);
    ref::NormalConfig cfg;
    cfg.num_ranks = R, cfg.num_experts = c.num_experts, cfg.hidden = c.hidden, cfg.num_topk = c.num_topk;
    cfg.with_topk = c.with_topk;
    const auto expect = ref::dispatch(inputs, cfg);
    Runner run(buffer, c, inputs[buffer.rank()]);
    Dispatched d;
    run.dispatch(d, 0);
    check_dispatch(c, run, d, expect[buffer.rank()], false, 0);
    ASSERT_FALSE(HasFailure()) << "iteration " << i << ": " << name(c);
  }
}

TEST(IntranodeMgpu, MissingPeerGivesTimeoutErrorNotHang) {
  const double timeout_s = 2.0;
  {
    Buffer buffer(world_group(), options(timeout_s));
    if (buffer.rank() == 0) {
      Case c{64, 1024, 2, 8 * buffer.num_ranks(), false, true, Route::kUniform};
      const auto inputs = make_inputs(c, buffer.num_ranks(), 9);
      Runner run(buffer, c, inputs[0]);
      Dispatched d;
      const auto start = std::chrono::steady_clock::now();
      try {
        run.dispatch(d, 0);
        ADD_FAILURE() << "dispatch without peers returned";
      } catch (const Error& e) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
        EXPECT_NE(std::string(e.what()).find("peer"), std::string::npos) << e.what();
        EXPECT_LT(s, timeout_s + 8.0);
      }
    }
    DeviceArray<int> one(1);
    TEST_CUDA_CHECK(cudaMemset(one.get(), 0, 4));
    ASSERT_EQ(ncclAllReduce(one.get(), one.get(), 1, ncclInt, ncclSum, world_group().comm(), nullptr), ncclSuccess);
    TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }
}

}  // namespace
}  // namespace openep::test
