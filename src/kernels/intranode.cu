// Intranode (NVLink) normal-mode dispatch and combine.
//
// Protocol (per operation; epochs are monotonic, nothing is ever reset):
//  prepare (1 block): barrier (every peer has finished the previous operation on the region), then in exact
//    and worst-case dispatch each rank writes its row of the count matrix, its token count and its per-expert
//    counts for each peer into that peer's header, barrier again (release/acquire), and computes the handle:
//    rank_prefix_matrix, num_tokens_per_src and send_pos[t][d] = sum_{s<me} counts[s][d] + (rank of t among
//    my tokens going to d). The op epoch is incremented last.
//  dispatch: sender blocks take chunks of this rank's tokens; own warps copy own rows into the caller's outputs,
//    peer warps load each token once and store it to every peer d it goes to: its record in d's window part for
//    this source (or d's window-backed outputs), at the token's place in its final receive order; then one
//    thread per destination publishes (first record, count) and st.release.sys's dispatch_flags[me][c] = epoch
//    in d's header. Receiver blocks wait (acquire) for each (source, chunk) flag and copy those records from the
//    window into the caller's outputs at their final rows. No rings; flow control is the barrier between rounds
//    (below).
//  combine: sender blocks take (row block b, source s) pairs of the rows this rank received from s (blocks of
//    chunk_tokens(n_s) rows in receive order), copy them (and their weights) in that order into s's stage part for
//    me (slot = row - first row from s: a contiguous push, no lookup) and publish combine_flags[me][b] = epoch in
//    s's header. Reducer blocks take chunks of this rank's tokens, find from send_pos which row blocks of each peer
//    hold them, wait for those flags, then sum each token's rows (slot send_pos[t][d] - first row at d) in fp32 in
//    ascending rank order (own rows read straight from the input), add the biases and store BF16.
//  window split among peers: own rows never pass through the window, so its data region is split into R - 1
//    equal parts, one per peer (IntranodeLayout::peer_slot). Dispatch: source s's rows at d go to d's part for s,
//    row (receive row - first row of s at d - round * peer_rows). Combine: peer d's rows of my tokens go to my part
//    for d in d's receive order (IntranodeLayout::combine_slot).
//  rounds (runtime/intranode.cpp): when one rank sends another more rows than a dispatch part (or a combine stage
//    part) holds, the host launches the dispatch (combine) once per round, each round after the first behind a
//    prepare kernel without exchange (barrier: the peers have drained the previous round; new epoch). Dispatch
//    round k carries each source's rows [k * peer_rows, (k + 1) * peer_rows) of its range at d, own rows in round 0
//    only; combine round k carries the owner tokens [tok_lo, tok_hi), at most stage_rows of them. Every kernel
//    first checks, from the handle's matrix (the same on every rank), that its rounds hold every pair's rows, so on
//    a shortfall no rank writes and every rank records kCapacityExceeded.
#include <climits>

#include "device/barrier.cuh"
#include "device/copy.cuh"
#include "device/ticket.cuh"
#include "device/wait.cuh"
#include "kernels/load.hpp"
#include "kernels/intranode_launch.hpp"
#include "protocol/intranode_layout.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

using L = IntranodeLayout;
constexpr int kPrepareThreads = 1024;
constexpr int kThreads = 768;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ char* region(const WindowRef& w, int rank) { return w.peer_bases[rank] + w.nvl_offset; }
template <typename T>
__device__ __forceinline__ T* at(const WindowRef& w, int rank, size_t offset) {
  return reinterpret_cast<T*>(region(w, rank) + offset);
}
// An int32 of my header that peers wrote (read after the barrier's acquire; volatile: never cached).
__device__ __forceinline__ int header_int(const PrepareParams& p, size_t offset) {
  return *reinterpret_cast<const volatile int32_t*>(region(p.window, p.rank) + offset);
}

// ---------------------------------------------------------------------------------------------------------
// prepare

// Exclusive block-wide prefix sum of one int per thread (blockDim.x == kPrepareThreads).
__device__ __forceinline__ int block_exclusive_scan(int v, int* s_warp_sums, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == 31) s_warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kPrepareThreads / 32 ? s_warp_sums[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += n;
    }
    s_warp_sums[lane] = wi - w;  // exclusive warp offsets
    if (lane == 31) s_warp_sums[32] = wi;
  }
  __syncthreads();
  const int result = s_warp_sums[warp] + incl - v;
  total = s_warp_sums[32];
  __syncthreads();
  return result;
}

// Writes my counts into every peer's header.
__device__ __forceinline__ void publish_counts(const PrepareParams& p) {
  const int R = p.num_ranks, E_local = p.num_experts / R;
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int peer = i / R, d = i % R;
    *at<int32_t>(p.window, peer, L::count(p.rank, d)) = p.num_tokens_per_rank[d];
  }
  for (int peer = threadIdx.x; peer < R; peer += blockDim.x)
    *at<int32_t>(p.window, peer, L::num_tokens(p.rank)) = p.num_tokens;
  for (int i = threadIdx.x; i < R * E_local; i += blockDim.x) {
    const int peer = i / E_local, e = i % E_local;
    *at<int32_t>(p.window, peer, L::expert_count(p.rank, e)) = p.num_tokens_per_expert[peer * E_local + e];
  }
}

// Computes rank_prefix_matrix, num_tokens_per_src and the receive counts from my header.
__device__ __forceinline__ void compute_receive_side(const PrepareParams& p) {
  const int R = p.num_ranks, E_local = p.num_experts / R;
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    int acc = 0;
    for (int i = 0; i < R; ++i) p.rank_prefix_matrix[i * R + j] = (acc += header_int(p, L::count(i, j)));
    p.num_tokens_per_src[j] = header_int(p, L::num_tokens(j));
  }
  for (int e = threadIdx.x; e < E_local; e += blockDim.x) {
    int sum = 0;
    for (int s = 0; s < R; ++s) sum += header_int(p, L::expert_count(s, e));
    const int a = p.expert_alignment;
    const int aligned = (sum + a - 1) / a * a;
    if (p.num_recv_tokens_per_expert) p.num_recv_tokens_per_expert[e] = aligned;
    if (p.host) p.host->num_recv_tokens_per_expert[e] = aligned;
  }
  if (threadIdx.x == 0) {
    int total = 0;
    for (int s = 0; s < R; ++s) total += header_int(p, L::count(s, p.rank));
    if (p.host) {
      int max_pair = 0, max_tokens = 0;  // the whole count matrix is in my header: same answer on every rank
      for (int d = 0; d < R; ++d) {
        for (int s = 0; s < R; ++s)
          if (s != d) max_pair = max(max_pair, header_int(p, L::count(s, d)));
        max_tokens = max(max_tokens, header_int(p, L::num_tokens(d)));
      }
      p.host->num_recv_tokens = total;
      p.host->max_pair_rows = max_pair;
      p.host->max_num_tokens = max_tokens;
    }
    if (p.num_worst_tokens > 0 && total > p.num_worst_tokens)
      device::record_error(p.wait, DeviceErrorCode::kWorstTokensExceeded, -1, Phase::kDispatchCounts,
                           p.num_worst_tokens, total);
  }
}

// send_pos[t][d] for every destination: base offset plus rank among my tokens going to d.
__device__ __forceinline__ void compute_send_positions(const PrepareParams& p, int* s_scan) {
  const int R = p.num_ranks, N = p.num_tokens;
  const int per_thread = (N + kPrepareThreads - 1) / kPrepareThreads;
  const int t0 = min(N, threadIdx.x * per_thread), t1 = min(N, t0 + per_thread);
  for (int d = 0; d < R; ++d) {
    int base = 0;
    for (int s = 0; s < p.rank; ++s) base += header_int(p, L::count(s, d));
    int mine = 0;
    for (int t = t0; t < t1; ++t) mine += p.is_token_in_rank[static_cast<int64_t>(t) * R + d] ? 1 : 0;
    int total = 0;
    int pos = base + block_exclusive_scan(mine, s_scan, total);
    for (int t = t0; t < t1; ++t) {
      const bool in = p.is_token_in_rank[static_cast<int64_t>(t) * R + d];
      p.send_pos[static_cast<int64_t>(t) * R + d] = in ? pos++ : -1;
    }
    if (threadIdx.x == 0 && total != p.num_tokens_per_rank[d])
      device::record_error(p.wait, DeviceErrorCode::kInconsistentLayout, d, Phase::kDispatchCounts,
                           p.num_tokens_per_rank[d], total);
  }
}

__global__ void __launch_bounds__(kPrepareThreads, 1) intranode_prepare_kernel(const __grid_constant__ PrepareParams p) {
  if (device::error_recorded(p.wait)) return;  // an earlier kernel failed: the handle it fed is not valid
  __shared__ int s_scan[33];
  const device::BarrierRef bar{p.window.peer_bases, p.window.barrier_offset, p.barrier_epoch,
                               p.barrier_slot,      p.rank,                  p.num_ranks};
  const Phase phase = p.exchange ? Phase::kDispatchCounts : Phase::kBarrier;
  if (!device::barrier_block(bar, p.wait, phase)) return;
  if (p.exchange) {
    publish_counts(p);
    if (!device::barrier_block(bar, p.wait, phase)) return;
    compute_receive_side(p);
    compute_send_positions(p, s_scan);
    if (p.host) {
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();  // counters land before the sequence number the host polls
        *reinterpret_cast<volatile int64_t*>(&p.host->seq) = p.host_seq;
        __threadfence_system();
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) p.op_epoch[0] += 1;
}

// ---------------------------------------------------------------------------------------------------------
// dispatch

// First receive row at d of the rows rank s sends d (rank_prefix_matrix is the handle's full [R][R] matrix).
__device__ __forceinline__ int rows_before(const int* rank_prefix_matrix, int R, int s, int d) {
  return s == 0 ? 0 : rank_prefix_matrix[(s - 1) * R + d];
}

// Rows rank s sends rank d.
__device__ __forceinline__ int pair_rows(const int* rank_prefix_matrix, int R, int s, int d) {
  return rank_prefix_matrix[s * R + d] - rows_before(rank_prefix_matrix, R, s, d);
}

// True when `rounds` rounds of `per_round` rows hold every pair's rows (s != d). Every rank evaluates the same
// matrix, so on a shortfall every rank records the error and none writes into a peer. One thread per block calls it.
__device__ __forceinline__ bool pairs_fit(const DispatchParams& p) {
  const int R = p.num_ranks;
  const int64_t room = static_cast<int64_t>(p.num_rounds) * p.peer_rows;
  for (int s = 0; s < R; ++s)
    for (int d = 0; d < R; ++d) {
      const int rows = s == d ? 0 : pair_rows(p.rank_prefix_matrix, R, s, d);
      if (rows > room) {
        if (blockIdx.x == 0)
          device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, d, Phase::kDispatchData, room, rows);
        return false;
      }
    }
  return true;
}

// Metadata of token t as destination d sees it: local top-k ids (-1 elsewhere, weight 0), scales, source index.
struct TokenMeta {
  __device__ __forceinline__ static int local_expert(const DispatchParams& p, int t, int k, int d) {
    const int64_t e = p.topk_int64 ? static_cast<const int64_t*>(p.topk_idx)[static_cast<int64_t>(t) * p.num_topk + k]
                                   : static_cast<const int32_t*>(p.topk_idx)[static_cast<int64_t>(t) * p.num_topk + k];
    const int64_t lo = static_cast<int64_t>(d) * p.experts_per_rank;
    return (e >= lo && e < lo + p.experts_per_rank) ? static_cast<int>(e - lo) : -1;
  }
  __device__ __forceinline__ static uint32_t scale(const DispatchParams& p, int t, int j) {
    return p.x_scales[t * p.scale_token_stride + j * p.scale_hidden_stride];
  }
};

// Where destination d wants its rows: window-backed outputs (pointers into d's window) or null x (its window part).
struct Destination {
  char* x;
  uint32_t* scales;
  void* topk_idx;
  float* topk_weights;
  int32_t* src_idx;
  bool topk_int64;
};

__device__ __forceinline__ void store_topk(const DispatchParams& p, int64_t row, int k, int local, float w) {
  const int64_t i = row * p.num_topk + k;
  if (p.topk_int64) static_cast<int64_t*>(p.recv_topk_idx)[i] = local;
  else static_cast<int32_t*>(p.recv_topk_idx)[i] = local;
  p.recv_topk_weights[i] = w;
}

// Token t's row in the caller's input.
__device__ __forceinline__ const int4* token_row(const DispatchParams& p, int t) {
  return reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + static_cast<int64_t>(t) * p.row_bytes);
}

// One warp stores token t's metadata (source index, local top-k, scales) into destination outputs at row `row`.
__device__ __forceinline__ void store_meta_to_outputs(const DispatchParams& p, const Destination& o, int t, int d,
                                                      int row, int lane) {
  if (lane == 0 && o.src_idx) o.src_idx[row] = t;
  if (o.topk_idx) {
    for (int k = lane; k < p.num_topk; k += 32) {
      const int local = TokenMeta::local_expert(p, t, k, d);
      const int64_t i = static_cast<int64_t>(row) * p.num_topk + k;
      if (o.topk_int64) static_cast<int64_t*>(o.topk_idx)[i] = local;
      else static_cast<int32_t*>(o.topk_idx)[i] = local;
      o.topk_weights[i] = local >= 0 ? p.topk_weights[static_cast<int64_t>(t) * p.num_topk + k] : 0.f;
    }
  }
  if (o.scales)
    for (int j = lane; j < p.num_scales; j += 32)
      o.scales[static_cast<int64_t>(row) * p.num_scales + j] = TokenMeta::scale(p, t, j);
}

// One warp stores token t's row and metadata into destination outputs (this rank's own) at row `row`.
__device__ __forceinline__ void send_token_to_outputs(const DispatchParams& p, const Destination& o, int t, int d,
                                                      int row, int lane) {
  int4* dst = reinterpret_cast<int4*>(o.x + static_cast<int64_t>(row) * p.row_bytes);
  device::copy_warp<device::Source::kInput>(dst, token_row(p, t), p.row_bytes / 16, lane);
  store_meta_to_outputs(p, o, t, d, row, lane);
}

// This rank's own outputs as a Destination: its own rows go straight there, whatever the peers use.
__device__ __forceinline__ Destination own_outputs(const DispatchParams& p) {
  return Destination{static_cast<char*>(p.recv_x), p.recv_x_scales, p.recv_topk_idx, p.recv_topk_weights,
                     p.recv_src_idx, p.topk_int64};
}

// Record `rec_i` of peer d's window part: the row, then the metadata at align16(row_bytes).
__device__ __forceinline__ char* window_record(const DispatchParams& p, int d, int64_t rec_i) {
  return region(p.window, d) + L::dispatch_record(rec_i, p.record_bytes);
}

// One warp stores token t's metadata into record `rec_i` of peer d's window part.
__device__ __forceinline__ void store_meta_to_window(const DispatchParams& p, int t, int d, int64_t rec_i, int lane) {
  int32_t* meta = reinterpret_cast<int32_t*>(window_record(p, d, rec_i) + L::align16(p.row_bytes));
  if (lane == 0) meta[0] = t;
  for (int k = lane; k < p.num_topk; k += 32) {
    const int local = TokenMeta::local_expert(p, t, k, d);
    meta[1 + k] = local;
    reinterpret_cast<float*>(meta)[1 + p.num_topk + k] =
        local >= 0 ? p.topk_weights[static_cast<int64_t>(t) * p.num_topk + k] : 0.f;
  }
  for (int j = lane; j < p.num_scales; j += 32) meta[1 + 2 * p.num_topk + j] = TokenMeta::scale(p, t, j);
}

// Block 0 tells every peer where this rank's outputs are (IntranodeLayout::OutputDesc), epoch last (release).
__device__ __forceinline__ void publish_outputs(const DispatchParams& p, uint64_t epoch) {
  if (blockIdx.x != 0 || threadIdx.x >= p.num_ranks || threadIdx.x == p.rank) return;
  L::OutputDesc* d = at<L::OutputDesc>(p.window, threadIdx.x, L::out_desc(p.rank));
  d->x = p.out_pool ? p.out_x : -1;
  d->scales = p.out_pool ? p.out_scales : -1;
  d->topk_idx = p.out_pool ? p.out_topk_idx : -1;
  d->topk_weights = p.out_pool ? p.out_topk_weights : -1;
  d->src_idx = p.out_pool ? p.out_src_idx : -1;
  d->topk_int64 = p.topk_int64 ? 1 : 0;
  ptx::st_release_sys(&d->epoch, epoch);
}

// Thread d of the block waits for destination d's OutputDesc of this round and resolves it against d's window.
// Returns false on timeout (recorded). Threads without a peer return true.
__device__ __forceinline__ bool read_destination(const DispatchParams& p, uint64_t epoch, Destination& o) {
  const int d = threadIdx.x;
  o = Destination{nullptr, nullptr, nullptr, nullptr, nullptr, false};
  if (d >= p.num_ranks || d == p.rank) return true;
  L::OutputDesc* desc = at<L::OutputDesc>(p.window, p.rank, L::out_desc(d));
  if (!device::wait_geq(p.wait, &desc->epoch, epoch, d, Phase::kDispatchData)) return false;
  const volatile L::OutputDesc* v = desc;
  if (v->x < 0) return true;
  char* base = p.window.peer_bases[d];
  o.x = base + v->x;
  o.scales = v->scales >= 0 ? reinterpret_cast<uint32_t*>(base + v->scales) : nullptr;
  o.topk_idx = v->topk_idx >= 0 ? base + v->topk_idx : nullptr;
  o.topk_weights = v->topk_weights >= 0 ? reinterpret_cast<float*>(base + v->topk_weights) : nullptr;
  o.src_idx = v->src_idx >= 0 ? reinterpret_cast<int32_t*>(base + v->src_idx) : nullptr;
  o.topk_int64 = v->topk_int64 != 0;
  return true;
}

// Sender warps have two roles. The first kWarps / R warps (the own rows' share of the stores) copy this rank's
// own rows into its outputs. The others are peer warps: each takes a token, loads its row once and stores it to
// every peer it goes to (device::copy_warp_fanout), then writes each peer's metadata; lane l of a peer warp
// handles destination l's bookkeeping (its row, its part, the chunk's first record and count). Own and remote
// stores never share a warp: a congested remote store stream stalls the local stores of the same warp
// (perf-techniques.md 2).
__device__ void dispatch_sender(const DispatchParams& p, uint64_t epoch) {
  __shared__ int s_first[L::kMaxRanks], s_count[L::kMaxRanks];
  __shared__ Destination s_dst[L::kMaxRanks];
  __shared__ int s_dst_ok;
  const int R = p.num_ranks, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int chunk = L::chunk_tokens(p.num_tokens), num_chunks = L::num_chunks(p.num_tokens);
  const int num_own_warps = kWarps / R, num_peer_warps = kWarps - num_own_warps;
  const bool own_warp = warp < num_own_warps;
  // Lane l < R, l != me: destination l. This round's part of my rows at l: relative rows [round_lo, round_lo +
  // peer_rows) of my range at l, stored from record peer_slot(me, l) * peer_rows of l's window (or straight into
  // l's window-backed outputs).
  const bool lane_peer = lane < R && lane != p.rank;
  const int lo_l = lane_peer ? rows_before(p.rank_prefix_matrix, R, p.rank, lane) : 0;
  const int64_t round_lo = static_cast<int64_t>(p.round) * p.peer_rows;
  const int64_t part_l = lane_peer ? static_cast<int64_t>(L::peer_slot(p.rank, lane)) * p.peer_rows : 0;
  if (threadIdx.x == 0) s_dst_ok = 1;
  __syncthreads();
  if (threadIdx.x < L::kMaxRanks) {
    Destination o;
    if (!read_destination(p, epoch, o)) s_dst_ok = 0;
    s_dst[threadIdx.x] = o;
  }
  __syncthreads();
  if (!s_dst_ok) return;
  char* const out_x_l = lane_peer ? s_dst[lane].x : nullptr;  // destination l's window-backed recv_x, or null
  const Destination own = own_outputs(p);
  for (int c = blockIdx.x; c < num_chunks; c += p.num_senders) {
    if (threadIdx.x < R) s_first[threadIdx.x] = INT_MAX, s_count[threadIdx.x] = 0;
    __syncthreads();
    const int t0 = c * chunk, t1 = min(p.num_tokens, t0 + chunk);
    if (own_warp) {
      if (p.round == 0)  // own rows: round 0 only
        for (int t = t0 + warp; t < t1; t += num_own_warps) {
          const int row = p.send_pos[static_cast<int64_t>(t) * R + p.rank];
          if (row >= 0) send_token_to_outputs(p, own, t, p.rank, row, lane);
        }
    } else {
      int first = INT_MAX, count = 0;  // lane l: destination l's records of this chunk
      for (int t = t0 + warp - num_own_warps; t < t1; t += num_peer_warps) {
        const int row = lane_peer ? p.send_pos[static_cast<int64_t>(t) * R + lane] : -1;
        const int64_t rel = row - lo_l - round_lo;  // position in this round's part
        const bool go = row >= 0 && rel >= 0 && rel < p.peer_rows;
        const uint32_t mask = __ballot_sync(0xffffffffu, go);
        if (!mask) continue;
        int4* dst = nullptr;
        if (go)
          dst = reinterpret_cast<int4*>(out_x_l ? out_x_l + static_cast<int64_t>(row) * p.row_bytes
                                                : window_record(p, lane, part_l + rel));
        device::copy_warp_fanout<device::Source::kInput>(dst, mask, token_row(p, t), p.row_bytes / 16, lane);
        for (uint32_t m = mask; m; m &= m - 1) {
          const int d = __ffs(m) - 1;
          const int row_d = __shfl_sync(0xffffffffu, row, d);
          const int64_t rec_d = __shfl_sync(0xffffffffu, part_l + rel, d);
          if (s_dst[d].x) store_meta_to_outputs(p, s_dst[d], t, d, row_d, lane);
          else store_meta_to_window(p, t, d, rec_d, lane);
        }
        if (go) first = min(first, static_cast<int>(part_l + rel)), ++count;
      }
      if (lane_peer && count) atomicMin(&s_first[lane], first), atomicAdd(&s_count[lane], count);
    }
    __syncthreads();
    // Publish chunk c to every peer: range first, then the flag (release covers the block's stores).
    if (threadIdx.x < R && threadIdx.x != p.rank) {
      const int peer = threadIdx.x;
      int32_t* range = at<int32_t>(p.window, peer, L::dispatch_range(p.rank, c));
      range[0] = s_count[peer] ? s_first[peer] : 0;  // first window record
      range[1] = s_count[peer];
      ptx::st_release_sys(at<uint64_t>(p.window, peer, L::dispatch_flag(p.rank, c)), epoch);
    }
  }
}

// One warp copies window record `rec_i` into the outputs at receive row `row`.
__device__ __forceinline__ void receive_row(const DispatchParams& p, int64_t rec_i, int row, int lane) {
  const char* rec = region(p.window, p.rank) + L::dispatch_record(rec_i, p.record_bytes);
  int4* dst = reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + static_cast<int64_t>(row) * p.row_bytes);
  device::copy_warp<device::Source::kWindow>(dst, reinterpret_cast<const int4*>(rec), p.row_bytes / 16, lane);
  const int32_t* meta = reinterpret_cast<const int32_t*>(rec + L::align16(p.row_bytes));
  if (lane == 0 && p.recv_src_idx) p.recv_src_idx[row] = ptx::ld_cg(meta);
  for (int k = lane; k < p.num_topk; k += 32) {
    const int32_t local = ptx::ld_cg(meta + 1 + k);
    store_topk(p, row, k, local, __int_as_float(ptx::ld_cg(meta + 1 + p.num_topk + k)));
  }
  for (int j = lane; j < p.num_scales; j += 32)
    p.recv_x_scales[static_cast<int64_t>(row) * p.num_scales + j] =
        static_cast<uint32_t>(ptx::ld_cg(meta + 1 + 2 * p.num_topk + j));
}

__device__ void dispatch_receiver(const DispatchParams& p, uint64_t epoch) {
  __shared__ int s_ok, s_first, s_count;
  const int R = p.num_ranks, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int receiver = blockIdx.x - p.num_senders, num_receivers = gridDim.x - p.num_senders;
  const int num_pairs = (R - 1) * L::kMaxChunks;  // (chunk, source) pairs, chunk-major: early chunks first
  for (int q = receiver; q < num_pairs; q += num_receivers) {
    const int c = q / (R - 1), si = q % (R - 1), s = si < p.rank ? si : si + 1;
    if (c >= L::num_chunks(p.num_tokens_per_src[s])) continue;
    if (threadIdx.x == 0) {
      const uint64_t* flag = at<uint64_t>(p.window, p.rank, L::dispatch_flag(s, c));
      s_ok = device::wait_geq(p.wait, flag, epoch, s, Phase::kDispatchData);
      const int32_t* range = at<int32_t>(p.window, p.rank, L::dispatch_range(s, c));
      s_first = ptx::ld_cg(range), s_count = ptx::ld_cg(range + 1);
    }
    __syncthreads();
    if (!s_ok) return;
    // Record i of s's part holds receive row lo_s + round * peer_rows + (i - part_s).
    const int64_t part_s = static_cast<int64_t>(L::peer_slot(s, p.rank)) * p.peer_rows;
    const int64_t row0 = rows_before(p.rank_prefix_matrix, R, s, p.rank) + static_cast<int64_t>(p.round) * p.peer_rows;
    if (!p.out_pool)  // window-backed outputs: the sender stored the rows there, nothing to copy
      for (int i = warp; i < s_count; i += kWarps)
        receive_row(p, s_first + i, static_cast<int>(row0 + (s_first + i - part_s)), lane);
    __syncthreads();
  }
  // Worst-case mode: rows past the real count get topk_idx = -1 (weights 0).
  if (p.round == 0 && p.num_worst_tokens > 0 && p.recv_topk_idx) {
    const int num_recv = min(max(p.rank_prefix_matrix[(R - 1) * R + p.rank], 0), p.num_worst_tokens);
    const int64_t first = static_cast<int64_t>(num_recv) * p.num_topk;
    const int64_t last = static_cast<int64_t>(p.num_worst_tokens) * p.num_topk;
    for (int64_t i = first + receiver * blockDim.x + threadIdx.x; i < last; i += num_receivers * blockDim.x)
      store_topk(p, i / p.num_topk, static_cast<int>(i % p.num_topk), -1, 0.f);
  }
}

__global__ void __launch_bounds__(kThreads, 1) intranode_dispatch_kernel(const __grid_constant__ DispatchParams p) {
  // After a failed prepare (a peer timed out) send_pos and the prefix matrix are not written: using them
  // would write outside the outputs. The error is already recorded; the host raises it.
  if (device::error_recorded(p.wait)) return;
  __shared__ int s_fit;
  if (threadIdx.x == 0) s_fit = pairs_fit(p);
  __syncthreads();
  if (!s_fit) return;
  const uint64_t epoch = *p.op_epoch;
  publish_outputs(p, epoch);
  if (blockIdx.x < p.num_senders) dispatch_sender(p, epoch);
  else dispatch_receiver(p, epoch);
}

// ---------------------------------------------------------------------------------------------------------
// combine
//
// Row blocks: the rows rank d received from source s are [lo, hi) of d's receive order (lo, hi from
// rank_prefix_matrix), sorted by source token. They are returned in blocks of chunk_tokens(n_s) rows
// (n_s = s's token count, so there are at most kMaxChunks blocks); block b's flag is
// combine_flags[d][b] in s's header. A reducer on s learns which blocks hold the rows of its token chunk from
// send_pos (the row of its token t at d), so neither side searches.

constexpr int kCombineThreads = 512;  // 16 warps: 128 registers per thread for the reducer's loads in flight
constexpr int kCombineWarps = kCombineThreads / 32;

// Block 0 tells every peer where this rank's combine input is (IntranodeLayout::CombineInputDesc), epoch last. The
// input was written before this kernel (stream order); the system-scope fence makes those writes visible to peers
// that acquire the epoch.
__device__ __forceinline__ void publish_combine_input(const CombineParams& p, uint64_t epoch) {
  if (blockIdx.x != 0 || threadIdx.x >= p.num_ranks || threadIdx.x == p.rank) return;
  L::CombineInputDesc* d = at<L::CombineInputDesc>(p.window, threadIdx.x, L::in_desc(p.rank));
  d->x = p.in_pool ? p.in_x : -1;
  d->topk_weights = p.in_pool ? p.in_topk_weights : -1;
  ptx::fence_acq_rel_sys();
  ptx::st_release_sys(&d->epoch, epoch);
}

// Where a reducer reads peer d's rows: straight from d's window-backed input (pull) or from my stage part for d.
struct CombineSource {
  const uint16_t* x;    // d's combine input in d's window, or null: d pushed into my stage
  const float* topk_weights;
};

// Thread d of the block waits for peer d's CombineInputDesc of this round and resolves it against d's window.
// Returns false on timeout (recorded). Threads without a peer return true with a null source.
__device__ __forceinline__ bool read_combine_source(const CombineParams& p, uint64_t epoch, CombineSource& src) {
  const int d = threadIdx.x;
  src = CombineSource{nullptr, nullptr};
  if (d >= p.num_ranks || d == p.rank) return true;
  L::CombineInputDesc* desc = at<L::CombineInputDesc>(p.window, p.rank, L::in_desc(d));
  if (!device::wait_geq(p.wait, &desc->epoch, epoch, d, Phase::kCombineData)) return false;
  const volatile L::CombineInputDesc* v = desc;
  if (v->x < 0) return true;
  char* base = p.window.peer_bases[d];
  src.x = reinterpret_cast<const uint16_t*>(base + v->x);
  src.topk_weights = v->topk_weights >= 0 ? reinterpret_cast<const float*>(base + v->topk_weights) : nullptr;
  return true;
}

__device__ void combine_sender(const CombineParams& p, uint64_t epoch) {
  const int R = p.num_ranks, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_int4 = p.hidden * 2 / 16;
  const int num_pairs = (R - 1) * L::kMaxChunks;  // (block, source) pairs, block-major: early tokens first
  for (int q = blockIdx.x; q < num_pairs; q += p.num_senders) {
    const int b = q / (R - 1), si = q % (R - 1), s = si < p.rank ? si : si + 1;
    const int lo = rows_before(p.rank_prefix_matrix, R, s, p.rank);
    const int hi = p.rank_prefix_matrix[s * R + p.rank];
    const int block_rows = L::chunk_tokens(p.num_tokens_per_src[s]);
    const int r0 = lo + b * block_rows, r1 = min(hi, r0 + block_rows);
    if (r0 >= hi) continue;  // uniform across the block
    char* dst_region = region(p.window, s);
    for (int row = r0 + warp; row < r1; row += kCombineWarps) {
      if (p.num_rounds > 1) {  // only then can a row belong to another round
        const int t = p.recv_src_idx[row];
        if (t < p.tok_lo || t >= p.tok_hi) continue;
      }
      char* slot = dst_region + L::combine_stage(L::peer_slot(p.rank, s), L::combine_slot(row - lo, p.stage_rows),
                                                 p.stage_rows, p.record_bytes);
      device::copy_warp<device::Source::kInput>(reinterpret_cast<int4*>(slot),
                                                reinterpret_cast<const int4*>(p.x + static_cast<int64_t>(row) * p.hidden),
                                                row_int4, lane);
      if (p.topk_weights) {
        float* w = reinterpret_cast<float*>(slot + L::align16(2 * static_cast<size_t>(p.hidden)));
        for (int k = lane; k < p.num_topk; k += 32) w[k] = p.topk_weights[static_cast<int64_t>(row) * p.num_topk + k];
      }
    }
    __syncthreads();
    if (threadIdx.x == 0)
      ptx::st_release_sys(at<uint64_t>(p.window, s, L::combine_flag(p.rank, b)), epoch);
  }
}

__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] += __uint_as_float(w[i] << 16);
    acc[2 * i + 1] += __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint32_t float_to_bf16_rne(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (u >> 16) | 0x40u;  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  int4 o;
  o.x = static_cast<int>(float_to_bf16_rne(acc[0]) | (float_to_bf16_rne(acc[1]) << 16));
  o.y = static_cast<int>(float_to_bf16_rne(acc[2]) | (float_to_bf16_rne(acc[3]) << 16));
  o.z = static_cast<int>(float_to_bf16_rne(acc[4]) | (float_to_bf16_rne(acc[5]) << 16));
  o.w = static_cast<int>(float_to_bf16_rne(acc[6]) | (float_to_bf16_rne(acc[7]) << 16));
  return o;
}

// Sums kU 16-byte columns (i, i + 32, ...) of token t's rows: rows in ascending rank order, then bias_0, then
// bias_1 (the reference order). All kU * kR row loads are issued before the first add.
template <int kR, int kU>
__device__ __forceinline__ void reduce_columns(const int4* const (&src)[kR], const int4* b0, const int4* b1,
                                               int4* out, int i, int own) {
  int4 v[kU][kR];
#pragma unroll
  for (int u = 0; u < kU; ++u)
#pragma unroll
    for (int d = 0; d < kR; ++d)
      if (src[d]) v[u][d] = d == own ? ptx::ld_nc_no_allocate(src[d] + i + 32 * u) : ptx::ld_cg(src[d] + i + 32 * u);
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int d = 0; d < kR; ++d)
      if (src[d]) accumulate_bf16x8(acc, v[u][d]);
    if (b0) accumulate_bf16x8(acc, b0[i + 32 * u]);
    if (b1) accumulate_bf16x8(acc, b1[i + 32 * u]);
    ptx::st_no_allocate(out + i + 32 * u, pack_bf16x8(acc));
  }
}

// One warp reduces token t. kR >= num_ranks is a compile-time bound so the row pointers stay in registers.
// lo[d]: the first row at peer d of my tokens (rows_before(me, d)); stage slots are relative to it.
// pull[d]: peer d's window-backed input (its rows at their receive rows send_pos[t][d]), or null x (my stage).
template <int kR>
__device__ __forceinline__ void reduce_token(const CombineParams& p, const char* my_region, const int (&lo)[kR],
                                             const CombineSource (&pull)[kR], int t, int lane) {
  constexpr int kU = kR >= 8 ? 1 : 8 / kR;  // 8 row loads in flight per lane
  const int R = p.num_ranks, row_int4 = p.hidden / 8;
  const int4* src[kR];
  const float* wsrc[kR];
#pragma unroll
  for (int d = 0; d < kR; ++d) {
    const int pos = d < R ? p.send_pos[static_cast<int64_t>(t) * R + d] : -1;
    // Own rows and pulled rows are read at their receive row in the input; pushed rows from my stage part.
    const uint16_t* in_x = d == p.rank ? p.x : pull[d].x;
    const float* in_w = d == p.rank ? p.topk_weights : pull[d].topk_weights;
    const char* slot = in_x || pos < 0 ? nullptr
                                       : my_region + L::combine_stage(L::peer_slot(d, p.rank),
                                                                      L::combine_slot(pos - lo[d], p.stage_rows),
                                                                      p.stage_rows, p.record_bytes);
    src[d] = pos < 0 ? nullptr
             : in_x  ? reinterpret_cast<const int4*>(in_x + static_cast<int64_t>(pos) * p.hidden)
                     : reinterpret_cast<const int4*>(slot);
    wsrc[d] = pos < 0 || p.num_topk == 0 ? nullptr
              : in_x ? in_w + static_cast<int64_t>(pos) * p.num_topk
                     : reinterpret_cast<const float*>(slot + L::align16(2 * static_cast<size_t>(p.hidden)));
  }
  const int4* b0 = p.bias_0 ? reinterpret_cast<const int4*>(p.bias_0 + static_cast<int64_t>(t) * p.hidden) : nullptr;
  const int4* b1 = p.bias_1 ? reinterpret_cast<const int4*>(p.bias_1 + static_cast<int64_t>(t) * p.hidden) : nullptr;
  int4* out = reinterpret_cast<int4*>(p.combined_x + static_cast<int64_t>(t) * p.hidden);
  int i = lane;
  for (; i + 32 * (kU - 1) < row_int4; i += 32 * kU) reduce_columns<kR, kU>(src, b0, b1, out, i, p.rank);
  for (; i < row_int4; i += 32) reduce_columns<kR, 1>(src, b0, b1, out, i, p.rank);
  if (p.combined_topk_weights) {
    for (int k = lane; k < p.num_topk; k += 32) {
      float acc = 0.f;
#pragma unroll
      for (int d = 0; d < kR; ++d)
        if (wsrc[d]) acc += d == p.rank ? wsrc[d][k] : __ldcg(wsrc[d] + k);
      p.combined_topk_weights[static_cast<int64_t>(t) * p.num_topk + k] = acc;
    }
  }
}

// One warp waits until peer d has returned every row of my tokens [t0, t1): finds the first and last such
// row at d from send_pos and waits for the row blocks between them. Returns false on timeout or error.
__device__ __forceinline__ bool wait_returned_rows(const CombineParams& p, int d, int t0, int t1, uint64_t epoch,
                                                   int lane) {
  const int R = p.num_ranks;
  int first = INT_MAX, last = -1;
  for (int t = t0 + lane; t < t1; t += 32) {
    const int pos = p.send_pos[static_cast<int64_t>(t) * R + d];
    if (pos >= 0) first = min(first, pos), last = max(last, pos);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
    last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
  }
  if (last < 0) return true;  // none of these tokens went to d
  const int lo = rows_before(p.rank_prefix_matrix, R, p.rank, d);
  const int block_rows = L::chunk_tokens(p.num_tokens);
  const int b0 = (first - lo) / block_rows, b1 = (last - lo) / block_rows;
  bool ok = true;
  for (int b = b0 + lane; b <= b1; b += 32)
    if (!device::wait_geq(p.wait, at<uint64_t>(p.window, p.rank, L::combine_flag(d, b)), epoch, d, Phase::kCombineData))
      ok = false;
  return __all_sync(0xffffffffu, ok);
}

// Returns false on a timeout (recorded).
template <int kR>
__device__ bool combine_reducer(const CombineParams& p, uint64_t epoch) {
  __shared__ int s_failed;
  __shared__ CombineSource s_pull[L::kMaxRanks];
  const int R = p.num_ranks, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int reducer = blockIdx.x - p.num_senders, num_reducers = gridDim.x - p.num_senders;
  const int chunk = L::chunk_tokens(p.num_tokens), num_chunks = L::num_chunks(p.num_tokens);
  const char* my_region = region(p.window, p.rank);
  int lo[kR];
#pragma unroll
  for (int d = 0; d < kR; ++d) lo[d] = d < R ? rows_before(p.rank_prefix_matrix, R, p.rank, d) : 0;
  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  if (threadIdx.x < L::kMaxRanks) {
    CombineSource src;
    if (!read_combine_source(p, epoch, src)) s_failed = 1;
    s_pull[threadIdx.x] = src;
  }
  __syncthreads();
  if (s_failed) return false;
  CombineSource pull[kR];
#pragma unroll
  for (int d = 0; d < kR; ++d) pull[d] = d < L::kMaxRanks ? s_pull[d] : CombineSource{nullptr, nullptr};
  for (int c = reducer; c < num_chunks; c += num_reducers) {
    const int t0 = max(c * chunk, p.tok_lo), t1 = min(min(p.num_tokens, c * chunk + chunk), p.tok_hi);
    if (t0 >= t1) continue;  // outside this round (uniform across the block)
    if (warp < R && warp != p.rank && !s_pull[warp].x && !wait_returned_rows(p, warp, t0, t1, epoch, lane) &&
        lane == 0)
      s_failed = 1;
    __syncthreads();
    if (s_failed) return false;
    for (int t = t0 + warp; t < t1; t += kCombineWarps) reduce_token<kR>(p, my_region, lo, pull, t, lane);
  }
  return true;
}

// Every block, at the end of the kernel: the last one (all this rank's reads of peers' inputs are done) tells every
// peer so in the last round, and when this rank's input is window-backed it waits until every peer has said the
// same (bounded, recorded on timeout), so the caller may reuse the input once the kernel is over.
__device__ __forceinline__ void finish_combine(const CombineParams& p, uint64_t epoch) {
  if (p.round != p.num_rounds - 1 || p.num_ranks == 1) return;
  if (!device::last_block<true>(p.ticket)) return;
  const int d = threadIdx.x;
  if (d >= p.num_ranks || d == p.rank) return;
  ptx::st_release_sys(at<uint64_t>(p.window, d, L::combine_done(p.rank)), epoch);
  if (p.in_pool)
    device::wait_geq(p.wait, at<uint64_t>(p.window, p.rank, L::combine_done(d)), epoch, d, Phase::kCombineData);
}

// True when this launch's rounds hold every pair's rows (the same answer on every rank: the matrix and the token
// counts are the handle's). One round: every pair's rows fit a stage part. Several: each round's token span fits a
// part (so do its rows) and the rounds cover every rank's tokens. One thread per block calls it.
__device__ __forceinline__ bool combine_fits(const CombineParams& p) {
  const int R = p.num_ranks;
  if (R == 1) return true;
  if (p.num_rounds > 1) {
    const int64_t span = static_cast<int64_t>(p.tok_hi) - p.tok_lo;
    for (int s = 0; s < R; ++s) {
      const int n = p.num_tokens_per_src[s];
      if (span > p.stage_rows || static_cast<int64_t>(p.num_rounds) * span < n) {
        if (blockIdx.x == 0)
          device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, s, Phase::kCombineData,
                               static_cast<int64_t>(p.num_rounds) * min(span, p.stage_rows), n);
        return false;
      }
    }
    return true;
  }
  for (int s = 0; s < R; ++s)
    for (int d = 0; d < R; ++d) {
      const int rows = s == d ? 0 : pair_rows(p.rank_prefix_matrix, R, s, d);
      if (rows > p.stage_rows) {
        if (blockIdx.x == 0)
          device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, s, Phase::kCombineData, p.stage_rows, rows);
        return false;
      }
    }
  return true;
}

template <int kR>
__global__ void __launch_bounds__(kCombineThreads, 1) intranode_combine_kernel(const __grid_constant__ CombineParams p) {
  if (device::error_recorded(p.wait)) return;  // see intranode_dispatch_kernel
  __shared__ int s_fit;
  if (threadIdx.x == 0) s_fit = combine_fits(p);
  __syncthreads();
  if (!s_fit) return;
  const uint64_t epoch = *p.op_epoch;
  publish_combine_input(p, epoch);
  if (blockIdx.x < p.num_senders) combine_sender(p, epoch);
  else if (!combine_reducer<kR>(p, epoch)) return;  // timed out (recorded): this Buffer refuses further work
  finish_combine(p, epoch);
}

}  // namespace

void launch_intranode_prepare(const PrepareParams& p, cudaStream_t stream) {
  intranode_prepare_kernel<<<1, kPrepareThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_intranode_dispatch(const DispatchParams& p, int num_blocks, cudaStream_t stream) {
  OPENEP_CHECK(p.num_senders >= 1 && p.num_senders < num_blocks, ErrorCode::kInternal, "dispatch with ",
               p.num_senders, " senders of ", num_blocks, " blocks");
  intranode_dispatch_kernel<<<num_blocks, kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_intranode_combine(const CombineParams& p, int num_blocks, cudaStream_t stream) {
  OPENEP_CHECK((p.num_senders >= 1 || p.in_pool) && p.num_senders >= 0 && p.num_senders < num_blocks,
               ErrorCode::kInternal, "combine with ", p.num_senders, " senders of ", num_blocks, " blocks");
  if (p.num_ranks <= 2) intranode_combine_kernel<2><<<num_blocks, kCombineThreads, 0, stream>>>(p);
  else if (p.num_ranks <= 4) intranode_combine_kernel<4><<<num_blocks, kCombineThreads, 0, stream>>>(p);
  else intranode_combine_kernel<8><<<num_blocks, kCombineThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void list_intranode_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&intranode_prepare_kernel), "intranode_prepare_kernel"});
  out.push_back({reinterpret_cast<const void*>(&intranode_dispatch_kernel), "intranode_dispatch_kernel"});
  out.push_back({reinterpret_cast<const void*>(&intranode_combine_kernel<2>), "intranode_combine_kernel<2>"});
  out.push_back({reinterpret_cast<const void*>(&intranode_combine_kernel<4>), "intranode_combine_kernel<4>"});
  out.push_back({reinterpret_cast<const void*>(&intranode_combine_kernel<8>), "intranode_combine_kernel<8>"});
}

}  // namespace openep::detail
