// The network leg of internode normal mode: the RAIL, i.e. the ranks with my local rank on every node (one per
// node; rail rank = node). The protocol's kernels never touch the network; the host enqueues one exchange per leg
// (headers, records, partials) on the operation's stream between them (the GIN rail's exchange is itself a small
// kernel there). Backends:
//   NcclRail     grouped ncclSend/ncclRecv on a rail communicator split from the Group (any network NCCL runs
//                on: InfiniBand, RoCE, EFA through its plugin, sockets; fake nodes on one host). The default.
//   VirtualRail  virtual ranks with emulated nodes (openep/testing.hpp): each rank copies what its rail peers
//                staged for it (cudaMemcpyAsync after their events), host rendezvous between the rail peers.
//   GinRail      (runtime/internode_gin.hpp; BufferOptions::internode_backend = kGin) the same exchanges,
//                device-initiated: a one-block kernel on the stream rendezvous with every rail peer over NCCL GIN
//                puts and signals on the rail communicator. RUN only under the loopback GIN test plugin (fake
//                nodes on one H200, 2026-12-02); NEVER on a real network (no RDMA NICs here).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "protocol/device_error.hpp"

namespace openep::detail {

class Fabric;

// One peer of an exchange: bytes to send to / receive from my rail peer on `node` (offsets into the bases
// given to exchange()). Byte counts must match pairwise: what n sends me is what I receive from n.
struct RailTransfer {
  int node = 0;
  size_t send_offset = 0, send_bytes = 0;
  size_t recv_offset = 0, recv_bytes = 0;
};

class Rail {
 public:
  virtual ~Rail() = default;
  virtual const char* name() const noexcept = 0;
  virtual int num_nodes() const noexcept = 0;
  virtual int node() const noexcept = 0;
  // Collective over the rail (every rail peer calls it, in the same order). Enqueued on `stream`: ordered after
  // the work before it on the stream, and the work after it sees the received bytes. send_base/recv_base are
  // device memory of this rank; transfers to the own node are not allowed (the own node never uses the rail).
  virtual void exchange(const char* send_base, char* recv_base, const std::vector<RailTransfer>& transfers,
                        cudaStream_t stream) = 0;
  // True if work enqueued by earlier exchanges may still be stuck in the network (NCCL), so that a host-side
  // deadline should abort it rather than wait forever.
  virtual bool can_hang() const noexcept { return false; }
  // True if exchanges should run on a stream of their own, so that the kernels of one chunk overlap the network
  // leg of the next (NCCL). False for virtual ranks: on one GPU nothing is gained, and a third stream per rank
  // would share hardware queues with other ranks' spinning kernels.
  virtual bool overlaps() const noexcept { return false; }
  // Gives up on the network leg after a timeout (NCCL: ncclCommAbort, which also ends NCCL kernels that wait
  // for a dead peer). Later exchanges fail. Never throws.
  virtual void abort() noexcept {}
  // NCCL's asynchronous error on the rail communicator as a sentence for an error message ("" when none or no
  // NCCL): after a timeout it tells a network failure (NCCL's GIN progress thread stops on one) from a slow peer.
  virtual std::string network_error() const { return {}; }

  // Device memory of `bytes` (not zeroed) that exchanges send from and receive into: every send_base / recv_base
  // range of an exchange must lie in it. Default: private device memory from `fabric`. The GIN rail registers it as
  // a window on the rail communicator, which makes the call collective over the rail. One area per Rail.
  virtual char* open_area(size_t bytes, Fabric& fabric);
  virtual void close_area(char* area, Fabric& fabric) noexcept;
  // Where device-side waits of the rail record a failure (the Buffer's error slot). Only the GIN rail waits on
  // the device; the others ignore it.
  virtual void set_wait_context(const WaitContext&) {}
};

// The two halves of a multi-node Group: the ranks of my node (an NVLink domain; its Fabric opens the node
// window) and my rail.
struct NodeSplit {
  std::unique_ptr<Fabric> node;
  std::unique_ptr<Rail> rail;
};

}  // namespace openep::detail
