#include "openep/buffer.hpp"

#include <nccl.h>
#include <nccl_device.h>

#include <cstdio>
#include <cstring>

#include "kernels/intranode_launch.hpp"
#include "kernels/launch.hpp"
#include "kernels/low_latency_gin_launch.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"
#include "runtime/low_latency_gin.hpp"
#include "protocol/low_latency_gin_layout.hpp"
#include "protocol/low_latency_layout.hpp"
#include "runtime/transport.hpp"

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

// Logs instead of throwing: used on teardown paths.
void warn_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) std::fprintf(stderr, "OpenEP: %s failed during teardown: %s\n", what, cudaGetErrorString(err));
}
void warn_nccl(ncclResult_t res, const char* what) {
  if (res != ncclSuccess) std::fprintf(stderr, "OpenEP: %s failed during teardown: %s\n", what, ncclGetErrorString(res));
}

}  // namespace

void Buffer::Impl::raise_device_error() {
  const volatile detail::DeviceError* rec = error_record;
  const int code = rec->code;
  if (code == 0) return;
  failed = true;
  const auto phase = static_cast<detail::Phase>(rec->phase);
  if (code == static_cast<int>(detail::DeviceErrorCode::kTimeout)) {
    OPENEP_CHECK(false, ErrorCode::kTimeout, "rank ", rec->rank, " waited more than ", options.timeout_seconds,
                 " s for peer ", rec->peer, " in phase '", detail::phase_name(phase), "' (expected a counter >= ",
                 rec->expected, ", observed ", rec->observed, "); the peer is stalled, dead or not calling the "
                 "same operation. This Buffer refuses further work; destroy it.");
  }
  if (code == static_cast<int>(detail::DeviceErrorCode::kInconsistentLayout)) {
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
    OPENEP_CHECK(false, ErrorCode::kBufferTooSmall, "dispatch on rank ", rec->rank, ": ", rec->observed,
                 " rows arrived but the Buffer holds ", rec->expected,
                 " rows. This Buffer refuses further work; destroy it.");
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

Buffer::Buffer(Group& group, const BufferOptions& options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.group = &group;
  m.options = options;
  m.rank = group.rank();
  m.num_ranks = group.num_ranks();
  m.device = group.device();

  detail::check_nccl_version(compiled_nccl_version(), loaded_nccl_version());
  OPENEP_CHECK_ARG(options.num_nvl_bytes % 128 == 0, "num_nvl_bytes must be a multiple of 128, got ",
                   options.num_nvl_bytes);
  OPENEP_CHECK_ARG(options.num_rdma_bytes % 128 == 0, "num_rdma_bytes must be a multiple of 128, got ",
                   options.num_rdma_bytes);
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
  m.transport = detail::select_transport(query);
  const bool network = m.transport == detail::Transport::kGin;
  if (!network) {
    OPENEP_CHECK(m.num_ranks <= detail::kMaxNvlinkPeers, ErrorCode::kUnsupported, "NVLink domain of ", m.num_ranks,
                 " ranks exceeds the supported ", detail::kMaxNvlinkPeers);
  }

  OPENEP_CUDA_CHECK(cudaSetDevice(m.device));
  ncclComm_t comm = group.comm();

  // Capability check and device communicator (LSA only: GIN stays off on one node, see nccl-device-api.md 4).
  if (!network) {
    ncclDevCommRequirements reqs = {};
    reqs.lsaBarrierCount = 1;
    OPENEP_NCCL_CHECK(ncclDevCommCreate(comm, &reqs, &m.dev_comm));
    m.dev_comm_created = true;
  } else {
    detail::create_gin_dev_comm(m, comm);  // GIN signals; fails with kUnsupported naming NCCL's reason
  }

  // One symmetric window for everything, zeroed before registration (registration is a world barrier, so
  // every peer's window is zero before anyone can write into it). kGin appends its send staging area.
  m.window_layout = detail::WindowLayout::make(options.num_nvl_bytes, options.num_rdma_bytes);
  size_t window_bytes = m.window_layout.total_bytes;
  if (network) {
    m.gin_staging_offset = window_bytes;
    window_bytes += detail::LowLatencyGinLayout::area_bytes(options.num_rdma_bytes);
  }
  OPENEP_NCCL_CHECK(ncclMemAlloc(&m.window_memory, window_bytes));
  OPENEP_CUDA_CHECK(cudaMemset(m.window_memory, 0, window_bytes));
  OPENEP_CUDA_CHECK(cudaDeviceSynchronize());
  OPENEP_NCCL_CHECK(ncclCommWindowRegister(comm, m.window_memory, window_bytes, &m.window, NCCL_WIN_DEFAULT));
  OPENEP_CHECK(m.window != nullptr, ErrorCode::kNccl, "ncclCommWindowRegister returned no window");

  OPENEP_CUDA_CHECK(cudaStreamCreateWithPriority(&m.comm_stream, cudaStreamNonBlocking, -1));
  OPENEP_CUDA_CHECK(cudaMalloc(&m.peer_bases_device, sizeof(char*) * m.num_ranks));
  if (!network) {
    detail::launch_query_peer_bases(m.window, m.num_ranks, m.peer_bases_device, m.comm_stream);
  } else {
    detail::launch_query_own_base(m.window, m.rank, m.num_ranks, m.peer_bases_device, m.comm_stream);
  }
  m.peer_bases.resize(m.num_ranks);
  OPENEP_CUDA_CHECK(cudaMemcpyAsync(m.peer_bases.data(), m.peer_bases_device, sizeof(char*) * m.num_ranks,
                                    cudaMemcpyDeviceToHost, m.comm_stream));

  OPENEP_CUDA_CHECK(cudaMalloc(&m.local_state, sizeof(detail::LocalState)));
  OPENEP_CUDA_CHECK(cudaMemsetAsync(m.local_state, 0, sizeof(detail::LocalState), m.comm_stream));
  OPENEP_CUDA_CHECK(cudaMalloc(&m.layout_workspace, sizeof(int) * detail::layout_workspace_ints()));
  OPENEP_CUDA_CHECK(
      cudaMemsetAsync(m.layout_workspace, 0, sizeof(int) * detail::layout_workspace_ints(), m.comm_stream));
  OPENEP_CUDA_CHECK(cudaHostAlloc(&m.error_record, sizeof(detail::DeviceError), cudaHostAllocMapped));
  std::memset(static_cast<void*>(m.error_record), 0, sizeof(detail::DeviceError));
  OPENEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.error_record_device), m.error_record, 0));
  OPENEP_CUDA_CHECK(cudaHostAlloc(&m.host_counters, sizeof(detail::HostCounters), cudaHostAllocMapped));
  std::memset(static_cast<void*>(m.host_counters), 0, sizeof(detail::HostCounters));
  OPENEP_CUDA_CHECK(
      cudaHostGetDevicePointer(reinterpret_cast<void**>(&m.host_counters_device), m.host_counters, 0));
  if (options.num_rdma_bytes > 0) {
    OPENEP_CUDA_CHECK(cudaMalloc(&m.ll_state, sizeof(detail::LowLatencyState)));
    OPENEP_CUDA_CHECK(cudaMemsetAsync(m.ll_state, 0, sizeof(detail::LowLatencyState), m.comm_stream));
  }
  OPENEP_CUDA_CHECK(cudaDeviceGetAttribute(&m.num_device_sms, cudaDevAttrMultiProcessorCount, m.device));
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(m.comm_stream));
}

Buffer::~Buffer() {
  if (!impl_) return;
  Impl& m = *impl_;
  cudaSetDevice(m.device);
  if (m.comm_stream) {
    // Make sure no peer still writes into our window before it is released (nccl-device-api.md 1.6). The
    // barrier is bounded by the timeout, so a dead peer delays teardown but cannot hang it.
    if (!m.failed && m.error_record && m.error_record->code == 0 && m.window) {
      try {
        barrier(m.comm_stream);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "OpenEP: final barrier failed: %s\n", e.what());
      }
    }
    warn_cuda(cudaStreamSynchronize(m.comm_stream), "cudaStreamSynchronize");
  }
  ncclComm_t comm = m.group->comm();
  if (m.window) warn_nccl(ncclCommWindowDeregister(comm, m.window), "ncclCommWindowDeregister");
  if (m.window_memory) warn_nccl(ncclMemFree(m.window_memory), "ncclMemFree");
  if (m.dev_comm_created) warn_nccl(ncclDevCommDestroy(comm, &m.dev_comm), "ncclDevCommDestroy");
  if (m.peer_bases_device) warn_cuda(cudaFree(m.peer_bases_device), "cudaFree");
  if (m.local_state) warn_cuda(cudaFree(m.local_state), "cudaFree");
  if (m.ll_state) warn_cuda(cudaFree(m.ll_state), "cudaFree");
  if (m.layout_workspace) warn_cuda(cudaFree(m.layout_workspace), "cudaFree");
  if (m.error_record) warn_cuda(cudaFreeHost(m.error_record), "cudaFreeHost");
  if (m.host_counters) warn_cuda(cudaFreeHost(m.host_counters), "cudaFreeHost");
  if (m.comm_stream) warn_cuda(cudaStreamDestroy(m.comm_stream), "cudaStreamDestroy");
}

int Buffer::rank() const noexcept { return impl_->rank; }
int Buffer::num_ranks() const noexcept { return impl_->num_ranks; }
const BufferOptions& Buffer::options() const noexcept { return impl_->options; }
cudaStream_t Buffer::comm_stream() const noexcept { return impl_->comm_stream; }

void Buffer::get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  detail::validate_layout_args(args, m.num_ranks);
  detail::launch_dispatch_layout(args, m.num_ranks, m.layout_workspace, m.wait_context(), stream);
}

void Buffer::barrier(cudaStream_t stream) {
  Impl& m = *impl_;
  m.check_usable();
  if (m.transport == detail::Transport::kGin) {  // network path: GIN signals (not yet run on a real network)
    detail::gin_barrier(m, stream);
    return;
  }
  detail::BarrierParams p{};
  p.peer_bases = m.peer_bases_device;
  p.barrier_offset = m.window_layout.barrier_offset;
  p.epoch = &m.local_state->barrier_epoch[detail::kHostBarrierSlot];
  p.slot = detail::kHostBarrierSlot;
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.wait = m.wait_context();
  detail::launch_barrier(p, stream);
}

void Buffer::synchronize(cudaStream_t stream) {
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
  impl_->raise_device_error();
}

void Buffer::check_device_errors() { impl_->raise_device_error(); }

}  // namespace openep
