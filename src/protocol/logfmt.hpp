// LogFMT-10: OpenEP's 10-bit logarithmic transport of the low-latency combine payload (use_logfmt), in the
// spirit of DeepEP V1's LogFMT-10 but OpenEP's own format (both sides are OpenEP's, so no bit compatibility with
// DeepEP's wire bytes is intended). The CPU reference (reference/reference.cpp) and the kernels
// (src/kernels/low_latency.cu) both call the functions below, so the two sides compute the same bits.
//
// Determinism: every floating-point operation here is one IEEE-754 binary32 operation rounded to nearest even
// (add_rn, sub_rn, mul_rn, div_rn, plus exact floor / bit manipulations). On the device they are __fadd_rn,
// __fsub_rn, __fmul_rn and __fdiv_rn, which the compiler never contracts into FMA; on the host plain float
// operations whose products go through a volatile (so no -ffp-contract setting can fuse them) and which require
// FLT_EVAL_METHOD == 0 (checked below). log2 and exp2 are software functions built from these operations (not
// libm or the CUDA intrinsics, which are not correctly rounded and differ between host and device). Denormals
// are computed in IEEE arithmetic on both sides (no flush to zero: OpenEP's kernels are built without
// -use_fast_math; a host process that enables FTZ/DAZ would change results for values below 2^-126).
//
// THE FORMAT (per combine row of hidden H BF16 values, H % 128 == 0; D = H / 128 divisions of 128 channels):
//  metadata  one uint32 per division j: meta[j] = amax | (amin << 16), where amax / amin are the BF16 bits of the
//            largest / smallest |x| over the division's 128 values (|x| = x & 0x7FFF; max / min taken on those
//            bits, which orders non-negative BF16 values like their values: order-independent, and a NaN in the
//            division makes amax > 0x7F80).
//  decision  division j is ENCODED iff amax < 0x3F80 (amax < 1.0, so finite) and amin < amax (encodes(meta));
//            otherwise it travels as its 128 BF16 values unchanged (256 bytes): amax >= 1, Inf, NaN, a constant
//            division and an all-zero division fall back to BF16.
//  parameters (division(meta)), all binary32, with L = log2_rn below:
//            la    = L(amax)
//            lmin  = L(amin) if amin != 0 and L(amin) > la - 32, else la - 32   (sub_rn(la, 32))
//            range = la - lmin  (> 0: L is strictly increasing on positive BF16 values, checked exhaustively by
//                    a CPU test)
//            step  = range / 510;  inv = 510 / range  (two IEEE divisions)
//            rho   = 2 - log2((1 + 2^step) / 2) / step, evaluated as its series 3/2 - u/8 + u^3/192 with
//                    u = step * ln2 (truncation error < 1e-10 for step <= 32/510): rho = 1.5 + u * (-1/8 + u*u/192)
//  code      (encode(x, d)) a 10-bit code w = (sign << 9) | c, sign = BF16 sign bit of x, and the magnitude
//            c = 0 if |x| == 0, else with q = ((L(|x|) - lmin) * inv) + rho (rounded after each operation):
//            c = 0 if q < 1, 511 if q >= 511, else floor(q)
//            (rho places the threshold between codes c and c + 1 at the mean of their decoded values)
//  value     (decode(w, d)) c == 0 -> +0.0f (either sign); else s * 2^((c - 1) * step + lmin) with the exponent
//            computed as add_rn(mul_rn(float(c - 1), step), lmin) and 2^y = exp2_rn(y); s = -1 if the sign bit is
//            set. So c = 1 decodes to about amin (or 2^(la - 32)), c = 511 to about amax.
//  bytes     a combine row keeps a 256-byte slot per division (its BF16 size): division j at row bytes
//            [256 j, 256 j + 256). A BF16 division fills it. An ENCODED division fills only its first 160 bytes
//            (what crosses NVLink), in two planes: for channel i of the division (0..127), with w_i its code,
//              byte i                       = w_i & 0xFF                (low plane, bytes 0..127)
//              bits 2(i%4), 2(i%4)+1 of byte 128 + i/4 = w_i >> 8      (high plane, bytes 128..159:
//                                                                        magnitude bit 8, then the sign)
//            so each group of 8 channels g (channels 8g..8g+7) owns 8 low bytes at 8g and 16 high bits at
//            128 + 2g (pack_group / code_of_group), and 16 channels take 160 bits.
//            The metadata travels in its own row of meta_row_bytes = align16(4 D) bytes (LowLatencyLayout::
//            combine_meta). Bytes per (token, expert) when every division is encoded: H * 10 / 8 + 4 D
//            (plus the alignment padding of the metadata row), against 2 H for BF16.
//  combine   the receiver decodes each slot's row to float32 (BF16 divisions: the exact BF16 value) and sums
//            exactly as the BF16 combine does: acc = acc + (weight * value), float32, slots ascending, then one
//            rounding to BF16 (openep::ref::low_latency_combine(..., use_logfmt = true) is the specification).
//  accuracy  for a value with |x| >= 2^lmin the decoded value is within a factor 2^(step/2) (1 + ~1e-5) of |x|
//            (step <= 32/510: at most ~2.2% relative, much less for a narrow range); smaller values decode to 0
//            or 2^lmin (absolute error <= 2^lmin <= max(amin, amax * 2^-32)).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "protocol/host_device.hpp"

#if !defined(__CUDA_ARCH__) && (FLT_EVAL_METHOD != 0)
#error "protocol/logfmt.hpp needs float arithmetic evaluated in float (FLT_EVAL_METHOD == 0, e.g. SSE on x86-64)"
#endif

namespace openep::detail::logfmt {

inline constexpr int kDivisionChannels = 128;   // channels per division (one metadata word)
inline constexpr int kDivisionSlotBytes = 256;  // a division's slot in a combine row (its BF16 size)
inline constexpr int kLowPlaneBytes = 128;      // encoded division: low byte of every code
inline constexpr int kEncodedBytes = 160;       // encoded division: low plane + high plane (2 bits per code)
inline constexpr int kGroupChannels = 8;        // channels per pack group (one int4 of BF16 input)
inline constexpr uint32_t kMaxMagnitude = 511;  // 9-bit magnitude code
inline constexpr uint32_t kBf16One = 0x3F80;    // BF16 bits of 1.0

// ---- exactly rounded binary32 operations ----
OPENEP_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
OPENEP_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
OPENEP_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;  // stored rounded and read back: never fused into a following add
  return p;
#endif
}
OPENEP_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
OPENEP_HOST_DEVICE float floor_exact(float a) {
#if defined(__CUDA_ARCH__)
  return floorf(a);
#else
  return std::floor(a);
#endif
}
OPENEP_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
OPENEP_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
OPENEP_HOST_DEVICE float bf16_value(uint32_t bits) { return bits_float(bits << 16); }

// ---- software log2 / exp2 (absolute error ~1e-7 plus the final rounding; deterministic) ----
// log2(x) for finite x > 0, normal or subnormal: x = 2^e * m, m in [sqrt(1/2), sqrt(2)], and
// log2(m) = 2/ln2 * atanh(z), z = (m - 1) / (m + 1), |z| <= 0.1716, as the odd series up to z^9 (Horner in z^2).
OPENEP_HOST_DEVICE float log2_rn(float x) {
  uint32_t b = float_bits(x);
  int e = -127;
  if (b < 0x00800000u) {  // subnormal: scale by 2^24 (exact)
    b = float_bits(mul_rn(x, 0x1p24f));
    e -= 24;
  }
  e += static_cast<int>(b >> 23);
  float m = bits_float((b & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  if (m > 0x1.6a09e6p+0f) {                                // > sqrt(2): halve (exact)
    m = mul_rn(m, 0.5f);
    e += 1;
  }
  const float z = div_rn(sub_rn(m, 1.0f), add_rn(m, 1.0f));
  const float z2 = mul_rn(z, z);
  float p = 0x1.484b14p-2f;                 // 2 / (9 ln2)
  p = add_rn(mul_rn(p, z2), 0x1.a61762p-2f);  // 2 / (7 ln2)
  p = add_rn(mul_rn(p, z2), 0x1.2776c6p-1f);  // 2 / (5 ln2)
  p = add_rn(mul_rn(p, z2), 0x1.ec709ep-1f);  // 2 / (3 ln2)
  p = add_rn(mul_rn(p, z2), 0x1.715476p+1f);  // 2 / ln2
  return add_rn(static_cast<float>(e), mul_rn(p, z));
}

// 2^y for finite y <= 64: y = n + f, n = floor(y + 1/2), f = y - n, 2^f as the Taylor series of e^(f ln2) up to
// degree 7 (|f| <= ~1/2), then scaled by 2^n exactly (one rounding when the result is subnormal); 0 below 2^-151.
OPENEP_HOST_DEVICE float exp2_rn(float y) {
  const float nf = floor_exact(add_rn(y, 0.5f));
  const int n = static_cast<int>(nf);
  if (n < -151) return 0.0f;
  const float f = sub_rn(y, nf);
  float p = 0x1.ffcbfcp-17f;                // ln2^7 / 7!
  p = add_rn(mul_rn(p, f), 0x1.430912p-13f);  // ln2^6 / 6!
  p = add_rn(mul_rn(p, f), 0x1.5d87fep-10f);  // ln2^5 / 5!
  p = add_rn(mul_rn(p, f), 0x1.3b2ab6p-7f);   // ln2^4 / 4!
  p = add_rn(mul_rn(p, f), 0x1.c6b08ep-5f);   // ln2^3 / 3!
  p = add_rn(mul_rn(p, f), 0x1.ebfbe0p-3f);   // ln2^2 / 2!
  p = add_rn(mul_rn(p, f), 0x1.62e430p-1f);   // ln2
  p = add_rn(mul_rn(p, f), 1.0f);
  if (n >= -126) return mul_rn(p, bits_float(static_cast<uint32_t>(n + 127) << 23));
  return mul_rn(mul_rn(p, bits_float(static_cast<uint32_t>(n + 100 + 127) << 23)), 0x1p-100f);
}

// ---- one division ----
OPENEP_HOST_DEVICE uint32_t abs_bits(uint32_t bf16) { return bf16 & 0x7FFFu; }
OPENEP_HOST_DEVICE uint32_t make_meta(uint32_t amax_bits, uint32_t amin_bits) { return amax_bits | (amin_bits << 16); }
OPENEP_HOST_DEVICE bool encodes(uint32_t meta) {
  const uint32_t amax = meta & 0xFFFFu, amin = meta >> 16;
  return amax < kBf16One && amin < amax;
}

struct Division {
  bool encoded = false;
  float log_amin = 0.0f, step = 0.0f;  // decode
  float inv_step = 0.0f, rho = 0.0f;   // encode
};

OPENEP_HOST_DEVICE Division division(uint32_t meta) {
  Division d;
  d.encoded = encodes(meta);
  if (!d.encoded) return d;
  const uint32_t amax = meta & 0xFFFFu, amin = meta >> 16;
  const float la = log2_rn(bf16_value(amax));
  float lmin = sub_rn(la, 32.0f);
  if (amin != 0) {
    const float l = log2_rn(bf16_value(amin));
    if (l > lmin) lmin = l;
  }
  const float range = sub_rn(la, lmin);
  d.log_amin = lmin;
  d.step = div_rn(range, 510.0f);
  d.inv_step = div_rn(510.0f, range);
  const float u = mul_rn(d.step, 0x1.62e430p-1f);  // step * ln2
  d.rho = add_rn(1.5f, mul_rn(u, add_rn(-0.125f, mul_rn(mul_rn(u, u), 0x1.555556p-8f))));  // 1/192
  return d;
}

// 10-bit code of BF16 value x (bits) in an ENCODED division d.
OPENEP_HOST_DEVICE uint32_t encode(uint32_t x, const Division& d) {
  const uint32_t sign = (x >> 15) & 1u, a = abs_bits(x);
  uint32_t c = 0;
  if (a != 0) {
    const float q = add_rn(mul_rn(sub_rn(log2_rn(bf16_value(a)), d.log_amin), d.inv_step), d.rho);
    if (q >= 1.0f) c = q >= static_cast<float>(kMaxMagnitude) ? kMaxMagnitude : static_cast<uint32_t>(q);
  }
  return (sign << 9) | c;
}

// The value of a 10-bit code in an ENCODED division d.
OPENEP_HOST_DEVICE float decode(uint32_t code, const Division& d) {
  const uint32_t c = code & 0x1FFu;
  if (c == 0) return 0.0f;
  const float v = exp2_rn(add_rn(mul_rn(static_cast<float>(c - 1), d.step), d.log_amin));
  return (code >> 9) != 0 ? -v : v;
}

// ---- bytes of an encoded division: pack group g (channels 8g..8g+7) ----
// low8: the 8 low bytes (little-endian; division bytes 8g..8g+7); high16: 2 bits per channel (division bytes
// 128 + 2g, 128 + 2g + 1; channel k of the group at bits 2k, 2k + 1).
OPENEP_HOST_DEVICE void pack_group(const uint32_t (&code)[kGroupChannels], uint32_t& low_lo, uint32_t& low_hi,
                                   uint32_t& high16) {
  low_lo = 0, low_hi = 0, high16 = 0;
  for (int k = 0; k < 4; ++k) {
    low_lo |= (code[k] & 0xFFu) << (8 * k);
    low_hi |= (code[k + 4] & 0xFFu) << (8 * k);
  }
  for (int k = 0; k < kGroupChannels; ++k) high16 |= ((code[k] >> 8) & 3u) << (2 * k);
}
// Code of channel k (0..7) of a group from its 8 low bytes (two little-endian words) and 16 high bits.
OPENEP_HOST_DEVICE uint32_t code_of_group(uint32_t low_lo, uint32_t low_hi, uint32_t high16, int k) {
  const uint32_t low = ((k < 4 ? low_lo : low_hi) >> (8 * (k & 3))) & 0xFFu;
  return low | (((high16 >> (2 * k)) & 3u) << 8);
}

}  // namespace openep::detail::logfmt
