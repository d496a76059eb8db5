// load_all_kernels (kernels/load.hpp): every kernel on a device, once per process and device.
#include <mutex>
#include <set>

#include "kernels/load.hpp"

namespace openep::detail {

void load_all_kernels(int device) {
  static std::mutex mu;
  static std::set<int> loaded;
  std::lock_guard<std::mutex> lock(mu);
  if (loaded.count(device)) return;
  int previous = 0;
  OPENEP_CUDA_CHECK(cudaGetDevice(&previous));
  OPENEP_CUDA_CHECK(cudaSetDevice(device));
  try {
    load_runtime_kernels();
    load_layout_kernels();
    load_intranode_kernels();
    load_internode_kernels();
    load_internode_gin_kernels();
    load_low_latency_kernels();
    load_low_latency_gin_kernels();
  } catch (...) {
    (void)cudaSetDevice(previous);
    throw;
  }
  OPENEP_CUDA_CHECK(cudaSetDevice(previous));
  loaded.insert(device);
}

}  // namespace openep::detail
