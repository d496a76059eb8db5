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

std::unique_ptr<Group> Group::shrink(const std::vector<int>& excluded) const {
  OPENEP_CHECK_ARG(!excluded.empty(), "Group::shrink: excluded must name at least one rank, got none");
  OPENEP_CHECK_ARG(static_cast<int>(excluded.size()) < num_ranks_, "Group::shrink: excluded names ", excluded.size(),
                   " ranks of a Group of ", num_ranks_, "; at least one must remain");
  std::vector<int> list = excluded;  // ncclCommShrink sorts it in place
  std::vector<bool> seen(num_ranks_, false);
  for (size_t i = 0; i < list.size(); ++i) {
    const int r = list[i];
    OPENEP_CHECK_ARG(r >= 0 && r < num_ranks_, "Group::shrink: excluded[", i, "] must be a rank in [0, ", num_ranks_,
                     "), got ", r);
    OPENEP_CHECK_ARG(!seen[r], "Group::shrink: excluded names rank ", r, " twice");
    OPENEP_CHECK_ARG(r != rank_, "Group::shrink: excluded names this rank (", r, "); only the survivors call it");
    seen[r] = true;
  }
  OPENEP_CHECK(comm_ != nullptr, ErrorCode::kUnsupported,
               "Group::shrink needs an NCCL communicator; a Group of virtual ranks has none");
  OPENEP_CUDA_CHECK(cudaSetDevice(device_));
  ncclComm_t comm = nullptr;
  OPENEP_NCCL_CHECK(ncclCommShrink(comm_, list.data(), static_cast<int>(list.size()), &comm, nullptr, NCCL_SHRINK_ABORT));
  OPENEP_CHECK(comm != nullptr, ErrorCode::kNccl, "ncclCommShrink returned no communicator for rank ", rank_);
  return std::unique_ptr<Group>(new Group(comm, device_));
}

Group::~Group() {
  fabric_.reset();
  if (comm_ == nullptr) return;
  // Collective finalize would block if a peer died; destroy is local. Errors are reported, not thrown.
  const ncclResult_t res = ncclCommDestroy(comm_);
  if (res != ncclSuccess) std::fprintf(stderr, "OpenEP: ncclCommDestroy failed: %s\n", ncclGetErrorString(res));
}

}  // namespace openep
