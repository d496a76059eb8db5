// The device-initiated (GIN) rail of internode normal mode: BufferOptions::internode_backend = kGin,
// Transport::kInternodeGin. The same Rail seam (runtime/rail.hpp), the same exchanges, the same protocol and
// kernels as the host-driven NcclRail; each exchange is a one-block kernel (kernels/internode_gin.cu) that
// rendezvous with every rail peer over NCCL GIN puts and signals.
//
// RUN only under the loopback GIN test plugin (tests/gin_loopback) in fake-node worlds on one H200 (2026-12-02,
// 9b5ce90): InternodeMgpu.*, 16 cases bitwise against the CPU reference (BF16/FP8, up to 4096 tokens x hidden 7168,
// chunked), in 2- and 4-node worlds with one rank per node. NEVER ON A REAL NETWORK: the test machines have no RDMA
// NICs (no InfiniBand/RoCE, GDAKI, real NIC ordering or speed); never with several ranks per node (needs 2+ GPUs).
// Its selection and window layout are CPU-tested, and its creation failure on plain sockets (no GIN) is what the
// fake-node test sees there.
#pragma once

#include <nccl.h>

#include <memory>

#include "runtime/rail.hpp"

namespace openep::detail {

// Takes ownership of `rail_comm` (rail rank = node; split by NcclFabric::split_nodes) and creates its GIN device
// communicator (gin_rail_dev_comm_requirements; collective over the rail). Where NCCL gives no GIN this aborts the
// rail communicator (a failed GIN request leaves it unusable) and throws kUnsupported naming
// BufferOptions::internode_backend and NCCL's reason. The Group's communicator is never touched.
std::unique_ptr<Rail> make_gin_rail(ncclComm_t rail_comm, int device, int ranks_per_node, int local_rank);

}  // namespace openep::detail
