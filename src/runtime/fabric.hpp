// The seam between a Buffer and the ranks it talks to: where a rank's window lives, how it reaches its
// peers' windows, which device-communicator state the kernels get, and how large a grid a rank may launch.
//
// Two implementations:
//   NcclFabric     (runtime/nccl_fabric.cpp) one process per GPU: ncclMemAlloc + ncclCommWindowRegister, LSA
//                  peer pointers, an ncclDevComm (LSA capability check, or GIN for the network path).
//   VirtualFabric  (runtime/virtual_fabric.cpp, openep/testing.hpp) N virtual ranks in ONE process on ONE GPU,
//                  each on its own host thread: plain device memory windows, the peer table points at the other
//                  virtual ranks' windows, no NCCL at all. A testing facility, not a user feature.
// The kernels, launchers, barriers, epochs, timeouts, handles and error records are the same on both: the
// kernels only ever see peer base pointers and offsets.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>
#include <nccl_device.h>

#include <cstddef>
#include <vector>

#include "kernels/grid.hpp"
#include "runtime/rail.hpp"

namespace openep::detail {

// What a Buffer asks for at creation; every rank passes the same request (the call is collective).
struct WindowRequest {
  size_t bytes = 0;  // window size, a multiple of kWindowAlignment
  bool gin = false;  // network path: a GIN-capable device communicator and only the own base in the peer table
};

// One rank's window as the runtime and the kernels see it.
struct FabricWindow {
  char* local = nullptr;                // this rank's window, `bytes` of device memory, zeroed
  size_t bytes = 0;
  std::vector<char*> peer_bases;        // [num_ranks] host copy of the device table (nullptr: no load/store path)
  ncclWindow_t nccl_window = nullptr;   // NCCL only: the registered window (GIN puts name it)
  ncclDevComm dev_comm{};               // NCCL only: the device communicator (ginContextCount > 0 on GIN)
  bool has_dev_comm = false;
};

// The budget of a rank whose kernels have the whole device to themselves (one process per GPU, or processes that
// are time-sliced on a shared one): grids up to every SM, a larger request is an error.
inline GridBudget whole_device_budget(int device_sms) {
  GridBudget b;
  b.device_sms = device_sms;
  b.max_blocks = device_sms;
  b.grids_per_device = 1;
  b.clamp = false;
  return b;
}

class Fabric {
 public:
  virtual ~Fabric() = default;
  virtual const char* name() const noexcept = 0;
  virtual int rank() const noexcept = 0;
  virtual int num_ranks() const noexcept = 0;
  virtual int device() const noexcept = 0;
  // This rank's NVLink (LSA) team: its size (0 = no symmetric memory) and this rank's index in it.
  virtual int num_nvlink_ranks() const noexcept = 0;
  virtual int nvlink_rank() const noexcept = 0;
  // The NCCL communicator, or nullptr (virtual ranks have none).
  virtual ncclComm_t nccl_comm() const noexcept { return nullptr; }

  // Collective over every rank: allocates this rank's window of req.bytes, zeroes it, makes every peer's
  // window zero before any rank returns (so a peer's first store cannot be overwritten), fills `peer_table`
  // (device memory, [num_ranks] char*) and w.peer_bases, and creates the device communicator the request
  // needs. Enqueues on `stream` and waits for it. Throws openep::Error on failure.
  virtual void open_window(const WindowRequest& req, cudaStream_t stream, char** peer_table, FabricWindow& w) = 0;
  // Releases what open_window made. Never throws. REQUIRES no peer still accesses the window (the Buffer's
  // final barrier), and no kernel of this rank still runs on it.
  virtual void close_window(FabricWindow& w) noexcept = 0;

  virtual GridBudget grid_budget(int device_sms) const = 0;
  // Collective over every rank: splits the ranks into nodes of `ranks_per_node` consecutive ranks (node-major)
  // and rails (one rank per node with the same local rank). The node Fabric has ranks_per_node ranks (rank =
  // local rank) in one NVLink domain and never asks for GIN. `gin_rail`: the rail is the device-initiated GIN rail
  // (BufferOptions::internode_backend = kGin; its communicator, and only it, gets a GIN device communicator), else
  // the host-driven one. Throws kUnsupported where the fabric cannot (no GIN: naming NCCL's reason).
  virtual NodeSplit split_nodes(int ranks_per_node, bool gin_rail);
  // Priority of the Buffer's communication stream (cudaStreamCreateWithPriority): the device's greatest for
  // one process per GPU (DeepEP's choice); virtual ranks use the default priority, so that every rank's
  // streams come from one pool of hardware queues (see VirtualRankFabric).
  virtual int comm_stream_priority() const;

  // The Buffer's private device memory and pinned, device-mapped host memory go through here, so a virtual
  // fabric can defer the frees (cudaFree synchronises the whole device, which on one GPU would wait for the
  // other virtual ranks' spinning kernels). Throw openep::Error on failure; the frees never throw.
  virtual void* alloc_device(size_t bytes);
  virtual void free_device(void* p) noexcept;
  // Returns the host pointer and sets *device_view.
  virtual void* alloc_mapped(size_t bytes, void** device_view);
  virtual void free_mapped(void* p) noexcept;
};

}  // namespace openep::detail
