// Block-level barrier over the NVLink peers (protocol in src/kernels/runtime_kernels.cu). Called by every
// thread of one block; needs blockDim.x >= num_ranks. Returns false on every thread if a wait timed out.
#pragma once

#include <cstdint>

#include "device/wait.cuh"
#include "protocol/window_layout.hpp"

namespace openep::device {

struct BarrierRef {
  char* const* peer_bases;
  size_t barrier_offset;
  uint64_t* epoch;   // local: completed barriers on this slot
  int slot, rank, num_ranks;
  int32_t* mask = nullptr;  // shrink mode: skip masked peers, mask a peer that does not arrive in time
};

__device__ __forceinline__ bool barrier_block(const BarrierRef& b, const WaitContext& wait, detail::Phase phase) {
  __shared__ uint64_t target;
  __shared__ int failed;
  __syncthreads();  // every thread's earlier writes are ordered before the releases below
  if (threadIdx.x == 0) target = b.epoch[0] + 1, failed = 0;
  __syncthreads();
  const int p = threadIdx.x;
  if (p < b.num_ranks && rank_live(b.mask, p)) {
    auto* remote = reinterpret_cast<uint64_t*>(
        b.peer_bases[p] + detail::WindowLayout::barrier_counter(b.barrier_offset, b.slot, b.rank));
    ptx::red_add_release_sys(remote, 1);  // pairs with the peer's ld_acquire_sys in wait_geq
    const auto* local = reinterpret_cast<const uint64_t*>(
        b.peer_bases[b.rank] + detail::WindowLayout::barrier_counter(b.barrier_offset, b.slot, p));
    if (b.mask == nullptr) {
      if (!wait_geq(wait, local, target, p, phase)) failed = 1;
    } else if (wait_geq_or_mask(wait, local, target, p, b.mask) == PeerWait::kFailed) {
      failed = 1;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) b.epoch[0] = target;
  return failed == 0;
}

}  // namespace openep::device
