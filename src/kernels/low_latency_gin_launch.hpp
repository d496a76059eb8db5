// Launchers of the network (GIN) low-latency kernels, src/kernels/low_latency_gin.cu (protocol there).
// Used only by a Buffer created with Transport::kGin (runtime/transport.hpp). Run only under the
// loopback GIN test plugin (fake nodes on one GPU, tests/gin_loopback/README.md), never on a real network.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <cstdint>

#include "kernels/low_latency_launch.hpp"
#include "protocol/device_error.hpp"
#include "protocol/low_latency_gin_layout.hpp"

namespace openep::detail {

// Where the GIN kernels find the window: (window, offset) addressing, the same offsets on every rank.
struct GinWindow {
  ncclDevComm dev_comm;       // created with gin_dev_comm_requirements(); ginContextCount > 0 (host-checked)
  ncclWindow_t window;        // the Buffer's one registered window
  size_t region_offset;       // window offset of the low-latency region (LowLatencyLayout offsets start here)
  size_t staging_offset;      // window offset of the GIN staging area (LowLatencyGinLayout offsets start here)
  LowLatencyGinLayout staging;
};

// Dispatch send over GIN. `base` is exactly what the NVLink launcher would get (do_send = true); only its
// send-side fields are read, and the receive is left to the NVLink receive kernel (see the protocol).
struct LowLatencyGinDispatchParams {
  LowLatencyDispatchParams base;
  GinWindow gin;
};

// Combine send over GIN. `stage_x`: base.x is the caller's array (copy each row into the zero-copy area
// first); false when base.x already is the zero-copy area (zero_copy = true).
struct LowLatencyGinCombineParams {
  LowLatencyCombineParams base;
  GinWindow gin;
  bool stage_x;
};

// The bounded wait for GIN signals that stands in front of the NVLink receive kernels: one block, thread s
// polls source s's signal until it reaches the epoch the receive will work on, timing out with
// (rank, peer = s, phase).
struct GinSignalWaitParams {
  ncclDevComm dev_comm;
  LowLatencyState* state;
  int kind;                   // 0 = dispatch, 1 = combine (index into the LowLatencyState arrays)
  int rank, num_ranks;
  int64_t* wait_stats;        // [num_ranks] accumulated wait cycles, or nullptr
  WaitContext wait;
};

// Barrier over GIN signals (Buffer::barrier on a kGin Buffer): signal every rank, wait for every rank.
struct GinBarrierParams {
  ncclDevComm dev_comm;
  uint64_t* epoch;            // device memory: completed barriers (monotonic)
  int rank, num_ranks;
  WaitContext wait;
};

int low_latency_gin_dispatch_blocks(const LowLatencyGinDispatchParams& p, int num_sms);
int low_latency_gin_combine_blocks(const LowLatencyGinCombineParams& p, int num_sms);
void launch_low_latency_gin_dispatch_send(const LowLatencyGinDispatchParams& p, int num_blocks, cudaStream_t stream);
void launch_low_latency_gin_combine_send(const LowLatencyGinCombineParams& p, int num_blocks, cudaStream_t stream);
void launch_gin_signal_wait(const GinSignalWaitParams& p, cudaStream_t stream);
void launch_gin_barrier(const GinBarrierParams& p, cudaStream_t stream);
// Zeroes the dispatch and combine signals (not the barrier ones) on every context. REQUIRES: no traffic
// targets them (clean_low_latency_buffer calls it between two barriers).
void launch_gin_reset_signals(const ncclDevComm& dev_comm, int num_ranks, cudaStream_t stream);
// Zeroes signals [0, num_signals) of `dev_comm` on every context. NCCL 2.28.9 hands a new device communicator a
// range of a per-communicator signal pool that an earlier, destroyed one may have used, WITHOUT zeroing it
// (ncclGinAllocSignalsCounters is a plain space allocator): a new Buffer would see its predecessor's counts and
// pass its first waits at once (seen on an H200 with the loopback GIN plugin: flags read as 0, wrong rows).
// REQUIRES: no peer signals `dev_comm` yet (create_gin_dev_comm calls it before the window registration, which
// is collective).
void launch_gin_zero_signals(const ncclDevComm& dev_comm, int num_signals, cudaStream_t stream);
// Fills peer_bases[p] = nullptr for every p except peer_bases[rank] = this rank's own window base (the
// receive kernels read only their own region; a non-LSA peer has no valid LSA pointer).
void launch_query_own_base(ncclWindow_t window, int rank, int num_ranks, char** peer_bases, cudaStream_t stream);

}  // namespace openep::detail
