// Buffer creation loads every kernel of the library (src/kernels/load.hpp), so that no first launch under CUDA's
// lazy loading can wait for a spinning kernel. Checked with the driver's own view (cuFuncIsLoaded) in this process,
// which runs with the default module loading (lazy unless CUDA_MODULE_LOADING says otherwise).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common/gpu_util.hpp"
#include "kernels/load.hpp"
#include "openep/buffer.hpp"
#include "openep/group.hpp"
#include "openep/intranode.hpp"

namespace openep::test {
namespace {

// The driver functions come through the runtime's entry-point query: the test binary does not link libcuda (so
// it still loads, and skips, on a machine without a driver).
template <typename Fn>
Fn driver_function(const char* name, unsigned version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &status);
  EXPECT_TRUE(e == cudaSuccess && status == cudaDriverEntryPointSuccess && fn != nullptr) << name;
  return reinterpret_cast<Fn>(fn);
}

// Whether kernel k is loaded in the current context, asked without loading it: cudaGetFuncBySymbol (and anything
// else that yields a CUfunction of the kernel) loads the function under lazy loading, which made an earlier
// version of this probe report every kernel as loaded (seen on an H200: 28 of 28 before any Buffer). The kernel's
// library-level handle (cudaGetKernel: context-independent) gives its library and name; the library's module in
// this context lists its functions as handles that may be partially loaded, and cuFuncIsLoaded reads their state.
bool is_loaded(const detail::KernelRef& k) {
  static const auto kernel_get_library = driver_function<PFN_cuKernelGetLibrary_v12050>("cuKernelGetLibrary", 12050);
  static const auto kernel_get_name = driver_function<PFN_cuKernelGetName_v12030>("cuKernelGetName", 12030);
  static const auto library_get_module = driver_function<PFN_cuLibraryGetModule_v12000>("cuLibraryGetModule", 12000);
  static const auto function_count = driver_function<PFN_cuModuleGetFunctionCount_v12040>("cuModuleGetFunctionCount", 12040);
  static const auto enumerate = driver_function<PFN_cuModuleEnumerateFunctions_v12040>("cuModuleEnumerateFunctions", 12040);
  static const auto func_get_name = driver_function<PFN_cuFuncGetName_v12030>("cuFuncGetName", 12030);
  static const auto func_is_loaded = driver_function<PFN_cuFuncIsLoaded_v12040>("cuFuncIsLoaded", 12040);
  if (!kernel_get_library || !kernel_get_name || !library_get_module || !function_count || !enumerate ||
      !func_get_name || !func_is_loaded)
    return false;
  cudaKernel_t kernel = nullptr;
  EXPECT_EQ(cudaGetKernel(&kernel, k.fn), cudaSuccess) << k.name;
  CUlibrary library = nullptr;
  const char* name = nullptr;
  CUmodule module = nullptr;
  EXPECT_EQ(kernel_get_library(&library, reinterpret_cast<CUkernel>(kernel)), CUDA_SUCCESS) << k.name;
  EXPECT_EQ(kernel_get_name(&name, reinterpret_cast<CUkernel>(kernel)), CUDA_SUCCESS) << k.name;
  EXPECT_EQ(library_get_module(&module, library), CUDA_SUCCESS) << k.name;
  if (name == nullptr || module == nullptr) return false;
  unsigned count = 0;
  EXPECT_EQ(function_count(&count, module), CUDA_SUCCESS) << k.name;
  std::vector<CUfunction> functions(count);
  EXPECT_EQ(enumerate(functions.data(), count, module), CUDA_SUCCESS) << k.name;
  for (CUfunction f : functions) {
    const char* fname = nullptr;
    if (func_get_name(&fname, f) != CUDA_SUCCESS || fname == nullptr || std::string(fname) != name) continue;
    CUfunctionLoadingState state = CU_FUNCTION_LOADING_STATE_MAX;
    EXPECT_EQ(func_is_loaded(&state, f), CUDA_SUCCESS) << k.name;
    return state == CU_FUNCTION_LOADING_STATE_LOADED;
  }
  ADD_FAILURE() << k.name << " (" << name << ") is not among the " << count << " functions of its module";
  return false;
}

TEST(KernelLoading, BufferCreationLoadsEveryKernel) {
  const std::vector<detail::KernelRef> kernels = detail::all_kernels();
  ASSERT_GE(kernels.size(), 24u);  // tools/check_kernel_loading.py keeps the list complete
  TEST_CUDA_CHECK(cudaSetDevice(0));
  TEST_CUDA_CHECK(cudaFree(nullptr));  // the context
  const auto get_loading_mode = driver_function<PFN_cuModuleGetLoadingMode_v11070>("cuModuleGetLoadingMode", 11070);
  ASSERT_NE(get_loading_mode, nullptr);
  CUmoduleLoadingMode mode = CU_MODULE_LAZY_LOADING;
  ASSERT_EQ(get_loading_mode(&mode), CUDA_SUCCESS);
  int loaded_before = 0;
  for (const auto& k : kernels) loaded_before += is_loaded(k);
  if (mode == CU_MODULE_LAZY_LOADING) {
    // The layout tests before this one launched one kernel at most: most must still be unloaded, or the check
    // below would prove nothing.
    EXPECT_LT(loaded_before, static_cast<int>(kernels.size()) - 4) << "lazy loading, yet almost every kernel is loaded";
  }
  {
    const ncclUniqueId id = Group::make_unique_id();
    std::unique_ptr<Group> group = Group::create(id, 0, 1, 0);
    BufferOptions o;
    o.num_nvl_bytes = intranode_buffer_size_hint(1, 64, 2048, 2, 0, 8);
    Buffer buffer(*group, o);
  }
  for (const auto& k : kernels) EXPECT_TRUE(is_loaded(k)) << k.name << " is not loaded after Buffer creation";
  RecordProperty("module_loading", mode == CU_MODULE_LAZY_LOADING ? "lazy" : "eager");
  RecordProperty("kernels_loaded_before_buffer", loaded_before);
  std::printf("[kernel loading] %s module loading: %d of %zu library kernels loaded before the Buffer, all after it\n",
              mode == CU_MODULE_LAZY_LOADING ? "lazy" : "eager", loaded_before, kernels.size());
}

}  // namespace
}  // namespace openep::test
