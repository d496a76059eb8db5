// Small helpers for GPU tests: device arrays, poisoning, an error slot for kernels that record errors.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "protocol/device_error.hpp"

#define TEST_CUDA_CHECK(expr)                                                                        \
  do {                                                                                               \
    cudaError_t e_ = (expr);                                                                         \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#expr) + ": " + cudaGetErrorString(e_)); \
  } while (0)

namespace openep::test {

inline constexpr unsigned char kPoisonByte = 0xA5;

// This host thread's stream for the tests' own copies, fills and allocations (non-blocking, created on first
// use, destroyed when the thread ends). Test helpers never use the legacy default stream or device-wide
// synchronisation: on virtual ranks (several ranks' threads on one GPU) a device-wide wait would wait for the
// other ranks' kernels, which may be spinning on this rank.
inline cudaStream_t test_stream() {
  struct Holder {
    cudaStream_t s = nullptr;
    ~Holder() {
      if (s) (void)cudaStreamDestroy(s);
    }
  };
  thread_local Holder h;
  if (!h.s) TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&h.s, cudaStreamNonBlocking));
  return h.s;
}

// Synchronous copies and fills on test_stream() (they return when done).
inline void copy_to_device(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  TEST_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, test_stream()));
  TEST_CUDA_CHECK(cudaStreamSynchronize(test_stream()));
}
inline void copy_to_host(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  TEST_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, test_stream()));
  TEST_CUDA_CHECK(cudaStreamSynchronize(test_stream()));
}
inline void copy_device_to_device(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  TEST_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, test_stream()));
  TEST_CUDA_CHECK(cudaStreamSynchronize(test_stream()));
}
inline void fill_device(void* dst, int byte, size_t bytes) {
  if (!bytes) return;
  TEST_CUDA_CHECK(cudaMemsetAsync(dst, byte, bytes, test_stream()));
  TEST_CUDA_CHECK(cudaStreamSynchronize(test_stream()));
}

// Owning device array of T (stream-ordered allocation on test_stream(); no device-wide synchronisation).
// REQUIRES: no kernel still uses the array when it is destroyed (synchronise the stream that used it first).
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n_) {
      TEST_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&p_), n_ * sizeof(T), test_stream()));
      TEST_CUDA_CHECK(cudaStreamSynchronize(test_stream()));  // usable from any stream from here on
    }
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) { upload(v); }
  // A non-owning view of n elements at p (memory someone else frees, e.g. Buffer::alloc_recv).
  static DeviceArray view(T* p, size_t n) {
    DeviceArray a;
    a.p_ = p, a.n_ = n, a.owned_ = false;
    return a;
  }
  ~DeviceArray() { release(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_), owned_(o.owned_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      release();
      p_ = o.p_, n_ = o.n_, owned_ = o.owned_;
      o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& v) { copy_to_device(p_, v.data(), (v.size() < n_ ? v.size() : n_) * sizeof(T)); }
  std::vector<T> download() const {
    std::vector<T> v(n_);
    copy_to_host(v.data(), p_, n_ * sizeof(T));
    return v;
  }
  // Fills with kPoisonByte so that an element the kernel forgot to write is detected. Returns when the fill
  // is done, so it is ordered before anything enqueued afterwards on any stream.
  void poison() { fill_device(p_, kPoisonByte, n_ * sizeof(T)); }
  void zero() { fill_device(p_, 0, n_ * sizeof(T)); }

 private:
  void release() {
    if (p_ && owned_) (void)cudaFreeAsync(p_, test_stream());
    p_ = nullptr;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
  bool owned_ = true;
};

// A test's peer-wait bound, scaled by OPENEP_TEST_TIMEOUT_SCALE (default 1). Tools that slow kernels down by an
// order of magnitude (compute-sanitizer) set it; the tests never widen their bounds otherwise.
inline double test_timeout(double seconds) {
  const char* v = std::getenv("OPENEP_TEST_TIMEOUT_SCALE");
  const double scale = v && *v ? std::atof(v) : 1.0;
  return seconds * (scale >= 1.0 ? scale : 1.0);
}

// Error slot for kernels launched directly through the ::openep::detail:: launchers.
class ErrorSlot {
 public:
  explicit ErrorSlot(double timeout_seconds = 5.0, int rank = 0) {
    TEST_CUDA_CHECK(cudaMalloc(&claim_, sizeof(int32_t)));
    TEST_CUDA_CHECK(cudaMemset(claim_, 0, sizeof(int32_t)));
    TEST_CUDA_CHECK(cudaHostAlloc(&record_, sizeof(::openep::detail::DeviceError), cudaHostAllocMapped));
    std::memset(static_cast<void*>(record_), 0, sizeof(::openep::detail::DeviceError));
    TEST_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&record_device_), record_, 0));
    ctx_ = ::openep::detail::WaitContext{claim_, record_device_, static_cast<uint64_t>(timeout_seconds * 1e9), rank};
  }
  ~ErrorSlot() {
    cudaFree(claim_);
    cudaFreeHost(record_);
  }
  const ::openep::detail::WaitContext& context() const { return ctx_; }
  ::openep::detail::DeviceError record() const {
    const volatile ::openep::detail::DeviceError* r = record_;
    return ::openep::detail::DeviceError{r->code, r->rank, r->peer, r->phase, r->expected, r->observed};
  }

 private:
  int32_t* claim_ = nullptr;
  ::openep::detail::DeviceError* record_ = nullptr;
  ::openep::detail::DeviceError* record_device_ = nullptr;
  ::openep::detail::WaitContext ctx_{};
};

}  // namespace openep::test
