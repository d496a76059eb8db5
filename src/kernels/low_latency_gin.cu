// Low-latency dispatch and combine for ranks in other nodes: NCCL GIN (network) puts and signals.
//
// NOT YET RUN ON A REAL NETWORK. The test machines have no RDMA NICs, so this file is compiled (sm_90a,
// warnings are errors) and linked into openep_core, but none of its kernels has ever executed. It is used
// only by a Buffer created with Transport::kGin (runtime/transport.hpp: a multi-node Group, low-latency mode
// and BufferOptions::allow_network); a single-node Buffer never launches anything from here, and the NVLink
// kernels (low_latency.cu) are unchanged.
//
// Design: the receive side of the NVLink path is reused as is. The GIN send kernels put the same bytes to
// the same offsets of the receiver's low-latency region (LowLatencyLayout) that the NVLink send kernels
// store there, including the flag words; the receiver first waits (bounded) for a GIN signal per source,
// then runs the unchanged NVLink receive kernel, whose own flag wait is then already satisfied. So the
// outputs and the handle are the NVLink path's, byte for byte, and the reference comparison applies as is.
// Every peer, the own rank and ranks of the same node included, goes through GIN (simplest; a mixed scheme
// with LSA stores for the node's ranks is future work).
//
// Protocol (epochs and halves exactly as in low_latency.cu; the GIN parts):
//  Contexts: every put and signal to receiver d goes on context (d mod ginContextCount), from any block, so
//    NCCL's guarantee "a signal becomes visible after the payloads of earlier puts on the same context to
//    the same peer" makes the last signal of an operation cover all its data; the receiver polls only its
//    own context.
//  dispatch send: blocks take tokens; per token the block claims slots (atomics on this rank's per-expert
//    counters), casts the row once into the staging payload row [t] and writes one routing header per
//    destination into staging [d][t] (LowLatencyGinLayout); after __syncthreads (the posting thread's
//    backend release then covers the block's staging stores) thread d posts to rank d one put of the header
//    and, where the token has an expert on d, one put of the payload, to [my rank][t] of d's dispatch half.
//    Each block flushes its puts (sources reusable), then takes the ticket (acq_rel.sys). The last block
//    stages the counts and the flag word (epoch << 32 | K << 16 | num_tokens) and puts, per destination d,
//    the counts of d's experts and then the flag with SignalAdd(dispatch signal of my rank, 1).
//  dispatch receive: gin_signal_wait_kernel (thread s polls signal "dispatch from s" on its own context until
//    it reaches the epoch, with the usual timeout naming rank, peer and phase), then the NVLink receive.
//  combine send: warps take packed rows (as the NVLink send takes (row, chunk) units): unless zero_copy the
//    warp copies the row into the zero-copy area (the put source must be in the window), then posts one put
//    of the row (warp coop) to [global expert][token] of the source rank's combine half. Flush, ticket; the
//    last block puts, per destination d, the flag word (epoch) with SignalAdd(combine signal of my rank, 1).
//  combine receive: gin_signal_wait_kernel, then the NVLink receive.
//  Barrier: every rank signals "barrier from me" to every rank (on the receiver's context, so it also
//    orders after all earlier puts to it) and waits for every rank's signal to reach the barrier epoch.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <nccl_device.h>

#include "device/gin.cuh"
#include "device/gin_wait.cuh"
#include "device/fp8.cuh"
#include "device/ptx.cuh"
#include "device/ticket.cuh"
#include "device/wait.cuh"
#include "kernels/load.hpp"
#include "kernels/low_latency_rows.cuh"
#include "kernels/low_latency_gin_launch.hpp"
#include "openep/low_latency.hpp"
#include "protocol/low_latency_gin_layout.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

using L = LowLatencyLayout;
using G = LowLatencyGinLayout;
constexpr int kThreads = 512;  // send kernels: one block per SM; fewer threads than NVLink's 1024 leave
                               // room for the GIN descriptor code's registers
static_assert(L::kHeaderBytes == sizeof(int32_t) * kMaxLowLatencyTopk, "one header int32 per top-k slot");

using device::gin_flush_cta;
using device::gin_ready;

__device__ __forceinline__ char* local_base(const GinWindow& g) {
  return static_cast<char*>(ncclGetLocalPointer(g.window, 0));
}

// ---------------------------------------------------------------------------------------------------------
// dispatch send

__device__ __forceinline__ int header_entry(const int* s_entry, const int* s_dest, int K, int k, int d) {
  return k < K && s_dest[k] == d ? s_entry[k] : -1;
}

// Claims the slots of token t and fills s_entry / s_dest / s_has (threads k < K). Same as the NVLink send.
__device__ __forceinline__ void route_token(const LowLatencyDispatchParams& p, int t, int* s_entry, int* s_dest,
                                            int* s_has) {
  const int K = p.num_topk, El = p.num_local_experts, T = p.T;
  if (threadIdx.x >= K) return;
  const int k = threadIdx.x;
  const int64_t idx = static_cast<int64_t>(t) * K + k;
  const int64_t e = p.topk_int64 ? static_cast<const int64_t*>(p.topk_idx)[idx]
                                 : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_idx)[idx]);
  int entry = -1, dest = -1;
  if (e < -1 || e >= p.num_experts) {
    device::record_error(p.wait, DeviceErrorCode::kBadExpertIndex, -1, Phase::kLowLatencyDispatch, t, e);
  } else if (e >= 0) {
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

__global__ void __launch_bounds__(kThreads, 1)
    gin_dispatch_send_kernel(const __grid_constant__ LowLatencyGinDispatchParams gp) {
  __shared__ int s_entry[kMaxLowLatencyTopk];  // (local expert << 16) | slot, or -1
  __shared__ int s_dest[kMaxLowLatencyTopk];   // owner rank of slot k's expert, or -1
  __shared__ int s_has[kMaxGinRanks];          // the token has at least one expert on rank d
  const LowLatencyDispatchParams& p = gp.base;
  const GinWindow& g = gp.gin;
  if (!gin_ready(g.dev_comm)) return;
  const ncclTeam world = ncclTeamWorld(g.dev_comm);
  const uint64_t epoch = p.state->send_epoch[0] + 1;
  const int half = static_cast<int>(epoch & 1);
  const int R = p.num_ranks, El = p.num_local_experts, K = p.num_topk, H = p.hidden, T = p.T;
  const L& layout = p.window.layout;
  const int row_bytes = p.use_fp8 ? H : 2 * H;
  const int num_scales = p.use_fp8 ? H / 128 : 0;
  const int payload_int4 = (row_bytes + num_scales * 4 + 15) / 16;
  const int header_int4 = (K + 3) / 4;  // only the first K header entries are written and read
  const int chunks = H / 8;             // int4 chunks of the BF16 row
  char* const base = local_base(g);
  const size_t stage = g.staging_offset;  // window offsets from here on

  for (int t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    for (int d = threadIdx.x; d < R; d += blockDim.x) s_has[d] = 0;
    __syncthreads();
    route_token(p, t, s_entry, s_dest, s_has);
    // Cast (or copy) the row straight into its staging payload row.
    const size_t payload_off = stage + g.staging.payload(t);
    char* payload = base + payload_off;
    const int4* xrow = reinterpret_cast<const int4*>(p.x + static_cast<size_t>(t) * H);
    if (!p.use_fp8) {
      for (int c = threadIdx.x; c < chunks; c += blockDim.x)
        reinterpret_cast<int4*>(payload)[c] = ptx::ld_nc_no_allocate(xrow + c);
    } else {
      float* scales = reinterpret_cast<float*>(payload + row_bytes);
      for (int b = 0; b < chunks; b += blockDim.x) {  // uniform trip count: shuffles see all lanes
        const int c = b + threadIdx.x;
        const bool active = c < chunks;
        const int4 v = active ? ptx::ld_nc_no_allocate(xrow + c) : make_int4(0, 0, 0, 0);
        device::cast_fp8_chunk(v, active, p.round_scale, reinterpret_cast<uint2*>(payload) + c, scales + c / 16);
      }
    }
    __syncthreads();  // s_entry / s_dest / s_has are complete
    // One routing header per destination at staging [d][t] (a token with no expert on d says so).
    for (int j = threadIdx.x; j < R * header_int4; j += blockDim.x) {
      const int d = j / header_int4, q = j - d * header_int4, k = 4 * q;
      int4* hdr = reinterpret_cast<int4*>(base + stage + g.staging.header(d, t));
      hdr[q] = make_int4(header_entry(s_entry, s_dest, K, k, d), header_entry(s_entry, s_dest, K, k + 1, d),
                         header_entry(s_entry, s_dest, K, k + 2, d), header_entry(s_entry, s_dest, K, k + 3, d));
    }
    __syncthreads();  // the staging stores of the whole block happen before the posts below
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      const ncclGin gin(g.dev_comm, d);  // context of receiver d (see the protocol)
      const size_t dst = g.region_offset + layout.dispatch_message(half, p.rank, t);  // [my rank][t] at d
      const size_t hdr = stage + g.staging.header(d, t);
      gin.put(world, d, g.window, dst, g.window, hdr, static_cast<size_t>(header_int4) * 16);
      if (s_has[d]) {
        gin.put(world, d, g.window, dst + L::kHeaderBytes, g.window, payload_off,
                static_cast<size_t>(payload_int4) * 16);
      }
    }
    __syncthreads();  // s_* are reused by the next token
  }
  gin_flush_cta(g.dev_comm);  // this block's sources may be reused once the kernel ends

  if (device::last_block<true>(&p.state->send_ticket[0])) {
    auto* counts = reinterpret_cast<int32_t*>(base + stage + G::counts_of(0, El));
    auto* flags = reinterpret_cast<uint64_t*>(base + stage + G::dispatch_flag(0));
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x)
      counts[e] = min(atomicExch(&p.state->slot_counter[e], 0), T);
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      flags[d] = (epoch << 32) | (static_cast<uint64_t>(K) << 16) | static_cast<uint64_t>(p.num_tokens);
    __syncthreads();  // staged counts and flags before the posts
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      const ncclGin gin(g.dev_comm, d);
      const size_t region = g.region_offset;
      gin.put(world, d, g.window, region + L::dispatch_count(half, p.rank * El), g.window,
              stage + G::counts_of(d, El), static_cast<size_t>(El) * 4);
      // The signal lands after the counts and every message this rank put to d (same context, same peer).
      gin.put(world, d, g.window, region + L::dispatch_flag(half, p.rank), g.window, stage + G::dispatch_flag(d),
              sizeof(uint64_t),
              ncclGin_SignalAdd{static_cast<ncclGinSignal_t>(GinSignals::dispatch(p.rank)), 1});
    }
    gin_flush_cta(g.dev_comm);
    if (threadIdx.x == 0) p.state->send_epoch[0] = epoch;
  }
}

// ---------------------------------------------------------------------------------------------------------
// combine send

// s_prefix: dynamic shared memory of E_local + 1 ints (rows of the local experts before expert i).
__global__ void __launch_bounds__(kThreads, 1)
    gin_combine_send_kernel(const __grid_constant__ LowLatencyGinCombineParams gp) {
  extern __shared__ int s_prefix[];
  const LowLatencyCombineParams& p = gp.base;
  const GinWindow& g = gp.gin;
  if (!gin_ready(g.dev_comm)) return;
  const ncclTeam world = ncclTeamWorld(g.dev_comm);
  const uint64_t epoch = p.state->send_epoch[1] + 1;
  const int half = static_cast<int>(epoch & 1);
  const int R = p.num_ranks, El = p.num_local_experts, H = p.hidden, T = p.T;
  const int RT = R * T;
  const L& layout = p.window.layout;
  const int row_int4 = H / 8;
  const size_t row_bytes = static_cast<size_t>(H) * 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  char* const base = local_base(g);
  scan_expert_rows(p.layout_range, El, R, s_prefix);
  const int rows = s_prefix[El];
  for (int q = warp * gridDim.x + blockIdx.x; q < rows; q += gridDim.x * warps) {  // warp-uniform
    const int i = local_expert_of_row(s_prefix, El, q), r = q - s_prefix[i];
    const int s = source_rank_of_row(p.layout_range, R, i, r);
    const size_t row = static_cast<size_t>(i) * RT + r;
    const int t = p.src_info[row];
    if (t < 0 || t >= T) continue;
    if (gp.stage_x) {  // the put source must lie in the window: copy the caller's row into the zero-copy area
      const int4* src = reinterpret_cast<const int4*>(p.x) + row * row_int4;
      int4* dst = reinterpret_cast<int4*>(base + g.region_offset + layout.zero_copy_row(row));
      for (int j = lane; j < row_int4; j += 32) dst[j] = ptx::ld_nc_no_allocate(src + j);
    }
    // Warp coop: the put syncs the warp (covering its lanes' stores), lane 0 posts.
    const ncclGin gin(g.dev_comm, s);
    gin.put(world, s, g.window, g.region_offset + layout.combine_row(half, p.rank * El + i, t), g.window,
            g.region_offset + layout.zero_copy_row(row), row_bytes, ncclGin_None{}, ncclGin_None{}, ncclCoopWarp{});
  }
  gin_flush_cta(g.dev_comm);

  if (device::last_block<true>(&p.state->send_ticket[1])) {
    auto* flags = reinterpret_cast<uint64_t*>(base + g.staging_offset + G::combine_flag(0));
    for (int d = threadIdx.x; d < R; d += blockDim.x) flags[d] = epoch;
    __syncthreads();
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      const ncclGin gin(g.dev_comm, d);
      // The signal lands after every row this rank put to d (same context, same peer).
      gin.put(world, d, g.window, g.region_offset + L::combine_flag(half, p.rank), g.window,
              g.staging_offset + G::combine_flag(d), sizeof(uint64_t),
              ncclGin_SignalAdd{static_cast<ncclGinSignal_t>(GinSignals::combine(R, p.rank)), 1});
    }
    gin_flush_cta(g.dev_comm);
    if (threadIdx.x == 0) p.state->send_epoch[1] = epoch;
  }
}

// ---------------------------------------------------------------------------------------------------------
// waits, barrier, reset, peer table

__global__ void gin_signal_wait_kernel(const __grid_constant__ GinSignalWaitParams p) {
  if (!gin_ready(p.dev_comm)) return;
  const uint64_t epoch = p.state->recv_epoch[p.kind] + 1;  // the epoch the receive kernel after us works on
  const ncclGin gin(p.dev_comm, p.rank);                   // every sender signals us on our context
  const Phase phase = p.kind == 0 ? Phase::kLowLatencyDispatch : Phase::kLowLatencyCombine;
  for (int s = threadIdx.x; s < p.num_ranks; s += blockDim.x) {
    const long long t0 = clock64();
    const int sig = p.kind == 0 ? GinSignals::dispatch(s) : GinSignals::combine(p.num_ranks, s);
    // On a timeout the receive kernel launched after this one sees the recorded error and leaves at once.
    device::wait_signal_geq(p.wait, gin, static_cast<ncclGinSignal_t>(sig), epoch, s, phase);
    if (p.wait_stats != nullptr)
      atomicAdd(reinterpret_cast<unsigned long long*>(p.wait_stats + s),
                static_cast<unsigned long long>(clock64() - t0));
  }
}

__global__ void gin_barrier_kernel(const __grid_constant__ GinBarrierParams p) {
  __shared__ int s_failed;
  if (!gin_ready(p.dev_comm)) return;
  const ncclTeam world = ncclTeamWorld(p.dev_comm);
  const uint64_t epoch = *p.epoch + 1;
  if (threadIdx.x == 0) s_failed = 0;
  __syncthreads();
  for (int d = threadIdx.x; d < p.num_ranks; d += blockDim.x) {
    // On receiver d's context: lands after every earlier put of this rank to d.
    const auto sig = static_cast<ncclGinSignal_t>(GinSignals::barrier(p.num_ranks, p.rank));
    ncclGin(p.dev_comm, d).signal(world, d, ncclGin_SignalAdd{sig, 1});
  }
  const ncclGin mine(p.dev_comm, p.rank);
  for (int s = threadIdx.x; s < p.num_ranks; s += blockDim.x) {
    if (!device::wait_signal_geq(p.wait, mine, static_cast<ncclGinSignal_t>(GinSignals::barrier(p.num_ranks, s)),
                                 epoch, s, Phase::kBarrier))
      s_failed = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0 && !s_failed) *p.epoch = epoch;
}

__global__ void gin_reset_signals_kernel(const __grid_constant__ ncclDevComm dc, int num_signals) {
  if (!gin_ready(dc)) return;
  for (int c = 0; c < dc.ginContextCount; ++c) {
    const ncclGin gin(dc, c);
    for (int s = threadIdx.x; s < num_signals; s += blockDim.x) gin.resetSignal(static_cast<ncclGinSignal_t>(s));
  }
}

__global__ void query_own_base_kernel(ncclWindow_t window, int rank, int num_ranks, char** peer_bases) {
  for (int p = threadIdx.x; p < num_ranks; p += blockDim.x)
    peer_bases[p] = p == rank ? static_cast<char*>(ncclGetLocalPointer(window, 0)) : nullptr;
}

int clamp_blocks(long long want, int num_sms) {
  return static_cast<int>(want < 1 ? 1 : (want > num_sms ? num_sms : want));
}

int one_block_threads(int num_ranks) { return num_ranks < 32 ? 32 : (num_ranks + 31) / 32 * 32; }

}  // namespace

int low_latency_gin_dispatch_blocks(const LowLatencyGinDispatchParams& p, int num_sms) {
  return clamp_blocks(p.base.num_tokens, num_sms);  // blocks take tokens; at least one (it publishes)
}

int low_latency_gin_combine_blocks(const LowLatencyGinCombineParams&, int num_sms) { return num_sms; }

void launch_low_latency_gin_dispatch_send(const LowLatencyGinDispatchParams& p, int num_blocks, cudaStream_t stream) {
  OPENEP_CHECK(p.base.do_send && p.base.num_ranks <= kMaxGinRanks && p.base.num_topk <= kMaxLowLatencyTopk,
               ErrorCode::kInternal, "GIN low-latency dispatch send launched with ", p.base.num_ranks,
               " ranks and top-", p.base.num_topk);
  gin_dispatch_send_kernel<<<num_blocks, kThreads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_low_latency_gin_combine_send(const LowLatencyGinCombineParams& p, int num_blocks, cudaStream_t stream) {
  OPENEP_CHECK(p.base.do_send && p.base.num_ranks <= kMaxGinRanks, ErrorCode::kInternal,
               "GIN low-latency combine send launched with ", p.base.num_ranks, " ranks");
  const size_t smem = sizeof(int) * (static_cast<size_t>(p.base.num_local_experts) + 1);
  if (smem > 48 * 1024) {
    OPENEP_CUDA_CHECK(cudaFuncSetAttribute(gin_combine_send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  }
  gin_combine_send_kernel<<<num_blocks, kThreads, smem, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_gin_signal_wait(const GinSignalWaitParams& p, cudaStream_t stream) {
  OPENEP_CHECK(p.num_ranks > 0 && p.num_ranks <= kMaxGinRanks && (p.kind == 0 || p.kind == 1), ErrorCode::kInternal,
               "GIN signal wait over ", p.num_ranks, " ranks, kind ", p.kind);
  gin_signal_wait_kernel<<<1, one_block_threads(p.num_ranks), 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_gin_barrier(const GinBarrierParams& p, cudaStream_t stream) {
  OPENEP_CHECK(p.num_ranks > 0 && p.num_ranks <= kMaxGinRanks, ErrorCode::kInternal, "GIN barrier over ",
               p.num_ranks, " ranks");
  gin_barrier_kernel<<<1, one_block_threads(p.num_ranks), 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_gin_reset_signals(const ncclDevComm& dev_comm, int num_ranks, cudaStream_t stream) {
  gin_reset_signals_kernel<<<1, 256, 0, stream>>>(dev_comm, GinSignals::num_resettable(num_ranks));
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_query_own_base(ncclWindow_t window, int rank, int num_ranks, char** peer_bases, cudaStream_t stream) {
  OPENEP_CHECK(num_ranks > 0 && num_ranks <= kMaxGinRanks && rank >= 0 && rank < num_ranks, ErrorCode::kInternal,
               "own-base query with rank ", rank, " of ", num_ranks);
  query_own_base_kernel<<<1, one_block_threads(num_ranks), 0, stream>>>(window, rank, num_ranks, peer_bases);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void load_low_latency_gin_kernels() {
  load_kernel(reinterpret_cast<const void*>(&gin_dispatch_send_kernel), "gin_dispatch_send_kernel");
  load_kernel(reinterpret_cast<const void*>(&gin_combine_send_kernel), "gin_combine_send_kernel");
  load_kernel(reinterpret_cast<const void*>(&gin_signal_wait_kernel), "gin_signal_wait_kernel");
  load_kernel(reinterpret_cast<const void*>(&gin_barrier_kernel), "gin_barrier_kernel");
  load_kernel(reinterpret_cast<const void*>(&gin_reset_signals_kernel), "gin_reset_signals_kernel");
  load_kernel(reinterpret_cast<const void*>(&query_own_base_kernel), "query_own_base_kernel");
}

}  // namespace openep::detail
