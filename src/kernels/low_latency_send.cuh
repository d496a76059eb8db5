// The low-latency send side, written once for both transports: dispatch_send<Net> and combine_send<Net, kLogfmt>
// are instantiated with the NVLink transport (low_latency.cu: stores into the peers' windows through LSA pointers)
// and the GIN transport (low_latency_gin.cu: staging in the own window, then puts and signals). What the two share
// is here: slot claims and the routing header, the BF16 copy / FP8 cast of a row, the (row, chunk) unit walk of the
// combine, the last-block ticket, the epochs. What differs (where bytes go and how they are made visible) is the
// transport's. The receive side is already one: the GIN path ends in the NVLink receive kernels.
//
// A dispatch transport Net provides (every thread of the block calls each, uniformly):
//   void begin(int half)                        before the first token (its shared state; published by the
//                                               __syncthreads that starts the token loop)
//   char* payload(int t)                        where the block stages token t's row (and, FP8, its scales after it)
//   void post_token(int t, const DispatchRowGeometry&, const TokenRoute&)
//                                               sends token t's message to every live rank: the routing header
//                                               always, the payload where the token has an expert (after a
//                                               __syncthreads: the staged row and the route are complete)
//   void end_tokens()                           after the block's last token (GIN: flush, the sources reusable)
//   void publish_dispatch(int half, uint64_t flag, const int* s_live)
//                                               the last block: per live rank d the counts of d's experts, then
//                                               the flag word (take_count() gives each expert's count)
// A combine transport Net provides (it gets the kernel's parameters on every call instead of holding a reference:
// a member reference to the __grid_constant__ parameters costs the NVLink LogFMT kernel a register and a spill):
//   static int chunks_per_row(int row_int4)     units per packed row
//   template <bool kLogfmt> void send_unit(const LowLatencyCombineParams& p, int half, int i, int r, int c,
//                                          const int* s_live, int lane)
//                                               one warp sends chunk c of row r of local expert i to the row's
//                                               source rank (if that rank is live and the row's token valid)
//   void end_rows()                             after the block's last unit
//   void publish_combine(const LowLatencyCombineParams& p, int half, uint64_t epoch, const int* s_live)
//                                               the last block: per live rank the combine flag (the epoch)
#pragma once

#include <cstdint>

#include "device/fp8.cuh"
#include "device/ptx.cuh"
#include "device/ticket.cuh"
#include "device/wait.cuh"
#include "kernels/low_latency_launch.hpp"
#include "kernels/low_latency_rows.cuh"
#include "openep/low_latency.hpp"
#include "protocol/limits.hpp"

namespace openep::detail {

inline constexpr int kMaxLowLatencySendRanks = 256;  // one shared-memory entry per rank in the send kernels

// The sizes of one dispatch message's parts (int4 = 16 bytes).
struct DispatchRowGeometry {
  int row_bytes;     // BF16: 2 * hidden; FP8: hidden
  int payload_int4;  // the row and, FP8, its hidden / 128 float scales, rounded up to int4
  int header_int4;   // the routing header's first K int32 entries (only those are written and read)
  int chunks;        // int4 chunks of the BF16 input row
};

__device__ __forceinline__ DispatchRowGeometry dispatch_geometry(const LowLatencyDispatchParams& p) {
  DispatchRowGeometry g;
  g.row_bytes = p.use_fp8 ? p.hidden : 2 * p.hidden;
  const int num_scales = p.use_fp8 ? p.hidden / 128 : 0;
  g.payload_int4 = (g.row_bytes + num_scales * 4 + 15) / 16;
  g.header_int4 = (p.num_topk + 3) / 4;
  g.chunks = p.hidden / 8;
  return g;
}

// The block's routing of one token (shared memory), as the transports' post_token reads it.
struct TokenRoute {
  const int* entry;  // [K] (local expert << 16) | slot, or -1
  const int* dest;   // [K] owner rank of slot k's expert, or -1
  const int* has;    // [R] the token has at least one expert on rank d
  const int* live;   // [R] rank d is not masked (shrink mode; all live otherwise)
};

// Routing entry of top-k slot k in the header of the message to rank d.
__device__ __forceinline__ int header_entry(const TokenRoute& r, int K, int k, int d) {
  return k < K && r.dest[k] == d ? r.entry[k] : -1;
}

// The header's int4 number q (entries 4q .. 4q + 3) of the message to rank d.
__device__ __forceinline__ int4 header_int4(const TokenRoute& r, int K, int q, int d) {
  const int k = 4 * q;
  return make_int4(header_entry(r, K, k, d), header_entry(r, K, k + 1, d), header_entry(r, K, k + 2, d),
                   header_entry(r, K, k + 3, d));
}

// Threads k < K claim token t's slots: an expert id outside [-1, E) is kBadExpertIndex, a slot beyond T
// kCapacityExceeded (both recorded, the slot left out); a masked owner gets nothing.
__device__ __forceinline__ void route_token(const LowLatencyDispatchParams& p, int t, const int* s_live, int* s_entry,
                                            int* s_dest, int* s_has) {
  const int K = p.num_topk, El = p.num_local_experts, T = p.T;
  if (threadIdx.x >= K) return;
  const int k = threadIdx.x;
  const int64_t idx = static_cast<int64_t>(t) * K + k;
  const int64_t e = p.topk_int64 ? static_cast<const int64_t*>(p.topk_idx)[idx]
                                 : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_idx)[idx]);
  int entry = -1, dest = -1;
  if (e < -1 || e >= p.num_experts) {
    device::record_error(p.wait, DeviceErrorCode::kBadExpertIndex, -1, Phase::kLowLatencyDispatch, t, e);
  } else if (e >= 0 && s_live[static_cast<int>(e) / El]) {
    const int d = static_cast<int>(e) / El, i = static_cast<int>(e) % El;
    const int slot = atomicAdd(&p.state->slot_counter[e], 1);
    if (slot < T) {
      entry = (i << 16) | slot;
      dest = d;
      s_has[d] = 1;
    } else {
      device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, d, Phase::kLowLatencyDispatch, T, slot + 1);
    }
  }
  s_entry[k] = entry;
  s_dest[k] = dest;
}

// Token t's row into `payload`: a BF16 copy, or the FP8 cast with its float scales after the row bytes.
// Every thread of the block calls it (the FP8 cast shuffles across lanes: uniform trip count).
__device__ __forceinline__ void stage_row(const LowLatencyDispatchParams& p, const DispatchRowGeometry& g, int t,
                                          char* payload) {
  const int4* xrow = reinterpret_cast<const int4*>(p.x + static_cast<size_t>(t) * p.hidden);
  if (!p.use_fp8) {
    for (int c = threadIdx.x; c < g.chunks; c += blockDim.x)
      reinterpret_cast<int4*>(payload)[c] = ptx::ld_nc_no_allocate(xrow + c);
  } else {
    float* scales = reinterpret_cast<float*>(payload + g.row_bytes);
    for (int base = 0; base < g.chunks; base += blockDim.x) {
      const int c = base + threadIdx.x;
      const bool active = c < g.chunks;
      const int4 v = active ? ptx::ld_nc_no_allocate(xrow + c) : make_int4(0, 0, 0, 0);
      device::cast_fp8_chunk(v, active, p.round_scale, reinterpret_cast<uint2*>(payload) + c, scales + c / 16);
    }
  }
}

// Expert e's dispatch count for this operation (at most T), and its counter reset for the next one.
__device__ __forceinline__ int take_count(const LowLatencyDispatchParams& p, int e) {
  return min(atomicExch(&p.state->slot_counter[e], 0), p.T);
}

// Dispatch send: blocks take tokens; per token the block claims its slots, stages its row once and the transport
// posts one message per rank ([my rank][t] of the rank's dispatch half). The last block (acq_rel.sys ticket: it
// sees every block's work) publishes the counts and the flag (epoch << 32 | K << 16 | num_tokens) per rank.
template <class Net>
__device__ __forceinline__ void dispatch_send(const LowLatencyDispatchParams& p, uint64_t epoch, Net& net) {
  __shared__ int s_entry[kMaxLowLatencyTopk];
  __shared__ int s_dest[kMaxLowLatencyTopk];
  __shared__ int s_has[kMaxLowLatencySendRanks];
  __shared__ int s_live[kMaxLowLatencySendRanks];  // shrink mode: masked ranks get nothing
  const int R = p.num_ranks;
  const int half = static_cast<int>(epoch & 1);
  const DispatchRowGeometry g = dispatch_geometry(p);
  const TokenRoute route{s_entry, s_dest, s_has, s_live};
  for (int d = threadIdx.x; d < R; d += blockDim.x) s_live[d] = device::rank_live(p.mask, d);
  net.begin(half);
  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    for (int d = threadIdx.x; d < R; d += blockDim.x) s_has[d] = 0;
    __syncthreads();  // also publishes s_live and begin()'s state on the first token
    route_token(p, t, s_live, s_entry, s_dest, s_has);
    stage_row(p, g, t, net.payload(t));
    __syncthreads();  // the route and the staged row are complete
    net.post_token(t, g, route);
    __syncthreads();  // shared memory is reused by the next token
  }
  net.end_tokens();
  if (device::last_block<true>(&p.state->send_ticket[0])) {
    const uint64_t flag = (epoch << 32) | (static_cast<uint64_t>(p.num_topk) << 16) | static_cast<uint64_t>(p.num_tokens);
    net.publish_dispatch(half, flag, s_live);
    if (threadIdx.x == 0) p.state->send_epoch[0] = epoch;
  }
}

// Combine send: units are (packed row, chunk of the row) over all local experts, warp w of block b starting at unit
// w * gridDim.x + b: every SM sends, and a hot expert is spread like any other. Each unit goes to the row's source
// rank, [global expert][token] of its combine half. The last block releases one flag (the epoch) per rank.
// s_prefix: dynamic shared memory of E_local + 1 ints.
template <class Net, bool kLogfmt>
__device__ __forceinline__ void combine_send(const LowLatencyCombineParams& p, uint64_t epoch, Net& net, int* s_prefix) {
  __shared__ int s_live[kMaxLowLatencySendRanks];  // shrink mode: masked ranks get no rows and no flag
  const int R = p.num_ranks, El = p.num_local_experts;
  const int half = static_cast<int>(epoch & 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int d = threadIdx.x; d < R; d += blockDim.x) s_live[d] = device::rank_live(p.mask, d);
  scan_expert_rows(p.layout_range, El, R, s_prefix);  // ends with __syncthreads: s_live is visible after it
  const int nch = Net::chunks_per_row(p.hidden / 8);
  const int units = s_prefix[El] * nch;  // rows <= E_local * R * T: fits an int (checked by the launcher)
  for (int u = warp * gridDim.x + blockIdx.x; u < units; u += gridDim.x * warps) {  // warp-uniform
    const int q = u / nch, c = u - q * nch;
    const int i = local_expert_of_row(s_prefix, El, q), r = q - s_prefix[i];
    net.template send_unit<kLogfmt>(p, half, i, r, c, s_live, lane);
  }
  net.end_rows();
  if (device::last_block<true>(&p.state->send_ticket[1])) {
    net.publish_combine(p, half, epoch, s_live);
    if (threadIdx.x == 0) p.state->send_epoch[1] = epoch;
  }
}

}  // namespace openep::detail
