// NcclFabric: one process per GPU; windows are NCCL symmetric memory, peers are reached through LSA pointers.
#include "runtime/nccl_fabric.hpp"

#include <cstdio>

#include "kernels/launch.hpp"
#include "kernels/low_latency_gin_launch.hpp"
#include "protocol/limits.hpp"
#include "runtime/check.hpp"
#include "runtime/transport.hpp"

namespace openep::detail {

// ---- NcclFabric ----

namespace {

void warn_nccl(ncclResult_t res, const char* what) {
  if (res != ncclSuccess) std::fprintf(stderr, "OpenEP: %s failed during teardown: %s\n", what, ncclGetErrorString(res));
}

// ncclDevCommCreate with GIN signals for the network low-latency path (NOT YET RUN ON A REAL NETWORK). Throws
// kUnsupported naming NCCL's reason when NCCL cannot give GIN (no RDMA NIC / GIN plugin) or gives no context.
void create_gin_dev_comm(ncclComm_t comm, int num_ranks, FabricWindow& w) {
  const ncclDevCommRequirements reqs = gin_dev_comm_requirements(num_ranks);
  const ncclResult_t res = ncclDevCommCreate(comm, &reqs, &w.dev_comm);
  OPENEP_CHECK(res == ncclSuccess, ErrorCode::kUnsupported, "BufferOptions::allow_network: ncclDevCommCreate "
               "with GIN failed (", ncclGetErrorString(res), ": ", ncclGetLastError(comm), "); the network path "
               "needs RDMA NICs with NCCL's GIN support. NCCL may have left the communicator unusable: destroy "
               "the Group");
  w.has_dev_comm = true;
  OPENEP_CHECK(w.dev_comm.ginContextCount > 0, ErrorCode::kUnsupported, "BufferOptions::allow_network: NCCL "
               "created the device communicator without GIN contexts (ginContextCount = 0, expected > 0); "
               "check NCCL_GIN_ENABLE and the RDMA NICs");
  OPENEP_CHECK(w.dev_comm.ginSignalCount >= GinSignals::count(num_ranks), ErrorCode::kUnsupported,
               "NCCL gave ", w.dev_comm.ginSignalCount, " GIN signals, the network path needs ",
               GinSignals::count(num_ranks));
}

}  // namespace

NcclFabric::NcclFabric(ncclComm_t comm, int device) : comm_(comm), device_(device) {
  OPENEP_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  OPENEP_NCCL_CHECK(ncclCommCount(comm_, &num_ranks_));
  const ncclTeam_t lsa = ncclTeamLsa(comm_);
  // A zeroed team means NCCL's symmetric-memory setup is unavailable (nccl-device-api.md 1.5).
  lsa_size_ = lsa.nRanks;
  lsa_rank_ = lsa.rank;
}

void NcclFabric::open_window(const WindowRequest& req, cudaStream_t stream, char** peer_table, FabricWindow& w) {
  w = FabricWindow{};
  // Device communicator first: the LSA capability check (one LSA barrier; GIN stays off on one node,
  // nccl-device-api.md 4), or GIN signals for the network path.
  if (!req.gin) {
    ncclDevCommRequirements reqs = {};
    reqs.lsaBarrierCount = 1;
    OPENEP_NCCL_CHECK(ncclDevCommCreate(comm_, &reqs, &w.dev_comm));
    w.has_dev_comm = true;
  } else {
    create_gin_dev_comm(comm_, num_ranks_, w);
  }
  // Zeroed before registration: registration is a world barrier, so every peer's window is zero before anyone
  // can write into it.
  void* mem = nullptr;
  OPENEP_NCCL_CHECK(ncclMemAlloc(&mem, req.bytes));
  w.local = static_cast<char*>(mem);
  w.bytes = req.bytes;
  OPENEP_CUDA_CHECK(cudaMemset(w.local, 0, req.bytes));
  OPENEP_CUDA_CHECK(cudaDeviceSynchronize());
  OPENEP_NCCL_CHECK(ncclCommWindowRegister(comm_, w.local, req.bytes, &w.nccl_window, NCCL_WIN_DEFAULT));
  OPENEP_CHECK(w.nccl_window != nullptr, ErrorCode::kNccl, "ncclCommWindowRegister returned no window");
  // Peer table: LSA pointers of every rank (one NVLink domain), or only the own base (network path: non-LSA
  // peers have no LSA pointer).
  if (!req.gin) {
    launch_query_peer_bases(w.nccl_window, num_ranks_, peer_table, stream);
  } else {
    launch_query_own_base(w.nccl_window, rank_, num_ranks_, peer_table, stream);
  }
  w.peer_bases.resize(num_ranks_);
  OPENEP_CUDA_CHECK(cudaMemcpyAsync(w.peer_bases.data(), peer_table, sizeof(char*) * num_ranks_,
                                    cudaMemcpyDeviceToHost, stream));
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void NcclFabric::close_window(FabricWindow& w) noexcept {
  if (w.nccl_window) warn_nccl(ncclCommWindowDeregister(comm_, w.nccl_window), "ncclCommWindowDeregister");
  if (w.local) warn_nccl(ncclMemFree(w.local), "ncclMemFree");
  if (w.has_dev_comm) warn_nccl(ncclDevCommDestroy(comm_, &w.dev_comm), "ncclDevCommDestroy");
  w = FabricWindow{};
}

GridBudget NcclFabric::grid_budget(int device_sms) const {
  GridBudget b;
  b.device_sms = device_sms;
  b.max_blocks = device_sms;
  b.grids_per_device = 1;
  b.clamp = false;
  return b;
}

}  // namespace openep::detail
