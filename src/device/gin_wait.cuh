// Bounded wait on an NCCL GIN signal (network path; NOT YET RUN ON A REAL NETWORK, no RDMA NICs on the
// test machines; run only under the loopback GIN test plugin). NCCL's waitSignal spins forever; this polls
// readSignal (acquire) under the same timeout, early exit and error record as device::wait_geq (wait.cuh), so a
// lost signal names rank, peer and phase.
//
// Signals only grow between resets, so the condition is "value - target >= 0" in wrap-around arithmetic
// (the rolling comparison NCCL uses too).
#pragma once

#include <nccl_device.h>

#include <cstdint>

#include "device/ptx.cuh"
#include "device/wait.cuh"
#include "protocol/device_error.hpp"

namespace openep::device {

// REQUIRES: gin was built from a device communicator with ginContextCount > 0.
__device__ __forceinline__ bool wait_signal_geq(const WaitContext& ctx, const ncclGin& gin, ncclGinSignal_t signal,
                                                uint64_t target, int peer, detail::Phase phase) {
  return poll_until(
      ctx, [&gin, signal]() { return gin.readSignal(signal); },  // acquire: the covered puts are visible after it
      [target](uint64_t v) { return static_cast<int64_t>(v - target) >= 0; }, target, peer, phase);
}

}  // namespace openep::device
