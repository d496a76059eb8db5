// The window of the internode GIN rail (BufferOptions::internode_backend = kGin, runtime/internode_gin.hpp):
// registered on the RAIL communicator only, the same size and layout on every rank. CPU-tested, and RUN only under
// the loopback GIN test plugin (fake nodes on one H200, 2026-12-02); NEVER on a real network (no RDMA NICs here).
//
//   [control]  kControlBytes, per rail peer (node) n two 16-byte slots of two uint64 {dest_offset, dest_bytes}:
//                in_slot(n)   written ONLY by n (one 16-byte put from its out_slot(me)): where, in n's window, the
//                             bytes I send n in the current exchange must land, and how many n expects from me
//                out_slot(n)  my own staging of the pair I tell n; the source of that put
//              n writes my in_slot(n) when its stream reaches the exchange (so every earlier read of that receive
//              range on its side is done), with signal ready(n) on me: the rendezvous ncclRecv gives NCCL p2p.
//              The pair travels as a put from a window, not as putValue: NCCL 2.28.9's proxy GIN backend writes an
//              inline put's value through a wrong index (src/gin/gin_host_proxy.cc: `inlines[gfd - queues]` with
//              gfd the proxy's local copy; fixed in 2.29.7) and crashed on it (H200, fake nodes, 2026-12-02).
//   [area]     from kControlBytes: the InternodeRailArea (rail halves, headers, barrier tokens) of the Buffer.
// in_slot(n) is rewritten only in the next exchange, which n enters only after my data of this one reached it (it
// waits for my data signal first), and I read it before I put that data: no slot is overwritten unread. out_slot(n)
// is rewritten only by the next exchange's kernel, after this one's flush (every put's source read).
#pragma once

#include <cstddef>
#include <cstdint>

#include "protocol/host_device.hpp"
#include "protocol/internode_layout.hpp"

namespace openep::detail {

struct GinRailLayout {
  static constexpr size_t kSlotBytes = 2 * sizeof(uint64_t);  // {dest_offset, dest_bytes}
  static constexpr size_t kInSlots = 0;
  static constexpr size_t kOutSlots = kInSlots + kSlotBytes * kMaxInternodeNodes;
  static constexpr size_t kControlBytes = 4096;
  static_assert(kOutSlots + kSlotBytes * kMaxInternodeNodes <= kControlBytes, "control slots fit");

  // ---- named slots (byte offsets in the window) ----
  OPENEP_HOST_DEVICE static size_t in_slot(int n) { return kInSlots + kSlotBytes * n; }
  OPENEP_HOST_DEVICE static size_t out_slot(int n) { return kOutSlots + kSlotBytes * n; }
  OPENEP_HOST_DEVICE static size_t dest_offset(int n) { return in_slot(n); }
  OPENEP_HOST_DEVICE static size_t dest_bytes(int n) { return in_slot(n) + sizeof(uint64_t); }
  // Window offset of the InternodeRailArea, and the window size that holds an area of `area_bytes`.
  static constexpr size_t area_offset() { return kControlBytes; }
  static constexpr size_t window_bytes(size_t area_bytes) {
    return kControlBytes + (area_bytes + InternodeRailArea::kAlign - 1) / InternodeRailArea::kAlign * InternodeRailArea::kAlign;
  }
};

// GIN signal ids of the rail, on every context (ids are per context). Peer n posts everything it sends me on
// context (my rail rank mod ginContextCount), so a signal lands after every earlier put of n to me (NCCL orders a
// signal after the earlier puts on the same context to the same peer), and I poll only that context. Monotonic
// SignalAdd(1) per exchange that names the pair; never reset (the targets are device-side exchange counts).
struct GinRailSignals {
  static constexpr int ready(int src) { return src; }                     // src has posted its dest_* slots
  static constexpr int data(int num_nodes, int src) { return num_nodes + src; }  // src's bytes have landed
  static constexpr int count(int num_nodes) { return 2 * num_nodes; }
};

}  // namespace openep::detail
