#include "openep/error.hpp"

#include "runtime/check.hpp"

namespace openep {

const char* error_code_name(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid argument";
    case ErrorCode::kBufferTooSmall: return "buffer too small";
    case ErrorCode::kCuda: return "CUDA error";
    case ErrorCode::kNccl: return "NCCL error";
    case ErrorCode::kVersionMismatch: return "NCCL version mismatch";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kDeviceCheck: return "invalid input found on the device";
    case ErrorCode::kBufferFailed: return "buffer failed";
    case ErrorCode::kUnsupported: return "unsupported";
    case ErrorCode::kInternal: return "internal error";
  }
  return "unknown error";
}

Error::Error(ErrorCode code, const char* file, int line, const std::string& message)
    : std::runtime_error(detail::concat("OpenEP ", error_code_name(code), ": ", message)),
      code_(code),
      file_(file),
      line_(line) {}

namespace detail {

void throw_error(ErrorCode code, const char* file, int line, const std::string& message) {
  throw Error(code, file, line, message);
}

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw Error(ErrorCode::kCuda, file, line,
              concat(expr, " returned ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ") at ", file, ":",
                     line));
}

void throw_nccl_error(ncclResult_t res, const char* expr, const char* file, int line) {
  throw Error(ErrorCode::kNccl, file, line,
              concat(expr, " returned ", static_cast<int>(res), " (", ncclGetErrorString(res), ") at ", file, ":",
                     line));
}

}  // namespace detail
}  // namespace openep
