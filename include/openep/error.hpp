// OpenEP errors.
//
// Every failure the library reports reaches the caller as an openep::Error exception. Its message names
// the operation or argument, the value expected and the value seen. Device-side failures (a peer that
// never arrives, an expert index out of range) are recorded by the kernel in a host-visible slot and turn
// into an Error at the next synchronisation point (Buffer::synchronize, or the next call on the Buffer).
#pragma once

#include <stdexcept>
#include <string>

namespace openep {

enum class ErrorCode {
  kInvalidArgument,   // a caller-supplied argument is wrong (shape, dtype, range, alignment)
  kBufferTooSmall,    // the request does not fit the Buffer; the message names the size needed
  kCuda,              // a CUDA runtime call failed
  kNccl,              // an NCCL call failed
  kVersionMismatch,   // run-time NCCL differs from the compile-time NCCL
  kTimeout,           // a wait on a peer exceeded the timeout (message names rank, peer and phase)
  kDeviceCheck,       // a kernel found invalid input on the device (message names the first offender)
  kBufferFailed,      // the Buffer saw an earlier error and refuses further work until destroyed
  kUnsupported,       // a valid request this build or topology does not support yet
  kInternal,          // a broken invariant inside OpenEP
};

// Name of an ErrorCode, e.g. "timeout".
const char* error_code_name(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const char* file, int line, const std::string& message);

  ErrorCode code() const noexcept { return code_; }
  const char* file() const noexcept { return file_; }
  int line() const noexcept { return line_; }

 private:
  ErrorCode code_;
  const char* file_;
  int line_;
};

}  // namespace openep
