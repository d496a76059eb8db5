// The host-visible error slot a kernel writes when it gives up (timeout) or finds invalid input. Shared by
// the runtime (which reads it and raises openep::Error) and the kernels (device/wait.cuh writes it).
//
// Protocol: a claim word in device memory and a record in pinned, device-mapped host memory, both zeroed at
// Buffer creation. The first device thread that fails claims the word with a device-scope CAS (0 -> code),
// writes the record's fields, __threadfence_system(), then writes the record's code. Other waiting threads
// on the same GPU see the claim word set and leave early, so a dead peer costs one timeout, not one per
// thread. The host reads the record (no copy needed) after a stream synchronisation or opportunistically,
// and turns it into openep::Error.
#pragma once

#include <cstdint>

namespace openep::detail {

enum class DeviceErrorCode : int32_t {
  kNone = 0,
  kTimeout = 1,              // expected = counter target, observed = last value, peer = awaited rank
  kBadExpertIndex = 2,       // expected = token index, observed = the expert id
  kInconsistentLayout = 3,   // num_tokens_per_rank[peer] (expected) != tokens is_token_in_rank sends there
  kWorstTokensExceeded = 4,  // expected = num_worst_tokens, observed = rows actually received
  kCapacityExceeded = 5,     // expected = rows the Buffer holds, observed = rows received
  kRailSizeMismatch = 6,     // GIN rail: expected = bytes the peer expects from me, observed = bytes I send
};

enum class Phase : int32_t {
  kNone = 0,
  kBarrier = 1,
  kLayout = 2,
  kDispatchCounts = 3,
  kDispatchData = 4,
  kCombineData = 5,
  kLowLatencyDispatch = 6,
  kLowLatencyCombine = 7,
  kRailReady = 8,            // GIN rail: waiting for a rail peer to be ready to receive
  kRailData = 9,             // GIN rail: waiting for a rail peer's bytes
  kGinFlush = 10,            // GIN: waiting for NCCL's GIN proxy to take this GPU's puts to a peer
};

inline const char* phase_name(Phase p) {
  switch (p) {
    case Phase::kNone: return "none";
    case Phase::kBarrier: return "barrier";
    case Phase::kLayout: return "get_dispatch_layout";
    case Phase::kDispatchCounts: return "dispatch (count exchange)";
    case Phase::kDispatchData: return "dispatch (data)";
    case Phase::kCombineData: return "combine (data)";
    case Phase::kLowLatencyDispatch: return "low_latency_dispatch";
    case Phase::kLowLatencyCombine: return "low_latency_combine";
    case Phase::kRailReady: return "internode rail exchange over GIN (peer ready to receive)";
    case Phase::kRailData: return "internode rail exchange over GIN (peer's data)";
    case Phase::kGinFlush:
      return "GIN flush (NCCL's GIN proxy stopped taking this rank's puts to that peer: a network error or a peer "
             "that is gone ends NCCL's GIN progress thread)";
  }
  return "unknown";
}

struct DeviceError {
  int32_t code;       // DeviceErrorCode; 0 = no error
  int32_t rank;       // rank that recorded it
  int32_t peer;       // peer it waited for (timeout), or -1
  int32_t phase;      // Phase
  int64_t expected;   // timeout: value waited for; bad index: token index
  int64_t observed;   // timeout: last value seen; bad index: the offending value
};

// What every kernel that waits or validates receives (by value, inside its Params).
struct WaitContext {
  int32_t* error_claim;         // device memory: 0 until the first failing thread claims it
  DeviceError* error_record;    // pinned, device-mapped host memory: the record the host reads
  uint64_t timeout_ns;
  int rank;
};

}  // namespace openep::detail
