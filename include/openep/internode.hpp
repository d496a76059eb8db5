// Normal-mode (training / prefill) dispatch and combine across nodes: NVLink inside a node, the network between
// nodes (docs/INTERNODE.md has the protocol).
//
// A Group whose ranks span several NVLink domains (nodes) runs internode mode when its Buffer is created in
// normal mode with num_rdma_bytes > 0 (DeepEP's rule; no other opt-in). Nodes must hold the same number of
// ranks, 1 to 8, contiguous (node-major: rank = node * ranks_per_node + local rank), 2 to 64 nodes, at most 256
// ranks. A token crosses the network once per destination node, to the rank with its own local rank there
// (its rail peer), which forwards it over NVLink to every rank of that node that needs it; tokens for the own
// node never touch the network. The network leg is host-driven NCCL point-to-point on a rail communicator, so
// it runs on every network NCCL runs on (InfiniBand, RoCE, EFA through its plugin, TCP sockets).
// RUN SO FAR: over NCCL's socket transport between fake nodes on one host (docs/fake-nodes.md) and on virtual
// ranks with emulated nodes; NEVER over InfiniBand, RoCE or EFA, and never timed on a real network.
// Optional second backend of the network leg, BufferOptions::internode_backend = InternodeBackend::kGin
// (buffer.hpp): the same records, chunks and kernels, the rail exchanges device-initiated with NCCL GIN puts and
// signals; needs RDMA NICs with NCCL GIN (InfiniBand / RoCE). RUN only under the loopback GIN test plugin
// (tests/gin_loopback) in fake-node worlds on one H200 (2026-12-02): the internode suite bitwise in 2- and 4-node
// worlds, one rank per node; NEVER on a real network (no RDMA NICs here), never with several ranks per node.
//
// Semantics (CPU reference, reference/openep/reference.hpp):
//  * dispatch: exactly the rows, order and top-k localisation of intranode dispatch (ref::dispatch): rows are
//    ordered by (source rank, source token); top-k ids arrive local (-1 and weight 0 where the expert lives
//    elsewhere).
//  * combine: ref::combine_internode: per destination node the rows of its ranks are summed in ascending rank
//    order in fp32 and rounded to BF16 (the node partial that crosses the network), then the source sums the
//    partials in ascending node order in fp32 and adds bias_0 and bias_1. Weights are summed the same way in
//    fp32 without rounding. Bitwise reproducible; with one rank per node it equals ref::combine.
//
// A dispatch is two calls like intranode: internode_dispatch_prepare() (counts; in exact mode the one host wait)
// and internode_dispatch() (the rows). Worst-case mode (num_worst_tokens > 0) and cached mode never wait on the
// host. Exact and cached mode send only the records that exist; worst-case mode sends max_tokens_per_rank
// records to every other node (the host does not know the counts), of which only the real ones are used.
//
// Streams and errors as in intranode.hpp; every device wait is bounded by timeout_seconds and names rank, peer
// and phase. The network leg is NCCL's: Buffer::synchronize() on an internode Buffer waits at most
// timeout_seconds (+5 s) and then aborts the rail communicator and raises kTimeout, so a dead node becomes an
// error, not a hang. CUDA graphs: worst-case and cached mode enqueue only kernels and fixed-size NCCL p2p (the
// rail is warmed up at Buffer creation); capture of worst-case layout + dispatch + combine has run on fake nodes
// (FakeNodeInternode.WorstCaseGraphReplaysWithNewDataMatchReference, 2 and 4 nodes on one H200; cached mode in a
// graph has not); virtual ranks cannot capture at all.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "openep/config.hpp"
#include "openep/intranode.hpp"
#include "openep/types.hpp"

namespace openep {

// What a later combine and a cached dispatch need. Device arrays allocated by the caller (sizes below; R ranks,
// N nodes, M ranks per node, T = num_tokens); they must stay alive and unmodified until the last combine or
// cached dispatch that uses them has completed. The host fields are filled by internode_dispatch_prepare.
struct InternodeHandle {
  int num_tokens = 0;                  // this rank's tokens in the dispatch that made the handle
  int num_recv_tokens = 0;             // rows received (exact), or num_worst_tokens
  int num_rdma_recv_tokens = 0;        // records received as a forwarder (exact), or N * max_tokens_per_rank
  const bool* is_token_in_rank = nullptr;  // [T][R] the routing mask passed to dispatch (DeepEP handle[0])
  int* send_pos = nullptr;             // [T][R]: index of my token t among my tokens to rank r, or -1
  int* send_rdma_head = nullptr;       // [T][N]: index of my token t among my records to node n, or -1 (handle[8])
  int* node_prefix = nullptr;          // [R][M]: rows rank (my node, j) receives from sources before s
  int* recv_gbl_rank_prefix_sum = nullptr;   // [R]: inclusive prefix of the rows I receive per source (handle[6])
  int* recv_rdma_rank_prefix_sum = nullptr;  // [N]: inclusive prefix of the records I forward per source node (handle[4])
  int* recv_rdma_mask = nullptr;       // [num_rdma_recv_tokens]: bit j set if the record went to local rank j
  int* recv_src_idx = nullptr;         // [num_recv_tokens]: source token index of every received row
  int* recv_src_meta = nullptr;        // [num_recv_tokens][2]: (source rank, record index at its forwarder) (handle[7])
  // Host side (set by prepare): records to / from each node in exact mode; empty in worst-case mode, where
  // every rail transfer carries records_per_node records.
  std::vector<int> rdma_send_counts, rdma_recv_counts;
  int records_per_node = 0;
  int hidden = 0, num_topk = 0;        // shape of the dispatch (combine must match hidden; top-k <= num_topk)
};

// Results of internode_dispatch_prepare.
struct InternodeDispatchCounts {
  int num_recv_tokens = 0;             // rows to allocate (num_worst_tokens in worst-case mode)
  int num_rdma_recv_tokens = 0;        // entries of handle.recv_rdma_mask to allocate
  std::vector<int> num_recv_tokens_per_expert;  // [E_local] aligned; empty unless exact
};

// Bytes for BufferOptions::num_nvl_bytes (node window) and num_rdma_bytes (rail buffers) so that internode
// dispatch and combine of up to max_tokens_per_rank tokens per rank fit in any routing (worst case: every rank
// sends every token to every rank). Combine is sized for BF16 rows of `hidden` with num_topk weights.
struct InternodeBufferSize {
  size_t num_nvl_bytes = 0;
  size_t num_rdma_bytes = 0;
};
InternodeBufferSize internode_buffer_size_hint(int num_ranks, int ranks_per_node, int max_tokens_per_rank,
                                               int hidden, int x_elem_bytes, int num_scales, int num_topk);

}  // namespace openep
