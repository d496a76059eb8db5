// Warp-wide copies of 16-byte-aligned rows. Lanes move 16 bytes each per step, with kUnroll loads in flight
// before the first store (a 14 KB row copied with one load in flight takes 2-3x longer; perf-techniques.md 2).
#pragma once

#include <cstdint>

#include "device/ptx.cuh"

namespace openep::device {

enum class Source { kInput, kWindow };  // caller input (read-only, .nc) or our window written by peers (.cg)

template <Source kSrc>
__device__ __forceinline__ int4 load16(const int4* p) {
  if constexpr (kSrc == Source::kInput) return ptx::ld_nc_no_allocate(p);
  else return ptx::ld_cg(p);
}

// Copies `num_int4` 16-byte words from src to dst with the 32 lanes of a warp.
template <Source kSrc, int kUnroll = 7>
__device__ __forceinline__ void copy_warp(int4* __restrict__ dst, const int4* __restrict__ src, int num_int4, int lane) {
  constexpr int kStep = 32 * kUnroll;
  int i = lane;
  for (; i + (kUnroll - 1) * 32 < num_int4; i += kStep) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load16<kSrc>(src + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) ptx::st_no_allocate(dst + i + u * 32, v[u]);
  }
  for (; i < num_int4; i += 32) ptx::st_no_allocate(dst + i, load16<kSrc>(src + i));
}

// Copies `num_int4` 16-byte words from src to several destinations with the 32 lanes of a warp, loading each
// word once and storing it once per destination (the byte model's fan-out: k stores per load instead of k
// copies). `mask` (warp-uniform) names the destinations by lane: where bit l is set, lane l's `dst` is that
// destination's address. Every lane of the warp must call it (the addresses travel by shuffle).
template <Source kSrc, int kUnroll = 7>
__device__ __forceinline__ void copy_warp_fanout(int4* dst, uint32_t mask, const int4* __restrict__ src, int num_int4,
                                                 int lane) {
  constexpr int kStep = 32 * kUnroll;
  const unsigned long long my_dst = reinterpret_cast<unsigned long long>(dst);
  int b = 0;
  for (; b + kStep <= num_int4; b += kStep) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = load16<kSrc>(src + b + lane + u * 32);
    for (uint32_t m = mask; m; m &= m - 1) {
      int4* d = reinterpret_cast<int4*>(__shfl_sync(0xffffffffu, my_dst, __ffs(m) - 1));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) ptx::st_no_allocate(d + b + lane + u * 32, v[u]);
    }
  }
  for (; b < num_int4; b += 32) {  // warp-uniform tail: lanes past the end only shuffle
    const int i = b + lane;
    const bool in = i < num_int4;
    int4 v{};
    if (in) v = load16<kSrc>(src + i);
    for (uint32_t m = mask; m; m &= m - 1) {
      int4* d = reinterpret_cast<int4*>(__shfl_sync(0xffffffffu, my_dst, __ffs(m) - 1));
      if (in) ptx::st_no_allocate(d + i, v);
    }
  }
}

}  // namespace openep::device
