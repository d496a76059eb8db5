// main() of openep_fake_node_tests (see fake_node.hpp). Started by tools/launch.py --ranks-per-node M; without
// that launcher's fake-node environment it refuses to run (exit 2) rather than pretending to pass.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/crash_handler.hpp"
#include "common/launcher_env.hpp"
#include "fakenode/fake_node.hpp"

namespace openep::test::fakenode {
namespace {

using Clock = std::chrono::steady_clock;

FakeNodeEnv g_env;
std::unique_ptr<Group> g_group;

// ---- watchdog: one thread that ends the process when an armed Deadline expires ----
struct Armed {
  Clock::time_point at;
  double seconds = 0;
  std::string what;
};
std::mutex g_mu;
std::condition_variable g_cv;
std::map<unsigned long long, Armed> g_armed;
unsigned long long g_next_id = 1;
bool g_stop = false;

void watchdog_loop() {
  std::unique_lock<std::mutex> lock(g_mu);
  while (!g_stop) {
    const Clock::time_point now = Clock::now();
    for (auto it = g_armed.begin(); it != g_armed.end(); ++it) {
      if (now < it->second.at) continue;
      // Both streams: stdout is the gtest log the launcher echoes, stderr goes to the same rank log.
      std::fprintf(stdout, "\nFAKE-NODE WATCHDOG: rank %d: %s did not finish within %g s; exiting with status %d "
                   "instead of hanging\n", g_env.rank, it->second.what.c_str(), it->second.seconds, kWatchdogExit);
      std::fprintf(stderr, "FAKE-NODE WATCHDOG: rank %d: %s did not finish within %g s\n", g_env.rank,
                   it->second.what.c_str(), it->second.seconds);
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(kWatchdogExit);
    }
    g_cv.wait_for(lock, std::chrono::milliseconds(100));
  }
}

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    throw std::runtime_error(std::string("environment variable ") + name +
                             " is not set: start through tools/launch.py --ranks-per-node M");
  }
  return std::atoi(v);
}

FakeNodeEnv read_fake_node_env() {
  const LauncherEnv e = read_launcher_env();
  FakeNodeEnv f;
  f.rank = e.rank;
  f.world_size = e.world_size;
  f.device = e.local_rank;
  f.node = env_int("OPENEP_NODE");
  f.ranks_per_node = env_int("OPENEP_RANKS_PER_NODE");
  const char* host = std::getenv("NCCL_HOSTID");
  if (!host || !*host) throw std::runtime_error("NCCL_HOSTID is not set: start through tools/launch.py --ranks-per-node M");
  f.host_id = host;
  if (f.ranks_per_node < 1 || f.world_size % f.ranks_per_node != 0 || f.node != f.rank / f.ranks_per_node) {
    throw std::runtime_error("inconsistent fake-node environment: RANK " + std::to_string(f.rank) + ", WORLD_SIZE " +
                             std::to_string(f.world_size) + ", OPENEP_NODE " + std::to_string(f.node) +
                             ", OPENEP_RANKS_PER_NODE " + std::to_string(f.ranks_per_node) +
                             " (expected node = rank / M and WORLD_SIZE % M == 0)");
  }
  return f;
}

}  // namespace

const FakeNodeEnv& fake_env() { return g_env; }
Group& world() {
  if (!g_group) throw std::logic_error("world() after abandon_world()");
  return *g_group;
}
void abandon_world() {
  if (!g_group) return;
  const ncclResult_t r = ncclCommAbort(g_group->comm());
  if (r != ncclSuccess) std::fprintf(stderr, "abandon_world: ncclCommAbort: %s\n", ncclGetErrorString(r));
  (void)g_group.release();  // its communicator is gone; the Group object is left behind on purpose
}

Deadline::Deadline(double seconds, std::string what) {
  const auto span = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::lock_guard<std::mutex> lock(g_mu);
  id_ = g_next_id++;
  g_armed.emplace(id_, Armed{Clock::now() + span, seconds, std::move(what)});
}

Deadline::~Deadline() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_armed.erase(id_);
}

}  // namespace openep::test::fakenode

int main(int argc, char** argv) {
  openep::test::install_crash_handler();
  using namespace openep::test::fakenode;
  // --help and --gtest_list_tests work without the launcher (no GPU, no NCCL): gtest prints and runs nothing.
  bool info_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    info_only = info_only || a == "--help" || a == "-h" || a == "--gtest_list_tests";
  }
  ::testing::InitGoogleTest(&argc, argv);
  if (info_only) return RUN_ALL_TESTS();
  try {
    g_env = read_fake_node_env();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fake-node test set-up failed: %s\n", e.what());
    return 2;
  }
  std::thread watchdog(watchdog_loop);
  int rc = 2;
  try {
    int num_devices = 0;
    if (cudaGetDeviceCount(&num_devices) != cudaSuccess || num_devices <= g_env.device) {
      throw std::runtime_error("no GPU " + std::to_string(g_env.device) + " on this machine");
    }
    {
      // Rank 0 publishes the id; NCCL's bootstrap and its socket connections between fake nodes follow.
      Deadline d(300, "world Group creation (unique id hand-over + ncclCommInitRankConfig over sockets)");
      const ncclUniqueId id = openep::test::exchange_unique_id(g_env.rank, "fake_world");
      g_group = openep::Group::create(id, g_env.rank, g_env.world_size, g_env.device);
    }
    std::printf("fake-node rank %d/%d: node %d of %d (M = %d, NCCL_HOSTID=%s), GPU %d, NVLink team %d (rank %d in it)\n",
                g_env.rank, g_env.world_size, g_env.node, g_env.num_nodes(), g_env.ranks_per_node,
                g_env.host_id.c_str(), g_env.device, g_group->num_nvlink_ranks(), g_group->nvlink_rank());
    std::fflush(stdout);
    rc = RUN_ALL_TESTS();
    {
      Deadline d(120, "world Group destruction (ncclCommDestroy)");
      g_group.reset();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fake-node test rank %d failed outside a test: %s\n", g_env.rank, e.what());
    rc = 2;
  }
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_stop = true;
  }
  g_cv.notify_all();
  watchdog.join();
  return rc;
}
