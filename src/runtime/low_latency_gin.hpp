// Host side of the network (GIN) low-latency path: the launch sequences of
// dispatch and combine, and the barrier. Used only when Buffer::Impl::transport is kGin.
// NOT YET RUN ON A REAL NETWORK (no RDMA NICs on the test machines): run only under the loopback GIN test plugin
// (fake nodes on one H200, 2026-12-02).
#pragma once

#include <nccl.h>

#include "kernels/low_latency_launch.hpp"
#include "openep/low_latency.hpp"
#include "runtime/buffer_impl.hpp"

namespace openep::detail {

// The GIN device communicator is created by the NCCL fabric (runtime/nccl_fabric.cpp) with the window.

// The low-latency operations over GIN. `p` is the Params the NVLink path would launch (validated, filled);
// the outputs and the handle are the same. Send: the GIN send kernel. Receive: the bounded GIN signal wait,
// then the unchanged NVLink receive kernel. With return_recv_hook the receive is returned as the hook.
LowLatencyHook low_latency_dispatch_gin(Buffer::Impl& m, LowLatencyDispatchParams p, bool return_recv_hook,
                                        cudaStream_t stream);
LowLatencyHook low_latency_combine_gin(Buffer::Impl& m, LowLatencyCombineParams p, bool zero_copy,
                                       bool return_recv_hook, cudaStream_t stream);

// Buffer::barrier over GIN signals (bounded by timeout_seconds, like the NVLink barrier).
void gin_barrier(Buffer::Impl& m, cudaStream_t stream);

}  // namespace openep::detail
