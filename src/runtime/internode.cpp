// Host side of internode normal mode (include/openep/internode.hpp, docs/INTERNODE.md): validation, sizing, the
// exact-mode host wait, the rail legs between the kernels, bounded synchronisation.
#include <algorithm>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "kernels/internode_launch.hpp"
#include "openep/buffer.hpp"
#include "protocol/internode_layout.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"
#include "runtime/rail.hpp"

namespace openep {

using detail::InternodeNvlLayout;
using detail::InternodeRailLayout;
using detail::InternodeRecord;

InternodeBufferSize internode_buffer_size_hint(int num_ranks, int ranks_per_node, int max_tokens_per_rank, int hidden,
                                               int x_elem_bytes, int num_scales, int num_topk) {
  OPENEP_CHECK_ARG(ranks_per_node >= 1 && ranks_per_node <= detail::kMaxInternodeRanksPerNode,
                   "ranks_per_node must be in [1, ", detail::kMaxInternodeRanksPerNode, "], got ", ranks_per_node);
  OPENEP_CHECK_ARG(num_ranks >= ranks_per_node && num_ranks % ranks_per_node == 0 && num_ranks <= kMaxRanks,
                   "num_ranks must be a multiple of ranks_per_node (", ranks_per_node, ") up to ", kMaxRanks, ", got ",
                   num_ranks);
  OPENEP_CHECK_ARG(max_tokens_per_rank >= 0 && hidden > 0 && x_elem_bytes > 0 && num_scales >= 0 && num_topk >= 0,
                   "size hint arguments must be non-negative (hidden and x_elem_bytes positive)");
  const int R = num_ranks, M = ranks_per_node, N = R / M;
  const size_t row = static_cast<size_t>(hidden) * x_elem_bytes;
  const size_t cmb = InternodeRecord::combine_bytes(hidden, num_topk);
  const size_t nvl_row = std::max(InternodeRecord::nvl_bytes(row, num_topk, num_scales), cmb);
  const size_t rail_entry = std::max(InternodeRecord::rail_bytes(row, M, num_topk, num_scales), cmb);
  const size_t T = static_cast<size_t>(max_tokens_per_rank);
  InternodeBufferSize s;
  s.num_nvl_bytes = InternodeNvlLayout::bytes_for_half(static_cast<size_t>(R) * T * nvl_row, R, M);
  s.num_rdma_bytes = detail::align_up(2 * detail::align_up(static_cast<size_t>(N) * T * rail_entry, 16), 128);
  if (s.num_rdma_bytes == 0) s.num_rdma_bytes = 128;
  return s;
}

namespace {

int blocks_of(const Config& c, const Buffer::Impl& m) { return detail::normal_mode_blocks(c, m); }

void require_internode(const Buffer::Impl& m, const char* op) {
  OPENEP_CHECK(m.internode(), ErrorCode::kUnsupported, op, " needs an internode Buffer (a Group over several nodes, "
               "normal mode, num_rdma_bytes > 0); this Buffer's ranks share one NVLink domain: use the intranode "
               "operations (dispatch_prepare / dispatch / combine)");
}

detail::InternodeNodeRef node_ref(const Buffer::Impl& m) {
  detail::InternodeNodeRef n{};
  n.peer_bases = m.peer_bases_device;
  n.nvl_offset = m.window_layout.nvl_offset;
  n.layout = InternodeNvlLayout::make(m.options.num_nvl_bytes, m.num_ranks, m.in.ranks_per_node);
  n.local_rank = m.in.local_rank;
  n.ranks_per_node = m.in.ranks_per_node;
  n.node = m.in.node;
  n.num_nodes = m.in.num_nodes;
  return n;
}

size_t row_bytes(const DispatchArgs& a) { return static_cast<size_t>(a.hidden) * a.x_elem_bytes; }

// Record, receive-row and combine-entry sizes of a dispatch with (or without) top-k.
struct Sizes {
  size_t rail_record, nvl_row, combine;
};
Sizes sizes_of(const Buffer::Impl& m, const DispatchArgs& a, int K) {
  Sizes s;
  s.rail_record = InternodeRecord::rail_bytes(row_bytes(a), m.in.ranks_per_node, K, a.num_scales);
  s.nvl_row = InternodeRecord::nvl_bytes(row_bytes(a), K, a.num_scales);
  s.combine = InternodeRecord::combine_bytes(a.hidden, K);
  return s;
}

void validate_data(const DispatchArgs& a, const Buffer::Impl&) { detail::validate_normal_dispatch_data(a); }

void validate_outputs(const DispatchArgs& a, const InternodeHandle& h, const DispatchOutputs& out, bool with_topk) {
  OPENEP_CHECK_ARG(h.num_tokens == a.num_tokens, "handle.num_tokens (", h.num_tokens, ") differs from num_tokens (",
                   a.num_tokens, ")");
  OPENEP_CHECK_ARG(h.num_recv_tokens == 0 || out.recv_x != nullptr, "recv_x is null with ", h.num_recv_tokens,
                   " rows to receive");
  OPENEP_CHECK_ARG(a.num_scales == 0 || h.num_recv_tokens == 0 || out.recv_x_scales != nullptr,
                   "recv_x_scales is null but num_scales = ", a.num_scales);
  OPENEP_CHECK_ARG(!with_topk || h.num_recv_tokens == 0 || (out.recv_topk_idx && out.recv_topk_weights),
                   "recv_topk_idx and recv_topk_weights are required when topk_idx is given");
  OPENEP_CHECK_ARG(h.num_tokens == 0 || (h.send_pos && h.send_rdma_head), "handle.send_pos / send_rdma_head is null");
  OPENEP_CHECK_ARG(h.node_prefix && h.recv_gbl_rank_prefix_sum && h.recv_rdma_rank_prefix_sum,
                   "handle.node_prefix, recv_gbl_rank_prefix_sum and recv_rdma_rank_prefix_sum are required");
}

// Entry bases of the rail halves and the transfers of one leg. Exact / cached: only the records that exist,
// packed by node; worst-case: records_per_node slots per node.
struct Leg {
  detail::InternodeRailBases bases{};
  std::vector<int64_t> send_count, recv_count;  // [N] entries
};
Leg leg_of(const Buffer::Impl& m, const InternodeHandle& h) {
  const int N = m.in.num_nodes;
  Leg l;
  l.send_count.assign(N, 0);
  l.recv_count.assign(N, 0);
  int64_t s = 0, r = 0;
  for (int n = 0; n < N; ++n) {
    const bool exact = !h.rdma_send_counts.empty();
    l.bases.send[n] = exact ? s : static_cast<int64_t>(n) * h.records_per_node;
    l.bases.recv[n] = exact ? r : static_cast<int64_t>(n) * h.records_per_node;
    l.send_count[n] = exact ? h.rdma_send_counts[n] : h.records_per_node;
    l.recv_count[n] = exact ? h.rdma_recv_counts[n] : h.records_per_node;
    s += l.send_count[n];
    r += l.recv_count[n];
  }
  return l;
}
// Entries one half must hold for this leg.
int64_t entries_needed(const Leg& l, bool send_half, int own_node) {
  int64_t e = 0;
  const auto& c = send_half ? l.send_count : l.recv_count;
  const auto& b = send_half ? l.bases.send : l.bases.recv;
  for (size_t n = 0; n < c.size(); ++n)
    if (send_half || static_cast<int>(n) != own_node) e = std::max<int64_t>(e, b[n] + c[n]);
  return e;
}

// `forward`: half A -> half B (dispatch records); else half B -> half A (combine partials). Chunk `chunk` of
// `num_chunks` of every transfer (detail::rail_chunk; both ends cut the same count the same way).
void rail_leg(Buffer::Impl& m, const Leg& l, size_t entry_bytes, bool forward, int chunk, int num_chunks,
              cudaStream_t stream) {
  const InternodeRailLayout rl = InternodeRailLayout::make(m.options.num_rdma_bytes);
  std::vector<detail::RailTransfer> x;
  for (int n = 0; n < m.in.num_nodes; ++n) {
    if (n == m.in.node) continue;
    // Dispatch sends my records to n (send_count) and receives n's (recv_count); combine goes back.
    const int64_t out_count = forward ? l.send_count[n] : l.recv_count[n];
    const int64_t in_count = forward ? l.recv_count[n] : l.send_count[n];
    const int64_t out_base = forward ? l.bases.send[n] : l.bases.recv[n];
    const int64_t in_base = forward ? l.bases.recv[n] : l.bases.send[n];
    const detail::EntryRange o = detail::rail_chunk(out_count, chunk, num_chunks);
    const detail::EntryRange i = detail::rail_chunk(in_count, chunk, num_chunks);
    detail::RailTransfer t;
    t.node = n;
    t.send_offset = forward ? rl.a(out_base + o.lo, entry_bytes) : rl.b(out_base + o.lo, entry_bytes);
    t.recv_offset = forward ? rl.b(in_base + i.lo, entry_bytes) : rl.a(in_base + i.lo, entry_bytes);
    t.send_bytes = static_cast<size_t>(o.hi - o.lo) * entry_bytes;
    t.recv_bytes = static_cast<size_t>(i.hi - i.lo) * entry_bytes;
    x.push_back(t);
  }
  m.in.rail->exchange(m.in.rail_buffer, m.in.rail_buffer, x, stream);
}

int chunks_of(const Config& c) {
  OPENEP_CHECK_ARG(c.num_internode_chunks >= 1 && c.num_internode_chunks <= detail::kMaxInternodeChunks,
                   "config.num_internode_chunks must be in [1, ", detail::kMaxInternodeChunks, "], got ",
                   c.num_internode_chunks);
  return c.num_internode_chunks;
}

// Orders the rail stream after `stream`'s work so far (fork), or `stream` after the rail's (join), through event
// `slot`. No-ops when the rail runs on the operation's stream.
cudaStream_t rail_stream_of(const Buffer::Impl& m, cudaStream_t stream) {
  return m.in.rail_stream ? m.in.rail_stream : stream;
}
void order_after(const Buffer::Impl& m, cudaStream_t waiter, cudaStream_t signaller, int slot) {
  if (!m.in.rail_stream || waiter == signaller) return;
  OPENEP_CUDA_CHECK(cudaEventRecord(m.in.rail_events[slot], signaller));
  OPENEP_CUDA_CHECK(cudaStreamWaitEvent(waiter, m.in.rail_events[slot], 0));
}

// Chunk part of a forward / node-reduce launch.
detail::InternodeChunk own_part(bool release) {
  detail::InternodeChunk c;
  c.own_node = 1, c.release = release ? 1 : 0;
  return c;
}
detail::InternodeChunk remote_part(const InternodeHandle& h, int chunk, int num_chunks, bool release) {
  detail::InternodeChunk c;
  c.own_node = 0, c.chunk = chunk, c.num_chunks = num_chunks, c.release = release ? 1 : 0;
  c.slots_per_node = h.rdma_send_counts.empty() ? h.records_per_node : 0;
  return c;
}

std::string rail_peers(const Buffer::Impl& m) {
  std::string s;
  for (int n = 0; n < m.in.num_nodes; ++n)
    if (n != m.in.node) s += (s.empty() ? "" : ", ") + std::to_string(n * m.in.ranks_per_node + m.in.local_rank);
  return s;
}

// Past the deadline: the network leg is stuck (a dead or stalled node). Abort the rail so that NCCL's kernels
// end, poison the Buffer and raise.
[[noreturn]] void rail_timeout(Buffer::Impl& m, const char* phase, double seconds) {
  m.failed = true;
  const bool aborted = m.in.rail->can_hang();
  if (aborted) m.in.rail->abort();
  OPENEP_CHECK(false, ErrorCode::kTimeout, "rank ", m.rank, ": ", phase, " did not complete within ", seconds,
               " s; the network leg to its rail peers (ranks ", rail_peers(m), ") is stalled or a peer is dead",
               aborted ? " (the rail communicator was aborted)" : "", ". This Buffer refuses further work; destroy it.");
}

void check_rail_capacity(const Buffer::Impl& m, const Leg& l, const Sizes& s, int K, const DispatchArgs& a) {
  const InternodeRailLayout rl = InternodeRailLayout::make(m.options.num_rdma_bytes);
  const int64_t need_a = entries_needed(l, true, m.in.node), need_b = entries_needed(l, false, m.in.node);
  const size_t entry = std::max(s.rail_record, s.combine);
  const bool fits = need_a <= rl.capacity(entry) && need_b <= rl.capacity(entry);
  if (fits) return;
  const int64_t most = std::max(need_a, need_b);
  const int64_t per_rank = (most + m.in.num_nodes - 1) / m.in.num_nodes;
  OPENEP_CHECK(false, ErrorCode::kBufferTooSmall, "internode dispatch on rank ", m.rank, " needs ", most,
               " rail entries of ", entry, " bytes per half but num_rdma_bytes = ", m.options.num_rdma_bytes, " holds ",
               rl.capacity(entry), "; it needs num_rdma_bytes >= ",
               internode_buffer_size_hint(m.num_ranks, m.in.ranks_per_node, static_cast<int>(per_rank), a.hidden,
                                          a.x_elem_bytes, a.num_scales, K).num_rdma_bytes);
}

}  // namespace

void Buffer::Impl::synchronize_bounded(cudaStream_t stream, const char* phase) {
  const double seconds = options.timeout_seconds + 5.0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  for (uint32_t i = 0;; ++i) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) break;
    OPENEP_CHECK(e == cudaErrorNotReady, ErrorCode::kCuda, "cudaStreamQuery: ", cudaGetErrorString(e));
    if ((i & 255) == 0) {
      raise_device_error();
      if (std::chrono::steady_clock::now() > deadline) rail_timeout(*this, phase, seconds);
    }
    std::this_thread::yield();
  }
  raise_device_error();
}

InternodeDispatchCounts Buffer::internode_dispatch_prepare(const DispatchArgs& a, InternodeHandle& h,
                                                           cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_internode(m, "internode_dispatch_prepare");
  validate_data(a, m);
  const int R = m.num_ranks, M = m.in.ranks_per_node, N = m.in.num_nodes;
  blocks_of(a.config, m);
  OPENEP_CHECK_ARG(a.is_token_in_rank || a.num_tokens == 0, "is_token_in_rank is null");
  OPENEP_CHECK_ARG(a.num_tokens_per_rank && a.num_tokens_per_expert && a.num_tokens_per_rdma_rank,
                   "num_tokens_per_rank, num_tokens_per_rdma_rank and num_tokens_per_expert are required (internode "
                   "get_dispatch_layout's outputs)");
  OPENEP_CHECK_ARG(a.num_experts > 0 && a.num_experts % R == 0, "num_experts (", a.num_experts,
                   ") must be a positive multiple of the number of ranks (", R, ")");
  const int El = a.num_experts / R;
  OPENEP_CHECK_ARG(El <= detail::kMaxInternodeLocalExperts, "at most ", detail::kMaxInternodeLocalExperts,
                   " experts per rank are supported, got ", El);
  OPENEP_CHECK_ARG(a.expert_alignment >= 1, "expert_alignment must be >= 1, got ", a.expert_alignment);
  OPENEP_CHECK_ARG(a.num_worst_tokens >= 0, "num_worst_tokens must be >= 0, got ", a.num_worst_tokens);
  OPENEP_CHECK_ARG(a.num_worst_tokens == 0 || a.num_topk > 0,
                   "num_worst_tokens > 0 requires topk_idx and topk_weights (DeepEP V1 behaviour)");
  OPENEP_CHECK_ARG(a.max_tokens_per_rank >= 0, "max_tokens_per_rank must be >= 0, got ", a.max_tokens_per_rank);
  const bool exact = a.num_worst_tokens == 0;
  const int records_per_node = a.max_tokens_per_rank > 0 ? a.max_tokens_per_rank : a.num_tokens;
  OPENEP_CHECK_ARG(a.num_tokens <= records_per_node, "num_tokens (", a.num_tokens, ") exceeds max_tokens_per_rank (",
                   a.max_tokens_per_rank, ")");
  OPENEP_CHECK_ARG(h.num_tokens == 0 || a.num_tokens == 0 || (h.send_pos && h.send_rdma_head),
                   "handle.send_pos and handle.send_rdma_head are required");
  OPENEP_CHECK_ARG(h.node_prefix && h.recv_gbl_rank_prefix_sum && h.recv_rdma_rank_prefix_sum,
                   "handle.node_prefix, recv_gbl_rank_prefix_sum and recv_rdma_rank_prefix_sum are required");
  OPENEP_CHECK_ARG(a.num_tokens == 0 || (h.send_pos && h.send_rdma_head), "handle.send_pos and handle.send_rdma_head "
                   "are required with num_tokens = ", a.num_tokens);
  const int K = a.num_topk;
  const Sizes sz = sizes_of(m, a, K);
  const InternodeNvlLayout nl = InternodeNvlLayout::make(m.options.num_nvl_bytes, R, M);
  const size_t nvl_entry = std::max(sz.nvl_row, sz.combine);
  const int64_t dispatch_cap = nl.dispatch_capacity(sz.nvl_row), combine_cap = nl.combine_capacity(M, sz.combine);
  const auto nvl_needed = [&](int64_t rows) {
    return internode_buffer_size_hint(R, M, static_cast<int>((rows + R - 1) / R), a.hidden, a.x_elem_bytes,
                                      a.num_scales, K).num_nvl_bytes;
  };
  OPENEP_CHECK(nl.half_bytes >= nvl_entry, ErrorCode::kBufferTooSmall, "num_nvl_bytes = ", m.options.num_nvl_bytes,
               " leaves no room for rows after the internode headers; it needs num_nvl_bytes >= ", nvl_needed(R));
  if (!exact) {
    OPENEP_CHECK(a.num_worst_tokens <= dispatch_cap, ErrorCode::kBufferTooSmall, "num_worst_tokens = ",
                 a.num_worst_tokens, " rows do not fit the node window (", dispatch_cap, " rows of ", sz.nvl_row,
                 " bytes in num_nvl_bytes = ", m.options.num_nvl_bytes, "); it needs num_nvl_bytes >= ",
                 nvl_needed(a.num_worst_tokens));
    OPENEP_CHECK(static_cast<int64_t>(N) * records_per_node <= combine_cap, ErrorCode::kBufferTooSmall,
                 "worst-case mode forwards up to ", static_cast<int64_t>(N) * records_per_node, " records, the combine "
                 "stage holds ", combine_cap, "; it needs num_nvl_bytes >= ",
                 nvl_needed(static_cast<int64_t>(R) * records_per_node));
  }
  h.num_tokens = a.num_tokens;
  h.is_token_in_rank = a.is_token_in_rank;
  h.hidden = a.hidden;
  h.num_topk = K;
  h.rdma_send_counts.clear();
  h.rdma_recv_counts.clear();
  h.records_per_node = records_per_node;

  detail::launch_internode_begin(&m.in.state->dispatch_epoch, stream);
  const int header_ints = InternodeRecord::header_ints(M, El);
  detail::InternodePlanParams pp{};
  pp.is_token_in_rank = a.is_token_in_rank;
  pp.num_tokens_per_rank = a.num_tokens_per_rank;
  pp.num_tokens_per_rdma_rank = a.num_tokens_per_rdma_rank;
  pp.num_tokens_per_expert = a.num_tokens_per_expert;
  pp.num_tokens = a.num_tokens, pp.num_ranks = R, pp.ranks_per_node = M, pp.num_nodes = N, pp.experts_per_rank = El;
  pp.send_pos = h.send_pos, pp.send_rdma_head = h.send_rdma_head;
  pp.header_send = m.in.header_send, pp.header_ints = header_ints;
  pp.wait = m.wait_context();
  detail::launch_internode_plan(pp, stream);
  {  // headers to / from the rail peers
    std::vector<detail::RailTransfer> x;
    const size_t hb = sizeof(int32_t) * header_ints;
    for (int n = 0; n < N; ++n) {
      if (n == m.in.node) continue;
      detail::RailTransfer t;
      t.node = n, t.send_offset = hb * n, t.send_bytes = hb, t.recv_offset = hb * n, t.recv_bytes = hb;
      x.push_back(t);
    }
    // One buffer pair: header_recv sits at a fixed distance from header_send.
    m.in.rail->exchange(reinterpret_cast<const char*>(m.in.header_send), reinterpret_cast<char*>(m.in.header_recv), x,
                        stream);
  }
  detail::InternodeCountParams cp{};
  cp.node = node_ref(m);
  cp.epoch = &m.in.state->dispatch_epoch;
  cp.header_send = m.in.header_send, cp.header_recv = m.in.header_recv;
  cp.header_ints = header_ints, cp.num_ranks = R, cp.experts_per_rank = El, cp.expert_alignment = a.expert_alignment;
  cp.num_tokens_per_rdma_rank = a.num_tokens_per_rdma_rank;
  cp.num_worst_tokens = a.num_worst_tokens;
  cp.dispatch_capacity = dispatch_cap, cp.combine_capacity = combine_cap;
  cp.node_prefix = h.node_prefix, cp.recv_gbl_rank_prefix_sum = h.recv_gbl_rank_prefix_sum;
  cp.recv_rdma_rank_prefix_sum = h.recv_rdma_rank_prefix_sum;
  cp.num_recv_tokens_per_expert = nullptr;
  cp.host = exact ? m.in.host_device : nullptr;
  cp.host_seq = exact ? ++m.in.host_seq : 0;
  cp.wait = m.wait_context();
  detail::launch_internode_count(cp, stream);

  InternodeDispatchCounts counts;
  if (!exact) {
    h.num_recv_tokens = a.num_worst_tokens;
    h.num_rdma_recv_tokens = N * records_per_node;
    counts.num_recv_tokens = h.num_recv_tokens;
    counts.num_rdma_recv_tokens = h.num_rdma_recv_tokens;
    check_rail_capacity(m, leg_of(m, h), sz, K, a);
    return counts;
  }
  // The one host wait of exact mode (bounded; a stuck rail is aborted).
  const double seconds = m.options.timeout_seconds + 5.0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  const volatile int64_t* seq = &m.in.host->seq;
  for (uint32_t i = 0; *seq != cp.host_seq; ++i) {
    if ((i & 1023) == 0) {
      m.raise_device_error();
      if (std::chrono::steady_clock::now() > deadline) rail_timeout(m, "internode_dispatch_prepare (counts)", seconds);
      std::this_thread::yield();
    }
  }
  m.raise_device_error();
  const volatile detail::InternodeHostCounters* hc = m.in.host;
  h.num_recv_tokens = hc->num_recv_tokens;
  h.num_rdma_recv_tokens = hc->num_rdma_recv_tokens;
  h.rdma_send_counts.resize(N);
  h.rdma_recv_counts.resize(N);
  for (int n = 0; n < N; ++n) h.rdma_send_counts[n] = hc->rdma_send[n], h.rdma_recv_counts[n] = hc->rdma_recv[n];
  counts.num_recv_tokens = h.num_recv_tokens;
  counts.num_rdma_recv_tokens = h.num_rdma_recv_tokens;
  counts.num_recv_tokens_per_expert.resize(El);
  for (int e = 0; e < El; ++e) counts.num_recv_tokens_per_expert[e] = hc->num_recv_tokens_per_expert[e];
  if (h.num_recv_tokens > dispatch_cap || h.num_rdma_recv_tokens > combine_cap) {
    m.failed = true;  // node peers cannot be told to stop writing in time; refuse further work
    OPENEP_CHECK(false, ErrorCode::kBufferTooSmall, "rank ", m.rank, " receives ", h.num_recv_tokens, " rows and forwards ",
                 h.num_rdma_recv_tokens, " records, the node window holds ", dispatch_cap, " rows and ", combine_cap,
                 " records (num_nvl_bytes = ", m.options.num_nvl_bytes, "); it needs num_nvl_bytes >= ",
                 nvl_needed(std::max<int64_t>(h.num_recv_tokens, static_cast<int64_t>(M) * h.num_rdma_recv_tokens)));
  }
  check_rail_capacity(m, leg_of(m, h), sz, K, a);
  return counts;
}

namespace {

void pack_and_forward(Buffer::Impl& m, const DispatchArgs& a, const InternodeHandle& h, const DispatchOutputs& out,
                      bool cached, cudaStream_t stream) {
  const int R = m.num_ranks, M = m.in.ranks_per_node, N = m.in.num_nodes;
  const int blocks = blocks_of(a.config, m);
  const bool with_topk = !cached && a.num_topk > 0;
  const int K = with_topk ? a.num_topk : 0;
  const Sizes sz = sizes_of(m, a, K);
  const Leg leg = leg_of(m, h);
  const InternodeRailLayout rl = InternodeRailLayout::make(m.options.num_rdma_bytes);
  const InternodeNvlLayout nl = InternodeNvlLayout::make(m.options.num_nvl_bytes, R, M);
  if (cached) {
    OPENEP_CHECK(entries_needed(leg, true, m.in.node) <= rl.capacity(sz.rail_record) &&
                     entries_needed(leg, false, m.in.node) <= rl.capacity(sz.rail_record),
                 ErrorCode::kBufferTooSmall, "cached internode dispatch does not fit num_rdma_bytes = ",
                 m.options.num_rdma_bytes);
    OPENEP_CHECK(h.num_recv_tokens <= nl.dispatch_capacity(sz.nvl_row), ErrorCode::kBufferTooSmall,
                 "cached internode dispatch of ", h.num_recv_tokens, " rows does not fit num_nvl_bytes = ",
                 m.options.num_nvl_bytes);
  }
  const int El = a.num_experts > 0 ? a.num_experts / R : 1;

  detail::InternodePackParams pk{};
  pk.x = a.x, pk.row_bytes = static_cast<int>(row_bytes(a));
  pk.x_scales = static_cast<const uint32_t*>(a.x_scales), pk.num_scales = a.num_scales;
  pk.scale_token_stride = a.scale_token_stride, pk.scale_hidden_stride = a.scale_hidden_stride;
  pk.topk_idx = with_topk ? a.topk_idx : nullptr;
  pk.topk_int64 = a.index_type == IndexType::kInt64;
  pk.topk_weights = with_topk ? a.topk_weights : nullptr;
  pk.num_topk = K, pk.num_tokens = a.num_tokens, pk.num_ranks = R, pk.ranks_per_node = M, pk.num_nodes = N;
  pk.send_pos = h.send_pos, pk.send_rdma_head = h.send_rdma_head;
  pk.rail = m.in.rail_buffer, pk.rail_layout = rl, pk.record_bytes = sz.rail_record, pk.bases = leg.bases;
  pk.wait = m.wait_context();
  detail::launch_internode_pack(pk, blocks, stream);
  const int C = chunks_of(a.config);
  const cudaStream_t rail = rail_stream_of(m, stream);
  order_after(m, rail, stream, C);  // the network leg starts once the records are packed

  detail::InternodeForwardParams fw{};
  fw.node = node_ref(m);
  fw.epoch = &m.in.state->dispatch_epoch;
  fw.ticket = &m.in.state->tickets[detail::kTicketForward];
  fw.rail = m.in.rail_buffer, fw.rail_layout = rl, fw.bases = leg.bases;
  fw.record_bytes = sz.rail_record, fw.row_out_bytes = sz.nvl_row;
  fw.row_bytes = static_cast<int>(row_bytes(a)), fw.num_topk = K, fw.num_scales = a.num_scales, fw.experts_per_rank = El;
  fw.recv_rdma_rank_prefix_sum = h.recv_rdma_rank_prefix_sum, fw.node_prefix = h.node_prefix;
  fw.recv_rdma_mask = cached ? nullptr : h.recv_rdma_mask;
  fw.dispatch_capacity = nl.dispatch_capacity(sz.nvl_row);
  fw.wait = m.wait_context();
  // Own node first (no network): it overlaps the first chunk's transfer. Then chunk c once it has arrived, while
  // chunk c + 1 is on the network. The last launch releases dispatch_ready.
  fw.part = own_part(/*release=*/false);
  detail::launch_internode_forward(fw, blocks, stream);
  for (int c = 0; c < C; ++c) {
    rail_leg(m, leg, sz.rail_record, /*forward=*/true, c, C, rail);
    order_after(m, stream, rail, c);
    fw.part = remote_part(h, c, C, /*release=*/c == C - 1);
    detail::launch_internode_forward(fw, blocks, stream);
  }

  detail::InternodeDrainParams dr{};
  dr.node = node_ref(m);
  dr.epoch = &m.in.state->dispatch_epoch;
  dr.ticket = &m.in.state->tickets[detail::kTicketDrain];
  dr.row_out_bytes = sz.nvl_row;
  dr.row_bytes = static_cast<int>(row_bytes(a)), dr.num_topk = K, dr.num_scales = a.num_scales, dr.num_ranks = R;
  dr.num_worst_tokens = cached ? 0 : a.num_worst_tokens;
  dr.recv_gbl_rank_prefix_sum = h.recv_gbl_rank_prefix_sum;
  dr.recv_x = out.recv_x, dr.recv_x_scales = static_cast<uint32_t*>(out.recv_x_scales);
  dr.recv_topk_idx = with_topk ? out.recv_topk_idx : nullptr;
  dr.topk_int64 = a.index_type == IndexType::kInt64;
  dr.recv_topk_weights = with_topk ? out.recv_topk_weights : nullptr;
  dr.recv_src_idx = cached ? nullptr : h.recv_src_idx;
  dr.recv_src_meta = cached ? nullptr : h.recv_src_meta;
  dr.wait = m.wait_context();
  detail::launch_internode_drain(dr, blocks, stream);
}

}  // namespace

void Buffer::internode_dispatch(const DispatchArgs& a, InternodeHandle& h, const DispatchOutputs& out,
                                cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_internode(m, "internode_dispatch");
  validate_data(a, m);
  validate_outputs(a, h, out, a.num_topk > 0);
  OPENEP_CHECK_ARG(h.num_recv_tokens == 0 || (h.recv_src_idx && h.recv_src_meta),
                   "handle.recv_src_idx and handle.recv_src_meta are required with ", h.num_recv_tokens, " rows");
  OPENEP_CHECK_ARG(h.num_rdma_recv_tokens == 0 || h.recv_rdma_mask, "handle.recv_rdma_mask is required with ",
                   h.num_rdma_recv_tokens, " records");
  OPENEP_CHECK_ARG(h.num_topk == a.num_topk && h.hidden == a.hidden, "internode_dispatch: args differ from the "
                   "internode_dispatch_prepare call that filled the handle (hidden ", h.hidden, ", top-k ", h.num_topk, ")");
  pack_and_forward(m, a, h, out, /*cached=*/false, stream);
}

void Buffer::internode_dispatch_cached(const DispatchArgs& a, const InternodeHandle& h, const DispatchOutputs& out,
                                       cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_internode(m, "internode_dispatch_cached");
  validate_data(a, m);
  OPENEP_CHECK_ARG(a.num_topk == 0 && a.topk_idx == nullptr && a.topk_weights == nullptr,
                   "cached dispatch takes no topk_idx/topk_weights (the handle fixes the layout)");
  validate_outputs(a, h, out, false);
  OPENEP_CHECK_ARG(h.records_per_node > 0 || !h.rdma_send_counts.empty() || h.num_tokens == 0,
                   "the handle was not filled by internode_dispatch_prepare");
  detail::launch_internode_begin(&m.in.state->dispatch_epoch, stream);
  pack_and_forward(m, a, h, out, /*cached=*/true, stream);
}

void Buffer::internode_combine(const CombineArgs& a, const InternodeHandle& h, const CombineOutputs& out,
                               cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  require_internode(m, "internode_combine");
  const int R = m.num_ranks, M = m.in.ranks_per_node, N = m.in.num_nodes;
  const int blocks = blocks_of(a.config, m);
  detail::validate_normal_combine_data(a, h.num_recv_tokens, h.num_tokens, out);
  OPENEP_CHECK_ARG(a.hidden == h.hidden, "combine hidden (", a.hidden, ") differs from the dispatch's (", h.hidden, ")");
  OPENEP_CHECK_ARG(h.num_recv_tokens == 0 || h.recv_src_meta != nullptr, "handle.recv_src_meta is null");
  OPENEP_CHECK_ARG(h.num_rdma_recv_tokens == 0 || h.recv_rdma_mask != nullptr, "handle.recv_rdma_mask is null");
  OPENEP_CHECK_ARG(h.num_tokens == 0 || h.send_rdma_head != nullptr, "handle.send_rdma_head is null with ",
                   h.num_tokens, " tokens");
  const int K = a.num_topk;
  const size_t entry = InternodeRecord::combine_bytes(a.hidden, K);
  const Leg leg = leg_of(m, h);
  const InternodeRailLayout rl = InternodeRailLayout::make(m.options.num_rdma_bytes);
  const InternodeNvlLayout nl = InternodeNvlLayout::make(m.options.num_nvl_bytes, R, M);
  OPENEP_CHECK(entries_needed(leg, true, m.in.node) <= rl.capacity(entry) &&
                   entries_needed(leg, false, m.in.node) <= rl.capacity(entry),
               ErrorCode::kBufferTooSmall, "internode combine partials of ", entry, " bytes do not fit num_rdma_bytes = ",
               m.options.num_rdma_bytes, "; it needs num_rdma_bytes >= ",
               internode_buffer_size_hint(R, M, std::max(1, h.records_per_node), a.hidden, 2, 0, K).num_rdma_bytes);
  OPENEP_CHECK(h.num_rdma_recv_tokens <= nl.combine_capacity(M, entry), ErrorCode::kBufferTooSmall,
               "internode combine stage holds ", nl.combine_capacity(M, entry), " records of ", M, " x ", entry,
               " bytes, this rank forwards ", h.num_rdma_recv_tokens);

  detail::launch_internode_begin(&m.in.state->combine_epoch, stream);
  detail::InternodeCombineSendParams cs{};
  cs.node = node_ref(m);
  cs.epoch = &m.in.state->combine_epoch;
  cs.ticket = &m.in.state->tickets[detail::kTicketCombineSend];
  cs.x = a.x, cs.topk_weights = K ? a.topk_weights : nullptr, cs.hidden = a.hidden, cs.num_topk = K, cs.num_ranks = R;
  cs.recv_gbl_rank_prefix_sum = h.recv_gbl_rank_prefix_sum, cs.recv_src_meta = h.recv_src_meta;
  cs.entry_bytes = entry, cs.combine_capacity = nl.combine_capacity(M, entry);
  cs.wait = m.wait_context();
  detail::launch_internode_combine_send(cs, blocks, stream);

  detail::InternodeNodeReduceParams nr{};
  nr.node = node_ref(m);
  nr.epoch = &m.in.state->combine_epoch;
  nr.ticket = &m.in.state->tickets[detail::kTicketNodeReduce];
  nr.hidden = a.hidden, nr.num_topk = K;
  nr.recv_rdma_rank_prefix_sum = h.recv_rdma_rank_prefix_sum, nr.recv_rdma_mask = h.recv_rdma_mask;
  nr.rail = m.in.rail_buffer, nr.rail_layout = rl, nr.bases = leg.bases, nr.entry_bytes = entry;
  nr.wait = m.wait_context();
  // Chunk c of the partials for other nodes goes on the network while chunk c + 1 is reduced; the own node's
  // partials (no network) come last, overlapping the last transfer, and that launch releases `reduced`.
  const int C = chunks_of(a.config);
  const cudaStream_t rail = rail_stream_of(m, stream);
  for (int c = 0; c < C; ++c) {
    nr.part = remote_part(h, c, C, /*release=*/false);
    detail::launch_internode_node_reduce(nr, blocks, stream);
    order_after(m, rail, stream, c);
    rail_leg(m, leg, entry, /*forward=*/false, c, C, rail);
  }
  nr.part = own_part(/*release=*/true);
  detail::launch_internode_node_reduce(nr, blocks, stream);
  order_after(m, stream, rail, C);  // the final sum reads every node's partials

  detail::InternodeCombineFinalParams fn{};
  fn.rail = m.in.rail_buffer, fn.rail_layout = rl, fn.bases = leg.bases, fn.entry_bytes = entry;
  fn.send_rdma_head = h.send_rdma_head, fn.num_tokens = h.num_tokens, fn.num_nodes = N, fn.hidden = a.hidden;
  fn.num_topk = K, fn.bias_0 = a.bias_0, fn.bias_1 = a.bias_1;
  fn.combined_x = out.combined_x, fn.combined_topk_weights = K ? out.combined_topk_weights : nullptr;
  fn.wait = m.wait_context();
  detail::launch_internode_combine_final(fn, blocks, stream);
}

}  // namespace openep
