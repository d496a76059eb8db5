// openep_bench: OpenEP's main job. Run on all local GPUs through tools/launch.py (one process per GPU);
// tools/run_bench.sh builds and starts it.
//
// For each operation it first checks the result once against the CPU reference (a wrong answer aborts the
// run with a non-zero exit), then times many repetitions with CUDA events after a warm-up and reports the
// median (the slowest rank's median). Every OpenEP operation is measured next to the same routed workload
// through NCCL point-to-point (bench/nccl_baseline.hpp). Rank 0 prints a table and one JSON line per row,
// and appends the JSON lines to --results when given.
//
// Bandwidth accounting (DeepEP's): logical GB/s = all bytes received by a rank (its own tokens included) /
// time; NVLink GB/s = the bytes that crossed NVLink into the rank / time.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/compare.hpp"
#include "common/launcher_env.hpp"
#include "common/routing.hpp"
#include "event_timing.hpp"
#include "nccl_baseline.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"
#include "runtime/check.hpp"

namespace openep::bench {
namespace {

struct Options {
  std::string ops = "layout,dispatch,dispatch_fp8,combine";
  std::vector<int> sms = {4, 8, 12, 16, 24};  // the SM sweep of normal mode (issue 16's 4 .. 24)
  int num_tokens = 4096, hidden = 7168, num_topk = 8, num_experts = 256;
  int warmup = 10, reps = 30;
  std::string results;   // JSONL file to append to (rank 0)
  std::string commit = "unknown";
  int ll_tokens = 128, ll_experts = 288;  // low-latency ops (hidden and top-k are shared)
  // Also time intranode dispatch with window-backed outputs (BufferOptions::num_recv_pool_bytes, Buffer::alloc_recv),
  // rows "openep-pool", next to the caller-memory rows "openep" of the same run.
  bool pool = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error("missing value after " + a);
      return argv[++i];
    };
    if (a == "--ops") o.ops = next();
    else if (a == "--tokens") o.num_tokens = std::stoi(next());
    else if (a == "--hidden") o.hidden = std::stoi(next());
    else if (a == "--topk") o.num_topk = std::stoi(next());
    else if (a == "--experts") o.num_experts = std::stoi(next());
    else if (a == "--warmup") o.warmup = std::stoi(next());
    else if (a == "--reps") o.reps = std::stoi(next());
    else if (a == "--results") o.results = next();
    else if (a == "--commit") o.commit = next();
    else if (a == "--ll-tokens") o.ll_tokens = std::stoi(next());
    else if (a == "--ll-experts") o.ll_experts = std::stoi(next());
    else if (a == "--pool") o.pool = true;
    else if (a == "--sms") {
      o.sms.clear();
      std::stringstream ss(next());
      std::string v;
      while (std::getline(ss, v, ',')) o.sms.push_back(std::stoi(v));
    }
    else if (a == "--help" || a == "-h") {
      std::printf("openep_bench [--ops layout,dispatch,combine] [--tokens N] [--hidden H] [--topk K] [--experts E]\n"
                  "             [--warmup W] [--reps R] [--results FILE.jsonl] [--commit SHA] [--sms 4,8,12,16,24]\n"
                  "             [--ll-tokens 128] [--ll-experts 288] [--pool]\n"
                  "             (low-latency ops ll_dispatch, ll_combine, ll_combine_logfmt, ll_hook, ll_graph)\n");
      std::exit(0);
    } else {
      throw std::runtime_error("unknown argument " + a);
    }
  }
  return o;
}

struct Row {
  std::string op, impl, dtype;
  int num_sms = 0;
  double us = 0, logical_bytes = 0, nvlink_bytes = 0;
};

class Bench {
 public:
  Bench(const Options& o, const test::LauncherEnv& env) : o_(o), env_(env) {
    OPENEP_CUDA_CHECK(cudaSetDevice(env.local_rank));
    cudaDeviceProp prop{};
    OPENEP_CUDA_CHECK(cudaGetDeviceProperties(&prop, env.local_rank));
    card_ = prop.name;
    group_ = Group::create(test::exchange_unique_id(env.rank, "bench"), env.rank, env.world_size, env.local_rank);
    BufferOptions bo;
    bo.num_nvl_bytes = intranode_buffer_size_hint(env.world_size, o.num_tokens, o.hidden, 2, o.hidden / 128, o.num_topk);
    if (o.pool) {  // recv_x, scales, top-k ids (int64) and weights, recv_src_idx for N x R rows, 256-byte pieces
      const size_t rows = static_cast<size_t>(o.num_tokens) * env.world_size;
      const size_t row = static_cast<size_t>(o.hidden) * 2 + (o.hidden / 128) * 4 + o.num_topk * 12 + 4;
      bo.num_recv_pool_bytes = (rows * row + 8 * 256 + 127) / 128 * 128;
    }
    buffer_ = std::make_unique<Buffer>(*group_, bo);
    stream_ = buffer_->comm_stream();
    OPENEP_CUDA_CHECK(cudaMalloc(&scalar_, sizeof(double)));
    make_workload();
  }
  ~Bench() { cudaFree(scalar_); }

  int run() {
    std::stringstream ops(o_.ops);
    std::string op;
    while (std::getline(ops, op, ',')) {
      if (op == "layout") bench_layout();
      else if (op == "dispatch") bench_nccl_dispatch(), bench_openep_dispatch(false);
      else if (op == "dispatch_fp8") bench_openep_dispatch(true);
      else if (op == "combine") bench_nccl_combine(), bench_openep_combine();
      else if (op == "ll_dispatch") bench_ll_nccl(), bench_ll_dispatch();
      else if (op == "ll_combine") bench_ll_combine();
      else if (op == "ll_combine_logfmt") bench_ll_combine_logfmt();
      else if (op == "ll_hook") bench_ll_hook();
      else if (op == "ll_graph") bench_ll_graph();
      else throw std::runtime_error("unknown op " + op);
    }
    report();
    return 0;
  }

 private:
  // Every rank can rebuild every rank's inputs from the seeds, so the reference needs no communication.
  std::vector<int64_t> routing_of(int r) const {
    return test::uniform_routing(o_.num_tokens, o_.num_topk, o_.num_experts, 1000 + r);
  }
  std::vector<uint16_t> tokens_of(int r) const {
    return test::random_bf16(static_cast<size_t>(o_.num_tokens) * o_.hidden, 2000 + r, 1.0f);
  }

  void make_workload() {
    const int R = env_.world_size, N = o_.num_tokens;
    topk_ = routing_of(env_.rank);
    x_host_ = tokens_of(env_.rank);
    layout_ = ref::get_dispatch_layout(topk_, N, o_.num_topk, o_.num_experts, R);
    pack_pos_.assign(static_cast<size_t>(N) * R, -1);
    send_counts_.assign(R, 0);
    std::vector<int> offsets(R, 0);
    for (int r = 0, acc = 0; r < R; ++r) offsets[r] = acc, acc += layout_.num_tokens_per_rank[r];
    for (int t = 0; t < N; ++t)
      for (int r = 0; r < R; ++r)
        if (layout_.is_token_in_rank[static_cast<size_t>(t) * R + r]) pack_pos_[t * R + r] = offsets[r] + send_counts_[r]++;
    OPENEP_CUDA_CHECK(cudaMalloc(&x_, sizeof(uint16_t) * x_host_.size() + 16));
    OPENEP_CUDA_CHECK(cudaMemcpy(x_, x_host_.data(), sizeof(uint16_t) * x_host_.size(), cudaMemcpyHostToDevice));
    OPENEP_CUDA_CHECK(cudaMalloc(&topk_dev_, sizeof(int64_t) * topk_.size() + 8));
    OPENEP_CUDA_CHECK(cudaMemcpy(topk_dev_, topk_.data(), sizeof(int64_t) * topk_.size(), cudaMemcpyHostToDevice));
  }

  // Median of per-repetition event times; the slowest rank's median is reported.
  double time_us(const std::function<void()>& fn) {
    return max_over_ranks(median_event_us(stream_, o_.warmup, o_.reps, fn,
                                          [&] { OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_)); }));
  }

  double max_over_ranks(double v) {
    OPENEP_CUDA_CHECK(cudaMemcpy(scalar_, &v, sizeof(double), cudaMemcpyHostToDevice));
    OPENEP_NCCL_CHECK(ncclAllReduce(scalar_, scalar_, 1, ncclFloat64, ncclMax, group_->comm(), stream_));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    OPENEP_CUDA_CHECK(cudaMemcpy(&v, scalar_, sizeof(double), cudaMemcpyDeviceToHost));
    return v;
  }

  void require(bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("rank " + std::to_string(env_.rank) + ": correctness check failed: " + what);
  }

  void bench_layout() {
    const int R = env_.world_size, N = o_.num_tokens, E = o_.num_experts;
    int *per_rank = nullptr, *per_rdma = nullptr, *per_expert = nullptr;
    bool* in_rank = nullptr;
    OPENEP_CUDA_CHECK(cudaMalloc(&per_rank, sizeof(int) * R));
    OPENEP_CUDA_CHECK(cudaMalloc(&per_rdma, sizeof(int) * (buffer_->num_nodes() + 1)));
    OPENEP_CUDA_CHECK(cudaMalloc(&per_expert, sizeof(int) * E));
    OPENEP_CUDA_CHECK(cudaMalloc(&in_rank, static_cast<size_t>(N) * R + 1));
    LayoutArgs a;
    a.topk_idx = topk_dev_;
    a.num_tokens = N;
    a.num_topk = o_.num_topk;
    a.num_experts = E;
    a.num_tokens_per_rank = per_rank;
    a.num_tokens_per_rdma_rank = buffer_->is_internode() ? per_rdma : nullptr;
    a.num_tokens_per_expert = per_expert;
    a.is_token_in_rank = in_rank;
    OPENEP_CUDA_CHECK(cudaMemset(per_expert, 0xA5, sizeof(int) * E));
    buffer_->get_dispatch_layout(a, stream_);
    buffer_->synchronize(stream_);
    std::vector<int> got_rank(R), got_expert(E);
    std::vector<uint8_t> got_mask(static_cast<size_t>(N) * R);
    OPENEP_CUDA_CHECK(cudaMemcpy(got_rank.data(), per_rank, sizeof(int) * R, cudaMemcpyDeviceToHost));
    OPENEP_CUDA_CHECK(cudaMemcpy(got_expert.data(), per_expert, sizeof(int) * E, cudaMemcpyDeviceToHost));
    OPENEP_CUDA_CHECK(cudaMemcpy(got_mask.data(), in_rank, got_mask.size(), cudaMemcpyDeviceToHost));
    require(got_rank == layout_.num_tokens_per_rank && got_expert == layout_.num_tokens_per_expert &&
                got_mask == layout_.is_token_in_rank,
            "get_dispatch_layout differs from the reference");
    const double us = time_us([&] { buffer_->get_dispatch_layout(a, stream_); });
    buffer_->synchronize(stream_);
    rows_.push_back({"layout", "openep", "int64", 0, us, 0, 0});
    cudaFree(per_rank), cudaFree(per_rdma), cudaFree(per_expert), cudaFree(in_rank);
  }

  // Reference dispatch of every rank's tokens (BF16, no top-k payload): what this rank must receive.
  const ref::RankRecv& reference_recv() {
    if (!ref_recv_.empty()) return ref_recv_[env_.rank];
    const int R = env_.world_size;
    ref::NormalConfig cfg;
    cfg.num_ranks = R;
    cfg.num_experts = o_.num_experts;
    cfg.hidden = o_.hidden;
    cfg.num_topk = o_.num_topk;
    cfg.elem_bytes = 2;
    cfg.with_topk = false;
    ref_cfg_ = cfg;
    ref_inputs_.resize(R);
    for (int r = 0; r < R; ++r) {
      ref::RankInput& in = ref_inputs_[r];
      in.num_tokens = o_.num_tokens;
      const std::vector<uint16_t> x = tokens_of(r);
      in.x.resize(x.size() * 2);
      std::memcpy(in.x.data(), x.data(), in.x.size());
      in.topk_idx = routing_of(r);
    }
    ref_recv_ = ref::dispatch(ref_inputs_, cfg);
    return ref_recv_[env_.rank];
  }

  NcclBaseline& baseline() {
    if (!nccl_)
      nccl_ = std::make_unique<NcclBaseline>(group_->comm(), env_.rank, env_.world_size, o_.num_tokens, o_.hidden,
                                             pack_pos_, send_counts_, stream_);
    return *nccl_;
  }

  double recv_bytes(int num_rows) const { return static_cast<double>(num_rows) * o_.hidden * 2; }

  void bench_nccl_dispatch() {
    NcclBaseline& nb = baseline();
    const ref::RankRecv& expect = reference_recv();
    OPENEP_CUDA_CHECK(cudaMemsetAsync(nb.recv_x(), 0xA5, recv_bytes(o_.num_tokens * env_.world_size), stream_));
    nb.dispatch(x_);
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require(nb.num_recv() == expect.num_recv_tokens, "NCCL dispatch received " + std::to_string(nb.num_recv()) +
                                                         " rows, reference " + std::to_string(expect.num_recv_tokens));
    std::vector<uint8_t> got(expect.x.size());
    OPENEP_CUDA_CHECK(cudaMemcpy(got.data(), nb.recv_x(), got.size(), cudaMemcpyDeviceToHost));
    require(got == expect.x, "NCCL dispatch rows differ from the reference");
    const double us = time_us([&] { nb.dispatch(x_); });
    const int remote = nb.num_recv() - nb.num_recv_from(env_.rank);
    rows_.push_back({"dispatch", "nccl", "bf16", 0, us, recv_bytes(nb.num_recv()), recv_bytes(remote)});
  }

  void bench_nccl_combine() {
    NcclBaseline& nb = baseline();
    reference_recv();
    nb.dispatch(x_);  // sets the receive layout; the expert output is the received rows themselves
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const int R = env_.world_size;
    std::vector<ref::CombineInput> cin(R);
    for (int r = 0; r < R; ++r) {
      cin[r].x.resize(ref_recv_[r].x.size() / 2);
      std::memcpy(cin[r].x.data(), ref_recv_[r].x.data(), ref_recv_[r].x.size());
    }
    const std::vector<ref::CombineOutput> expect = ref::combine(cin, ref_recv_, ref_inputs_, ref_cfg_);
    OPENEP_CUDA_CHECK(cudaMemsetAsync(nb.combined_x(), 0xA5, recv_bytes(o_.num_tokens), stream_));
    nb.combine(nb.recv_x());
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<uint16_t> got(expect[env_.rank].x.size());
    OPENEP_CUDA_CHECK(cudaMemcpy(got.data(), nb.combined_x(), got.size() * 2, cudaMemcpyDeviceToHost));
    require(got == expect[env_.rank].x, "NCCL combine differs from the reference");
    const double us = time_us([&] { nb.combine(nb.recv_x()); });
    const int remote = nb.num_recv() - nb.num_recv_from(env_.rank);
    rows_.push_back({"combine", "nccl", "bf16", 0, us, recv_bytes(nb.num_recv()), recv_bytes(remote)});
  }

  // OpenEP exact-mode dispatch (count exchange + host wait + data), the DeepEP call being replaced.
  struct OpenepDispatch {
    IntranodeHandle handle;
    int *rank_prefix = nullptr, *ntok_src = nullptr, *send_pos = nullptr, *src_idx = nullptr;
    int *per_rank = nullptr, *per_expert = nullptr;
    bool* in_rank = nullptr;
    void *recv_x = nullptr, *recv_scales = nullptr, *x_fp8 = nullptr, *scales = nullptr, *recv_topk = nullptr;
    float *weights = nullptr, *recv_weights = nullptr;
    // --pool: the same outputs (and recv_src_idx) from Buffer::alloc_recv
    void *pool_x = nullptr, *pool_scales = nullptr, *pool_topk = nullptr, *pool_weights = nullptr;
    int* pool_src_idx = nullptr;
  };

  DispatchArgs dispatch_args(OpenepDispatch& d, bool fp8, int num_sms) {
    DispatchArgs a;
    a.x = fp8 ? d.x_fp8 : static_cast<const void*>(x_);
    a.num_tokens = o_.num_tokens;
    a.hidden = o_.hidden;
    a.x_elem_bytes = fp8 ? 1 : 2;
    if (fp8) a.x_scales = d.scales, a.num_scales = o_.hidden / 128, a.scale_token_stride = o_.hidden / 128;
    a.topk_idx = topk_dev_;
    a.topk_weights = d.weights;
    a.num_topk = o_.num_topk;
    a.is_token_in_rank = d.in_rank;
    a.num_tokens_per_rank = d.per_rank;
    a.num_tokens_per_expert = d.per_expert;
    a.num_experts = o_.num_experts;
    a.config.num_sms = num_sms;
    return a;
  }

  OpenepDispatch& openep_state() {
    if (od_) return *od_;
    od_ = std::make_unique<OpenepDispatch>();
    OpenepDispatch& d = *od_;
    const int R = env_.world_size, N = o_.num_tokens, H = o_.hidden, K = o_.num_topk;
    const size_t rows = static_cast<size_t>(N) * R;
    OPENEP_CUDA_CHECK(cudaMalloc(&d.rank_prefix, sizeof(int) * R * R));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.ntok_src, sizeof(int) * R));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.send_pos, sizeof(int) * rows + 4));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.src_idx, sizeof(int) * rows + 4));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.per_rank, sizeof(int) * R));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.per_expert, sizeof(int) * o_.num_experts));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.in_rank, rows + 1));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.recv_x, rows * H * 2 + 16));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.recv_scales, rows * (H / 128) * 4 + 16));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.x_fp8, static_cast<size_t>(N) * H + 16));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.scales, static_cast<size_t>(N) * (H / 128) * 4 + 16));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.recv_topk, rows * K * 8 + 16));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.weights, static_cast<size_t>(N) * K * 4 + 16));
    OPENEP_CUDA_CHECK(cudaMalloc(&d.recv_weights, rows * K * 4 + 16));
    OPENEP_CUDA_CHECK(cudaMemset(d.x_fp8, 0x3c, static_cast<size_t>(N) * H));
    OPENEP_CUDA_CHECK(cudaMemset(d.scales, 0x3c, static_cast<size_t>(N) * (H / 128) * 4));
    OPENEP_CUDA_CHECK(cudaMemset(d.weights, 0x3c, static_cast<size_t>(N) * K * 4));
    if (o_.pool) {
      auto take = [&](size_t bytes) {
        void* p = buffer_->alloc_recv(bytes);
        require(p != nullptr, "alloc_recv(" + std::to_string(bytes) + ") found no room");
        return p;
      };
      d.pool_x = take(rows * H * 2), d.pool_scales = take(rows * (H / 128) * 4), d.pool_topk = take(rows * K * 8);
      d.pool_weights = take(rows * K * 4), d.pool_src_idx = static_cast<int*>(take(rows * 4));
    }
    d.handle.rank_prefix_matrix = d.rank_prefix;
    d.handle.num_tokens_per_src = d.ntok_src;
    d.handle.send_pos = d.send_pos;
    d.handle.recv_src_idx = d.src_idx;
    LayoutArgs la;
    la.topk_idx = topk_dev_;
    la.num_tokens = N;
    la.num_topk = K;
    la.num_experts = o_.num_experts;
    la.num_tokens_per_rank = d.per_rank;
    la.num_tokens_per_rdma_rank = nullptr;
    la.num_tokens_per_expert = d.per_expert;
    la.is_token_in_rank = d.in_rank;
    buffer_->get_dispatch_layout(la, stream_);
    buffer_->synchronize(stream_);
    return d;
  }

  DispatchOutputs dispatch_outputs(OpenepDispatch& d) {
    DispatchOutputs out;
    out.recv_x = use_pool_ ? d.pool_x : d.recv_x;
    out.recv_x_scales = use_pool_ ? d.pool_scales : d.recv_scales;
    out.recv_topk_idx = use_pool_ ? d.pool_topk : d.recv_topk;
    out.recv_topk_weights = static_cast<float*>(use_pool_ ? d.pool_weights : d.recv_weights);
    d.handle.recv_src_idx = use_pool_ ? d.pool_src_idx : d.src_idx;
    return out;
  }

  int openep_dispatch_once(OpenepDispatch& d, bool fp8, int sms) {
    const DispatchArgs a = dispatch_args(d, fp8, sms);
    const DispatchCounts c = buffer_->dispatch_prepare(a, d.handle, stream_);
    buffer_->dispatch(a, d.handle, dispatch_outputs(d), stream_);
    return c.num_recv_tokens;
  }

  void bench_openep_dispatch(bool fp8) {
    bench_openep_dispatch(fp8, false);
    if (o_.pool) bench_openep_dispatch(fp8, true);
  }

  // One sweep of exact-mode dispatch, outputs in caller memory or (pool) window-backed.
  void bench_openep_dispatch(bool fp8, bool pool) {
    OpenepDispatch& d = openep_state();
    use_pool_ = pool;
    const ref::RankRecv& expect = reference_recv();
    void* recv_x = pool ? d.pool_x : d.recv_x;
    OPENEP_CUDA_CHECK(cudaMemset(recv_x, 0xA5, recv_bytes(expect.num_recv_tokens)));
    const int rows = openep_dispatch_once(d, fp8, o_.sms.front());
    buffer_->synchronize(stream_);
    require(rows == expect.num_recv_tokens, "OpenEP dispatch row count differs from the reference");
    if (!fp8) {
      std::vector<uint8_t> got(expect.x.size());
      OPENEP_CUDA_CHECK(cudaMemcpy(got.data(), recv_x, got.size(), cudaMemcpyDeviceToHost));
      require(got == expect.x, std::string("OpenEP dispatch rows differ from the reference") +
                                   (pool ? " (window-backed outputs)" : ""));
    }
    const int remote = rows - expect.num_recv_from_rank[env_.rank];
    // DeepEP's accounting: FP8 bytes = BF16 bytes x (1 + 4/128) / 2.
    const double factor = fp8 ? (1.0 + 4.0 / 128) / 2 : 1.0;
    for (int sms : o_.sms) {
      const double us = time_us([&] { openep_dispatch_once(d, fp8, sms); });
      buffer_->synchronize(stream_);
      rows_.push_back({"dispatch", pool ? "openep-pool" : "openep", fp8 ? "fp8" : "bf16", sms, us,
                       recv_bytes(rows) * factor, recv_bytes(remote) * factor});
    }
    use_pool_ = false;
  }

  void bench_openep_combine() {
    OpenepDispatch& d = openep_state();
    reference_recv();
    const int rows = openep_dispatch_once(d, false, o_.sms.front());
    buffer_->synchronize(stream_);
    const int R = env_.world_size;
    std::vector<ref::CombineInput> cin(R);
    for (int r = 0; r < R; ++r) {
      cin[r].x.resize(ref_recv_[r].x.size() / 2);
      std::memcpy(cin[r].x.data(), ref_recv_[r].x.data(), ref_recv_[r].x.size());
    }
    const std::vector<ref::CombineOutput> expect = ref::combine(cin, ref_recv_, ref_inputs_, ref_cfg_);
    uint16_t* out = nullptr;
    OPENEP_CUDA_CHECK(cudaMalloc(&out, recv_bytes(o_.num_tokens) + 16));
    CombineArgs ca;
    ca.x = static_cast<const uint16_t*>(d.recv_x);
    ca.hidden = o_.hidden;
    CombineOutputs co;
    co.combined_x = out;
    ca.config.num_sms = o_.sms.front();
    OPENEP_CUDA_CHECK(cudaMemset(out, 0xA5, recv_bytes(o_.num_tokens)));
    buffer_->combine(ca, d.handle, co, stream_);
    buffer_->synchronize(stream_);
    std::vector<uint16_t> got(expect[env_.rank].x.size());
    OPENEP_CUDA_CHECK(cudaMemcpy(got.data(), out, got.size() * 2, cudaMemcpyDeviceToHost));
    require(got == expect[env_.rank].x, "OpenEP combine differs from the reference");
    const int remote = rows - ref_recv_[env_.rank].num_recv_from_rank[env_.rank];
    for (int sms : o_.sms) {
      ca.config.num_sms = sms;
      const double us = time_us([&] { buffer_->combine(ca, d.handle, co, stream_); });
      buffer_->synchronize(stream_);
      rows_.push_back({"combine", "openep", "bf16", sms, us, recv_bytes(rows), recv_bytes(remote)});
    }
    cudaFree(out);
  }

#include "bench_low_latency.inc"

  void report() {
    if (env_.rank != 0) return;
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
    std::printf("\nOpenEP benchmark: %d x %s, tokens %d, hidden %d, top-%d of %d experts, commit %s\n",
                env_.world_size, card_.c_str(), o_.num_tokens, o_.hidden, o_.num_topk, o_.num_experts,
                o_.commit.c_str());
    std::printf("low-latency ops (ll_*): %d tokens per rank, top-%d of %d experts, FP8 dispatch unless marked\n",
                o_.ll_tokens, o_.num_topk, o_.ll_experts);
    // SM-us = SMs x us: the SM time an operation holds (its kernels run within num_sms SMs); blank where the SM
    // count is not OpenEP's to set (NCCL, the low-latency kernels' own grids).
    std::printf("%-10s %-11s %-6s %4s %10s %12s %12s %10s\n", "op", "impl", "dtype", "SMs", "us", "logical GB/s",
                "NVLink GB/s", "SM-us");
    std::ofstream out;
    if (!o_.results.empty()) out.open(o_.results, std::ios::app);
    for (const Row& r : rows_) {
      const double lg = r.logical_bytes / (r.us * 1e3), nv = r.nvlink_bytes / (r.us * 1e3);
      const double sm_us = r.num_sms * r.us;
      char sm_us_text[32] = "";
      if (r.num_sms > 0) std::snprintf(sm_us_text, sizeof(sm_us_text), "%.0f", sm_us);
      std::printf("%-10s %-11s %-6s %4d %10.1f %12.1f %12.1f %10s\n", r.op.c_str(), r.impl.c_str(), r.dtype.c_str(),
                  r.num_sms, r.us, lg, nv, sm_us_text);
      const bool ll = r.op.rfind("ll_", 0) == 0;  // low-latency rows use the --ll-* shapes
      std::ostringstream js;
      js << "{\"date\":\"" << date << "\",\"card\":\"" << card_ << "\",\"num_gpus\":" << env_.world_size
         << ",\"commit\":\"" << o_.commit << "\",\"op\":\"" << r.op << "\",\"impl\":\"" << r.impl
         << "\",\"num_tokens\":" << (ll ? o_.ll_tokens : o_.num_tokens) << ",\"hidden\":" << o_.hidden
         << ",\"num_topk\":" << o_.num_topk << ",\"num_experts\":" << (ll ? o_.ll_experts : o_.num_experts) << ",\"num_sms\":" << r.num_sms << ",\"dtype\":\"" << r.dtype
         << "\",\"us\":" << r.us << ",\"logical_gbps\":" << lg << ",\"nvlink_gbps\":" << nv << ",\"sm_us\":";
      if (r.num_sms > 0) js << sm_us;
      else js << "null";
      js << "}";
      std::printf("JSON %s\n", js.str().c_str());
      if (out) out << js.str() << "\n";
    }
  }

  Options o_;
  test::LauncherEnv env_;
  std::string card_;
  std::unique_ptr<Group> group_;
  std::unique_ptr<Buffer> buffer_;
  cudaStream_t stream_ = nullptr;
  double* scalar_ = nullptr;
  std::vector<int64_t> topk_;
  std::vector<uint16_t> x_host_;
  ref::Layout layout_;
  std::vector<int> pack_pos_, send_counts_;
  uint16_t* x_ = nullptr;
  int64_t* topk_dev_ = nullptr;
  std::unique_ptr<NcclBaseline> nccl_;
  std::unique_ptr<OpenepDispatch> od_;
  bool use_pool_ = false;  // dispatch_outputs: window-backed outputs (--pool)
  ref::NormalConfig ref_cfg_;
  std::vector<ref::RankInput> ref_inputs_;
  std::vector<ref::RankRecv> ref_recv_;
  std::vector<Row> rows_;
  std::unique_ptr<LLBench> ll_;
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
    std::fprintf(stderr, "openep_bench: %s\n", e.what());
    return 1;
  }
}
