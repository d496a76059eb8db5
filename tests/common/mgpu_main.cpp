// main() of multi-GPU test binaries (see tests/common/mgpu.hpp). Without the launcher's environment it
// refuses to run (exit 2) rather than pretending to pass.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "common/launcher_env.hpp"
#include "common/mgpu.hpp"

namespace openep::test {
namespace {
MgpuEnv g_env;
std::unique_ptr<Group> g_group;
}  // namespace

const MgpuEnv& mgpu_env() { return g_env; }
Group& world_group() { return *g_group; }
ncclUniqueId exchange_unique_id(const char* tag) { return exchange_unique_id(g_env.rank, tag); }

}  // namespace openep::test

int main(int argc, char** argv) {
  using namespace openep::test;
  ::testing::InitGoogleTest(&argc, argv);
  try {
    const LauncherEnv e = read_launcher_env();
    g_env = MgpuEnv{e.rank, e.world_size, e.local_rank};
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
