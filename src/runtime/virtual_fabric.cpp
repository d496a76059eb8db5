// Virtual ranks: N ranks of an OpenEP world in one process on one GPU (openep/testing.hpp). A testing facility.
//
// Each virtual rank is a Fabric (VirtualRankFabric) over one shared state (VirtualFabricShared): the
// host-side rendezvous that makes window creation collective, and the list of allocations that are freed
// only when the VirtualFabric is destroyed (cudaFree would synchronise the whole device, i.e. wait for the
// other ranks' kernels, which may be spinning on this rank).
#include <cuda.h>
#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "openep/testing.hpp"
#include "protocol/limits.hpp"
#include "runtime/check.hpp"
#include "runtime/fabric.hpp"

namespace openep::detail {

class VirtualFabricShared {
 public:
  VirtualFabricShared(int num_ranks, int device, int max_blocks, int device_sms, double timeout_seconds)
      : num_ranks_(num_ranks), device_(device), max_blocks_(max_blocks), device_sms_(device_sms),
        timeout_seconds_(timeout_seconds), slots_(num_ranks, nullptr), present_(num_ranks, false),
        departed_(num_ranks, false) {}

  ~VirtualFabricShared() {
    // Every rank thread has ended (documented precondition); nothing of ours runs on the device any more,
    // so the device-wide synchronisation of cudaFree is harmless here.
    cudaSetDevice(device_);
    for (void* p : device_allocs_) {
      const cudaError_t e = cudaFree(p);
      if (e != cudaSuccess) std::fprintf(stderr, "OpenEP virtual ranks: cudaFree failed: %s\n", cudaGetErrorString(e));
    }
    for (void* p : mapped_allocs_) {
      const cudaError_t e = cudaFreeHost(p);
      if (e != cudaSuccess) std::fprintf(stderr, "OpenEP virtual ranks: cudaFreeHost failed: %s\n", cudaGetErrorString(e));
    }
  }

  int num_ranks() const noexcept { return num_ranks_; }
  int device() const noexcept { return device_; }
  int max_blocks() const noexcept { return max_blocks_; }
  int device_sms() const noexcept { return device_sms_; }

  // All-gather of one pointer per rank. Every rank calls it; returns the pointers of all ranks in rank order.
  // Bounded: a rank that waits longer than the rendezvous timeout, or for a rank whose thread has already
  // ended (VirtualFabric::run), withdraws and throws kTimeout naming the ranks that did not arrive.
  std::vector<char*> exchange(int rank, char* mine, const char* what) {
    std::unique_lock<std::mutex> lock(mu_);
    OPENEP_CHECK(!present_[rank], ErrorCode::kInternal, "virtual rank ", rank, " entered ", what, " twice");
    const uint64_t gen = generation_;
    slots_[rank] = mine;
    present_[rank] = true;
    if (++arrived_ == num_ranks_) {
      result_ = slots_;
      arrived_ = 0;
      std::fill(present_.begin(), present_.end(), false);
      ++generation_;
      cv_.notify_all();
      return result_;
    }
    const auto timeout = std::chrono::duration<double>(timeout_seconds_);
    const auto missing_departed = [&] {
      for (int r = 0; r < num_ranks_; ++r)
        if (!present_[r] && departed_[r]) return true;
      return false;
    };
    if (!cv_.wait_for(lock, timeout, [&] { return generation_ != gen || missing_departed(); })) {
      withdraw_and_throw(rank, what, "waited more than " + std::to_string(timeout_seconds_) + " s");
    }
    if (generation_ == gen) withdraw_and_throw(rank, what, "stopped waiting");
    return result_;  // stable until every rank of this generation has read it (the next one needs them all)
  }

  // Rank `rank`'s thread has ended: nobody waits for it any longer.
  void depart(int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    departed_[rank] = true;
    cv_.notify_all();
  }

  void keep_device(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    device_allocs_.push_back(p);
  }
  void keep_mapped(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    mapped_allocs_.push_back(p);
  }

 private:
  [[noreturn]] void withdraw_and_throw(int rank, const char* what, const std::string& how) {
    std::string missing, gone;
    for (int r = 0; r < num_ranks_; ++r) {
      if (present_[r] || r == rank) continue;
      std::string& list = departed_[r] ? gone : missing;
      list += (list.empty() ? "" : ", ") + std::to_string(r);
    }
    present_[rank] = false;
    slots_[rank] = nullptr;
    --arrived_;
    OPENEP_CHECK(false, ErrorCode::kTimeout, "virtual rank ", rank, " ", how, " in ", what, " for virtual ranks ",
                 missing.empty() ? "-" : missing, " (stalled or not making the same collective call)",
                 gone.empty() ? "" : " and ", gone.empty() ? "" : gone,
                 gone.empty() ? "" : " (their threads already ended: failed or returned early)");
  }

  const int num_ranks_, device_, max_blocks_, device_sms_;
  const double timeout_seconds_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  int arrived_ = 0;
  std::vector<char*> slots_, result_;
  std::vector<bool> present_, departed_;
  std::vector<void*> device_allocs_, mapped_allocs_;
};

namespace {

class VirtualRankFabric final : public Fabric {
 public:
  VirtualRankFabric(std::shared_ptr<VirtualFabricShared> shared, int rank) : shared_(std::move(shared)), rank_(rank) {}

  const char* name() const noexcept override { return "virtual ranks"; }
  int rank() const noexcept override { return rank_; }
  int num_ranks() const noexcept override { return shared_->num_ranks(); }
  int device() const noexcept override { return shared_->device(); }
  int num_nvlink_ranks() const noexcept override { return shared_->num_ranks(); }  // one NVLink domain
  int nvlink_rank() const noexcept override { return rank_; }

  void open_window(const WindowRequest& req, cudaStream_t stream, char** peer_table, FabricWindow& w) override {
    OPENEP_CHECK(!req.gin, ErrorCode::kUnsupported,
                 "virtual ranks have no network: the GIN path cannot run on them (every virtual rank shares one "
                 "NVLink domain, so it is never selected)");
    w = FabricWindow{};
    w.local = static_cast<char*>(alloc_device(req.bytes));
    w.bytes = req.bytes;
    OPENEP_CUDA_CHECK(cudaMemsetAsync(w.local, 0, req.bytes, stream));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
    // Like NCCL's window registration, a barrier: every window is zero before any rank can write into it.
    w.peer_bases = shared_->exchange(rank_, w.local, "Buffer creation (window exchange)");
    OPENEP_CUDA_CHECK(cudaMemcpyAsync(peer_table, w.peer_bases.data(), sizeof(char*) * w.peer_bases.size(),
                                      cudaMemcpyHostToDevice, stream));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  void close_window(FabricWindow& w) noexcept override { w = FabricWindow{}; }  // freed with the VirtualFabric

  GridBudget grid_budget(int device_sms) const override {
    GridBudget b;
    b.device_sms = device_sms;
    b.max_blocks = shared_->max_blocks();
    b.grids_per_device = shared_->num_ranks();
    b.clamp = true;
    return b;
  }

  void* alloc_device(size_t bytes) override {
    void* p = Fabric::alloc_device(bytes);
    shared_->keep_device(p);
    return p;
  }
  void free_device(void*) noexcept override {}  // deferred to ~VirtualFabricShared
  void* alloc_mapped(size_t bytes, void** device_view) override {
    void* p = nullptr;
    OPENEP_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocMapped));
    shared_->keep_mapped(p);
    OPENEP_CUDA_CHECK(cudaHostGetDevicePointer(device_view, p, 0));
    return p;
  }
  void free_mapped(void*) noexcept override {}

 private:
  std::shared_ptr<VirtualFabricShared> shared_;
  int rank_;
};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// The loading mode CUDA initialised with (cuModuleGetLoadingMode through the runtime's driver entry points,
// so openep_core needs no libcuda link). Returns true when eager.
bool module_loading_is_eager() {
  using Fn = CUresult (*)(CUmoduleLoadingMode*);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  OPENEP_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuModuleGetLoadingMode", &fn, 12000, cudaEnableDefault, &q));
  OPENEP_CHECK(q == cudaDriverEntryPointSuccess && fn != nullptr, ErrorCode::kCuda,
               "cuModuleGetLoadingMode is not available from the driver");
  CUmoduleLoadingMode mode{};
  OPENEP_CHECK(reinterpret_cast<Fn>(fn)(&mode) == CUDA_SUCCESS, ErrorCode::kCuda, "cuModuleGetLoadingMode failed");
  return mode == CU_MODULE_EAGER_LOADING;
}

}  // namespace
}  // namespace openep::detail

namespace openep::testing {

void prepare_process_for_virtual_ranks() {
  setenv("CUDA_MODULE_LOADING", "EAGER", /*overwrite=*/0);
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
}

VirtualFabric::VirtualFabric(const VirtualFabricOptions& o) {
  OPENEP_CHECK_ARG(o.num_ranks >= 2 && o.num_ranks <= detail::kMaxNvlinkPeers, "VirtualFabricOptions::num_ranks must "
                   "be in [2, ", detail::kMaxNvlinkPeers, "], got ", o.num_ranks);
  OPENEP_CHECK_ARG(o.rendezvous_timeout_seconds > 0, "VirtualFabricOptions::rendezvous_timeout_seconds must be > 0, "
                   "got ", o.rendezvous_timeout_seconds);
  int num_devices = 0;
  OPENEP_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
  OPENEP_CHECK_ARG(o.device >= 0 && o.device < num_devices, "VirtualFabricOptions::device must be in [0, ",
                   num_devices, "), got ", o.device);
  OPENEP_CUDA_CHECK(cudaSetDevice(o.device));
  OPENEP_CHECK(detail::module_loading_is_eager(), ErrorCode::kUnsupported,
               "virtual ranks need eager module loading (CUDA_MODULE_LOADING=EAGER, set before the first CUDA "
               "call, e.g. by openep::testing::prepare_process_for_virtual_ranks() at the top of main): a lazily "
               "loaded kernel can wait for the whole GPU, i.e. for the other ranks' spinning kernels");
  const int connections = detail::env_int("CUDA_DEVICE_MAX_CONNECTIONS", 8);
  const int need = 2 * o.num_ranks < 32 ? 2 * o.num_ranks : 32;
  OPENEP_CHECK(connections >= need, ErrorCode::kUnsupported, "virtual ranks need CUDA_DEVICE_MAX_CONNECTIONS >= ",
               need, " for ", o.num_ranks, " ranks (two streams each), got ", connections,
               ": streams that share a hardware queue make one rank's launch wait behind another rank's spinning "
               "kernel. Set it before the first CUDA call (prepare_process_for_virtual_ranks())");
  int sms = 0;
  OPENEP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, o.device));
  int cap = o.max_blocks_per_rank;
  if (cap == 0) {
    cap = (sms / o.num_ranks - 2) & ~1;
    if (cap < 2) cap = 2;
  }
  OPENEP_CHECK_ARG(cap >= 1, "VirtualFabricOptions::max_blocks_per_rank must be >= 0, got ", o.max_blocks_per_rank);
  // Every rank's main kernel (cap blocks) plus one one-block kernel (prepare, barrier) must fit at once.
  OPENEP_CHECK(static_cast<long long>(o.num_ranks) * (cap + 1) <= sms, ErrorCode::kUnsupported, o.num_ranks,
               " virtual ranks with grids of ", cap, " blocks (plus one one-block kernel each) need ",
               static_cast<long long>(o.num_ranks) * (cap + 1), " SMs to be co-resident; the GPU has ", sms);
  shared_ = std::make_shared<detail::VirtualFabricShared>(o.num_ranks, o.device, cap, sms, o.rendezvous_timeout_seconds);
}

VirtualFabric::~VirtualFabric() = default;

int VirtualFabric::num_ranks() const noexcept { return shared_->num_ranks(); }
int VirtualFabric::device() const noexcept { return shared_->device(); }
int VirtualFabric::max_blocks_per_rank() const noexcept { return shared_->max_blocks(); }

std::unique_ptr<Group> VirtualFabric::make_group(int rank) {
  OPENEP_CHECK_ARG(rank >= 0 && rank < num_ranks(), "rank must be in [0, ", num_ranks(), "), got ", rank);
  OPENEP_CUDA_CHECK(cudaSetDevice(device()));
  return std::unique_ptr<Group>(new Group(std::make_shared<detail::VirtualRankFabric>(shared_, rank)));
}

void VirtualFabric::host_barrier(int rank) {
  OPENEP_CHECK_ARG(rank >= 0 && rank < num_ranks(), "rank must be in [0, ", num_ranks(), "), got ", rank);
  shared_->exchange(rank, nullptr, "host_barrier");
}

void VirtualFabric::run(const std::function<void(int, Group&)>& fn) {
  const int n = num_ranks();
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([this, &fn, &errors, r] {
      try {
        std::unique_ptr<Group> group = make_group(r);
        fn(r, *group);
      } catch (...) {
        errors[r] = std::current_exception();
      }
      shared_->depart(r);  // ranks still waiting for this one in a rendezvous give up at once
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace openep::testing
