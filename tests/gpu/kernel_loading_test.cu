// Buffer creation loads every kernel of the library (src/kernels/load.hpp), so that no first launch under CUDA's
// lazy loading can wait for a spinning kernel. Checked with the driver's own view (cuFuncIsLoaded) in this process,
// which runs with the default module loading (lazy unless CUDA_MODULE_LOADING says otherwise).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

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

bool is_loaded(const detail::KernelRef& k) {
  static const auto func_is_loaded = driver_function<PFN_cuFuncIsLoaded_v12040>("cuFuncIsLoaded", 12040);
  if (func_is_loaded == nullptr) return false;
  cudaFunction_t f = nullptr;
  EXPECT_EQ(cudaGetFuncBySymbol(&f, k.fn), cudaSuccess) << k.name;
  CUfunctionLoadingState state = CU_FUNCTION_LOADING_STATE_MAX;
  EXPECT_EQ(func_is_loaded(&state, reinterpret_cast<CUfunction>(f)), CUDA_SUCCESS) << k.name;
  return state == CU_FUNCTION_LOADING_STATE_LOADED;
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
}

}  // namespace
}  // namespace openep::test
