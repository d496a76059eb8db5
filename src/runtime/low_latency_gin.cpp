// Host side of the network (GIN) low-latency path. Run only under the loopback GIN test plugin (fake nodes on one
// H200: tests/gin_loopback/README.md); never on a real network (no RDMA NICs on the test machines).
#include "runtime/low_latency_gin.hpp"

#include <nccl_device.h>

#include "kernels/low_latency_gin_launch.hpp"
#include "runtime/check.hpp"
#include "protocol/low_latency_gin_layout.hpp"
#include "runtime/transport.hpp"

namespace openep::detail {
namespace {

GinWindow gin_window(const Buffer::Impl& m, int T, int hidden) {
  GinWindow g{};
  g.dev_comm = m.win.dev_comm;
  g.window = m.win.nccl_window;
  g.region_offset = m.window_layout.rdma_offset;
  g.staging_offset = m.gin_staging_offset;
  g.staging = LowLatencyGinLayout::make(T, hidden, m.num_ranks);
  // Holds whenever the shapes fit num_rdma_bytes (checked before): staging <= one dispatch half.
  const size_t area = LowLatencyGinLayout::area_bytes(m.options.num_rdma_bytes);
  OPENEP_CHECK(g.staging.used <= area, ErrorCode::kInternal, "GIN staging of T = ", T, ", hidden = ", hidden,
               " needs ", g.staging.used, " bytes, the area has ", area);
  return g;
}

GinSignalWaitParams signal_wait_params(const Buffer::Impl& m, int kind, int64_t* wait_stats) {
  GinSignalWaitParams w{};
  w.dev_comm = m.win.dev_comm;
  w.state = m.ll_state;
  w.kind = kind;
  w.rank = m.rank;
  w.num_ranks = m.num_ranks;
  w.wait_stats = wait_stats;
  w.wait = m.wait_context();
  return w;
}

// Runs `receive` now, or (hook mode) returns it as the hook, which first checks that the Buffer is usable.
template <typename Receive>
LowLatencyHook receive_now_or_as_hook(Buffer::Impl& m, bool hook, Receive receive) {
  if (!hook) {
    receive();
    return {};
  }
  Buffer::Impl* mp = &m;
  return [mp, receive]() {
    mp->check_usable();
    receive();
  };
}

}  // namespace

LowLatencyHook low_latency_dispatch_gin(Buffer::Impl& m, LowLatencyDispatchParams p, bool return_recv_hook,
                                        cudaStream_t stream) {
  LowLatencyGinDispatchParams send{};
  send.base = p;
  send.base.do_send = true;
  send.base.do_recv = false;
  send.gin = gin_window(m, p.T, p.hidden);
  launch_low_latency_gin_dispatch_send(send, low_latency_gin_dispatch_blocks(send, m.grids.max_blocks), stream);

  p.do_send = false;  // the NVLink receive kernel, unchanged: by the time it runs every flag has landed
  p.do_recv = true;
  const GinSignalWaitParams wait = signal_wait_params(m, 0, p.wait_stats);
  const Buffer::Impl* mp = &m;
  auto receive = [mp, p, wait, stream]() {
    launch_gin_signal_wait(wait, stream);
    launch_low_latency_dispatch(p, low_latency_dispatch_blocks(p, mp->grids.max_blocks), mp->grids, stream);
  };
  return receive_now_or_as_hook(m, return_recv_hook, receive);
}

LowLatencyHook low_latency_combine_gin(Buffer::Impl& m, LowLatencyCombineParams p, bool zero_copy,
                                       bool return_recv_hook, cudaStream_t stream) {
  LowLatencyGinCombineParams send{};
  send.base = p;
  send.base.do_send = true;
  send.base.do_recv = false;
  send.gin = gin_window(m, p.T, p.hidden);
  send.stage_x = !zero_copy;
  launch_low_latency_gin_combine_send(send, low_latency_gin_combine_blocks(send, m.grids.max_blocks), stream);

  p.do_send = false;
  p.do_recv = true;
  const GinSignalWaitParams wait = signal_wait_params(m, 1, p.wait_stats);
  const Buffer::Impl* mp = &m;
  auto receive = [mp, p, wait, stream]() {
    launch_gin_signal_wait(wait, stream);
    launch_low_latency_combine(p, low_latency_combine_blocks(p, mp->grids.max_blocks), mp->grids, stream);
  };
  return receive_now_or_as_hook(m, return_recv_hook, receive);
}

void gin_barrier(Buffer::Impl& m, cudaStream_t stream) {
  GinBarrierParams p{};
  p.dev_comm = m.win.dev_comm;
  p.epoch = &m.local_state->barrier_epoch[kHostBarrierSlot];
  p.rank = m.rank;
  p.num_ranks = m.num_ranks;
  p.wait = m.wait_context();
  launch_gin_barrier(p, stream);
}

}  // namespace openep::detail
