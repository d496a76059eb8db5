// Fixed costs behind the low-latency kernels (one process, GPUs 0 and 1, peer access): what a kernel of the
// LL shape costs before it moves any data. Event-timed on GPU 0, median of --reps, printed as a table.
//   openep_fixed_cost [--reps 200]
// Cases:
//   empty 1x32 / 132x1024 (plain launch) / 132x1024 cooperative: launch + block scheduling;
//   ticket sys / gpu: every block's thread 0 does one acq_rel atomic on one counter (device::last_block);
//   fence sys: every block's thread 0 does fence.acq_rel.sys;
//   remote flag: 1 block stores 288 ints into GPU 1 then st.release.sys a flag there (the send tail);
//   ping-pong: one-block kernels on both GPUs bounce a flag 1000 times; per round trip.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "device/ptx.cuh"
#include "device/ticket.cuh"
#include "runtime/check.hpp"

namespace {

__global__ void empty_kernel() {}

__global__ void ticket_kernel(uint32_t* ticket, bool sys) {
  if (sys) {
    if (openep::device::last_block<true>(ticket) && threadIdx.x == 0) ticket[1] += 1;
  } else {
    if (openep::device::last_block<false>(ticket) && threadIdx.x == 0) ticket[1] += 1;
  }
}

__global__ void fence_kernel() {
  __syncthreads();
  if (threadIdx.x == 0) openep::ptx::fence_acq_rel_sys();
}

// The LL send tail: counts for 288 experts into the peer, then one release flag.
__global__ void remote_flag_kernel(int* peer_counts, uint64_t* peer_flag, uint64_t epoch) {
  for (int i = threadIdx.x; i < 288; i += blockDim.x) peer_counts[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) openep::ptx::st_release_sys(peer_flag, epoch);
}

// Ping-pong: `first` starts; each side waits for round r on its own flag, then posts r to the other side.
__global__ void pingpong_kernel(uint64_t* my_flag, uint64_t* peer_flag, int rounds, bool first, uint64_t base) {
  if (threadIdx.x != 0) return;
  for (int r = 1; r <= rounds; ++r) {
    if (first) {
      openep::ptx::st_release_sys(peer_flag, base + r);
      while (openep::ptx::ld_acquire_sys(my_flag) < base + r) {
      }
    } else {
      while (openep::ptx::ld_acquire_sys(my_flag) < base + r) {
      }
      openep::ptx::st_release_sys(peer_flag, base + r);
    }
  }
}

double median_us(cudaStream_t s, int reps, const std::function<void()>& fn) {
  for (int i = 0; i < 10; ++i) fn();
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<cudaEvent_t> ev(2 * reps);
  for (auto& e : ev) OPENEP_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    OPENEP_CUDA_CHECK(cudaEventRecord(ev[2 * i], s));
    fn();
    OPENEP_CUDA_CHECK(cudaEventRecord(ev[2 * i + 1], s));
  }
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<double> us(reps);
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    OPENEP_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]));
    us[i] = ms * 1e3;
  }
  for (auto& e : ev) OPENEP_CUDA_CHECK(cudaEventDestroy(e));
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 200;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = std::atoi(argv[++i]);
  }
  int n = 0;
  OPENEP_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("openep_fixed_cost: needs 2 GPUs\n");
    return 77;
  }
  cudaDeviceProp prop{};
  OPENEP_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  OPENEP_CUDA_CHECK(cudaSetDevice(1));
  OPENEP_CUDA_CHECK(cudaDeviceEnablePeerAccess(0, 0));
  uint64_t* flag1 = nullptr;
  int* counts1 = nullptr;
  OPENEP_CUDA_CHECK(cudaMalloc(&flag1, 64));
  OPENEP_CUDA_CHECK(cudaMalloc(&counts1, 288 * sizeof(int)));
  OPENEP_CUDA_CHECK(cudaMemset(flag1, 0, 64));
  cudaStream_t s1;
  OPENEP_CUDA_CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
  OPENEP_CUDA_CHECK(cudaSetDevice(0));
  OPENEP_CUDA_CHECK(cudaDeviceEnablePeerAccess(1, 0));
  uint64_t* flag0 = nullptr;
  uint32_t* ticket = nullptr;
  OPENEP_CUDA_CHECK(cudaMalloc(&flag0, 64));
  OPENEP_CUDA_CHECK(cudaMalloc(&ticket, 64));
  OPENEP_CUDA_CHECK(cudaMemset(flag0, 0, 64));
  OPENEP_CUDA_CHECK(cudaMemset(ticket, 0, 64));
  cudaStream_t s0;
  OPENEP_CUDA_CHECK(cudaStreamCreateWithFlags(&s0, cudaStreamNonBlocking));

  auto coop = [&](void (*kernel)(), int blocks, int threads) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(threads);
    cfg.stream = s0;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeCooperative;
    attr.val.cooperative = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    OPENEP_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel));
  };
  std::printf("%-44s %10s\n", "case (GPU 0, event-timed median)", "us");
  auto row = [](const std::string& name, double us) { std::printf("%-44s %10.2f\n", name.c_str(), us); };
  row("empty 1x32", median_us(s0, reps, [&] { empty_kernel<<<1, 32, 0, s0>>>(); }));
  row("empty " + std::to_string(sms) + "x1024",
      median_us(s0, reps, [&] { empty_kernel<<<sms, 1024, 0, s0>>>(); }));
  row("empty " + std::to_string(sms) + "x1024 cooperative", median_us(s0, reps, [&] { coop(empty_kernel, sms, 1024); }));
  row("ticket sys " + std::to_string(sms) + "x1024",
      median_us(s0, reps, [&] { ticket_kernel<<<sms, 1024, 0, s0>>>(ticket, true); }));
  row("ticket gpu " + std::to_string(sms) + "x1024",
      median_us(s0, reps, [&] { ticket_kernel<<<sms, 1024, 0, s0>>>(ticket, false); }));
  row("fence.acq_rel.sys per block " + std::to_string(sms) + "x1024",
      median_us(s0, reps, [&] { fence_kernel<<<sms, 1024, 0, s0>>>(); }));
  uint64_t epoch = 0;
  row("remote counts + release flag 1x1024",
      median_us(s0, reps, [&] { remote_flag_kernel<<<1, 1024, 0, s0>>>(counts1, flag1 + 1, ++epoch); }));
  // Ping-pong: GPU 1 answers, GPU 0 starts; both kernels run concurrently (different GPUs).
  const int rounds = 1000;
  OPENEP_CUDA_CHECK(cudaMemset(flag0, 0, 64));
  OPENEP_CUDA_CHECK(cudaSetDevice(1));
  OPENEP_CUDA_CHECK(cudaMemset(flag1, 0, 64));
  OPENEP_CUDA_CHECK(cudaDeviceSynchronize());
  pingpong_kernel<<<1, 32, 0, s1>>>(flag1, flag0, rounds, false, 0);
  OPENEP_CUDA_CHECK(cudaGetLastError());
  OPENEP_CUDA_CHECK(cudaSetDevice(0));
  cudaEvent_t a, b;
  OPENEP_CUDA_CHECK(cudaEventCreate(&a));
  OPENEP_CUDA_CHECK(cudaEventCreate(&b));
  OPENEP_CUDA_CHECK(cudaEventRecord(a, s0));
  pingpong_kernel<<<1, 32, 0, s0>>>(flag0, flag1, rounds, true, 0);
  OPENEP_CUDA_CHECK(cudaEventRecord(b, s0));
  OPENEP_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  OPENEP_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  row("NVLink flag round trip (ping-pong, per round)", ms * 1e3 / rounds);
  OPENEP_CUDA_CHECK(cudaSetDevice(1));
  OPENEP_CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
}
