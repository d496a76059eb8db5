// The grid budget a Buffer's kernels launch under (host side of the launchers).
#pragma once

namespace openep::detail {

// How large a grid one kernel of a rank may use, and how many ranks' grids share one GPU. The fabric
// decides it (runtime/fabric.hpp): every SM of the device for one process per GPU; a share of the GPU for
// virtual ranks, whose kernels must all be resident at once (openep/testing.hpp).
struct GridBudget {
  int device_sms = 0;         // SMs of the device
  int max_blocks = 0;         // largest grid of one kernel of this rank (normal-mode num_sms, low-latency blocks)
  int grids_per_device = 1;   // ranks whose kernels run on this GPU at the same time (1, or N virtual ranks)
  bool clamp = false;         // true: a larger requested grid is reduced to max_blocks; false: it is an error
};

}  // namespace openep::detail
