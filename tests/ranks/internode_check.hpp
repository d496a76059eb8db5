// Internode test machinery, shared by the virtual-rank tests with emulated nodes (ranks/internode_test.cu) and the
// fake-node tests (fakenode/fake_node_test.cu): cases, routings, the per-world reference, one rank's dispatch /
// worst-case / cached dispatch / combine checked bitwise against it, outputs poisoned first.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "common/gpu_util.hpp"
#include "common/routing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"
#include "ranks/intranode_check.hpp"

namespace openep::test::internode {

enum class Route { kUniform, kGroupLimited, kOneNodeGetsAll, kEmptyNode, kMinusOneRows, kAllMinusOne };

struct Case {
  int num_tokens, hidden, num_topk, experts_per_rank;
  bool fp8, with_topk;
  Route route;
  bool bias = false;
  int expert_alignment = 1;
  IndexType index_type = IndexType::kInt64;
  int num_sms = 16;
  int num_chunks = 4;  // Config::num_internode_chunks (dispatch and combine)
};

inline std::string name(const Case& c) {
  static const char* routes[] = {"uniform", "group4", "onenode", "emptynode", "minusone", "allminusone"};
  return "tokens" + std::to_string(c.num_tokens) + "_hidden" + std::to_string(c.hidden) + "_topk" +
         std::to_string(c.num_topk) + "_epr" + std::to_string(c.experts_per_rank) + (c.fp8 ? "_fp8" : "_bf16") +
         (c.with_topk ? "" : "_notopk") + "_" + routes[static_cast<int>(c.route)] + (c.bias ? "_bias" : "") +
         (c.index_type == IndexType::kInt32 ? "_i32" : "") + "_align" + std::to_string(c.expert_alignment) +
         (c.num_chunks != 4 ? "_chunks" + std::to_string(c.num_chunks) : "");
}

inline std::vector<int64_t> routing(const Case& c, int R, int M, uint64_t seed) {
  const int T = c.num_tokens, K = c.num_topk, El = c.experts_per_rank, E = El * R, N = R / M;
  std::vector<int> node_ranks;
  switch (c.route) {
    case Route::kUniform: return uniform_routing(T, K, E, seed);
    case Route::kGroupLimited: return group_limited_routing(T, K, R, M, El, 4, seed);
    case Route::kOneNodeGetsAll:
      for (int n = 0; n < N - 1; ++n)
        for (int l = 0; l < M; ++l) node_ranks.push_back(n * M + l);
      return empty_ranks_routing(T, K, E, R, seed, node_ranks);
    case Route::kEmptyNode:
      for (int l = 0; l < M; ++l) node_ranks.push_back(l);
      return empty_ranks_routing(T, K, E, R, seed, node_ranks);
    case Route::kMinusOneRows: return all_minus_one_rows(with_minus_one(uniform_routing(T, K, E, seed), 0.25, seed), K, 4);
    case Route::kAllMinusOne: return std::vector<int64_t>(static_cast<size_t>(T) * K, -1);
  }
  return {};
}

inline intranode::Case as_intranode(const Case& c) {
  intranode::Case i{c.num_tokens, c.hidden, c.num_topk, c.experts_per_rank, c.fp8, c.with_topk,
                    intranode::Route::kUniform};
  i.expert_alignment = c.expert_alignment;
  i.bias = c.bias;
  i.index_type = c.index_type;
  return i;
}

// The reference of one case for every rank (inputs2: new data, same routing, for the cached dispatch).
struct World {
  int R = 0, M = 0;
  std::vector<ref::RankInput> inputs, inputs2;
  std::vector<ref::RankRecv> expect, expect2;
  std::vector<ref::CombineInput> cin;
  std::vector<std::vector<uint16_t>> b0, b1;
  std::vector<ref::CombineOutput> cexp;
  std::vector<std::vector<int>> rdma_counts;  // [R][N] layout's num_tokens_per_rdma_rank per source
};

inline World make_world(const Case& c, int R, int M, uint64_t seed) {
  World w;
  w.R = R, w.M = M;
  const intranode::Case ic = as_intranode(c);
  w.inputs = intranode::make_inputs(ic, R, seed);
  for (int r = 0; r < R; ++r) w.inputs[r].topk_idx = routing(c, R, M, seed * 131 + r);
  const ref::NormalConfig cfg = intranode::normal_config(ic, R);
  w.expect = ref::dispatch(w.inputs, cfg);
  w.inputs2 = intranode::make_inputs(ic, R, seed + 1000);
  for (int r = 0; r < R; ++r) w.inputs2[r].topk_idx = w.inputs[r].topk_idx;
  ref::NormalConfig cfg2 = cfg;
  cfg2.with_topk = false;
  w.expect2 = ref::dispatch(w.inputs2, cfg2);
  for (int r = 0; r < R; ++r)
    w.rdma_counts.push_back(ref::get_dispatch_layout(w.inputs[r].topk_idx, c.num_tokens, c.num_topk,
                                                     c.experts_per_rank * R, R, M).num_tokens_per_rdma_rank);
  if (!c.fp8) {
    w.cin.resize(R);
    for (int r = 0; r < R; ++r) {
      w.cin[r].x.resize(w.expect[r].x.size() / 2);
      std::memcpy(w.cin[r].x.data(), w.expect[r].x.data(), w.expect[r].x.size());
      if (c.with_topk) w.cin[r].topk_weights = w.expect[r].topk_weights;
    }
    if (c.bias)
      for (int r = 0; r < R; ++r) {
        w.b0.push_back(random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 3 + r, 1.0f));
        w.b1.push_back(random_bf16(static_cast<size_t>(c.num_tokens) * c.hidden, seed * 5 + r, 0.5f));
      }
    w.cexp = ref::combine_internode(w.cin, w.expect, w.inputs, cfg, M, w.b0, w.b1);
  }
  return w;
}

// Sized for the case (worst-case mode may add a few rows).
inline BufferOptions options_for(const Case& c, int R, int M, double timeout_s = 30.0) {
  const InternodeBufferSize s =
      internode_buffer_size_hint(R, M, c.num_tokens + 4, c.hidden, c.fp8 ? 1 : 2, c.fp8 ? c.hidden / 128 : 0, c.num_topk);
  BufferOptions o;
  o.num_nvl_bytes = s.num_nvl_bytes;
  o.num_rdma_bytes = s.num_rdma_bytes;
  o.timeout_seconds = test_timeout(timeout_s);
  // OPENEP_TEST_INTERNODE_BACKEND=gin (the fake-node GIN CTest tests): the device-initiated GIN rail instead of
  // the default NCCL send/recv rail.
  const char* backend = std::getenv("OPENEP_TEST_INTERNODE_BACKEND");
  if (backend != nullptr && std::string(backend) == "gin") o.internode_backend = InternodeBackend::kGin;
  return o;
}

// One rank's handle arrays and outputs.
struct Dispatched {
  InternodeHandle handle;
  InternodeDispatchCounts counts;
  DeviceArray<int> send_pos, head, node_prefix, gbl, rdma, mask, src_idx, meta;
  DeviceArray<uint8_t> recv_x;
  DeviceArray<uint32_t> recv_scales;
  DeviceArray<int64_t> recv_topk64;
  DeviceArray<int32_t> recv_topk32;
  DeviceArray<float> recv_weights;
};

struct Runner {
  Buffer& buffer;
  const Case& c;
  int R, me, N;
  intranode::Runner base;  // inputs on the device and DispatchArgs
  DeviceArray<int> per_rdma;

  Runner(Buffer& b, const Case& cs, const ref::RankInput& in, const intranode::Case& ic)
      : buffer(b), c(cs), R(b.num_ranks()), me(b.rank()), N(b.num_nodes()), base(b, ic, in), per_rdma(b.num_nodes()) {}

  DispatchArgs args(bool cached) const {
    DispatchArgs a = base.args(cached);
    a.num_tokens_per_rdma_rank = per_rdma.get();
    a.config.num_sms = c.num_sms;
    a.config.num_internode_chunks = c.num_chunks;
    return a;
  }
  void layout() {
    per_rdma.poison(), base.per_rank.poison(), base.per_expert.poison(), base.in_rank.poison();
    LayoutArgs la;
    la.topk_idx = base.topk64.get();
    la.num_tokens = c.num_tokens;
    la.num_topk = c.num_topk;
    la.num_experts = c.experts_per_rank * R;
    la.num_tokens_per_rank = base.per_rank.get();
    la.num_tokens_per_rdma_rank = per_rdma.get();
    la.num_tokens_per_expert = base.per_expert.get();
    la.is_token_in_rank = base.in_rank.get();
    buffer.get_dispatch_layout(la, buffer.comm_stream());
  }
  void allocate_outputs(Dispatched& d, int rows, int records) {
    const int S = c.fp8 ? c.hidden / 128 : 0;
    d.src_idx = DeviceArray<int>(rows), d.meta = DeviceArray<int>(static_cast<size_t>(rows) * 2);
    d.mask = DeviceArray<int>(records);
    d.recv_x = DeviceArray<uint8_t>(static_cast<size_t>(rows) * c.hidden * (c.fp8 ? 1 : 2));
    d.recv_scales = DeviceArray<uint32_t>(static_cast<size_t>(rows) * S);
    d.recv_topk64 = DeviceArray<int64_t>(static_cast<size_t>(rows) * c.num_topk);
    d.recv_topk32 = DeviceArray<int32_t>(static_cast<size_t>(rows) * c.num_topk);
    d.recv_weights = DeviceArray<float>(static_cast<size_t>(rows) * c.num_topk);
    d.src_idx.poison(), d.meta.poison(), d.mask.poison(), d.recv_x.poison(), d.recv_scales.poison();
    d.recv_topk64.poison(), d.recv_topk32.poison(), d.recv_weights.poison();
    d.handle.recv_src_idx = d.src_idx.get();
    d.handle.recv_src_meta = d.meta.get();
    d.handle.recv_rdma_mask = d.mask.get();
  }
  DispatchOutputs outputs(Dispatched& d) const {
    DispatchOutputs o;
    o.recv_x = d.recv_x.get();
    o.recv_x_scales = d.recv_scales.get();
    o.recv_topk_idx = c.index_type == IndexType::kInt64 ? static_cast<void*>(d.recv_topk64.get()) : d.recv_topk32.get();
    o.recv_topk_weights = d.recv_weights.get();
    return o;
  }
  void dispatch(Dispatched& d, int num_worst_tokens) {
    layout();
    d.send_pos = DeviceArray<int>(static_cast<size_t>(c.num_tokens) * R);
    d.head = DeviceArray<int>(static_cast<size_t>(c.num_tokens) * N);
    d.node_prefix = DeviceArray<int>(static_cast<size_t>(R) * buffer.ranks_per_node());
    d.gbl = DeviceArray<int>(R), d.rdma = DeviceArray<int>(N);
    d.send_pos.poison(), d.head.poison(), d.node_prefix.poison(), d.gbl.poison(), d.rdma.poison();
    d.handle.send_pos = d.send_pos.get(), d.handle.send_rdma_head = d.head.get();
    d.handle.node_prefix = d.node_prefix.get(), d.handle.recv_gbl_rank_prefix_sum = d.gbl.get();
    d.handle.recv_rdma_rank_prefix_sum = d.rdma.get();
    DispatchArgs a = args(false);
    a.num_worst_tokens = num_worst_tokens;
    a.max_tokens_per_rank = num_worst_tokens > 0 ? c.num_tokens + 1 : 0;
    d.counts = buffer.internode_dispatch_prepare(a, d.handle, buffer.comm_stream());
    allocate_outputs(d, d.counts.num_recv_tokens, d.counts.num_rdma_recv_tokens);
    buffer.internode_dispatch(a, d.handle, outputs(d), buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
  }
};

inline void check_dispatch(const Case& c, const World& w, int me, const Runner& /*run*/, Dispatched& d,
                           const ref::RankRecv& e, bool cached, int num_worst_tokens) {
  const int R = w.R, rows = e.num_recv_tokens;
  const int S = c.fp8 ? c.hidden / 128 : 0;
  if (num_worst_tokens == 0 && !cached) {
    ASSERT_EQ(d.counts.num_recv_tokens, rows);
    EXPECT_EQ(d.counts.num_recv_tokens_per_expert, e.num_recv_tokens_per_expert);
    // Records forwarded: tokens of my rail sources sent to my node.
    const int M = w.M, my_node = me / M;
    int records = 0;
    for (int n = 0; n < R / M; ++n) records += w.rdma_counts[n * M + me % M][my_node];
    EXPECT_EQ(d.counts.num_rdma_recv_tokens, records);
  }
  const std::vector<int> gbl = d.gbl.download();
  for (int s = 0; s < R; ++s) ASSERT_EQ(gbl[s], e.rank_prefix[s]) << "recv_gbl_rank_prefix_sum[" << s << "]";
  const size_t row_bytes = static_cast<size_t>(c.hidden) * (c.fp8 ? 1 : 2);
  const std::vector<uint8_t> x = intranode::download_n<uint8_t>(d.recv_x.get(), rows * row_bytes);
  for (int r = 0; r < rows; ++r)
    ASSERT_EQ(0, std::memcmp(x.data() + r * row_bytes, e.x.data() + r * row_bytes, row_bytes))
        << "recv_x row " << r << " (from rank " << e.src_rank[r] << ", token " << e.src_idx[r] << ")";
  EXPECT_EQ(intranode::download_n<int>(d.src_idx.get(), rows), e.src_idx);
  {
    const std::vector<int> meta = intranode::download_n<int>(d.meta.get(), static_cast<size_t>(rows) * 2);
    for (int r = 0; r < rows; ++r) ASSERT_EQ(meta[2 * r], e.src_rank[r]) << "recv_src_meta[" << r << "].rank";
  }
  if (S) EXPECT_EQ(intranode::download_n<uint32_t>(d.recv_scales.get(), static_cast<size_t>(rows) * S), e.x_scales);
  if (c.with_topk && !cached) {
    std::vector<int64_t> idx;
    const size_t n = static_cast<size_t>(std::max(rows, num_worst_tokens)) * c.num_topk;
    if (c.index_type == IndexType::kInt64) {
      idx = intranode::download_n<int64_t>(d.recv_topk64.get(), n);
    } else {
      const auto v = intranode::download_n<int32_t>(d.recv_topk32.get(), n);
      idx.assign(v.begin(), v.end());
    }
    const std::vector<int64_t> valid(idx.begin(), idx.begin() + static_cast<size_t>(rows) * c.num_topk);
    EXPECT_EQ(valid, e.topk_idx);
    EXPECT_EQ(intranode::download_n<float>(d.recv_weights.get(), static_cast<size_t>(rows) * c.num_topk), e.topk_weights);
    for (size_t i = static_cast<size_t>(rows) * c.num_topk; i < n; ++i) ASSERT_EQ(idx[i], -1) << "padded slot " << i;
  }
}

// Exact dispatch, worst-case dispatch (equals exact), cached dispatch of new data, combine (bitwise against
// ref::combine_internode), and a second combine on the same handle (determinism).
inline void run_case(Buffer& buffer, const Case& c, const World& w) {
  SCOPED_TRACE(name(c));
  const int me = buffer.rank(), R = w.R;
  ASSERT_TRUE(buffer.is_internode());
  ASSERT_EQ(buffer.ranks_per_node(), w.M);
  const intranode::Case ic = as_intranode(c);
  Runner run(buffer, c, w.inputs[me], ic);
  run.base.topk64.upload(w.inputs[me].topk_idx);
  {
    std::vector<int32_t> t32(w.inputs[me].topk_idx.begin(), w.inputs[me].topk_idx.end());
    run.base.topk32.upload(t32);
  }
  Dispatched d;
  run.dispatch(d, 0);
  // The layout's node counts equal the reference's.
  EXPECT_EQ(run.per_rdma.download(), w.rdma_counts[me]);
  check_dispatch(c, w, me, run, d, w.expect[me], false, 0);
  if (::testing::Test::HasFailure()) return;

  if (c.with_topk) {
    Dispatched wc;
    run.dispatch(wc, c.num_tokens * R + 3);
    check_dispatch(c, w, me, run, wc, w.expect[me], false, c.num_tokens * R + 3);
    if (::testing::Test::HasFailure()) return;
  }

  {  // cached: new data, the handle's layout
    Runner run2(buffer, c, w.inputs2[me], ic);
    Dispatched cd;
    cd.handle = d.handle;
    run2.allocate_outputs(cd, d.counts.num_recv_tokens, 0);
    cd.handle = d.handle;  // the handle keeps its own arrays
    cd.gbl = DeviceArray<int>(R);
    copy_device_to_device(cd.gbl.get(), d.gbl.get(), sizeof(int) * R);
    buffer.internode_dispatch_cached(run2.args(true), d.handle, run2.outputs(cd), buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    cd.src_idx = std::move(d.src_idx);
    cd.meta = std::move(d.meta);
    Case cc = c;
    cc.with_topk = false;
    check_dispatch(cc, w, me, run2, cd, w.expect2[me], true, 0);
    d.src_idx = std::move(cd.src_idx);
    d.meta = std::move(cd.meta);
    if (::testing::Test::HasFailure()) return;
  }

  if (!c.fp8) {
    DeviceArray<uint16_t> y(w.cin[me].x), out(static_cast<size_t>(c.num_tokens) * c.hidden);
    DeviceArray<float> wts(w.cin[me].topk_weights), wout(static_cast<size_t>(c.num_tokens) * c.num_topk);
    DeviceArray<uint16_t> bias0(c.bias ? w.b0[me] : std::vector<uint16_t>{});
    DeviceArray<uint16_t> bias1(c.bias ? w.b1[me] : std::vector<uint16_t>{});
    for (int round = 0; round < 2; ++round) {
      out.poison(), wout.poison();
      CombineArgs ca;
      ca.x = y.get();
      ca.hidden = c.hidden;
      if (c.with_topk) ca.topk_weights = wts.get(), ca.num_topk = c.num_topk;
      if (c.bias) ca.bias_0 = bias0.get(), ca.bias_1 = bias1.get();
      ca.config.num_sms = c.num_sms;
      ca.config.num_internode_chunks = c.num_chunks;
      CombineOutputs co;
      co.combined_x = out.get();
      co.combined_topk_weights = wout.get();
      buffer.internode_combine(ca, d.handle, co, buffer.comm_stream());
      buffer.synchronize(buffer.comm_stream());
      const std::vector<uint16_t> got = out.download();
      for (size_t i = 0; i < got.size(); ++i)
        ASSERT_EQ(got[i], w.cexp[me].x[i]) << "round " << round << ": combined_x[token " << i / c.hidden << "]["
                                           << i % c.hidden << "]";
      if (c.with_topk) EXPECT_EQ(wout.download(), w.cexp[me].topk_weights) << "round " << round;
    }
  }
}

// The shapes: tokens 0, 1, 127, 4096; hidden 2048 and 7168; top-k 1, 8, 9; BF16 and FP8; every routing.
inline std::vector<std::pair<std::string, Case>> cases() {
  const std::vector<Case> list = {
      {0, 2048, 8, 8, false, true, Route::kUniform},
      {1, 2048, 8, 8, false, true, Route::kUniform, true},
      {127, 7168, 9, 8, false, true, Route::kGroupLimited, true},
      {127, 7168, 9, 8, true, true, Route::kGroupLimited},
      {300, 2048, 1, 8, false, true, Route::kUniform, false, 4},
      {300, 2048, 8, 8, false, false, Route::kOneNodeGetsAll},
      {300, 2048, 8, 8, true, false, Route::kEmptyNode},
      {257, 2048, 8, 8, false, true, Route::kMinusOneRows, true, 1, IndexType::kInt32},
      {64, 2048, 8, 8, false, true, Route::kAllMinusOne, true},
      {4096, 7168, 8, 16, false, true, Route::kGroupLimited},
      {4096, 7168, 8, 16, true, true, Route::kGroupLimited},
      // Chunks of the network leg: none, an odd count that leaves short and empty chunks, more chunks than some
      // nodes have records.
      {300, 2048, 8, 8, false, true, Route::kGroupLimited, false, 1, IndexType::kInt64, 16, 1},
      {257, 2048, 8, 8, true, true, Route::kUniform, true, 1, IndexType::kInt64, 16, 3},
      {33, 2048, 4, 8, false, true, Route::kEmptyNode, false, 1, IndexType::kInt64, 16, 16},
  };
  std::vector<std::pair<std::string, Case>> named;
  for (const Case& c : list) named.emplace_back(name(c), c);
  return named;
}

// A world holds at most kWorldTokens tokens (host memory of the reference).
inline Case for_world(Case c, int R) {
  constexpr int kWorldTokens = 16384;
  if (static_cast<long long>(c.num_tokens) * R > kWorldTokens) c.num_tokens = kWorldTokens / R;
  return c;
}

inline uint64_t seed_of(const Case& c) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : name(c)) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  return 7 + h % 100000;
}

}  // namespace openep::test::internode
