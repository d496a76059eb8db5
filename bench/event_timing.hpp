// Event timing shared by the benchmarks: the median of `reps` event-timed runs of fn on `stream`, after `warmup`
// runs. `sync` waits for the stream (a Buffer's synchronize, which also raises device errors, or a plain stream
// synchronisation).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "runtime/check.hpp"

namespace openep::bench {

inline double median_event_us(cudaStream_t stream, int warmup, int reps, const std::function<void()>& fn,
                              const std::function<void()>& sync) {
  for (int i = 0; i < warmup; ++i) fn();
  sync();
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) OPENEP_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    OPENEP_CUDA_CHECK(cudaEventRecord(ev[2 * i], stream));
    fn();
    OPENEP_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], stream));
  }
  sync();
  std::vector<double> us(reps);
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    OPENEP_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    us[i] = ms * 1e3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace openep::bench
