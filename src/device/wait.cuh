// The one spin-wait helper every wait on a peer goes through (ARCHITECTURE.md D4).
//
// wait_geq polls a counter in OUR memory (peers write into it with red_add_release_sys) with an acquire
// load until it reaches `target` (monotonic counters: they are never reset, so graph replays and repeated
// calls keep working). It gives up after `timeout_ns`, or as soon as another thread of this GPU has already
// recorded an error, and then returns false; the caller leaves the kernel. The first thread to give up
// records (rank, peer, phase, expected, observed) in the host-visible error slot.
#pragma once

#include <cstdint>

#include "device/ptx.cuh"
#include "protocol/device_error.hpp"

namespace openep::device {

using detail::WaitContext;

// Records an error unless one is already recorded. Any thread may call it.
__device__ __forceinline__ void record_error(const WaitContext& ctx, detail::DeviceErrorCode code, int peer,
                                             detail::Phase phase, int64_t expected, int64_t observed) {
  cuda::atomic_ref<int32_t, cuda::thread_scope_device> claim(*ctx.error_claim);
  int32_t none = 0;
  if (claim.compare_exchange_strong(none, static_cast<int32_t>(code), cuda::memory_order_relaxed)) {
    volatile detail::DeviceError* rec = ctx.error_record;
    rec->rank = ctx.rank;
    rec->peer = peer;
    rec->phase = static_cast<int32_t>(phase);
    rec->expected = expected;
    rec->observed = observed;
    __threadfence_system();  // the fields land before the code that makes them valid
    rec->code = static_cast<int32_t>(code);
    __threadfence_system();  // and reach the host before it can observe the kernel as finished
  }
}

__device__ __forceinline__ bool error_recorded(const WaitContext& ctx) {
  return ptx::ld_volatile(ctx.error_claim) != 0;
}

// Polls `read()` until `reached(value)`. Returns false (after recording a timeout naming `peer`, `phase`,
// `target` and the last value seen) if that does not happen within the timeout, or as soon as another thread
// of this GPU has recorded an error. Every wait on a peer goes through here (ARCHITECTURE.md D4).
template <typename Read, typename Reached>
__device__ __forceinline__ bool poll_until(const WaitContext& ctx, Read read, Reached reached, uint64_t target,
                                           int peer, detail::Phase phase) {
  uint64_t v = read();
  if (reached(v)) return true;
  const uint64_t start = ptx::globaltimer_ns();
  for (uint32_t iter = 1;; ++iter) {
    v = read();
    if (reached(v)) return true;
    if ((iter & 63u) == 0) {
      if (error_recorded(ctx)) return false;
      if (ptx::globaltimer_ns() - start > ctx.timeout_ns) {
        record_error(ctx, detail::DeviceErrorCode::kTimeout, peer, phase, static_cast<int64_t>(target),
                     static_cast<int64_t>(v));
        return false;
      }
    }
  }
}

// Waits until *counter >= target (an acquire load at system scope: the writes the peer released before
// raising the counter are visible after it). See poll_until for the failure path.
__device__ __forceinline__ bool wait_geq(const WaitContext& ctx, const uint64_t* counter, uint64_t target, int peer,
                                         detail::Phase phase) {
  return poll_until(
      ctx, [counter]() { return ptx::ld_acquire_sys(counter); }, [target](uint64_t v) { return v >= target; },
      target, peer, phase);
}

// Shrink mode (low latency, BufferOptions::enable_shrink): like wait_geq, but a peer whose mask entry is set
// (mask[peer] != 0, by the host or by another thread) is not waited for, and a timeout sets the peer's mask entry
// instead of recording an error (DeepEP's failure masking: the survivors carry on without that rank).
enum class PeerWait { kArrived, kMasked, kFailed };
__device__ __forceinline__ PeerWait wait_geq_or_mask(const WaitContext& ctx, const uint64_t* counter, uint64_t target,
                                                     int peer, int32_t* mask) {
  if (ptx::ld_volatile(mask + peer) != 0) return PeerWait::kMasked;
  if (ptx::ld_acquire_sys(counter) >= target) return PeerWait::kArrived;
  const uint64_t start = ptx::globaltimer_ns();
  for (uint32_t iter = 1;; ++iter) {
    if (ptx::ld_acquire_sys(counter) >= target) return PeerWait::kArrived;
    if ((iter & 63u) == 0) {
      if (error_recorded(ctx)) return PeerWait::kFailed;
      if (ptx::ld_volatile(mask + peer) != 0) return PeerWait::kMasked;  // another block gave up on it
      if (ptx::globaltimer_ns() - start > ctx.timeout_ns) {
        atomicExch(mask + peer, 1);
        __threadfence();
        return PeerWait::kMasked;
      }
    }
  }
}

// True when shrink mode is off or the rank is not masked.
__device__ __forceinline__ bool rank_live(const int32_t* mask, int rank) {
  return mask == nullptr || ptx::ld_volatile(mask + rank) == 0;
}

}  // namespace openep::device
