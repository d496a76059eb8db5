// Loading OpenEP's kernels up front (host side). CUDA's lazy loading (the default since CUDA 12.2) loads a kernel
// at its first launch, and that load may synchronize the context. OpenEP's kernels spin on each other and on the
// network (a dispatch waits for its peers' sends, a GIN barrier for the proxy thread's puts), so a first launch
// while one of them spins can wait for a kernel that waits for it: a deadlock (the CUDA C++ Programming Guide's
// "lazy loading" caveat on concurrent kernels; seen with the GIN path on 2026-12-02). Buffer creation therefore
// loads every kernel on its device once per process (load_all_kernels), before any of them can spin.
#pragma once

#include <vector>

namespace openep::detail {

// A kernel, as the CUDA runtime names it (its host stub), and a name for messages.
struct KernelRef {
  const void* fn;
  const char* name;
};

// One per kernel file: appends every kernel of src/kernels/<file>.cu (every instantiation it launches).
// tools/check_kernel_loading.py (CTest check_kernel_loading) keeps these lists complete.
void list_runtime_kernels(std::vector<KernelRef>& out);
void list_layout_kernels(std::vector<KernelRef>& out);
void list_intranode_kernels(std::vector<KernelRef>& out);
void list_internode_kernels(std::vector<KernelRef>& out);
void list_internode_gin_kernels(std::vector<KernelRef>& out);
void list_low_latency_kernels(std::vector<KernelRef>& out);
void list_low_latency_gin_kernels(std::vector<KernelRef>& out);

// Every kernel of the library.
std::vector<KernelRef> all_kernels();

// Loads all of them on `device` (cudaFuncGetAttributes loads a kernel under lazy loading), once per process and
// device (thread-safe; later calls return at once). Restores the calling thread's current device. Throws kCuda
// naming the kernel that failed to load.
void load_all_kernels(int device);

}  // namespace openep::detail
