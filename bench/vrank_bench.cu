// SM cost of intranode normal mode on ONE GPU, through virtual ranks (openep/testing.hpp).
//
// Not the benchmark (bench/bench.cu is; it needs one GPU per rank). Here the R ranks of an EP world share one GPU,
// so every "remote" store is a local HBM store: the times say what the kernels cost in SMs (they are SM-bound on
// one GPU, and on NVLink too at few SMs, docs/normal-mode-scaling.md), not how fast the link is. Use it to compare
// kernel designs and window sizes within one run; never quote it as an NVLink figure.
//
//   openep_vrank_bench [--ranks R] [--tokens T] [--hidden H] [--topk K] [--experts E] [--sms 4,8,12]
//                      [--window full|deepep] [--pool] [--reps N] [--warmup N] [--results FILE.jsonl] [--commit SHA]
// --pool: the dispatch outputs (and the handle's recv_src_idx) come from BufferOptions::num_recv_pool_bytes
// (Buffer::alloc_recv), so the peers store rows straight into them and nothing is copied out of the window.
// --window deepep: num_nvl_bytes = DeepEP V1's hint for its default configs (rounds when the batch exceeds it);
// full (default): OpenEP's hint for the batch (one round).
// Each rank times its operation with events on its stream (exact-mode dispatch = count exchange + host wait +
// data; combine); the slowest rank's median is printed. SM counts above the virtual-rank grid cap are skipped.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "common/routing.hpp"
#include "event_timing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"
#include "openep/testing.hpp"
#include "runtime/check.hpp"

namespace openep::bench {
namespace {

struct Options {
  int num_ranks = 2, num_tokens = 4096, hidden = 7168, num_topk = 8, num_experts = 256;
  std::vector<int> sms = {4, 8, 12, 16, 24};
  std::string window = "full";
  bool pool = false;  // dispatch outputs from Buffer::alloc_recv (window-backed)
  int warmup = 3, reps = 10;
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
    if (a == "--ranks") o.num_ranks = std::stoi(next());
    else if (a == "--tokens") o.num_tokens = std::stoi(next());
    else if (a == "--hidden") o.hidden = std::stoi(next());
    else if (a == "--topk") o.num_topk = std::stoi(next());
    else if (a == "--experts") o.num_experts = std::stoi(next());
    else if (a == "--window") o.window = next();
    else if (a == "--pool") o.pool = true;
    else if (a == "--warmup") o.warmup = std::stoi(next());
    else if (a == "--reps") o.reps = std::stoi(next());
    else if (a == "--results") o.results = next();
    else if (a == "--commit") o.commit = next();
    else if (a == "--sms") {
      o.sms.clear();
      std::stringstream ss(next());
      for (std::string s; std::getline(ss, s, ',');) o.sms.push_back(std::stoi(s));
    } else throw std::runtime_error("unknown argument " + a);
  }
  if (o.window != "full" && o.window != "deepep") throw std::runtime_error("--window must be full or deepep");
  return o;
}

struct Row {
  std::string op, dtype;
  int sms;
  double us;
};

// One virtual rank's part: inputs, outputs, handle, timing.
class RankBench {
 public:
  RankBench(const Options& o, int rank, Group& g) : o_(o) {
    BufferOptions bo;
    const int R = o.num_ranks;
    bo.num_nvl_bytes = o.window == "deepep"
                           ? std::max(deepep_nvl_buffer_size_hint(get_dispatch_config(R), 2 * o.hidden, R),
                                      deepep_nvl_buffer_size_hint(get_combine_config(R), 2 * o.hidden, R))
                           : intranode_buffer_size_hint(R, o.num_tokens, o.hidden, 2, o.hidden / 128, o.num_topk);
    bo.timeout_seconds = 60;
    const size_t all_rows = static_cast<size_t>(o.num_tokens) * R;
    const size_t pool_need = all_rows * (static_cast<size_t>(o.hidden) * 2 + (o.hidden / 128) * 4 + o.num_topk * 12 + 4) +
                             8 * 256;
    if (o.pool) bo.num_recv_pool_bytes = (pool_need + 127) / 128 * 128;
    nvl_bytes_ = bo.num_nvl_bytes;
    buffer_ = std::make_unique<Buffer>(g, bo);
    s_ = buffer_->comm_stream();
    const int N = o.num_tokens, H = o.hidden, K = o.num_topk;
    const size_t rows = static_cast<size_t>(N) * R;
    topk_host_ = test::uniform_routing(N, K, o.num_experts, 1000 + rank);
    x_host_ = test::random_bf16(static_cast<size_t>(N) * H, 2000 + rank, 1.0f);
    alloc(&x_, x_host_.size() * 2, x_host_.data());
    alloc(&topk_, topk_host_.size() * 8, topk_host_.data());
    alloc(&weights_, static_cast<size_t>(N) * K * 4), fill(weights_, static_cast<size_t>(N) * K * 4);
    alloc(&x_fp8_, static_cast<size_t>(N) * H), fill(x_fp8_, static_cast<size_t>(N) * H);
    alloc(&scales_, static_cast<size_t>(N) * (H / 128) * 4), fill(scales_, static_cast<size_t>(N) * (H / 128) * 4);
    alloc(&per_rank_, 4 * R), alloc(&per_expert_, 4 * o.num_experts), alloc(&in_rank_, rows);
    alloc(&rank_prefix_, 4 * R * R), alloc(&ntok_src_, 4 * R), alloc(&send_pos_, 4 * rows);
    alloc(&combined_, static_cast<size_t>(N) * H * 2);
    output(&src_idx_, 4 * rows), output(&recv_x_, rows * H * 2), output(&recv_scales_, rows * (H / 128) * 4);
    output(&recv_topk_, rows * K * 8), output(&recv_weights_, rows * K * 4);
    h_.rank_prefix_matrix = static_cast<int*>(rank_prefix_), h_.num_tokens_per_src = static_cast<int*>(ntok_src_);
    h_.send_pos = static_cast<int*>(send_pos_), h_.recv_src_idx = static_cast<int*>(src_idx_);
    LayoutArgs la;
    la.topk_idx = topk_, la.num_tokens = N, la.num_topk = K, la.num_experts = o.num_experts;
    la.num_tokens_per_rank = static_cast<int*>(per_rank_), la.num_tokens_per_expert = static_cast<int*>(per_expert_);
    la.is_token_in_rank = static_cast<bool*>(in_rank_);
    buffer_->get_dispatch_layout(la, s_);
    buffer_->synchronize(s_);
  }
  ~RankBench() {
    for (void* p : owned_) cudaFreeAsync(p, s_);
    for (void* p : pooled_) buffer_->free_recv(p, s_);
    cudaStreamSynchronize(s_);
  }

  size_t nvl_bytes() const { return nvl_bytes_; }
  int num_recv() const { return num_recv_; }

  DispatchArgs dispatch_args(bool fp8, int sms) const {
    DispatchArgs a;
    a.x = fp8 ? x_fp8_ : x_;
    a.num_tokens = o_.num_tokens, a.hidden = o_.hidden, a.x_elem_bytes = fp8 ? 1 : 2;
    if (fp8) a.x_scales = scales_, a.num_scales = o_.hidden / 128, a.scale_token_stride = o_.hidden / 128;
    a.topk_idx = topk_, a.topk_weights = static_cast<const float*>(weights_), a.num_topk = o_.num_topk;
    a.is_token_in_rank = static_cast<const bool*>(in_rank_);
    a.num_tokens_per_rank = static_cast<const int*>(per_rank_);
    a.num_tokens_per_expert = static_cast<const int*>(per_expert_);
    a.num_experts = o_.num_experts;
    a.config.num_sms = sms;
    return a;
  }
  void dispatch(bool fp8, int sms) {
    const DispatchArgs a = dispatch_args(fp8, sms);
    num_recv_ = buffer_->dispatch_prepare(a, h_, s_).num_recv_tokens;
    DispatchOutputs out;
    out.recv_x = recv_x_, out.recv_x_scales = fp8 ? recv_scales_ : nullptr;
    out.recv_topk_idx = recv_topk_, out.recv_topk_weights = static_cast<float*>(recv_weights_);
    buffer_->dispatch(a, h_, out, s_);
  }
  void combine(int sms) {
    CombineArgs ca;
    ca.x = static_cast<const uint16_t*>(recv_x_), ca.hidden = o_.hidden, ca.config.num_sms = sms;
    CombineOutputs co;
    co.combined_x = static_cast<uint16_t*>(combined_);
    buffer_->combine(ca, h_, co, s_);
  }
  std::vector<uint8_t> download_recv_x() {
    buffer_->synchronize(s_);
    std::vector<uint8_t> v(static_cast<size_t>(num_recv_) * o_.hidden * 2);
    OPENEP_CUDA_CHECK(cudaMemcpy(v.data(), recv_x_, v.size(), cudaMemcpyDeviceToHost));
    return v;
  }
  std::vector<uint16_t> download_combined() {
    buffer_->synchronize(s_);
    std::vector<uint16_t> v(static_cast<size_t>(o_.num_tokens) * o_.hidden);
    OPENEP_CUDA_CHECK(cudaMemcpy(v.data(), combined_, v.size() * 2, cudaMemcpyDeviceToHost));
    return v;
  }
  void poison() {
    OPENEP_CUDA_CHECK(cudaMemsetAsync(recv_x_, 0xA5, static_cast<size_t>(o_.num_tokens) * o_.num_ranks * o_.hidden * 2, s_));
    OPENEP_CUDA_CHECK(cudaMemsetAsync(combined_, 0xA5, static_cast<size_t>(o_.num_tokens) * o_.hidden * 2, s_));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(s_));
  }

  // Median event time of fn over the repetitions (warm-up first); every rank runs the same sequence.
  double time_us(const std::function<void()>& fn) {
    return median_event_us(s_, o_.warmup, o_.reps, fn, [&] { buffer_->synchronize(s_); });
  }

 private:
  void alloc(void** p, size_t bytes, const void* host = nullptr) {
    OPENEP_CUDA_CHECK(cudaMallocAsync(p, bytes + 16, s_));
    owned_.push_back(*p);
    if (host) OPENEP_CUDA_CHECK(cudaMemcpyAsync(*p, host, bytes, cudaMemcpyHostToDevice, s_));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(s_));
  }
  // A dispatch output: window-backed with --pool, else own memory.
  void output(void** p, size_t bytes) {
    if (!o_.pool) return alloc(p, bytes);
    *p = buffer_->alloc_recv(bytes);
    if (!*p) throw std::runtime_error("alloc_recv(" + std::to_string(bytes) + ") found no room");
    pooled_.push_back(*p);
  }
  void fill(void* p, size_t bytes) {
    OPENEP_CUDA_CHECK(cudaMemsetAsync(p, 0x3c, bytes, s_));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(s_));
  }

  const Options& o_;
  std::unique_ptr<Buffer> buffer_;
  cudaStream_t s_ = nullptr;
  size_t nvl_bytes_ = 0;
  std::vector<int64_t> topk_host_;
  std::vector<uint16_t> x_host_;
  std::vector<void*> owned_, pooled_;
  void *x_ = nullptr, *topk_ = nullptr, *weights_ = nullptr, *x_fp8_ = nullptr, *scales_ = nullptr;
  void *per_rank_ = nullptr, *per_expert_ = nullptr, *in_rank_ = nullptr;
  void *rank_prefix_ = nullptr, *ntok_src_ = nullptr, *send_pos_ = nullptr, *src_idx_ = nullptr;
  void *recv_x_ = nullptr, *recv_scales_ = nullptr, *recv_topk_ = nullptr, *recv_weights_ = nullptr;
  void* combined_ = nullptr;
  IntranodeHandle h_;
  int num_recv_ = 0;
};

int run(const Options& o) {
  testing::VirtualFabricOptions fo;
  fo.num_ranks = o.num_ranks;
  testing::VirtualFabric fab(fo);
  const int R = o.num_ranks, cap = fab.max_blocks_per_rank();
  // The reference (BF16 rows, no top-k payload) of every rank, for the correctness check before timing.
  ref::NormalConfig cfg;
  cfg.num_ranks = R, cfg.num_experts = o.num_experts, cfg.hidden = o.hidden, cfg.num_topk = o.num_topk;
  cfg.elem_bytes = 2, cfg.with_topk = false;
  std::vector<ref::RankInput> inputs(R);
  for (int r = 0; r < R; ++r) {
    const std::vector<uint16_t> x = test::random_bf16(static_cast<size_t>(o.num_tokens) * o.hidden, 2000 + r, 1.0f);
    inputs[r].num_tokens = o.num_tokens;
    inputs[r].x.resize(x.size() * 2);
    std::memcpy(inputs[r].x.data(), x.data(), inputs[r].x.size());
    inputs[r].topk_idx = test::uniform_routing(o.num_tokens, o.num_topk, o.num_experts, 1000 + r);
  }
  const std::vector<ref::RankRecv> recv = ref::dispatch(inputs, cfg);
  std::vector<ref::CombineInput> cin(R);
  for (int r = 0; r < R; ++r) {
    cin[r].x.resize(recv[r].x.size() / 2);
    std::memcpy(cin[r].x.data(), recv[r].x.data(), recv[r].x.size());
  }
  const std::vector<ref::CombineOutput> cexp = ref::combine(cin, recv, inputs, cfg);

  std::mutex mu;
  std::vector<Row> rows;
  std::vector<double> slowest;  // per measurement, max over ranks (filled in rank order of arrival)
  std::vector<int> remote_rows(R, 0);
  size_t nvl_bytes = 0;
  std::vector<std::string> failures;
  fab.run([&](int rank, Group& g) {
    RankBench b(o, rank, g);
    auto record = [&](size_t i, const std::string& op, const std::string& dtype, int sms, double us) {
      std::lock_guard<std::mutex> lock(mu);
      if (rows.size() <= i) rows.resize(i + 1);
      rows[i].op = op, rows[i].dtype = dtype, rows[i].sms = sms, rows[i].us = std::max(rows[i].us, us);
    };
    // Correctness first: BF16 dispatch and combine bitwise against the reference, outputs poisoned.
    b.poison();
    b.dispatch(false, std::min(o.sms.front(), cap));
    const bool rows_ok = b.download_recv_x() == recv[rank].x;
    b.combine(std::min(o.sms.front(), cap));
    const bool comb_ok = b.download_combined() == cexp[rank].x;
    {
      std::lock_guard<std::mutex> lock(mu);
      nvl_bytes = b.nvl_bytes();
      remote_rows[rank] = b.num_recv() - recv[rank].num_recv_from_rank[rank];
      if (!rows_ok) failures.push_back("rank " + std::to_string(rank) + ": dispatch rows differ from the reference");
      if (!comb_ok) failures.push_back("rank " + std::to_string(rank) + ": combine differs from the reference");
    }
    fab.host_barrier(rank);
    size_t i = 0;
    for (int sms : o.sms) {
      if (sms > cap) continue;
      record(i++, "dispatch", "bf16", sms, b.time_us([&] { b.dispatch(false, sms); }));
      record(i++, "dispatch", "fp8", sms, b.time_us([&] { b.dispatch(true, sms); }));
      b.dispatch(false, sms);  // combine's handle and input: the BF16 rows
      record(i++, "combine", "bf16", sms, b.time_us([&] { b.combine(sms); }));
      fab.host_barrier(rank);
    }
  });
  for (const std::string& f : failures) std::fprintf(stderr, "openep_vrank_bench: %s\n", f.c_str());
  if (!failures.empty()) return 1;

  cudaDeviceProp prop{};
  OPENEP_CUDA_CHECK(cudaGetDeviceProperties(&prop, fab.device()));
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  double remote = 0;
  for (int r : remote_rows) remote = std::max(remote, static_cast<double>(r));
  std::printf("\nOpenEP virtual-rank SM cost: EP%d on ONE %s (all traffic local HBM: SM cost, not NVLink), tokens %d,"
              " hidden %d, top-%d of %d, window %s (num_nvl_bytes %zu), outputs %s, commit %s, %s\n",
              R, prop.name, o.num_tokens, o.hidden, o.num_topk, o.num_experts, o.window.c_str(), nvl_bytes,
              o.pool ? "window-backed (pool)" : "own memory",
              o.commit.c_str(), date);
  std::printf("%-9s %-5s %4s %10s %10s %16s\n", "op", "dtype", "SMs", "us", "SM-us", "remote GB/s per SM");
  std::ofstream out;
  if (!o.results.empty()) out.open(o.results, std::ios::app);
  for (const Row& r : rows) {
    const double bytes = remote * o.hidden * 2 * (r.dtype == "fp8" ? (1.0 + 4.0 / 128) / 2 : 1.0);
    const double per_sm = bytes / (r.us * 1e-6) / r.sms / 1e9;
    std::printf("%-9s %-5s %4d %10.1f %10.0f %16.1f\n", r.op.c_str(), r.dtype.c_str(), r.sms, r.us, r.sms * r.us,
                per_sm);
    if (out)
      out << "{\"bench\":\"vrank_sm_cost\",\"date\":\"" << date << "\",\"commit\":\"" << o.commit << "\",\"card\":\""
          << prop.name << "\",\"gpus\":1,\"virtual_ranks\":" << R << ",\"op\":\"" << r.op << "\",\"dtype\":\""
          << r.dtype << "\",\"num_sms\":" << r.sms << ",\"us\":" << r.us << ",\"sm_us\":" << r.sms * r.us
          << ",\"num_tokens\":" << o.num_tokens << ",\"hidden\":" << o.hidden << ",\"window\":\"" << o.window
          << "\",\"num_nvl_bytes\":" << nvl_bytes << ",\"pool\":" << (o.pool ? "true" : "false") << "}\n";
  }
  return 0;
}

}  // namespace
}  // namespace openep::bench

int main(int argc, char** argv) {
  openep::testing::prepare_process_for_virtual_ranks();
  try {
    return openep::bench::run(openep::bench::parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "openep_vrank_bench: %s\n", e.what());
    return 1;
  }
}
