// Small helpers for GPU tests: device arrays, poisoning, an error slot for kernels that record errors.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

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

// Owning device array of T.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) : n_(n) {
    if (n_) TEST_CUDA_CHECK(cudaMalloc(&p_, n_ * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) { upload(v); }
  ~DeviceArray() {
    if (p_) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFree(p_);
      p_ = o.p_, n_ = o.n_;
      o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }

  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& v) {
    if (n_) TEST_CUDA_CHECK(cudaMemcpy(p_, v.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> v(n_);
    if (n_) TEST_CUDA_CHECK(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return v;
  }
  // Fills with kPoisonByte so that an element the kernel forgot to write is detected. Waits for the fill:
  // cudaMemset runs on the legacy stream, which does not order against OpenEP's non-blocking streams.
  void poison() {
    if (n_) TEST_CUDA_CHECK(cudaMemset(p_, kPoisonByte, n_ * sizeof(T)));
    TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

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
