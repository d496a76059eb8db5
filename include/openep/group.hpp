// openep::Group: the NCCL communicator OpenEP runs on.
//
// NCCL is OpenEP's only communication engine. A Group either creates its own communicator from an NCCL
// unique id (C++ users, tests), or splits a private one from a communicator the caller already has (the
// Python package splits from PyTorch's ProcessGroupNCCL), so OpenEP's windows and any abort stay away
// from the caller's communicator.
//
// Internally a Group reaches its peers through a fabric (src/runtime/fabric.hpp): NCCL for every Group made
// here; openep/testing.hpp makes Groups of virtual ranks (N ranks in one process on one GPU) and of processes
// sharing GPUs through CUDA IPC, for tests.
#pragma once

#include <nccl.h>

#include <memory>
#include <vector>

#include "openep/types.hpp"

namespace openep::detail {
class Fabric;
}  // namespace openep::detail

namespace openep::testing {
class VirtualFabric;
class IpcFabric;
}  // namespace openep::testing

namespace openep {

class Group {
 public:
  // Creates the unique id on one rank (rank 0 by convention); ship its 128 bytes to every rank.
  static ncclUniqueId make_unique_id();

  // Collective over num_ranks processes. Selects `device` (cudaSetDevice) and creates a blocking NCCL
  // communicator. REQUIRES: 0 <= rank < num_ranks; every rank passes the same id and num_ranks.
  static std::unique_ptr<Group> create(const ncclUniqueId& id, int rank, int num_ranks, int device);

  // Collective over the ranks of `parent`: splits a private communicator (same ranks, same order) with
  // ncclCommSplit. `parent` is borrowed: it is neither modified nor destroyed. REQUIRES: the current CUDA
  // device is the one `parent` was created on; pass it as `device`.
  static std::unique_ptr<Group> split_from(ncclComm_t parent, int device);

  // After a peer died: collective over the ranks NOT in `excluded` (the survivors; the excluded ranks must not
  // call it). Returns a new Group of the survivors, ranked in their old order (rank r becomes r minus the excluded
  // ranks below r), on this Group's device. Uses ncclCommShrink with NCCL_SHRINK_ABORT, which first ends whatever
  // this Group's communicator still has in flight: afterwards destroy this Group and use the new one (Buffers too:
  // destroy every Buffer of this Group BEFORE calling it, and make new ones on the result).
  // REQUIRES: `excluded` non-empty, each entry in [0, num_ranks()), no duplicates, not this rank (kInvalidArgument
  // otherwise); a Group with an NCCL communicator (virtual ranks: kUnsupported). Like create(), it waits for every
  // survivor without a time bound: run it under the launcher's timeout.
  std::unique_ptr<Group> shrink(const std::vector<int>& excluded) const;

  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  int rank() const noexcept { return rank_; }
  int num_ranks() const noexcept { return num_ranks_; }
  int device() const noexcept { return device_; }
  // Ranks that share this rank's NVLink domain (NCCL's LSA team), and this rank's index in it.
  int num_nvlink_ranks() const noexcept { return lsa_size_; }
  int nvlink_rank() const noexcept { return lsa_rank_; }
  // The communicator, owned by this Group. Valid until the Group is destroyed. nullptr for a Group of
  // virtual ranks (openep/testing.hpp), which has no NCCL communicator.
  ncclComm_t comm() const noexcept { return comm_; }

  // Internal: how OpenEP's Buffer reaches the peers (src/runtime/fabric.hpp).
  detail::Fabric& fabric() const noexcept { return *fabric_; }

 private:
  friend class testing::VirtualFabric;
  friend class testing::IpcFabric;
  Group(ncclComm_t comm, int device);
  explicit Group(std::shared_ptr<detail::Fabric> fabric);  // test fabrics; owns no communicator
  ncclComm_t comm_ = nullptr;
  std::shared_ptr<detail::Fabric> fabric_;
  int rank_ = 0, num_ranks_ = 0, device_ = 0, lsa_size_ = 0, lsa_rank_ = 0;
};

}  // namespace openep
