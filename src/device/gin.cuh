// Small GIN helpers shared by the network low-latency kernels (kernels/low_latency_gin.cu) and the internode GIN
// rail (kernels/internode_gin.cu). NOT YET RUN ON A REAL NETWORK (no RDMA NICs on the test machines); run only
// under the loopback GIN test plugin (fake nodes on one H200, 2026-12-02).
#pragma once

#include <nccl_device.h>

#include <cstdint>

#include "device/wait.cuh"
#include "protocol/device_error.hpp"

namespace openep::device {

// NCCL's ncclGin reads past its tables when the device communicator has no context (nccl-device-api.md 2.7). The
// host refuses to create a GIN device communicator without one; this guard keeps a broken invariant from turning
// into wild reads (the peers then time out with rank, peer and phase).
__device__ __forceinline__ bool gin_ready(const ncclDevComm& dc) { return dc.ginContextCount > 0; }

// Waits until the sources of every put this block posted, on every context, have been read (they may then be
// overwritten). Local only: says nothing about the data having landed remotely. Every thread of the block calls it;
// returns the same value in every thread: false when the wait gave up (recorded) or an error was already recorded.
//
// Bounded, unlike ncclGin::flush. On the proxy backend NCCL's flush spins until NCCL's host-side GIN progress thread
// has consumed every descriptor posted to the peer; on any network error (a peer that is gone, a failed connection)
// that thread sets the communicator's async error and exits (NCCL 2.28.9 src/gin/gin_host.cc, ncclGinProgress), so
// the flush would spin forever, and the ncclCommAbort that Buffer destruction then issues frees memory the spinning
// kernel still reads (seen on 1x H200 under the loopback GIN plugin, 2026-12-02: an illegal memory access that
// poisoned every survivor's CUDA context). This polls the same producer / consumer indices under the Buffer's
// timeout and records kTimeout naming the peer whose queue stopped (phase kGinFlush). Other backends (GDAKI) use
// NCCL's flush, which is unbounded: NOT RUN (no RDMA NICs on the test machines). NCCL's put itself still waits
// without bound for queue credits (gin_proxy.h postGfd); a dead proxy with a full queue would spin there.
__device__ __forceinline__ bool gin_flush_cta(const ncclDevComm& dc, const WaitContext& w) {
  // Every thread's puts are posted (their producer indices claimed) before any index is read; ok is block-uniform.
  bool ok = __syncthreads_and(!error_recorded(w)) != 0;
  for (int c = 0; ok && c < dc.ginContextCount; ++c) {  // ok is block-uniform here (reduced below)
    if (dc.ginTypes[c] != NCCL_NET_DEVICE_GIN_PROXY) {
      ncclGin(dc, c).flush(ncclCoopCta());
      continue;
    }
    const auto* q = static_cast<const ncclGinProxyGpuCtx_t*>(dc.ginHandles[c]);
    for (int pe = threadIdx.x; ok && pe < dc.nRanks; pe += blockDim.x) {
      const uint32_t posted = cuda::atomic_ref<uint32_t, cuda::thread_scope_system>(q->pis[pe]).load(
          cuda::memory_order_relaxed);
      ok = poll_until(
          w,
          [q, pe]() {
            return static_cast<uint64_t>(cuda::atomic_ref<uint32_t, cuda::thread_scope_system>(q->cis[pe]).load(
                cuda::memory_order_acquire));
          },
          [posted](uint64_t consumed) { return static_cast<int32_t>(static_cast<uint32_t>(consumed) - posted) >= 0; },
          posted, pe, detail::Phase::kGinFlush);
    }
    ok = __syncthreads_and(ok) != 0;
  }
  return __syncthreads_and(ok) != 0;
}

}  // namespace openep::device
