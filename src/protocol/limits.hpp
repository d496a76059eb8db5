// Rank limits, barrier slots and the window alignment, shared by the runtime and the kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "openep/types.hpp"
#include "protocol/host_device.hpp"

namespace openep::detail {

inline constexpr int kMaxNvlinkPeers = 72;        // largest NVLink domain addressed through peer pointers
inline constexpr int kMaxGinRanks = 256;          // largest Group the GIN low-latency path addresses
inline constexpr size_t kWindowAlignment = 4096;  // NCCL_WIN_REQUIRED_ALIGNMENT; also our region alignment

// Barrier counters: independent slots, one per concurrent user.
inline constexpr int kNumBarrierSlots = 16;
inline constexpr int kHostBarrierSlot = 0;        // Buffer::barrier()
inline constexpr int kIntranodeBarrierSlot = 1;   // intranode dispatch/combine prepare kernels

OPENEP_HOST_DEVICE constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace openep::detail
