// Fabric's default allocations: plain CUDA allocations, freed at once (runtime/fabric.hpp).
#include "runtime/fabric.hpp"

#include <cstdio>

#include "runtime/check.hpp"

namespace openep::detail {

void* Fabric::alloc_device(size_t bytes) {
  void* p = nullptr;
  OPENEP_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

void Fabric::free_device(void* p) noexcept {
  if (p == nullptr) return;
  const cudaError_t e = cudaFree(p);
  if (e != cudaSuccess) std::fprintf(stderr, "OpenEP: cudaFree failed during teardown: %s\n", cudaGetErrorString(e));
}

void* Fabric::alloc_mapped(size_t bytes, void** device_view) {
  void* p = nullptr;
  OPENEP_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocMapped));
  OPENEP_CUDA_CHECK(cudaHostGetDevicePointer(device_view, p, 0));
  return p;
}

void Fabric::free_mapped(void* p) noexcept {
  if (p == nullptr) return;
  const cudaError_t e = cudaFreeHost(p);
  if (e != cudaSuccess) std::fprintf(stderr, "OpenEP: cudaFreeHost failed during teardown: %s\n", cudaGetErrorString(e));
}

char* Rail::open_area(size_t bytes, Fabric& fabric) { return static_cast<char*>(fabric.alloc_device(bytes)); }
void Rail::close_area(char* area, Fabric& fabric) noexcept { fabric.free_device(area); }

NodeSplit Fabric::split_nodes(int, bool) {
  OPENEP_CHECK(false, ErrorCode::kUnsupported, "the ", name(), " fabric cannot split its ranks into nodes");
}

int Fabric::comm_stream_priority() const {
  int least = 0, greatest = 0;
  OPENEP_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  return greatest;
}

}  // namespace openep::detail
