// all_kernels and load_all_kernels (kernels/load.hpp).
#include <cuda_runtime.h>

#include <mutex>
#include <set>

#include "kernels/load.hpp"
#include "runtime/check.hpp"

namespace openep::detail {

std::vector<KernelRef> all_kernels() {
  std::vector<KernelRef> k;
  list_runtime_kernels(k);
  list_layout_kernels(k);
  list_intranode_kernels(k);
  list_internode_kernels(k);
  list_internode_gin_kernels(k);
  list_low_latency_kernels(k);
  list_low_latency_gin_kernels(k);
  return k;
}

void load_all_kernels(int device) {
  static std::mutex mu;
  static std::set<int> loaded;
  std::lock_guard<std::mutex> lock(mu);
  if (loaded.count(device)) return;
  int previous = 0;
  OPENEP_CUDA_CHECK(cudaGetDevice(&previous));
  OPENEP_CUDA_CHECK(cudaSetDevice(device));
  for (const KernelRef& k : all_kernels()) {
    cudaFuncAttributes attr{};
    const cudaError_t e = cudaFuncGetAttributes(&attr, k.fn);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      (void)cudaSetDevice(previous);
      OPENEP_CHECK(false, ErrorCode::kCuda, "loading kernel ", k.name, " on device ", device,
                   " (cudaFuncGetAttributes): ", cudaGetErrorString(e), "; OpenEP is built for sm_90a (Hopper)");
    }
  }
  OPENEP_CUDA_CHECK(cudaSetDevice(previous));
  loaded.insert(device);
}

}  // namespace openep::detail
