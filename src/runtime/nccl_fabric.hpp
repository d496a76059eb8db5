// NcclFabric: the production fabric (one process per GPU, NCCL symmetric memory). See runtime/fabric.hpp.
#pragma once

#include "runtime/fabric.hpp"

namespace openep::detail {

class NcclFabric final : public Fabric {
 public:
  // Borrows `comm` (the Group owns it), or owns it (a node communicator split by split_nodes, destroyed with
  // the fabric). Reads rank, size and the LSA team from it.
  NcclFabric(ncclComm_t comm, int device, bool owns_comm = false);
  ~NcclFabric() override;

  const char* name() const noexcept override { return "NCCL"; }
  int rank() const noexcept override { return rank_; }
  int num_ranks() const noexcept override { return num_ranks_; }
  int device() const noexcept override { return device_; }
  int num_nvlink_ranks() const noexcept override { return lsa_size_; }
  int nvlink_rank() const noexcept override { return lsa_rank_; }
  ncclComm_t nccl_comm() const noexcept override { return comm_; }

  // ncclDevCommCreate (LSA capability check, or GIN), ncclMemAlloc, zero, ncclCommWindowRegister (a world
  // barrier), then the LSA peer pointers (or only the own base on the network path).
  void open_window(const WindowRequest& req, cudaStream_t stream, char** peer_table, FabricWindow& w) override;
  void close_window(FabricWindow& w) noexcept override;
  // Every SM of the device; a larger grid is an error.
  GridBudget grid_budget(int device_sms) const override;
  // ncclCommSplit twice (node: color node, key local rank; rail: color local rank, key node), in this order
  // on every rank. The node communicator has one NCCL node, so its device communicator never enables GIN; the
  // rail communicator gets no window and no device communicator with the host-driven rail; with `gin_rail` it
  // gets both (internode_gin.hpp), and only it.
  NodeSplit split_nodes(int ranks_per_node, bool gin_rail) override;

 private:
  ncclComm_t comm_ = nullptr;
  bool owns_comm_ = false;
  int device_ = 0, rank_ = 0, num_ranks_ = 0, lsa_size_ = 0, lsa_rank_ = 0;
};

// A rail over an NCCL communicator it owns (rail rank = node): the part the host-driven rail and the GIN rail
// share. Destroys the communicator, or leaves it after abort(). Always overlaps and can hang (a dead node).
class NcclRailComm : public Rail {
 public:
  NcclRailComm(ncclComm_t comm, int device);
  ~NcclRailComm() override;
  int num_nodes() const noexcept override { return num_nodes_; }
  int node() const noexcept override { return node_; }
  bool can_hang() const noexcept override { return true; }
  bool overlaps() const noexcept override { return true; }
  void abort() noexcept override;
  std::string network_error() const override;

 protected:
  ncclComm_t comm_ = nullptr;
  int device_ = 0, node_ = 0, num_nodes_ = 0;
  bool aborted_ = false;
};

// ncclDevCommCreate with GIN (`reqs` asks for `signals_needed` signals) on `comm`. Throws kUnsupported naming
// `option` (the BufferOptions field that asked for GIN) and NCCL's reason when NCCL gives no GIN (no RDMA NIC /
// GIN plugin), no context or too few signals; every message ends with `remedy`. `created` tells whether `dev_comm`
// must be destroyed.
void create_gin_dev_comm(ncclComm_t comm, const ncclDevCommRequirements& reqs, int signals_needed, const char* option,
                         const char* remedy, ncclDevComm& dev_comm, bool& created);

// " NCCL reports <error> on the <which> communicator (...)." when ncclCommGetAsyncError(comm) holds an error, else
// "". Never throws; comm may be null.
std::string nccl_async_error_note(ncclComm_t comm, const char* which);

// Prints a teardown failure of `what` (never throws).
void warn_nccl(ncclResult_t res, const char* what) noexcept;

}  // namespace openep::detail
