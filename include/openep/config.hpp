// openep::Config: the performance knobs of the normal-mode kernels (DeepEP V1's Config).
#pragma once

#include <cstddef>
#include <cstdint>

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

// DeepEP V1's buffer sizes for config c (deepep-v1-interface.md 3.4), for code that sizes its Buffer the DeepEP
// way (hidden_bytes = hidden x max(element size, 2) in DeepEP's recipe, the max over the dispatch and combine
// configs). They do not depend on the batch: intranode normal mode runs exact-mode dispatch, cached dispatch and
// combine of any batch in a Buffer this large, in rounds through the window when the batch exceeds it
// (worst-case mode needs intranode_buffer_size_hint(), openep/intranode.hpp). RDMA: 0 when num_ranks <= 8.
// Throws kInvalidArgument unless hidden_bytes > 0 and num_ranks is in [1, 8] or a multiple of 8 (DeepEP's rule).
size_t deepep_nvl_buffer_size_hint(const Config& c, int64_t hidden_bytes, int num_ranks);
size_t deepep_rdma_buffer_size_hint(const Config& c, int64_t hidden_bytes, int num_ranks);

}  // namespace openep
