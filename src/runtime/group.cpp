#include "openep/group.hpp"

#include <cuda_runtime.h>
#include <nccl_device.h>

#include <cstdio>

#include "runtime/check.hpp"

namespace openep {

ncclUniqueId Group::make_unique_id() {
  ncclUniqueId id;
  OPENEP_NCCL_CHECK(ncclGetUniqueId(&id));
  return id;
}

Group::Group(ncclComm_t comm, int device) : comm_(comm), device_(device) {
  OPENEP_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
  OPENEP_NCCL_CHECK(ncclCommCount(comm_, &num_ranks_));
  const ncclTeam_t lsa = ncclTeamLsa(comm_);
  // A zeroed team means NCCL's symmetric-memory setup is unavailable (nccl-device-api.md 1.5).
  lsa_size_ = lsa.nRanks;
  lsa_rank_ = lsa.rank;
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
  if (comm_ == nullptr) return;
  // Collective finalize would block if a peer died; destroy is local. Errors are reported, not thrown.
  const ncclResult_t res = ncclCommDestroy(comm_);
  if (res != ncclSuccess) std::fprintf(stderr, "OpenEP: ncclCommDestroy failed: %s\n", ncclGetErrorString(res));
}

}  // namespace openep
