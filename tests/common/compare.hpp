// Comparison helpers for OpenEP tests (header-only, gtest-free, no dependency on the library).
//
// Each helper returns an empty string when the inputs match, otherwise a description of the number
// of mismatching elements and of the first few, as (row, column) with both values, e.g.
//   "rank 1 recv_x: 3 of 512 elements differ; (row 2, col 7): got 0x3f80 (16256), want 0x4000 (16384); ..."
// Use from gtest as  EXPECT_EQ(first_mismatches(...), "");  or  EXPECT_TRUE(s.empty()) << s;
// Put the context (rank, expert, tensor) into `what`. Matrices are row-major with row_len columns
// (row_len <= 0 means one row). `a` is the value under test ("got"), `b` the expected value ("want").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace openep::test {

namespace detail {

template <typename T>
std::string value_text(T v) {
  std::ostringstream os;
  if constexpr (std::is_floating_point_v<T>) {
    os << std::setprecision(9) << v;
  } else if constexpr (std::is_integral_v<T> && std::is_unsigned_v<T> && sizeof(T) <= 4) {
    os << "0x" << std::hex << static_cast<uint64_t>(v) << std::dec << " (" << static_cast<uint64_t>(v) << ")";
  } else if constexpr (std::is_integral_v<T>) {
    os << static_cast<long long>(v);
  } else {
    os << "<" << sizeof(T) << "-byte value>";
  }
  return os.str();
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Shared driver: `differs(i)` says whether element i mismatches, `describe(i)` prints both values.
template <typename Differs, typename Describe>
std::string report(size_t n, int row_len, const char* what, int max_report, Differs differs, Describe describe) {
  const size_t cols = row_len > 0 ? static_cast<size_t>(row_len) : (n > 0 ? n : 1);
  size_t num_bad = 0;
  std::ostringstream details;
  for (size_t i = 0; i < n; ++i) {
    if (!differs(i)) continue;
    if (num_bad < static_cast<size_t>(max_report)) {
      details << "; (row " << i / cols << ", col " << i % cols << "): " << describe(i);
    }
    ++num_bad;
  }
  if (num_bad == 0) return {};
  std::ostringstream os;
  os << (what ? what : "values") << ": " << num_bad << " of " << n << " elements differ" << details.str();
  if (num_bad > static_cast<size_t>(max_report)) os << "; ...";
  return os.str();
}

inline std::string size_mismatch(const char* what, size_t got, size_t want) {
  std::ostringstream os;
  os << (what ? what : "values") << ": size " << got << " differs from expected size " << want;
  return os.str();
}

}  // namespace detail

// Exact comparison by bits (floats: -0.0 differs from +0.0, a NaN equals the identical NaN).
template <typename T>
std::string first_mismatches(const T* a, const T* b, size_t n, int row_len, const char* what, int max_report = 5) {
  static_assert(std::is_trivially_copyable_v<T>, "first_mismatches compares the bytes of each element");
  return detail::report(
      n, row_len, what, max_report, [&](size_t i) { return std::memcmp(&a[i], &b[i], sizeof(T)) != 0; },
      [&](size_t i) { return "got " + detail::value_text(a[i]) + ", want " + detail::value_text(b[i]); });
}

template <typename T>
std::string first_mismatches(
    const std::vector<T>& a, const std::vector<T>& b, int row_len, const char* what, int max_report = 5) {
  if (a.size() != b.size()) return detail::size_mismatch(what, a.size(), b.size());
  return first_mismatches(a.data(), b.data(), a.size(), row_len, what, max_report);
}

// Tolerant float comparison: element i matches when |a - b| <= atol + rtol * |b|, or both are NaN,
// or both are the same infinity.
inline std::string first_mismatches_close(const float* a,
                                          const float* b,
                                          size_t n,
                                          int row_len,
                                          const char* what,
                                          double rtol,
                                          double atol,
                                          int max_report = 5) {
  auto differs = [&](size_t i) {
    const double x = a[i], y = b[i];
    if (std::isnan(x) || std::isnan(y)) return !(std::isnan(x) && std::isnan(y));
    if (std::isinf(x) || std::isinf(y)) return x != y;
    return std::fabs(x - y) > atol + rtol * std::fabs(y);
  };
  return detail::report(n, row_len, what, max_report, differs, [&](size_t i) {
    return "got " + detail::value_text(a[i]) + ", want " + detail::value_text(b[i]);
  });
}

inline std::string first_mismatches_close(const std::vector<float>& a,
                                          const std::vector<float>& b,
                                          int row_len,
                                          const char* what,
                                          double rtol,
                                          double atol,
                                          int max_report = 5) {
  if (a.size() != b.size()) return detail::size_mismatch(what, a.size(), b.size());
  return first_mismatches_close(a.data(), b.data(), a.size(), row_len, what, rtol, atol, max_report);
}

// Tolerant comparison of BF16 bit patterns, decoded to float (same rule as first_mismatches_close).
inline std::string first_mismatches_bf16_close(const uint16_t* a,
                                               const uint16_t* b,
                                               size_t n,
                                               int row_len,
                                               const char* what,
                                               double rtol,
                                               double atol,
                                               int max_report = 5) {
  auto differs = [&](size_t i) {
    const double x = detail::bf16_bits_to_float(a[i]), y = detail::bf16_bits_to_float(b[i]);
    if (std::isnan(x) || std::isnan(y)) return !(std::isnan(x) && std::isnan(y));
    if (std::isinf(x) || std::isinf(y)) return x != y;
    return std::fabs(x - y) > atol + rtol * std::fabs(y);
  };
  return detail::report(n, row_len, what, max_report, differs, [&](size_t i) {
    return "got " + detail::value_text(detail::bf16_bits_to_float(a[i])) + " (" + detail::value_text(a[i]) +
           "), want " + detail::value_text(detail::bf16_bits_to_float(b[i])) + " (" + detail::value_text(b[i]) + ")";
  });
}

// Low-latency receive rows are placed in a nondeterministic order by the kernels. For one local
// expert, given its layout_range ([R] entries of (start << 32) | count) and src_info ([R*T]), this
// returns the packed row indices in the reference's order: source ranks ascending, and inside the
// range of one source rank, rows sorted by src_info (stable, so duplicate copies keep their order).
// Row j of the reference (j < count) corresponds to row result[j] of the kernel output.
inline std::vector<int> low_latency_canonical_rows(const int64_t* layout_range, const int* src_info, int num_ranks) {
  std::vector<int> rows;
  for (int s = 0; s < num_ranks; ++s) {
    const int64_t start = layout_range[s] >> 32;
    const int64_t count = layout_range[s] & 0xFFFFFFFFLL;
    const size_t first = rows.size();
    for (int64_t r = start; r < start + count; ++r) rows.push_back(static_cast<int>(r));
    std::stable_sort(rows.begin() + first, rows.end(), [&](int x, int y) { return src_info[x] < src_info[y]; });
  }
  return rows;
}

}  // namespace openep::test
