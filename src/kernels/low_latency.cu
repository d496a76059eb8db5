// Low-latency (decode) dispatch and combine over NVLink (LSA peer pointers). Layout of the window region in
// src/runtime/low_latency_layout.hpp.
//
// Protocol (per operation; epochs are monotonic and live in device memory, nothing is reset between calls):
//  Every kernel works on epoch = (completed kernels of its kind and side) + 1 and on data half (epoch & 1);
//  the last block to finish (a ticket) stores the new epoch. All ranks issue the same sequence of calls, so
//  they agree on epochs without talking.
//  dispatch send: blocks take tokens. Threads k < K claim a slot per (token, slot k) with an atomic on this
//    rank's per-expert counter; the block casts the token once into shared memory (header with the source
//    token index, e4m3 payload, float32 scales; or the BF16 row), then all its threads store the K messages
//    straight into the owners' windows at [local expert][my rank][slot]. The last block to finish (its ticket
//    is an acq_rel.sys atomic, so it sees every block's stores) st.release.sys's, for every global expert,
//    (epoch << 32) | count into the owner's dispatch flag (local expert, my rank), and resets the counters.
//  dispatch receive: blocks take local experts. Threads s < R wait (acquire) for each source's flag of this
//    epoch, the ranges are laid out in source order (deterministic layout_range, like the reference), and
//    warps copy the messages into the caller's packed outputs (scales transposed, UE8M0 packed here).
//  combine send: warp groups take (local expert, source rank) pairs, copy each row of the pair's range into
//    the source's window at [global expert][source token], then st.release.sys the source's flag of that
//    global expert = epoch.
//  combine receive: blocks take tokens; threads k < K wait for the flags of the token's experts only, then
//    every thread reduces 8 channels over the slots in ascending order with __fmul_rn / __fadd_rn (no FMA),
//    exactly as the reference, and stores BF16.
//  Without the hook one kernel does both halves (send first, then receive, no grid sync); with the hook the
//  send kernel and the receive kernel are separate launches and nothing runs in between.
//  Why two halves suffice: a rank starts the send of operation n + 2 only after its receive of n + 1, which
//  needs every peer's send of n + 1, which every peer issues after its receive of n (stream order, or the
//  documented limit of two operations of one kind in flight).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "device/copy.cuh"
#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "kernels/low_latency_launch.hpp"
#include "openep/low_latency.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

using L = LowLatencyLayout;
constexpr int kThreads = 1024;
constexpr int kGroupThreads = 256;                 // combine send: one warp group per (expert, rank) pair
constexpr int kGroups = kThreads / kGroupThreads;
constexpr int kMaxRanksLL = 256;
constexpr float kE4m3Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

__device__ __forceinline__ char* region(const LowLatencyWindow& w, int rank) {
  return w.peer_bases[rank] + w.region_offset;
}

__device__ __forceinline__ int64_t read_topk(const void* p, bool i64, int64_t idx) {
  return i64 ? static_cast<const int64_t*>(p)[idx] : static_cast<int64_t>(static_cast<const int32_t*>(p)[idx]);
}

// True on every thread of the last block of the grid to get here. The ticket is reset by that block.
// kSystem: the last block publishes other blocks' peer writes (needs system scope); else it only stores an epoch.
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

// ---------------------------------------------------------------------------------------------------------
// dispatch

// Casts 8 BF16 values (one int4) of a 128-channel block held by 16 consecutive lanes; writes 8 e4m3 bytes
// and, on the block's first lane, the scale. All 32 lanes must call it (shuffles).
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

__device__ void dispatch_send(const LowLatencyDispatchParams& p, uint64_t epoch, int4* smem) {
  __shared__ char* s_dst[kMaxLowLatencyTopk];
  const int R = p.num_ranks, El = p.num_local_experts, K = p.num_topk, H = p.hidden, T = p.T;
  const int half = static_cast<int>(epoch & 1);
  const L& layout = p.window.layout;
  const int row_bytes = p.use_fp8 ? H : 2 * H;
  const int num_scales = p.use_fp8 ? H / 128 : 0;
  const int msg_int4 = (16 + row_bytes + num_scales * 4 + 15) / 16;
  const int chunks = H / 8;  // int4 chunks of the BF16 row
  char* payload = reinterpret_cast<char*>(smem) + 16;
  float* scales = reinterpret_cast<float*>(payload + row_bytes);

  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      const int64_t e = read_topk(p.topk_idx, p.topk_int64, static_cast<int64_t>(t) * K + k);
      char* dst = nullptr;
      if (e < -1 || e >= p.num_experts) {
        device::record_error(p.wait, DeviceErrorCode::kBadExpertIndex, -1, Phase::kLowLatencyDispatch, t, e);
      } else if (e >= 0) {
        const int d = static_cast<int>(e) / El, i = static_cast<int>(e) % El;
        const int slot = atomicAdd(&p.state->slot_counter[e], 1);
        if (slot < T) {
          dst = region(p.window, d) + layout.dispatch_offset + half * layout.dispatch_half +
                (static_cast<size_t>(i * R + p.rank) * T + slot) * layout.msg_bytes;
        } else {
          device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, d, Phase::kLowLatencyDispatch, T,
                               slot + 1);
        }
      }
      s_dst[k] = dst;
    }
    if (threadIdx.x == 0) smem[0] = make_int4(t, 0, 0, 0);
    const int4* xrow = reinterpret_cast<const int4*>(p.x + static_cast<size_t>(t) * H);
    if (!p.use_fp8) {
      for (int c = threadIdx.x; c < chunks; c += blockDim.x) smem[1 + c] = ptx::ld_nc_no_allocate(xrow + c);
    } else {
      for (int base = 0; base < chunks; base += blockDim.x) {  // uniform trip count: shuffles see all lanes
        const int c = base + threadIdx.x;
        const bool active = c < chunks;
        const int4 v = active ? ptx::ld_nc_no_allocate(xrow + c) : make_int4(0, 0, 0, 0);
        cast_fp8_chunk(v, active, p.round_scale, reinterpret_cast<uint2*>(payload) + c, scales + c / 16);
      }
    }
    __syncthreads();
    const int total = K * msg_int4;
    for (int j = threadIdx.x; j < total; j += blockDim.x) {
      const int k = j / msg_int4, i = j - k * msg_int4;
      char* dst = s_dst[k];
      if (dst != nullptr) ptx::st_no_allocate(reinterpret_cast<int4*>(dst) + i, smem[i]);
    }
    __syncthreads();  // shared memory is reused by the next token
  }

  if (last_block<true>(&p.state->send_ticket[0])) {
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {
      const int count = min(atomicExch(&p.state->slot_counter[e], 0), T);
      const int d = e / El, i = e % El;
      auto* flag = reinterpret_cast<uint64_t*>(region(p.window, d) + L::kDispatchFlags) +
                   static_cast<size_t>(half) * kMaxExperts + i * R + p.rank;
      ptx::st_release_sys(flag, (epoch << 32) | static_cast<uint64_t>(count));
    }
    if (threadIdx.x == 0) p.state->send_epoch[0] = epoch;
  }
}

__device__ void dispatch_recv(const LowLatencyDispatchParams& p, uint64_t epoch) {
  __shared__ int s_start[kMaxRanksLL + 1];
  __shared__ int s_count[kMaxRanksLL];
  __shared__ int s_failed;
  const int R = p.num_ranks, El = p.num_local_experts, H = p.hidden, T = p.T;
  const int RT = R * T;
  const int half = static_cast<int>(epoch & 1);
  const L& layout = p.window.layout;
  const int row_bytes = p.use_fp8 ? H : 2 * H;
  const int num_scales = p.use_fp8 ? H / 128 : 0;
  const char* my = region(p.window, p.rank);
  const auto* flags = reinterpret_cast<const uint64_t*>(my + L::kDispatchFlags) + static_cast<size_t>(half) * kMaxExperts;
  const char* data = my + layout.dispatch_offset + half * layout.dispatch_half;
  const uint64_t target = epoch << 32;

  for (int i = blockIdx.x; i < El; i += gridDim.x) {
    if (threadIdx.x == 0) s_failed = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      const uint64_t* f = flags + i * R + s;
      const long long t0 = clock64();
      if (!device::wait_geq(p.wait, f, target, s, Phase::kLowLatencyDispatch)) s_failed = 1;
      s_count[s] = static_cast<int>(ptx::ld_acquire_sys(f) & 0xFFFFFFFFull);
      if (p.wait_stats != nullptr)
        atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + s),
                  static_cast<unsigned long long>(clock64() - t0));
    }
    __syncthreads();
    if (s_failed) return;  // the Buffer is unusable after a timeout; the error is recorded
    if (threadIdx.x == 0) {
      int acc = 0;
      for (int s = 0; s < R; ++s) s_start[s] = acc, acc += s_count[s];
      s_start[R] = acc;
      p.packed_count[i] = acc;
      if (p.cumulative_stats != nullptr) atomicAdd(p.cumulative_stats + i, acc);
    }
    __syncthreads();
    for (int s = threadIdx.x; s < R; s += blockDim.x)
      p.layout_range[i * R + s] = (static_cast<int64_t>(s_start[s]) << 32) | static_cast<int64_t>(s_count[s]);
    const int total = s_start[R];
    // Every thread of the block takes 16-byte pieces of the expert's rows (kUnroll loads in flight), so a few
    // rows are copied by the whole block instead of one warp each.
    const int row_int4 = row_bytes / 16;
    const int words = p.use_ue8m0 ? num_scales / 4 : num_scales;
    const int pieces = total * row_int4;
    constexpr int kUnroll = 4;
    for (int j0 = threadIdx.x; j0 < pieces; j0 += kUnroll * kThreads) {
      int4 v[kUnroll];
      int4* dst[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kThreads;
        dst[u] = nullptr;
        v[u] = make_int4(0, 0, 0, 0);
        if (j < pieces) {
          const int r = j / row_int4, c = j - r * row_int4;
          int s = 0;
          while (s_start[s + 1] <= r) ++s;
          const char* m = data + (static_cast<size_t>(i * R + s) * T + (r - s_start[s])) * layout.msg_bytes;
          v[u] = ptx::ld_cg(reinterpret_cast<const int4*>(m + 16) + c);
          dst[u] = reinterpret_cast<int4*>(static_cast<char*>(p.packed_x) + (static_cast<size_t>(i) * RT + r) * row_bytes) + c;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (dst[u] != nullptr) ptx::st_no_allocate(dst[u], v[u]);
    }
    // Source indices and scales: one thread per (row, word).
    const int meta = total * (words + 1);
    for (int j = threadIdx.x; j < meta; j += kThreads) {
      const int r = j / (words + 1), w = j - r * (words + 1);
      int s = 0;
      while (s_start[s + 1] <= r) ++s;
      const char* m = data + (static_cast<size_t>(i * R + s) * T + (r - s_start[s])) * layout.msg_bytes;
      if (w == words) {
        p.src_info[static_cast<size_t>(i) * RT + r] = ptx::ld_cg(reinterpret_cast<const int32_t*>(m));
        continue;
      }
      const auto* sc = reinterpret_cast<const int32_t*>(m + 16 + row_bytes);
      if (!p.use_ue8m0) {
        static_cast<int32_t*>(p.packed_scales)[(static_cast<size_t>(i) * words + w) * RT + r] = ptx::ld_cg(sc + w);
      } else {
        uint32_t word = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q)
          word |= ((static_cast<uint32_t>(ptx::ld_cg(sc + 4 * w + q)) >> 23) & 0xFFu) << (8 * q);
        static_cast<uint32_t*>(p.packed_scales)[(static_cast<size_t>(i) * words + w) * RT + r] = word;
      }
    }
    __syncthreads();  // s_start / s_count are reused by the next expert
  }
  if (last_block<false>(&p.state->recv_ticket[0]) && threadIdx.x == 0) p.state->recv_epoch[0] = epoch;
}

__global__ void __launch_bounds__(kThreads, 1) low_latency_dispatch_kernel(const __grid_constant__ LowLatencyDispatchParams p) {
  extern __shared__ int4 smem[];
  const uint64_t epoch = (p.do_send ? p.state->send_epoch[0] : p.state->recv_epoch[0]) + 1;
  if (p.do_send) dispatch_send(p, epoch, smem);
  if (p.do_recv) dispatch_recv(p, epoch);
}

// ---------------------------------------------------------------------------------------------------------
// combine

__device__ void combine_send(const LowLatencyCombineParams& p, uint64_t epoch) {
  const int R = p.num_ranks, El = p.num_local_experts, H = p.hidden, T = p.T;
  const int RT = R * T;
  const int half = static_cast<int>(epoch & 1);
  const L& layout = p.window.layout;
  const int g = threadIdx.x / kGroupThreads, gt = threadIdx.x % kGroupThreads;
  const int row_int4 = H / 8;
  const size_t row_bytes = static_cast<size_t>(H) * 2;
  const int num_pairs = El * R;
  constexpr int kUnroll = 4;
  for (int pair = blockIdx.x * kGroups + g; pair < num_pairs; pair += gridDim.x * kGroups) {
    const int s = pair % R, i = pair / R;  // neighbouring groups serve different ranks
    const int64_t range = p.layout_range[i * R + s];
    const int start = static_cast<int>(range >> 32), count = static_cast<int>(range & 0xFFFFFFFFLL);
    const int e = p.rank * El + i;
    char* dst_base = region(p.window, s) + layout.combine_offset + half * layout.combine_half +
                     static_cast<size_t>(e) * T * row_bytes;
    const int4* src_base = reinterpret_cast<const int4*>(p.x) + (static_cast<size_t>(i) * RT + start) * row_int4;
    const int total = count * row_int4;
    for (int j0 = gt; j0 < total; j0 += kUnroll * kGroupThreads) {
      int4 v[kUnroll];
      int4* d[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kGroupThreads;
        v[u] = make_int4(0, 0, 0, 0);
        d[u] = nullptr;
        if (j < total) {
          const int r = j / row_int4, c = j - r * row_int4;
          const int t = p.src_info[static_cast<size_t>(i) * RT + start + r];
          if (t >= 0 && t < T) {
            v[u] = ptx::ld_nc_no_allocate(src_base + j);
            d[u] = reinterpret_cast<int4*>(dst_base + static_cast<size_t>(t) * row_bytes) + c;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (d[u] != nullptr) ptx::st_no_allocate(d[u], v[u]);
    }
    ptx::bar_sync(1 + g, kGroupThreads);  // the group's stores are ordered before the release below
    if (gt == 0) {
      auto* flag = reinterpret_cast<uint64_t*>(region(p.window, s) + L::kCombineFlags) +
                   static_cast<size_t>(half) * kMaxExperts + e;
      ptx::st_release_sys(flag, epoch);
    }
  }
  if (last_block<false>(&p.state->send_ticket[1]) && threadIdx.x == 0) p.state->send_epoch[1] = epoch;
}

__device__ void combine_recv(const LowLatencyCombineParams& p, uint64_t epoch) {
  __shared__ int s_e[kMaxLowLatencyTopk];
  __shared__ float s_w[kMaxLowLatencyTopk];
  __shared__ int s_failed;
  const int El = p.num_local_experts, H = p.hidden, T = p.T, K = p.num_topk;
  const int half = static_cast<int>(epoch & 1);
  const L& layout = p.window.layout;
  const char* my = region(p.window, p.rank);
  const auto* flags = reinterpret_cast<const uint64_t*>(my + L::kCombineFlags) + static_cast<size_t>(half) * kMaxExperts;
  const auto* data = reinterpret_cast<const int4*>(my + layout.combine_offset + half * layout.combine_half);
  const int row_int4 = H / 8;
  constexpr int kBatch = 8;

  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x == 0) s_failed = 0;
    __syncthreads();
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      int64_t e = read_topk(p.topk_idx, p.topk_int64, static_cast<int64_t>(t) * K + k);
      if (e < -1 || e >= p.num_experts) {
        device::record_error(p.wait, DeviceErrorCode::kBadExpertIndex, -1, Phase::kLowLatencyCombine, t, e);
        e = -1;
        s_failed = 1;
      }
      s_e[k] = static_cast<int>(e);
      s_w[k] = p.topk_weights[static_cast<int64_t>(t) * K + k];
      if (e >= 0) {
        const int src = static_cast<int>(e) / El;
        const long long t0 = clock64();
        if (!device::wait_geq(p.wait, flags + e, epoch, src, Phase::kLowLatencyCombine)) s_failed = 1;
        if (p.wait_stats != nullptr)
          atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + src),
                    static_cast<unsigned long long>(clock64() - t0));
      }
    }
    __syncthreads();
    if (s_failed) return;
    for (int c = threadIdx.x; c < row_int4; c += blockDim.x) {
      float acc[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
      for (int k0 = 0; k0 < K; k0 += kBatch) {
        int4 v[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          v[u] = make_int4(0, 0, 0, 0);
          if (k < K && s_e[k] >= 0)
            v[u] = ptx::ld_cg(data + (static_cast<size_t>(s_e[k]) * T + t) * row_int4 + c);
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          if (k >= K || s_e[k] < 0) continue;
          const float w = s_w[k];
          const uint32_t words[4] = {static_cast<uint32_t>(v[u].x), static_cast<uint32_t>(v[u].y),
                                     static_cast<uint32_t>(v[u].z), static_cast<uint32_t>(v[u].w)};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(w, __uint_as_float(words[q] << 16)));
            acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(w, __uint_as_float(words[q] & 0xFFFF0000u)));
          }
        }
      }
      uint32_t out[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * q]));
        const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * q + 1]));
        out[q] = lo | (hi << 16);
      }
      reinterpret_cast<int4*>(p.combined_x)[static_cast<size_t>(t) * row_int4 + c] =
          make_int4(static_cast<int>(out[0]), static_cast<int>(out[1]), static_cast<int>(out[2]),
                    static_cast<int>(out[3]));
    }
    __syncthreads();  // s_e / s_w are reused by the next token
  }
  if (last_block<false>(&p.state->recv_ticket[1]) && threadIdx.x == 0) p.state->recv_epoch[1] = epoch;
}

__global__ void __launch_bounds__(kThreads, 1) low_latency_combine_kernel(const __grid_constant__ LowLatencyCombineParams p) {
  const uint64_t epoch = (p.do_send ? p.state->send_epoch[1] : p.state->recv_epoch[1]) + 1;
  if (p.do_send) combine_send(p, epoch);
  if (p.do_recv) combine_recv(p, epoch);
}

// The fused kernels (send and receive in one launch) wait inside the kernel for work other blocks of the same
// grid publish, so every block must be resident at once: they are launched cooperatively, which guarantees
// that (or fails to launch) even when other kernels share the GPU. One 1024-thread block per SM.
template <typename Params>
void launch(void (*kernel)(Params), const Params& p, int num_blocks, size_t smem, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(num_blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = p.do_send && p.do_recv ? 1 : 0;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  OPENEP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

int clamp_blocks(long long want, int num_sms) {
  return static_cast<int>(want < 1 ? 1 : (want > num_sms ? num_sms : want));
}

}  // namespace

int low_latency_dispatch_blocks(const LowLatencyDispatchParams& p, int num_sms) {
  if (p.do_send && p.do_recv) return num_sms;
  return p.do_send ? clamp_blocks(p.num_tokens, num_sms) : clamp_blocks(p.num_local_experts, num_sms);
}

int low_latency_combine_blocks(const LowLatencyCombineParams& p, int num_sms) {
  if (p.do_send && p.do_recv) return num_sms;
  const long long pairs = static_cast<long long>(p.num_local_experts) * p.num_ranks;
  return p.do_send ? clamp_blocks(pairs, num_sms) : clamp_blocks(p.num_tokens, num_sms);
}

void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, cudaStream_t stream) {
  OPENEP_CHECK(p.num_ranks <= kMaxRanksLL && p.num_topk <= kMaxLowLatencyTopk, ErrorCode::kInternal,
               "low-latency dispatch launched with ", p.num_ranks, " ranks and top-", p.num_topk);
  const size_t smem = p.do_send ? p.window.layout.msg_bytes : 0;
  if (smem > 48 * 1024) {
    OPENEP_CUDA_CHECK(cudaFuncSetAttribute(low_latency_dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  }
  launch(low_latency_dispatch_kernel, p, num_blocks, smem, stream);
}

void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, cudaStream_t stream) {
  OPENEP_CHECK(p.num_topk <= kMaxLowLatencyTopk, ErrorCode::kInternal, "low-latency combine launched with top-",
               p.num_topk);
  launch(low_latency_combine_kernel, p, num_blocks, 0, stream);
}

}  // namespace openep::detail
