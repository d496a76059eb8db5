// Internode normal-mode kernels (docs/INTERNODE.md has the protocol and protocol/internode_layout.hpp the memory).
//
// One dispatch, on every rank (names: me = (node, local), M ranks per node, N nodes):
//   begin    dispatch epoch d += 1.
//   plan     (exact / worst-case) send_pos[t][r], send_rdma_head[t][m] (index of token t among my records to
//            node m, or -1), and my header for every node m into the rail header buffer.
//   [rail]   headers to / from my rail peers (the host-driven network leg, runtime/rail.hpp).
//   count    waits until every node peer drained dispatch d-1, writes the headers of my sources (n, local) into
//            every node peer's window, releases header_ready; waits for every node peer's headers, then computes
//            node_prefix, recv_gbl_rank_prefix_sum, recv_rdma_rank_prefix_sum, per-expert counts (and, in exact
//            mode, publishes them to mapped host memory, which the host waits for).
//   pack     every record of my tokens into rail half A (own node included: it is forwarded like any other).
//   [rail]   records to / from my rail peers (half A -> half B).
//   forward  (me as forwarder of sources (n, local)) waits until every node peer drained d-1, then writes each
//            record into the final receive row of every node rank j that needs it: node_prefix[s][j] + pos[j],
//            with top-k localised for j; releases dispatch_ready[local] in every node peer.
//   drain    waits for dispatch_ready of every forwarder of my node, copies the rows to the caller's outputs and
//            releases `drained`.
// One combine:
//   begin    combine epoch c += 1.
//   send     waits until every node peer reduced c-1, writes each received row into the combine stage of the
//            forwarder it came through (slot (flat record, my local rank)); releases combine_ready.
//   reduce   (me as forwarder) waits for combine_ready of every node peer, sums each record's rows over the node
//            ranks in ascending order in fp32, rounds to BF16 (weights stay fp32) into rail half B (own node:
//            half A directly); releases `reduced`.
//   [rail]   partials back to the source nodes (half B -> half A).
//   final    sums the partials of each token over nodes in ascending order in fp32, adds bias_0 and bias_1.
// Waits are bounded (device/wait.cuh) and name rank, peer and phase. Nothing is reset; every flag is an epoch.
#include <climits>

#include "device/copy.cuh"
#include "device/ticket.cuh"
#include "device/wait.cuh"
#include "kernels/load.hpp"
#include "kernels/internode_launch.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

constexpr int kPlanThreads = 512;
constexpr int kCountThreads = 1024;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
using NL = InternodeNvlLayout;

__device__ __forceinline__ char* node_region(const InternodeNodeRef& n, int l) { return n.peer_bases[l] + n.nvl_offset; }
template <typename T>
__device__ __forceinline__ T* node_slot(const InternodeNodeRef& n, int l, size_t offset) {
  return reinterpret_cast<T*>(node_region(n, l) + offset);
}

// Every thread l < M of the block waits until node peer l's flag at `offset` (in the peer's own window when
// `remote`, else in mine at slot l) reaches target. Returns false on every thread if one wait failed.
__device__ bool wait_node_flags(const InternodeNodeRef& n, const WaitContext& w, bool remote, size_t own_offset,
                                size_t (*slot)(int), uint64_t target, Phase phase) {
  __shared__ int s_failed;
  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  const int l = threadIdx.x;
  if (l < n.ranks_per_node && target > 0) {
    const uint64_t* f = remote ? node_slot<const uint64_t>(n, l, own_offset)
                               : node_slot<const uint64_t>(n, n.local_rank, slot(l));
    const int peer = n.node * n.ranks_per_node + l;
    if (!device::wait_geq(w, f, target, peer, phase)) s_failed = 1;
  }
  __syncthreads();
  return s_failed == 0;
}
__device__ size_t no_slot(int) { return 0; }

// Binary search: the node n with prefix[n-1] <= f < prefix[n] (inclusive prefix over N nodes).
// Records of one forward / node-reduce launch (InternodeChunk): unit u of [0, units) -> (source node m, index i of
// its records, flat record f), or false when u names no record (past a node's real count, or the own node).
struct ChunkWalk {
  const int* prefix;  // recv_rdma_rank_prefix_sum [N]
  int N, own;
  InternodeChunk part;
  int64_t span = 0;   // largest chunk of any other node (units per node)
  __device__ ChunkWalk(const int* prefix_, int N_, int own_, const InternodeChunk& part_)
      : prefix(prefix_), N(N_), own(own_), part(part_) {
    if (part.own_node) return;
    for (int m = 0; m < N; ++m) {
      if (m == own) continue;
      const EntryRange r = rail_chunk(part.slots_per_node > 0 ? part.slots_per_node : count(m), part.chunk, part.num_chunks);
      if (r.hi - r.lo > span) span = r.hi - r.lo;
    }
  }
  __device__ int count(int m) const { return prefix[m] - (m > 0 ? prefix[m - 1] : 0); }
  __device__ int64_t units() const { return part.own_node ? count(own) : span * N; }
  __device__ bool record(int64_t u, int* m, int* i, int* f) const {
    if (part.own_node) {
      *m = own, *i = static_cast<int>(u);
    } else {
      *m = static_cast<int>(u / span);
      if (*m == own) return false;
      const EntryRange r = rail_chunk(part.slots_per_node > 0 ? part.slots_per_node : count(*m), part.chunk, part.num_chunks);
      const int64_t e = r.lo + u % span;
      if (e >= r.hi || e >= count(*m)) return false;
      *i = static_cast<int>(e);
    }
    *f = (*m > 0 ? prefix[*m - 1] : 0) + *i;
    return true;
  }
};

// Exclusive prefix over the block of one flag per thread (blockDim.x == kPlanThreads); returns the total.
__device__ __forceinline__ int block_scan_flags(bool flag, int* s_warp, int& exclusive) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, total = 0;
  for (int w = 0; w < kPlanThreads / 32; ++w) {
    const int c = s_warp[w];
    if (w < warp) before += c;
    total += c;
  }
  exclusive = before + in_warp;
  return total;
}

// ---------------------------------------------------------------------------------------------------------
__global__ void internode_begin_kernel(uint64_t* epoch) { *epoch += 1; }

// Block b < R: column b of is_token_in_rank -> send_pos; block R + m: node m -> send_rdma_head, header m.
__global__ void __launch_bounds__(kPlanThreads) internode_plan_kernel(const __grid_constant__ InternodePlanParams p) {
  if (device::error_recorded(p.wait)) return;
  __shared__ int s_warp[kPlanThreads / 32];
  const int R = p.num_ranks, M = p.ranks_per_node, N = p.num_nodes, T = p.num_tokens;
  const bool is_node = blockIdx.x >= static_cast<unsigned>(R);
  const int col = is_node ? blockIdx.x - R : blockIdx.x;
  int running = 0;
  for (int t0 = 0; t0 < T; t0 += kPlanThreads) {
    const int t = t0 + threadIdx.x;
    bool flag = false;
    if (t < T) {
      const bool* row = p.is_token_in_rank + static_cast<int64_t>(t) * R;
      if (is_node) {
        for (int j = 0; j < M; ++j) flag |= row[col * M + j];
      } else {
        flag = row[col];
      }
    }
    int excl = 0;
    const int total = block_scan_flags(flag, s_warp, excl);
    if (t < T) {
      const int v = flag ? running + excl : -1;
      if (is_node) p.send_rdma_head[static_cast<int64_t>(t) * N + col] = v;
      else p.send_pos[static_cast<int64_t>(t) * R + col] = v;
    }
    running += total;
  }
  if (threadIdx.x == 0) {
    const int want = is_node ? p.num_tokens_per_rdma_rank[col] : p.num_tokens_per_rank[col];
    if (want != running)
      device::record_error(p.wait, DeviceErrorCode::kInconsistentLayout, is_node ? -1 - col : col, Phase::kDispatchCounts,
                           want, running);
  }
  if (!is_node) return;
  // Header for node `col`: records, tokens per rank of the node, tokens per expert of the node.
  int32_t* h = p.header_send + static_cast<int64_t>(col) * p.header_ints;
  const int El = p.experts_per_rank;
  for (int i = threadIdx.x; i < p.header_ints; i += blockDim.x) {
    int v;
    if (i == 0) v = p.num_tokens_per_rdma_rank[col];
    else if (i <= M) v = p.num_tokens_per_rank[col * M + i - 1];
    else v = p.num_tokens_per_expert[static_cast<int64_t>(col) * M * El + (i - 1 - M)];
    h[i] = v;
  }
}

// One block. See the file comment (count).
__global__ void __launch_bounds__(kCountThreads, 1) internode_count_kernel(const __grid_constant__ InternodeCountParams p) {
  if (device::error_recorded(p.wait)) return;
  const InternodeNodeRef& n = p.node;
  const int M = n.ranks_per_node, N = n.num_nodes, R = p.num_ranks, me_l = n.local_rank;
  const int me = n.node * M + me_l;
  const uint64_t d = *p.epoch;
  // 1. Every node peer has read its headers of dispatch d-1 (it drained d-1).
  if (!wait_node_flags(n, p.wait, true, NL::drained(), no_slot, d - 1, Phase::kDispatchCounts)) return;
  // 2. Headers of my sources (src node m, my local rank) into every node peer's window.
  const int H = p.header_ints;
  const int64_t total = static_cast<int64_t>(N) * M * H;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int m = static_cast<int>(i / (static_cast<int64_t>(M) * H));
    const int j = static_cast<int>((i / H) % M);
    const int k = static_cast<int>(i % H);
    const int32_t* src = (m == n.node ? p.header_send + static_cast<int64_t>(n.node) * H
                                      : p.header_recv + static_cast<int64_t>(m) * H);
    node_slot<int32_t>(n, j, n.layout.header(m * M + me_l))[k] = src[k];
  }
  __syncthreads();
  if (threadIdx.x < M) {
    ptx::fence_acq_rel_sys();
    ptx::st_release_sys(node_slot<uint64_t>(n, threadIdx.x, NL::header_ready(me_l)), d);
  }
  // 3. Every node peer's headers are here.
  if (!wait_node_flags(n, p.wait, false, 0, NL::header_ready, d, Phase::kDispatchCounts)) return;
  const auto hdr = [&](int s, int k) {
    return ptx::ld_cg(node_slot<const int32_t>(n, me_l, n.layout.header(s)) + k);
  };
  __shared__ int s_num_recv, s_records;
  const int El = p.experts_per_rank;
  if (threadIdx.x < M) {
    const int j = threadIdx.x;
    int run = 0;
    for (int s = 0; s < R; ++s) {
      p.node_prefix[s * M + j] = run;
      run += hdr(s, 1 + j);
      if (j == me_l) p.recv_gbl_rank_prefix_sum[s] = run;
    }
    if (j == me_l) s_num_recv = run;
  }
  if (threadIdx.x == 32) {
    int run = 0;
    for (int m = 0; m < N; ++m) {
      const int c = hdr(m * M + me_l, 0);
      if (p.host) p.host->rdma_recv[m] = c;
      if (p.host) p.host->rdma_send[m] = p.num_tokens_per_rdma_rank[m];
      run += c;
      p.recv_rdma_rank_prefix_sum[m] = run;
    }
    s_records = run;
  }
  for (int e = threadIdx.x; e < El; e += blockDim.x) {
    int c = 0;
    for (int s = 0; s < R; ++s) c += hdr(s, 1 + M + me_l * El + e);
    const int a = p.expert_alignment;
    c = (c + a - 1) / a * a;
    if (p.num_recv_tokens_per_expert) p.num_recv_tokens_per_expert[e] = c;
    if (p.host) p.host->num_recv_tokens_per_expert[e] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int rows = s_num_recv, records = s_records;
    if (p.num_worst_tokens > 0 && rows > p.num_worst_tokens)
      device::record_error(p.wait, DeviceErrorCode::kWorstTokensExceeded, -1, Phase::kDispatchCounts, p.num_worst_tokens,
                           rows);
    if (rows > p.dispatch_capacity)
      device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, -1, Phase::kDispatchCounts, p.dispatch_capacity,
                           rows);
    if (records > p.combine_capacity)
      device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, -1, Phase::kDispatchCounts, p.combine_capacity,
                           records);
    if (p.host) {
      p.host->num_recv_tokens = rows;
      p.host->num_rdma_recv_tokens = records;
      __threadfence_system();
      *reinterpret_cast<volatile int64_t*>(&p.host->seq) = p.host_seq;
      __threadfence_system();
    }
  }
  (void)me;
}

// Warp per token: one record per destination node.
__global__ void __launch_bounds__(kThreads) internode_pack_kernel(const __grid_constant__ InternodePackParams p) {
  if (device::error_recorded(p.wait)) return;
  const int lane = threadIdx.x & 31;
  const int N = p.num_nodes, M = p.ranks_per_node, R = p.num_ranks, K = p.num_topk, S = p.num_scales;
  const int row_int4 = p.row_bytes / 16;
  const size_t meta_off = align_up(static_cast<size_t>(p.row_bytes), 16);
  for (int t = blockIdx.x * kWarps + threadIdx.x / 32; t < p.num_tokens; t += gridDim.x * kWarps) {
    const int4* src = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + static_cast<int64_t>(t) * p.row_bytes);
    for (int m = 0; m < N; ++m) {
      const int h = p.send_rdma_head[static_cast<int64_t>(t) * N + m];
      if (h < 0) continue;
      char* rec = p.rail + p.rail_layout.a(p.bases.send[m] + h, p.record_bytes);
      device::copy_warp<device::Source::kInput>(reinterpret_cast<int4*>(rec), src, row_int4, lane);
      int32_t* meta = reinterpret_cast<int32_t*>(rec + meta_off);
      if (lane == 0) meta[0] = t;
      if (lane < M) meta[1 + lane] = p.send_pos[static_cast<int64_t>(t) * R + m * M + lane];
      for (int k = lane; k < K; k += 32) {
        const int64_t i = static_cast<int64_t>(t) * K + k;
        const int64_t e = p.topk_int64 ? static_cast<const int64_t*>(p.topk_idx)[i]
                                       : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_idx)[i]);
        meta[1 + M + k] = static_cast<int32_t>(e);
        reinterpret_cast<float*>(meta)[1 + M + K + k] = p.topk_weights[i];
      }
      for (int j = lane; j < S; j += 32)
        reinterpret_cast<uint32_t*>(meta)[1 + M + 2 * K + j] =
            p.x_scales[t * p.scale_token_stride + j * p.scale_hidden_stride];
    }
  }
}

// Warp per received record (me as forwarder): to the final row of every node rank that needs it.
__global__ void __launch_bounds__(kThreads) internode_forward_kernel(const __grid_constant__ InternodeForwardParams p) {
  if (device::error_recorded(p.wait)) return;
  const InternodeNodeRef& n = p.node;
  const uint64_t d = *p.epoch;
  if (!wait_node_flags(n, p.wait, true, NL::drained(), no_slot, d - 1, Phase::kDispatchData)) return;
  const int lane = threadIdx.x & 31;
  const int N = n.num_nodes, M = n.ranks_per_node, K = p.num_topk, S = p.num_scales, El = p.experts_per_rank;
  const int row_int4 = p.row_bytes / 16;
  const size_t meta_off = align_up(static_cast<size_t>(p.row_bytes), 16);
  const ChunkWalk walk(p.recv_rdma_rank_prefix_sum, N, n.node, p.part);
  const int64_t units = walk.units();
  for (int64_t u = blockIdx.x * kWarps + threadIdx.x / 32; u < units; u += gridDim.x * kWarps) {
    int m, i, f;
    if (!walk.record(u, &m, &i, &f)) continue;
    const char* rec = m == n.node ? p.rail + p.rail_layout.a(p.bases.send[m] + i, p.record_bytes)
                                  : p.rail + p.rail_layout.b(p.bases.recv[m] + i, p.record_bytes);
    const int32_t* meta = reinterpret_cast<const int32_t*>(rec + meta_off);
    const int s = m * M + n.local_rank;
    int mask = 0;
    for (int j = 0; j < M; ++j) {
      const int pos = ptx::ld_cg(meta + 1 + j);
      if (pos < 0) continue;
      const int64_t row = static_cast<int64_t>(p.node_prefix[s * M + j]) + pos;
      if (row >= p.dispatch_capacity) {
        if (lane == 0)
          device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, n.node * M + j, Phase::kDispatchData,
                               p.dispatch_capacity, row + 1);
        continue;
      }
      mask |= 1 << j;
      char* dst = node_region(n, j) + n.layout.dispatch_row(row, p.row_out_bytes);
      device::copy_warp<device::Source::kWindow>(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(rec),
                                                 row_int4, lane);
      int32_t* out = reinterpret_cast<int32_t*>(dst + meta_off);
      if (lane == 0) out[0] = ptx::ld_cg(meta), out[1] = s, out[2] = f;
      const int first = (n.node * M + j) * El;
      for (int k = lane; k < K; k += 32) {
        const int e = ptx::ld_cg(meta + 1 + M + k);
        const bool local = e >= first && e < first + El;
        out[3 + k] = local ? e - first : -1;
        const int w = ptx::ld_cg(meta + 1 + M + K + k);
        out[3 + K + k] = local ? w : 0;  // float bits; +0.0f where the expert is elsewhere
      }
      for (int q = lane; q < S; q += 32) out[3 + 2 * K + q] = ptx::ld_cg(meta + 1 + M + 2 * K + q);
    }
    if (lane == 0 && p.recv_rdma_mask) p.recv_rdma_mask[f] = mask;
  }
  if (p.part.release && device::last_block<true>(p.ticket) && threadIdx.x < M) {
    ptx::fence_acq_rel_sys();
    ptx::st_release_sys(node_slot<uint64_t>(n, threadIdx.x, NL::dispatch_ready(n.local_rank)), d);
  }
}

// Warp per receive row: window -> caller's outputs.
__global__ void __launch_bounds__(kThreads) internode_drain_kernel(const __grid_constant__ InternodeDrainParams p) {
  if (device::error_recorded(p.wait)) return;
  const InternodeNodeRef& n = p.node;
  const uint64_t d = *p.epoch;
  if (!wait_node_flags(n, p.wait, false, 0, NL::dispatch_ready, d, Phase::kDispatchData)) return;
  const int lane = threadIdx.x & 31;
  const int K = p.num_topk, S = p.num_scales;
  const int row_int4 = p.row_bytes / 16;
  const size_t meta_off = align_up(static_cast<size_t>(p.row_bytes), 16);
  int rows = p.recv_gbl_rank_prefix_sum[p.num_ranks - 1];
  if (p.num_worst_tokens > 0 && rows > p.num_worst_tokens) rows = p.num_worst_tokens;  // error already recorded
  const char* base = node_region(n, n.local_rank);
  for (int q = blockIdx.x * kWarps + threadIdx.x / 32; q < rows; q += gridDim.x * kWarps) {
    const char* src = base + n.layout.dispatch_row(q, p.row_out_bytes);
    device::copy_warp<device::Source::kWindow>(
        reinterpret_cast<int4*>(static_cast<char*>(p.recv_x) + static_cast<int64_t>(q) * p.row_bytes),
        reinterpret_cast<const int4*>(src), row_int4, lane);
    const int32_t* meta = reinterpret_cast<const int32_t*>(src + meta_off);
    if (lane == 0 && p.recv_src_idx) p.recv_src_idx[q] = ptx::ld_cg(meta);
    if (lane < 2 && p.recv_src_meta) p.recv_src_meta[2 * static_cast<int64_t>(q) + lane] = ptx::ld_cg(meta + 1 + lane);
    if (p.recv_topk_idx) {
      for (int k = lane; k < K; k += 32) {
        const int e = ptx::ld_cg(meta + 3 + k);
        const int64_t i = static_cast<int64_t>(q) * K + k;
        if (p.topk_int64) static_cast<int64_t*>(p.recv_topk_idx)[i] = e;
        else static_cast<int32_t*>(p.recv_topk_idx)[i] = e;
        p.recv_topk_weights[i] = __int_as_float(ptx::ld_cg(meta + 3 + K + k));
      }
    }
    for (int j = lane; j < S; j += 32)
      p.recv_x_scales[static_cast<int64_t>(q) * S + j] = static_cast<uint32_t>(ptx::ld_cg(meta + 3 + 2 * K + j));
  }
  // Worst-case mode: rows past the real count get topk_idx = -1 (weights 0) and no source.
  if (p.num_worst_tokens > 0) {
    const int stride = gridDim.x * blockDim.x;
    for (int q = rows + blockIdx.x * blockDim.x + threadIdx.x; q < p.num_worst_tokens; q += stride) {
      if (p.recv_src_idx) p.recv_src_idx[q] = -1;
      if (p.recv_src_meta) p.recv_src_meta[2 * static_cast<int64_t>(q)] = -1, p.recv_src_meta[2 * static_cast<int64_t>(q) + 1] = -1;
      if (p.recv_topk_idx)
        for (int k = 0; k < K; ++k) {
          const int64_t i = static_cast<int64_t>(q) * K + k;
          if (p.topk_int64) static_cast<int64_t*>(p.recv_topk_idx)[i] = -1;
          else static_cast<int32_t*>(p.recv_topk_idx)[i] = -1;
          p.recv_topk_weights[i] = 0.0f;
        }
    }
  }
  if (device::last_block<true>(p.ticket) && threadIdx.x == 0)
    ptx::st_release_sys(node_slot<uint64_t>(n, n.local_rank, NL::drained()), d);
}

// Warp per received row: back to the combine stage of the forwarder it came through.
__global__ void __launch_bounds__(kThreads) internode_combine_send_kernel(const __grid_constant__ InternodeCombineSendParams p) {
  if (device::error_recorded(p.wait)) return;
  const InternodeNodeRef& n = p.node;
  const uint64_t c = *p.epoch;
  if (!wait_node_flags(n, p.wait, true, NL::reduced(), no_slot, c - 1, Phase::kCombineData)) return;
  const int lane = threadIdx.x & 31, M = n.ranks_per_node, K = p.num_topk;
  const int row_int4 = p.hidden / 8;
  const size_t w_off = align_up(2 * static_cast<size_t>(p.hidden), 16);
  const int rows = p.recv_gbl_rank_prefix_sum[p.num_ranks - 1];
  for (int q = blockIdx.x * kWarps + threadIdx.x / 32; q < rows; q += gridDim.x * kWarps) {
    const int s = p.recv_src_meta[2 * static_cast<int64_t>(q)], f = p.recv_src_meta[2 * static_cast<int64_t>(q) + 1];
    if (f < 0 || f >= p.combine_capacity || s < 0) {
      if (lane == 0)
        device::record_error(p.wait, DeviceErrorCode::kCapacityExceeded, s, Phase::kCombineData, p.combine_capacity, f);
      continue;
    }
    char* dst = node_region(n, s % M) + n.layout.combine_slot(f, n.local_rank, M, p.entry_bytes);
    device::copy_warp<device::Source::kInput>(reinterpret_cast<int4*>(dst),
                                              reinterpret_cast<const int4*>(p.x + static_cast<int64_t>(q) * p.hidden),
                                              row_int4, lane);
    if (p.topk_weights)
      for (int k = lane; k < K; k += 32)
        reinterpret_cast<float*>(dst + w_off)[k] = p.topk_weights[static_cast<int64_t>(q) * K + k];
  }
  if (device::last_block<true>(p.ticket) && threadIdx.x < M) {
    ptx::fence_acq_rel_sys();
    ptx::st_release_sys(node_slot<uint64_t>(n, threadIdx.x, NL::combine_ready(n.local_rank)), c);
  }
}

__device__ __forceinline__ void add_bf16x8(float* acc, const int4& v) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                         static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    acc[2 * q] = __fadd_rn(acc[2 * q], __uint_as_float(w[q] << 16));
    acc[2 * q + 1] = __fadd_rn(acc[2 * q + 1], __uint_as_float(w[q] & 0xFFFF0000u));
  }
}
__device__ __forceinline__ int4 to_bf16x8(const float* acc) {
  uint32_t out[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * q]));
    const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * q + 1]));
    out[q] = lo | (hi << 16);
  }
  return make_int4(static_cast<int>(out[0]), static_cast<int>(out[1]), static_cast<int>(out[2]), static_cast<int>(out[3]));
}

// Warp per record (me as forwarder): the node partial, rounded to BF16, into the rail buffer.
__global__ void __launch_bounds__(kThreads) internode_node_reduce_kernel(const __grid_constant__ InternodeNodeReduceParams p) {
  if (device::error_recorded(p.wait)) return;
  const InternodeNodeRef& n = p.node;
  const uint64_t c = *p.epoch;
  if (!wait_node_flags(n, p.wait, false, 0, NL::combine_ready, c, Phase::kCombineData)) return;
  const int lane = threadIdx.x & 31, M = n.ranks_per_node, N = n.num_nodes, K = p.num_topk;
  const int row_int4 = p.hidden / 8;
  const size_t w_off = align_up(2 * static_cast<size_t>(p.hidden), 16);
  const char* stage = node_region(n, n.local_rank);
  const ChunkWalk walk(p.recv_rdma_rank_prefix_sum, N, n.node, p.part);
  const int64_t units = walk.units();
  for (int64_t u = blockIdx.x * kWarps + threadIdx.x / 32; u < units; u += gridDim.x * kWarps) {
    int m, i, f;
    if (!walk.record(u, &m, &i, &f)) continue;
    char* dst = m == n.node ? p.rail + p.rail_layout.a(p.bases.send[m] + i, p.entry_bytes)
                            : p.rail + p.rail_layout.b(p.bases.recv[m] + i, p.entry_bytes);
    const int mask = p.recv_rdma_mask[f];
    for (int col = lane; col < row_int4; col += 32) {
      float acc[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
      for (int j = 0; j < M; ++j)
        if (mask & (1 << j))
          add_bf16x8(acc, ptx::ld_cg(reinterpret_cast<const int4*>(stage + n.layout.combine_slot(f, j, M, p.entry_bytes)) + col));
      reinterpret_cast<int4*>(dst)[col] = to_bf16x8(acc);
    }
    for (int k = lane; k < K; k += 32) {
      float w = 0.0f;
      for (int j = 0; j < M; ++j)
        if (mask & (1 << j))
          w = __fadd_rn(w, __int_as_float(ptx::ld_cg(
                               reinterpret_cast<const int32_t*>(stage + n.layout.combine_slot(f, j, M, p.entry_bytes) + w_off) + k)));
      reinterpret_cast<float*>(dst + w_off)[k] = w;
    }
  }
  if (p.part.release && device::last_block<true>(p.ticket) && threadIdx.x == 0)
    ptx::st_release_sys(node_slot<uint64_t>(n, n.local_rank, NL::reduced()), c);
}

// Warp per token: sum of the node partials in ascending node order, then the biases.
__global__ void __launch_bounds__(kThreads) internode_combine_final_kernel(const __grid_constant__ InternodeCombineFinalParams p) {
  if (device::error_recorded(p.wait)) return;
  const int lane = threadIdx.x & 31, N = p.num_nodes, K = p.num_topk;
  const int row_int4 = p.hidden / 8;
  const size_t w_off = align_up(2 * static_cast<size_t>(p.hidden), 16);
  for (int t = blockIdx.x * kWarps + threadIdx.x / 32; t < p.num_tokens; t += gridDim.x * kWarps) {
    const int* head = p.send_rdma_head + static_cast<int64_t>(t) * N;
    for (int col = lane; col < row_int4; col += 32) {
      float acc[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = 0.0f;
      for (int m = 0; m < N; ++m) {
        const int h = head[m];
        if (h < 0) continue;
        add_bf16x8(acc, ptx::ld_cg(reinterpret_cast<const int4*>(p.rail + p.rail_layout.a(p.bases.send[m] + h, p.entry_bytes)) + col));
      }
      const int64_t o = static_cast<int64_t>(t) * row_int4 + col;
      if (p.bias_0) add_bf16x8(acc, reinterpret_cast<const int4*>(p.bias_0)[o]);
      if (p.bias_1) add_bf16x8(acc, reinterpret_cast<const int4*>(p.bias_1)[o]);
      reinterpret_cast<int4*>(p.combined_x)[o] = to_bf16x8(acc);
    }
    if (p.combined_topk_weights)
      for (int k = lane; k < K; k += 32) {
        float w = 0.0f;
        for (int m = 0; m < N; ++m) {
          const int h = head[m];
          if (h < 0) continue;
          w = __fadd_rn(w, __int_as_float(ptx::ld_cg(reinterpret_cast<const int32_t*>(
                               p.rail + p.rail_layout.a(p.bases.send[m] + h, p.entry_bytes) + w_off) + k)));
        }
        p.combined_topk_weights[static_cast<int64_t>(t) * K + k] = w;
      }
  }
}

int blocks_for(int units, int max_blocks) {
  int b = (units + kWarps - 1) / kWarps;
  if (b < 1) b = 1;
  return b < max_blocks ? b : max_blocks;
}

}  // namespace

void launch_internode_begin(uint64_t* epoch, cudaStream_t stream) {
  internode_begin_kernel<<<1, 1, 0, stream>>>(epoch);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_plan(const InternodePlanParams& p, cudaStream_t stream) {
  internode_plan_kernel<<<p.num_ranks + p.num_nodes, kPlanThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_count(const InternodeCountParams& p, cudaStream_t stream) {
  internode_count_kernel<<<1, kCountThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_pack(const InternodePackParams& p, int num_blocks, cudaStream_t stream) {
  internode_pack_kernel<<<blocks_for(p.num_tokens, num_blocks), kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
// The kernels below release flags through a last-block ticket: they always run their full grid (a fixed
// count, never derived from device data), so every block reaches the ticket.
void launch_internode_forward(const InternodeForwardParams& p, int num_blocks, cudaStream_t stream) {
  internode_forward_kernel<<<num_blocks, kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_drain(const InternodeDrainParams& p, int num_blocks, cudaStream_t stream) {
  internode_drain_kernel<<<num_blocks, kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_combine_send(const InternodeCombineSendParams& p, int num_blocks, cudaStream_t stream) {
  internode_combine_send_kernel<<<num_blocks, kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_node_reduce(const InternodeNodeReduceParams& p, int num_blocks, cudaStream_t stream) {
  internode_node_reduce_kernel<<<num_blocks, kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}
void launch_internode_combine_final(const InternodeCombineFinalParams& p, int num_blocks, cudaStream_t stream) {
  internode_combine_final_kernel<<<blocks_for(p.num_tokens, num_blocks), kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void list_internode_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&internode_begin_kernel), "internode_begin_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_plan_kernel), "internode_plan_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_count_kernel), "internode_count_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_pack_kernel), "internode_pack_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_forward_kernel), "internode_forward_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_drain_kernel), "internode_drain_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_combine_send_kernel), "internode_combine_send_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_node_reduce_kernel), "internode_node_reduce_kernel"});
  out.push_back({reinterpret_cast<const void*>(&internode_combine_final_kernel), "internode_combine_final_kernel"});
}

}  // namespace openep::detail
