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
  // rail communicator gets no window and no device communicator at all (host p2p only).
  NodeSplit split_nodes(int ranks_per_node) override;

 private:
  ncclComm_t comm_ = nullptr;
  bool owns_comm_ = false;
  int device_ = 0, rank_ = 0, num_ranks_ = 0, lsa_size_ = 0, lsa_rank_ = 0;
};

}  // namespace openep::detail
