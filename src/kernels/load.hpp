// Loading OpenEP's kernels up front (host side). CUDA's lazy loading (the default since CUDA 12.2) loads a kernel
// at its first launch, and that load may synchronize the context. OpenEP's kernels spin on each other and on the
// network (a dispatch waits for its peers' sends, a GIN barrier for the proxy thread's puts), so a first launch
// while one of them spins can wait for a kernel that waits for it: a deadlock (the CUDA C++ Programming Guide's
// "lazy loading" caveat on concurrent kernels). Buffer creation therefore loads every kernel on its device once
// per process (load_all_kernels), before any of them can spin.
#pragma once

#include <cuda_runtime.h>

#include "runtime/check.hpp"

namespace openep::detail {

// Forces `kernel` to be loaded on the current device (cudaFuncGetAttributes loads it under lazy loading).
inline void load_kernel(const void* kernel, const char* name) {
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  OPENEP_CHECK(e == cudaSuccess, ErrorCode::kCuda, "loading kernel ", name, " (cudaFuncGetAttributes): ",
               cudaGetErrorString(e), "; built for sm_90a, is this a Hopper GPU?");
}

// One per kernel file: loads every kernel of src/kernels/<file>.cu on the current device.
void load_runtime_kernels();
void load_layout_kernels();
void load_intranode_kernels();
void load_internode_kernels();
void load_internode_gin_kernels();
void load_low_latency_kernels();
void load_low_latency_gin_kernels();

// All of them, on `device`, once per process and device (thread-safe; later calls return at once). Restores the
// calling thread's current device.
void load_all_kernels(int device);

}  // namespace openep::detail
