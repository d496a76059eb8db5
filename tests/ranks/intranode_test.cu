// Intranode dispatch and combine on several ranks (one process per GPU, or virtual ranks on one GPU;
// common/ranks.hpp) against the CPU reference. The inputs of every rank come from seeds and the reference is
// built once per world (once_per_world), so it needs no communication. Outputs are poisoned before each run.
// Every shape is its own named test (IntranodeMgpu.MatchesReference/<case>, IntranodeVrank.MatchesReference/
// <case>/EP<N>).
#include "ranks/intranode_check.hpp"

namespace openep::test {
using namespace intranode;

OPENEP_RANKS_CASES(Intranode, MatchesReference, Case, shape_cases, 2, 4, 8) {
  const Case w = for_world(c, world_group().num_ranks());
  Buffer buffer(world_group(), options_for(w, world_group().num_ranks()));
  run_case(buffer, w, seed_of(c));
}

OPENEP_RANKS_TEST(Intranode, ThousandBackToBackCallsWithChangingShapes) {
  const int R = world_group().num_ranks();
  Buffer buffer(world_group(), options_for(Case{97, 2048, 8, 8, false, true, Route::kUniform}, R));
  std::mt19937 rng(77);  // same sequence of shapes on every rank
  const int hiddens[] = {256, 512, 1024, 2048};
  for (int i = 0; i < 1000; ++i) {
    Case c{static_cast<int>(rng() % 97), hiddens[rng() % 4], 1 + static_cast<int>(rng() % 8), 8,
           false, (rng() % 2) == 0, Route::kUniform};
    c.num_sms = 2 * (1 + static_cast<int>(rng() % 8));
    struct Ref {
      std::vector<ref::RankInput> inputs;
      std::vector<ref::RankRecv> expect;
    };
    const auto world = once_per_world<Ref>([&] {
      Ref r;
      r.inputs = make_inputs(c, R, 5000 + i);
      r.expect = ref::dispatch(r.inputs, normal_config(c, R));
      return r;
    });
    Runner run(buffer, c, world->inputs[buffer.rank()]);
    Dispatched d;
    run.dispatch(d, 0);
    check_dispatch(c, run, d, world->expect[buffer.rank()], false, 0);
    ASSERT_FALSE(::testing::Test::HasFailure()) << "iteration " << i << ": " << name(c);
  }
}

OPENEP_RANKS_TEST(Intranode, MissingPeerGivesTimeoutErrorNotHang) {
  const double timeout_s = 2.0;
  const int R = world_group().num_ranks();
  const Case c{64, 1024, 2, 8, false, true, Route::kUniform};
  {
    Buffer buffer(world_group(), options_for(c, R, timeout_s));
    if (buffer.rank() == 0) {
      const auto inputs = make_inputs(c, R, 9);
      Runner run(buffer, c, inputs[0]);
      Dispatched d;
      const auto start = std::chrono::steady_clock::now();
      try {
        run.dispatch(d, 0);
        ADD_FAILURE() << "dispatch without peers returned";
      } catch (const Error& e) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
        EXPECT_NE(std::string(e.what()).find("peer"), std::string::npos) << e.what();
        EXPECT_LT(s, timeout_s + 8.0);
      }
    }
    host_barrier();  // the other ranks wait here until rank 0 has seen its error
  }
}

}  // namespace openep::test
