// Low-latency dispatch and combine on several ranks (one process per GPU, or virtual ranks on one GPU, EP2 to
// EP16; common/ranks.hpp) against the CPU reference. Inputs come from seeds and the reference is built once
// per world (once_per_world), so it needs no communication. Outputs are poisoned before each run. Every case
// is its own named test (LowLatencyVrank.MatchesReference/<case>/EP<N>, ...).
// Dispatch is compared bit for bit (the FP8 cast included); rows inside one (expert, source) range arrive in
// any order and are compared canonically (sorted by source token). Combine is compared bit for bit (LogFMT
// combine: with the reference's LogFMT combine, plus its error bound against the BF16 reference).
#include <functional>
#include <string>
#include <vector>

#include "openep/error.hpp"
#include "ranks/low_latency_check.hpp"

namespace openep::test {
using namespace low_latency;

// The case as one world runs it. The receive layout is [E_local][R * T][hidden], so the reference of a world
// (built on one host, for every rank) holds E * R * T * hidden elements per packed array: at EP16 uncapped
// cases need tens of GB of host memory. So at EP8 and above experts per rank are capped so that the world has
// at most 288 experts (DeepSeek's count: 36 per rank at EP8, 18 at EP16; still more local experts than a
// virtual rank has blocks), and T (with the token count, proportionally) is halved, down to 16, until
// E * R * T * hidden * 2 bytes is at most ~2 GiB.
LLCase for_world(LLCase c, int R) {
  if (R >= 8 && c.experts_per_rank > 288 / R) c.experts_per_rank = 288 / R;
  const auto bytes = [&] { return 2.0 * c.experts_per_rank * R * R * c.T * c.hidden; };
  while (bytes() > 2.2e9 && c.T > 16) {
    c.T /= 2;
    c.num_tokens = (c.num_tokens + 1) / 2;
  }
  return c;
}

OPENEP_RANKS_CASES(LowLatency, MatchesReference, LLCase, named_cases, 2, 4, 8, 16) {
  const LLCase w = for_world(c, world_group().num_ranks());
  Buffer buffer(world_group(), ll_options(buffer_bytes(w, world_group().num_ranks())));
  run_case(buffer, w, seed_of(c), /*hook=*/false, /*zero_copy=*/false);
}

// Hook mode, with the zero-copy combine input on every other case.
OPENEP_RANKS_CASES(LowLatency, HookModeAndZeroCopy, LLCase, named_cases, 2, 4, 8, 16) {
  const LLCase w = for_world(c, world_group().num_ranks());
  Buffer buffer(world_group(), ll_options(buffer_bytes(w, world_group().num_ranks())));
  run_case(buffer, w, seed_of(c) + 90, /*hook=*/true, /*zero_copy=*/(seed_of(c) % 2) == 0);
}

// LogFMT combine (use_logfmt): bitwise equal to the reference's LogFMT combine and within the format's error bound
// of its BF16 combine (run_case), on expert values that exercise every rule of the format (logfmt_expert_value).
// The fused kernel with the caller's x ...
OPENEP_RANKS_CASES(LowLatency, LogfmtMatchesReference, LLCase, logfmt_named_cases, 2, 4, 8) {
  const LLCase w = for_world(c, world_group().num_ranks());
  Buffer buffer(world_group(), ll_options(buffer_bytes(w, world_group().num_ranks())));
  run_case(buffer, w, seed_of(c) + 700, /*hook=*/false, /*zero_copy=*/false, /*logfmt=*/true);
}

// ... and hook mode (separate send and receive kernels) encoding from the zero-copy buffer.
OPENEP_RANKS_CASES(LowLatency, LogfmtHookModeAndZeroCopy, LLCase, logfmt_named_cases, 2, 4, 8) {
  const LLCase w = for_world(c, world_group().num_ranks());
  Buffer buffer(world_group(), ll_options(buffer_bytes(w, world_group().num_ranks())));
  run_case(buffer, w, seed_of(c) + 790, /*hook=*/true, /*zero_copy=*/true, /*logfmt=*/true);
}

// One Buffer, small cases back to back, LogFMT and BF16 combines alternating with every hook / zero-copy
// combination (the combine rows and the metadata region are reused across formats and shapes).
OPENEP_RANKS_TEST_EP(LowLatency, LogfmtAndBf16CombinesBackToBackOnOneBuffer, 2, 4, 8) {
  const int R = world_group().num_ranks();
  std::vector<LLCase> small;
  for (const auto& [n, c] : logfmt_named_cases())
    if (static_cast<size_t>(c.hidden) * c.T <= 4096u * 128u) small.push_back(for_world(c, R));
  size_t bytes = 0;
  for (const LLCase& c : small) bytes = std::max(bytes, buffer_bytes(c, R));
  Buffer buffer(world_group(), ll_options(bytes));
  int i = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (const LLCase& c : small) {
      const bool logfmt = (i + pass) % 2 == 0;
      run_case(buffer, c, seed_of(c) + 870 + pass, /*hook=*/(i / 2) % 2 == 1, /*zero_copy=*/(i / 4) % 2 == 1, logfmt);
      ++i;
      if (::testing::Test::HasFailure()) return;
    }
  }
}

// One Buffer, the small cases back to back with hook / zero-copy alternating (shapes change between calls on
// the same window: epochs and halves must keep them apart).
OPENEP_RANKS_TEST_EP(LowLatency, CasesBackToBackOnOneBuffer, 2, 4, 8, 16) {
  const int R = world_group().num_ranks();
  std::vector<LLCase> small;
  for (const LLCase& c : cases())
    if (static_cast<size_t>(c.hidden) * c.T <= 4096u * 128u) small.push_back(for_world(c, R));
  size_t bytes = 0;
  for (const LLCase& c : small) bytes = std::max(bytes, buffer_bytes(c, R));
  Buffer buffer(world_group(), ll_options(bytes));
  int i = 0;
  for (const LLCase& c : small) {
    run_case(buffer, c, seed_of(c) + 390, /*hook=*/(i % 2) == 1, /*zero_copy=*/(i % 3) == 0);
    ++i;
    if (::testing::Test::HasFailure()) break;
  }
}

// Shrink mode: the last rank stops taking part after the first round (its thread and its Buffer stay, like a
// process that hangs). Every survivor's first receive that waits for it times out and masks it instead of failing;
// from then on the survivors carry on without it (fused, hook, zero-copy and LogFMT rounds), bitwise equal to the
// reference with that rank masked, and no error is raised. The mask then names exactly that rank.
OPENEP_RANKS_TEST_EP(LowLatency, ShrinkMasksARankThatStopsAndTheOthersCarryOn, 2, 4, 8) {
  const int R = world_group().num_ranks(), me = world_group().rank(), gone = R - 1;
  const LLCase c{64, 128, 2048, 8, 8, false, false, false, Route::kUniform};
  BufferOptions o = ll_options(buffer_bytes(c, R), 2.0);
  o.enable_shrink = true;
  Buffer buffer(world_group(), o);
  run_case(buffer, c, 700, /*hook=*/false, /*zero_copy=*/false);  // everyone
  if (me != gone && !::testing::Test::HasFailure()) {
    for (int round = 0; round < 4; ++round) {
      run_case(buffer, c, 701 + round, /*hook=*/round % 2 == 1, /*zero_copy=*/round == 2, /*logfmt=*/round == 3, {gone});
      if (::testing::Test::HasFailure()) break;
    }
    DeviceArray<int32_t> status(R);
    status.poison();
    buffer.low_latency_query_mask_buffer(status.get(), buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    std::vector<int32_t> want(R, 0);
    want[gone] = 1;
    EXPECT_EQ(status.download(), want) << "low_latency_query_mask_buffer";
  }
  host_barrier();  // the stopped rank waits here until the survivors are done; then every Buffer is destroyed
}

// Shrink mode, masked from the host on every rank: nobody sends to that rank or waits for it, its experts' slots
// are left out, and no timeout is needed. Then the mask is cleaned, the low-latency state reset collectively
// (clean_low_latency_buffer), and a round with every rank equals the unmasked reference again.
OPENEP_RANKS_TEST_EP(LowLatency, ShrinkHostMaskedRankIsLeftOutThenRejoins, 2, 4, 8) {
  const int R = world_group().num_ranks(), me = world_group().rank(), masked = R / 2;
  const LLCase c{48, 64, 2048, 4, 8, true, false, false, Route::kUniform};
  BufferOptions o = ll_options(buffer_bytes(c, R), 2.0);
  o.enable_shrink = true;
  Buffer buffer(world_group(), o);
  cudaStream_t stream = buffer.comm_stream();
  buffer.low_latency_update_mask_buffer(masked, true, stream);
  buffer.synchronize(stream);
  host_barrier();
  for (int round = 0; round < 2; ++round) {
    if (me == masked) {
      sit_out_case(c, R, 800 + round, /*logfmt=*/false, {masked});
      continue;
    }
    run_case(buffer, c, 800 + round, /*hook=*/round == 1, /*zero_copy=*/false, /*logfmt=*/false, {masked});
    if (::testing::Test::HasFailure()) break;
  }
  host_barrier();
  buffer.low_latency_clean_mask_buffer(stream);
  DeviceArray<int32_t> status(R);
  status.poison();
  buffer.low_latency_query_mask_buffer(status.get(), stream);
  buffer.synchronize(stream);
  EXPECT_EQ(status.download(), std::vector<int32_t>(R, 0)) << "after low_latency_clean_mask_buffer";
  buffer.clean_low_latency_buffer(c.T, c.hidden, c.experts_per_rank * R, stream);
  buffer.synchronize(stream);
  run_case(buffer, c, 810, /*hook=*/false, /*zero_copy=*/true);  // every rank again
}

// The mask methods need enable_shrink, and rank_to_mask must be a rank of the Group.
OPENEP_RANKS_TEST_EP(LowLatency, ShrinkMethodsCheckTheirArguments, 2) {
  const int R = world_group().num_ranks();
  const LLCase c{8, 64, 2048, 4, 8, false, false, false, Route::kUniform};
  Buffer plain(world_group(), ll_options(buffer_bytes(c, R)));
  DeviceArray<int32_t> status(R);
  cudaStream_t stream = plain.comm_stream();
  const auto expect_error = [](const std::function<void()>& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "expected an OpenEP error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([&] { plain.low_latency_update_mask_buffer(0, true, stream); },
               "low_latency_update_mask_buffer requires BufferOptions::enable_shrink = true");
  expect_error([&] { plain.low_latency_query_mask_buffer(status.get(), stream); },
               "low_latency_query_mask_buffer requires BufferOptions::enable_shrink = true");
  expect_error([&] { plain.low_latency_clean_mask_buffer(stream); },
               "low_latency_clean_mask_buffer requires BufferOptions::enable_shrink = true");
  BufferOptions o = ll_options(buffer_bytes(c, R));
  o.enable_shrink = true;
  Buffer shrink(world_group(), o);
  expect_error([&] { shrink.low_latency_update_mask_buffer(R, true, shrink.comm_stream()); },
               "rank_to_mask must be in [0, " + std::to_string(R) + "), got " + std::to_string(R));
  expect_error([&] { shrink.low_latency_query_mask_buffer(nullptr, shrink.comm_stream()); }, "mask_status is null");
}

// Two micro-batches in flight: send(0), send(1), then both hooks; then the combines the same way.
OPENEP_RANKS_TEST_EP(LowLatency, TwoHookedOperationsInFlight, 2, 4, 8, 16) {
  const int R = world_group().num_ranks(), me = world_group().rank();
  const LLCase c = for_world(LLCase{96, 128, 7168, 8, 16, true, false, false, Route::kUniform}, R);
  Buffer buffer(world_group(), ll_options(low_latency_buffer_size_hint(c.T, c.hidden, R, c.experts_per_rank * R)));
  cudaStream_t stream = buffer.comm_stream();
  for (int round = 0; round < 3; ++round) {
    std::vector<std::unique_ptr<LLRank>> g;
    std::vector<LowLatencyHook> hooks;
    std::vector<std::shared_ptr<const LLWorld>> worlds;
    for (int mb = 0; mb < 2; ++mb) {
      worlds.push_back(once_per_world<LLWorld>([&] { return make_world(c, R, 500 + round * 2 + mb); }));
      g.push_back(std::make_unique<LLRank>(c, R, me, worlds[mb]->inputs[me]));  // the world is shared, not copied
      g[mb]->poison_dispatch();
      const LowLatencyDispatchOutputs o = g[mb]->dispatch_outputs();
      hooks.push_back(buffer.low_latency_dispatch(g[mb]->dispatch_args(true), g[mb]->handle, o, stream));
    }
    hooks[0](), hooks[1]();
    buffer.synchronize(stream);
    std::vector<std::vector<uint16_t>> expect(2);
    hooks.clear();
    for (int mb = 0; mb < 2; ++mb) {
      ASSERT_EQ(check_dispatch(*g[mb], worlds[mb]->want[me]), "") << "round " << round << " micro-batch " << mb;
      expect[mb] = worlds[mb]->combined[me];
      const std::vector<int64_t> range = g[mb]->range.download();
      const std::vector<int> src = g[mb]->src_info.download();
      g[mb]->expert_out.upload(expert_outputs(me, g[mb]->El, R, c.T, c.hidden, range.data(), src.data()));
      g[mb]->combined.poison();
      LowLatencyCombineOutputs co;
      co.combined_x = g[mb]->combined.get();
      hooks.push_back(buffer.low_latency_combine(g[mb]->combine_args(true, false), g[mb]->handle, co, stream));
    }
    hooks[0](), hooks[1]();
    buffer.synchronize(stream);
    for (int mb = 0; mb < 2; ++mb) {
      std::vector<uint16_t> got = g[mb]->combined.download();
      got.resize(expect[mb].size());
      EXPECT_EQ(first_mismatches(got, expect[mb], c.hidden, "combined_x"), "") << "round " << round << " mb " << mb;
    }
  }
}

// Dispatch and combine captured once each (two graphs), replayed 100 times with new tokens, new routing and
// new expert outputs before every replay; hook mode (send and receive kernels) inside the graphs. Over the
// loopback GIN plugin (OPENEP_TEST_LL_NETWORK=1) 10 replays: there one operation takes about a second (every put
// is a host round trip with synchronous copies and adversarial delays), and 200 of them outran the world's
// time limit on an H200 (a628bd5: still replaying after 60 s, no error).
OPENEP_RANKS_TEST_EP(LowLatency, GraphReplaysWithChangingDataStayCorrect, 2, 4, 8, 16) {
  const int R = world_group().num_ranks(), me = world_group().rank();
  const LLCase c{48, 64, 2048, 6, 8, true, false, false, Route::kUniform};
  Buffer buffer(world_group(), ll_options(low_latency_buffer_size_hint(c.T, c.hidden, R, c.experts_per_rank * R)));
  // Captured on the Buffer's own stream: two streams per rank (this and test_stream()) keep EP16 virtual ranks
  // within the GPU's 32 hardware queues.
  cudaStream_t stream = buffer.comm_stream();
  std::vector<ref::LowLatencyInput> inputs = make_inputs(c, R, 9000);
  LLRank g(c, R, me, inputs[me]);
  const LowLatencyDispatchOutputs dout = g.dispatch_outputs();
  LowLatencyCombineOutputs co;
  co.combined_x = g.combined.get();
  cudaGraph_t graphs[2] = {nullptr, nullptr};
  cudaGraphExec_t exec[2] = {nullptr, nullptr};
  TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  LowLatencyHook h = buffer.low_latency_dispatch(g.dispatch_args(true), g.handle, dout, stream);
  h();
  TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graphs[0]));
  TEST_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  buffer.low_latency_combine(g.combine_args(false, false), g.handle, co, stream);
  TEST_CUDA_CHECK(cudaStreamEndCapture(stream, &graphs[1]));
  for (int i = 0; i < 2; ++i) TEST_CUDA_CHECK(cudaGraphInstantiate(&exec[i], graphs[i], 0));
  const int replays = ll_over_network() ? 10 : 100;
  for (int replay = 0; replay < replays; ++replay) {
    const auto world = once_per_world<LLWorld>([&] { return make_world(c, R, 9001 + replay); });
    const std::vector<ref::LowLatencyRecv>& want = world->want;
    g.upload(world->inputs[me]);
    g.poison_dispatch();
    TEST_CUDA_CHECK(cudaGraphLaunch(exec[0], stream));
    buffer.synchronize(stream);
    ASSERT_EQ(check_dispatch(g, want[me]), "") << "replay " << replay;
    const std::vector<uint16_t>& expect = world->combined[me];
    const std::vector<int64_t> range = g.range.download();
    const std::vector<int> src = g.src_info.download();
    g.expert_out.upload(expert_outputs(me, g.El, R, c.T, c.hidden, range.data(), src.data()));
    g.combined.poison();
    TEST_CUDA_CHECK(cudaGraphLaunch(exec[1], stream));
    buffer.synchronize(stream);
    std::vector<uint16_t> got = g.combined.download();
    got.resize(expect.size());
    ASSERT_EQ(first_mismatches(got, expect, c.hidden, "combined_x"), "") << "replay " << replay;
  }
  for (int i = 0; i < 2; ++i) {
    TEST_CUDA_CHECK(cudaGraphExecDestroy(exec[i]));
    TEST_CUDA_CHECK(cudaGraphDestroy(graphs[i]));
  }
}

OPENEP_RANKS_TEST_EP(LowLatency, MissingPeerGivesTimeoutErrorNotHang, 2, 4, 8, 16) {
  const double timeout_s = 2.0;
  const int R = world_group().num_ranks();
  const LLCase c{16, 64, 2048, 4, 8, true, false, false, Route::kUniform};
  {
    Buffer buffer(world_group(), ll_options(low_latency_buffer_size_hint(c.T, c.hidden, R, c.experts_per_rank * R), timeout_s));
    if (buffer.rank() == 0) {
      const auto inputs = make_inputs(c, R, 3);
      LLRank g(c, R, 0, inputs[0]);
      const LowLatencyDispatchOutputs o = g.dispatch_outputs();
      const auto start = std::chrono::steady_clock::now();
      try {
        buffer.low_latency_dispatch(g.dispatch_args(false), g.handle, o, buffer.comm_stream());
        buffer.synchronize(buffer.comm_stream());
        ADD_FAILURE() << "low_latency_dispatch without peers returned";
      } catch (const Error& e) {
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
        EXPECT_NE(std::string(e.what()).find("low_latency_dispatch"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("rank 0 waited more than"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(" for peer "), std::string::npos) << e.what();  // which one: the first seen
        EXPECT_LT(s, timeout_s + 8.0);
      }
    }
    host_barrier();  // the other ranks wait here until rank 0 has seen its error
  }
}

// The network (GIN) path, BufferOptions::allow_network. NEVER RUN: it needs ranks in several nodes with RDMA
// NICs, which the test machines do not have. On one node allow_network is ignored (checked: NVLink transport,
// no GIN context requested) and the test skips; across nodes the same reference cases run over GIN. Needs a
// real NCCL Group: one process per GPU only.
OPENEP_MGPU_TEST(LowLatency, NetworkPathMatchesTheReferenceAcrossNodes) {
  Group& group = world_group();
  BufferOptions options = ll_options(buffer_bytes(group.num_ranks()));
  options.allow_network = true;
  Buffer buffer(group, options);
  if (group.num_nvlink_ranks() == group.num_ranks()) {
    EXPECT_EQ(buffer.impl().transport, ::openep::detail::Transport::kNvlink);
    EXPECT_EQ(static_cast<int>(buffer.impl().win.dev_comm.ginContextCount), 0);
    GTEST_SKIP() << "single-node Group: allow_network is ignored; the GIN path needs ranks in several nodes";
  }
  ASSERT_EQ(buffer.impl().transport, ::openep::detail::Transport::kGin);
  {  // LogFMT is refused on the GIN transport, before anything launches.
    const LLCase c = cases()[1];
    DeviceArray<int> src(static_cast<size_t>(c.experts_per_rank) * group.num_ranks() * c.T);
    DeviceArray<int64_t> range(static_cast<size_t>(c.experts_per_rank) * group.num_ranks());
    LowLatencyHandle h;
    h.src_info = src.get(), h.layout_range = range.get();
    h.num_max_dispatch_tokens_per_rank = c.T, h.hidden = c.hidden;
    h.num_experts = c.experts_per_rank * group.num_ranks();
    LowLatencyCombineArgs a;
    a.num_topk = c.num_topk, a.zero_copy = true, a.use_logfmt = true;
    try {
      buffer.low_latency_combine(a, h, LowLatencyCombineOutputs{}, buffer.comm_stream());
      ADD_FAILURE() << "use_logfmt accepted on the GIN transport";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
      EXPECT_NE(std::string(e.what()).find("not available on the GIN transport"), std::string::npos) << e.what();
    }
  }
  uint64_t seed = 501;
  int i = 0;
  for (const LLCase& c : cases()) {
    run_case(buffer, c, seed++, /*hook=*/(i % 2) == 1, /*zero_copy=*/(i % 3) == 0);
    ++i;
    if (::testing::Test::HasFailure()) break;
  }
}

}  // namespace openep::test
