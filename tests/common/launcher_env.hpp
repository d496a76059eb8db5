// The environment tools/launch.py gives each process (RANK, WORLD_SIZE, LOCAL_RANK, OPENEP_UNIQUE_ID_FILE),
// and the NCCL unique-id hand-over through that file. Shared by the multi-GPU tests and the benchmark.
#pragma once

#include <nccl.h>

namespace openep::test {

struct LauncherEnv {
  int rank = 0, world_size = 1, local_rank = 0;
};

// Throws std::runtime_error if the variables are missing (the binary was not started by the launcher).
LauncherEnv read_launcher_env();

// Rank 0 creates an id and publishes it atomically (write + rename); other ranks poll for it (120 s).
// `tag` distinguishes several ids in one run.
ncclUniqueId exchange_unique_id(int rank, const char* tag);

}  // namespace openep::test
