// LogFMT-10 on the device: the encode of the low-latency combine send and the decode of its receive. The format
// and all arithmetic are in protocol/logfmt.hpp (shared with the CPU reference, so both compute the same bits);
// this file only maps it onto warps.
//
// Send (logfmt_store_chunk): a warp holds one chunk of a BF16 row, kUnroll int4 pieces per lane, piece
// j = first + k * 32 + lane (8 channels); a 128-channel division is 16 pieces, i.e. one half-warp per unroll
// step k. The half-warp reduces amax / amin of |x| on the BF16 bits (integer max / min: exact and
// order-independent), every lane derives the same division parameters, then either stores its piece unchanged
// (BF16 fallback) or encodes its 8 channels into one pack group (8 low bytes + 16 high bits) and the half-warp
// gathers the groups with shuffles into 10 int4 stores (8 of the low plane, 2 of the high plane). The metadata
// words of the chunk's divisions go out in one warp store (lanes 0 .. 2 kUnroll - 1).
// Receive (logfmt_load_piece, logfmt_accumulate): a thread owns piece c of the output row; per slot it reads the
// division's metadata word, then either the BF16 piece or its group's 8 low bytes and 16 high bits, and adds
// weight * decoded value per channel with __fmul_rn / __fadd_rn (the BF16 path's order and rounding).
// No memory ordering of its own: the stores are covered by the combine send's last-block release and the
// loads by the receive's acquire of the combine flags (src/kernels/low_latency.cu).
#pragma once

#include <cstdint>

#include "device/ptx.cuh"
#include "protocol/logfmt.hpp"

namespace openep::device {

namespace lf = ::openep::detail::logfmt;

// Encodes and stores one chunk of a combine row. v[k]: piece first + k * 32 + lane of the source row (zeros
// beyond row_int4); dst_row: the row's slot in the receiver's window (16-byte pieces); dst_meta: the row's
// metadata words there. REQUIRES: first % 16 == 0, row_int4 % 16 == 0 (hidden % 128 == 0); all 32 lanes call
// it with the same first / row_int4 (shuffles).
template <int kUnroll>
__device__ __forceinline__ void logfmt_store_chunk(const int4 (&v)[kUnroll], int first, int row_int4, int4* dst_row,
                                                   int32_t* dst_meta, int lane) {
  constexpr uint32_t kFull = 0xffffffffu;
  const int l = lane & 15;  // piece inside the division = pack group
  uint32_t meta[kUnroll];
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int j = first + k * 32 + lane;
    const bool active = j < row_int4;  // the same on all 16 lanes of a half-warp
    const uint32_t w[4] = {static_cast<uint32_t>(v[k].x), static_cast<uint32_t>(v[k].y),
                           static_cast<uint32_t>(v[k].z), static_cast<uint32_t>(v[k].w)};
    uint32_t bits[lf::kGroupChannels];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      bits[2 * q] = w[q] & 0xFFFFu;
      bits[2 * q + 1] = w[q] >> 16;
    }
    uint32_t amax = 0, amin = 0xFFFFu;
#pragma unroll
    for (int q = 0; q < lf::kGroupChannels; ++q) {
      amax = max(amax, lf::abs_bits(bits[q]));
      amin = min(amin, lf::abs_bits(bits[q]));
    }
#pragma unroll
    for (int o = 8; o >= 1; o >>= 1) {  // xor below 16 stays inside the half-warp
      amax = max(amax, __shfl_xor_sync(kFull, amax, o));
      amin = min(amin, __shfl_xor_sync(kFull, amin, o));
    }
    meta[k] = lf::make_meta(amax, amin);
    const lf::Division d = lf::division(meta[k]);
    uint32_t low_lo = 0, low_hi = 0, high16 = 0;
    if (d.encoded) {
      uint32_t code[lf::kGroupChannels];
#pragma unroll
      for (int q = 0; q < lf::kGroupChannels; ++q) code[q] = lf::encode(bits[q], d);
      lf::pack_group(code, low_lo, low_hi, high16);
    }
    // Gather inside the half-warp: an even lane 2m takes group 2m + 1's low bytes (one int4 of the low plane)
    // and forms the high-plane word of groups 2m, 2m + 1; lanes 0 and 8 take four such words (one int4).
    const uint32_t next_lo = __shfl_down_sync(kFull, low_lo, 1), next_hi = __shfl_down_sync(kFull, low_hi, 1);
    const uint32_t high_word = high16 | (__shfl_down_sync(kFull, high16, 1) << 16);
    const uint32_t high_word2 = __shfl_down_sync(kFull, high_word, 2);
    const uint32_t high_word4 = __shfl_down_sync(kFull, high_word, 4);
    const uint32_t high_word6 = __shfl_down_sync(kFull, high_word, 6);
    if (active && !d.encoded) ptx::st_no_allocate(dst_row + j, v[k]);  // BF16 fallback: the piece unchanged
    if (active && d.encoded) {
      int4* division_slot = dst_row + (j - l);  // 256-byte slot of the division; its first 160 bytes are written
      if ((l & 1) == 0) {
        ptx::st_no_allocate(division_slot + l / 2, make_int4(static_cast<int>(low_lo), static_cast<int>(low_hi),
                                                              static_cast<int>(next_lo), static_cast<int>(next_hi)));
      }
      if ((l & 7) == 0) {
        ptx::st_no_allocate(division_slot + lf::kLowPlaneBytes / 16 + l / 8,
                            make_int4(static_cast<int>(high_word), static_cast<int>(high_word2),
                                      static_cast<int>(high_word4), static_cast<int>(high_word6)));
      }
    }
  }
  // Metadata: division 2k + h of the chunk was reduced by half-warp h at step k; lane 2k + h stores it.
  uint32_t mine = 0;
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const uint32_t m0 = __shfl_sync(kFull, meta[k], 0), m1 = __shfl_sync(kFull, meta[k], 16);
    if (lane == 2 * k) mine = m0;
    if (lane == 2 * k + 1) mine = m1;
  }
  const int division_idx = first / 16 + lane;
  if (lane < 2 * kUnroll && division_idx < row_int4 / 16) {
    ptx::st_no_allocate(dst_meta + division_idx, static_cast<int32_t>(mine));
  }
}

// The bytes of piece c (channels 8c .. 8c + 7) of a received LogFMT row whose division has metadata `meta`:
// the BF16 piece when the division is not encoded, else (low_lo, low_hi, high16, 0) of its pack group.
__device__ __forceinline__ int4 logfmt_load_piece(const int4* row, int c, uint32_t meta) {
  if (!lf::encodes(meta)) return ptx::ld_cg(row + c);
  const int l = c & 15;
  const char* division_slot = reinterpret_cast<const char*>(row + (c - l));
  const int2 low = ptx::ld_cg(reinterpret_cast<const int2*>(division_slot + 8 * l));
  const uint32_t high = static_cast<uint32_t>(
      ptx::ld_cg(reinterpret_cast<const int32_t*>(division_slot + lf::kLowPlaneBytes + 4 * (l >> 1))));
  return make_int4(low.x, low.y, static_cast<int>((high >> (16 * (l & 1))) & 0xFFFFu), 0);
}

// acc[k] += w * (decoded value of channel k of an ENCODED piece from logfmt_load_piece): float32 multiply, then
// add, each rounded (no FMA).
__device__ __forceinline__ void logfmt_accumulate(const int4& piece, uint32_t meta, float w, float (&acc)[8]) {
  const lf::Division d = lf::division(meta);
#pragma unroll
  for (int k = 0; k < lf::kGroupChannels; ++k) {
    const uint32_t code = lf::code_of_group(static_cast<uint32_t>(piece.x), static_cast<uint32_t>(piece.y),
                                            static_cast<uint32_t>(piece.z), k);
    acc[k] = __fadd_rn(acc[k], __fmul_rn(w, lf::decode(code, d)));
  }
}

}  // namespace openep::device
