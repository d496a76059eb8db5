// Launcher of the internode GIN rail's exchange kernel (src/kernels/internode_gin.cu has the protocol). Used only
// by a Buffer created with BufferOptions::internode_backend = kGin (Transport::kInternodeGin). RUN only under the
// loopback GIN test plugin (fake nodes on one H200, 2026-12-02); NEVER on a real network (no RDMA NICs here).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

#include "protocol/device_error.hpp"
#include "protocol/internode_layout.hpp"

namespace openep::detail {

// One rail peer of one exchange, in window offsets of the rail window (GinRailLayout).
struct GinRailPeer {
  int node;                   // the peer's rail rank
  uint64_t send_offset;       // my bytes for it: window offset and length
  uint64_t send_bytes;
  uint64_t recv_offset;       // where its bytes land in my window, and how many I expect
  uint64_t recv_bytes;
};

// One Rail::exchange: every listed peer gets my bytes and I get theirs (a rendezvous per pair, see the kernel).
struct GinRailExchangeParams {
  ncclDevComm dev_comm;       // on the rail communicator; gin_rail_dev_comm_requirements(); ginContextCount > 0
  ncclWindow_t window;        // the rail window (GinRailLayout), the same offsets on every rank
  uint64_t* exchanges;        // [kMaxInternodeNodes] device memory: exchanges completed with each peer (monotonic)
  int node, num_nodes;        // my rail rank, rail size
  int ranks_per_node, local_rank;  // to name a peer's Group rank (node * ranks_per_node + local_rank) in errors
  int num_peers;
  GinRailPeer peers[kMaxInternodeNodes];
  WaitContext wait;
};

void launch_gin_rail_exchange(const GinRailExchangeParams& p, cudaStream_t stream);

}  // namespace openep::detail
