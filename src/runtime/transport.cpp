#include "runtime/transport.hpp"

#include "runtime/check.hpp"

namespace openep::detail {

const char* transport_name(Transport t) {
  switch (t) {
    case Transport::kNvlink: return "NVLink (LSA)";
    case Transport::kGin: return "network (NCCL GIN; not yet run on a real network)";
  }
  return "unknown";
}

Transport select_transport(const TransportQuery& q) {
  // One NVLink domain: peer pointers reach every rank. GIN is never requested here (it would poison the
  // communicator on a host without a GIN plugin, nccl-device-api.md section 4).
  if (q.num_nvlink_ranks == q.num_ranks) return Transport::kNvlink;
  OPENEP_CHECK(q.allow_network, ErrorCode::kUnsupported, "the Group's ", q.num_ranks,
               " ranks span several NVLink domains (NVLink team of ", q.num_nvlink_ranks,
               "); ranks in other nodes need the network, which is off: set BufferOptions::allow_network = true "
               "(low-latency mode only; needs RDMA NICs with NCCL GIN; not yet run on a real network)");
  OPENEP_CHECK(q.low_latency_mode, ErrorCode::kUnsupported, "the Group's ", q.num_ranks,
               " ranks span several NVLink domains (NVLink team of ", q.num_nvlink_ranks,
               ") and BufferOptions::allow_network is set, but low_latency_mode is false: normal-mode "
               "(intranode) kernels need every rank in one NVLink domain; internode normal mode is not "
               "implemented");
  OPENEP_CHECK(q.num_ranks <= kMaxGinRanks, ErrorCode::kUnsupported, "the network (GIN) low-latency path "
               "supports up to ", kMaxGinRanks, " ranks, the Group has ", q.num_ranks);
  OPENEP_CHECK_ARG(q.num_nvl_bytes == 0, "BufferOptions::num_nvl_bytes must be 0 with allow_network on a "
                   "multi-node Group (the normal-mode NVLink region is unused there), got ", q.num_nvl_bytes);
  OPENEP_CHECK_ARG(q.num_rdma_bytes > 0, "BufferOptions::num_rdma_bytes must be > 0 with allow_network on a "
                   "multi-node Group (size it with low_latency_buffer_size_hint), got 0");
  return Transport::kGin;
}

ncclDevCommRequirements gin_dev_comm_requirements(int num_ranks) {
  ncclDevCommRequirements reqs = {};  // 2.28.9 has no initializer macro; zero means "none"
  reqs.ginSignalCount = GinSignals::count(num_ranks);
  reqs.ginCounterCount = 0;
  reqs.ginForceEnable = false;  // a multi-node communicator turns GIN on by itself
  return reqs;
}

}  // namespace openep::detail
