// main() of the IPC test binary: one process per rank, several processes sharing a GPU, windows shared through
// CUDA IPC (openep::testing::IpcFabric; no NCCL). Started by tools/launch.py --share-gpus (RANK, WORLD_SIZE,
// LOCAL_RANK = the process's GPU, OPENEP_UNIQUE_ID_FILE: its directory is the world's rendezvous directory).
// Tests registered through common/ranks.hpp are Suite + "Ipc".Name (not the OPENEP_MGPU_TEST ones: they need
// NCCL); tests/ipc/*.cu add the tests that kill a rank's process.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include "common/crash_handler.hpp"
#include "common/launcher_env.hpp"
#include "common/ranks.hpp"
#include "common/ranks_test.hpp"
#include "ipc/ipc_env.hpp"
#include "openep/testing.hpp"

namespace openep::test {
namespace {
RankEnv g_env;
std::string g_dir;
std::unique_ptr<Group> g_group;
}  // namespace

const RankEnv& rank_env() { return g_env; }
Group& world_group() { return *g_group; }
void host_barrier() { openep::testing::IpcFabric::host_barrier(*g_group); }
SharedSlots* shared_slots() { return nullptr; }
uint64_t next_shared_index() { return 0; }
const std::string& ipc_rendezvous_dir() { return g_dir; }

bool register_ranks_test(RanksTestSpec spec) {
  if (spec.mgpu_only || !spec.node_shapes.empty()) return true;  // NCCL, or emulated nodes: not on this fabric
  register_one_test(spec, "Ipc");
  return true;
}

}  // namespace openep::test

int main(int argc, char** argv) {
  openep::test::install_crash_handler();
  using namespace openep::test;
  ::testing::InitGoogleTest(&argc, argv);
  if (GTEST_FLAG_GET(list_tests)) return RUN_ALL_TESTS();  // listing needs no world
  try {
    const LauncherEnv e = read_launcher_env();
    g_env = RankEnv{e.rank, e.world_size, e.local_rank, false};
    const char* id_file = std::getenv("OPENEP_UNIQUE_ID_FILE");
    if (id_file == nullptr) throw std::runtime_error("OPENEP_UNIQUE_ID_FILE is not set (start it with tools/launch.py)");
    const std::string f(id_file);
    g_dir = f.substr(0, f.find_last_of('/'));
    int num_devices = 0;
    if (cudaGetDeviceCount(&num_devices) != cudaSuccess || num_devices <= g_env.local_rank) {
      std::fprintf(stderr, "rank %d: no GPU %d on this machine\n", g_env.rank, g_env.local_rank);
      return 2;
    }
    openep::testing::IpcFabricOptions o;
    o.rank = g_env.rank;
    o.num_ranks = g_env.world_size;
    o.device = g_env.local_rank;
    o.rendezvous_dir = g_dir;
    g_group = openep::testing::IpcFabric::make_group(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "IPC test set-up failed: %s\n", e.what());
    return 2;
  }
  const int rc = RUN_ALL_TESTS();
  g_group.reset();
  return rc;
}
