// Low-latency (decode) dispatch and combine over NVLink (LSA peer pointers). Layout of the window region in
// src/protocol/low_latency_layout.hpp.
//
// Protocol (per operation; epochs are monotonic and live in device memory, nothing is reset between calls):
//  Every kernel works on epoch = (completed kernels of its kind and side) + 1 and on data half (epoch & 1);
//  the last block to finish (a ticket) stores the new epoch. All ranks issue the same sequence of calls, so
//  they agree on epochs without talking.
//  dispatch send: blocks take tokens. Threads k < K claim a slot per (token, slot k) with an atomic on this
//    rank's per-expert counter; the block casts the token once into shared memory (e4m3 payload, float32
//    scales; or the BF16 row), then all its threads store ONE message per destination rank at [my rank][token]
//    of that rank's window: the routing header (per slot k, (local expert << 16) | slot where slot k's expert
//    lives on that rank, else -1) always, the payload only where the token has an expert. So a row crosses
//    NVLink once per (token, rank), not once per (token, expert). The last block to finish (its ticket is an
//    acq_rel.sys atomic, so it sees every block's stores) writes every expert's count into the owner's count
//    slot (my rank, local expert), then per rank fences and st.release.sys's the flag of (my rank) =
//    (epoch << 32) | (K << 16) | num_tokens, and resets the counters.
//  dispatch receive: threads s < R wait (acquire) for each source's flag of this epoch; every block lays out
//    the ranges of all (local expert, source) pairs in source order from the counts (deterministic
//    layout_range, like the reference; block 0 writes the handle and the counts). Then warps take
//    (message, chunk of the row) units over all blocks: a warp reads the header (lane k = slot k) and the
//    chunk once and stores it into every local expert's packed row the token selected (plus, for chunk 0,
//    the transposed scales, UE8M0 packed here, and the source index).
//  combine send: every block computes the rows of each local expert (the end of its last layout range) and
//    their prefix; warps take (packed row, chunk of the row) units over all SMs (warp-major, so a small
//    combine still uses every SM), load the chunk, find the row's source rank (binary search over the
//    ranges) and source token (src_info) and store it into the source's window at [global expert][token].
//    The last block to finish (acq_rel.sys ticket) fences and st.release.sys's, in every rank's window, the
//    flag of (my rank) = epoch.
//    With use_logfmt the chunk is LogFMT-encoded on its way (src/device/logfmt.cuh, format in
//    src/protocol/logfmt.hpp): per 128-channel division a metadata word at combine_meta(...) and either the
//    BF16 values or 160 bytes of 10-bit codes in the division's slot of the row (fewer bytes over NVLink).
//  combine receive: blocks take tokens; threads s < R wait (acquire) for every rank's flag of this epoch
//    once, then per token every thread reduces 8 channels over the slots in ascending order with __fmul_rn /
//    __fadd_rn (no FMA), exactly as the reference, and stores BF16 (use_logfmt: each slot's 8 channels are
//    decoded to float32 first, per its division's metadata word).
//  Without the hook one kernel does both halves (send first, then receive, no grid sync); with the hook the
//  send kernel and the receive kernel are separate launches and nothing runs in between.
//  Shrink mode (p.mask != null, BufferOptions::enable_shrink): a masked rank gets no message, count or flag
//    from the sends, is not waited for by the receives, and its experts' slots are skipped in the combine sum
//    (as if -1). A receive wait that times out sets the peer's mask entry (device::wait_geq_or_mask) instead
//    of recording an error; other blocks stop waiting for it as soon as they see the entry.
//  Why two halves suffice: a rank starts the send of operation n + 2 only after its receive of n + 1, which
//  needs every peer's send of n + 1, which every peer issues after its receive of n (stream order, or the
//  documented limit of two operations of one kind in flight).
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "device/copy.cuh"
#include "device/fp8.cuh"
#include "device/logfmt.cuh"
#include "device/ptx.cuh"
#include "device/ticket.cuh"
#include "device/wait.cuh"
#include "kernels/load.hpp"
#include "kernels/low_latency_launch.hpp"
#include "kernels/low_latency_rows.cuh"
#include "kernels/low_latency_send.cuh"
#include "openep/low_latency.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

using L = LowLatencyLayout;
constexpr int kThreads = 1024;
constexpr int kMaxRanksLL = 256;

__device__ __forceinline__ char* region(const LowLatencyWindow& w, int rank) {
  return w.peer_bases[rank] + w.region_offset;
}

__device__ __forceinline__ int64_t read_topk(const void* p, bool i64, int64_t idx) {
  return i64 ? static_cast<const int64_t*>(p)[idx] : static_cast<int64_t>(static_cast<const int32_t*>(p)[idx]);
}

// ---------------------------------------------------------------------------------------------------------
// dispatch

// Routing entry of top-k slot k in a message: (local expert << 16) | slot inside the (expert, source) range.
static_assert(L::kHeaderBytes == sizeof(int32_t) * kMaxLowLatencyTopk, "one header int32 per top-k slot");
static_assert(kMaxLowLatencyTopk <= 32, "the receive reads a message's routing header with one warp");
static_assert(kMaxRanksLL <= kMaxLowLatencySendRanks, "the send's shared arrays hold every rank");

// The NVLink dispatch transport (low_latency_send.cuh): the block stages the row in shared memory and stores each
// message straight into the receiver's window (LSA pointers); counts are relaxed stores, the flag a release.
struct LsaDispatch {
  const LowLatencyDispatchParams& p;
  int4* smem;      // dynamic shared memory: the staged row (payload and scales)
  char** s_base;   // shared [R]: my messages in rank d's window, [my rank][0]

  __device__ __forceinline__ void begin(int half) {
    for (int d = threadIdx.x; d < p.num_ranks; d += blockDim.x)
      s_base[d] = region(p.window, d) + p.window.layout.dispatch_message(half, p.rank, 0);
  }
  __device__ __forceinline__ char* payload(int) const { return reinterpret_cast<char*>(smem); }
  // One message per destination rank at [my rank][t]: the routing header always (a token with no expert there
  // says so), the payload only where the token has an expert.
  __device__ __forceinline__ void post_token(int t, const DispatchRowGeometry& g, const TokenRoute& route) {
    constexpr int kHeaderInt4 = static_cast<int>(L::kHeaderBytes / 16);
    const int msg_int4 = g.header_int4 + g.payload_int4;
    const int total = p.num_ranks * msg_int4;
    for (int j = threadIdx.x; j < total; j += blockDim.x) {
      const int d = j / msg_int4, q = j - d * msg_int4;
      if (!route.live[d]) continue;
      int4* msg = reinterpret_cast<int4*>(s_base[d] + static_cast<size_t>(t) * p.window.layout.msg_bytes);
      if (q < g.header_int4) {
        ptx::st_no_allocate(msg + q, header_int4(route, p.num_topk, q, d));
      } else if (route.has[d]) {
        ptx::st_no_allocate(msg + kHeaderInt4 + (q - g.header_int4), smem[q - g.header_int4]);
      }
    }
  }
  __device__ __forceinline__ void end_tokens() {}
  // Counts first (every block's messages are visible to this block through the ticket), then per rank one
  // release of the flag.
  __device__ __forceinline__ void publish_dispatch(int half, uint64_t flag, const int* s_live) {
    const int El = p.num_local_experts;
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) {
      const int count = take_count(p, e);
      const int d = e / El, i = e % El;
      if (!s_live[d]) continue;
      auto* c = reinterpret_cast<int32_t*>(region(p.window, d) + L::dispatch_count(half, p.rank * El + i));
      ptx::st_relaxed_sys(c, count);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < p.num_ranks; d += blockDim.x) {
      if (!s_live[d]) continue;
      ptx::fence_acq_rel_sys();
      ptx::st_release_sys(reinterpret_cast<uint64_t*>(region(p.window, d) + L::dispatch_flag(half, p.rank)), flag);
    }
  }
};

// Int4 pieces of a payload row one warp copies per unit of the dispatch receive (kRecvUnroll per lane).
constexpr int kRecvUnroll = 4;
constexpr int kRecvChunkInt4 = 32 * kRecvUnroll;

__device__ __forceinline__ int dispatch_recv_chunks(const LowLatencyDispatchParams& p) {
  const int row_int4 = (p.use_fp8 ? p.hidden : 2 * p.hidden) / 16;
  return (row_int4 + kRecvChunkInt4 - 1) / kRecvChunkInt4;
}

// s_start: dynamic shared memory of E ints, (local expert i, source s) -> start of the range at i * R + s.
__device__ void dispatch_recv(const LowLatencyDispatchParams& p, uint64_t epoch, int* s_start) {
  __shared__ int s_tokens[kMaxRanksLL];
  __shared__ int s_src_live[kMaxRanksLL];  // shrink mode: 0 = masked source (nothing from it)
  __shared__ int s_topk[kMaxRanksLL];
  __shared__ int s_failed;
  const int R = p.num_ranks, El = p.num_local_experts, H = p.hidden, T = p.T;
  const int RT = R * T;
  const int half = static_cast<int>(epoch & 1);
  const L& layout = p.window.layout;
  const int row_bytes = p.use_fp8 ? H : 2 * H;
  const int row_int4 = row_bytes / 16;
  const int num_scales = p.use_fp8 ? H / 128 : 0;
  const int words = p.use_ue8m0 ? num_scales / 4 : num_scales;
  const char* my = region(p.window, p.rank);
  const auto* flags = reinterpret_cast<const uint64_t*>(my + L::dispatch_flag(half, 0));
  const auto* counts = reinterpret_cast<const int32_t*>(my + L::dispatch_count(half, 0));
  const uint64_t target = epoch << 32;

  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    const long long t0 = clock64();
    bool live = true;
    if (p.mask == nullptr) {
      if (!device::wait_geq(p.wait, flags + s, target, s, Phase::kLowLatencyDispatch)) s_failed = 1;
    } else {  // shrink mode: a masked or timed-out source sends nothing
      const device::PeerWait w = device::wait_geq_or_mask(p.wait, flags + s, target, s, p.mask);
      if (w == device::PeerWait::kFailed) s_failed = 1;
      live = w == device::PeerWait::kArrived;
    }
    const uint64_t v = live ? ptx::ld_acquire_sys(flags + s) : 0;
    s_src_live[s] = live;
    s_tokens[s] = static_cast<int>(v & 0xFFFFull);
    s_topk[s] = static_cast<int>((v >> 16) & 0xFFFFull);
    if (p.wait_stats != nullptr && blockIdx.x == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + s), static_cast<unsigned long long>(clock64() - t0));
  }
  __syncthreads();
  if (s_failed) return;  // the Buffer is unusable after a timeout; the error is recorded

  // Ranges in source order (like the reference); block 0 also writes the handle and the counts.
  for (int i = threadIdx.x; i < El; i += blockDim.x) {
    int acc = 0;
    for (int s = 0; s < R; ++s) {
      const int c = s_src_live[s] ? ptx::ld_cg(counts + s * El + i) : 0;
      s_start[i * R + s] = acc;
      if (blockIdx.x == 0) p.layout_range[i * R + s] = (static_cast<int64_t>(acc) << 32) | static_cast<int64_t>(c);
      acc += c;
    }
    if (blockIdx.x == 0) {
      p.packed_count[i] = acc;
      if (p.cumulative_stats != nullptr) atomicAdd(p.cumulative_stats + i, acc);
    }
  }
  __syncthreads();

  // Expansion: a warp takes one chunk of one message (source s, token t), reads the chunk once and stores it
  // into every local expert the token selected (its routing header), plus the scales and the source index.
  const int lane = threadIdx.x & 31, warps = blockDim.x / 32;
  const int nch = dispatch_recv_chunks(p);
  const int units = RT * nch;  // fits an int: checked by the launcher
  // Warp w of block b starts at unit w * gridDim.x + b: consecutive units go to different SMs, so a small
  // receive still uses every SM's load/store bandwidth.
  for (int u = (threadIdx.x / 32) * gridDim.x + blockIdx.x; u < units; u += gridDim.x * warps) {  // warp-uniform
    const int m = u / nch, c = u - m * nch;
    const int s = m / T, t = m - s * T;
    if (t >= s_tokens[s]) continue;
    const char* msg = my + layout.dispatch_message(half, s, t);
    const int entry = lane < s_topk[s] ? ptx::ld_cg(reinterpret_cast<const int32_t*>(msg) + lane) : -1;
    uint32_t mask = __ballot_sync(0xffffffffu, entry >= 0);
    if (mask == 0) continue;
    const int4* src = reinterpret_cast<const int4*>(msg + L::kHeaderBytes);
    int4 v[kRecvUnroll];
#pragma unroll
    for (int q = 0; q < kRecvUnroll; ++q) {
      const int j = c * kRecvChunkInt4 + q * 32 + lane;
      v[q] = j < row_int4 ? ptx::ld_cg(src + j) : make_int4(0, 0, 0, 0);
    }
    const auto* sc = reinterpret_cast<const int32_t*>(msg + L::kHeaderBytes + row_bytes);
    while (mask != 0) {
      const int k = __ffs(static_cast<int>(mask)) - 1;
      mask &= mask - 1;
      const int ent = __shfl_sync(0xffffffffu, entry, k);
      const int i = ent >> 16, slot = ent & 0xFFFF;
      if (i >= El || slot >= T) continue;  // never written by the sender; guards against a corrupt header
      const size_t row = static_cast<size_t>(i) * RT + s_start[i * R + s] + slot;
      int4* dst = reinterpret_cast<int4*>(static_cast<char*>(p.packed_x) + row * row_bytes);
#pragma unroll
      for (int q = 0; q < kRecvUnroll; ++q) {
        const int j = c * kRecvChunkInt4 + q * 32 + lane;
        if (j < row_int4) ptx::st_no_allocate(dst + j, v[q]);
      }
      if (c != 0) continue;
      const size_t r = row - static_cast<size_t>(i) * RT;
      if (lane == 0) p.src_info[row] = t;
      for (int w = lane; w < words; w += 32) {
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
    }
  }
  if (device::last_block<false>(&p.state->recv_ticket[0]) && threadIdx.x == 0) p.state->recv_epoch[0] = epoch;
}

__global__ void __launch_bounds__(kThreads, 1) low_latency_dispatch_kernel(const __grid_constant__ LowLatencyDispatchParams p) {
  if (device::error_recorded(p.wait)) return;  // an earlier kernel failed: its epochs and handle are not valid
  extern __shared__ int4 smem[];
  const uint64_t epoch = (p.do_send ? p.state->send_epoch[0] : p.state->recv_epoch[0]) + 1;
  if (p.do_send) {
    __shared__ char* s_base[kMaxRanksLL];
    LsaDispatch net{p, smem, s_base};
    dispatch_send(p, epoch, net);
  }
  if (p.do_recv) dispatch_recv(p, epoch, reinterpret_cast<int*>(smem));
}

// ---------------------------------------------------------------------------------------------------------
// combine

// Int4 pieces of a BF16 row one warp copies per unit of the combine send (kSendUnroll per lane).
constexpr int kSendUnroll = 4;
constexpr int kSendChunkInt4 = 32 * kSendUnroll;

// The NVLink combine transport (low_latency_send.cuh): a warp loads a chunk of the row and stores it straight into
// the source rank's window (kLogfmt: LogFMT-encoded on its way, device/logfmt.cuh, its metadata beside the row).
struct LsaCombine {
  __device__ __forceinline__ static int chunks_per_row(int row_int4) {
    return (row_int4 + kSendChunkInt4 - 1) / kSendChunkInt4;
  }
  template <bool kLogfmt>
  __device__ __forceinline__ void send_unit(const LowLatencyCombineParams& p, int half, int i, int r, int c,
                                            const int* s_live, int lane) {
    const int R = p.num_ranks, El = p.num_local_experts, T = p.T, RT = R * T;
    const int row_int4 = p.hidden / 8;
    const L& layout = p.window.layout;
    const int4* src = reinterpret_cast<const int4*>(p.x) + (static_cast<size_t>(i) * RT + r) * row_int4;
    int4 v[kSendUnroll];
#pragma unroll
    for (int k = 0; k < kSendUnroll; ++k) {
      const int j = c * kSendChunkInt4 + k * 32 + lane;
      v[k] = j < row_int4 ? ptx::ld_nc_no_allocate(src + j) : make_int4(0, 0, 0, 0);
    }
    const int s = source_rank_of_row(p.layout_range, R, i, r);
    const int t = p.src_info[static_cast<size_t>(i) * RT + r];
    if (t < 0 || t >= T || !s_live[s]) return;
    int4* dst = reinterpret_cast<int4*>(region(p.window, s) + layout.combine_row(half, p.rank * El + i, t));
    if constexpr (kLogfmt) {  // warp-uniform: t, s and the chunk are the warp's
      auto* meta = reinterpret_cast<int32_t*>(region(p.window, s) + layout.combine_meta(half, p.rank * El + i, t));
      device::logfmt_store_chunk<kSendUnroll>(v, c * kSendChunkInt4, row_int4, dst, meta, lane);
    } else {
#pragma unroll
      for (int k = 0; k < kSendUnroll; ++k) {
        const int j = c * kSendChunkInt4 + k * 32 + lane;
        if (j < row_int4) ptx::st_no_allocate(dst + j, v[k]);
      }
    }
  }
  __device__ __forceinline__ void end_rows() {}
  __device__ __forceinline__ void publish_combine(const LowLatencyCombineParams& p, int half, uint64_t epoch,
                                                  const int* s_live) {
    for (int d = threadIdx.x; d < p.num_ranks; d += blockDim.x) {
      if (!s_live[d]) continue;
      ptx::fence_acq_rel_sys();
      ptx::st_release_sys(reinterpret_cast<uint64_t*>(region(p.window, d) + L::combine_flag(half, p.rank)), epoch);
    }
  }
};

// acc[k] += w * channel k of a BF16 piece (float32 multiply, then add, each rounded: no FMA).
__device__ __forceinline__ void accumulate_bf16(const int4& v, float w, float (&acc)[8]) {
  const uint32_t words[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                             static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    acc[2 * q] = __fadd_rn(acc[2 * q], __fmul_rn(w, __uint_as_float(words[q] << 16)));
    acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __fmul_rn(w, __uint_as_float(words[q] & 0xFFFF0000u)));
  }
}

// kLogfmt: the rows arrived LogFMT-encoded; each slot's piece is decoded (device/logfmt.cuh) before the same sum.
template <bool kLogfmt>
__device__ void combine_recv(const LowLatencyCombineParams& p, uint64_t epoch) {
  __shared__ int s_e[kMaxLowLatencyTopk];
  __shared__ float s_w[kMaxLowLatencyTopk];
  __shared__ int s_failed;
  const int R = p.num_ranks, H = p.hidden, T = p.T, K = p.num_topk;
  const int half = static_cast<int>(epoch & 1);
  const L& layout = p.window.layout;
  const char* my = region(p.window, p.rank);
  const auto* flags = reinterpret_cast<const uint64_t*>(my + L::combine_flag(half, 0));
  const auto* data = reinterpret_cast<const int4*>(my + layout.combine_row(half, 0, 0));
  const auto* meta_rows = reinterpret_cast<const int32_t*>(my + layout.combine_meta(half, 0, 0));
  const int meta_words = static_cast<int>(layout.meta_row_bytes / sizeof(int32_t));
  const int row_int4 = H / 8;
  constexpr int kBatch = kLogfmt ? 4 : 8;  // slots loaded before summing (LogFMT: fewer, registers)

  // Every rank's send releases its flag in every rank once all its rows have been stored. A block without a
  // token waits for nothing (it still takes its ticket below).
  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  for (int s = threadIdx.x; blockIdx.x < p.num_tokens && s < R; s += blockDim.x) {
    const long long t0 = clock64();
    if (p.mask == nullptr) {
      if (!device::wait_geq(p.wait, flags + s, epoch, s, Phase::kLowLatencyCombine)) s_failed = 1;
    } else if (device::wait_geq_or_mask(p.wait, flags + s, epoch, s, p.mask) == device::PeerWait::kFailed) {
      s_failed = 1;  // shrink mode: a masked or timed-out rank's rows are left out below
    }
    if (p.wait_stats != nullptr && blockIdx.x == 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + s), static_cast<unsigned long long>(clock64() - t0));
  }
  __syncthreads();
  if (s_failed) return;  // the Buffer is unusable after a timeout; the error is recorded

  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    if (threadIdx.x < K) {
      const int k = threadIdx.x;
      int64_t e = read_topk(p.topk_idx, p.topk_int64, static_cast<int64_t>(t) * K + k);
      if (e < -1 || e >= p.num_experts) {
        device::record_error(p.wait, DeviceErrorCode::kBadExpertIndex, -1, Phase::kLowLatencyCombine, t, e);
        e = -1;
        s_failed = 1;
      }
      if (e >= 0 && !device::rank_live(p.mask, static_cast<int>(e) / p.num_local_experts)) e = -1;  // shrink mode
      s_e[k] = static_cast<int>(e);
      s_w[k] = p.topk_weights[static_cast<int64_t>(t) * K + k];
    }
    __syncthreads();
    if (s_failed) return;
    for (int c = threadIdx.x; c < row_int4; c += blockDim.x) {
      float acc[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
      for (int k0 = 0; k0 < K; k0 += kBatch) {
        int4 v[kBatch];
        uint32_t meta[kBatch];  // kLogfmt: the metadata word of piece c's division in each slot's row
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          meta[u] = 0;
          if constexpr (kLogfmt) {
            if (k < K && s_e[k] >= 0)
              meta[u] = static_cast<uint32_t>(
                  ptx::ld_cg(meta_rows + (static_cast<size_t>(s_e[k]) * T + t) * meta_words + c / 16));
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          v[u] = make_int4(0, 0, 0, 0);
          if (k < K && s_e[k] >= 0) {
            const int4* row = data + (static_cast<size_t>(s_e[k]) * T + t) * row_int4;
            if constexpr (kLogfmt) v[u] = device::logfmt_load_piece(row, c, meta[u]);
            else v[u] = ptx::ld_cg(row + c);
          }
        }
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const int k = k0 + u;
          if (k >= K || s_e[k] < 0) continue;
          if (kLogfmt && detail::logfmt::encodes(meta[u])) device::logfmt_accumulate(v[u], meta[u], s_w[k], acc);
          else accumulate_bf16(v[u], s_w[k], acc);
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
  if (device::last_block<false>(&p.state->recv_ticket[1]) && threadIdx.x == 0) p.state->recv_epoch[1] = epoch;
}

// kLogfmt = p.use_logfmt (one instantiation per transport format; the BF16 one is unchanged).
template <bool kLogfmt>
__global__ void __launch_bounds__(kThreads, 1) low_latency_combine_kernel(const __grid_constant__ LowLatencyCombineParams p) {
  // After a failed dispatch the handle (layout_range, src_info) is not written: using it would write outside
  // the peers' regions. The error is already recorded; the host raises it.
  if (device::error_recorded(p.wait)) return;
  extern __shared__ int s_dyn[];
  const uint64_t epoch = (p.do_send ? p.state->send_epoch[1] : p.state->recv_epoch[1]) + 1;
  if (p.do_send) {
    LsaCombine net;
    combine_send<LsaCombine, kLogfmt>(p, epoch, net, s_dyn);
  }
  if (p.do_recv) combine_recv<kLogfmt>(p, epoch);
}

// The fused kernels (send and receive in one launch) wait inside the kernel for work other blocks of the same
// grid publish, so every block must be resident at once: they are launched cooperatively, which guarantees
// that (or fails to launch) even when other kernels share the GPU. One 1024-thread block per SM. When several
// ranks share the GPU (virtual ranks), their fused grids must also fit together: checked here against the
// kernel's occupancy, so an impossible launch is a clear error instead of a hang.
template <typename Params>
void launch(void (*kernel)(Params), const Params& p, int num_blocks, size_t smem, const GridBudget& grids,
            cudaStream_t stream) {
  const bool cooperative = p.do_send && p.do_recv;
  // One rank per GPU: the cooperative launch itself refuses a grid that cannot be resident (and the grid is
  // at most one block per SM); the occupancy query is only needed when several ranks share the GPU.
  if (cooperative && grids.grids_per_device > 1) {
    int per_sm = 0;
    OPENEP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    const long long resident = static_cast<long long>(per_sm) * grids.device_sms;
    const long long needed = static_cast<long long>(num_blocks) * grids.grids_per_device;
    OPENEP_CHECK(needed <= resident, ErrorCode::kUnsupported, "low-latency fused kernel: ", grids.grids_per_device,
                 " rank(s) on this GPU x ", num_blocks, " blocks of ", kThreads, " threads (", smem,
                 " bytes of shared memory) cannot be co-resident: the GPU holds ", resident, " such blocks (",
                 per_sm, " per SM x ", grids.device_sms, " SMs); lower the grid (virtual ranks: max_blocks_per_rank)");
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(num_blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = cooperative ? 1 : 0;
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
  if (p.do_send) return clamp_blocks(p.num_tokens, num_sms);
  // The receive: one warp per chunk of a message slot, spread over the blocks first.
  const long long row_int4 = (p.use_fp8 ? p.hidden : 2LL * p.hidden) / 16;
  return clamp_blocks(static_cast<long long>(p.num_ranks) * p.T * ((row_int4 + kRecvChunkInt4 - 1) / kRecvChunkInt4),
                      num_sms);
}

int low_latency_combine_blocks(const LowLatencyCombineParams& p, int num_sms) {
  if (p.do_send) return num_sms;  // the send spreads (row, chunk) units over every SM
  return clamp_blocks(p.num_tokens, num_sms);
}

void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, const GridBudget& grids,
                                 cudaStream_t stream) {
  OPENEP_CHECK(p.num_ranks <= kMaxRanksLL && p.num_topk <= kMaxLowLatencyTopk, ErrorCode::kInternal,
               "low-latency dispatch launched with ", p.num_ranks, " ranks and top-", p.num_topk);
  const long long row_int4 = (p.use_fp8 ? p.hidden : 2LL * p.hidden) / 16;
  const long long units = static_cast<long long>(p.num_ranks) * p.T * ((row_int4 + kRecvChunkInt4 - 1) / kRecvChunkInt4);
  OPENEP_CHECK(units < (1LL << 31) - 1 - 65536LL * 32, ErrorCode::kInvalidArgument,
               "low-latency dispatch: R * T * hidden is too large (", units, " receive units)");
  // Shared memory: the send stages one cast row (payload and scales); the receive holds the range starts
  // (one int per (local expert, source rank), E in all). The fused kernel reuses the same bytes for both.
  const size_t send_smem = p.do_send ? p.window.layout.msg_bytes - LowLatencyLayout::kHeaderBytes : 0;
  const size_t recv_smem = p.do_recv ? sizeof(int) * static_cast<size_t>(p.num_experts) : 0;
  const size_t smem = send_smem > recv_smem ? send_smem : recv_smem;
  if (smem > 48 * 1024) {
    OPENEP_CUDA_CHECK(cudaFuncSetAttribute(low_latency_dispatch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  }
  launch(low_latency_dispatch_kernel, p, num_blocks, smem, grids, stream);
}

void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, const GridBudget& grids,
                                cudaStream_t stream) {
  OPENEP_CHECK(p.num_topk <= kMaxLowLatencyTopk, ErrorCode::kInternal, "low-latency combine launched with top-",
               p.num_topk);
  // The send's per-expert row prefix (E_local + 1 ints) in dynamic shared memory; units must fit an int.
  const size_t smem = p.do_send ? sizeof(int) * (static_cast<size_t>(p.num_local_experts) + 1) : 0;
  const long long max_units = static_cast<long long>(p.num_local_experts) * p.num_ranks * p.T *
                              ((p.hidden / 8 + kSendChunkInt4 - 1) / kSendChunkInt4);
  OPENEP_CHECK(max_units < (1LL << 31) - 1 - 65536LL * 32, ErrorCode::kInvalidArgument,
               "low-latency combine: E_local * R * T * hidden is too large (", max_units, " send units)");
  OPENEP_CHECK(!p.use_logfmt || p.hidden % detail::logfmt::kDivisionChannels == 0, ErrorCode::kInternal,
               "low-latency LogFMT combine launched with hidden ", p.hidden);
  void (*kernel)(LowLatencyCombineParams) =
      p.use_logfmt ? low_latency_combine_kernel<true> : low_latency_combine_kernel<false>;
  if (smem > 48 * 1024) {
    OPENEP_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  launch(kernel, p, num_blocks, smem, grids, stream);
}

void list_low_latency_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&low_latency_dispatch_kernel), "low_latency_dispatch_kernel"});
  out.push_back({reinterpret_cast<const void*>(&low_latency_combine_kernel<false>), "low_latency_combine_kernel<false>"});
  out.push_back({reinterpret_cast<const void*>(&low_latency_combine_kernel<true>), "low_latency_combine_kernel<true>"});
}

}  // namespace openep::detail
