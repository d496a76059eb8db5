// Low-latency (decode) dispatch and combine among the ranks of one NVLink domain (DeepEP V1's
// low_latency_dispatch / low_latency_combine; semantics in reference/openep/reference.hpp, section
// "Low-latency dispatch and combine").
//
// Dispatch sends one message per (token, destination rank) that holds at least one of the token's experts
// (FP8 cast fused into the send when use_fp8; the message names the token's experts on that rank) and returns
// one row per (token, top-k slot) with expert >= 0 in DeepEP's packed per-expert layout:
// [E_local][R * T][hidden], T = num_max_dispatch_tokens_per_rank. Inside one (local expert, source rank) range
// the rows come in no particular order; the ranges themselves are consecutive in source-rank order (empty
// ranges start at the running offset), exactly as the reference places them.
// Combine returns every packed row to its source rank and sums, per token, weight * row over the top-k slots
// in ascending slot order in fp32 (multiply rounded, then add rounded; no FMA): bitwise equal to the reference.
// With use_logfmt the rows travel in OpenEP's LogFMT-10 format (LowLatencyCombineArgs::use_logfmt) and the sum
// takes their decoded values: bitwise equal to the reference's LogFMT combine.
//
// Buffer: created with BufferOptions::num_rdma_bytes >= low_latency_buffer_size_hint(T, hidden, R, E) (the
// low-latency region; low_latency_mode is not required). Repeated calls need no cleaning: all signals carry
// monotonic epochs kept in device memory, and the data regions alternate between two halves chosen on the
// device from those epochs, so at most two low-latency operations of one kind may be issued but not yet
// received (the hook pattern of two micro-batches). clean_low_latency_buffer() resets everything (call it on
// every rank, e.g. after a failed peer was replaced).
//
// Streams and synchronisation: every call is enqueued on the stream it is given, never waits on the host,
// never allocates, and can be captured in a CUDA graph (replays keep working in any order of replays, since
// nothing is baked into the launch except pointers and shapes). All low-latency calls of one Buffer must be
// issued in the same order on every rank and ordered with each other (one stream, or events).
// With return_recv_hook the call launches only the send kernel and returns a hook; calling the hook launches
// the receive kernel on the same stream. Between the two, OpenEP holds no SM. Outputs are valid only after
// the receive kernel (hook or not) has run. Hooks must be called in the order their calls were issued.
//
// Transport: NVLink (LSA peer pointers) among the ranks of one NVLink domain, like the whole Buffer (a Group that
// spans several domains is refused at Buffer creation). The network (GIN) path is not implemented.
//
// Pointers: all are device pointers on the Buffer's device, owned by the caller, contiguous row-major; they
// must stay valid until the kernels using them have completed (the hook's kernel included).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "openep/types.hpp"

namespace openep {

// Largest supported values of the low-latency path (checked before any launch).
inline constexpr int kMaxLowLatencyTokensPerRank = 4096;  // num_max_dispatch_tokens_per_rank
inline constexpr int kMaxLowLatencyTopk = 32;             // num_topk

// What combine needs from dispatch (DeepEP's handle). Arrays are caller-owned device memory that dispatch
// fills; pass the same handle to the matching combine.
struct LowLatencyHandle {
  int* src_info = nullptr;          // [E_local][R * T] int32: source token index of each packed row
  int64_t* layout_range = nullptr;  // [E_local][R] int64: (start << 32) | count of the rows from each source
  int num_max_dispatch_tokens_per_rank = 0;  // T of the dispatch
  int hidden = 0;
  int num_experts = 0;
};

struct LowLatencyDispatchArgs {
  const uint16_t* x = nullptr;      // [num_tokens][hidden] BF16 (finite values when use_fp8)
  int num_tokens = 0;               // 0 <= num_tokens <= T
  int hidden = 0;                   // BF16: multiple of 8; use_fp8: multiple of 128; use_ue8m0: multiple of 512
  const void* topk_idx = nullptr;   // [num_tokens][num_topk] of index_type, -1 = no expert
  IndexType index_type = IndexType::kInt64;
  int num_topk = 0;                 // 1 .. kMaxLowLatencyTopk
  int num_max_dispatch_tokens_per_rank = 0;  // T, identical on every rank
  int num_experts = 0;              // multiple of R, identical on every rank
  bool use_fp8 = true;              // cast to e4m3 with one float32 scale per 128 channels
  bool round_scale = false;         // power-of-two scales (requires use_fp8)
  bool use_ue8m0 = false;           // scales packed as UE8M0, four per int32 (requires round_scale)
  int* cumulative_local_expert_recv_stats = nullptr;  // optional [E_local] int32: rows received are ADDED
  int64_t* dispatch_wait_recv_cost_stats = nullptr;   // optional [R] int64: GPU clock cycles spent waiting for
                                                      //   each source rank are ADDED
  bool return_recv_hook = false;
};

struct LowLatencyDispatchOutputs {
  void* packed_recv_x = nullptr;       // [E_local][R*T][hidden] e4m3 bytes (use_fp8) or BF16
  // use_fp8 only. Logical [E_local][R*T][hidden/128] float32 (or [E_local][R*T][hidden/512] int32 packed UE8M0),
  // physically [E_local][hidden/128][R*T] (or [E_local][hidden/512][R*T]): DeepEP's transposed layout.
  void* packed_recv_scales = nullptr;
  int* packed_recv_count = nullptr;    // [E_local] int32: valid rows per local expert (rows beyond are garbage)
};

struct LowLatencyCombineArgs {
  const uint16_t* x = nullptr;      // [E_local][R*T][hidden] BF16 expert outputs in the packed layout; may be
                                    //   null with zero_copy (then the rows are read from the combine buffer)
  const void* topk_idx = nullptr;   // [num_tokens][num_topk]: the routing of the dispatch
  IndexType index_type = IndexType::kInt64;
  const float* topk_weights = nullptr;  // [num_tokens][num_topk]
  int num_tokens = 0;               // this rank's token count in the dispatch
  int num_topk = 0;
  bool zero_copy = false;           // rows were written into get_next_low_latency_combine_buffer()
  // LogFMT-10 transport (DeepEP's use_logfmt; OpenEP's own wire format, src/protocol/logfmt.hpp): every row is
  // encoded by the send kernel (also from the zero-copy buffer, and in hook mode) and decoded to float32 by the
  // receive before the same weighted sum. Per 128-channel division: 4 bytes of metadata (BF16 max and min of
  // |x|), then 160 bytes of 10-bit log codes if max |x| < 1 and min |x| < max |x|, else the 256 BF16 bytes.
  // Saves: NVLink bytes per (token, expert) drop from 2 hidden to hidden * 10 / 8 + hidden / 32 when every
  // division is encoded (~0.64x). Costs: a log2 per value on the send and an exp2 per value on the receive, and
  // accuracy: an encoded value is within ~2.2% relative of the BF16 value (much less when a division's values
  // span a narrow range); values below max |x| * 2^-32 become 0 or that bound. The result is deterministic and
  // bitwise equal to openep::ref::low_latency_combine(..., use_logfmt = true).
  // REQUIRES: hidden % 128 == 0; the NVLink transport (on the GIN transport it fails with kUnsupported).
  bool use_logfmt = false;
  int64_t* combine_wait_recv_cost_stats = nullptr;  // optional [R] int64, cycles ADDED per source rank
  bool return_recv_hook = false;
};

struct LowLatencyCombineOutputs {
  uint16_t* combined_x = nullptr;   // [num_tokens][hidden] BF16
};

// Launches the receive kernel of a hook-mode call on the stream of that call. Empty (operator bool false)
// when return_recv_hook was false. Call it exactly once. Throws like the call that returned it.
using LowLatencyHook = std::function<void()>;

// Bytes of BufferOptions::num_rdma_bytes the low-latency kernels need for these shapes (a multiple of 128).
// Our layout (not DeepEP's numbers): signals and counts, two halves of the dispatch receive region
// [R][T] messages of 128 + max(2 hidden, hidden + hidden/32) bytes, two halves of the combine receive
// region [E][T][hidden] BF16, two halves of the LogFMT metadata [E][T][align16(hidden / 32)] bytes, and the
// zero-copy combine buffer [E_local][R*T][hidden] BF16.
size_t low_latency_buffer_size_hint(int num_max_dispatch_tokens_per_rank, int hidden, int num_ranks,
                                    int num_experts);

}  // namespace openep
