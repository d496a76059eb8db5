// Internode normal mode on virtual ranks with emulated nodes (openep/testing.hpp): the production kernels, the
// node windows over NVLink-style peer pointers and the rail leg as device copies between the rail peers. Every
// case is checked bitwise against the CPU reference (ref::dispatch, ref::combine_internode). Registered as
// InternodeVrank.<Name>/<case>/N<nodes>xM<ranks per node>. With one process per GPU (mgpu) the world is one node,
// so these tests skip there; fake NCCL nodes run the same checks over NCCL (fakenode/fake_node_test.cu).
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "common/ranks.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "ranks/internode_check.hpp"

namespace openep::test {
namespace {

using internode::Case;
using internode::Route;

bool multi_node_world() { return world_group().num_nvlink_ranks() < world_group().num_ranks(); }

}  // namespace

// 2 and 4 nodes of 1 rank (like fake nodes on one GPU), 2 x 2, 4 x 2, 2 x 4 and 8 x 2.
OPENEP_RANKS_CASES_NODES(Internode, MatchesReference, Case, internode::cases, 201, 401, 202, 402, 204, 802) {
  if (!multi_node_world()) GTEST_SKIP() << "one node: internode mode needs emulated or fake nodes";
  Group& g = world_group();
  const int R = g.num_ranks(), M = g.num_nvlink_ranks();
  const Case cw = internode::for_world(c, R);
  Buffer buffer(g, internode::options_for(cw, R, M));
  const auto world = once_per_world<internode::World>([&] { return internode::make_world(cw, R, M, internode::seed_of(cw)); });
  internode::run_case(buffer, cw, *world);
}

// One Buffer, several shapes back to back (the epochs and the fixed halves keep them apart), then two dispatches
// in flight before their combines (handles of different operations on one Buffer).
OPENEP_RANKS_TEST_NODES(Internode, BackToBackShapesAndTwoHandlesInFlight, 202, 402) {
  if (!multi_node_world()) GTEST_SKIP() << "one node";
  Group& g = world_group();
  const int R = g.num_ranks(), M = g.num_nvlink_ranks(), me = g.rank();
  const std::vector<Case> list = {{33, 2048, 8, 8, false, true, Route::kUniform},
                                  {200, 4096, 4, 8, true, true, Route::kGroupLimited},
                                  {1, 2048, 1, 8, false, true, Route::kEmptyNode, true},
                                  {130, 2048, 9, 8, false, false, Route::kOneNodeGetsAll}};
  BufferOptions o = internode::options_for({200, 4096, 9, 8, false, true, Route::kUniform}, R, M);
  Buffer buffer(g, o);
  for (int rep = 0; rep < 2; ++rep)
    for (const Case& c : list) {
      const auto world =
          once_per_world<internode::World>([&] { return internode::make_world(c, R, M, internode::seed_of(c) + rep); });
      internode::run_case(buffer, c, *world);
      if (::testing::Test::HasFailure()) return;
    }
  // Two dispatches, then both combines (in that order) on one Buffer.
  const Case c{96, 2048, 8, 8, false, true, Route::kUniform};
  std::vector<std::shared_ptr<const internode::World>> worlds;
  for (int mb = 0; mb < 2; ++mb)
    worlds.push_back(once_per_world<internode::World>([&] { return internode::make_world(c, R, M, 500 + mb); }));
  const intranode::Case ic = internode::as_intranode(c);
  internode::Runner r0(buffer, c, worlds[0]->inputs[me], ic), r1(buffer, c, worlds[1]->inputs[me], ic);
  internode::Dispatched d0, d1;
  r0.dispatch(d0, 0);
  r1.dispatch(d1, 0);
  internode::check_dispatch(c, *worlds[0], me, r0, d0, worlds[0]->expect[me], false, 0);
  internode::check_dispatch(c, *worlds[1], me, r1, d1, worlds[1]->expect[me], false, 0);
  for (int mb = 0; mb < 2; ++mb) {
    const internode::World& w = *worlds[mb];
    internode::Dispatched& d = mb == 0 ? d0 : d1;
    DeviceArray<uint16_t> y(w.cin[me].x), out(static_cast<size_t>(c.num_tokens) * c.hidden);
    DeviceArray<float> wts(w.cin[me].topk_weights), wout(static_cast<size_t>(c.num_tokens) * c.num_topk);
    out.poison(), wout.poison();
    CombineArgs ca;
    ca.x = y.get(), ca.hidden = c.hidden, ca.topk_weights = wts.get(), ca.num_topk = c.num_topk;
    CombineOutputs co;
    co.combined_x = out.get(), co.combined_topk_weights = wout.get();
    buffer.internode_combine(ca, d.handle, co, buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    EXPECT_EQ(out.download(), w.cexp[me].x) << "micro-batch " << mb;
    EXPECT_EQ(wout.download(), w.cexp[me].topk_weights) << "micro-batch " << mb;
  }
}

// Wrong calls on an internode Buffer fail before launching anything, naming what to change.
OPENEP_RANKS_TEST_NODES(Internode, ErrorsNameTheArgument, 202) {
  if (!multi_node_world()) GTEST_SKIP() << "one node";
  Group& g = world_group();
  const int R = g.num_ranks(), M = g.num_nvlink_ranks();
  const Case c{16, 2048, 8, 8, false, true, Route::kUniform};
  Buffer buffer(g, internode::options_for(c, R, M));
  EXPECT_TRUE(buffer.is_internode());
  EXPECT_EQ(buffer.num_nodes(), R / M);
  const auto world = once_per_world<internode::World>([&] { return internode::make_world(c, R, M, 3); });
  const intranode::Case ic = internode::as_intranode(c);
  internode::Runner run(buffer, c, world->inputs[g.rank()], ic);
  const auto expect = [](const std::function<void()>& f, ErrorCode code, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "expected an openep::Error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  LayoutArgs la;
  la.topk_idx = run.base.topk64.get(), la.num_tokens = c.num_tokens, la.num_topk = c.num_topk;
  la.num_experts = c.experts_per_rank * R;
  la.num_tokens_per_rank = run.base.per_rank.get(), la.num_tokens_per_expert = run.base.per_expert.get();
  la.is_token_in_rank = run.base.in_rank.get();
  expect([&] { buffer.get_dispatch_layout(la, buffer.comm_stream()); }, ErrorCode::kInvalidArgument,
         "num_tokens_per_rdma_rank output is required on an internode Buffer");
  IntranodeHandle ih;
  expect([&] { buffer.dispatch_prepare(run.base.args(false), ih, buffer.comm_stream()); }, ErrorCode::kUnsupported,
         "normal-mode (intranode) operations need every rank in one NVLink domain");
  InternodeHandle h;
  DispatchArgs a = run.args(false);
  a.num_tokens_per_rdma_rank = nullptr;
  expect([&] { buffer.internode_dispatch_prepare(a, h, buffer.comm_stream()); }, ErrorCode::kInvalidArgument,
         "num_tokens_per_rdma_rank");
  a = run.args(false);
  a.num_worst_tokens = 8;
  a.max_tokens_per_rank = 4;  // fewer than num_tokens
  expect([&] { buffer.internode_dispatch_prepare(a, h, buffer.comm_stream()); }, ErrorCode::kInvalidArgument,
         "exceeds max_tokens_per_rank");
  // The Buffer is still usable: a correct operation afterwards matches the reference.
  internode::run_case(buffer, c, *world);
}

}  // namespace openep::test
