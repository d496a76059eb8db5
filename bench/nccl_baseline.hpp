// The NCCL baseline every OpenEP operation is compared with in the same run: the same routed workload
// through NCCL point-to-point.
//   dispatch: pack the routed rows per destination (one kernel), exchange counts (grouped send/recv),
//             wait on the host for the counts, grouped send/recv of the rows.
//   combine:  grouped send/recv of the rows back to their sources, then one kernel that sums each token's
//             returned rows in fp32 over ranks in ascending order (the reference order) and writes BF16.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <vector>

namespace openep::bench {

class NcclBaseline {
 public:
  // pack_pos: [num_tokens][num_ranks] row index in the send buffer (grouped by destination, tokens
  // ascending), -1 if the token does not go there. send_counts: [num_ranks].
  NcclBaseline(ncclComm_t comm, int rank, int num_ranks, int num_tokens, int hidden, const std::vector<int>& pack_pos,
               const std::vector<int>& send_counts, cudaStream_t stream);
  ~NcclBaseline();

  // x: [num_tokens][hidden] BF16 (device). Result rows in recv_x() (source rank ascending, token ascending).
  void dispatch(const uint16_t* x);
  // y: [num_recv][hidden] BF16 rows in the receive order of dispatch(). Result in combined_x().
  void combine(const uint16_t* y);

  int num_recv() const { return num_recv_; }
  int num_recv_from(int r) const { return recv_counts_host_[r]; }
  uint16_t* recv_x() const { return recv_x_; }
  uint16_t* combined_x() const { return combined_x_; }

 private:
  ncclComm_t comm_;
  int rank_, num_ranks_, num_tokens_, hidden_;
  cudaStream_t stream_;
  std::vector<int> send_counts_host_, send_offsets_host_;
  int* recv_counts_pinned_ = nullptr;
  std::vector<int> recv_counts_host_, recv_offsets_host_;
  int num_send_ = 0, num_recv_ = 0;
  int* pack_pos_ = nullptr;        // device [num_tokens][num_ranks]
  int* send_counts_dev_ = nullptr;
  int* recv_counts_dev_ = nullptr;
  uint16_t* send_x_ = nullptr;     // [num_send][hidden], also the combine staging buffer
  uint16_t* recv_x_ = nullptr;     // [worst case][hidden]
  uint16_t* combined_x_ = nullptr; // [num_tokens][hidden]
};

}  // namespace openep::bench
