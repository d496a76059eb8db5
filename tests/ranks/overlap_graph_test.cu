// Streams, events and CUDA graphs on several ranks (one process per GPU, or virtual ranks on one GPU;
// common/ranks.hpp): CommScope ordering (previous_event, async_finish) and a captured worst-case dispatch +
// cached dispatch + combine replayed with new data, all against the reference.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "common/gpu_util.hpp"
#include "common/ranks.hpp"
#include "common/routing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/event.hpp"
#include "openep/reference.hpp"

namespace openep::test {
namespace {

constexpr int kHidden = 2048;
constexpr int kTopk = 8;

// Spins for `ns` nanoseconds, then copies src to dst: a producer the consumer must wait for.
__global__ void slow_copy_kernel(uint16_t* dst, const uint16_t* src, size_t n, uint64_t ns) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    uint64_t t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); while (t - t0 < ns);
  }
  __syncthreads();
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}

__global__ void copy_kernel(uint16_t* dst, const uint16_t* src, size_t n) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) dst[i] = src[i];
}

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { (void)cudaStreamDestroy(s); }
};

BufferOptions options() {
  BufferOptions o;
  o.num_nvl_bytes = intranode_buffer_size_hint(8, 1024, kHidden, 2, 0, kTopk);
  o.timeout_seconds = test_timeout(20.0);
  return o;
}

// Every rank's inputs for one round (every rank builds all of them, so the reference needs no communication).
std::vector<ref::RankInput> make_inputs(int R, int N, int E, uint64_t seed) {
  std::vector<ref::RankInput> in(R);
  for (int r = 0; r < R; ++r) {
    in[r].num_tokens = N;
    const std::vector<uint16_t> x = random_bf16(static_cast<size_t>(N) * kHidden, seed * 101 + r, 1.0f);
    in[r].x.resize(x.size() * 2);
    std::memcpy(in[r].x.data(), x.data(), in[r].x.size());
    in[r].topk_idx = uniform_routing(N, kTopk, E, seed * 7 + r);
    in[r].topk_weights = random_weights(static_cast<size_t>(N) * kTopk, seed * 13 + r);
  }
  return in;
}

ref::NormalConfig config(int R, int E) {
  ref::NormalConfig cfg;
  cfg.num_ranks = R, cfg.num_experts = E, cfg.hidden = kHidden, cfg.num_topk = kTopk;
  return cfg;
}

std::vector<uint16_t> as_bf16(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> v(bytes.size() / 2);
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

// Device state of one rank: inputs, layout, handle and outputs, sized for worst-case mode.
struct Rank {
  int R, me, N, E, rows;
  DeviceArray<uint16_t> x, x_staging;
  DeviceArray<int64_t> topk;
  DeviceArray<float> weights;
  DeviceArray<int> per_rank, per_expert, rank_prefix, ntok_src, send_pos, src_idx;
  DeviceArray<bool> in_rank;
  DeviceArray<uint16_t> recv_x, recv_x2, combined;
  DeviceArray<int64_t> recv_topk;
  DeviceArray<float> recv_weights, combined_weights;
  IntranodeHandle handle;

  Rank(int R_, int me_, int N_, int E_, int rows_)
      : R(R_), me(me_), N(N_), E(E_), rows(rows_), x(static_cast<size_t>(N) * kHidden),
        x_staging(static_cast<size_t>(N) * kHidden), topk(static_cast<size_t>(N) * kTopk),
        weights(static_cast<size_t>(N) * kTopk), per_rank(R), per_expert(E), rank_prefix(R * R), ntok_src(R),
        send_pos(static_cast<size_t>(N) * R), src_idx(rows), in_rank(static_cast<size_t>(N) * R),
        recv_x(static_cast<size_t>(rows) * kHidden), recv_x2(static_cast<size_t>(rows) * kHidden),
        combined(static_cast<size_t>(N) * kHidden), recv_topk(static_cast<size_t>(rows) * kTopk),
        recv_weights(static_cast<size_t>(rows) * kTopk), combined_weights(static_cast<size_t>(N) * kTopk) {
    handle.rank_prefix_matrix = rank_prefix.get();
    handle.num_tokens_per_src = ntok_src.get();
    handle.send_pos = send_pos.get();
    handle.recv_src_idx = src_idx.get();
  }

  void upload(const ref::RankInput& in) {
    x.upload(as_bf16(in.x));
    topk.upload(in.topk_idx);
    weights.upload(in.topk_weights);
  }
  void poison_outputs() {
    rank_prefix.poison(), ntok_src.poison(), send_pos.poison(), src_idx.poison(), recv_x.poison(), recv_x2.poison();
    combined.poison(), recv_topk.poison(), recv_weights.poison(), combined_weights.poison();
  }

  LayoutArgs layout_args() {
    LayoutArgs la;
    la.topk_idx = topk.get(), la.num_tokens = N, la.num_topk = kTopk, la.num_experts = E;
    la.num_tokens_per_rank = per_rank.get(), la.num_tokens_per_expert = per_expert.get();
    la.is_token_in_rank = in_rank.get();
    return la;
  }
  DispatchArgs dispatch_args(int num_worst_tokens) {
    DispatchArgs a;
    a.x = x.get(), a.num_tokens = N, a.hidden = kHidden, a.x_elem_bytes = 2;
    a.topk_idx = topk.get(), a.topk_weights = weights.get(), a.num_topk = kTopk;
    a.is_token_in_rank = in_rank.get(), a.num_tokens_per_rank = per_rank.get();
    a.num_tokens_per_expert = per_expert.get(), a.num_experts = E;
    a.num_worst_tokens = num_worst_tokens;
    a.config.num_sms = 8;
    return a;
  }
  DispatchOutputs dispatch_outputs(uint16_t* dst) {
    DispatchOutputs o;
    o.recv_x = dst, o.recv_topk_idx = recv_topk.get(), o.recv_topk_weights = recv_weights.get();
    return o;
  }
  CombineArgs combine_args() {
    CombineArgs ca;
    ca.x = recv_x.get(), ca.hidden = kHidden, ca.topk_weights = recv_weights.get(), ca.num_topk = kTopk;
    ca.config.num_sms = 8;
    return ca;
  }
  CombineOutputs combine_outputs() {
    CombineOutputs co;
    co.combined_x = combined.get(), co.combined_topk_weights = combined_weights.get();
    return co;
  }
};

// Checks the first e.num_recv_tokens rows of a dispatch output and (optionally) the combine output.
void check(Rank& k, const ref::RankRecv& e, const ref::CombineOutput* c, const DeviceArray<uint16_t>& recv_x) {
  const size_t n = static_cast<size_t>(e.num_recv_tokens) * kHidden;
  const std::vector<uint16_t> got = recv_x.download();
  const std::vector<uint16_t> want = as_bf16(e.x);
  ASSERT_EQ(0, std::memcmp(got.data(), want.data(), n * 2)) << "recv_x differs from the reference";
  std::vector<int> src = k.src_idx.download();
  src.resize(e.num_recv_tokens);
  EXPECT_EQ(src, e.src_idx);
  if (c) {
    EXPECT_EQ(k.combined.download(), c->x) << "combined_x differs from the reference";
    EXPECT_EQ(k.combined_weights.download(), c->topk_weights);
  }
}

}  // namespace

OPENEP_RANKS_TEST(Overlap, CommScopeOrdersAgainstComputeStreamAndPreviousEvent) {
  Buffer buffer(world_group(), options());
  const int R = buffer.num_ranks(), me = buffer.rank(), N = 512, E = 16 * R;
  struct Ref {
    std::vector<ref::RankInput> inputs;
    std::vector<ref::RankRecv> expect;
  };
  const auto world = once_per_world<Ref>([&] {
    Ref r;
    r.inputs = make_inputs(R, N, E, 3);
    r.expect = ref::dispatch(r.inputs, config(R, E));
    return r;
  });
  const auto& inputs = world->inputs;
  const auto& expect = world->expect;
  // Three streams per rank (comm, compute, test_stream() as the unrelated one): eight virtual ranks stay well
  // inside the GPU's 32 hardware queues (openep/testing.hpp).
  Stream compute;
  struct {
    cudaStream_t s = test_stream();
  } other;
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant == 0 ? "ordered after compute_stream" : "ordered after previous_event");
    Rank k(R, me, N, E, N * R);
    k.upload(inputs[me]);
    k.x_staging.upload(as_bf16(inputs[me].x));
    k.poison_outputs();
    k.x.poison();  // the real x arrives only through the slow producer on the compute stream
    slow_copy_kernel<<<8, 256, 0, compute.s>>>(k.x.get(), k.x_staging.get(), static_cast<size_t>(N) * kHidden,
                                               20'000'000);  // 20 ms
    TEST_CUDA_CHECK(cudaGetLastError());
    Event produced = Event::record(compute.s);
    StreamOptions so;
    if (variant == 0) {
      so.compute_stream = compute.s;
    } else {
      so.compute_stream = other.s;  // unrelated stream; only the event orders the work
      so.previous_event = &produced;
    }
    so.async_finish = variant == 1;
    Event done;
    {
      CommScope scope(buffer, so);
      buffer.get_dispatch_layout(k.layout_args(), scope.stream());
      const DispatchArgs a = k.dispatch_args(N * R);  // worst-case: no host wait while x is still being produced
      buffer.dispatch_prepare(a, k.handle, scope.stream());
      buffer.dispatch(a, k.handle, k.dispatch_outputs(k.recv_x.get()), scope.stream());
      done = scope.finish();
    }
    if (so.async_finish) done.wait(so.compute_stream);
    // Work enqueued on the caller's stream after the operation sees its results.
    copy_kernel<<<8, 256, 0, so.compute_stream>>>(k.recv_x2.get(), k.recv_x.get(), static_cast<size_t>(N * R) * kHidden);
    TEST_CUDA_CHECK(cudaGetLastError());
    TEST_CUDA_CHECK(cudaStreamSynchronize(so.compute_stream));
    EXPECT_TRUE(done.query());
    buffer.check_device_errors();
    check(k, expect[me], nullptr, k.recv_x2);
    buffer.barrier(buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
  }
}

OPENEP_RANKS_TEST(Overlap, EmptyEventIsRejected) {
  Buffer buffer(world_group(), options());
  Event empty;
  StreamOptions so;
  so.previous_event = &empty;
  try {
    CommScope scope(buffer, so);
    ADD_FAILURE() << "CommScope accepted an empty previous_event";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  EXPECT_THROW(empty.wait(nullptr), Error);
}

// Worst-case dispatch, cached dispatch and combine captured once, replayed with new routing and data. Capture
// is thread-local: on virtual ranks other rank threads keep calling CUDA while this one captures.
// Worst-case dispatch, cached dispatch and combine captured once and replayed with new data. window_tokens > 0: a
// Buffer sized for that many tokens per peer, so every captured operation runs in rounds (a fixed sequence of
// launches from the caller's bounds; nothing is read on the host).
void captured_worst_case_replays(int window_tokens) {
  BufferOptions o = options();
  if (window_tokens > 0) o.num_nvl_bytes = intranode_buffer_size_hint(world_group().num_ranks(), window_tokens,
                                                                       kHidden, 2, 0, kTopk);
  Buffer buffer(world_group(), o);
  const int R = buffer.num_ranks(), me = buffer.rank(), N = 300, E = 16 * R;
  Rank k(R, me, N, E, N * R);
  Stream s;
  // Capture (inputs need not be valid yet: nothing runs until the first replay).
  cudaGraph_t graph = nullptr;
  TEST_CUDA_CHECK(cudaStreamBeginCapture(s.s, cudaStreamCaptureModeThreadLocal));
  try {
    buffer.get_dispatch_layout(k.layout_args(), s.s);
    const DispatchArgs a = k.dispatch_args(N * R);
    buffer.dispatch_prepare(a, k.handle, s.s);
    buffer.dispatch(a, k.handle, k.dispatch_outputs(k.recv_x.get()), s.s);
    DispatchArgs cached = a;
    cached.topk_idx = nullptr, cached.topk_weights = nullptr, cached.num_topk = 0;
    DispatchOutputs co;
    co.recv_x = k.recv_x2.get();
    buffer.dispatch_cached(cached, k.handle, co, s.s);
    buffer.combine(k.combine_args(), k.handle, k.combine_outputs(), s.s);
  } catch (...) {
    (void)cudaStreamEndCapture(s.s, &graph);
    throw;
  }
  TEST_CUDA_CHECK(cudaStreamEndCapture(s.s, &graph));
  cudaGraphExec_t exec = nullptr;
  TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 10; ++replay) {
    SCOPED_TRACE("replay " + std::to_string(replay));
    struct Ref {
      std::vector<ref::RankInput> inputs;
      std::vector<ref::RankRecv> expect;
      std::vector<ref::CombineOutput> cexp;
    };
    const auto world = once_per_world<Ref>([&] {
      Ref r;
      r.inputs = make_inputs(R, N, E, 1000 + replay);
      const auto cfg = config(R, E);
      r.expect = ref::dispatch(r.inputs, cfg);
      std::vector<ref::CombineInput> cin(R);
      for (int q = 0; q < R; ++q) cin[q].x = as_bf16(r.expect[q].x), cin[q].topk_weights = r.expect[q].topk_weights;
      r.cexp = ref::combine(cin, r.expect, r.inputs, cfg);
      return r;
    });
    const auto& inputs = world->inputs;
    const auto& expect = world->expect;
    const auto& cexp = world->cexp;
    k.upload(inputs[me]);
    k.poison_outputs();
    TEST_CUDA_CHECK(cudaGraphLaunch(exec, s.s));
    buffer.synchronize(s.s);
    check(k, expect[me], &cexp[me], k.recv_x);
    check(k, expect[me], nullptr, k.recv_x2);  // cached dispatch of the same x
    if (::testing::Test::HasFailure()) break;
  }
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}

OPENEP_RANKS_TEST(Graph, CapturedWorstCaseCachedDispatchAndCombineReplayWithChangingData) {
  captured_worst_case_replays(0);
}

// The same with a window of 100 tokens per peer: up to 3 rounds of dispatch, cached dispatch and combine per replay.
OPENEP_RANKS_TEST(Graph, CapturedWorstCaseRoundsReplayWithChangingData) { captured_worst_case_replays(100); }

}  // namespace openep::test
