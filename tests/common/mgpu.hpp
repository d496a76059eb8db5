// Multi-GPU test environment: one process per GPU, started by tools/launch.py, which sets RANK, WORLD_SIZE,
// LOCAL_RANK and OPENEP_UNIQUE_ID_FILE. Rank 0 writes the NCCL unique id to that file; the others read it.
// Tests written for both modes use common/ranks.hpp instead (rank_env(), world_group(), host_barrier()).
#pragma once

#include <nccl.h>

#include "common/ranks.hpp"

namespace openep::test {

// Exchanges an NCCL unique id through the launcher's file. `tag` distinguishes several ids in one run.
ncclUniqueId exchange_unique_id(const char* tag);

}  // namespace openep::test
