// Host-side declarations of OpenEP's kernel launchers (implemented in src/kernels/*.cu).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstdint>

#include "openep/buffer.hpp"
#include "protocol/device_error.hpp"

namespace openep::detail {

// Fills peer_bases[p] = LSA pointer of peer p's copy of `window` at offset 0, for p < num_peers.
void launch_query_peer_bases(ncclWindow_t window, int num_peers, char** peer_bases, cudaStream_t stream);

// Barrier over `num_ranks` NVLink peers through counters at `barrier_offset` of the window, slot `slot`.
struct BarrierParams {
  char* const* peer_bases;      // [num_ranks] device table
  size_t barrier_offset;        // window offset of the uint64 [kNumBarrierSlots][kMaxNvlinkPeers] counters
  uint64_t* epoch;              // device memory: completed barriers on this slot
  int slot;
  int rank;
  int num_ranks;
  int32_t* mask;                // shrink mode: [num_ranks] masked ranks are skipped, a late one is masked; or null
  WaitContext wait;
};
void launch_barrier(const BarrierParams& params, cudaStream_t stream);

// get_dispatch_layout. REQUIRES validate_layout_args() passed. `workspace` holds
// layout_workspace_ints() zeroed ints and is left zeroed.
// num_nodes > 1 (internode Buffer): num_tokens_per_rdma_rank is required, node = rank / (num_ranks / num_nodes).
void validate_layout_args(const LayoutArgs& args, int num_ranks, int num_nodes);
constexpr int layout_workspace_ints() { return kMaxRanks + kMaxRanks + kMaxExperts + 1; }
void launch_dispatch_layout(const LayoutArgs& args, int num_ranks, int num_nodes, int* workspace,
                            const WaitContext& wait, cudaStream_t stream);

}  // namespace openep::detail
