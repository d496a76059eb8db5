// The internode GIN rail (BufferOptions::internode_backend = kGin): one Rail::exchange as a device-initiated
// rendezvous with every listed rail peer, over NCCL GIN puts and signals on the rail communicator.
//
// RUN only under the loopback GIN test plugin (tests/gin_loopback: a GIN proxy network emulated over Unix sockets
// on one host) in fake-node worlds on one H200 (2026-12-02, 9b5ce90): InternodeMgpu.*, 16 cases bitwise against the
// CPU reference (BF16/FP8, up to 4096 tokens x hidden 7168, chunked), 2 and 4 nodes with one rank per node.
// NEVER ON A REAL NETWORK: the test machines have no RDMA NICs, so real NICs (InfiniBand/RoCE), GDAKI, NIC ordering
// and speed are untested; so is more than one rank per node (needs 2+ GPUs).
//
// The protocol above it is internode normal mode's, unchanged (docs/INTERNODE.md): the same records, partials,
// headers and chunks move between the same rail halves; pack / forward / node-reduce / combine_final are the
// host-driven rail's kernels. Only the network leg differs: instead of grouped ncclSend/ncclRecv enqueued by the
// host, this one-block kernel runs on the rail stream where the host rail would enqueue NCCL's.
//
// One exchange, thread i for peer n = peers[i] (e = exchanges[n] + 1, the pair's exchange count; every flag is
// monotonic and device-side, so CUDA-graph replays and any sequence of operations keep both sides in step):
//   1. ready    stage {where n's bytes land in my window, how many I expect} in my out_slot(n) and put those 16
//               bytes to n's in_slot(me) with SignalAdd(ready(me), 1), on n's context (a put from the window, not
//               putValue: NCCL 2.28.9's proxy backend breaks inline puts, internode_gin_layout.hpp). My stream has
//               reached the exchange, so every earlier reader of that receive range is done: this is the
//               rendezvous ncclRecv provides.
//   2. send     bounded wait until ready(n) >= e on my context (its acquire makes n's slots visible), read where n
//               wants my bytes, check the byte counts agree (else kRailSizeMismatch), fence, put them there with
//               SignalAdd(data(me), 1) (a bare signal when there are none) on n's context: the signal lands after
//               the bytes and after my ready put of step 1 (same context, same peer).
//   3. flush    the block's puts have read their sources (the kernels after me may overwrite them); bounded
//               (device::gin_flush_cta: NCCL's GIN proxy stops for good on a network error).
//   4. receive  bounded wait until data(n) >= e on my context: n's bytes are in my window; exchanges[n] = e.
// No cycle: each side waits only for steps the other posts before its own waits. Every wait names rank, the peer's
// Group rank and the phase (kRailReady / kRailData) and, on timeout, leaves the kernel; the next kernels see the
// recorded error and leave too, and the host raises it.
#include <nccl_device.h>

#include "device/gin.cuh"
#include "device/gin_wait.cuh"
#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "kernels/load.hpp"
#include "kernels/internode_gin_launch.hpp"
#include "protocol/internode_gin_layout.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

using GL = GinRailLayout;
using GS = GinRailSignals;

__device__ __forceinline__ int group_rank(const GinRailExchangeParams& p, int node) {
  return node * p.ranks_per_node + p.local_rank;
}

// Step 1: tells peer t.node where its bytes land here and how many I expect, then raises ready(me) on it.
__device__ __forceinline__ void post_ready(const GinRailExchangeParams& p, const ncclTeam& rail, const GinRailPeer& t) {
  char* base = static_cast<char*>(ncclGetLocalPointer(p.window, 0));
  uint64_t* out = reinterpret_cast<uint64_t*>(base + GL::out_slot(t.node));
  out[0] = t.recv_offset;
  out[1] = t.recv_bytes;
  ptx::fence_acq_rel_sys();  // the staged pair, before the NIC (or NCCL's proxy) reads it
  const ncclGin to(p.dev_comm, t.node);  // the receiver's context (GinRailSignals)
  to.put(rail, t.node, p.window, GL::in_slot(p.node), p.window, GL::out_slot(t.node), GL::kSlotBytes,
         ncclGin_SignalAdd{static_cast<ncclGinSignal_t>(GS::ready(p.node)), 1});
}

// Step 2: once t.node is ready, my bytes to where it asked, with data(me) raised after them. False on failure.
__device__ __forceinline__ bool send_when_ready(const GinRailExchangeParams& p, const ncclTeam& rail,
                                                const GinRailPeer& t, uint64_t e) {
  const ncclGin mine(p.dev_comm, p.node);
  if (!device::wait_signal_geq(p.wait, mine, static_cast<ncclGinSignal_t>(GS::ready(t.node)), e, group_rank(p, t.node),
                               Phase::kRailReady))
    return false;
  const char* base = static_cast<const char*>(ncclGetLocalPointer(p.window, 0));
  // Written by the NIC before the signal that the acquire above observed.
  const uint64_t dst = ptx::ld_acquire_sys(reinterpret_cast<const uint64_t*>(base + GL::dest_offset(t.node)));
  const uint64_t want = ptx::ld_acquire_sys(reinterpret_cast<const uint64_t*>(base + GL::dest_bytes(t.node)));
  if (want != t.send_bytes) {
    device::record_error(p.wait, DeviceErrorCode::kRailSizeMismatch, group_rank(p, t.node), Phase::kRailData,
                         static_cast<int64_t>(want), static_cast<int64_t>(t.send_bytes));
    return false;
  }
  const ncclGin to(p.dev_comm, t.node);
  const ncclGin_SignalAdd done{static_cast<ncclGinSignal_t>(GS::data(p.num_nodes, p.node)), 1};
  ptx::fence_acq_rel_sys();  // the earlier kernels' stores to the source, before the NIC reads it (trap 10)
  if (t.send_bytes > 0) {
    to.put(rail, t.node, p.window, dst, p.window, t.send_offset, t.send_bytes, done);
  } else {
    to.signal(rail, t.node, done);
  }
  return true;
}

__global__ void gin_rail_exchange_kernel(const __grid_constant__ GinRailExchangeParams p) {
  __shared__ int s_skip;
  if (threadIdx.x == 0) s_skip = device::error_recorded(p.wait) || !device::gin_ready(p.dev_comm);
  __syncthreads();
  if (s_skip) return;  // uniform: gin_flush_cta below needs every thread
  const ncclTeam rail = ncclTeamWorld(p.dev_comm);
  const int i = threadIdx.x;
  const bool active = i < p.num_peers;
  GinRailPeer t{};
  uint64_t e = 0;
  if (active) {
    t = p.peers[i];
    e = p.exchanges[t.node] + 1;
    post_ready(p, rail, t);
  }
  bool ok = active && send_when_ready(p, rail, t, e);
  if (!device::gin_flush_cta(p.dev_comm, p.wait)) return;  // recorded (uniform); the next kernels see it and leave
  if (ok) {
    const ncclGin mine(p.dev_comm, p.node);
    ok = device::wait_signal_geq(p.wait, mine, static_cast<ncclGinSignal_t>(GS::data(p.num_nodes, t.node)), e,
                                 group_rank(p, t.node), Phase::kRailData);
  }
  if (ok) p.exchanges[t.node] = e;
}

}  // namespace

void launch_gin_rail_exchange(const GinRailExchangeParams& p, cudaStream_t stream) {
  OPENEP_CHECK(p.num_peers >= 0 && p.num_peers < p.num_nodes && p.num_nodes <= kMaxInternodeNodes, ErrorCode::kInternal,
               "GIN rail exchange with ", p.num_peers, " peers on a rail of ", p.num_nodes);
  if (p.num_peers == 0) return;
  const int threads = (p.num_peers + 31) / 32 * 32;
  gin_rail_exchange_kernel<<<1, threads, 0, stream>>>(p);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void list_internode_gin_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&gin_rail_exchange_kernel), "gin_rail_exchange_kernel"});
}

}  // namespace openep::detail
