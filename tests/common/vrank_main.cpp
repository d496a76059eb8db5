// main() of the virtual-rank test binary (openep/testing.hpp): every multi-rank test registered through
// common/ranks.hpp runs once per EP size it lists, as Suite + "Vrank".Name/EP<N>, with N host threads of this
// process sharing ONE GPU. Without a GPU every test is reported as skipped (exit code 77, which CTest shows as
// "Skipped"), never as passed.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/crash_handler.hpp"
#include "common/gpu_util.hpp"
#include "common/ranks.hpp"
#include "common/ranks_test.hpp"
#include "common/vrank.hpp"
#include "openep/testing.hpp"

namespace openep::test {
namespace {

// Bound of every host-side wait between the rank threads of one test (rendezvous, shared values). Generous:
// rank 0 may be building a large CPU reference while the others wait.
double rendezvous_timeout_seconds() {
  const char* v = std::getenv("OPENEP_VRANK_RENDEZVOUS_TIMEOUT");
  return v && *v ? std::atof(v) : 240.0;
}

class VrankSlots final : public SharedSlots {
 public:
  explicit VrankSlots(int readers) : readers_(readers) {}
  void put(uint64_t index, std::shared_ptr<const void> value) override {
    std::lock_guard<std::mutex> lock(mu_);
    Slot& s = slots_[index];
    s.value = std::move(value);
    s.set = true;
    s.remaining = readers_;
    if (s.remaining == 0) slots_.erase(index);
    cv_.notify_all();
  }
  std::shared_ptr<const void> get(uint64_t index) override {
    std::unique_lock<std::mutex> lock(mu_);
    const auto ready = [&] {
      auto it = slots_.find(index);
      return (it != slots_.end() && it->second.set) || owner_departed_;
    };
    if (!cv_.wait_for(lock, std::chrono::duration<double>(rendezvous_timeout_seconds()), ready))
      throw std::runtime_error("timed out waiting for rank 0 to share value #" + std::to_string(index));
    if (slots_.find(index) == slots_.end() || !slots_[index].set)
      throw std::runtime_error("rank 0 ended before sharing value #" + std::to_string(index));
    auto it = slots_.find(index);
    std::shared_ptr<const void> v = it->second.value;
    if (--it->second.remaining == 0) slots_.erase(it);  // every reader has it: free it
    return v;
  }
  // Rank 0's thread has ended: readers waiting for a value it never shared give up.
  void owner_departed() {
    std::lock_guard<std::mutex> lock(mu_);
    owner_departed_ = true;
    cv_.notify_all();
  }

 private:
  struct Slot {
    std::shared_ptr<const void> value;
    bool set = false;
    int remaining = 0;
  };
  const int readers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Slot> slots_;
  bool owner_departed_ = false;
};

// The rank thread's view of the world (set for the duration of the test body).
struct RankThread {
  RankEnv env;
  Group* group = nullptr;
  openep::testing::VirtualFabric* fabric = nullptr;
  VrankSlots* slots = nullptr;
  uint64_t shared_index = 0;
};
thread_local RankThread* t_rank = nullptr;

RankThread& current() {
  if (t_rank == nullptr) throw std::logic_error("not on a virtual rank's thread");
  return *t_rank;
}

}  // namespace

void run_on_virtual_ranks(const std::function<void()>& body, int num_ranks, int ranks_per_node) {
  openep::testing::VirtualFabricOptions o;
  o.num_ranks = num_ranks;
  o.ranks_per_node = ranks_per_node;
  o.rendezvous_timeout_seconds = rendezvous_timeout_seconds();
  openep::testing::VirtualFabric fabric(o);
  VrankSlots slots(num_ranks - 1);
  fabric.run([&](int rank, Group& group) {
    RankThread t;
    t.env = RankEnv{rank, num_ranks, fabric.device(), true};
    t.group = &group;
    t.fabric = &fabric;
    t.slots = &slots;
    t_rank = &t;
    struct Leave {  // however the body ends: readers of rank 0's shared values stop waiting, arrays are freed
      VrankSlots& slots;
      int rank;
      ~Leave() {
        t_rank = nullptr;
        if (rank == 0) slots.owner_departed();
        (void)cudaStreamSynchronize(test_stream());
      }
    } leave{slots, rank};
    body();
  });
}

const RankEnv& rank_env() { return current().env; }
Group& world_group() { return *current().group; }
void host_barrier() { current().fabric->host_barrier(current().env.rank); }
SharedSlots* shared_slots() { return current().slots; }
uint64_t next_shared_index() { return current().shared_index++; }

bool register_ranks_test(RanksTestSpec spec) {
  if (spec.mgpu_only) return false;
  for (int shape : spec.node_shapes) {
    auto body = spec.body;
    const int nodes = shape / 100, m = shape % 100;
    const std::string name = spec.name + "/N" + std::to_string(nodes) + "xM" + std::to_string(m);
    ::testing::RegisterTest((spec.suite + "Vrank").c_str(), name.c_str(), nullptr, nullptr, spec.file, spec.line,
                            [body, nodes, m]() -> RanksTest* {
                              return new RanksTest([body, nodes, m] { run_on_virtual_ranks(body, nodes * m, m); });
                            });
  }
  for (int n : spec.ep_sizes) {
    auto body = spec.body;
    const std::string name = spec.name + "/EP" + std::to_string(n);
    ::testing::RegisterTest((spec.suite + "Vrank").c_str(), name.c_str(), nullptr, nullptr, spec.file, spec.line,
                            [body, n]() -> RanksTest* {
                              return new RanksTest([body, n] { run_on_virtual_ranks(body, n); });
                            });
  }
  return true;
}

}  // namespace openep::test

int main(int argc, char** argv) {
  openep::test::install_crash_handler();
  // Before the first CUDA call: eager module loading and enough hardware queues (openep/testing.hpp).
  openep::testing::prepare_process_for_virtual_ranks();
  ::testing::InitGoogleTest(&argc, argv);
  if (GTEST_FLAG_GET(list_tests)) return RUN_ALL_TESTS();  // listing needs no GPU
  int num_devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&num_devices);
  if (err != cudaSuccess || num_devices == 0) {
    std::printf("openep_vrank_tests: skipped (no GPU: %s)\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount returned 0");
    return 77;
  }
  // Stream-ordered allocations (test arrays) are never trimmed back to the OS: trimming can synchronise.
  cudaMemPool_t pool = nullptr;
  if (cudaDeviceGetDefaultMemPool(&pool, 0) == cudaSuccess) {
    uint64_t keep = UINT64_MAX;
    (void)cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  }
  return RUN_ALL_TESTS();
}
