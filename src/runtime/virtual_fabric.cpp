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
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "openep/testing.hpp"
#include "protocol/limits.hpp"
#include "runtime/check.hpp"
#include "runtime/fabric.hpp"
#include "runtime/rail.hpp"

namespace openep::detail {

class VirtualFabricShared {
 public:
  VirtualFabricShared(int num_ranks, int ranks_per_node, int device, int max_blocks, int device_sms,
                      double timeout_seconds)
      : num_ranks_(num_ranks), ranks_per_node_(ranks_per_node), device_(device), max_blocks_(max_blocks),
        device_sms_(device_sms), timeout_seconds_(timeout_seconds), departed_(num_ranks, false) {}

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
  int ranks_per_node() const noexcept { return ranks_per_node_; }
  int device() const noexcept { return device_; }
  int max_blocks() const noexcept { return max_blocks_; }
  int device_sms() const noexcept { return device_sms_; }

  // Meeting keys: the world, each node, each rail.
  static constexpr int kWorld = -1;
  static int node_key(int node) { return 1 << 20 | node; }
  static int rail_key(int local) { return 2 << 20 | local; }
  std::vector<int> world_members() const {
    std::vector<int> m(num_ranks_);
    for (int r = 0; r < num_ranks_; ++r) m[r] = r;
    return m;
  }
  std::vector<int> node_members(int node) const {
    std::vector<int> m(ranks_per_node_);
    for (int l = 0; l < ranks_per_node_; ++l) m[l] = node * ranks_per_node_ + l;
    return m;
  }
  std::vector<int> rail_members(int local) const {
    std::vector<int> m(num_ranks_ / ranks_per_node_);
    for (size_t n = 0; n < m.size(); ++n) m[n] = static_cast<int>(n) * ranks_per_node_ + local;
    return m;
  }

  // All-gather of one value per member among `members` (global ranks; the meeting of `key`). Every member
  // calls it; returns the values in member order. Bounded: a rank that waits longer than the rendezvous
  // timeout, or for a member whose thread has already ended (VirtualFabric::run), withdraws and throws
  // kTimeout naming the ranks that did not arrive.
  std::vector<uintptr_t> meet(int key, const std::vector<int>& members, int rank, uintptr_t mine, const char* what) {
    std::unique_lock<std::mutex> lock(mu_);
    Meeting& g = meetings_[key];
    if (g.present.empty()) {
      g.members = members;
      g.present.assign(members.size(), false);
      g.slots.assign(members.size(), 0);
    }
    const int idx = index_of(g, rank);
    OPENEP_CHECK(!g.present[idx], ErrorCode::kInternal, "virtual rank ", rank, " entered ", what, " twice");
    const uint64_t gen = g.generation;
    g.slots[idx] = mine;
    g.present[idx] = true;
    if (++g.arrived == static_cast<int>(g.members.size())) {
      g.result = g.slots;
      g.arrived = 0;
      std::fill(g.present.begin(), g.present.end(), false);
      ++g.generation;
      cv_.notify_all();
      return g.result;
    }
    const auto timeout = std::chrono::duration<double>(timeout_seconds_);
    const auto missing_departed = [&] {
      for (size_t i = 0; i < g.members.size(); ++i)
        if (!g.present[i] && departed_[g.members[i]]) return true;
      return false;
    };
    if (!cv_.wait_for(lock, timeout, [&] { return g.generation != gen || missing_departed(); }))
      withdraw_and_throw(g, idx, rank, what, "waited more than " + std::to_string(timeout_seconds_) + " s");
    if (g.generation == gen) withdraw_and_throw(g, idx, rank, what, "stopped waiting");
    return g.result;  // stable until every member of this generation has read it (the next one needs them all)
  }

  // The world all-gather of one pointer per rank.
  std::vector<char*> exchange(int rank, char* mine, const char* what) {
    const std::vector<uintptr_t> v = meet(kWorld, world_members(), rank, reinterpret_cast<uintptr_t>(mine), what);
    std::vector<char*> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<char*>(v[i]);
    return out;
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
  struct Meeting {
    std::vector<int> members;
    uint64_t generation = 0;
    int arrived = 0;
    std::vector<bool> present;
    std::vector<uintptr_t> slots, result;
  };
  static int index_of(const Meeting& g, int rank) {
    for (size_t i = 0; i < g.members.size(); ++i)
      if (g.members[i] == rank) return static_cast<int>(i);
    OPENEP_CHECK(false, ErrorCode::kInternal, "virtual rank ", rank, " is not a member of this meeting");
  }
  [[noreturn]] void withdraw_and_throw(Meeting& g, int idx, int rank, const char* what, const std::string& how) {
    std::string missing, gone;
    for (size_t i = 0; i < g.members.size(); ++i) {
      const int r = g.members[i];
      if (g.present[i] || r == rank) continue;
      std::string& list = departed_[r] ? gone : missing;
      list += (list.empty() ? "" : ", ") + std::to_string(r);
    }
    g.present[idx] = false;
    g.slots[idx] = 0;
    --g.arrived;
    OPENEP_CHECK(false, ErrorCode::kTimeout, "virtual rank ", rank, " ", how, " in ", what, " for virtual ranks ",
                 missing.empty() ? "-" : missing, " (stalled or not making the same collective call)",
                 gone.empty() ? "" : " and ", gone.empty() ? "" : gone,
                 gone.empty() ? "" : " (their threads already ended: failed or returned early)");
  }

  const int num_ranks_, ranks_per_node_, device_, max_blocks_, device_sms_;
  const double timeout_seconds_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, Meeting> meetings_;
  std::vector<bool> departed_;
  std::vector<void*> device_allocs_, mapped_allocs_;
};

namespace {

// Pull-model rail between virtual ranks: every rank records an event after staging, the rail peers meet, each
// copies what its peers staged for it (after their events), records `pulled`, the peers meet again, and each
// waits for its peers' `pulled` before its stream may overwrite its own staging. Host meetings only: no host
// thread ever waits for the device here.
class VirtualRail final : public Rail {
 public:
  VirtualRail(std::shared_ptr<VirtualFabricShared> shared, int rank) : shared_(std::move(shared)), rank_(rank) {
    const int M = shared_->ranks_per_node();
    node_ = rank_ / M;
    local_ = rank_ % M;
    num_nodes_ = shared_->num_ranks() / M;
    members_ = shared_->rail_members(local_);
    OPENEP_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    OPENEP_CUDA_CHECK(cudaEventCreateWithFlags(&pulled_, cudaEventDisableTiming));
  }
  ~VirtualRail() override {
    (void)cudaEventDestroy(ready_);
    (void)cudaEventDestroy(pulled_);
  }
  const char* name() const noexcept override { return "virtual rail (device copies)"; }
  int num_nodes() const noexcept override { return num_nodes_; }
  int node() const noexcept override { return node_; }

  void exchange(const char* send_base, char* recv_base, const std::vector<RailTransfer>& transfers,
                cudaStream_t stream) override {
    post_.send_base = send_base;
    post_.transfers = transfers;
    post_.ready = ready_;
    OPENEP_CUDA_CHECK(cudaEventRecord(ready_, stream));
    const int key = VirtualFabricShared::rail_key(local_);
    const std::vector<uintptr_t> posts =
        shared_->meet(key, members_, rank_, reinterpret_cast<uintptr_t>(&post_), "rail exchange (staged)");
    for (const RailTransfer& t : transfers) {
      OPENEP_CHECK(t.node != node_ && t.node >= 0 && t.node < num_nodes_, ErrorCode::kInternal, "rail transfer to node ",
                   t.node, " from node ", node_);
      if (t.recv_bytes == 0) continue;
      const Post& peer = *reinterpret_cast<const Post*>(posts[t.node]);
      const RailTransfer* theirs = nullptr;
      for (const RailTransfer& u : peer.transfers)
        if (u.node == node_) theirs = &u;
      OPENEP_CHECK(theirs != nullptr && theirs->send_bytes == t.recv_bytes, ErrorCode::kInternal, "rail exchange: node ",
                   node_, " expects ", t.recv_bytes, " bytes from node ", t.node, ", which sends ",
                   theirs ? theirs->send_bytes : 0);
      OPENEP_CUDA_CHECK(cudaStreamWaitEvent(stream, peer.ready, 0));
      OPENEP_CUDA_CHECK(cudaMemcpyAsync(recv_base + t.recv_offset, peer.send_base + theirs->send_offset, t.recv_bytes,
                                        cudaMemcpyDeviceToDevice, stream));
    }
    OPENEP_CUDA_CHECK(cudaEventRecord(pulled_, stream));
    const std::vector<uintptr_t> pulled =
        shared_->meet(key, members_, rank_, reinterpret_cast<uintptr_t>(pulled_), "rail exchange (pulled)");
    for (int n = 0; n < num_nodes_; ++n)
      if (n != node_) OPENEP_CUDA_CHECK(cudaStreamWaitEvent(stream, reinterpret_cast<cudaEvent_t>(pulled[n]), 0));
    // Nobody leaves before every peer has enqueued its waits on our `pulled_`: a rank that left early could
    // re-record it (next exchange) or destroy it (its Buffer's end) while a peer's cudaStreamWaitEvent still
    // reads it. Seen on an H200 at 804206e: a segfault in cuStreamWaitEvent under internode_combine, N2xM2.
    (void)shared_->meet(key, members_, rank_, 0, "rail exchange (waits enqueued)");
  }

 private:
  struct Post {
    const char* send_base = nullptr;
    std::vector<RailTransfer> transfers;
    cudaEvent_t ready = nullptr;
  };
  std::shared_ptr<VirtualFabricShared> shared_;
  int rank_, node_ = 0, local_ = 0, num_nodes_ = 1;
  std::vector<int> members_;
  cudaEvent_t ready_ = nullptr, pulled_ = nullptr;
  Post post_;
};

// One virtual rank, seen either as a rank of the whole world or (node_scope, made by split_nodes) as a rank
// of its emulated node.
class VirtualRankFabric final : public Fabric {
 public:
  VirtualRankFabric(std::shared_ptr<VirtualFabricShared> shared, int rank, bool node_scope = false)
      : shared_(std::move(shared)), rank_(rank), node_scope_(node_scope) {}

  const char* name() const noexcept override { return node_scope_ ? "virtual ranks (node)" : "virtual ranks"; }
  int rank() const noexcept override { return node_scope_ ? rank_ % shared_->ranks_per_node() : rank_; }
  int num_ranks() const noexcept override { return node_scope_ ? shared_->ranks_per_node() : shared_->num_ranks(); }
  int device() const noexcept override { return shared_->device(); }
  // The emulated node is the NVLink domain (all ranks by default).
  int num_nvlink_ranks() const noexcept override { return shared_->ranks_per_node(); }
  int nvlink_rank() const noexcept override { return rank_ % shared_->ranks_per_node(); }

  void open_window(const WindowRequest& req, cudaStream_t stream, char** peer_table, FabricWindow& w) override {
    OPENEP_CHECK(!req.gin, ErrorCode::kUnsupported,
                 "virtual ranks have no network: the GIN path cannot run on them (emulated nodes reach each other "
                 "through the virtual rail of internode normal mode only)");
    w = FabricWindow{};
    w.local = static_cast<char*>(alloc_device(req.bytes));
    w.bytes = req.bytes;
    OPENEP_CUDA_CHECK(cudaMemsetAsync(w.local, 0, req.bytes, stream));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
    // Like NCCL's window registration, a barrier: every window is zero before any rank can write into it.
    if (node_scope_) {
      const int node = rank_ / shared_->ranks_per_node();
      const std::vector<uintptr_t> v =
          shared_->meet(VirtualFabricShared::node_key(node), shared_->node_members(node), rank_,
                        reinterpret_cast<uintptr_t>(w.local), "Buffer creation (node window exchange)");
      w.peer_bases.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) w.peer_bases[i] = reinterpret_cast<char*>(v[i]);
    } else {
      w.peer_bases = shared_->exchange(rank_, w.local, "Buffer creation (window exchange)");
    }
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

  NodeSplit split_nodes(int ranks_per_node, bool gin_rail) override {
    OPENEP_CHECK(!gin_rail, ErrorCode::kUnsupported, "BufferOptions::internode_backend = kGin needs NCCL with GIN "
                 "(RDMA NICs); virtual ranks have no NCCL: use kHostP2p (their virtual rail)");
    OPENEP_CHECK(!node_scope_ && ranks_per_node == shared_->ranks_per_node(), ErrorCode::kInternal,
                 "split_nodes(", ranks_per_node, ") on virtual ranks with emulated nodes of ", shared_->ranks_per_node());
    NodeSplit out;
    out.node = std::make_unique<VirtualRankFabric>(shared_, rank_, /*node_scope=*/true);
    out.rail = std::make_unique<VirtualRail>(shared_, rank_);
    return out;
  }

  // Default priority for every stream of every virtual rank. Suspected (not confirmed): streams of another
  // priority may be mapped onto their own set of hardware queues, where the comm streams of several virtual ranks
  // can share one, and then one rank's launch waits behind another rank's kernel that spins on it (a rare EP8
  // stall, docs/DESIGN.md "Virtual-rank and fake-node runs").
  int comm_stream_priority() const override { return 0; }

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
  bool node_scope_;
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
  const int M = o.ranks_per_node == 0 ? o.num_ranks : o.ranks_per_node;
  OPENEP_CHECK_ARG(M >= 1 && o.num_ranks % M == 0, "VirtualFabricOptions::ranks_per_node must divide num_ranks (",
                   o.num_ranks, ") or be 0, got ", o.ranks_per_node);
  shared_ = std::make_shared<detail::VirtualFabricShared>(o.num_ranks, M, o.device, cap, sms, o.rendezvous_timeout_seconds);
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
