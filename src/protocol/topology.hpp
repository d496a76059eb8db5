// Ranks, NVLink (LSA) domains and nodes. A node is one NVLink domain; OpenEP requires the ranks of a node to
// be contiguous (node-major: rank = node * ranks_per_node + local rank), which is also what NCCL's LSA team
// assumes. Real nodes and fake ones (NCCL_HOSTID per process) look the same here.
#pragma once

#include "protocol/host_device.hpp"

namespace openep::detail {

struct Topology {
  int rank = 0;
  int num_ranks = 1;
  int ranks_per_node = 1;  // ranks in one NVLink domain (NCCL's LSA team size)

  OPENEP_HOST_DEVICE int num_nodes() const { return num_ranks / ranks_per_node; }
  OPENEP_HOST_DEVICE int node() const { return rank / ranks_per_node; }
  OPENEP_HOST_DEVICE int local_rank() const { return rank % ranks_per_node; }
  OPENEP_HOST_DEVICE bool single_node() const { return ranks_per_node == num_ranks; }
  // The rank with my local rank on node n (the rail peer a token for node n goes to).
  OPENEP_HOST_DEVICE int rail_peer(int n) const { return n * ranks_per_node + local_rank(); }
  // Node-major and evenly split: every node holds ranks_per_node consecutive ranks. `nvlink_rank` is this
  // rank's index in its NVLink team as NCCL reports it.
  OPENEP_HOST_DEVICE bool node_major(int nvlink_rank) const {
    return ranks_per_node >= 1 && num_ranks % ranks_per_node == 0 && nvlink_rank == local_rank();
  }
};

}  // namespace openep::detail
