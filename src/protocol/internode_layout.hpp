// Layouts of internode normal mode (docs/INTERNODE.md): the node window's region (NVLink, peers of one node),
// the rail buffers (network leg, private device memory) and the records both carry. Host and device use these
// structs; kernels take the offset of a named slot from them. Identical on every rank for identical call
// shapes and Buffer sizes, so an offset computed locally addresses the same thing in a node peer's window.
//
// Names: R ranks, M ranks per node (node-major: rank = node * M + local), N = R / M nodes, El local experts.
// A token of source s goes once to every node m that holds one of its experts, as one RECORD, to s's rail peer
// on node m (the FORWARDER, same local rank as s), which writes it over NVLink into the receive rows of every
// rank of node m that needs it. Records to the own node skip the network (the forwarder is s itself).
//
// Node window region (offsets from WindowLayout::nvl_offset):
//   flags (4 KiB), uint64 epochs, all monotonic (never reset):
//     dispatch_ready[l]  set by forwarder l when its rows for this rank have landed (dispatch epoch)
//     combine_ready[l]   set by rank l when its combine rows for this forwarder have landed (combine epoch)
//     header_ready[l]    set by forwarder l when it has written its sources' headers here (dispatch epoch)
//     drained            this rank finished reading its receive rows (dispatch epoch; read by forwarders)
//     reduced            this forwarder finished reading its combine stage (combine epoch; read by node peers)
//   headers [R][header_ints(M, kMaxLocalExperts)] int32: the header of source s for this node, slot s
//   data: two fixed halves, so dispatch rows and the combine stage never overlap whatever the shapes:
//     dispatch rows [rows] of nvl_record_bytes, in final receive order (source rank, source token)
//     combine stage [slots] of combine_bytes, slot (flat record f, local rank l) holds rank l's row of f
//
// Rail buffers (private device memory, num_rdma_bytes): half A and half B, entries addressed by record index:
//   dispatch: A = send stage (records to node m from entry send_base[m]), B = receive (from node n, recv_base[n])
//   combine:  B = node partials to send back (same entries as the records received), A = partials received
// Headers travel through their own rail buffers (header_send [N][hdr], header_recv [N][hdr]).
#pragma once

#include <cstddef>
#include <cstdint>

#include "protocol/host_device.hpp"
#include "protocol/limits.hpp"

namespace openep::detail {

inline constexpr int kMaxInternodeNodes = 64;      // nodes of one internode Group
inline constexpr int kMaxInternodeRanksPerNode = 8;  // ranks of one node (NVLink domain) in internode mode
inline constexpr int kMaxInternodeLocalExperts = 1024;

struct InternodeRecord {
  // Record on the rail: [row | src_idx, pos[M], topk[K] (global ids), weights[K], scales[S]], parts 16 B aligned.
  OPENEP_HOST_DEVICE static size_t rail_meta_ints(int M, int K, int S) { return 1 + M + 2 * static_cast<size_t>(K) + S; }
  OPENEP_HOST_DEVICE static size_t rail_bytes(size_t row_bytes, int M, int K, int S) {
    return align_up(row_bytes, 16) + align_up(sizeof(int32_t) * rail_meta_ints(M, K, S), 16);
  }
  // Receive row in the node window: [row | src_idx, src_rank, flat record, topk[K] (local ids), weights[K], scales[S]].
  OPENEP_HOST_DEVICE static size_t nvl_meta_ints(int K, int S) { return 3 + 2 * static_cast<size_t>(K) + S; }
  OPENEP_HOST_DEVICE static size_t nvl_bytes(size_t row_bytes, int K, int S) {
    return align_up(row_bytes, 16) + align_up(sizeof(int32_t) * nvl_meta_ints(K, S), 16);
  }
  // Combine row / node partial: [BF16 row | weights[K] fp32].
  OPENEP_HOST_DEVICE static size_t combine_bytes(int hidden, int K) {
    return align_up(2 * static_cast<size_t>(hidden), 16) + align_up(sizeof(float) * static_cast<size_t>(K), 16);
  }
  // Header of one source for one node: [records to the node, tokens to each of its M ranks, tokens to each of
  // its M * El experts].
  OPENEP_HOST_DEVICE static int header_ints(int M, int El) { return 1 + M + M * El; }
};

struct InternodeNvlLayout {
  static constexpr size_t kFlagsBytes = 4096;
  size_t headers_offset = 0, dispatch_offset = 0, combine_offset = 0, half_bytes = 0;
  int header_stride_ints = 0;  // header_ints(M, kMaxInternodeLocalExperts)

  static InternodeNvlLayout make(size_t nvl_bytes, int R, int M) {
    InternodeNvlLayout l;
    l.header_stride_ints = InternodeRecord::header_ints(M, kMaxInternodeLocalExperts);
    l.headers_offset = kFlagsBytes;
    const size_t data = align_up(l.headers_offset + sizeof(int32_t) * static_cast<size_t>(R) * l.header_stride_ints, 4096);
    l.dispatch_offset = data;
    l.half_bytes = nvl_bytes > data ? (nvl_bytes - data) / 2 / 16 * 16 : 0;
    l.combine_offset = data + l.half_bytes;
    return l;
  }
  // Bytes num_nvl_bytes must have so that each half holds `half` bytes.
  static size_t bytes_for_half(size_t half, int R, int M) {
    const InternodeNvlLayout l = make(0, R, M);
    return align_up(l.dispatch_offset + 2 * align_up(half, 16), 128);
  }

  // ---- named slots (byte offsets in the region) ----
  OPENEP_HOST_DEVICE static size_t dispatch_ready(int l) { return sizeof(uint64_t) * l; }
  OPENEP_HOST_DEVICE static size_t combine_ready(int l) { return sizeof(uint64_t) * (kMaxInternodeRanksPerNode + l); }
  OPENEP_HOST_DEVICE static size_t header_ready(int l) { return sizeof(uint64_t) * (2 * kMaxInternodeRanksPerNode + l); }
  OPENEP_HOST_DEVICE static size_t drained() { return sizeof(uint64_t) * (3 * kMaxInternodeRanksPerNode); }
  OPENEP_HOST_DEVICE static size_t reduced() { return sizeof(uint64_t) * (3 * kMaxInternodeRanksPerNode + 1); }
  OPENEP_HOST_DEVICE size_t header(int s) const {
    return headers_offset + sizeof(int32_t) * static_cast<size_t>(s) * header_stride_ints;
  }
  OPENEP_HOST_DEVICE size_t dispatch_row(int64_t row, size_t row_bytes) const {
    return dispatch_offset + static_cast<size_t>(row) * row_bytes;
  }
  OPENEP_HOST_DEVICE size_t combine_slot(int64_t flat, int l, int M, size_t entry_bytes) const {
    return combine_offset + static_cast<size_t>(flat * M + l) * entry_bytes;
  }
  OPENEP_HOST_DEVICE int64_t dispatch_capacity(size_t row_bytes) const {
    return static_cast<int64_t>(half_bytes / row_bytes);
  }
  // Records a forwarder can hold in its combine stage (each takes M slots).
  OPENEP_HOST_DEVICE int64_t combine_capacity(int M, size_t entry_bytes) const {
    return static_cast<int64_t>(half_bytes / (entry_bytes * M));
  }
};

// Rail buffers: two halves of num_rdma_bytes; entries of `entry_bytes` from the start of a half.
struct InternodeRailLayout {
  size_t half_bytes = 0;
  static InternodeRailLayout make(size_t rdma_bytes) {
    InternodeRailLayout l;
    l.half_bytes = rdma_bytes / 2 / 16 * 16;
    return l;
  }
  OPENEP_HOST_DEVICE size_t a(int64_t entry, size_t entry_bytes) const { return static_cast<size_t>(entry) * entry_bytes; }
  OPENEP_HOST_DEVICE size_t b(int64_t entry, size_t entry_bytes) const {
    return half_bytes + static_cast<size_t>(entry) * entry_bytes;
  }
  OPENEP_HOST_DEVICE int64_t capacity(size_t entry_bytes) const { return static_cast<int64_t>(half_bytes / entry_bytes); }
};

// Everything the rail moves from and into, carved out of one allocation (private device memory for the host-driven
// rail; the GIN rail's registered window, after its control area: internode_gin_layout.hpp). Offsets from the
// area's start, each region 4 KiB aligned:
//   halves         num_rdma_bytes: rail half A and half B (InternodeRailLayout)
//   header_send    [N][header_ints(M, kMaxInternodeLocalExperts)] int32: my headers, one per destination node
//   header_recv    [N][same] int32: my rail peers' headers (the rail writes them)
//   barrier_token  [2][N] int32: Buffer::barrier's rail leg (send, receive)
struct InternodeRailArea {
  static constexpr size_t kAlign = 4096;
  size_t halves_offset = 0, header_send_offset = 0, header_recv_offset = 0, barrier_offset = 0, total_bytes = 0;
  size_t header_bytes = 0;  // of header_send (and of header_recv)

  static InternodeRailArea make(size_t num_rdma_bytes, int N, int M) {
    InternodeRailArea a;
    a.header_bytes = sizeof(int32_t) * static_cast<size_t>(N) * InternodeRecord::header_ints(M, kMaxInternodeLocalExperts);
    a.halves_offset = 0;
    a.header_send_offset = align_up(num_rdma_bytes, kAlign);
    a.header_recv_offset = align_up(a.header_send_offset + a.header_bytes, kAlign);
    a.barrier_offset = align_up(a.header_recv_offset + a.header_bytes, kAlign);
    a.total_bytes = align_up(a.barrier_offset + barrier_bytes(N), kAlign);
    return a;
  }
  static size_t barrier_bytes(int N) { return sizeof(int32_t) * 2 * static_cast<size_t>(N); }
};

// Chunks of the network leg (docs/INTERNODE.md "Chunks"): a rail transfer of `count` entries is cut into
// `num_chunks` pieces of ceil(count / num_chunks) entries; chunk c is [lo, hi). Both ends of a transfer compute it
// from the same count (what I send to node n is what n receives from me), so they agree without talking.
inline constexpr int kMaxInternodeChunks = 16;
struct EntryRange {
  int64_t lo = 0, hi = 0;
};
OPENEP_HOST_DEVICE EntryRange rail_chunk(int64_t count, int chunk, int num_chunks) {
  const int64_t span = (count + num_chunks - 1) / num_chunks;
  EntryRange r;
  r.lo = static_cast<int64_t>(chunk) * span < count ? static_cast<int64_t>(chunk) * span : count;
  r.hi = r.lo + span < count ? r.lo + span : count;
  return r;
}

// Which records one forward / node-reduce launch handles: the own node's (all of them, no network), or chunk
// `chunk` of every other node's. `slots_per_node` > 0 (worst-case handles): the rail moves that many entries per
// node and chunks are cut from it; 0: the exact counts. `release`: this is the operation's last launch, which
// releases the flag the next kernel waits for.
struct InternodeChunk {
  int own_node = 1;
  int chunk = 0, num_chunks = 1;
  int64_t slots_per_node = 0;
  int release = 1;
};

// Device memory private to one rank of an internode Buffer, zeroed at creation.
struct InternodeState {
  uint64_t dispatch_epoch;   // dispatches started (cached ones included), monotonic
  uint64_t combine_epoch;    // combines started, monotonic
  uint32_t tickets[8];       // last-block tickets, one per kernel kind, left zero
};
enum InternodeTicket : int { kTicketForward = 0, kTicketDrain = 1, kTicketCombineSend = 2, kTicketNodeReduce = 3 };

// Pinned, device-mapped host memory the count kernel fills in exact mode (the host polls `seq`).
struct InternodeHostCounters {
  int64_t seq;                                     // written last
  int32_t num_recv_tokens;                         // rows this rank receives
  int32_t num_rdma_recv_tokens;                    // records this rank receives as a forwarder (all nodes)
  int32_t rdma_recv[kMaxInternodeNodes];           // records from each node (as forwarder)
  int32_t rdma_send[kMaxInternodeNodes];           // records to each node (this rank's tokens per node)
  int32_t num_recv_tokens_per_expert[kMaxInternodeLocalExperts];  // aligned counts, [E_local]
};

}  // namespace openep::detail
