// NcclFabric: one process per GPU; windows are NCCL symmetric memory, peers are reached through LSA pointers.
#include "runtime/nccl_fabric.hpp"

#include <cstdio>
#include <cstdlib>

#include "kernels/launch.hpp"
#include "kernels/low_latency_gin_launch.hpp"
#include "protocol/limits.hpp"
#include "runtime/check.hpp"
#include "runtime/internode_gin.hpp"
#include "runtime/transport.hpp"

namespace openep::detail {

// ---- NcclFabric ----

void warn_nccl(ncclResult_t res, const char* what) noexcept {
  if (res != ncclSuccess) std::fprintf(stderr, "OpenEP: %s failed during teardown: %s\n", what, ncclGetErrorString(res));
}

// Run under the loopback GIN test plugin (low-latency Buffers on fake nodes); never on a real network.
void create_gin_dev_comm(ncclComm_t comm, const ncclDevCommRequirements& reqs, int signals_needed, const char* option,
                         const char* remedy, ncclDevComm& dev_comm, bool& created) {
  created = false;
  const ncclResult_t res = ncclDevCommCreate(comm, &reqs, &dev_comm);
  OPENEP_CHECK(res == ncclSuccess, ErrorCode::kUnsupported,
               gin_unavailable_message(option, ncclGetErrorString(res), ncclGetLastError(comm), remedy));
  created = true;
  OPENEP_CHECK(dev_comm.ginContextCount > 0, ErrorCode::kUnsupported, option, ": NCCL created the device "
               "communicator without GIN contexts (ginContextCount = 0, expected > 0); check NCCL_GIN_ENABLE and the "
               "RDMA NICs", remedy);
  OPENEP_CHECK(dev_comm.ginSignalCount >= signals_needed, ErrorCode::kUnsupported, option, ": NCCL gave ",
               dev_comm.ginSignalCount, " GIN signals, the network path needs ", signals_needed, remedy);
  // NCCL does not zero the signals of a new device communicator (launch_gin_zero_signals says why). No peer can
  // signal us before the caller's window registration (collective), which comes after this.
  cudaStream_t s = nullptr;
  OPENEP_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  try {
    launch_gin_zero_signals(dev_comm, signals_needed, s);
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(s));
  } catch (...) {
    cudaStreamDestroy(s);
    throw;
  }
  OPENEP_CUDA_CHECK(cudaStreamDestroy(s));
}

NcclFabric::NcclFabric(ncclComm_t comm, int device, bool owns_comm) : comm_(comm), owns_comm_(owns_comm), device_(device) {
  OPENEP_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  OPENEP_NCCL_CHECK(ncclCommCount(comm_, &num_ranks_));
  const ncclTeam_t lsa = ncclTeamLsa(comm_);
  // A zeroed team means NCCL's symmetric-memory setup is unavailable (nccl-device-api.md 1.5).
  lsa_size_ = lsa.nRanks;
  lsa_rank_ = lsa.rank;
}

NcclFabric::~NcclFabric() {
  if (owns_comm_ && comm_) warn_nccl(ncclCommDestroy(comm_), "ncclCommDestroy (node communicator)");
}

NcclRailComm::NcclRailComm(ncclComm_t comm, int device) : comm_(comm), device_(device) {
  OPENEP_NCCL_CHECK(ncclCommUserRank(comm_, &node_));
  OPENEP_NCCL_CHECK(ncclCommCount(comm_, &num_nodes_));
}

NcclRailComm::~NcclRailComm() {
  if (comm_ == nullptr || aborted_) return;
  warn_nccl(ncclCommDestroy(comm_), "ncclCommDestroy (rail communicator)");
}

std::string nccl_async_error_note(ncclComm_t comm, const char* which) {
  if (comm == nullptr) return {};
  ncclResult_t state = ncclSuccess;
  if (ncclCommGetAsyncError(comm, &state) != ncclSuccess || state == ncclSuccess || state == ncclInProgress) return {};
  return std::string(" NCCL reports '") + ncclGetErrorString(state) + "' on the " + which +
         " communicator (ncclCommGetAsyncError): its network failed or a peer is gone; NCCL's GIN progress thread, "
         "if it has one, has stopped.";
}

std::string NcclRailComm::network_error() const {
  return aborted_ ? std::string() : nccl_async_error_note(comm_, "rail");
}

void NcclRailComm::abort() noexcept {
  if (comm_ == nullptr || aborted_) return;
  aborted_ = true;
  warn_nccl(ncclCommAbort(comm_), "ncclCommAbort (rail communicator)");
}

namespace {

// Grouped ncclSend/ncclRecv on the rail communicator (rail rank = node).
class NcclRail final : public NcclRailComm {
 public:
  using NcclRailComm::NcclRailComm;
  const char* name() const noexcept override { return "NCCL p2p"; }
  void exchange(const char* send_base, char* recv_base, const std::vector<RailTransfer>& transfers,
                cudaStream_t stream) override {
    OPENEP_CHECK(!aborted_, ErrorCode::kBufferFailed, "the rail communicator was aborted after a timeout");
    OPENEP_NCCL_CHECK(ncclGroupStart());
    ncclResult_t res = ncclSuccess;
    for (const RailTransfer& t : transfers) {
      OPENEP_CHECK(t.node != node_ && t.node >= 0 && t.node < num_nodes_, ErrorCode::kInternal, "rail transfer to node ",
                   t.node, " from node ", node_, " of ", num_nodes_);
      if (res == ncclSuccess && t.send_bytes > 0)
        res = ncclSend(send_base + t.send_offset, t.send_bytes, ncclUint8, t.node, comm_, stream);
      if (res == ncclSuccess && t.recv_bytes > 0)
        res = ncclRecv(recv_base + t.recv_offset, t.recv_bytes, ncclUint8, t.node, comm_, stream);
    }
    const ncclResult_t end = ncclGroupEnd();
    OPENEP_CHECK(res == ncclSuccess && end == ncclSuccess, ErrorCode::kNccl, "rail exchange on node ", node_, ": ",
                 ncclGetErrorString(res != ncclSuccess ? res : end), " (", ncclGetLastError(comm_), ")");
  }
};

}  // namespace

NodeSplit NcclFabric::split_nodes(int ranks_per_node, bool gin_rail) {
  OPENEP_CHECK(ranks_per_node >= 1 && num_ranks_ % ranks_per_node == 0, ErrorCode::kInternal, "split_nodes(",
               ranks_per_node, ") of ", num_ranks_, " ranks");
  // Shared split resources would share GIN state with the Group's communicator (internode.md trap 7).
  const char* share = std::getenv("NCCL_COMM_SPLIT_SHARE_RESOURCES");
  OPENEP_CHECK(!gin_rail || share == nullptr || std::atoi(share) == 0, ErrorCode::kUnsupported,
               "BufferOptions::internode_backend = kGin needs NCCL_COMM_SPLIT_SHARE_RESOURCES unset or 0 (it is \"",
               share ? share : "", "\"): a rail communicator sharing resources with the Group's would share its GIN state");
  const int node = rank_ / ranks_per_node, local = rank_ % ranks_per_node;
  ncclComm_t node_comm = nullptr, rail_comm = nullptr;
  OPENEP_NCCL_CHECK(ncclCommSplit(comm_, node, local, &node_comm, nullptr));
  OPENEP_CHECK(node_comm != nullptr, ErrorCode::kNccl, "ncclCommSplit returned no node communicator on rank ", rank_);
  NodeSplit out;
  out.node = std::make_unique<NcclFabric>(node_comm, device_, /*owns_comm=*/true);
  OPENEP_NCCL_CHECK(ncclCommSplit(comm_, local, node, &rail_comm, nullptr));
  OPENEP_CHECK(rail_comm != nullptr, ErrorCode::kNccl, "ncclCommSplit returned no rail communicator on rank ", rank_);
  if (gin_rail) {
    out.rail = make_gin_rail(rail_comm, device_, ranks_per_node, local);
  } else {
    out.rail = std::make_unique<NcclRail>(rail_comm, device_);
  }
  OPENEP_CHECK(out.node->num_nvlink_ranks() == ranks_per_node, ErrorCode::kUnsupported, "the node communicator of rank ",
               rank_, " has an NVLink (LSA) team of ", out.node->num_nvlink_ranks(), " ranks, expected ", ranks_per_node,
               " (every rank of a node must reach the others over NVLink)");
  return out;
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
    create_gin_dev_comm(comm_, gin_dev_comm_requirements(num_ranks_), GinSignals::count(num_ranks_),
                        "BufferOptions::allow_network", ": destroy the Group", w.dev_comm, w.has_dev_comm);
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

GridBudget NcclFabric::grid_budget(int device_sms) const { return whole_device_budget(device_sms); }

}  // namespace openep::detail
