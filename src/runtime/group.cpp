#include "openep/group.hpp"

#include <cuda_runtime.h>
#include <nccl_device.h>

#include <cstdio>

#include "runtime/check.hpp"
#include "runtime/nccl_fabric.hpp"

namespace openep {

ncclUniqueId Group::make_unique_id() {
  ncclUniqueId id;
  OPENEP_NCCL_CHECK(ncclGetUniqueId(&id));
  return id;
}

Group::Group(ncclComm_t comm, int device) : comm_(comm), device_(device) {
  try {
    fabric_ = std::make_shared<detail::NcclFabric>(comm_, device_);
  } catch (...) {
    (void)ncclCommDestroy(comm_);  // the Group is not constructed, so its destructor will not run
    throw;
  }
  rank_ = fabric_->rank();
  num_ranks_ = fabric_->num_ranks();
  lsa_size_ = fabric_->num_nvlink_ranks();
  lsa_rank_ = fabric_->nvlink_rank();
}

Group::Group(std::shared_ptr<detail::Fabric> fabric) : fabric_(std::move(fabric)) {
  device_ = fabric_->device();
  rank_ = fabric_->rank();
  num_ranks_ = fabric_->num_ranks();
  lsa_size_ = fabric_->num_nvlink_ranks();
  lsa_rank_ = fabric_->nvlink_rank();
}

std::unique_ptr<Group> Group::create(const ncclUniqueId& id, int rank, int num_ranks, int device) {
  OPENEP_CHECK_ARG(num_ranks >= 1 && num_ranks <= kMaxRanksInGroup, "num_ranks must be in [1, ", kMaxRanksInGroup,
                   "], got ", num_ranks);
  OPENEP_CHECK_ARG(rank >= 0 && rank < num_ranks, "rank must be in [0, ", num_ranks, "), got ", rank);
  int num_devices = 0;
  OPENEP_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
  OPENEP_CHECK_ARG(device >= 0 && device < num_devices, "device must be in [0, ", num_devices, "), got ", device);
  OPENEP_CUDA_CHECK(cudaSetDevice(device));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 1;
  ncclComm_t comm = nullptr;
  OPENEP_NCCL_CHECK(ncclCommInitRankConfig(&comm, num_ranks, id, rank, &config));
  return std::unique_ptr<Group>(new Group(comm, device));
}

std::unique_ptr<Group> Group::split_from(ncclComm_t parent, int device) {
  OPENEP_CHECK_ARG(parent != nullptr, "parent communicator is null");
  OPENEP_CUDA_CHECK(cudaSetDevice(device));
  int rank = 0;
  OPENEP_NCCL_CHECK(ncclCommUserRank(parent, &rank));
  ncclComm_t comm = nullptr;
  OPENEP_NCCL_CHECK(ncclCommSplit(parent, /*color=*/0, /*key=*/rank, &comm, nullptr));
  OPENEP_CHECK(comm != nullptr, ErrorCode::kNccl, "ncclCommSplit returned no communicator for rank ", rank);
  return std::unique_ptr<Group>(new Group(comm, device));
}

Group::~Group() {
  fabric_.reset();
  if (comm_ == nullptr) return;
  // Collective finalize would block if a peer died; destroy is local. Errors are reported, not thrown.
  const ncclResult_t res = ncclCommDestroy(comm_);
  if (res != ncclSuccess) std::fprintf(stderr, "OpenEP: ncclCommDestroy failed: %s\n", ncclGetErrorString(res));
}

}  // namespace openep
