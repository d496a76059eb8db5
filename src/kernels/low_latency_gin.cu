// Low-latency dispatch and combine for ranks in other nodes: NCCL GIN (network) puts and signals.
//
// RUN only under the loopback GIN test plugin (fake nodes on one H200, 2026-12-02: 24 LowLatencyMgpu cases at
// a628bd5, graph replays and the missing-peer timeout at 9b5ce90, bitwise against the reference, 2 and 4 nodes, one
// rank per node); NEVER on a real network (no RDMA NICs here). Real NICs (InfiniBand/RoCE), GDAKI, NIC ordering and
// speed are untested, and so is more than one rank per node (needs 2+ GPUs). It is used
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
#include "kernels/low_latency_gin_launch.hpp"
#include "kernels/low_latency_rows.cuh"
#include "kernels/low_latency_send.cuh"
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
static_assert(kMaxGinRanks <= kMaxLowLatencySendRanks, "the send's shared arrays hold every rank");

using device::gin_flush_cta;
using device::gin_ready;

__device__ __forceinline__ char* local_base(const GinWindow& g) {
  return static_cast<char*>(ncclGetLocalPointer(g.window, 0));
}

// ---------------------------------------------------------------------------------------------------------
// dispatch send: dispatch_send<GinDispatch> (low_latency_send.cuh)

// The GIN dispatch transport: the row is staged in the window's staging payload row [t], one routing header per
// destination at staging [d][t]; thread d posts to rank d the header and, where the token has an expert on d, the
// payload, on d's context (see the protocol).
struct GinDispatch {
  const LowLatencyDispatchParams& p;
  const GinWindow& g;
  ncclTeam world;
  char* base;        // my window
  int half = 0;

  __device__ __forceinline__ void begin(int h) { half = h; }
  __device__ __forceinline__ char* payload(int t) const { return base + g.staging_offset + g.staging.payload(t); }
  __device__ __forceinline__ void post_token(int t, const DispatchRowGeometry& geo, const TokenRoute& route) {
    const int R = p.num_ranks;
    const size_t stage = g.staging_offset;
    for (int j = threadIdx.x; j < R * geo.header_int4; j += blockDim.x) {
      const int d = j / geo.header_int4, q = j - d * geo.header_int4;
      reinterpret_cast<int4*>(base + stage + g.staging.header(d, t))[q] = header_int4(route, p.num_topk, q, d);
    }
    __syncthreads();  // the staging stores of the whole block happen before the posts below
    const size_t payload_off = stage + g.staging.payload(t);
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      if (!route.live[d]) continue;
      const ncclGin gin(g.dev_comm, d);  // context of receiver d (see the protocol)
      const size_t dst = g.region_offset + p.window.layout.dispatch_message(half, p.rank, t);  // [my rank][t] at d
      gin.put(world, d, g.window, dst, g.window, stage + g.staging.header(d, t),
              static_cast<size_t>(geo.header_int4) * 16);
      if (route.has[d]) {
        gin.put(world, d, g.window, dst + L::kHeaderBytes, g.window, payload_off,
                static_cast<size_t>(geo.payload_int4) * 16);
      }
    }
  }
  // This block's sources may be reused after it. A flush that gives up is recorded; every wait after it sees the
  // record and leaves (here and in the receive kernels), so the result is not needed.
  __device__ __forceinline__ void end_tokens() { gin_flush_cta(g.dev_comm, p.wait); }
  __device__ __forceinline__ void publish_dispatch(int h, uint64_t flag, const int* s_live) {
    const int R = p.num_ranks, El = p.num_local_experts;
    const size_t stage = g.staging_offset;
    auto* counts = reinterpret_cast<int32_t*>(base + stage + G::counts_of(0, El));
    auto* flags = reinterpret_cast<uint64_t*>(base + stage + G::dispatch_flag(0));
    for (int e = threadIdx.x; e < p.num_experts; e += blockDim.x) counts[e] = take_count(p, e);
    for (int d = threadIdx.x; d < R; d += blockDim.x) flags[d] = flag;
    __syncthreads();  // staged counts and flags before the posts
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      if (!s_live[d]) continue;
      const ncclGin gin(g.dev_comm, d);
      gin.put(world, d, g.window, g.region_offset + L::dispatch_count(h, p.rank * El), g.window,
              stage + G::counts_of(d, El), static_cast<size_t>(El) * 4);
      // The signal lands after the counts and every message this rank put to d (same context, same peer).
      gin.put(world, d, g.window, g.region_offset + L::dispatch_flag(h, p.rank), g.window, stage + G::dispatch_flag(d),
              sizeof(uint64_t), ncclGin_SignalAdd{static_cast<ncclGinSignal_t>(GinSignals::dispatch(p.rank)), 1});
    }
    gin_flush_cta(g.dev_comm, p.wait);
  }
};

__global__ void __launch_bounds__(kThreads, 1)
    gin_dispatch_send_kernel(const __grid_constant__ LowLatencyGinDispatchParams gp) {
  if (!gin_ready(gp.gin.dev_comm)) return;
  const LowLatencyDispatchParams& p = gp.base;
  GinDispatch net{p, gp.gin, ncclTeamWorld(gp.gin.dev_comm), local_base(gp.gin)};
  dispatch_send(p, p.state->send_epoch[0] + 1, net);
}

// ---------------------------------------------------------------------------------------------------------
// combine send: combine_send<GinCombine, false> (low_latency_send.cuh; LogFMT is refused on this transport)

// The GIN combine transport: a warp takes a whole packed row (one unit per row); unless zero_copy it copies the row
// into the zero-copy area (the put source must lie in the window), then posts one put of the row (warp coop: the
// put syncs the warp, covering its lanes' stores; lane 0 posts) to the source rank's combine half.
struct GinCombine {
  const LowLatencyGinCombineParams& gp;
  ncclTeam world;
  char* base;        // my window

  __device__ __forceinline__ static int chunks_per_row(int) { return 1; }
  template <bool kLogfmt>
  __device__ __forceinline__ void send_unit(const LowLatencyCombineParams& p, int half, int i, int r, int,
                                            const int* s_live, int lane) {
    static_assert(!kLogfmt, "LogFMT is refused on the GIN transport (host-checked)");
    const GinWindow& g = gp.gin;
    const int R = p.num_ranks, El = p.num_local_experts, T = p.T, RT = R * T;
    const int row_int4 = p.hidden / 8;
    const int s = source_rank_of_row(p.layout_range, R, i, r);
    const size_t row = static_cast<size_t>(i) * RT + r;
    const int t = p.src_info[row];
    if (t < 0 || t >= T || !s_live[s]) return;
    if (gp.stage_x) {
      const int4* src = reinterpret_cast<const int4*>(p.x) + row * row_int4;
      int4* dst = reinterpret_cast<int4*>(base + g.region_offset + p.window.layout.zero_copy_row(row));
      for (int j = lane; j < row_int4; j += 32) dst[j] = ptx::ld_nc_no_allocate(src + j);
    }
    const ncclGin gin(g.dev_comm, s);
    gin.put(world, s, g.window, g.region_offset + p.window.layout.combine_row(half, p.rank * El + i, t), g.window,
            g.region_offset + p.window.layout.zero_copy_row(row), static_cast<size_t>(p.hidden) * 2, ncclGin_None{},
            ncclGin_None{}, ncclCoopWarp{});
  }
  __device__ __forceinline__ void end_rows() { gin_flush_cta(gp.gin.dev_comm, gp.base.wait); }  // as end_tokens
  __device__ __forceinline__ void publish_combine(const LowLatencyCombineParams& p, int half, uint64_t epoch,
                                                  const int* s_live) {
    const GinWindow& g = gp.gin;
    auto* flags = reinterpret_cast<uint64_t*>(base + g.staging_offset + G::combine_flag(0));
    for (int d = threadIdx.x; d < p.num_ranks; d += blockDim.x) flags[d] = epoch;
    __syncthreads();
    for (int d = threadIdx.x; d < p.num_ranks; d += blockDim.x) {
      if (!s_live[d]) continue;
      const ncclGin gin(g.dev_comm, d);
      // The signal lands after every row this rank put to d (same context, same peer).
      gin.put(world, d, g.window, g.region_offset + L::combine_flag(half, p.rank), g.window,
              g.staging_offset + G::combine_flag(d), sizeof(uint64_t),
              ncclGin_SignalAdd{static_cast<ncclGinSignal_t>(GinSignals::combine(p.num_ranks, p.rank)), 1});
    }
    gin_flush_cta(g.dev_comm, p.wait);
  }
};

// s_prefix: dynamic shared memory of E_local + 1 ints (rows of the local experts before expert i).
__global__ void __launch_bounds__(kThreads, 1)
    gin_combine_send_kernel(const __grid_constant__ LowLatencyGinCombineParams gp) {
  extern __shared__ int s_prefix[];
  if (!gin_ready(gp.gin.dev_comm)) return;
  const LowLatencyCombineParams& p = gp.base;
  GinCombine net{gp, ncclTeamWorld(gp.gin.dev_comm), local_base(gp.gin)};
  combine_send<GinCombine, false>(p, p.state->send_epoch[1] + 1, net, s_prefix);
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
  launch_gin_zero_signals(dev_comm, GinSignals::num_resettable(num_ranks), stream);
}

void launch_gin_zero_signals(const ncclDevComm& dev_comm, int num_signals, cudaStream_t stream) {
  OPENEP_CHECK(num_signals >= 0 && num_signals <= static_cast<int>(dev_comm.ginSignalCount), ErrorCode::kInternal,
               "zeroing ", num_signals, " GIN signals of a device communicator that has ", dev_comm.ginSignalCount);
  if (num_signals == 0) return;
  gin_reset_signals_kernel<<<1, 256, 0, stream>>>(dev_comm, num_signals);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_query_own_base(ncclWindow_t window, int rank, int num_ranks, char** peer_bases, cudaStream_t stream) {
  OPENEP_CHECK(num_ranks > 0 && num_ranks <= kMaxGinRanks && rank >= 0 && rank < num_ranks, ErrorCode::kInternal,
               "own-base query with rank ", rank, " of ", num_ranks);
  query_own_base_kernel<<<1, one_block_threads(num_ranks), 0, stream>>>(window, rank, num_ranks, peer_bases);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void list_low_latency_gin_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&gin_dispatch_send_kernel), "gin_dispatch_send_kernel"});
  out.push_back({reinterpret_cast<const void*>(&gin_combine_send_kernel), "gin_combine_send_kernel"});
  out.push_back({reinterpret_cast<const void*>(&gin_signal_wait_kernel), "gin_signal_wait_kernel"});
  out.push_back({reinterpret_cast<const void*>(&gin_barrier_kernel), "gin_barrier_kernel"});
  out.push_back({reinterpret_cast<const void*>(&gin_reset_signals_kernel), "gin_reset_signals_kernel"});
  out.push_back({reinterpret_cast<const void*>(&query_own_base_kernel), "query_own_base_kernel"});
}

}  // namespace openep::detail
