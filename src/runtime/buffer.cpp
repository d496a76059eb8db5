#include "openep/buffer.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kernels/intranode_launch.hpp"
#include "kernels/launch.hpp"
#include "kernels/load.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"
#include "runtime/low_latency_gin.hpp"
#include "runtime/nccl_fabric.hpp"
#include "protocol/low_latency_gin_layout.hpp"
#include "protocol/low_latency_layout.hpp"
#include "runtime/transport.hpp"
#include "protocol/internode_layout.hpp"
#include "protocol/topology.hpp"
#include "runtime/rail.hpp"

namespace openep {

int compiled_nccl_version() noexcept { return OPENEP_COMPILED_NCCL_VERSION; }

int loaded_nccl_version() {
  int v = 0;
  OPENEP_NCCL_CHECK(ncclGetVersion(&v));
  return v;
}

namespace detail {

void check_nccl_version(int compiled, int loaded) {
  OPENEP_CHECK(loaded == compiled, ErrorCode::kVersionMismatch, "OpenEP was compiled against NCCL ", compiled,
               " but NCCL ", loaded,
               " is loaded; the NCCL device API has no stable ABI, so rebuild OpenEP against the loaded NCCL");
}

}  // namespace detail

namespace {

// Buffer::barrier's device part: every rank of the window (the node, for an internode Buffer), slot kHostBarrierSlot.
detail::BarrierParams window_barrier_params(const Buffer::Impl& m) {
  detail::BarrierParams p{};
  p.peer_bases = m.peer_bases_device;
  p.barrier_offset = m.window_layout.barrier_offset;
  p.epoch = &m.local_state->barrier_epoch[detail::kHostBarrierSlot];
  p.slot = detail::kHostBarrierSlot;
  p.rank = m.window_rank();
  p.num_ranks = m.window_ranks();
  p.mask = m.shrink_mask;  // shrink mode: a mask-aware barrier (null otherwise)
  p.wait = m.wait_context();
  return p;
}

// Logs instead of throwing: used on teardown paths.
void warn_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) std::fprintf(stderr, "OpenEP: %s failed during teardown: %s\n", what, cudaGetErrorString(err));
}

}  // namespace

void Buffer::Impl::raise_device_error() {
  const volatile detail::DeviceError* rec = error_record;
  const int code = rec->code;
  if (code == 0) return;
  failed = true;
  const auto phase = static_cast<detail::Phase>(rec->phase);
  if (code == static_cast<int>(detail::DeviceErrorCode::kTimeout)) {
    std::string network;  // NCCL's view: tells a failed network (GIN stops for good) from a slow peer
    if (fabric) network = detail::nccl_async_error_note(fabric->nccl_comm(), "Group's");
    if (in.rail) network += in.rail->network_error();
    OPENEP_CHECK(false, ErrorCode::kTimeout, "rank ", rec->rank, " waited more than ", options.timeout_seconds,
                 " s for peer ", rec->peer, " in phase '", detail::phase_name(phase), "' (expected a counter >= ",
                 rec->expected, ", observed ", rec->observed, "); the peer is stalled, dead or not calling the "
                 "same operation.", network, " This Buffer refuses further work; destroy it.");
  }
  if (code == static_cast<int>(detail::DeviceErrorCode::kInconsistentLayout)) {
    if (rec->peer < 0)  // internode: a node column (peer = -1 - node)
      OPENEP_CHECK(false, ErrorCode::kDeviceCheck, "dispatch on rank ", rec->rank, ": num_tokens_per_rdma_rank[",
                   -1 - rec->peer, "] = ", rec->expected, " but is_token_in_rank sends ", rec->observed,
                   " tokens to that node. This Buffer refuses further work; destroy it.");
    OPENEP_CHECK(false, ErrorCode::kDeviceCheck, "dispatch on rank ", rec->rank, ": num_tokens_per_rank[", rec->peer,
                 "] = ", rec->expected, " but is_token_in_rank sends ", rec->observed,
                 " tokens there. This Buffer refuses further work; destroy it.");
  }
  if (code == static_cast<int>(detail::DeviceErrorCode::kWorstTokensExceeded)) {
    OPENEP_CHECK(false, ErrorCode::kDeviceCheck, "dispatch on rank ", rec->rank, ": ", rec->observed,
                 " rows arrived but num_worst_tokens is ", rec->expected,
                 ". This Buffer refuses further work; destroy it.");
  }
  if (code == static_cast<int>(detail::DeviceErrorCode::kCapacityExceeded)) {
    OPENEP_CHECK(false, ErrorCode::kBufferTooSmall, detail::phase_name(phase), " on rank ", rec->rank, ": ",
                 rec->observed, " rows (or records) need room but the Buffer holds ", rec->expected,
                 (rec->peer >= 0 ? " on rank " : ""), (rec->peer >= 0 ? std::to_string(rec->peer) : std::string()),
                 " (a size hint gives the bytes). This Buffer refuses further work; destroy it.");
  }
  if (code == static_cast<int>(detail::DeviceErrorCode::kRailSizeMismatch)) {
    OPENEP_CHECK(false, ErrorCode::kInternal, detail::phase_name(phase), " on rank ", rec->rank, ": rail peer ",
                 rec->peer, " expects ", rec->expected, " bytes but this rank sends ", rec->observed,
                 " (the two sides planned different transfers). This Buffer refuses further work; destroy it.");
  }
  if (code == static_cast<int>(detail::DeviceErrorCode::kBadExpertIndex)) {
    OPENEP_CHECK(false, ErrorCode::kDeviceCheck, detail::phase_name(phase), " on rank ", rec->rank,
                 ": topk_idx row ", rec->expected, " holds expert id ", rec->observed,
                 ", expected -1 or a value in [0, num_experts). This Buffer refuses further work; destroy it.");
  }
  OPENEP_CHECK(false, ErrorCode::kInternal, "unknown device error code ", code, " on rank ", rec->rank);
}

void Buffer::Impl::check_usable() {
  OPENEP_CHECK(!failed, ErrorCode::kBufferFailed,
               "this Buffer saw an earlier error (timeout or invalid device input) and refuses further work; "
               "destroy it and create a new one");
  raise_device_error();
}

namespace {

// Releases everything a (possibly partly constructed) Buffer holds. Never throws.
// Internode: NCCL work on the comm stream may wait for a dead node forever (worst-case and cached mode never
// wait on the host, so nobody noticed yet). Give it timeout_seconds + 5 s, then abort the rail so that the
// synchronisation below, and the communicators' destruction, cannot hang.
void drain_rail_bounded(Buffer::Impl& m) noexcept {
  if (!m.comm_stream || !m.in.rail || !m.in.rail->can_hang()) return;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(m.options.timeout_seconds + 5.0);
  while (cudaStreamQuery(m.comm_stream) == cudaErrorNotReady ||
         (m.in.rail_stream && cudaStreamQuery(m.in.rail_stream) == cudaErrorNotReady)) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "OpenEP: rank %d: the rail leg did not finish within %.0f s at Buffer destruction; "
                   "aborting the rail communicator\n", m.rank, m.options.timeout_seconds + 5.0);
      m.in.rail->abort();
      return;
    }
    std::this_thread::yield();
  }
}

void release(Buffer::Impl& m) noexcept {
  drain_rail_bounded(m);
  if (m.comm_stream) warn_cuda(cudaStreamSynchronize(m.comm_stream), "cudaStreamSynchronize");
  if (m.in.rail_stream) {
    warn_cuda(cudaStreamSynchronize(m.in.rail_stream), "cudaStreamSynchronize (rail stream)");
    for (cudaEvent_t& e : m.in.rail_events)
      if (e) warn_cuda(cudaEventDestroy(e), "cudaEventDestroy"), e = nullptr;
    warn_cuda(cudaStreamDestroy(m.in.rail_stream), "cudaStreamDestroy");
    m.in.rail_stream = nullptr;
  }
  for (Buffer::Impl::PoolSegment& s : m.pool)
    if (s.released) warn_cuda(cudaEventDestroy(s.released), "cudaEventDestroy"), s.released = nullptr;
  m.pool.clear();
  if (m.fabric) {
    detail::Fabric& f = *m.fabric;
    (m.in.node_fabric ? *m.in.node_fabric : f).close_window(m.win);
    if (m.in.rail && m.in.rail_area) m.in.rail->close_area(m.in.rail_area, f);
    f.free_device(m.in.state);
    f.free_mapped(m.in.host);
    m.in.rail_area = nullptr;
    m.in.rail_buffer = nullptr, m.in.header_send = nullptr, m.in.header_recv = nullptr, m.in.barrier_token = nullptr;
    m.in.state = nullptr, m.in.host = nullptr;
    m.in.rail.reset();
    m.in.node_fabric.reset();
    f.free_device(m.peer_bases_device);
    f.free_device(m.local_state);
    f.free_device(m.ll_state);
    f.free_device(m.shrink_mask);
    f.free_device(m.layout_workspace);
    f.free_mapped(m.error_record);
    f.free_mapped(m.host_counters);
  }
  m.peer_bases_device = nullptr, m.local_state = nullptr, m.ll_state = nullptr, m.layout_workspace = nullptr;
  m.shrink_mask = nullptr;
  m.error_record = nullptr, m.host_counters = nullptr;
  if (m.comm_stream) warn_cuda(cudaStreamDestroy(m.comm_stream), "cudaStreamDestroy");
  m.comm_stream = nullptr;
}

}  // namespace

Buffer::Buffer(Group& group, const BufferOptions& options) : impl_(std::make_unique<Impl>()) {
  try {
    init(group, options);
  } catch (...) {
    release(*impl_);  // e.g. a device communicator NCCL created before failing: nothing leaks
    throw;
  }
}

void Buffer::init(Group& group, const BufferOptions& options) {
  Impl& m = *impl_;
  m.group = &group;
  m.fabric = &group.fabric();
  m.options = options;
  m.rank = group.rank();
  m.num_ranks = group.num_ranks();
  m.device = group.device();

  detail::check_nccl_version(compiled_nccl_version(), loaded_nccl_version());
  OPENEP_CHECK_ARG(options.num_nvl_bytes % 128 == 0, "num_nvl_bytes must be a multiple of 128, got ",
                   options.num_nvl_bytes);
  OPENEP_CHECK_ARG(options.num_rdma_bytes % 128 == 0, "num_rdma_bytes must be a multiple of 128, got ",
                   options.num_rdma_bytes);
  OPENEP_CHECK_ARG(options.num_recv_pool_bytes % 128 == 0, "num_recv_pool_bytes must be a multiple of 128, got ",
                   options.num_recv_pool_bytes);
  OPENEP_CHECK_ARG(options.timeout_seconds > 0 && options.timeout_seconds <= 3600,
                   "timeout_seconds must be in (0, 3600], got ", options.timeout_seconds);
  OPENEP_CHECK(group.num_nvlink_ranks() > 0, ErrorCode::kUnsupported,
               "NCCL reports no NVLink (LSA) team: symmetric memory is unavailable (needs cuMem, "
               "NCCL_WIN_ENABLE=1 and CUDA P2P between the GPUs)");
  // One NVLink domain: kNvlink (GIN never requested). Several: kUnsupported unless allow_network and
  // low-latency mode select the network path (kGin, not yet run on a real network).
  detail::TransportQuery query;
  query.num_ranks = m.num_ranks;
  query.num_nvlink_ranks = group.num_nvlink_ranks();
  query.low_latency_mode = options.low_latency_mode;
  query.allow_network = options.allow_network;
  query.num_nvl_bytes = options.num_nvl_bytes;
  query.num_rdma_bytes = options.num_rdma_bytes;
  query.internode_gin = options.internode_backend == InternodeBackend::kGin;
  m.transport = detail::select_transport(query);
  const bool network = m.transport == detail::Transport::kGin;
  detail::validate_shrink_options(options.enable_shrink, options.low_latency_mode, m.transport);
  if (m.transport == detail::Transport::kNvlink) {
    OPENEP_CHECK(m.num_ranks <= detail::kMaxNvlinkPeers, ErrorCode::kUnsupported, "NVLink domain of ", m.num_ranks,
                 " ranks exceeds the supported ", detail::kMaxNvlinkPeers);
  }
  if (m.internode()) {
    // Nodes: equal NVLink teams of consecutive ranks (NCCL's LSA team assumes node-major order; a rank order
    // that is not would shrink the team silently, internode.md trap 3).
    detail::Topology topo;
    topo.rank = m.rank, topo.num_ranks = m.num_ranks, topo.ranks_per_node = group.num_nvlink_ranks();
    OPENEP_CHECK(topo.node_major(group.nvlink_rank()), ErrorCode::kUnsupported, "internode mode needs node-major "
                 "ranks (rank = node * ranks_per_node + local rank, every node with the same number of ranks); rank ",
                 m.rank, " of ", m.num_ranks, " is NVLink rank ", group.nvlink_rank(), " of a team of ",
                 group.num_nvlink_ranks());
    OPENEP_CHECK(topo.ranks_per_node <= detail::kMaxInternodeRanksPerNode, ErrorCode::kUnsupported,
                 "internode mode supports up to ", detail::kMaxInternodeRanksPerNode, " ranks per node, the Group's "
                 "NVLink team has ", topo.ranks_per_node);
    OPENEP_CHECK(topo.num_nodes() <= detail::kMaxInternodeNodes && m.num_ranks <= kMaxRanks, ErrorCode::kUnsupported,
                 "internode mode supports up to ", detail::kMaxInternodeNodes, " nodes and ", kMaxRanks,
                 " ranks, the Group has ", topo.num_nodes(), " nodes of ", topo.ranks_per_node, " ranks");
    m.in.ranks_per_node = topo.ranks_per_node;
    m.in.num_nodes = topo.num_nodes();
    m.in.node = topo.node();
    m.in.local_rank = topo.local_rank();
    detail::NodeSplit split =
        m.fabric->split_nodes(topo.ranks_per_node, detail::requests_gin(m.transport, detail::CommRole::kRail));
    m.in.node_fabric = std::move(split.node);
    m.in.rail = std::move(split.rail);
  }

  OPENEP_CUDA_CHECK(cudaSetDevice(m.device));
  // Every kernel loaded before any of ours can spin (kernels/load.hpp: lazy loading could otherwise deadlock a
  // first launch against a spinning kernel). Once per process and device; virtual ranks all pass here before
  // their first launch.
  detail::load_all_kernels(m.device);
  OPENEP_CUDA_CHECK(cudaDeviceGetAttribute(&m.num_device_sms, cudaDevAttrMultiProcessorCount, m.device));
  m.grids = m.fabric->grid_budget(m.num_device_sms);
  OPENEP_CUDA_CHECK(cudaStreamCreateWithPriority(&m.comm_stream, cudaStreamNonBlocking, m.fabric->comm_stream_priority()));

  // Private state first: on virtual ranks nothing after the window exchange may synchronise the device.
  detail::Fabric& f = *m.fabric;
  m.peer_bases_device = static_cast<char**>(f.alloc_device(sizeof(char*) * m.num_ranks));
  m.local_state = static_cast<detail::LocalState*>(f.alloc_device(sizeof(detail::LocalState)));
  OPENEP_CUDA_CHECK(cudaMemsetAsync(m.local_state, 0, sizeof(detail::LocalState), m.comm_stream));
  m.layout_workspace = static_cast<int*>(f.alloc_device(sizeof(int) * detail::layout_workspace_ints()));
  OPENEP_CUDA_CHECK(
      cudaMemsetAsync(m.layout_workspace, 0, sizeof(int) * detail::layout_workspace_ints(), m.comm_stream));
  void* view = nullptr;
  m.error_record = static_cast<detail::DeviceError*>(f.alloc_mapped(sizeof(detail::DeviceError), &view));
  m.error_record_device = static_cast<detail::DeviceError*>(view);
  std::memset(static_cast<void*>(m.error_record), 0, sizeof(detail::DeviceError));
  m.host_counters = static_cast<detail::HostCounters*>(f.alloc_mapped(sizeof(detail::HostCounters), &view));
  m.host_counters_device = static_cast<detail::HostCounters*>(view);
  std::memset(static_cast<void*>(m.host_counters), 0, sizeof(detail::HostCounters));
  if (options.num_rdma_bytes > 0 && !m.internode()) {
    m.ll_state = static_cast<detail::LowLatencyState*>(f.alloc_device(sizeof(detail::LowLatencyState)));
    OPENEP_CUDA_CHECK(cudaMemsetAsync(m.ll_state, 0, sizeof(detail::LowLatencyState), m.comm_stream));
  }
  if (options.enable_shrink) {
    m.shrink_mask = static_cast<int32_t*>(f.alloc_device(sizeof(int32_t) * m.num_ranks));
    OPENEP_CUDA_CHECK(cudaMemsetAsync(m.shrink_mask, 0, sizeof(int32_t) * m.num_ranks, m.comm_stream));
  }
  if (m.internode()) {
    const int N = m.in.num_nodes;
    // Everything the rail moves, in one area (GIN: the rail window, registered here, collectively over the rail).
    const detail::InternodeRailArea area =
        detail::InternodeRailArea::make(options.num_rdma_bytes, N, m.in.ranks_per_node);
    m.in.rail_area = m.in.rail->open_area(area.total_bytes, f);
    m.in.rail_buffer = m.in.rail_area + area.halves_offset;
    m.in.header_send = reinterpret_cast<int32_t*>(m.in.rail_area + area.header_send_offset);
    m.in.header_recv = reinterpret_cast<int32_t*>(m.in.rail_area + area.header_recv_offset);
    m.in.barrier_token = reinterpret_cast<int32_t*>(m.in.rail_area + area.barrier_offset);
    OPENEP_CUDA_CHECK(cudaMemsetAsync(m.in.barrier_token, 0, detail::InternodeRailArea::barrier_bytes(N), m.comm_stream));
    m.in.rail->set_wait_context(m.wait_context());
    m.in.state = static_cast<detail::InternodeState*>(f.alloc_device(sizeof(detail::InternodeState)));
    OPENEP_CUDA_CHECK(cudaMemsetAsync(m.in.state, 0, sizeof(detail::InternodeState), m.comm_stream));
    m.in.host = static_cast<detail::InternodeHostCounters*>(f.alloc_mapped(sizeof(detail::InternodeHostCounters), &view));
    m.in.host_device = static_cast<detail::InternodeHostCounters*>(view);
    std::memset(static_cast<void*>(m.in.host), 0, sizeof(detail::InternodeHostCounters));
    static_assert(Impl::Internode::kRailEvents == detail::kMaxInternodeChunks + 1, "one event per chunk and one more");
    if (m.in.rail->overlaps()) {
      OPENEP_CUDA_CHECK(cudaStreamCreateWithPriority(&m.in.rail_stream, cudaStreamNonBlocking, m.fabric->comm_stream_priority()));
      for (cudaEvent_t& e : m.in.rail_events) OPENEP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
  }

  // One window for everything (collective; every peer's window is zero before any rank returns). kGin
  // appends its send staging area.
  // Internode: the window is the node window (normal-mode region only; the rail buffers are private memory).
  OPENEP_CHECK_ARG(options.num_recv_pool_bytes == 0 || (!m.internode() && m.transport == detail::Transport::kNvlink),
                   "num_recv_pool_bytes (window-backed intranode dispatch outputs) needs an intranode NVLink Buffer");
  m.window_layout = detail::WindowLayout::make(options.num_nvl_bytes, m.internode() ? 0 : options.num_rdma_bytes,
                                               options.num_recv_pool_bytes);
  if (options.num_recv_pool_bytes > 0) m.pool.push_back({0, options.num_recv_pool_bytes, true, nullptr});
  detail::WindowRequest req;
  req.bytes = m.window_layout.total_bytes;
  req.gin = detail::requests_gin(m.transport, m.internode() ? detail::CommRole::kNode : detail::CommRole::kGroup);
  if (network) {
    m.gin_staging_offset = req.bytes;
    req.bytes += detail::LowLatencyGinLayout::area_bytes(options.num_rdma_bytes);
  }
  detail::Fabric& wf = m.internode() ? *m.in.node_fabric : f;
  wf.open_window(req, m.comm_stream, m.peer_bases_device, m.win);
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(m.comm_stream));
  if (m.internode()) {
    // Warm-up: NCCL connects p2p peers lazily, on the host, inside the first ncclGroupEnd, where a dead peer would
    // block the caller forever. Every rail pair connects here, while creation is collective; later legs only
    // enqueue, and their waits are bounded (synchronize_bounded aborts a stuck rail). Also required before a
    // CUDA-graph capture of p2p.
    barrier(m.comm_stream);
    m.synchronize_bounded(m.comm_stream, "Buffer creation (rail warm-up)");
  }
}

Buffer::~Buffer() {
  if (!impl_) return;
  Impl& m = *impl_;
  cudaSetDevice(m.device);
  if (m.comm_stream) {
    // Make sure no peer still writes into our window before it is released (nccl-device-api.md 1.6). The
    // barrier is bounded by the timeout, so a dead peer delays teardown but cannot hang it.
    if (!m.failed && m.error_record && m.error_record->code == 0 && m.win.local) {
      try {
        // Only node peers write into the window (rail bytes land in private buffers, stream-ordered; with the GIN
        // rail in its window, but only inside an exchange whose kernel waits for them, so none is pending once the
        // streams drained), so the node barrier suffices; it is bounded, where a rail leg to a dead node would not be.
        if (m.transport == detail::Transport::kGin) barrier(m.comm_stream);
        else detail::launch_barrier(window_barrier_params(m), m.comm_stream);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "OpenEP: final barrier failed: %s\n", e.what());
      }
    }
  }
  release(m);
}

int Buffer::rank() const noexcept { return impl_->rank; }
int Buffer::num_ranks() const noexcept { return impl_->num_ranks; }
const BufferOptions& Buffer::options() const noexcept { return impl_->options; }
cudaStream_t Buffer::comm_stream() const noexcept { return impl_->comm_stream; }

void Buffer::get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  const int nodes = m.internode() ? m.in.num_nodes : 1;
  detail::validate_layout_args(args, m.num_ranks, nodes);
  detail::launch_dispatch_layout(args, m.num_ranks, nodes, m.layout_workspace, m.wait_context(), stream);
}

void Buffer::barrier(cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  if (m.transport == detail::Transport::kGin) {  // network path: GIN signals (not yet run on a real network)
    detail::gin_barrier(m, stream);
    return;
  }
  const detail::BarrierParams p = window_barrier_params(m);
  detail::launch_barrier(p, stream);
  if (!m.internode()) return;
  // Internode: node barrier, one token to and from every rail peer, node barrier: every rank of every node.
  std::vector<detail::RailTransfer> x;
  for (int n = 0; n < m.in.num_nodes; ++n) {
    if (n == m.in.node) continue;
    detail::RailTransfer t;
    t.node = n;
    t.send_offset = sizeof(int32_t) * n, t.send_bytes = sizeof(int32_t);
    t.recv_offset = sizeof(int32_t) * n, t.recv_bytes = sizeof(int32_t);
    x.push_back(t);
  }
  m.in.rail->exchange(reinterpret_cast<const char*>(m.in.barrier_token),
                      reinterpret_cast<char*>(m.in.barrier_token + m.in.num_nodes), x, stream);
  detail::launch_barrier(p, stream);
}

void Buffer::synchronize(cudaStream_t stream) {
  if (impl_->internode()) {
    impl_->synchronize_bounded(stream, "synchronize");
    return;
  }
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
  impl_->raise_device_error();
}

bool Buffer::is_internode() const noexcept { return impl_->internode(); }
int Buffer::num_nodes() const noexcept { return impl_->internode() ? impl_->in.num_nodes : 1; }
int Buffer::ranks_per_node() const noexcept { return impl_->internode() ? impl_->in.ranks_per_node : impl_->num_ranks; }

void Buffer::check_device_errors() { impl_->raise_device_error(); }


// ---- window-backed dispatch outputs ----

namespace {
// A free segment whose release event has completed (or that was never handed out) can be handed out again.
bool segment_ready(Buffer::Impl::PoolSegment& s) {
  if (!s.free) return false;
  if (!s.released) return true;
  const cudaError_t e = cudaEventQuery(s.released);
  if (e == cudaErrorNotReady) return false;
  OPENEP_CUDA_CHECK(e);
  OPENEP_CUDA_CHECK(cudaEventDestroy(s.released));
  s.released = nullptr;
  return true;
}
}  // namespace

void* Buffer::alloc_recv(size_t bytes) {
  Impl& m = *impl_;
  m.check_usable();
  if (bytes == 0 || m.pool.empty()) return nullptr;
  const size_t need = (bytes + 255) / 256 * 256;
  // Merge runs of ready free segments, then take the first that is large enough.
  for (size_t i = 0; i < m.pool.size(); ++i) {
    if (!segment_ready(m.pool[i])) continue;
    while (i + 1 < m.pool.size() && segment_ready(m.pool[i + 1])) {
      m.pool[i].bytes += m.pool[i + 1].bytes;
      m.pool.erase(m.pool.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    }
    if (m.pool[i].bytes < need) continue;
    if (m.pool[i].bytes > need) {
      Impl::PoolSegment rest{m.pool[i].offset + need, m.pool[i].bytes - need, true, nullptr};
      m.pool[i].bytes = need;
      m.pool.insert(m.pool.begin() + static_cast<std::ptrdiff_t>(i) + 1, rest);
    }
    m.pool[i].free = false;
    return m.pool_base() + m.pool[i].offset;
  }
  return nullptr;
}

void Buffer::free_recv(void* p, cudaStream_t stream) {
  Impl& m = *impl_;
  for (Impl::PoolSegment& s : m.pool) {
    if (s.free || m.pool_base() + s.offset != p) continue;
    OPENEP_CUDA_CHECK(cudaEventCreateWithFlags(&s.released, cudaEventDisableTiming));
    OPENEP_CUDA_CHECK(cudaEventRecord(s.released, stream));
    s.free = true;
    return;
  }
  OPENEP_CHECK_ARG(false, "free_recv: ", p, " is not memory handed out by this Buffer's alloc_recv (or was freed)");
}

size_t Buffer::recv_pool_free_bytes() const noexcept {
  size_t n = 0;
  for (const Impl::PoolSegment& s : impl_->pool)
    if (s.free) n += s.bytes;
  return n;
}

}  // namespace openep
