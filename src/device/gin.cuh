// Small GIN helpers shared by the network low-latency kernels (kernels/low_latency_gin.cu) and the internode GIN
// rail (kernels/internode_gin.cu). NOT YET RUN ON A REAL NETWORK (no RDMA NICs on the test machines); run only
// under the loopback GIN test plugin (fake nodes on one H200, 2026-12-02).
#pragma once

#include <nccl_device.h>

namespace openep::device {

// NCCL's ncclGin reads past its tables when the device communicator has no context (nccl-device-api.md 2.7). The
// host refuses to create a GIN device communicator without one; this guard keeps a broken invariant from turning
// into wild reads (the peers then time out with rank, peer and phase).
__device__ __forceinline__ bool gin_ready(const ncclDevComm& dc) { return dc.ginContextCount > 0; }

// Waits until the sources of every put this block posted, on every context, have been read (they may then be
// overwritten). Local only: says nothing about the data having landed remotely. Every thread of the block calls it.
__device__ __forceinline__ void gin_flush_cta(const ncclDevComm& dc) {
  for (int c = 0; c < dc.ginContextCount; ++c) ncclGin(dc, c).flush(ncclCoopCta());
}

}  // namespace openep::device
