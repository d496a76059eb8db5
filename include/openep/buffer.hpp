// openep::Buffer: the symmetric memory OpenEP's kernels communicate through, and the operations on it.
//
// A Buffer owns one NCCL symmetric window (ncclMemAlloc + ncclCommWindowRegister) on every rank of its
// Group, the NVLink (LSA) peer pointers into it, a device workspace, a communication stream and a
// host-visible error slot. Create one per Group at start-up and keep it: creation is collective and costs
// milliseconds (window registration is a world barrier).
//
// Streams: every operation takes the cudaStream_t it is enqueued on and never synchronises the device.
// Errors found by a kernel (a peer that never arrives within `timeout_seconds`, an expert index out of
// range) are raised as openep::Error by synchronize() or by the next operation on the Buffer; after such an
// error the Buffer refuses further work (ErrorCode::kBufferFailed) until it is destroyed.
//
// Thread safety: a Buffer is used by one host thread at a time.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "openep/group.hpp"
#include "openep/internode.hpp"
#include "openep/intranode.hpp"
#include "openep/low_latency.hpp"
#include "openep/types.hpp"

namespace openep {

// The network leg of internode normal mode (internode.hpp, docs/INTERNODE.md "Backends of the rail"). Both move
// the same records and partials, in the same chunks, between the same rail halves; only who drives the network
// differs.
//   kHostP2p  the host enqueues grouped ncclSend/ncclRecv on the rail communicator. Runs on every network NCCL
//             runs on (InfiniBand, RoCE, EFA through its plugin, sockets). The default.
//   kGin      device-initiated: a small kernel posts NCCL GIN puts with signals to the rail peers and waits
//             (bounded) for theirs. Needs RDMA NICs NCCL drives with GIN (InfiniBand / RoCE verbs; not sockets,
//             not stock EFA). RUN only under the loopback GIN test plugin (fake nodes on one H200, 2026-12-02);
//             NEVER on a real network: the test machines have no RDMA NICs.
enum class InternodeBackend : int { kHostP2p = 0, kGin = 1 };

struct BufferOptions {
  // Bytes for the normal-mode (NVLink) kernels; see Config size hints. Multiple of 128.
  size_t num_nvl_bytes = 0;
  // Bytes for the low-latency kernels, or for the network buffers of internode normal mode (a Group spanning
  // several nodes, not low_latency_mode: see internode.hpp and internode_buffer_size_hint). Multiple of 128.
  size_t num_rdma_bytes = 0;
  bool low_latency_mode = false;
  // Every device-side wait on a peer gives up after this long and reports rank, peer and phase.
  double timeout_seconds = 10.0;
  // Opt-in to the network for a Group whose ranks span several NVLink domains (nodes). Ignored when every
  // rank shares one NVLink domain: a single-node Buffer never touches the network, whatever this says.
  // false (default): such a Group is refused with kUnsupported.
  // true: REQUIRES low_latency_mode, num_nvl_bytes == 0 and RDMA NICs that NCCL can drive with GIN (its
  //   GPU-initiated networking). The Buffer then asks NCCL for GIN signals, reserves a send staging area of
  //   about num_rdma_bytes / 2 more window memory, and the low-latency operations move every message with
  //   GIN puts (same outputs and handle as over NVLink); normal-mode operations fail with kUnsupported.
  //   Creation fails with kUnsupported naming NCCL's reason when the fabric offers no GIN.
  // EXPERIMENTAL: never run on a real network (the test machines have no RDMA NICs). It has run only under
  // OpenEP's loopback GIN test plugin between fake nodes on one GPU (dispatch and combine, BF16/FP8, hook,
  // zero-copy, graph replays, the missing-peer timeout, bitwise against the reference, 2 and 4 nodes with one rank
  // per node; tests/gin_loopback/README.md).
  bool allow_network = false;
  // Internode normal mode only: how the network leg moves (InternodeBackend above). Never chosen for you.
  // kGin REQUIRES a Group over several nodes in normal mode (else kUnsupported / kInvalidArgument naming this
  // field) and RDMA NICs with NCCL GIN: creation then builds a GIN-capable device communicator on the RAIL
  // communicator only (the Group's and the node communicators never get GIN) and registers the rail buffers
  // (num_rdma_bytes plus a few KiB of headers and control words) as its window; where NCCL offers no GIN it fails
  // with kUnsupported naming NCCL's reason. The rail communicator is then unusable (it is aborted); the Group's
  // communicator is not touched. EXPERIMENTAL: run only under the loopback GIN test plugin between fake nodes on one
  // H200 (2026-12-02: the internode suite bitwise, 2 and 4 nodes, one rank per node); NOT RUN on a real network yet
  // (no RDMA NICs on the test machines).
  InternodeBackend internode_backend = InternodeBackend::kHostP2p;
  // Shrink mode (DeepEP's enable_shrink; low-latency mode over NVLink only): a per-rank mask [num_ranks] lives
  // in device memory. A masked rank is not sent to, not waited for, and its experts' rows are left out of every
  // combine (as if those top-k slots were -1). A low-latency receive wait (or a barrier of this Buffer) that
  // times out MASKS the peer instead of failing: the survivors carry on without it, results equal the reference
  // with that rank masked. Tokens of a masked rank are not received. Set, query and clear the mask with
  // low_latency_update_mask_buffer / low_latency_query_mask_buffer / low_latency_clean_mask_buffer.
  // Run on virtual ranks at EP2/4/8 on one H200 (LowLatencyVrank.Shrink*, tests/ranks/low_latency_test.cu); not
  // yet with a killed process.
  bool enable_shrink = false;
  // Window-backed memory for intranode dispatch outputs (OpenEP extension; default 0 = none; multiple of 128;
  // intranode Buffers only). Outputs taken from it with alloc_recv() receive their rows straight from the peers'
  // kernels, so the receiving rank copies nothing out of the window: a third of intranode dispatch's copies go
  // (docs/DESIGN.md "Window-backed outputs"). Run on virtual ranks only (one GPU), 2026-12-02.
  size_t num_recv_pool_bytes = 0;
};

// get_dispatch_layout arguments. All pointers are device pointers on the Buffer's device.
struct LayoutArgs {
  const void* topk_idx = nullptr;        // [num_tokens, num_topk] of index_type, row-major; -1 = no expert
  IndexType index_type = IndexType::kInt64;
  int num_tokens = 0;
  int num_topk = 0;
  int num_experts = 0;                   // multiple of the number of ranks
  // Outputs (written completely; no need to zero them):
  int* num_tokens_per_rank = nullptr;         // [num_ranks]: tokens sent to each rank (once per rank)
  int* num_tokens_per_rdma_rank = nullptr;    // [num_nodes]: tokens sent to each node (once per node), node =
                                              // rank / ranks_per_node(); required iff the Buffer is internode,
                                              // else must be nullptr
  int* num_tokens_per_expert = nullptr;       // [num_experts]: (token, slot) pairs per expert
  bool* is_token_in_rank = nullptr;           // [num_tokens, num_ranks]
};

class Buffer {
 public:
  // Collective over the Group. REQUIRES: the Group outlives the Buffer; every rank passes equal options.
  // Fails with kVersionMismatch if the loaded NCCL differs from the one OpenEP was compiled with, and with
  // kUnsupported if the ranks span several NVLink domains and neither internode normal mode (not
  // low_latency_mode, num_rdma_bytes > 0; internode.hpp) nor, in low-latency mode, options.allow_network (the
  // GIN path; not yet run on a real network) applies. Internode: nodes must be equal, node-major and of at most
  // 8 ranks, else kUnsupported saying so; creation splits a node and a rail communicator off the Group's. With
  // options.internode_backend = kGin it also creates the rail's GIN device communicator and window (kUnsupported
  // naming NCCL's reason where there is no GIN; not yet run on a real network).
  Buffer(Group& group, const BufferOptions& options);
  // Drains the communication stream, then releases the window and device memory. Never throws.
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  int rank() const noexcept;
  int num_ranks() const noexcept;
  const BufferOptions& options() const noexcept;
  // A non-blocking, high-priority stream owned by the Buffer (DeepEP's communication stream).
  cudaStream_t comm_stream() const noexcept;

  // Internode Buffers (a Group over several nodes in normal mode; internode.hpp): whether this is one, the
  // number of nodes (DeepEP's num_rdma_ranks; 1 otherwise) and the ranks per node (the Group's NVLink team).
  bool is_internode() const noexcept;
  int num_nodes() const noexcept;
  int ranks_per_node() const noexcept;
  // Computes the dispatch layout of this rank's tokens (pure local computation, no communication).
  // Enqueued on `stream`. Input validation happens here; expert ids outside [-1, num_experts) are detected
  // on the device and raised at the next synchronisation point.
  void get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);

  // ---- Normal mode, intranode (include/openep/intranode.hpp has the semantics) ----
  // Step 1 of a dispatch: exchanges counts and fills handle.rank_prefix_matrix, handle.num_tokens_per_src and
  // handle.send_pos (caller-allocated: [R][R], [R], [num_tokens][R] int32). In exact mode (num_worst_tokens == 0)
  // the host waits until the counts are known and they are returned; in worst-case mode nothing waits and
  // num_recv_tokens = num_worst_tokens. Sets handle.num_tokens, handle.num_recv_tokens, handle.is_token_in_rank.
  // Collective: every rank calls it with the same hidden, element size, scales, top-k and expert count.
  DispatchCounts dispatch_prepare(const DispatchArgs& args, IntranodeHandle& handle, cudaStream_t stream);
  // Step 2: moves the rows. REQUIRES: dispatch_prepare with the same args and handle came just before on this
  // stream; handle.recv_src_idx and the outputs hold handle.num_recv_tokens rows.
  void dispatch(const DispatchArgs& args, const IntranodeHandle& handle, const DispatchOutputs& out,
                cudaStream_t stream);
  // Cached dispatch: the layout of `handle` with new x (and scales); no count exchange and no host wait.
  // args.topk_idx/topk_weights must be null; routing fields of args are ignored. Collective.
  void dispatch_cached(const DispatchArgs& args, const IntranodeHandle& handle, const DispatchOutputs& out,
                       cudaStream_t stream);
  // Combine: returns every received row to its source and reduces there. Never waits on the host. Collective.
  void combine(const CombineArgs& args, const IntranodeHandle& handle, const CombineOutputs& out, cudaStream_t stream);

  // ---- Window-backed dispatch outputs (BufferOptions::num_recv_pool_bytes) ----
  // Device memory in this rank's window, 256-byte aligned, or nullptr when the pool has no free run of `bytes`
  // (use other memory then: dispatch accepts either). A dispatch or cached dispatch whose outputs (recv_x, and
  // where written recv_x_scales, recv_topk_idx, recv_topk_weights and handle.recv_src_idx) all lie in the pool has
  // the peers store rows straight into them; otherwise it copies rows out of the window as before. Host only,
  // no synchronisation; not thread-safe (one host thread per Buffer, like every other call).
  void* alloc_recv(size_t bytes);
  // Gives memory from alloc_recv back. It is handed out again only once `stream` has passed this point (an event
  // is recorded on it, nothing waits): pass the stream of the last work that reads it. REQUIRES: p came from
  // alloc_recv of this Buffer and was not freed since (kInvalidArgument otherwise). The Buffer's destruction
  // frees the whole pool; memory from it must not be used after that.
  void free_recv(void* p, cudaStream_t stream);
  // Bytes of the pool not handed out (free runs, including those whose stream has not passed the free yet).
  size_t recv_pool_free_bytes() const noexcept;

  // ---- Normal mode, internode (include/openep/internode.hpp has the semantics) ----
  // Step 1: plans the records, exchanges counts with the rail peers and the node, fills the handle's arrays
  // send_pos, send_rdma_head, node_prefix, recv_gbl_rank_prefix_sum, recv_rdma_rank_prefix_sum (caller-allocated,
  // sizes in InternodeHandle) and, in exact mode, waits on the host for the counts and returns them (worst-case
  // mode: nothing waits; num_recv_tokens = num_worst_tokens, num_rdma_recv_tokens = num_nodes * max_tokens).
  // Requires args.num_tokens_per_rdma_rank. Collective: same hidden, element size, scales, top-k and expert count
  // on every rank.
  InternodeDispatchCounts internode_dispatch_prepare(const DispatchArgs& args, InternodeHandle& handle,
                                                     cudaStream_t stream);
  // Step 2: moves the rows. REQUIRES internode_dispatch_prepare with the same args and handle just before on this
  // stream; handle.recv_rdma_mask, recv_src_idx, recv_src_meta and the outputs sized from its counts.
  void internode_dispatch(const DispatchArgs& args, InternodeHandle& handle, const DispatchOutputs& out,
                          cudaStream_t stream);
  // Cached dispatch: the layout of `handle` with new x (and scales); no count exchange, no host wait. No top-k.
  void internode_dispatch_cached(const DispatchArgs& args, const InternodeHandle& handle, const DispatchOutputs& out,
                                 cudaStream_t stream);
  // Combine (BF16): returns every received row through its forwarder; never waits on the host. Collective.
  void internode_combine(const CombineArgs& args, const InternodeHandle& handle, const CombineOutputs& out,
                         cudaStream_t stream);

  // ---- Low-latency mode (include/openep/low_latency.hpp has the semantics, streams and limits) ----
  // Dispatch: sends this rank's tokens and receives the packed per-expert rows. Fills handle.src_info and
  // handle.layout_range (caller-allocated) and sets the handle's shape fields. Collective: every rank calls it
  // with the same T, hidden, num_experts, use_fp8 and hook mode. Returns the receive hook when
  // args.return_recv_hook (then only the send kernel has been launched), else an empty function.
  LowLatencyHook low_latency_dispatch(const LowLatencyDispatchArgs& args, LowLatencyHandle& handle,
                                      const LowLatencyDispatchOutputs& out, cudaStream_t stream);
  // Combine: returns the expert outputs to their source ranks and reduces there. Collective.
  LowLatencyHook low_latency_combine(const LowLatencyCombineArgs& args, const LowLatencyHandle& handle,
                                     const LowLatencyCombineOutputs& out, cudaStream_t stream);
  // The zero-copy combine input: a [E_local][R*T][hidden] BF16 array inside this rank's window (contiguous
  // rows). Write the expert outputs there (ordered before the combine on its stream), then call
  // low_latency_combine with zero_copy = true. Valid for the Buffer's lifetime; the same address every time.
  uint16_t* get_next_low_latency_combine_buffer(const LowLatencyHandle& handle);
  // Barrier, zero every low-latency signal and epoch of this rank, barrier. Collective; enqueued on `stream`.
  // Not needed between calls; use it to restart the low-latency protocol from a known state.
  void clean_low_latency_buffer(int num_max_dispatch_tokens_per_rank, int hidden, int num_experts,
                                cudaStream_t stream);

  // Shrink mode (REQUIRES options.enable_shrink, else kInvalidArgument). Enqueued on `stream`.
  //   update: sets the mask entry of rank_to_mask (in [0, num_ranks)) to 1 (mask = true) or 0.
  //   query:  copies the mask into mask_status, a device array of num_ranks int32 (1 = masked).
  //   clean:  zeroes every entry.
  // The mask is this rank's view: ranks may mask a peer at different operations (each after its own timeout).
  void low_latency_update_mask_buffer(int rank_to_mask, bool mask, cudaStream_t stream);
  void low_latency_query_mask_buffer(int32_t* mask_status, cudaStream_t stream);
  void low_latency_clean_mask_buffer(cudaStream_t stream);

  // Device-side barrier over all ranks of the Group, enqueued on `stream`. Bounded by timeout_seconds. In shrink
  // mode masked ranks are skipped and a peer that does not arrive in time is masked instead of failing.
  void barrier(cudaStream_t stream);

  // Waits for `stream`, then raises any error a kernel of this Buffer recorded. On an internode Buffer the wait
  // is bounded (timeout_seconds + 5 s): past it the rail communicator is aborted and kTimeout is raised.
  void synchronize(cudaStream_t stream);
  // Raises a recorded device error without waiting (cheap; reads host-mapped memory).
  void check_device_errors();

  // Raw access for OpenEP's own kernels and tests.
  struct Impl;
  Impl& impl() noexcept { return *impl_; }

 private:
  void init(Group& group, const BufferOptions& options);
  std::unique_ptr<Impl> impl_;
};

// The NCCL version OpenEP was compiled against and the one loaded at run time (e.g. 22809).
int compiled_nccl_version() noexcept;
int loaded_nccl_version();

}  // namespace openep
