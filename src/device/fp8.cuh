// The e4m3 cast of the low-latency dispatch (one copy, shared by the NVLink and the GIN send kernels so that
// both transports produce identical bytes). Bit-exact with the CPU reference (reference/reference.cpp):
// amax over 128 channels with a floor, scale = 448 / amax (or a power of two with round_scale), products
// rounded with __fmul_rn, satfinite conversion.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

namespace openep::device {

constexpr float kE4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// Casts 8 BF16 values (one int4) of a 128-channel block held by 16 consecutive lanes; writes 8 e4m3 bytes
// and, on the block's first lane (threadIdx.x % 16 == 0), the inverse scale. All 32 lanes must call it
// (shuffles); lanes with active == false take part in the shuffles and write nothing.
__device__ __forceinline__ void cast_fp8_chunk(const int4 v, bool active, bool round_scale, uint2* out_bytes,
                                               float* out_scale) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
  float f[8];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = __uint_as_float(w[q] << 16);
    f[2 * q + 1] = __uint_as_float(w[q] & 0xFFFF0000u);
  }
  float amax = 0.0f;
#pragma unroll
  for (int q = 0; q < 8; ++q) amax = fmaxf(amax, fabsf(f[q]));
#pragma unroll
  for (int o = 8; o >= 1; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  amax = fmaxf(amax, kAmaxFloor);
  float scale, scale_inv;
  if (!round_scale) {
    scale_inv = __fdiv_rn(amax, kE4m3Max);
    scale = __fdiv_rn(kE4m3Max, amax);
  } else {
    const uint32_t u = __float_as_uint(__fdiv_rn(amax, kE4m3Max));
    const uint32_t exponent_field = ((u >> 23) & 0xFFu) + ((u & 0x7FFFFFu) != 0 ? 1u : 0u);
    scale_inv = __uint_as_float(exponent_field << 23);
    scale = __fdiv_rn(1.0f, scale_inv);
  }
  if (!active) return;
  uint32_t packed[2] = {0, 0};
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const uint32_t b = __nv_cvt_float_to_fp8(__fmul_rn(f[q], scale), __NV_SATFINITE, __NV_E4M3);
    packed[q / 4] |= (b & 0xFFu) << (8 * (q % 4));
  }
  *out_bytes = make_uint2(packed[0], packed[1]);
  if ((threadIdx.x & 15) == 0) *out_scale = scale_inv;
}

}  // namespace openep::device
