// Where a packed row of the low-latency combine input comes from, from the handle's layout ranges. Shared by
// the NVLink (low_latency.cu) and the GIN (low_latency_gin.cu) combine send kernels.
//   layout_range[i * R + s] = (start << 32) | count: the rows local expert i received from source rank s;
//   the ranges of one expert are consecutive in source order, so its rows end where its last range ends.
#pragma once

#include <cstdint>

namespace openep::detail {

// s_prefix[i] = packed rows of local experts 0..i-1 (s_prefix[0] = 0, s_prefix[El] = all rows). Warp 0 scans
// (32 experts per step); every thread of the block must call it (it ends with __syncthreads).
// s_prefix: shared memory of El + 1 ints.
__device__ __forceinline__ void scan_expert_rows(const int64_t* layout_range, int El, int R, int* s_prefix) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    int carry = 0;
    for (int base = 0; base < El; base += 32) {
      const int i = base + lane;
      int v = 0;
      if (i < El) {
        const int64_t last = layout_range[i * R + R - 1];
        v = static_cast<int>(last >> 32) + static_cast<int>(last & 0xFFFFFFFFLL);
      }
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
      }
      if (i < El) s_prefix[i + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
    if (lane == 0) s_prefix[0] = 0;
  }
  __syncthreads();
}

// The local expert of packed row q (0 <= q < s_prefix[El]): the last i with s_prefix[i] <= q.
__device__ __forceinline__ int local_expert_of_row(const int* s_prefix, int El, int q) {
  int lo = 0, hi = El - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (s_prefix[mid] <= q) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The source rank of row r of local expert i: the last s whose range starts at or before r (an empty range
// starts where the next one starts, so the last such s owns row r).
__device__ __forceinline__ int source_rank_of_row(const int64_t* layout_range, int R, int i, int r) {
  int lo = 0, hi = R - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (static_cast<int>(layout_range[i * R + mid] >> 32) <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace openep::detail
