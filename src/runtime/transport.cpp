#include "runtime/transport.hpp"

#include "runtime/check.hpp"

namespace openep::detail {

const char* transport_name(Transport t) {
  switch (t) {
    case Transport::kNvlink: return "NVLink (LSA)";
    case Transport::kGin: return "network (NCCL GIN; not yet run on a real network)";
    case Transport::kHostP2p: return "internode (NVLink + host-driven NCCL p2p between nodes)";
    case Transport::kInternodeGin:
      return "internode (NVLink + device-initiated NCCL GIN between nodes; not yet run on a real network)";
  }
  return "unknown";
}

Transport select_transport(const TransportQuery& q) {
  // The internode GIN backend is the caller's explicit choice, and only means something for internode normal mode.
  OPENEP_CHECK_ARG(!q.internode_gin || !q.low_latency_mode, "BufferOptions::internode_backend = kGin applies to "
                   "internode normal mode; low-latency mode reaches other nodes through BufferOptions::allow_network");
  OPENEP_CHECK(!q.internode_gin || q.num_nvlink_ranks != q.num_ranks, ErrorCode::kUnsupported,
               "BufferOptions::internode_backend = kGin needs a Group over several nodes, but the Group's ", q.num_ranks,
               " ranks share one NVLink domain (a single node never uses the network): leave internode_backend at "
               "kHostP2p");
  // One NVLink domain: peer pointers reach every rank. GIN is never requested here (it would poison the
  // communicator on a host without a GIN plugin, nccl-device-api.md section 4).
  if (q.num_nvlink_ranks == q.num_ranks) return Transport::kNvlink;
  if (!q.low_latency_mode) {
    // Internode normal mode. DeepEP's rule: num_rdma_bytes > 0 on a multi-node Group selects it.
    OPENEP_CHECK(q.num_rdma_bytes > 0, ErrorCode::kUnsupported, "the Group's ", q.num_ranks,
                 " ranks span several NVLink domains (NVLink team of ", q.num_nvlink_ranks, "): internode normal "
                 "mode needs BufferOptions::num_rdma_bytes > 0 for its network buffers (size it with "
                 "internode_buffer_size_hint), got 0");
    OPENEP_CHECK_ARG(q.num_nvl_bytes > 0, "internode normal mode needs BufferOptions::num_nvl_bytes > 0 for the "
                     "node window (size it with internode_buffer_size_hint), got 0");
    return q.internode_gin ? Transport::kInternodeGin : Transport::kHostP2p;
  }
  OPENEP_CHECK(q.allow_network, ErrorCode::kUnsupported, "the Group's ", q.num_ranks,
               " ranks span several NVLink domains (NVLink team of ", q.num_nvlink_ranks,
               "); low-latency mode on ranks in other nodes needs the network, which is off: set "
               "BufferOptions::allow_network = true (needs RDMA NICs with NCCL GIN; not yet run on a real network)");
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

bool requests_gin(Transport t, CommRole role) {
  switch (role) {
    case CommRole::kGroup: return t == Transport::kGin;
    case CommRole::kNode: return false;  // one NCCL node: GIN stays off
    case CommRole::kRail: return t == Transport::kInternodeGin;
  }
  return false;
}

std::string gin_unavailable_message(const char* option, const char* nccl_error, const char* nccl_reason,
                                    const char* remedy) {
  return std::string(option) + ": ncclDevCommCreate with GIN failed (" + (nccl_error ? nccl_error : "") + ": " +
         (nccl_reason ? nccl_reason : "") + "); the network path needs RDMA NICs with NCCL's GIN support (InfiniBand "
         "or RoCE verbs; NCCL's socket transport and stock EFA have none). NCCL may have left the communicator "
         "unusable" + (remedy ? remedy : "");
}

ncclDevCommRequirements gin_rail_dev_comm_requirements(int num_nodes) {
  ncclDevCommRequirements reqs = {};
  reqs.ginSignalCount = GinRailSignals::count(num_nodes);
  reqs.ginCounterCount = 0;
  reqs.ginForceEnable = false;  // the rail spans several NCCL nodes: GIN turns on by itself
  return reqs;
}

}  // namespace openep::detail
