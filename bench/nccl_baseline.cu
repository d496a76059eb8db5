#include "nccl_baseline.hpp"

#include <stdexcept>
#include <string>

#include "runtime/check.hpp"

namespace openep::bench {
namespace {

// One block per token: copy its row to every destination slot.
__global__ void pack_kernel(const int4* x, const int* pack_pos, int num_ranks, int row_int4, int4* send) {
  const int t = blockIdx.x;
  const int4* src = x + static_cast<int64_t>(t) * row_int4;
  for (int r = 0; r < num_ranks; ++r) {
    const int pos = pack_pos[t * num_ranks + r];
    if (pos < 0) continue;
    int4* dst = send + static_cast<int64_t>(pos) * row_int4;
    for (int i = threadIdx.x; i < row_int4; i += blockDim.x) dst[i] = src[i];
  }
}

__device__ __forceinline__ float bf16_bits_to_float(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
__device__ __forceinline__ uint16_t float_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// One block per token: out = bf16(sum over ranks ascending of the returned rows), fp32 accumulation.
__global__ void reduce_kernel(const uint16_t* stage, const int* pack_pos, int num_ranks, int hidden, uint16_t* out) {
  const int t = blockIdx.x;
  for (int h = threadIdx.x * 2; h < hidden; h += blockDim.x * 2) {
    float a0 = 0.f, a1 = 0.f;
    for (int r = 0; r < num_ranks; ++r) {
      const int pos = pack_pos[t * num_ranks + r];
      if (pos < 0) continue;
      const uint32_t v = *reinterpret_cast<const uint32_t*>(stage + static_cast<int64_t>(pos) * hidden + h);
      a0 += bf16_bits_to_float(static_cast<uint16_t>(v & 0xffffu));
      a1 += bf16_bits_to_float(static_cast<uint16_t>(v >> 16));
    }
    const uint32_t o = float_to_bf16_bits(a0) | (static_cast<uint32_t>(float_to_bf16_bits(a1)) << 16);
    *reinterpret_cast<uint32_t*>(out + static_cast<int64_t>(t) * hidden + h) = o;
  }
}

}  // namespace

NcclBaseline::NcclBaseline(ncclComm_t comm, int rank, int num_ranks, int num_tokens, int hidden,
                           const std::vector<int>& pack_pos, const std::vector<int>& send_counts, cudaStream_t stream)
    : comm_(comm), rank_(rank), num_ranks_(num_ranks), num_tokens_(num_tokens), hidden_(hidden), stream_(stream),
      send_counts_host_(send_counts), send_offsets_host_(num_ranks, 0), recv_counts_host_(num_ranks, 0),
      recv_offsets_host_(num_ranks, 0) {
  OPENEP_CHECK_ARG(hidden % 8 == 0, "NCCL baseline needs hidden % 8 == 0, got ", hidden);
  for (int r = 0; r < num_ranks; ++r) {
    send_offsets_host_[r] = num_send_;
    num_send_ += send_counts[r];
  }
  OPENEP_CUDA_CHECK(cudaMalloc(&pack_pos_, sizeof(int) * pack_pos.size() + 4));
  OPENEP_CUDA_CHECK(cudaMemcpy(pack_pos_, pack_pos.data(), sizeof(int) * pack_pos.size(), cudaMemcpyHostToDevice));
  OPENEP_CUDA_CHECK(cudaMalloc(&send_counts_dev_, sizeof(int) * num_ranks));
  OPENEP_CUDA_CHECK(cudaMemcpy(send_counts_dev_, send_counts.data(), sizeof(int) * num_ranks, cudaMemcpyHostToDevice));
  OPENEP_CUDA_CHECK(cudaMalloc(&recv_counts_dev_, sizeof(int) * num_ranks));
  OPENEP_CUDA_CHECK(cudaHostAlloc(&recv_counts_pinned_, sizeof(int) * num_ranks, cudaHostAllocDefault));
  const size_t row = sizeof(uint16_t) * hidden;
  OPENEP_CUDA_CHECK(cudaMalloc(&send_x_, row * (num_send_ + 1)));
  OPENEP_CUDA_CHECK(cudaMalloc(&recv_x_, row * (static_cast<size_t>(num_tokens) * num_ranks + 1)));
  OPENEP_CUDA_CHECK(cudaMalloc(&combined_x_, row * (num_tokens + 1)));
}

NcclBaseline::~NcclBaseline() {
  cudaFree(pack_pos_);
  cudaFree(send_counts_dev_);
  cudaFree(recv_counts_dev_);
  cudaFreeHost(recv_counts_pinned_);
  cudaFree(send_x_);
  cudaFree(recv_x_);
  cudaFree(combined_x_);
}

void NcclBaseline::dispatch(const uint16_t* x) {
  if (num_tokens_ > 0) {
    pack_kernel<<<num_tokens_, 256, 0, stream_>>>(reinterpret_cast<const int4*>(x), pack_pos_, num_ranks_,
                                                   hidden_ * 2 / 16, reinterpret_cast<int4*>(send_x_));
    OPENEP_CUDA_CHECK(cudaGetLastError());
  }
  // Count exchange, then the host learns the receive sizes (the synchronisation DeepEP also needs).
  OPENEP_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < num_ranks_; ++r) {
    OPENEP_NCCL_CHECK(ncclSend(send_counts_dev_ + r, 1, ncclInt32, r, comm_, stream_));
    OPENEP_NCCL_CHECK(ncclRecv(recv_counts_dev_ + r, 1, ncclInt32, r, comm_, stream_));
  }
  OPENEP_NCCL_CHECK(ncclGroupEnd());
  OPENEP_CUDA_CHECK(cudaMemcpyAsync(recv_counts_pinned_, recv_counts_dev_, sizeof(int) * num_ranks_,
                                    cudaMemcpyDeviceToHost, stream_));
  OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  num_recv_ = 0;
  for (int r = 0; r < num_ranks_; ++r) {
    recv_counts_host_[r] = recv_counts_pinned_[r];
    recv_offsets_host_[r] = num_recv_;
    num_recv_ += recv_counts_host_[r];
  }
  const size_t row = static_cast<size_t>(hidden_);
  OPENEP_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < num_ranks_; ++r) {
    if (send_counts_host_[r])
      OPENEP_NCCL_CHECK(ncclSend(send_x_ + send_offsets_host_[r] * row, send_counts_host_[r] * row, ncclBfloat16, r,
                                 comm_, stream_));
    if (recv_counts_host_[r])
      OPENEP_NCCL_CHECK(ncclRecv(recv_x_ + recv_offsets_host_[r] * row, recv_counts_host_[r] * row, ncclBfloat16, r,
                                 comm_, stream_));
  }
  OPENEP_NCCL_CHECK(ncclGroupEnd());
}

void NcclBaseline::combine(const uint16_t* y) {
  const size_t row = static_cast<size_t>(hidden_);
  OPENEP_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < num_ranks_; ++r) {
    if (recv_counts_host_[r])
      OPENEP_NCCL_CHECK(ncclSend(y + recv_offsets_host_[r] * row, recv_counts_host_[r] * row, ncclBfloat16, r, comm_,
                                 stream_));
    if (send_counts_host_[r])
      OPENEP_NCCL_CHECK(ncclRecv(send_x_ + send_offsets_host_[r] * row, send_counts_host_[r] * row, ncclBfloat16, r,
                                 comm_, stream_));
  }
  OPENEP_NCCL_CHECK(ncclGroupEnd());
  if (num_tokens_ > 0) {
    reduce_kernel<<<num_tokens_, 256, 0, stream_>>>(send_x_, pack_pos_, num_ranks_, hidden_, combined_x_);
    OPENEP_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace openep::bench
