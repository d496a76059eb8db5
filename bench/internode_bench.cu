// openep_internode_bench: internode dispatch/combine next to NCCL point-to-point of the same workload, in a
// multi-node world (real nodes, or fake ones: tools/launch.py --ranks-per-node M, docs/fake-nodes.md).
//
//   python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 -- build/bench/openep_internode_bench
//
// DeepSeek-V3 setting by default: 4096 tokens per rank, hidden 7168 BF16, top-8 of 256 experts, group-limited to
// 4 nodes. Each operation is first checked once against the CPU reference (a wrong answer ends the run with a
// non-zero exit); then the median of --reps repetitions (host wall clock around the operation and a stream
// synchronisation: exact-mode dispatch waits on the host anyway; the slowest rank's median) is reported with the
// bytes that crossed nodes per rank: OpenEP sends one record per (token, remote node), NCCL one row per
// (token, remote rank). In a fake-node world the network is loopback TCP and processes time-slice one GPU:
// the times say NOTHING about RDMA speed, only about the bytes and the code paths.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/launcher_env.hpp"
#include "common/routing.hpp"
#include "nccl_baseline.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"
#include "runtime/check.hpp"

namespace openep::bench {
namespace {

struct Options {
  int num_tokens = 4096, hidden = 7168, num_topk = 8, num_experts = 256, groups = 4, num_sms = 24;
  int warmup = 2, reps = 10;
  std::string results, commit = "unknown";
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--tokens") o.num_tokens = std::stoi(next());
    else if (a == "--hidden") o.hidden = std::stoi(next());
    else if (a == "--topk") o.num_topk = std::stoi(next());
    else if (a == "--experts") o.num_experts = std::stoi(next());
    else if (a == "--groups") o.groups = std::stoi(next());
    else if (a == "--sms") o.num_sms = std::stoi(next());
    else if (a == "--warmup") o.warmup = std::stoi(next());
    else if (a == "--reps") o.reps = std::stoi(next());
    else if (a == "--results") o.results = next();
    else if (a == "--commit") o.commit = next();
    else
      throw std::runtime_error("usage: openep_internode_bench [--tokens N] [--hidden H] [--topk K] [--experts E] "
                               "[--groups G] [--sms S] [--warmup W] [--reps R] [--results FILE.jsonl] [--commit SHA]");
  }
  return o;
}

template <typename T>
T* device_copy(const std::vector<T>& v) {
  T* p = nullptr;
  OPENEP_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * v.size() + 16));
  if (!v.empty()) OPENEP_CUDA_CHECK(cudaMemcpy(p, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice));
  return p;
}
template <typename T>
T* device_alloc(size_t n) {
  T* p = nullptr;
  OPENEP_CUDA_CHECK(cudaMalloc(&p, sizeof(T) * n + 16));
  return p;
}
template <typename T>
std::vector<T> host_copy(const T* p, size_t n) {
  std::vector<T> v(n);
  if (n) OPENEP_CUDA_CHECK(cudaMemcpy(v.data(), p, sizeof(T) * n, cudaMemcpyDeviceToHost));
  return v;
}

class Bench {
 public:
  Bench(const Options& o, const test::LauncherEnv& env) : o_(o), env_(env) {
    OPENEP_CUDA_CHECK(cudaSetDevice(env.local_rank));
    cudaDeviceProp prop{};
    OPENEP_CUDA_CHECK(cudaGetDeviceProperties(&prop, env.local_rank));
    card_ = prop.name;
    group_ = Group::create(test::exchange_unique_id(env.rank, "internode_bench"), env.rank, env.world_size,
                           env.local_rank);
    R_ = group_->num_ranks();
    M_ = group_->num_nvlink_ranks();
    N_ = R_ / M_;
    if (N_ < 2) throw std::runtime_error("one node: start with tools/launch.py --ranks-per-node M (fake nodes)");
    const InternodeBufferSize s =
        internode_buffer_size_hint(R_, M_, o.num_tokens, o.hidden, 2, 0, o.num_topk);
    BufferOptions bo;
    bo.num_nvl_bytes = s.num_nvl_bytes;
    bo.num_rdma_bytes = s.num_rdma_bytes;
    bo.timeout_seconds = 120;  // processes share GPUs and sockets
    buffer_ = std::make_unique<Buffer>(*group_, bo);
    stream_ = buffer_->comm_stream();
    scalar_ = device_alloc<double>(1);
  }

  int run() {
    const int T = o_.num_tokens, K = o_.num_topk, E = o_.num_experts, H = o_.hidden, me = env_.rank;
    // Every rank rebuilds every rank's inputs from the seeds (the reference needs no communication).
    std::vector<ref::RankInput> in(R_);
    for (int r = 0; r < R_; ++r) {
      in[r].num_tokens = T;
      in[r].topk_idx = test::group_limited_routing(T, K, R_, M_, E / R_, o_.groups, 1000 + r);
      const std::vector<uint16_t> x = test::random_bf16(static_cast<size_t>(T) * H, 2000 + r, 1.0f);
      in[r].x.resize(x.size() * 2);
      std::memcpy(in[r].x.data(), x.data(), in[r].x.size());
      in[r].topk_weights = test::random_weights(static_cast<size_t>(T) * K, 3000 + r);
    }
    ref::NormalConfig cfg;
    cfg.num_ranks = R_, cfg.num_experts = E, cfg.hidden = H, cfg.num_topk = K;
    const std::vector<ref::RankRecv> want = ref::dispatch(in, cfg);
    const ref::Layout layout = ref::get_dispatch_layout(in[me].topk_idx, T, K, E, R_, M_);

    // Bytes that leave this rank's node (payload rows only).
    const double row = 2.0 * H;
    double openep_cross = 0, nccl_cross = 0;
    for (int m = 0; m < N_; ++m)
      if (m != me / M_) openep_cross += row * layout.num_tokens_per_rdma_rank[m];
    for (int r = 0; r < R_; ++r)
      if (r / M_ != me / M_) nccl_cross += row * layout.num_tokens_per_rank[r];

    // ---- OpenEP ----
    x_ = device_copy(std::vector<uint16_t>(reinterpret_cast<const uint16_t*>(in[me].x.data()),
                                           reinterpret_cast<const uint16_t*>(in[me].x.data()) + in[me].x.size() / 2));
    topk_ = device_copy(in[me].topk_idx);
    weights_ = device_copy(in[me].topk_weights);
    per_rank_ = device_alloc<int>(R_), per_rdma_ = device_alloc<int>(N_), per_expert_ = device_alloc<int>(E);
    in_rank_ = device_alloc<bool>(static_cast<size_t>(T) * R_);
    h_.send_pos = device_alloc<int>(static_cast<size_t>(T) * R_);
    h_.send_rdma_head = device_alloc<int>(static_cast<size_t>(T) * N_);
    h_.node_prefix = device_alloc<int>(static_cast<size_t>(R_) * M_);
    h_.recv_gbl_rank_prefix_sum = device_alloc<int>(R_);
    h_.recv_rdma_rank_prefix_sum = device_alloc<int>(N_);
    // Outputs sized for the worst case once (every rank sends every token here), so repetitions reuse them.
    const size_t rows_max = static_cast<size_t>(T) * R_;
    h_.recv_rdma_mask = device_alloc<int>(static_cast<size_t>(T) * N_);
    h_.recv_src_idx = device_alloc<int>(rows_max);
    h_.recv_src_meta = device_alloc<int>(2 * rows_max);
    recv_x_ = device_alloc<uint16_t>(rows_max * H);
    recv_topk_ = device_alloc<int64_t>(rows_max * K);
    recv_w_ = device_alloc<float>(rows_max * K);
    combined_ = device_alloc<uint16_t>(static_cast<size_t>(T) * H);
    combined_w_ = device_alloc<float>(static_cast<size_t>(T) * K);
    auto dispatch = [&] {
      LayoutArgs la;
      la.topk_idx = topk_, la.num_tokens = T, la.num_topk = K, la.num_experts = E;
      la.num_tokens_per_rank = per_rank_, la.num_tokens_per_rdma_rank = per_rdma_;
      la.num_tokens_per_expert = per_expert_, la.is_token_in_rank = in_rank_;
      buffer_->get_dispatch_layout(la, stream_);
      DispatchArgs a = args();
      buffer_->internode_dispatch_prepare(a, h_, stream_);
      DispatchOutputs out;
      out.recv_x = recv_x_, out.recv_topk_idx = recv_topk_, out.recv_topk_weights = recv_w_;
      buffer_->internode_dispatch(a, h_, out, stream_);
      buffer_->synchronize(stream_);
    };
    auto combine = [&] {
      CombineArgs ca;
      ca.x = recv_x_, ca.hidden = H, ca.topk_weights = recv_w_, ca.num_topk = K;
      ca.config.num_sms = o_.num_sms;
      CombineOutputs co;
      co.combined_x = combined_, co.combined_topk_weights = combined_w_;
      buffer_->internode_combine(ca, h_, co, stream_);
      buffer_->synchronize(stream_);
    };
    // Outputs poisoned (0xFF: NaN / -1) before the checked calls, so a row the kernels never wrote cannot pass.
    const size_t rows_poison = static_cast<size_t>(T) * R_;
    OPENEP_CUDA_CHECK(cudaMemset(recv_x_, 0xFF, rows_poison * H * sizeof(uint16_t)));
    OPENEP_CUDA_CHECK(cudaMemset(recv_w_, 0xFF, rows_poison * K * sizeof(float)));
    OPENEP_CUDA_CHECK(cudaMemset(combined_, 0xFF, static_cast<size_t>(T) * H * sizeof(uint16_t)));
    OPENEP_CUDA_CHECK(cudaMemset(combined_w_, 0xFF, static_cast<size_t>(T) * K * sizeof(float)));
    dispatch();
    check_dispatch(want[me]);
    combine();
    check_combine(in, want, cfg);
    const double d_us = time_us(dispatch), c_us = time_us(combine);

    // ---- NCCL point-to-point on the world communicator, same routing ----
    std::vector<int> pack_pos(static_cast<size_t>(T) * R_, -1), send_counts(R_, 0), offsets(R_, 0);
    for (int r = 0, acc = 0; r < R_; ++r) offsets[r] = acc, acc += layout.num_tokens_per_rank[r];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R_; ++r)
        if (layout.is_token_in_rank[static_cast<size_t>(t) * R_ + r]) pack_pos[t * R_ + r] = offsets[r] + send_counts[r]++;
    NcclBaseline nccl(group_->comm(), me, R_, T, H, pack_pos, send_counts, stream_);
    auto nccl_dispatch = [&] {
      nccl.dispatch(x_);
      OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    };
    nccl_dispatch();
    const std::vector<uint16_t> got = host_copy(nccl.recv_x(), static_cast<size_t>(nccl.num_recv()) * H);
    require(nccl.num_recv() == want[me].num_recv_tokens &&
                std::memcmp(got.data(), want[me].x.data(), got.size() * 2) == 0,
            "NCCL baseline dispatch differs from the reference");
    auto nccl_combine = [&] {
      nccl.combine(nccl.recv_x());
      OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    };
    const double nd_us = time_us(nccl_dispatch), nc_us = time_us(nccl_combine);

    report("internode_dispatch", d_us, openep_cross, "openep");
    report("internode_combine", c_us, openep_cross, "openep");
    report("internode_dispatch", nd_us, nccl_cross, "nccl_p2p");
    report("internode_combine", nc_us, nccl_cross, "nccl_p2p");
    return 0;
  }

 private:
  DispatchArgs args() const {
    DispatchArgs a;
    a.x = x_, a.num_tokens = o_.num_tokens, a.hidden = o_.hidden, a.x_elem_bytes = 2;
    a.topk_idx = topk_, a.topk_weights = weights_, a.num_topk = o_.num_topk;
    a.is_token_in_rank = in_rank_, a.num_tokens_per_rank = per_rank_, a.num_tokens_per_rdma_rank = per_rdma_;
    a.num_tokens_per_expert = per_expert_, a.num_experts = o_.num_experts;
    a.config.num_sms = o_.num_sms;
    return a;
  }

  void check_dispatch(const ref::RankRecv& want) {
    require(h_.num_recv_tokens == want.num_recv_tokens, "internode dispatch row count");
    const std::vector<uint16_t> got = host_copy(recv_x_, static_cast<size_t>(h_.num_recv_tokens) * o_.hidden);
    require(std::memcmp(got.data(), want.x.data(), got.size() * 2) == 0, "internode dispatch rows differ from the reference");
  }

  void check_combine(const std::vector<ref::RankInput>& in, const std::vector<ref::RankRecv>& want,
                     const ref::NormalConfig& cfg) {
    std::vector<ref::CombineInput> cin(R_);
    for (int r = 0; r < R_; ++r) {
      cin[r].x.resize(want[r].x.size() / 2);
      std::memcpy(cin[r].x.data(), want[r].x.data(), want[r].x.size());
      cin[r].topk_weights = want[r].topk_weights;
    }
    const std::vector<ref::CombineOutput> c = ref::combine_internode(cin, want, in, cfg, M_);
    const std::vector<uint16_t> got = host_copy(combined_, static_cast<size_t>(o_.num_tokens) * o_.hidden);
    require(got == c[env_.rank].x, "internode combine differs from ref::combine_internode");
    const std::vector<float> got_w = host_copy(combined_w_, static_cast<size_t>(o_.num_tokens) * o_.num_topk);
    require(std::memcmp(got_w.data(), c[env_.rank].topk_weights.data(), got_w.size() * sizeof(float)) == 0 &&
                got_w.size() == c[env_.rank].topk_weights.size(),
            "internode combined top-k weights differ from ref::combine_internode");
  }

  double time_us(const std::function<void()>& fn) {
    for (int i = 0; i < o_.warmup; ++i) fn();
    std::vector<double> us(o_.reps);
    for (int i = 0; i < o_.reps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      us[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    }
    std::sort(us.begin(), us.end());
    double v = us[us.size() / 2];
    OPENEP_CUDA_CHECK(cudaMemcpy(scalar_, &v, sizeof(double), cudaMemcpyHostToDevice));
    OPENEP_NCCL_CHECK(ncclAllReduce(scalar_, scalar_, 1, ncclFloat64, ncclMax, group_->comm(), stream_));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    OPENEP_CUDA_CHECK(cudaMemcpy(&v, scalar_, sizeof(double), cudaMemcpyDeviceToHost));
    return v;
  }

  void require(bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("rank " + std::to_string(env_.rank) + ": correctness check failed: " + what);
  }

  void report(const std::string& op, double us, double cross_bytes, const std::string& impl) {
    if (env_.rank != 0) return;
    char line[1024];
    std::snprintf(line, sizeof(line),
                  "{\"op\": \"%s\", \"impl\": \"%s\", \"us\": %.1f, \"cross_node_MB_per_rank\": %.2f, \"ranks\": %d, "
                  "\"ranks_per_node\": %d, \"tokens\": %d, \"hidden\": %d, \"topk\": %d, \"experts\": %d, "
                  "\"groups\": %d, \"sms\": %d, \"card\": \"%s\", \"commit\": \"%s\", "
                  "\"note\": \"loopback sockets on fake nodes: says nothing about RDMA speed\"}",
                  op.c_str(), impl.c_str(), us, cross_bytes / 1e6, R_, M_, o_.num_tokens, o_.hidden, o_.num_topk,
                  o_.num_experts, o_.groups, impl == "openep" ? o_.num_sms : 0, card_.c_str(), o_.commit.c_str());
    std::printf("%s\n", line);
    if (!o_.results.empty()) std::ofstream(o_.results, std::ios::app) << line << "\n";
  }

  Options o_;
  test::LauncherEnv env_;
  std::string card_;
  std::unique_ptr<Group> group_;
  std::unique_ptr<Buffer> buffer_;
  cudaStream_t stream_ = nullptr;
  int R_ = 0, M_ = 0, N_ = 0;
  double* scalar_ = nullptr;
  uint16_t *x_ = nullptr, *recv_x_ = nullptr, *combined_ = nullptr;
  int64_t *topk_ = nullptr, *recv_topk_ = nullptr;
  float *weights_ = nullptr, *recv_w_ = nullptr, *combined_w_ = nullptr;
  int *per_rank_ = nullptr, *per_rdma_ = nullptr, *per_expert_ = nullptr;
  bool* in_rank_ = nullptr;
  InternodeHandle h_;
};

}  // namespace
}  // namespace openep::bench

int main(int argc, char** argv) {
  try {
    const auto opts = openep::bench::parse(argc, argv);
    const auto env = openep::test::read_launcher_env();
    openep::bench::Bench bench(opts, env);
    return bench.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "openep_internode_bench: %s\n", e.what());
    return 1;
  }
}
