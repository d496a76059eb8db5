// Multi-GPU test environment: one process per GPU, started by tools/launch.py, which sets RANK, WORLD_SIZE,
// LOCAL_RANK and OPENEP_UNIQUE_ID_FILE. Rank 0 writes the NCCL unique id to that file; the others read it.
#pragma once

#include <nccl.h>

#include <memory>

#include "openep/group.hpp"

namespace openep::test {

struct MgpuEnv {
  int rank = 0, world_size = 1, local_rank = 0;
};

// The process's environment and its world Group (created once in main()).
const MgpuEnv& mgpu_env();
Group& world_group();

// Exchanges an NCCL unique id through the launcher's file. `tag` distinguishes several ids in one run.
ncclUniqueId exchange_unique_id(const char* tag);

}  // namespace openep::test
