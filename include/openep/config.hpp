// openep::Config: the performance knobs of the normal-mode kernels (DeepEP V1's Config).
#pragma once

namespace openep {

struct Config {
  // SMs (thread blocks) the normal-mode kernels use. Must be even (DeepEP compatibility).
  int num_sms = 20;
  // DeepEP V1 chunk parameters. They are accepted and validated for compatibility; OpenEP's kernels write
  // each token straight to its final slot and need no rings, so they do not change OpenEP's behaviour.
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 256;
  // Internode normal mode only: the network leg of dispatch and combine is cut into this many chunks per rail
  // peer, so that the NVLink forward (dispatch) and the node reduce (combine) of one chunk overlap the network
  // transfer of the next. In [1, 16]; MUST be the same on every rank of the Group (the chunks are collective
  // transfers). More chunks mean more, smaller network transfers; 1 turns the overlap off.
  int num_internode_chunks = 4;

  // Validates and normalises like DeepEP V1 (rounds rdma_recv up to a multiple of rdma_send). Throws
  // openep::Error(kInvalidArgument) naming the bad field.
  void validate_and_normalize();
};

// The process-wide default SM count used by the default configs (DeepEP's Buffer.num_sms, default 20).
int default_num_sms() noexcept;
// REQUIRES: even, > 0.
void set_default_num_sms(int num_sms);

// DeepEP V1's recommended configs per EP size (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160), using
// default_num_sms(). Other sizes throw kInvalidArgument.
Config get_dispatch_config(int num_ranks);
Config get_combine_config(int num_ranks);

}  // namespace openep
