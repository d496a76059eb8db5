// Host-side checks: every failing condition throws openep::Error with a message that names what was
// expected and what was seen. One formatting mechanism: detail::concat (an ostringstream).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <sstream>
#include <string>
#include <utility>

#include "openep/error.hpp"

namespace openep::detail {

template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

[[noreturn]] void throw_error(ErrorCode code, const char* file, int line, const std::string& message);
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void throw_nccl_error(ncclResult_t res, const char* expr, const char* file, int line);

}  // namespace openep::detail

// OPENEP_CHECK(cond, code, parts...): throws Error{code} with the concatenated parts when cond is false.
#define OPENEP_CHECK(cond, code, ...)                                                              \
  do {                                                                                             \
    if (!(cond)) ::openep::detail::throw_error((code), __FILE__, __LINE__,                         \
                                               ::openep::detail::concat(__VA_ARGS__));             \
  } while (0)

// OPENEP_CHECK_ARG(cond, parts...): an invalid argument.
#define OPENEP_CHECK_ARG(cond, ...) OPENEP_CHECK(cond, ::openep::ErrorCode::kInvalidArgument, __VA_ARGS__)

#define OPENEP_CUDA_CHECK(expr)                                                                    \
  do {                                                                                             \
    cudaError_t openep_err_ = (expr);                                                              \
    if (openep_err_ != cudaSuccess) ::openep::detail::throw_cuda_error(openep_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define OPENEP_NCCL_CHECK(expr)                                                                    \
  do {                                                                                             \
    ncclResult_t openep_res_ = (expr);                                                             \
    if (openep_res_ != ncclSuccess) ::openep::detail::throw_nccl_error(openep_res_, #expr, __FILE__, __LINE__); \
  } while (0)
