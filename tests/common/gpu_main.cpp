// main() of the single-GPU test binary: without a GPU it reports every test as skipped (exit code 77,
// which CTest shows as "Skipped"), never as passed.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdio>

#include "common/crash_handler.hpp"

int main(int argc, char** argv) {
  openep::test::install_crash_handler();
  int num_devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&num_devices);
  if (err != cudaSuccess || num_devices == 0) {
    std::printf("openep_gpu_tests: skipped (no GPU: %s)\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount returned 0");
    return 77;
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
