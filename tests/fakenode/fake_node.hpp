// Fake-node test environment (docs/fake-nodes.md): processes started by tools/launch.py --ranks-per-node M,
// each fake node with its own NCCL_HOSTID, so NCCL sees a multi-node world and moves cross-node traffic over
// its Socket network (loopback). Several processes may share one GPU (ranks of different nodes).
//
// Every wait in these tests is bounded: a phase that could block (NCCL init, a collective, a split, a
// communicator destroy) runs under a Deadline; when one expires the process prints what it was doing and
// exits with kWatchdogExit, so the launcher reports a failure instead of waiting for its global timeout.
#pragma once

#include <string>

#include "openep/group.hpp"

namespace openep::test::fakenode {

// Exit status of a process whose Deadline expired.
inline constexpr int kWatchdogExit = 3;

struct FakeNodeEnv {
  int rank = 0, world_size = 1;
  int device = 0;            // LOCAL_RANK: the CUDA device of this process
  int node = 0;              // OPENEP_NODE
  int ranks_per_node = 1;    // OPENEP_RANKS_PER_NODE (M)
  int num_nodes() const { return world_size / ranks_per_node; }
  std::string host_id;       // NCCL_HOSTID
};

// The process's environment and its world Group (created once in main() from the launcher's unique id).
const FakeNodeEnv& fake_env();
Group& world();
// After a peer died (FakeNodeRecovery): aborts the world communicator (ncclCommAbort: local, never waits for the dead
// peer) and drops the world Group without its collective-free but peer-touching destroy. world() is invalid after.
void abandon_world();

// While alive, the process must get past the guarded code within `seconds`, else it exits (kWatchdogExit)
// after printing "rank R: <what> did not finish within S s". Nestable; destruction disarms.
class Deadline {
 public:
  Deadline(double seconds, std::string what);
  ~Deadline();
  Deadline(const Deadline&) = delete;
  Deadline& operator=(const Deadline&) = delete;

 private:
  unsigned long long id_;
};

}  // namespace openep::test::fakenode
