// "Last block out" tickets: the one block of a grid that arrives last learns it and may then publish what
// every block wrote (counts, flags, epochs).
#pragma once

#include <cstdint>

#include "device/ptx.cuh"

namespace openep::device {

// True on every thread of the last block of the grid to get here; that block resets the ticket to 0. Every
// thread of every block must call it (two __syncthreads). kSystem: the arrivals are acq_rel at system scope,
// so the last block sees (and may release to peers) every block's peer stores and posted puts; otherwise GPU
// scope (enough to store an epoch read on this GPU).
template <bool kSystem>
__device__ __forceinline__ bool last_block(uint32_t* ticket) {
  __shared__ int s_last;
  __syncthreads();  // the block's writes are ordered before thread 0's release
  if (threadIdx.x == 0) {
    const uint32_t prev = kSystem ? ptx::atom_add_acq_rel_sys(ticket, 1u) : ptx::atom_add_acq_rel_gpu(ticket, 1u);
    s_last = prev == gridDim.x - 1;
    if (s_last) *ticket = 0;
  }
  __syncthreads();
  return s_last != 0;
}

}  // namespace openep::device
