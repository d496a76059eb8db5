// Host side of the intranode normal-mode operations: validation, sizing, the exact-mode host wait, launches.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "kernels/intranode_launch.hpp"
#include "openep/buffer.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"
#include "protocol/intranode_layout.hpp"

namespace openep {

using detail::IntranodeLayout;

size_t intranode_buffer_size_hint(int num_ranks, int max_tokens_per_rank, int hidden, int x_elem_bytes,
                                  int num_scales, int num_topk) {
  OPENEP_CHECK_ARG(num_ranks >= 1 && num_ranks <= IntranodeLayout::kMaxRanks, "num_ranks must be in [1, ",
                   IntranodeLayout::kMaxRanks, "], got ", num_ranks);
  OPENEP_CHECK_ARG(max_tokens_per_rank >= 0 && hidden > 0 && x_elem_bytes > 0 && num_scales >= 0 && num_topk >= 0,
                   "size hint arguments must be non-negative (hidden and x_elem_bytes positive)");
  // Own rows never pass through the window: R - 1 peer parts of max_tokens_per_rank rows (one part at R = 1).
  const size_t rows = static_cast<size_t>(IntranodeLayout::num_peer_slots(num_ranks)) * max_tokens_per_rank;
  const size_t dispatch_bytes =
      rows * IntranodeLayout::dispatch_record_bytes(static_cast<size_t>(hidden) * x_elem_bytes, num_topk, num_scales);
  const size_t combine_bytes = rows * IntranodeLayout::combine_record_bytes(hidden, num_topk);
  const size_t data = dispatch_bytes > combine_bytes ? dispatch_bytes : combine_bytes;
  return (IntranodeLayout::kDataOffset + data + 127) / 128 * 128;
}

namespace detail {

int normal_mode_blocks(const Config& c, const Buffer::Impl& m) {
  OPENEP_CHECK_ARG(c.num_sms >= 2 && c.num_sms % 2 == 0, "config.num_sms must be even and >= 2, got ", c.num_sms);
  OPENEP_CHECK_ARG(c.num_sms <= m.num_device_sms, "config.num_sms (", c.num_sms, ") exceeds the device's ",
                   m.num_device_sms, " SMs");
  if (c.num_sms <= m.grids.max_blocks) return c.num_sms;
  OPENEP_CHECK(m.grids.clamp, ErrorCode::kInternal, "grid budget ", m.grids.max_blocks, " below the device's SMs");
  return m.grids.max_blocks;
}

void validate_normal_dispatch_data(const DispatchArgs& a) {
  OPENEP_CHECK_ARG(a.num_tokens >= 0, "num_tokens must be >= 0, got ", a.num_tokens);
  OPENEP_CHECK_ARG(a.x_elem_bytes == 1 || a.x_elem_bytes == 2, "x_elem_bytes must be 1 (FP8) or 2 (BF16), got ",
                   a.x_elem_bytes);
  OPENEP_CHECK_ARG(a.hidden > 0 && (static_cast<int64_t>(a.hidden) * a.x_elem_bytes) % 16 == 0,
                   "x rows must be a positive multiple of 16 bytes; hidden ", a.hidden, " x ", a.x_elem_bytes,
                   " bytes is not");
  OPENEP_CHECK_ARG(a.num_tokens == 0 || a.x != nullptr, "x is null with num_tokens = ", a.num_tokens);
  OPENEP_CHECK_ARG(a.num_scales >= 0 && a.num_scales <= 1024, "num_scales must be in [0, 1024], got ", a.num_scales);
  OPENEP_CHECK_ARG(a.num_scales == 0 || a.num_tokens == 0 || a.x_scales != nullptr, "x_scales is null with num_scales = ",
                   a.num_scales);
  // Top-k is present iff num_topk > 0 (a tensor with 0 rows may have a null data pointer).
  OPENEP_CHECK_ARG(a.num_topk >= 0 && a.num_topk <= 32, "num_topk must be in [0, 32], got ", a.num_topk);
  OPENEP_CHECK_ARG(a.num_topk == 0 || a.num_tokens == 0 || (a.topk_idx != nullptr && a.topk_weights != nullptr),
                   "topk_idx and topk_weights must both be given when num_topk = ", a.num_topk);
}

void validate_normal_combine_data(const CombineArgs& a, int num_recv_tokens, int num_tokens, const CombineOutputs& out) {
  OPENEP_CHECK_ARG(a.hidden > 0 && a.hidden % 8 == 0, "combine hidden must be a positive multiple of 8, got ",
                   a.hidden);
  OPENEP_CHECK_ARG(num_recv_tokens == 0 || a.x != nullptr, "combine x is null with ", num_recv_tokens, " rows");
  OPENEP_CHECK_ARG(num_tokens == 0 || out.combined_x != nullptr, "combined_x is null");
  OPENEP_CHECK_ARG(a.num_topk >= 0 && a.num_topk <= 32, "num_topk must be in [0, 32], got ", a.num_topk);
  OPENEP_CHECK_ARG(a.num_topk == 0 || num_recv_tokens == 0 || a.topk_weights != nullptr,
                   "topk_weights is null but num_topk = ", a.num_topk);
  OPENEP_CHECK_ARG(a.num_topk == 0 || num_tokens == 0 || out.combined_topk_weights != nullptr,
                   "combined_topk_weights is null but num_topk = ", a.num_topk);
}

}  // namespace detail

namespace {

int num_blocks(const Config& c, const Buffer::Impl& m) { return detail::normal_mode_blocks(c, m); }

size_t dispatch_record_bytes(const DispatchArgs& a, bool with_topk) {
  return IntranodeLayout::dispatch_record_bytes(static_cast<size_t>(a.hidden) * a.x_elem_bytes,
                                                with_topk ? a.num_topk : 0, a.num_scales);
}

void validate_dispatch_data(const DispatchArgs& a, const Buffer::Impl& m) {
  OPENEP_CHECK_ARG(m.num_ranks <= IntranodeLayout::kMaxRanks, "intranode dispatch supports up to ",
                   IntranodeLayout::kMaxRanks, " ranks, the Group has ", m.num_ranks);
  detail::validate_normal_dispatch_data(a);
}

void validate_handle_arrays(const IntranodeHandle& h) {
  OPENEP_CHECK_ARG(h.rank_prefix_matrix != nullptr, "handle.rank_prefix_matrix is null");
  OPENEP_CHECK_ARG(h.num_tokens_per_src != nullptr, "handle.num_tokens_per_src is null");
  OPENEP_CHECK_ARG(h.num_tokens == 0 || h.send_pos != nullptr, "handle.send_pos is null");
}

// First check of every intranode operation (before any argument is looked at).
void require_nvlink(const Buffer::Impl& m) {
  OPENEP_CHECK(m.transport == detail::Transport::kNvlink, ErrorCode::kUnsupported,
               "normal-mode (intranode) operations need every rank in one NVLink domain; this Buffer spans several",
               detail::is_internode(m.transport)
                   ? " nodes: use the internode operations (internode_dispatch_prepare / internode_dispatch / "
                     "internode_combine)"
                   : " and uses the network transport, which serves the low-latency operations only");
}

detail::WindowRef window_ref(const Buffer::Impl& m) {
  // Every normal-mode operation builds its window through here before it launches anything.
  require_nvlink(m);
  return detail::WindowRef{m.peer_bases_device, m.window_layout.nvl_offset, m.window_layout.barrier_offset};
}

detail::PrepareParams prepare_params(Buffer::Impl& m) {
  detail::PrepareParams p{};
  p.window = window_ref(m);
  p.barrier_epoch = &m.local_state->barrier_epoch[detail::kIntranodeBarrierSlot];
  p.barrier_slot = detail::kIntranodeBarrierSlot;
  p.op_epoch = &m.local_state->op_epoch;
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.wait = m.wait_context();
  return p;
}

// Fills the dispatch kernel's parameters common to fresh and cached dispatch.
detail::DispatchParams dispatch_params(Buffer::Impl& m, const DispatchArgs& a, const IntranodeHandle& h,
                                       const DispatchOutputs& out, bool with_topk) {
  OPENEP_CHECK_ARG(h.num_tokens == a.num_tokens, "handle.num_tokens (", h.num_tokens, ") differs from num_tokens (",
                   a.num_tokens, ")");
  OPENEP_CHECK_ARG(h.num_recv_tokens == 0 || out.recv_x != nullptr, "recv_x is null with ", h.num_recv_tokens,
                   " rows to receive");
  OPENEP_CHECK_ARG(h.num_recv_tokens == 0 || h.recv_src_idx != nullptr, "handle.recv_src_idx is null with ",
                   h.num_recv_tokens, " rows to receive");
  OPENEP_CHECK_ARG(a.num_scales == 0 || h.num_recv_tokens == 0 || out.recv_x_scales != nullptr,
                   "recv_x_scales is null but num_scales = ", a.num_scales);
  OPENEP_CHECK_ARG(!with_topk || h.num_recv_tokens == 0 || (out.recv_topk_idx && out.recv_topk_weights),
                   "recv_topk_idx and recv_topk_weights are required when topk_idx is given");
  detail::DispatchParams p{};
  p.window = window_ref(m);
  p.op_epoch = &m.local_state->op_epoch;
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.x = a.x;
  p.num_tokens = a.num_tokens;
  p.row_bytes = a.hidden * a.x_elem_bytes;
  p.x_scales = static_cast<const uint32_t*>(a.x_scales);
  p.num_scales = a.num_scales;
  p.scale_token_stride = a.scale_token_stride;
  p.scale_hidden_stride = a.scale_hidden_stride;
  p.topk_idx = with_topk ? a.topk_idx : nullptr;
  p.topk_int64 = a.index_type == IndexType::kInt64;
  p.topk_weights = with_topk ? a.topk_weights : nullptr;
  p.num_topk = with_topk ? a.num_topk : 0;
  p.experts_per_rank = a.num_experts > 0 ? a.num_experts / m.num_ranks : 1;
  p.send_pos = h.send_pos;
  p.rank_prefix_matrix = h.rank_prefix_matrix;
  p.num_tokens_per_src = h.num_tokens_per_src;
  p.recv_x = out.recv_x;
  p.recv_x_scales = static_cast<uint32_t*>(out.recv_x_scales);
  p.recv_topk_idx = with_topk ? out.recv_topk_idx : nullptr;
  p.recv_topk_weights = with_topk ? out.recv_topk_weights : nullptr;
  p.recv_src_idx = h.recv_src_idx;
  p.num_worst_tokens = with_topk ? a.num_worst_tokens : 0;
  p.record_bytes = static_cast<int>(dispatch_record_bytes(a, with_topk));
  p.peer_rows = IntranodeLayout::dispatch_peer_rows(m.options.num_nvl_bytes, p.record_bytes, m.num_ranks);
  p.round = 0, p.num_rounds = 1;  // launch_dispatch_rounds sets the rounds
  p.wait = m.wait_context();
  return p;
}

// Rounds of a dispatch through window parts of `peer_rows` records (IntranodeLayout::num_rounds): more than one only
// with an exact-mode handle (max_pair_rows > 0: every rank knows the same count matrix) in which one rank sends
// another more rows than a part holds. Worst-case handles (max_pair_rows = 0) take one round; the kernel checks on
// every rank that it fits (kCapacityExceeded, nobody writes) since no host knows the pairs' counts.
int64_t dispatch_rounds(const Buffer::Impl& m, const IntranodeHandle& h, int64_t peer_rows) {
  if (h.max_pair_rows <= peer_rows) return 1;
  OPENEP_CHECK(peer_rows >= 1, ErrorCode::kBufferTooSmall, "the Buffer holds no dispatch row at all (num_nvl_bytes = ",
               m.options.num_nvl_bytes, ")");
  return IntranodeLayout::num_rounds(h.max_pair_rows, peer_rows);
}

// Launches a dispatch in `rounds` rounds. Every round after the first starts with the prepare kernel's barrier: that
// is the flow control (every peer has drained the previous round from its window before anyone writes the next)
// and it gives the round a fresh epoch for the chunk flags.
void launch_dispatch_rounds(Buffer::Impl& m, detail::DispatchParams p, int64_t rounds, int64_t need, int blocks,
                            cudaStream_t stream) {
  p.num_rounds = static_cast<int>(rounds);
  // Equal rounds (parts of ceil(need / rounds) records, the same on every rank): a short last round would run on a
  // few blocks only (measured: the second of two rounds holding 5-19% of the rows cost 20-27%, DESIGN.md).
  if (rounds > 1) p.peer_rows = (need + rounds - 1) / rounds;
  for (int64_t k = 0; k < rounds; ++k) {
    if (k > 0) {
      detail::PrepareParams pp = prepare_params(m);
      pp.exchange = false;
      detail::launch_intranode_prepare(pp, stream);
    }
    p.round = static_cast<int>(k);
    detail::launch_intranode_dispatch(p, blocks, stream);
  }
}

// Share of combine blocks that push rows back (the rest reduce). Default 30% (measured best of 30/40/50% on
// 2x H200, docs/BENCHMARKS.md); OPENEP_COMBINE_SENDER_PERCENT overrides it for tuning sweeps.
int combine_senders(int blocks) {
  static const int percent = [] {
    const char* v = std::getenv("OPENEP_COMBINE_SENDER_PERCENT");
    const int p = v ? std::atoi(v) : 30;
    return p < 1 ? 1 : (p > 99 ? 99 : p);
  }();
  const int s = blocks * percent / 100;
  return s < 1 ? 1 : (s >= blocks ? blocks - 1 : s);
}

int dispatch_senders(int blocks) {
  const int s = blocks - blocks / 3;  // two thirds push (remote + own rows), one third drains the window
  return s < 1 ? 1 : (s >= blocks ? blocks - 1 : s);
}

// Offset of [ptr, ptr + bytes) from the window base if it lies in the recv pool (Buffer::alloc_recv), else -1.
int64_t pool_offset(const Buffer::Impl& m, const void* ptr, size_t bytes) {
  if (m.window_layout.pool_bytes == 0 || !ptr) return -1;
  const char* lo = m.pool_base();
  const char* hi = lo + m.window_layout.pool_bytes;
  const char* c = static_cast<const char*>(ptr);
  return c >= lo && c + bytes <= hi ? static_cast<int64_t>(c - m.win.local) : -1;
}

// Window-backed outputs (Buffer::alloc_recv): when every output this dispatch writes lies in the pool, the peers store
// rows straight into them (their offsets go to the peers in the kernel's OutputDesc) and this rank's receivers only
// wait for the flags, so all blocks but one push. Otherwise the rows come through the window and are copied out.
void set_output_pool(const Buffer::Impl& m, detail::DispatchParams& p, int num_recv_rows, int blocks) {
  p.out_pool = false;
  p.out_x = p.out_scales = p.out_topk_idx = p.out_topk_weights = p.out_src_idx = -1;
  p.num_senders = dispatch_senders(blocks);
  if (m.window_layout.pool_bytes == 0 || num_recv_rows <= 0) return;
  auto offset = [&](const void* ptr, size_t bytes) { return pool_offset(m, ptr, bytes); };
  const size_t n = static_cast<size_t>(num_recv_rows);
  p.out_x = offset(p.recv_x, n * p.row_bytes);
  bool all = p.out_x >= 0;
  if (p.num_scales > 0) all &= (p.out_scales = offset(p.recv_x_scales, n * p.num_scales * 4)) >= 0;
  if (p.num_topk > 0) {
    all &= (p.out_topk_idx = offset(p.recv_topk_idx, n * p.num_topk * (p.topk_int64 ? 8 : 4))) >= 0;
    all &= (p.out_topk_weights = offset(p.recv_topk_weights, n * p.num_topk * 4)) >= 0;
  }
  if (p.recv_src_idx) all &= (p.out_src_idx = offset(p.recv_src_idx, n * 4)) >= 0;
  p.out_pool = all;
  if (p.out_pool) p.num_senders = blocks - 1;  // one receiver block waits for the flags
}

}  // namespace

DispatchCounts Buffer::dispatch_prepare(const DispatchArgs& a, IntranodeHandle& h, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_nvlink(m);
  validate_dispatch_data(a, m);
  const int R = m.num_ranks;
  num_blocks(a.config, m);
  OPENEP_CHECK_ARG(a.is_token_in_rank || a.num_tokens == 0, "is_token_in_rank is null");
  OPENEP_CHECK_ARG(a.num_tokens_per_rank != nullptr, "num_tokens_per_rank is null");
  OPENEP_CHECK_ARG(a.num_tokens_per_expert != nullptr, "num_tokens_per_expert is null");
  OPENEP_CHECK_ARG(a.num_experts > 0 && a.num_experts % R == 0, "num_experts (", a.num_experts,
                   ") must be a positive multiple of the number of ranks (", R, ")");
  OPENEP_CHECK_ARG(a.num_experts / R <= IntranodeLayout::kMaxLocalExperts, "at most ",
                   IntranodeLayout::kMaxLocalExperts, " experts per rank are supported, got ", a.num_experts / R);
  OPENEP_CHECK_ARG(a.expert_alignment >= 1, "expert_alignment must be >= 1, got ", a.expert_alignment);
  OPENEP_CHECK_ARG(a.num_worst_tokens >= 0, "num_worst_tokens must be >= 0, got ", a.num_worst_tokens);
  OPENEP_CHECK_ARG(a.num_worst_tokens == 0 || a.num_topk > 0,
                   "num_worst_tokens > 0 requires topk_idx and topk_weights (DeepEP V1 behaviour)");
  h.num_tokens = a.num_tokens;
  h.is_token_in_rank = a.is_token_in_rank;
  validate_handle_arrays(h);

  const size_t record = dispatch_record_bytes(a, a.num_topk > 0);
  const int64_t peer_rows = IntranodeLayout::dispatch_peer_rows(m.options.num_nvl_bytes, record, R);
  // Worst-case mode: no host knows the pairs' counts, so the rounds come from the caller's bounds, the same on every
  // rank: a peer sends at most min(num_worst_tokens, token bound) rows, the token bound being max_tokens_per_rank
  // (or, when 0, num_tokens, which then must be equal on every rank; DispatchArgs). The kernels check the real counts
  // on every rank against those rounds (kCapacityExceeded at the next synchronisation, nothing written).
  const int token_bound = std::max(a.num_tokens, a.max_tokens_per_rank);
  const int pair_bound = std::min(a.num_worst_tokens, token_bound);
  OPENEP_CHECK(a.num_worst_tokens == 0 || R == 1 || pair_bound == 0 || peer_rows >= 1, ErrorCode::kBufferTooSmall,
               "worst-case dispatch: the Buffer holds no dispatch record per peer (", record, " bytes each, "
               "num_nvl_bytes = ", m.options.num_nvl_bytes, ")");

  const bool exact = a.num_worst_tokens == 0;
  detail::PrepareParams p = prepare_params(m);
  p.exchange = true;
  p.num_tokens = a.num_tokens;
  p.num_tokens_per_rank = a.num_tokens_per_rank;
  p.num_tokens_per_expert = a.num_tokens_per_expert;
  p.is_token_in_rank = a.is_token_in_rank;
  p.num_experts = a.num_experts;
  p.expert_alignment = a.expert_alignment;
  p.num_worst_tokens = a.num_worst_tokens;
  p.rank_prefix_matrix = h.rank_prefix_matrix;
  p.num_tokens_per_src = h.num_tokens_per_src;
  p.send_pos = h.send_pos;
  p.num_recv_tokens_per_expert = nullptr;
  p.host = exact ? m.host_counters_device : nullptr;
  p.host_seq = exact ? ++m.host_seq : 0;
  detail::launch_intranode_prepare(p, stream);

  DispatchCounts counts;
  if (!exact) {
    counts.num_recv_tokens = a.num_worst_tokens;
    h.num_recv_tokens = a.num_worst_tokens;
    // The rounds of this dispatch, its cached dispatches and combines follow the caller's bounds (see above).
    h.max_pair_rows = R > 1 ? pair_bound : 0;
    h.max_num_tokens = token_bound;
    return counts;
  }
  // The one host wait of the exact mode: poll the mapped counters (bounded, and errors are raised).
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(m.options.timeout_seconds + 5.0);
  const volatile int64_t* seq = &m.host_counters->seq;
  for (uint32_t i = 0; *seq != p.host_seq; ++i) {
    if ((i & 1023) == 0) {
      m.raise_device_error();
      OPENEP_CHECK(std::chrono::steady_clock::now() < deadline, ErrorCode::kTimeout, "dispatch_prepare on rank ",
                   m.rank, ": the receive counts did not arrive within ", m.options.timeout_seconds + 5.0,
                   " s (is the stream blocked, or a peer not calling dispatch?)");
      std::this_thread::yield();
    }
  }
  m.raise_device_error();
  const volatile detail::HostCounters* hc = m.host_counters;
  counts.num_recv_tokens = hc->num_recv_tokens;
  const int E_local = a.num_experts / R;
  counts.num_recv_tokens_per_expert.resize(E_local);
  for (int e = 0; e < E_local; ++e) counts.num_recv_tokens_per_expert[e] = hc->num_recv_tokens_per_expert[e];
  h.num_recv_tokens = counts.num_recv_tokens;
  h.max_pair_rows = hc->max_pair_rows;
  h.max_num_tokens = hc->max_num_tokens;
  // Any batch runs in rounds; only a Buffer without room for one record per peer cannot (the same on every rank).
  OPENEP_CHECK(h.max_pair_rows == 0 || peer_rows >= 1, ErrorCode::kBufferTooSmall, "rank ", m.rank,
               ": the Buffer holds no dispatch record per peer (", record, " bytes each, num_nvl_bytes = ",
               m.options.num_nvl_bytes, "); it needs num_nvl_bytes >= ",
               intranode_buffer_size_hint(R, 1, a.hidden, a.x_elem_bytes, a.num_scales, a.num_topk));
  return counts;
}

void Buffer::dispatch(const DispatchArgs& a, const IntranodeHandle& h, const DispatchOutputs& out,
                      cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_nvlink(m);
  validate_dispatch_data(a, m);
  const int blocks = num_blocks(a.config, m);
  validate_handle_arrays(h);
  detail::DispatchParams p = dispatch_params(m, a, h, out, a.num_topk > 0);
  set_output_pool(m, p, h.num_recv_tokens, blocks);
  launch_dispatch_rounds(m, p, dispatch_rounds(m, h, p.peer_rows), h.max_pair_rows, blocks, stream);
}

void Buffer::dispatch_cached(const DispatchArgs& a, const IntranodeHandle& h, const DispatchOutputs& out,
                             cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_nvlink(m);
  validate_dispatch_data(a, m);
  OPENEP_CHECK_ARG(a.num_topk == 0 && a.topk_idx == nullptr && a.topk_weights == nullptr,
                   "cached dispatch takes no topk_idx/topk_weights (the handle fixes the layout)");
  const int blocks = num_blocks(a.config, m);
  validate_handle_arrays(h);
  const int64_t peer_rows =
      IntranodeLayout::dispatch_peer_rows(m.options.num_nvl_bytes, dispatch_record_bytes(a, false), m.num_ranks);
  const int64_t rounds = dispatch_rounds(m, h, peer_rows);  // a worst-case handle: one round, checked by the kernel
  detail::PrepareParams pp = prepare_params(m);
  pp.exchange = false;
  detail::launch_intranode_prepare(pp, stream);
  detail::DispatchParams p = dispatch_params(m, a, h, out, false);
  p.recv_src_idx = nullptr;  // the handle's copy is already right and must stay unmodified
  set_output_pool(m, p, h.num_recv_tokens, blocks);
  launch_dispatch_rounds(m, p, rounds, h.max_pair_rows, blocks, stream);
}

void Buffer::combine(const CombineArgs& a, const IntranodeHandle& h, const CombineOutputs& out, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_nvlink(m);
  const int blocks = num_blocks(a.config, m);
  validate_handle_arrays(h);
  OPENEP_CHECK_ARG(m.num_ranks <= IntranodeLayout::kMaxRanks, "intranode combine supports up to ",
                   IntranodeLayout::kMaxRanks, " ranks, the Group has ", m.num_ranks);
  detail::validate_normal_combine_data(a, h.num_recv_tokens, h.num_tokens, out);
  OPENEP_CHECK_ARG(h.num_recv_tokens == 0 || h.recv_src_idx != nullptr, "handle.recv_src_idx is null");
  const int K = a.num_topk;
  const size_t record = IntranodeLayout::combine_record_bytes(a.hidden, K);
  const int64_t stage_rows = IntranodeLayout::combine_stage_rows(m.options.num_nvl_bytes, record, m.num_ranks);
  // The stage holds each peer's rows in its receive order (IntranodeLayout::combine_slot): one round when every
  // pair's rows fit a part (max_pair_rows: exact, or the caller's bound in worst-case mode), else rounds of the
  // owner's tokens, at most stage_rows each. The same on every rank; the kernel checks the real counts.
  const int64_t rounds = IntranodeLayout::combine_rounds(h.max_pair_rows, h.max_num_tokens, stage_rows);
  OPENEP_CHECK(rounds >= 1, ErrorCode::kBufferTooSmall, "combine: the Buffer holds no stage row per peer (",
               record, " bytes each, num_nvl_bytes = ", m.options.num_nvl_bytes, "); it needs num_nvl_bytes >= ",
               intranode_buffer_size_hint(m.num_ranks, 1, a.hidden, 2, 0, K));
  detail::PrepareParams pp = prepare_params(m);
  pp.exchange = false;
  detail::launch_intranode_prepare(pp, stream);
  detail::CombineParams p{};
  p.window = window_ref(m);
  p.op_epoch = &m.local_state->op_epoch;
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.num_senders = combine_senders(blocks);
  p.x = a.x;
  p.hidden = a.hidden;
  p.topk_weights = a.topk_weights;
  p.num_topk = K;
  p.bias_0 = a.bias_0;
  p.bias_1 = a.bias_1;
  p.num_tokens = h.num_tokens;
  p.send_pos = h.send_pos;
  p.rank_prefix_matrix = h.rank_prefix_matrix;
  p.num_tokens_per_src = h.num_tokens_per_src;
  p.recv_src_idx = h.recv_src_idx;
  p.combined_x = out.combined_x;
  p.combined_topk_weights = K ? out.combined_topk_weights : nullptr;
  p.record_bytes = static_cast<int>(record);
  // Equal rounds of ceil(max_num_tokens / rounds) <= stage_rows tokens (see launch_dispatch_rounds); the same on
  // every rank.
  const int64_t round_tokens = rounds > 1 ? (h.max_num_tokens + rounds - 1) / rounds : 0;
  p.stage_rows = stage_rows;
  p.tok_lo = 0, p.tok_hi = INT_MAX, p.num_rounds = static_cast<int>(rounds);
  // Window-backed input (x and the weights from Buffer::alloc_recv): the owners pull the rows, nothing is pushed.
  const size_t n = static_cast<size_t>(h.num_recv_tokens);
  p.in_x = n ? pool_offset(m, a.x, n * a.hidden * 2) : -1;
  p.in_topk_weights = n && K ? pool_offset(m, a.topk_weights, n * K * sizeof(float)) : -1;
  p.in_pool = p.in_x >= 0 && (K == 0 || p.in_topk_weights >= 0);
  if (p.in_pool) p.num_senders = 0;
  p.ticket = &m.local_state->combine_ticket;
  p.wait = m.wait_context();
  for (int64_t k = 0; k < rounds; ++k) {
    if (k > 0) detail::launch_intranode_prepare(pp, stream);  // barrier (the stage is free again) and a new epoch
    p.round = static_cast<int>(k);
    if (rounds > 1) p.tok_lo = static_cast<int>(k * round_tokens), p.tok_hi = static_cast<int>((k + 1) * round_tokens);
    detail::launch_intranode_combine(p, blocks, stream);
  }
}

}  // namespace openep
