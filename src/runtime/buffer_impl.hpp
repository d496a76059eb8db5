// Buffer internals shared by the runtime and the kernel launchers.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "openep/buffer.hpp"
#include "protocol/device_error.hpp"
#include "protocol/window_layout.hpp"
#include "runtime/fabric.hpp"
#include "runtime/transport.hpp"

namespace openep::detail {
struct HostCounters;
struct LowLatencyState;
struct InternodeState;
struct InternodeHostCounters;
}  // namespace openep::detail

namespace openep::detail {

// Throws kVersionMismatch naming both versions unless they are equal.
void check_nccl_version(int compiled, int loaded);
// Argument checks shared by intranode and internode dispatch (x, scales, top-k); throw kInvalidArgument.
void validate_normal_dispatch_data(const DispatchArgs& a);
// Combine checks shared by intranode and internode combine (hidden, x, top-k weights, outputs).
void validate_normal_combine_data(const CombineArgs& a, int num_recv_tokens, int num_tokens, const CombineOutputs& out);
// BufferOptions::enable_shrink needs low-latency mode over NVLink (kInvalidArgument / kUnsupported otherwise).
void validate_shrink_options(bool enable_shrink, bool low_latency_mode, Transport transport);

}  // namespace openep::detail

namespace openep {

struct Buffer::Impl {
  Group* group = nullptr;
  detail::Fabric* fabric = nullptr;            // group->fabric(): NCCL, or virtual ranks (runtime/fabric.hpp)
  BufferOptions options;
  int rank = 0, num_ranks = 0, device = 0;

  detail::FabricWindow win;                    // this rank's window, its peer table, the device communicator
  detail::WindowLayout window_layout;
  char** peer_bases_device = nullptr;          // [num_ranks] device table of each peer's window base

  detail::LocalState* local_state = nullptr;   // device memory
  int* layout_workspace = nullptr;             // device memory, zeroed; kernels leave it zeroed
  detail::DeviceError* error_record = nullptr; // pinned mapped host memory (host view)
  detail::DeviceError* error_record_device = nullptr;  // device view of the same
  cudaStream_t comm_stream = nullptr;
  bool failed = false;
  // Window-backed dispatch outputs (BufferOptions::num_recv_pool_bytes): segments of the pool in offset order.
  struct PoolSegment {
    size_t offset = 0, bytes = 0;
    bool free = true;
    cudaEvent_t released = nullptr;  // recorded by free_recv; the segment is handed out once it has completed
  };
  std::vector<PoolSegment> pool;
  char* pool_base() const { return win.local + window_layout.pool_offset; }
  detail::HostCounters* host_counters = nullptr;         // pinned mapped (host view)
  detail::HostCounters* host_counters_device = nullptr;  // device view
  int64_t host_seq = 0;                                  // last exact-mode prepare issued
  int num_device_sms = 0;
  detail::GridBudget grids;                              // largest grid per kernel (fabric's grid_budget)
  detail::LowLatencyState* ll_state = nullptr;           // device memory, zeroed (when num_rdma_bytes > 0)
  int32_t* shrink_mask = nullptr;                        // enable_shrink: device memory [num_ranks], zeroed
  // How the kernels reach peers, decided once at creation (runtime/transport.hpp). kGin: a multi-node Group
  // in low-latency mode with allow_network; NOT YET RUN ON A REAL NETWORK. Then win.dev_comm has GIN contexts,
  // the peer table holds only this rank's own base, and the window ends with the GIN staging area.
  detail::Transport transport = detail::Transport::kNvlink;
  size_t gin_staging_offset = 0;                         // kGin: window offset of LowLatencyGinLayout

  // Internode normal mode (transport kHostP2p or kInternodeGin, docs/INTERNODE.md). The window above is the NODE
  // window (its peer table has ranks_per_node entries, indexed by local rank), opened on node_fabric; the rail moves
  // the network leg. rail_area (InternodeRailArea, from Rail::open_area: private device memory, or the GIN rail's
  // window) holds rail_buffer (num_rdma_bytes, two halves, InternodeRailLayout), the headers and barrier tokens.
  struct Internode {
    static constexpr int kRailEvents = 17;     // detail::kMaxInternodeChunks + 1
    int ranks_per_node = 1, num_nodes = 1, node = 0, local_rank = 0;
    std::unique_ptr<detail::Fabric> node_fabric;
    std::unique_ptr<detail::Rail> rail;
    char* rail_area = nullptr;
    char* rail_buffer = nullptr;
    int32_t* header_send = nullptr;            // [N][header_ints_max]
    int32_t* header_recv = nullptr;            // [N][header_ints_max]
    int32_t* barrier_token = nullptr;          // [2][N] ints: Buffer::barrier's rail leg
    detail::InternodeState* state = nullptr;   // device memory, zeroed
    detail::InternodeHostCounters* host = nullptr;         // pinned mapped (host view)
    detail::InternodeHostCounters* host_device = nullptr;  // device view
    int64_t host_seq = 0;
    // Rails that overlap (NCCL): the network legs run on rail_stream, ordered against the operation's stream by
    // these events (one per chunk and one more). Null for rails that run on the operation's stream.
    cudaStream_t rail_stream = nullptr;
    cudaEvent_t rail_events[kRailEvents] = {};
  } in;
  bool internode() const { return detail::is_internode(transport); }
  // Peer table size and this rank's index in it (the node for internode, else the Group).
  int window_ranks() const { return internode() ? in.ranks_per_node : num_ranks; }
  int window_rank() const { return internode() ? in.local_rank : rank; }
  // Waits for `stream` within the timeout (plus a margin); when the rail can hang (NCCL) and the deadline passes,
  // aborts the rail and throws kTimeout naming the phase. Raises recorded device errors.
  void synchronize_bounded(cudaStream_t stream, const char* phase);

  detail::WaitContext wait_context() const {
    return detail::WaitContext{&local_state->error_claim, error_record_device,
                               static_cast<uint64_t>(options.timeout_seconds * 1e9), rank};
  }
  // Throws kBufferFailed if an earlier error poisoned the Buffer, or the recorded device error if any.
  void check_usable();
  void raise_device_error();
};

namespace detail {
// Blocks of a normal-mode kernel: config.num_sms (even, >= 2, at most the device's SMs), reduced to the fabric's
// grid budget where it clamps (virtual ranks: openep/testing.hpp), else kInvalidArgument / kInternal.
int normal_mode_blocks(const Config& c, const Buffer::Impl& m);
}  // namespace detail

}  // namespace openep
