// Runtime kernels: peer-pointer query and the device-side barrier.
//
// Barrier protocol (slot s): every rank keeps a local epoch e (completed barriers on s). To enter barrier
// e+1, rank r adds 1 to counter [s][r] in every peer's window with red.release.sys (so everything r wrote
// before is visible to the peer once the peer sees the count), then waits until its own counters [s][p]
// reach e+1 for every peer p with ld.acquire.sys. Counters only grow, so no reset is ever needed and a
// captured graph replays correctly. A rank that never arrives leaves the others waiting until the timeout,
// which records (rank, peer, phase=barrier) and ends the kernel.
#include "device/barrier.cuh"
#include "kernels/load.hpp"
#include "kernels/launch.hpp"
#include "protocol/limits.hpp"
#include "runtime/check.hpp"

namespace openep::detail {
namespace {

__global__ void query_peer_bases_kernel(ncclWindow_t window, int num_peers, char** peer_bases) {
  const int p = threadIdx.x;
  if (p < num_peers) peer_bases[p] = static_cast<char*>(ncclGetLsaPointer(window, 0, p));
}

__global__ void barrier_kernel(const __grid_constant__ BarrierParams params) {
  const device::BarrierRef ref{params.peer_bases, params.barrier_offset, params.epoch, params.slot,
                               params.rank,       params.num_ranks,      params.mask};
  device::barrier_block(ref, params.wait, Phase::kBarrier);
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

void list_runtime_kernels(std::vector<KernelRef>& out) {
  out.push_back({reinterpret_cast<const void*>(&query_peer_bases_kernel), "query_peer_bases_kernel"});
  out.push_back({reinterpret_cast<const void*>(&barrier_kernel), "barrier_kernel"});
}

}  // namespace openep::detail
