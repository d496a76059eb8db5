// Transport policy: which engine a Buffer's kernels talk through, decided once at Buffer creation from
// facts the host already has (no probing of the communicator; see nccl-device-api.md section 4).
//
//   kNvlink  every rank is in this rank's NVLink domain (NCCL's LSA team): peer pointers, no network.
//            GIN is never requested: asking for it on a single node fails and poisons the communicator.
//   kGin     the Group spans several NVLink domains, the caller opted in (BufferOptions::allow_network)
//            and the Buffer is in low-latency mode: the low-latency kernels move data with NCCL GIN puts
//            and signals (src/kernels/low_latency_gin.cu).
//
// NOT YET RUN ON A REAL NETWORK (no RDMA NICs on the test machines): the kGin path builds and its policy is
// unit-tested on the CPU, but no byte has ever moved through it. Normal (intranode) mode never uses the
// network; a multi-node Group in normal mode is refused.
#pragma once

#include <cstddef>

#include <nccl.h>
#include <nccl_device.h>

namespace openep::detail {

enum class Transport : int { kNvlink = 0, kGin = 1 };

const char* transport_name(Transport t);

// What the policy looks at. All of it is known on the host before the device communicator exists.
struct TransportQuery {
  int num_ranks = 0;          // ranks in the Group
  int num_nvlink_ranks = 0;   // ranks in this rank's NVLink (LSA) team; 0 = NCCL has no symmetric memory
  bool low_latency_mode = false;
  bool allow_network = false; // BufferOptions::allow_network
  size_t num_nvl_bytes = 0;   // BufferOptions::num_nvl_bytes (normal-mode region; must be 0 for kGin)
  size_t num_rdma_bytes = 0;  // BufferOptions::num_rdma_bytes (low-latency region)
};

// Pure function: returns the transport, or throws openep::Error (kUnsupported / kInvalidArgument) whose
// message names the option or field to change. A single-node Group always gets kNvlink, whatever
// allow_network says. Does not check num_nvlink_ranks > 0 (the Buffer checks that first, unchanged).
Transport select_transport(const TransportQuery& q);

// Largest Group the GIN low-latency path addresses (its signal table and staging are sized by it).
inline constexpr int kMaxGinRanks = 256;

// GIN signal ids of the low-latency path, per context (one id per source rank and purpose). The sender
// posts every put and signal to receiver d on context (d mod ginContextCount), so a signal covers all the
// data the sender put to d before it (NCCL orders a signal after earlier puts on the same context to the
// same peer), and the receiver polls only its own context.
struct GinSignals {
  static constexpr int dispatch(int src) { return src; }
  static constexpr int combine(int num_ranks, int src) { return num_ranks + src; }
  static constexpr int barrier(int num_ranks, int src) { return 2 * num_ranks + src; }
  static constexpr int count(int num_ranks) { return 3 * num_ranks; }
  // dispatch and combine ids are reset by clean_low_latency_buffer; barrier ids are never reset.
  static constexpr int num_resettable(int num_ranks) { return 2 * num_ranks; }
};

// The device-communicator requirements of a kGin Buffer: user signals only (GIN turns on through them and
// through the multi-node Group); no counters, no multimem, no LSA barriers (the kernels do not use them).
// Every rank builds the same struct (NCCL assumes identical requirements on all ranks).
ncclDevCommRequirements gin_dev_comm_requirements(int num_ranks);

}  // namespace openep::detail
