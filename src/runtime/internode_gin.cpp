// Host side of the internode GIN rail (runtime/internode_gin.hpp). RUN only under the loopback GIN test plugin
// (fake nodes on one H200, 2026-12-02); NEVER on a real network (no RDMA NICs here).
#include "runtime/internode_gin.hpp"

#include <nccl_device.h>

#include "kernels/internode_gin_launch.hpp"
#include "protocol/internode_gin_layout.hpp"
#include "runtime/check.hpp"
#include "runtime/fabric.hpp"
#include "runtime/nccl_fabric.hpp"
#include "runtime/transport.hpp"

namespace openep::detail {
namespace {

class GinRail final : public NcclRailComm {
 public:
  GinRail(ncclComm_t comm, int device, int ranks_per_node, int local_rank)
      : NcclRailComm(comm, device), ranks_per_node_(ranks_per_node), local_rank_(local_rank) {
    try {
      create_gin_dev_comm(comm_, gin_rail_dev_comm_requirements(num_nodes_), GinRailSignals::count(num_nodes_),
                          kInternodeGinOption, kInternodeGinRemedy, dev_comm_, has_dev_comm_);
    } catch (...) {
      // A failed GIN request poisons the communicator (nccl-device-api.md 4): abort it; the Group's is untouched.
      if (has_dev_comm_) warn_nccl(ncclDevCommDestroy(comm_, &dev_comm_), "ncclDevCommDestroy (rail)");
      has_dev_comm_ = false;
      abort();
      throw;
    }
  }
  ~GinRail() override {
    release_area();
    if (has_dev_comm_ && !aborted_) warn_nccl(ncclDevCommDestroy(comm_, &dev_comm_), "ncclDevCommDestroy (rail)");
  }
  const char* name() const noexcept override { return "NCCL GIN (device-initiated; not yet run on a real network)"; }

  // The rail window: GinRailLayout's control area, then the caller's area. Collective over the rail.
  char* open_area(size_t bytes, Fabric&) override {
    OPENEP_CHECK(window_base_ == nullptr, ErrorCode::kInternal, "the GIN rail has one area");
    window_bytes_ = GinRailLayout::window_bytes(bytes);
    void* mem = nullptr;
    OPENEP_NCCL_CHECK(ncclMemAlloc(&mem, window_bytes_));
    window_base_ = static_cast<char*>(mem);
    OPENEP_CUDA_CHECK(cudaMemset(window_base_, 0, window_bytes_));
    OPENEP_CUDA_CHECK(cudaDeviceSynchronize());
    OPENEP_NCCL_CHECK(ncclCommWindowRegister(comm_, window_base_, window_bytes_, &window_, NCCL_WIN_DEFAULT));
    OPENEP_CHECK(window_ != nullptr, ErrorCode::kNccl, "ncclCommWindowRegister (rail) returned no window");
    void* ex = nullptr;
    OPENEP_CUDA_CHECK(cudaMalloc(&ex, sizeof(uint64_t) * kMaxInternodeNodes));
    exchanges_ = static_cast<uint64_t*>(ex);
    OPENEP_CUDA_CHECK(cudaMemset(exchanges_, 0, sizeof(uint64_t) * kMaxInternodeNodes));
    return window_base_ + GinRailLayout::area_offset();
  }
  void close_area(char*, Fabric&) noexcept override { release_area(); }
  void set_wait_context(const WaitContext& w) override { wait_ = w; has_wait_ = true; }

  void exchange(const char* send_base, char* recv_base, const std::vector<RailTransfer>& transfers,
                cudaStream_t stream) override {
    OPENEP_CHECK(!aborted_, ErrorCode::kBufferFailed, "the rail communicator was aborted after a timeout");
    OPENEP_CHECK(window_base_ != nullptr && has_wait_, ErrorCode::kInternal, "GIN rail exchange before open_area / "
                 "set_wait_context");
    GinRailExchangeParams p{};
    p.dev_comm = dev_comm_;
    p.window = window_;
    p.exchanges = exchanges_;
    p.node = node_, p.num_nodes = num_nodes_, p.ranks_per_node = ranks_per_node_, p.local_rank = local_rank_;
    p.wait = wait_;
    uint64_t seen = 0;  // bitmask of listed nodes: each at most once
    for (const RailTransfer& t : transfers) {
      OPENEP_CHECK(t.node != node_ && t.node >= 0 && t.node < num_nodes_ && !(seen >> t.node & 1), ErrorCode::kInternal,
                   "GIN rail transfer to node ", t.node, " from node ", node_, " of ", num_nodes_);
      seen |= uint64_t{1} << t.node;
      GinRailPeer& q = p.peers[p.num_peers++];
      q.node = t.node;
      q.send_offset = window_offset(send_base + t.send_offset, t.send_bytes);
      q.send_bytes = t.send_bytes;
      q.recv_offset = window_offset(recv_base + t.recv_offset, t.recv_bytes);
      q.recv_bytes = t.recv_bytes;
    }
    launch_gin_rail_exchange(p, stream);
  }

 private:
  // Window offset of [ptr, ptr + bytes), which must lie in the caller's area.
  uint64_t window_offset(const char* ptr, size_t bytes) const {
    const char* lo = window_base_ + GinRailLayout::area_offset();
    OPENEP_CHECK(ptr >= lo && ptr + bytes <= window_base_ + window_bytes_, ErrorCode::kInternal, "GIN rail transfer of ",
                 bytes, " bytes outside the rail window");
    return static_cast<uint64_t>(ptr - window_base_);
  }
  void release_area() noexcept {
    if (window_ && !aborted_) warn_nccl(ncclCommWindowDeregister(comm_, window_), "ncclCommWindowDeregister (rail)");
    if (window_base_) warn_nccl(ncclMemFree(window_base_), "ncclMemFree (rail)");
    if (exchanges_) cudaFree(exchanges_);
    window_ = nullptr, window_base_ = nullptr, exchanges_ = nullptr, window_bytes_ = 0;
  }

  int ranks_per_node_ = 1, local_rank_ = 0;
  ncclDevComm dev_comm_{};
  bool has_dev_comm_ = false;
  ncclWindow_t window_ = nullptr;
  char* window_base_ = nullptr;
  size_t window_bytes_ = 0;
  uint64_t* exchanges_ = nullptr;   // [kMaxInternodeNodes] device memory
  WaitContext wait_{};
  bool has_wait_ = false;
};

}  // namespace

std::unique_ptr<Rail> make_gin_rail(ncclComm_t rail_comm, int device, int ranks_per_node, int local_rank) {
  return std::make_unique<GinRail>(rail_comm, device, ranks_per_node, local_rank);
}

}  // namespace openep::detail
