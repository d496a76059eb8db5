// main() of the multi-GPU test binary: one process per GPU, started by tools/launch.py (RANK, WORLD_SIZE,
// LOCAL_RANK, OPENEP_UNIQUE_ID_FILE). Without the launcher's environment it refuses to run (exit 2) rather
// than pretending to pass. Tests registered through common/ranks.hpp are Suite + "Mgpu".Name.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/crash_handler.hpp"
#include "common/gpu_util.hpp"
#include "common/launcher_env.hpp"
#include "common/mgpu.hpp"
#include "common/ranks.hpp"
#include "common/ranks_test.hpp"

namespace openep::test {
namespace {
RankEnv g_env;
std::unique_ptr<Group> g_group;
}  // namespace

const RankEnv& rank_env() { return g_env; }
Group& world_group() { return *g_group; }
ncclUniqueId exchange_unique_id(const char* tag) { return exchange_unique_id(g_env.rank, tag); }
SharedSlots* shared_slots() { return nullptr; }
uint64_t next_shared_index() { return 0; }

// An NCCL all-reduce on the world communicator (NCCL's own timeout-free wait is bounded by launch.py's global
// timeout; the NCCL call itself returns once every rank has joined).
void host_barrier() {
  DeviceArray<int> one(1);
  one.zero();
  const ncclResult_t res = ncclAllReduce(one.get(), one.get(), 1, ncclInt, ncclSum, g_group->comm(), test_stream());
  if (res != ncclSuccess) throw std::runtime_error(std::string("host_barrier: ncclAllReduce: ") + ncclGetErrorString(res));
  TEST_CUDA_CHECK(cudaStreamSynchronize(test_stream()));
}

bool register_ranks_test(RanksTestSpec spec) {
  register_one_test(spec, "Mgpu");
  return true;
}

}  // namespace openep::test

int main(int argc, char** argv) {
  openep::test::install_crash_handler();
  using namespace openep::test;
  ::testing::InitGoogleTest(&argc, argv);
  try {
    const LauncherEnv e = read_launcher_env();
    g_env = RankEnv{e.rank, e.world_size, e.local_rank, false};
    int num_devices = 0;
    if (cudaGetDeviceCount(&num_devices) != cudaSuccess || num_devices <= g_env.local_rank) {
      std::fprintf(stderr, "rank %d: no GPU %d on this machine\n", g_env.rank, g_env.local_rank);
      return 2;
    }
    const ncclUniqueId id = exchange_unique_id("world");
    g_group = openep::Group::create(id, g_env.rank, g_env.world_size, g_env.local_rank);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "multi-GPU test set-up failed: %s\n", e.what());
    return 2;
  }
  const int rc = RUN_ALL_TESTS();
  g_group.reset();
  return rc;
}
