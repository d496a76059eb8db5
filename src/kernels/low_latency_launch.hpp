// Launchers of the low-latency kernels. See src/kernels/low_latency.cu for the protocol.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/grid.hpp"
#include "protocol/device_error.hpp"
#include "protocol/low_latency_layout.hpp"

namespace openep::detail {

struct LowLatencyWindow {
  char* const* peer_bases;     // [R] device table of LSA window bases
  size_t region_offset;        // window offset of the low-latency region
  LowLatencyLayout layout;
};

struct LowLatencyDispatchParams {
  LowLatencyWindow window;
  LowLatencyState* state;
  int rank, num_ranks, num_experts, num_local_experts, T, hidden, num_topk, num_tokens;
  const uint16_t* x;
  const void* topk_idx;
  bool topk_int64;
  bool use_fp8, round_scale, use_ue8m0;
  // Outputs.
  void* packed_x;
  void* packed_scales;
  int* packed_count;
  int* src_info;
  int64_t* layout_range;
  int* cumulative_stats;
  int64_t* wait_stats;
  int32_t* mask;  // shrink mode: [R] 1 = masked rank (not sent to, not waited for, contributions absent); null: off
  bool do_send, do_recv;
  WaitContext wait;
};

struct LowLatencyCombineParams {
  LowLatencyWindow window;
  LowLatencyState* state;
  int rank, num_ranks, num_experts, num_local_experts, T, hidden, num_topk, num_tokens;
  const uint16_t* x;           // packed expert outputs (the caller's, or the zero-copy staging area)
  const int* src_info;
  const int64_t* layout_range;
  const void* topk_idx;
  bool topk_int64;
  const float* topk_weights;
  bool use_logfmt;             // LogFMT-10 transport (protocol/logfmt.hpp); requires hidden % 128 == 0
  uint16_t* combined_x;
  int64_t* wait_stats;
  int32_t* mask;  // shrink mode: [R] 1 = masked rank (not sent to, not waited for, contributions absent); null: off
  bool do_send, do_recv;
  WaitContext wait;
};

// Grid sizes: fused (send + receive) kernels use every SM; send-only and receive-only kernels what they need.
int low_latency_dispatch_blocks(const LowLatencyDispatchParams& p, int num_sms);
int low_latency_combine_blocks(const LowLatencyCombineParams& p, int num_sms);
// `grids`: the Buffer's grid budget; a fused (cooperative) launch whose grids cannot all be co-resident with
// grids.grids_per_device - 1 others of the same size fails with kUnsupported instead of hanging.
void launch_low_latency_dispatch(const LowLatencyDispatchParams& p, int num_blocks, const GridBudget& grids,
                                 cudaStream_t stream);
void launch_low_latency_combine(const LowLatencyCombineParams& p, int num_blocks, const GridBudget& grids,
                                cudaStream_t stream);

}  // namespace openep::detail

namespace openep {
struct LowLatencyDispatchArgs;
struct LowLatencyDispatchOutputs;
struct LowLatencyCombineArgs;
struct LowLatencyCombineOutputs;
struct LowLatencyHandle;
}  // namespace openep

namespace openep::detail {

// Host-side validation (no GPU needed): throws openep::Error naming the argument, the expected and the seen
// value; kBufferTooSmall when the shapes do not fit num_rdma_bytes (the message names the size needed).
void validate_low_latency_dispatch(const LowLatencyDispatchArgs& a, const LowLatencyHandle& h,
                                   const LowLatencyDispatchOutputs& out, int num_ranks, size_t num_rdma_bytes);
void validate_low_latency_combine(const LowLatencyCombineArgs& a, const LowLatencyHandle& h,
                                  const LowLatencyCombineOutputs& out, int num_ranks, size_t num_rdma_bytes);
// Shapes shared by both: T, hidden, experts against ranks and the region size.
void validate_low_latency_shapes(int T, int hidden, int num_experts, int num_ranks, size_t num_rdma_bytes);

}  // namespace openep::detail
