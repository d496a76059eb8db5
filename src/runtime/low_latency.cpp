// Host side of the low-latency operations: sizing, validation, launches and the receive hooks.
#include <cstdint>

#include "kernels/low_latency_gin_launch.hpp"
#include "kernels/low_latency_launch.hpp"
#include "openep/buffer.hpp"
#include "openep/low_latency.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"
#include "runtime/low_latency_gin.hpp"
#include "protocol/logfmt.hpp"
#include "protocol/low_latency_layout.hpp"

namespace openep {

using detail::LowLatencyLayout;

size_t low_latency_buffer_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                    int num_experts) {
  OPENEP_CHECK_ARG(num_ranks >= 1, "num_ranks must be >= 1, got ", num_ranks);
  OPENEP_CHECK_ARG(num_max_dispatch_tokens_per_rank >= 1 &&
                       num_max_dispatch_tokens_per_rank <= kMaxLowLatencyTokensPerRank,
                   "num_max_dispatch_tokens_per_rank must be in [1, ", kMaxLowLatencyTokensPerRank, "], got ",
                   num_max_dispatch_tokens_per_rank);
  OPENEP_CHECK_ARG(hidden > 0 && hidden % 8 == 0, "hidden must be a positive multiple of 8, got ", hidden);
  OPENEP_CHECK_ARG(num_experts >= num_ranks && num_experts % num_ranks == 0 && num_experts <= kMaxExperts,
                   "num_experts must be a multiple of num_ranks (", num_ranks, ") in [", num_ranks, ", ",
                   kMaxExperts, "], got ", num_experts);
  return LowLatencyLayout::make(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).total;
}

namespace detail {

void validate_low_latency_shapes(int T, int hidden, int num_experts, int num_ranks, size_t num_rdma_bytes) {
  OPENEP_CHECK_ARG(num_ranks <= 256, "low-latency mode supports up to 256 ranks, the Group has ", num_ranks);
  const size_t need = low_latency_buffer_size_hint(T, hidden, num_ranks, num_experts);
  OPENEP_CHECK(need <= num_rdma_bytes, ErrorCode::kBufferTooSmall, "low-latency mode with T = ", T, ", hidden = ",
               hidden, ", ", num_experts, " experts on ", num_ranks, " ranks needs num_rdma_bytes >= ", need,
               " (low_latency_buffer_size_hint), the Buffer has ", num_rdma_bytes);
}

void validate_low_latency_dispatch(const LowLatencyDispatchArgs& a, const LowLatencyHandle& h,
                                   const LowLatencyDispatchOutputs& out, int num_ranks, size_t num_rdma_bytes) {
  const int T = a.num_max_dispatch_tokens_per_rank;
  validate_low_latency_shapes(T, a.hidden, a.num_experts, num_ranks, num_rdma_bytes);
  OPENEP_CHECK_ARG(a.num_tokens >= 0 && a.num_tokens <= T, "num_tokens must be in [0, num_max_dispatch_tokens_per_rank = ",
                   T, "], got ", a.num_tokens);
  OPENEP_CHECK_ARG(a.num_topk >= 1 && a.num_topk <= kMaxLowLatencyTopk, "num_topk must be in [1, ",
                   kMaxLowLatencyTopk, "], got ", a.num_topk);
  OPENEP_CHECK_ARG(!a.round_scale || a.use_fp8, "round_scale requires use_fp8");
  OPENEP_CHECK_ARG(!a.use_ue8m0 || a.round_scale, "use_ue8m0 requires round_scale");
  if (a.use_fp8) {
    const int multiple = a.use_ue8m0 ? 512 : 128;
    OPENEP_CHECK_ARG(a.hidden % multiple == 0, "hidden must be a multiple of ", multiple, " with use_fp8",
                     a.use_ue8m0 ? " and use_ue8m0" : "", ", got ", a.hidden);
  }
  OPENEP_CHECK_ARG(a.num_tokens == 0 || (a.x != nullptr && a.topk_idx != nullptr),
                   "x and topk_idx must be given with num_tokens = ", a.num_tokens);
  OPENEP_CHECK_ARG(out.packed_recv_x != nullptr, "packed_recv_x is null");
  OPENEP_CHECK_ARG(!a.use_fp8 || out.packed_recv_scales != nullptr, "packed_recv_scales is null with use_fp8");
  OPENEP_CHECK_ARG(out.packed_recv_count != nullptr, "packed_recv_count is null");
  OPENEP_CHECK_ARG(h.src_info != nullptr, "handle.src_info is null");
  OPENEP_CHECK_ARG(h.layout_range != nullptr, "handle.layout_range is null");
  OPENEP_CHECK_ARG(reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(out.packed_recv_x) % 16 == 0,
                   "x and packed_recv_x must be 16-byte aligned");
}

void validate_low_latency_combine(const LowLatencyCombineArgs& a, const LowLatencyHandle& h,
                                  const LowLatencyCombineOutputs& out, int num_ranks, size_t num_rdma_bytes) {
  const int T = h.num_max_dispatch_tokens_per_rank;
  OPENEP_CHECK_ARG(h.src_info != nullptr && h.layout_range != nullptr && T > 0,
                   "handle is not filled: pass the handle of a low_latency_dispatch");
  validate_low_latency_shapes(T, h.hidden, h.num_experts, num_ranks, num_rdma_bytes);
  OPENEP_CHECK_ARG(a.num_tokens >= 0 && a.num_tokens <= T, "num_tokens must be in [0, num_max_dispatch_tokens_per_rank = ",
                   T, "], got ", a.num_tokens);
  OPENEP_CHECK_ARG(a.num_topk >= 1 && a.num_topk <= kMaxLowLatencyTopk, "num_topk must be in [1, ",
                   kMaxLowLatencyTopk, "], got ", a.num_topk);
  OPENEP_CHECK_ARG(a.zero_copy || a.x != nullptr, "x is null and zero_copy is false");
  OPENEP_CHECK_ARG(reinterpret_cast<uintptr_t>(a.x) % 16 == 0, "x must be 16-byte aligned");
  OPENEP_CHECK_ARG(a.num_tokens == 0 || (a.topk_idx != nullptr && a.topk_weights != nullptr),
                   "topk_idx and topk_weights must be given with num_tokens = ", a.num_tokens);
  OPENEP_CHECK_ARG(a.num_tokens == 0 || out.combined_x != nullptr, "combined_x is null");
  OPENEP_CHECK_ARG(reinterpret_cast<uintptr_t>(out.combined_x) % 16 == 0, "combined_x must be 16-byte aligned");
  OPENEP_CHECK_ARG(!a.use_logfmt || h.hidden % logfmt::kDivisionChannels == 0,
                   "use_logfmt requires hidden (of the handle) to be a multiple of ", logfmt::kDivisionChannels,
                   " (one LogFMT metadata word per 128 channels), got ", h.hidden);
}

void validate_shrink_options(bool enable_shrink, bool low_latency_mode, Transport transport) {
  if (!enable_shrink) return;
  OPENEP_CHECK_ARG(low_latency_mode, "enable_shrink requires low_latency_mode (shrink mode masks failed ranks in the "
                   "low-latency operations), got low_latency_mode = false");
  OPENEP_CHECK(transport == Transport::kNvlink, ErrorCode::kUnsupported,
               "enable_shrink is available over NVLink only; this Buffer reaches its peers over the network (GIN), "
               "where shrink mode is not implemented");
}

}  // namespace detail

namespace {

detail::LowLatencyWindow ll_window(const Buffer::Impl& m, int T, int hidden, int E) {
  return detail::LowLatencyWindow{m.peer_bases_device, m.window_layout.rdma_offset,
                                  LowLatencyLayout::make(T, hidden, m.num_ranks, E)};
}

void require_state(const Buffer::Impl& m) {
  OPENEP_CHECK(m.ll_state != nullptr, ErrorCode::kBufferTooSmall,
               "low-latency mode needs BufferOptions::num_rdma_bytes >= low_latency_buffer_size_hint(...), the "
               "Buffer has 0");
}

// Launches the send half and, unless `hook`, the receive half in the same kernel. With `hook` the receive
// half is returned as the hook: it launches the same kernel with only the receive half, on the same stream.
// `launch(params, grid budget, stream)` launches one kernel of the operation.
template <typename Params, typename Launch>
LowLatencyHook send_then_receive(Buffer::Impl& m, Params p, bool hook, cudaStream_t stream, Launch launch) {
  p.do_send = true;
  p.do_recv = !hook;
  launch(p, m.grids, stream);
  if (!hook) return {};
  p.do_send = false;
  p.do_recv = true;
  Buffer::Impl* mp = &m;
  return [mp, p, stream, launch]() {
    mp->check_usable();
    launch(p, mp->grids, stream);
  };
}

}  // namespace

LowLatencyHook Buffer::low_latency_dispatch(const LowLatencyDispatchArgs& a, LowLatencyHandle& h,
                                            const LowLatencyDispatchOutputs& out, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_state(m);
  detail::validate_low_latency_dispatch(a, h, out, m.num_ranks, m.options.num_rdma_bytes);
  h.num_max_dispatch_tokens_per_rank = a.num_max_dispatch_tokens_per_rank;
  h.hidden = a.hidden;
  h.num_experts = a.num_experts;

  detail::LowLatencyDispatchParams p{};
  p.window = ll_window(m, a.num_max_dispatch_tokens_per_rank, a.hidden, a.num_experts);
  p.state = m.ll_state;
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.num_experts = a.num_experts;
  p.num_local_experts = a.num_experts / m.num_ranks;
  p.T = a.num_max_dispatch_tokens_per_rank;
  p.hidden = a.hidden;
  p.num_topk = a.num_topk;
  p.num_tokens = a.num_tokens;
  p.x = a.x;
  p.topk_idx = a.topk_idx;
  p.topk_int64 = a.index_type == IndexType::kInt64;
  p.use_fp8 = a.use_fp8;
  p.round_scale = a.round_scale;
  p.use_ue8m0 = a.use_ue8m0;
  p.packed_x = out.packed_recv_x;
  p.packed_scales = out.packed_recv_scales;
  p.packed_count = out.packed_recv_count;
  p.src_info = h.src_info;
  p.layout_range = h.layout_range;
  p.cumulative_stats = a.cumulative_local_expert_recv_stats;
  p.wait_stats = a.dispatch_wait_recv_cost_stats;
  p.mask = m.shrink_mask;
  p.wait = m.wait_context();
  if (m.transport == detail::Transport::kGin) {  // network path (not yet run on a real network)
    return detail::low_latency_dispatch_gin(m, p, a.return_recv_hook, stream);
  }
  return send_then_receive(m, p, a.return_recv_hook, stream,
                           [](const detail::LowLatencyDispatchParams& q, const detail::GridBudget& g, cudaStream_t s) {
                             detail::launch_low_latency_dispatch(q, detail::low_latency_dispatch_blocks(q, g.max_blocks),
                                                                 g, s);
                           });
}

LowLatencyHook Buffer::low_latency_combine(const LowLatencyCombineArgs& a, const LowLatencyHandle& h,
                                           const LowLatencyCombineOutputs& out, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_state(m);
  detail::validate_low_latency_combine(a, h, out, m.num_ranks, m.options.num_rdma_bytes);
  const int T = h.num_max_dispatch_tokens_per_rank;

  detail::LowLatencyCombineParams p{};
  p.window = ll_window(m, T, h.hidden, h.num_experts);
  p.state = m.ll_state;
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.num_experts = h.num_experts;
  p.num_local_experts = h.num_experts / m.num_ranks;
  p.T = T;
  p.hidden = h.hidden;
  p.num_topk = a.num_topk;
  p.num_tokens = a.num_tokens;
  p.x = a.zero_copy ? get_next_low_latency_combine_buffer(h) : a.x;
  p.src_info = h.src_info;
  p.layout_range = h.layout_range;
  p.topk_idx = a.topk_idx;
  p.topk_int64 = a.index_type == IndexType::kInt64;
  p.topk_weights = a.topk_weights;
  p.use_logfmt = a.use_logfmt;
  p.combined_x = out.combined_x;
  p.wait_stats = a.combine_wait_recv_cost_stats;
  p.mask = m.shrink_mask;
  p.wait = m.wait_context();
  if (m.transport == detail::Transport::kGin) {  // network path (not yet run on a real network)
    OPENEP_CHECK(!a.use_logfmt, ErrorCode::kUnsupported,
                 "low_latency_combine: use_logfmt = true is not available on the GIN transport (this Buffer reaches "
                 "its peers over the network, BufferOptions::allow_network); pass use_logfmt = false");
    return detail::low_latency_combine_gin(m, p, a.zero_copy, a.return_recv_hook, stream);
  }
  return send_then_receive(m, p, a.return_recv_hook, stream,
                           [](const detail::LowLatencyCombineParams& q, const detail::GridBudget& g, cudaStream_t s) {
                             detail::launch_low_latency_combine(q, detail::low_latency_combine_blocks(q, g.max_blocks),
                                                                g, s);
                           });
}

uint16_t* Buffer::get_next_low_latency_combine_buffer(const LowLatencyHandle& h) {
  Impl& m = *impl_;
  require_state(m);
  OPENEP_CHECK_ARG(h.num_max_dispatch_tokens_per_rank > 0, "handle is not filled: pass the handle of a low_latency_dispatch");
  detail::validate_low_latency_shapes(h.num_max_dispatch_tokens_per_rank, h.hidden, h.num_experts, m.num_ranks,
                                      m.options.num_rdma_bytes);
  const LowLatencyLayout l = LowLatencyLayout::make(h.num_max_dispatch_tokens_per_rank, h.hidden, m.num_ranks,
                                                    h.num_experts);
  return reinterpret_cast<uint16_t*>(m.win.local + m.window_layout.rdma_offset +
                                     l.staging_offset);
}

namespace {
int32_t* require_shrink(Buffer::Impl& m, const char* op) {
  m.check_usable();
  OPENEP_CHECK_ARG(m.shrink_mask != nullptr, op, " requires BufferOptions::enable_shrink = true");
  return m.shrink_mask;
}
}  // namespace

void Buffer::low_latency_update_mask_buffer(int rank_to_mask, bool mask, cudaStream_t stream) {
  int32_t* m = require_shrink(*impl_, "low_latency_update_mask_buffer");
  OPENEP_CHECK_ARG(rank_to_mask >= 0 && rank_to_mask < impl_->num_ranks, "rank_to_mask must be in [0, ",
                   impl_->num_ranks, "), got ", rank_to_mask);
  OPENEP_CUDA_CHECK(cudaMemsetAsync(m + rank_to_mask, 0, sizeof(int32_t), stream));
  if (mask) {
    // Little-endian int32: the entry was just zeroed, setting its low byte makes it exactly 1.
    OPENEP_CUDA_CHECK(cudaMemsetAsync(m + rank_to_mask, 1, 1, stream));
  }
}

void Buffer::low_latency_query_mask_buffer(int32_t* mask_status, cudaStream_t stream) {
  int32_t* m = require_shrink(*impl_, "low_latency_query_mask_buffer");
  OPENEP_CHECK_ARG(mask_status != nullptr, "mask_status is null (a device array of num_ranks int32)");
  // Entries are 0 or 1 (set above, or by a kernel's timeout with atomicExch(…, 1)).
  OPENEP_CUDA_CHECK(cudaMemcpyAsync(mask_status, m, sizeof(int32_t) * impl_->num_ranks, cudaMemcpyDeviceToDevice,
                                    stream));
}

void Buffer::low_latency_clean_mask_buffer(cudaStream_t stream) {
  int32_t* m = require_shrink(*impl_, "low_latency_clean_mask_buffer");
  OPENEP_CUDA_CHECK(cudaMemsetAsync(m, 0, sizeof(int32_t) * impl_->num_ranks, stream));
}

void Buffer::clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts,
                                      cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_state(m);
  detail::validate_low_latency_shapes(num_max_dispatch_tokens_per_rank, hidden, num_experts, m.num_ranks,
                                      m.options.num_rdma_bytes);
  barrier(stream);
  if (m.transport == detail::Transport::kGin) detail::launch_gin_reset_signals(m.win.dev_comm, m.num_ranks, stream);
  OPENEP_CUDA_CHECK(cudaMemsetAsync(m.win.local + m.window_layout.rdma_offset, 0,
                                    LowLatencyLayout::kSignalBytes, stream));
  OPENEP_CUDA_CHECK(cudaMemsetAsync(m.ll_state, 0, sizeof(detail::LowLatencyState), stream));
  barrier(stream);
}

}  // namespace openep
