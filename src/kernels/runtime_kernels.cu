// Runtime kernels: peer-pointer query and the device-side barrier.
//
// Barrier protocol (slot s): every rank keeps a local epoch e (completed barriers on s). To enter barrier
// e+1, rank r adds 1 to counter [s][r] in every peer's window with red.release.sys (so everything r wrote
// before is visible to the peer once the peer sees the count), then waits until its own counters [s][p]
// reach e+1 for every peer p with ld.acquire.sys. Counters only grow, so no reset is ever needed and a
// captured graph replays correctly. A rank that never arrives leaves the others waiting until the timeout,
// which records (rank, peer, phase=barrier) and ends the kernel.
#include "device/wait.cuh"
#include "kernels/launch.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

__global__ void query_peer_bases_kernel(ncclWindow_t window, int num_peers, char** peer_bases) {
  const int p = threadIdx.x;
  if (p < num_peers) peer_bases[p] = static_cast<char*>(ncclGetLsaPointer(window, 0, p));
}

__global__ void barrier_kernel(const __grid_constant__ BarrierParams params) {
  __shared__ uint64_t target;
  if (threadIdx.x == 0) target = params.epoch[0] + 1;
  __syncthreads();
  const int p = threadIdx.x;
  if (p < params.num_ranks) {
    // Arrive at peer p: counter [slot][my rank] in p's window.
    auto* remote = reinterpret_cast<uint64_t*>(params.peer_bases[p] + params.barrier_offset) +
                   params.slot * kMaxNvlinkPeers + params.rank;
    ptx::red_add_release_sys(remote, 1);  // pairs with the peer's ld_acquire_sys in wait_geq
    // Wait for peer p's arrival in our window.
    const auto* local = reinterpret_cast<const uint64_t*>(params.peer_bases[params.rank] + params.barrier_offset) +
                        params.slot * kMaxNvlinkPeers + p;
    device::wait_geq(params.wait, local, target, p, Phase::kBarrier);
  }
  __syncthreads();
  if (threadIdx.x == 0) params.epoch[0] = target;
}

}  // namespace

void launch_query_peer_bases(ncclWindow_t window, int num_peers, char** peer_bases, cudaStream_t stream) {
  OPENEP_CHECK(num_peers > 0 && num_peers <= kMaxNvlinkPeers, ErrorCode::kInternal, "num_peers ", num_peers);
  query_peer_bases_kernel<<<1, kMaxNvlinkPeers, 0, stream>>>(window, num_peers, peer_bases);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

void launch_barrier(const BarrierParams& params, cudaStream_t stream) {
  OPENEP_CHECK(params.num_ranks > 0 && params.num_ranks <= kMaxNvlinkPeers, ErrorCode::kInternal,
               "barrier over ", params.num_ranks, " ranks");
  const int threads = (params.num_ranks + 31) / 32 * 32;
  barrier_kernel<<<1, threads, 0, stream>>>(params);
  OPENEP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace openep::detail
