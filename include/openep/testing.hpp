// openep::testing: virtual ranks, a TESTING FACILITY (not a user feature).
//
// A VirtualFabric puts N ranks of an OpenEP world into ONE process on ONE GPU. Each virtual rank has its own
// host thread, its own Group, its own Buffer(s) with their own window (plain device memory), streams, epochs,
// timeouts and error records; its peer table points at the other virtual ranks' windows. The kernels,
// launchers, barriers and handles are exactly the production ones (nothing is mocked): they only ever see
// peer base pointers and offsets. This is how OpenEP checks its multi-rank protocols bitwise against the CPU
// reference at EP sizes no machine at hand has (EP8, EP16 on one H200). It says nothing about speed.
//
// What differs from real GPUs, and why:
//  * Grid cap. The kernels of all N ranks must be resident on the GPU at once (a rank's kernel spins on data
//    another rank's kernel produces). Every kernel grid of a virtual rank is therefore capped at
//    max_blocks_per_rank() blocks: by default even(floor(SMs / N) - 2), at least 2 (132-SM H200: EP2 64,
//    EP4 30, EP8 14, EP16 6), which leaves SMs for the one-block kernels (prepare, barrier) of every rank.
//    A larger normal-mode Config::num_sms is reduced to the cap (results are identical: they do not depend on
//    the grid), and the low-latency kernels use the cap instead of every SM. A cooperative (fused
//    low-latency) launch whose grids cannot all be co-resident fails with openep::Error (kUnsupported)
//    naming the grid, the ranks and the occupancy, instead of hanging.
//  * Process environment. Lazy module loading can make a kernel launch wait for the whole device, which on
//    one GPU means waiting for the other ranks' spinning kernels; more streams than hardware queues create
//    false dependencies between ranks. Call prepare_process_for_virtual_ranks() first thing in main(),
//    before any CUDA call; a VirtualFabric refuses to start (kUnsupported, naming the variable) otherwise.
//  * Synchronisation. A virtual rank must not call device-wide synchronising CUDA functions (cudaDeviceSynchronize,
//    cudaFree, cudaMalloc of pinned host memory, ...) while other virtual ranks may have kernels in flight:
//    they would wait for those kernels, which wait for this rank. Use stream-ordered calls on the rank's own
//    streams. OpenEP's Buffer does this itself: its windows and private memory are freed when the
//    VirtualFabric is destroyed, not when the Buffer is.
//  * No NCCL. A virtual Group has no communicator (Group::comm() is nullptr). By default every rank is in one
//    NVLink domain; with VirtualFabricOptions::ranks_per_node the ranks form emulated nodes, and internode
//    normal mode moves its network leg by device copies (the GIN path is never selected).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "openep/group.hpp"

namespace openep::detail {
class VirtualFabricShared;
}  // namespace openep::detail

namespace openep::testing {

// Sets CUDA_MODULE_LOADING=EAGER and CUDA_DEVICE_MAX_CONNECTIONS=32 unless they are set already. Must run
// before the process's first CUDA call (CUDA reads both once, at initialisation).
void prepare_process_for_virtual_ranks();

struct VirtualFabricOptions {
  int num_ranks = 2;          // 2 .. kMaxNvlinkPeers virtual ranks
  // Emulated nodes of this many consecutive ranks (0 = one node of all ranks). With several nodes each node is
  // its own NVLink domain, and internode normal mode runs with its network leg replaced by device copies
  // between the rail peers (a virtual rail: host meetings plus cudaMemcpyAsync after the peers' events;
  // not capturable in a CUDA graph). Low-latency mode has no network path on virtual ranks.
  int ranks_per_node = 0;
  int device = 0;             // the one GPU they share
  int max_blocks_per_rank = 0;  // grid cap per kernel; 0 = the default above
  double rendezvous_timeout_seconds = 120.0;  // bound of every host-side rendezvous (window creation, host_barrier)
};

class VirtualFabric {
 public:
  // Throws openep::Error: kInvalidArgument for bad options, kUnsupported when the process environment is
  // not prepared (see prepare_process_for_virtual_ranks) or the GPU has too few SMs for num_ranks.
  explicit VirtualFabric(const VirtualFabricOptions& options);
  // Frees every window and all memory the ranks' Buffers deferred. REQUIRES: every Group made from it and every
  // Buffer on them is destroyed and no rank thread runs any more.
  ~VirtualFabric();
  VirtualFabric(const VirtualFabric&) = delete;
  VirtualFabric& operator=(const VirtualFabric&) = delete;

  int num_ranks() const noexcept;
  int device() const noexcept;
  int max_blocks_per_rank() const noexcept;

  // The Group of virtual rank `rank`; call it on that rank's host thread (it selects the device). The Group
  // must be destroyed before the VirtualFabric.
  std::unique_ptr<Group> make_group(int rank);

  // Host-side rendezvous of all virtual ranks (every rank calls it). Bounded: throws openep::Error
  // (kTimeout, naming the ranks that did not arrive) after the rendezvous timeout.
  void host_barrier(int rank);

  // Runs fn(rank, group) on one host thread per virtual rank, each with its own Group and the device
  // selected, and returns when every thread has returned. The first exception any rank threw is rethrown
  // (after all threads have ended). Every rank's thread must make the same collective calls.
  void run(const std::function<void(int rank, Group& group)>& fn);

 private:
  std::shared_ptr<detail::VirtualFabricShared> shared_;
};

// ---------------------------------------------------------------------------------------------------------
// IpcFabric: ranks as separate PROCESSES that share GPUs (several may share one), a TESTING FACILITY.
//
// Each process is one rank of an NVLink-style world without NCCL: its windows are CUDA virtual memory exported as
// POSIX file descriptors, passed to every peer over Unix-domain sockets in `rendezvous_dir`, and mapped by each
// peer, so the kernels get the same peer pointers as over NVLink. Why it exists: NCCL refuses two ranks of one
// communicator on one GPU, and fake NCCL nodes have no load/store path, so without it a test in which a rank's
// PROCESS really dies (SIGKILL) while the others keep using its window needs several GPUs. The survivors' imported
// handles keep a dead rank's memory alive (the driver counts references), so their stores into it stay valid.
// Processes on one GPU are time-sliced, not co-resident: a kernel that waits for another process's kernel makes
// progress at the GPU's time-slice switches (slow, but bounded by the same timeouts). It says nothing about speed.
// No NCCL: Group::comm() is nullptr; no network (GIN) path; no node split.
struct IpcFabricOptions {
  int rank = 0;                          // this process's rank
  int num_ranks = 0;                     // 1 .. 8 processes
  int device = 0;                        // this process's GPU (several processes may name the same one)
  std::string rendezvous_dir;            // an existing directory private to this world (tools/launch.py --share-gpus
                                         // gives the directory of OPENEP_UNIQUE_ID_FILE); socket paths < 108 bytes
  double rendezvous_timeout_seconds = 60.0;  // bound of every host-side rendezvous (window creation, host_barrier)
};

class IpcFabric {
 public:
  // Collective over the num_ranks processes (each calls it once with its own rank): binds this rank's socket,
  // meets every peer (bounded: kTimeout naming the ranks that did not arrive) and returns this rank's Group,
  // on `device` (selected with cudaSetDevice). kInvalidArgument for bad options; a device that cannot export memory as
  // file descriptors fails at the first Buffer (kCuda from cuMemCreate). The Group owns the rendezvous; destroy it after its Buffers.
  static std::unique_ptr<Group> make_group(const IpcFabricOptions& options);
  // Host-side rendezvous of every rank of a Group made by make_group (bounded like make_group). kInvalidArgument
  // for a Group of another fabric.
  static void host_barrier(Group& group);
};

}  // namespace openep::testing
