// OpenEP CPU reference: the specification of dispatch and combine.
//
// This header is the manual for what every OpenEP kernel must compute. The functions simulate all
// ranks of an expert-parallel group at once, using std::vector for every buffer, and are written for
// clarity (plain loops over ranks, tokens and top-k slots), not speed. GPU tests run a kernel, run the matching
// function here on the same inputs, and compare:
//   * data movement (layout, dispatch, low-latency dispatch) is bit-exact: rows are copied as bytes;
//   * reductions (combine) accumulate in float32 in the order documented on each function, so a
//     kernel that uses the same order produces the same bits;
//   * numeric conversions (BF16, E4M3, UE8M0, per-token FP8 cast) are bit-exact and shared with the
//     GPU tests, which use them to build inputs and expected values.
//
// Conventions used throughout (same as DeepEP V1):
//   R = num_ranks, E = num_experts, E_local = E / R, N = tokens of one rank, K = num_topk,
//   H = hidden, T = num_max_dispatch_tokens_per_rank (low-latency only).
//   Expert e lives on rank e / E_local and is that rank's local expert e % E_local.
//   topk_idx entries are -1 (no expert in this slot) or a global expert id in [0, E).
//   All matrices are dense and row-major; shapes are written [outer][inner].
//   BF16 and E4M3 values are carried as their raw bits (uint16_t, uint8_t). Raw byte buffers hold
//   multi-byte values little-endian, exactly as a memcpy of the host values would.
//
// Errors: every function validates its arguments before doing any work and throws
// std::invalid_argument whose message names the function, the argument, the expected value and
// the value seen, e.g. "openep::ref::dispatch: inputs[1].x.size() expected 512, got 500".
//
// Thread safety: all functions are pure (no shared state); they may be called concurrently.
// Ownership: results are returned by value; no pointer argument is retained after a call returns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace openep::ref {

// ---------------------------------------------------------------------------------------------
// Numerics
// ---------------------------------------------------------------------------------------------

// float -> bfloat16 bits, round to nearest, ties to even. +-Inf stays +-Inf, finite values that
// round above the largest BF16 become +-Inf (IEEE overflow). Every NaN (any sign or payload)
// becomes the canonical quiet NaN 0x7FFF. Denormals are handled like any other value (no flush to
// zero). Bit-identical to __float2bfloat16_rn (cvt.rn.bf16.f32) for all 2^32 inputs (checked on an
// H200 with CUDA 13.0).
uint16_t float_to_bf16(float f);

// bfloat16 bits -> float (exact: the bits are the high half of the float).
float bf16_to_float(uint16_t b);

// float -> float8_e4m3fn bits (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no Inf; only
// S.1111.111 is NaN; largest finite 0x7E = 448; smallest subnormal 0x01 = 2^-9).
// Rounding: one round to nearest, ties to even, straight from float (no intermediate rounding),
// including in the subnormal range. Saturation: any value whose magnitude exceeds 448 (including
// values between 448 and 464 and +-Inf) becomes +-448 (0x7E / 0xFE). The sign is kept for zero and
// for values that round to zero (-1e-9f -> 0x80). NaN (either sign) -> 0x7F.
// Bit-identical to __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) (cvt.rn.satfinite.e4m3x2.f32)
// for all 2^32 inputs (checked on an H200 with CUDA 13.0).
uint8_t float_to_e4m3(float f);

// float8_e4m3fn bits -> float (exact). 0x7F and 0xFF decode to a quiet NaN; 0x80 decodes to -0.0f.
float e4m3_to_float(uint8_t b);

// Per-token FP8 cast of one BF16 row with one scale per 128-channel block (the DeepEP scheme).
// For every block j of 128 channels (c in [128 j, 128 j + 128)):
//   amax = max(1e-4f, max over the block of |bf16_to_float(x[c])|)
//   if !round_scale:
//     scale_inv = amax / 448.0f        (one IEEE float division, round to nearest)
//     scale     = 448.0f / amax        (one IEEE float division, round to nearest; NOT 1/scale_inv)
//   else:
//     v         = amax / 448.0f        (IEEE float division)
//     scale_inv = smallest power of two >= v, computed from the bits of v: if v's mantissa bits are
//                 zero, scale_inv = v, else scale_inv = 2^(unbiased exponent of v + 1)
//     scale     = 1.0f / scale_inv     (exact, a power of two)
//   out[c]    = float_to_e4m3(bf16_to_float(x[c]) * scale)   (one float multiply, then the cast)
//   scales[j] = scale_inv              (dequantised value = e4m3_to_float(out[c]) * scales[j])
// A kernel matches bit for bit when it uses IEEE division (__fdiv_rn, or '/' without
// -use_fast_math / --prec-div=false), a plain multiply (__fmul_rn) and __nv_cvt_float_to_fp8 with
// __NV_SATFINITE; checked on an H200 over 4096 random rows of 7168 in both modes. Note that
// amax * (1.0f / 448.0f) can differ from amax / 448.0f in the last bit.
// REQUIRES: hidden > 0, hidden % 128 == 0, every x value finite (else std::invalid_argument).
// x_bf16 has hidden elements; out receives hidden bytes; scales receives hidden / 128 floats.
// out and scales must not overlap x_bf16 or each other.
void cast_row_to_fp8(const uint16_t* x_bf16, int hidden, bool round_scale, uint8_t* out, float* scales);

// UE8M0 scale format: an unsigned 8-bit biased exponent; byte b stands for the float 2^(b - 127).
// float_to_ue8m0 returns bits(f) >> 23 & 0xFF.
// REQUIRES: f is a positive normal power of two (sign 0, mantissa bits 0, exponent field in
// [1, 254]); anything else throws std::invalid_argument.
uint8_t float_to_ue8m0(float power_of_two);

// UE8M0 byte -> float whose bits are b << 23 (so 0 -> 0.0f and 255 -> +Inf, as in DeepEP).
float ue8m0_to_float(uint8_t b);

// Packs num_scales power-of-two floats as UE8M0, four per 32-bit word: byte k (bits 8k..8k+7) of
// out[p] is float_to_ue8m0(scales[4 p + k]). out receives num_scales / 4 words.
// REQUIRES: num_scales >= 0, num_scales % 4 == 0, every scale a positive normal power of two.
void pack_ue8m0(const float* scales, int num_scales, uint32_t* out);

// ---------------------------------------------------------------------------------------------
// Layout (DeepEP get_dispatch_layout), computed for one rank's routing
// ---------------------------------------------------------------------------------------------

struct Layout {
  std::vector<int> num_tokens_per_rank;       // [R]     tokens sent to each rank (a token counts once per rank)
  std::vector<int> num_tokens_per_rdma_rank;  // [num_nodes] tokens sent to each node (a token counts once per
                                              //         node) when there is more than one node, else empty.
                                              //         Nodes: see the two get_dispatch_layout overloads.
  std::vector<int> num_tokens_per_expert;     // [E]     (token, slot) pairs selecting each expert; a token
                                              //         that lists one expert in two slots counts twice
  std::vector<uint8_t> is_token_in_rank;      // [N][R]  1 if the token must go to that rank, else 0
};

// Token t goes to rank r iff some slot k has topk_idx[t][k] >= 0 and topk_idx[t][k] / E_local == r.
// Slots holding -1 are ignored everywhere.
// Nodes (DeepEP's fixed rule): 8 ranks per node, node of rank r = r / 8; num_tokens_per_rdma_rank has
// R / 8 entries when R > 8, else it is empty (R <= 8 is one node). Same result as the overload below
// with ranks_per_node = min(R, 8).
// REQUIRES: num_tokens >= 0, num_topk >= 1, num_ranks >= 1, num_experts >= 1,
//           num_experts % num_ranks == 0, num_ranks <= 8 or num_ranks % 8 == 0,
//           topk_idx.size() == num_tokens * num_topk, every entry in [-1, num_experts).
Layout get_dispatch_layout(
    const std::vector<int64_t>& topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks);

// The same with an explicit node size M = ranks_per_node (internode normal mode): ranks are grouped
// node-major into N = R / M nodes of M consecutive ranks, rank r is local rank r % M of node r / M.
// num_tokens_per_rdma_rank has N entries (token t counts once for node m iff it goes to at least one
// rank of [m * M, m * M + M)) when N > 1, else it is empty. Every other field is identical to the
// overload above.
// REQUIRES: the overload above's requirements except its "num_ranks <= 8 or num_ranks % 8 == 0",
//           plus 1 <= ranks_per_node <= 8 and num_ranks % ranks_per_node == 0.
Layout get_dispatch_layout(const std::vector<int64_t>& topk_idx,
                           int num_tokens,
                           int num_topk,
                           int num_experts,
                           int num_ranks,
                           int ranks_per_node);

// ---------------------------------------------------------------------------------------------
// Normal dispatch and combine (DeepEP Buffer.dispatch / Buffer.combine). Intranode and internode
// dispatch produce identical results at this level (the same received rows, in the same receive
// order, with the same send_pos); only the transport differs. Combine differs in its reduction order:
// intranode kernels follow combine (flat, ranks ascending), internode kernels follow
// combine_internode (per node first, BF16 node partials).
// ---------------------------------------------------------------------------------------------

struct NormalConfig {
  int num_ranks = 2, num_experts = 8, hidden = 256, num_topk = 1;
  int elem_bytes = 2;        // bytes per element of x: 2 = BF16, 1 = FP8 (any payload; bytes are copied verbatim)
  int num_scales = 0;        // 4-byte scale words per token (FP8: hidden/128 floats, or packed UE8M0 words);
                             // 0 = no scales. Scales require elem_bytes == 1 (as in DeepEP).
  int expert_alignment = 1;  // rounding of num_recv_tokens_per_expert only (rows are never padded)
  bool with_topk = true;     // whether topk_idx / topk_weights are returned by dispatch and combine
};

struct RankInput {  // one source rank
  int num_tokens = 0;
  std::vector<uint8_t> x;           // [num_tokens][hidden * elem_bytes] raw bytes
  std::vector<uint32_t> x_scales;   // [num_tokens][num_scales] raw 4-byte words (float bits or packed UE8M0)
  std::vector<int64_t> topk_idx;    // [num_tokens][num_topk] routing (always required, also when !with_topk)
  std::vector<float> topk_weights;  // [num_tokens][num_topk] (only read, and only validated, when with_topk)
};

struct RankRecv {  // one destination rank
  int num_recv_tokens = 0;
  std::vector<uint8_t> x;               // [num_recv][hidden * elem_bytes], bytes copied verbatim
  std::vector<uint32_t> x_scales;       // [num_recv][num_scales], words copied verbatim (empty if num_scales == 0)
  std::vector<int64_t> topk_idx;        // [num_recv][num_topk] local expert ids in [0, E_local), -1 where the slot's
                                        //   expert is not on this rank or was -1 (empty if !with_topk)
  std::vector<float> topk_weights;      // [num_recv][num_topk] the source weight where topk_idx >= 0, else 0.0f
                                        //   (empty if !with_topk)
  std::vector<int> src_rank;            // [num_recv] source rank of each row
  std::vector<int> src_idx;             // [num_recv] token index of each row in its source rank's input
  std::vector<int> num_recv_from_rank;  // [R] rows received from each source rank
  std::vector<int> rank_prefix;         // [R] inclusive prefix sum of num_recv_from_rank
                                        //     (rank_prefix[R-1] == num_recv_tokens)
  std::vector<int> num_recv_tokens_per_expert;  // [E_local] (row, slot) pairs per local expert (same as
                                                //     counting topk_idx == i), each rounded up to a multiple
                                                //     of expert_alignment; computed from the routing even
                                                //     when !with_topk
  // Sender-side bookkeeping that combine needs, indexed by THIS rank as a SOURCE:
  std::vector<int> send_pos;  // [my num_tokens][R] row index, in rank d's recv buffer, of my token t,
                              //   or -1 if token t was not sent to rank d
};

// Simulates one dispatch over all ranks: inputs[s] is source rank s, result[d] is destination rank d.
//
// Routing: token t of rank s goes to rank d iff some slot k has topk_idx[t][k] >= 0 and
// topk_idx[t][k] / E_local == d. It is sent ONCE to each such rank, however many of its slots
// point there.
//
// RECEIVE ORDER: the rows of result[d] are sorted by (source rank ascending, source token index
// ascending). Rows from source rank s therefore occupy [rank_prefix[s] - num_recv_from_rank[s],
// rank_prefix[s]). Kernels must produce this order (it is what DeepEP V1 produces).
//
// Each row carries the source token's x row, its x_scales row and (with_topk) its full top-k row,
// localised for d: slot k becomes topk_idx[t][k] - d * E_local with weight topk_weights[t][k] if
// the expert lives on d, else -1 with weight 0.0f.
//
// REQUIRES: inputs.size() == num_ranks; num_ranks >= 1; num_experts >= 1 and % num_ranks == 0;
//   hidden >= 1; num_topk >= 1; elem_bytes >= 1; num_scales >= 0 (> 0 only with elem_bytes == 1);
//   expert_alignment >= 1; for each rank: num_tokens >= 0 and every vector sized as documented on
//   RankInput; topk_idx entries in [-1, num_experts).
std::vector<RankRecv> dispatch(const std::vector<RankInput>& inputs, const NormalConfig& cfg);

struct CombineInput {               // one rank: the rank that RECEIVED rows in dispatch
  std::vector<uint16_t> x;          // [num_recv][hidden] BF16 rows, in dispatch receive order
  std::vector<float> topk_weights;  // [num_recv][num_topk] when cfg.with_topk, else empty
};

struct CombineOutput {              // one rank: the original source rank
  std::vector<uint16_t> x;          // [num_tokens][hidden] BF16
  std::vector<float> topk_weights;  // [num_tokens][num_topk] when cfg.with_topk, else empty
};

// Simulates one combine (the reverse of dispatch): every rank that received token t returns its
// row; the owner of t outputs the plain (unweighted) sum. For source rank s, token t, column c:
//   acc = +0.0f
//   for d = 0 .. R-1 ascending, only where dispatched[s].send_pos[t][d] >= 0:
//     acc = acc + bf16_to_float(inputs[d].x[send_pos[t][d]][c])       (float32 add)
//   if bias0 given: acc = acc + bf16_to_float(bias0[s][t][c])
//   if bias1 given: acc = acc + bf16_to_float(bias1[s][t][c])
//   out[s].x[t][c] = float_to_bf16(acc)
// Tokens sent nowhere therefore give bias0 + bias1 (or +0.0 without bias).
// This flat order is the contract of the intranode kernels, for every R. (A kernel that reduces per
// node first, as DeepEP's and OpenEP's internode combine do, associates and rounds differently: its
// contract is combine_internode below, which equals this function when ranks_per_node == 1.)
// When cfg.with_topk: out[s].topk_weights[t][k] = the same ordered float32 sum (from +0.0f) over d of
// inputs[d].topk_weights[row][k] (no bias); 0.0f for tokens sent nowhere. Since dispatch zeroes
// non-local slots, feeding back the dispatched weights reproduces the original weights.
//
// inputs[d]   rows received by rank d, in the receive order of dispatched[d].
// dispatched  the result of dispatch() for the same routing (supplies send_pos and row counts).
// original    the dispatch inputs (supplies num_tokens per source rank).
// cfg         the dispatch config; uses num_ranks, num_experts, hidden, num_topk, with_topk.
// bias0/bias1 empty (no bias) or one BF16 [num_tokens][hidden] matrix per source rank.
// REQUIRES: inputs, dispatched, original each of size num_ranks; inputs[d].x.size() ==
//   dispatched[d].num_recv_tokens * hidden; inputs[d].topk_weights.size() == num_recv * num_topk
//   when with_topk, else 0; dispatched[s].send_pos.size() == original[s].num_tokens * num_ranks with
//   entries in [-1, dispatched[d].num_recv_tokens); each given bias sized num_ranks x
//   [original[s].num_tokens * hidden].
std::vector<CombineOutput> combine(const std::vector<CombineInput>& inputs,
                                   const std::vector<RankRecv>& dispatched,
                                   const std::vector<RankInput>& original,
                                   const NormalConfig& cfg,
                                   const std::vector<std::vector<uint16_t>>& bias0 = {},
                                   const std::vector<std::vector<uint16_t>>& bias1 = {});

// Simulates one internode combine: the hierarchical order that OpenEP's internode kernels use
// (DeepEP V1-like: every node first reduces the rows of its own ranks, and the node partial crosses
// the network as BF16). Ranks are grouped node-major into N = R / M nodes of M = ranks_per_node
// consecutive ranks (node m holds ranks [m * M, m * M + M)). For source rank s, token t, column c,
// with pos = dispatched[s].send_pos[t]:
//   acc = +0.0f
//   for m = 0 .. N-1 ascending, only where pos[d] >= 0 for at least one d in [m * M, m * M + M):
//     a = +0.0f
//     for d = m * M .. m * M + M - 1 ascending, only where pos[d] >= 0:
//       a = a + bf16_to_float(inputs[d].x[pos[d]][c])                 (float32 add)
//     p = float_to_bf16(a)                                             (the node partial, rounded to BF16)
//     acc = acc + bf16_to_float(p)                                     (float32 add)
//   if bias0 given: acc = acc + bf16_to_float(bias0[s][t][c])
//   if bias1 given: acc = acc + bf16_to_float(bias1[s][t][c])
//   out[s].x[t][c] = float_to_bf16(acc)
// Tokens sent nowhere therefore give bias0 + bias1 (or +0.0 without bias). A token sent to one node
// only gives float_to_bf16((+0.0f + bf16_to_float(p)) + biases): its node sum is rounded to BF16
// before the biases are added (unlike combine, where the biases join the float32 sum).
// When cfg.with_topk, per slot k: w_m = the ordered float32 sum (from +0.0f, d ascending in node m,
// only where pos[d] >= 0) of inputs[d].topk_weights[pos[d]][k], NOT rounded (weights travel as
// float32); out[s].topk_weights[t][k] = +0.0f + w_m over the same nodes m ascending (float32, no bias);
// 0.0f for tokens sent nowhere.
// With ranks_per_node == 1 every node is one rank and the result is bit-identical to combine: each
// partial p is the row value itself (+0.0f + x is exact and rounds back to x, except that -0.0
// becomes +0.0, which changes nothing since the flat float32 sum from +0.0f never holds -0.0, and a
// NaN stays a NaN), and each w_m is the single weight itself.
// Dispatch is unchanged for internode: pass the result of dispatch() as `dispatched`.
//
// Arguments and REQUIRES: exactly as combine, plus 1 <= ranks_per_node <= 8 and
//   cfg.num_ranks % ranks_per_node == 0.
std::vector<CombineOutput> combine_internode(const std::vector<CombineInput>& inputs,
                                             const std::vector<RankRecv>& dispatched,
                                             const std::vector<RankInput>& original,
                                             const NormalConfig& cfg,
                                             int ranks_per_node,
                                             const std::vector<std::vector<uint16_t>>& bias0 = {},
                                             const std::vector<std::vector<uint16_t>>& bias1 = {});

// ---------------------------------------------------------------------------------------------
// Low-latency dispatch and combine (DeepEP Buffer.low_latency_dispatch / low_latency_combine)
// ---------------------------------------------------------------------------------------------

struct LowLatencyConfig {
  int num_ranks = 2, num_experts = 8, hidden = 2048, num_topk = 1;
  int num_max_dispatch_tokens_per_rank = 128;  // T: capacity is R * T rows per local expert
  bool use_fp8 = true;       // cast BF16 -> E4M3 with cast_row_to_fp8 (else BF16 rows travel unchanged)
  bool round_scale = false;  // power-of-two scales (cast_row_to_fp8's round_scale); only with use_fp8
  bool use_ue8m0 = false;    // store scales packed as UE8M0; requires round_scale; only with use_fp8
};

struct LowLatencyInput {            // one source rank
  int num_tokens = 0;               // N <= T
  std::vector<uint16_t> x;          // [num_tokens][hidden] BF16
  std::vector<int64_t> topk_idx;    // [num_tokens][num_topk]
  std::vector<float> topk_weights;  // [num_tokens][num_topk] (read by combine only)
};

struct LowLatencyRecv {                       // one destination rank; P = R * T rows of capacity per local expert
  std::vector<int> count;                     // [E_local] valid rows per local expert
  std::vector<uint8_t> packed_x;              // [E_local][P][hidden * (use_fp8 ? 1 : 2)] E4M3 bytes or
                                              //   little-endian BF16; rows >= count are zero
  std::vector<float> packed_scales;           // [E_local][P][hidden / 128] scale_inv, LOGICAL layout (the
                                              //   GPU tensor is physically [E_local][hidden/128][P]); only
                                              //   when use_fp8 && !use_ue8m0, else empty; rows >= count zero
  std::vector<uint32_t> packed_scales_ue8m0;  // [E_local][P][hidden / 512] packed UE8M0 words (pack_ue8m0),
                                              //   LOGICAL layout; only when use_fp8 && use_ue8m0, else empty
  std::vector<int> src_info;                  // [E_local][P] source token index of each row, -1 beyond count
  std::vector<int64_t> layout_range;          // [E_local][R] (start << 32) | count of the rows from each
                                              //   source rank
};

// One message per (token, slot) with topk_idx >= 0: a token that lists one expert in two slots is
// received twice by that expert (two rows with the same src_info).
//
// PLACEMENT (reference only): inside local expert i of rank d the rows are ordered by (source rank
// ascending, source token ascending, slot ascending), so the rows from source rank s form the range
// [start, start + count) given by layout_range[i][s], ranges are consecutive in source-rank order,
// and an empty range has count 0 with start = the running offset. DeepEP kernels place ranges and
// rows in a nondeterministic order: a GPU test must compare per (expert, source rank) range as a
// multiset keyed by src_info (and must not compare the start of empty ranges).
//
// Memory: like the GPU tensors, each rank's result holds E_local * R * T rows of capacity, for all R
// ranks at once (DeepSeek-V3 sizes, R = 8, E = 288, T = 128, H = 7168 FP8: about 2.1 GB in total).
//
// Row content: with use_fp8 the bytes and scales of cast_row_to_fp8(x[t], hidden, round_scale)
// (use_ue8m0: the hidden/128 scales packed with pack_ue8m0); else the BF16 row bytes.
//
// REQUIRES: inputs.size() == num_ranks; num_ranks >= 1; num_experts >= 1 and % num_ranks == 0;
//   hidden >= 1; num_topk >= 1; T >= 1; with use_fp8: hidden % 128 == 0 and, with use_ue8m0,
//   hidden % 512 == 0; use_ue8m0 requires round_scale; for each rank 0 <= num_tokens <= T,
//   x.size() == num_tokens * hidden, topk_idx.size() == num_tokens * num_topk, entries in [-1, E),
//   x values finite when use_fp8; at most T rows from one source rank to one expert (only
//   duplicate slots can exceed it). (DeepEP's extra limits, e.g. the supported hidden sizes and
//   (R * T) % 4 == 0, are kernel limits and are not checked here.)
std::vector<LowLatencyRecv> low_latency_dispatch(const std::vector<LowLatencyInput>& inputs,
                                                 const LowLatencyConfig& cfg);

// expert_out[d]: [E_local][R*T][hidden] BF16, the expert outputs of rank d, in the packed positions
// described by recv[d] (recv may be the reference's or a GPU's dispatch result: only its
// layout_range and src_info are used to locate rows).
// For source rank s, token t, column c:
//   acc = +0.0f
//   for k = 0 .. K-1 ascending with e = topk_idx[t][k] >= 0:
//     y   = the row returned for (t, k): in recv[e / E_local], local expert e % E_local, range
//           layout_range[..][s], the j-th row (in row order) whose src_info == t, where j counts the
//           earlier slots k' < k of token t that select the same expert e
//     acc = acc + (topk_weights[t][k] * bf16_to_float(y[c]))   (float32 multiply rounded, then
//           float32 add rounded; NO fused multiply-add)
//   out[s][t][c] = float_to_bf16(acc)
// Tokens with no valid slot give +0.0. Result: [R] matrices of [num_tokens][hidden] BF16.
// use_logfmt (DeepEP's use_logfmt, OpenEP's LogFMT-10 transport, src/protocol/logfmt.hpp): every returned row y
// travels encoded: bf16_to_float(y[c]) above is replaced by logfmt_decode_row(logfmt_encode_row(y))[c] (a float32
// value; the exact BF16 value in divisions that fall back to BF16). Everything else (slot order, float32
// multiply then add, the final rounding) is unchanged. REQUIRES hidden % 128 == 0.
// Note: DeepEP writes a token's duplicate-expert copies to one receive slot, so with duplicate
// experts a kernel may return either copy for both slots; give duplicate copies identical expert
// outputs in GPU tests.
// REQUIRES: low_latency_dispatch's requirements on inputs/cfg, plus topk_weights.size() ==
//   num_tokens * num_topk for every rank; expert_out.size() == recv.size() == num_ranks;
//   expert_out[d].size() == E_local * R * T * hidden; recv[d].layout_range.size() == E_local * R and
//   recv[d].src_info.size() == E_local * R * T with 0 <= start and start + count <= R * T for every
//   range; every needed row present.
std::vector<std::vector<uint16_t>> low_latency_combine(const std::vector<std::vector<uint16_t>>& expert_out,
                                                       const std::vector<LowLatencyRecv>& recv,
                                                       const std::vector<LowLatencyInput>& inputs,
                                                       const LowLatencyConfig& cfg,
                                                       bool use_logfmt = false);

// Shrink mode (BufferOptions::enable_shrink, DeepEP's failure masking): what the surviving ranks see when the
// ranks in `masked` are masked. Returns a copy of `inputs` in which every masked rank sends nothing
// (num_tokens = 0, empty x / topk_idx / topk_weights) and every top-k slot whose expert lives on a masked rank
// (expert / E_local in masked) is -1. low_latency_dispatch and low_latency_combine of the result give, for every
// rank NOT in masked, exactly its outputs in shrink mode; masked ranks' own outputs are not specified.
// REQUIRES: inputs.size() == cfg.num_ranks; every entry of masked in [0, num_ranks).
std::vector<LowLatencyInput> mask_ranks(const std::vector<LowLatencyInput>& inputs, const LowLatencyConfig& cfg,
                                        const std::vector<int>& masked);

// ---------------------------------------------------------------------------------------------
// LogFMT-10: the 10-bit logarithmic transport of the low-latency combine (use_logfmt)
// ---------------------------------------------------------------------------------------------
// The format (metadata, the BF16 fallback rule, codes, decoded values, bytes) is defined exactly in
// src/protocol/logfmt.hpp, whose functions the kernels call too; these functions apply it to whole rows.
// A row of hidden BF16 values has D = hidden / 128 divisions of 128 channels.

struct LogfmtRow {
  std::vector<uint32_t> meta;    // [D] amax | (amin << 16): BF16 bits of the largest / smallest |x| of division j
  std::vector<uint8_t> payload;  // [D][256] the division's bytes in the combine row: its 128 BF16 values
                                 //   (little-endian) when it is not encoded, else the 160 bytes of its codes
                                 //   (low plane, high plane) followed by 96 zero bytes (never sent)
};

// Encodes one BF16 row. Any BF16 input is allowed (Inf, NaN and values >= 1 make their division fall back to
// BF16). REQUIRES: hidden > 0, hidden % 128 == 0 (else std::invalid_argument).
LogfmtRow logfmt_encode_row(const uint16_t* x, int hidden);

// Decodes a row produced by logfmt_encode_row into hidden floats: the decoded code of each channel of an encoded
// division, bf16_to_float of the payload of any other division.
// REQUIRES: hidden > 0, hidden % 128 == 0, row.meta.size() == hidden / 128, row.payload.size() == 2 * hidden.
std::vector<float> logfmt_decode_row(const LogfmtRow& row, int hidden);

}  // namespace openep::ref
