// Runtime on several ranks (one process per GPU, or virtual ranks on one GPU; common/ranks.hpp): Buffer
// creation, the device barrier, layout through the Buffer, errors that surface as openep::Error (a stalled
// peer within the timeout, a bad expert id), and Group::split_from (NCCL only).
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "common/gpu_util.hpp"
#include "common/ranks.hpp"
#include "common/routing.hpp"
#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/reference.hpp"

namespace openep::test {
namespace {

BufferOptions small_options(double timeout_seconds = 10.0) {
  BufferOptions o;
  o.num_nvl_bytes = 1 << 20;
  o.timeout_seconds = test_timeout(timeout_seconds);
  return o;
}

}  // namespace

OPENEP_RANKS_TEST(Buffer, BarrierRoundTripsManyTimes) {
  Buffer buffer(world_group(), small_options());
  EXPECT_EQ(buffer.rank(), rank_env().rank);
  EXPECT_EQ(buffer.num_ranks(), rank_env().world_size);
  for (int i = 0; i < 200; ++i) buffer.barrier(buffer.comm_stream());
  EXPECT_NO_THROW(buffer.synchronize(buffer.comm_stream()));
}

OPENEP_RANKS_TEST(Buffer, LayoutMatchesReferenceOnEveryRank) {
  Buffer buffer(world_group(), small_options());
  const int R = buffer.num_ranks();
  const int N = 4096, K = 8, E = 256;
  const std::vector<int64_t> topk = uniform_routing(N, K, E, 100 + rank_env().rank);
  const ref::Layout expected = ref::get_dispatch_layout(topk, N, K, E, R);
  DeviceArray<int64_t> d_topk(topk);
  DeviceArray<int> per_rank(R), per_expert(E);
  DeviceArray<bool> in_rank(static_cast<size_t>(N) * R);
  per_rank.poison(), per_expert.poison(), in_rank.poison();
  LayoutArgs a;
  a.topk_idx = d_topk.get();
  a.num_tokens = N;
  a.num_topk = K;
  a.num_experts = E;
  a.num_tokens_per_rank = per_rank.get();
  a.num_tokens_per_expert = per_expert.get();
  a.is_token_in_rank = in_rank.get();
  buffer.get_dispatch_layout(a, buffer.comm_stream());
  buffer.synchronize(buffer.comm_stream());
  EXPECT_EQ(per_rank.download(), expected.num_tokens_per_rank);
  EXPECT_EQ(per_expert.download(), expected.num_tokens_per_expert);
  std::vector<uint8_t> mask(in_rank.size());
  copy_to_host(mask.data(), in_rank.get(), mask.size());
  EXPECT_EQ(mask, expected.is_token_in_rank);
}

OPENEP_RANKS_TEST(Buffer, StalledPeerYieldsTimeoutErrorInsteadOfHang) {
  const double timeout_s = 2.0;
  {
    Buffer buffer(world_group(), small_options(timeout_s));
    if (rank_env().rank == 0) {
      // Every other rank skips this barrier: rank 0 must get an error naming a peer, within the timeout.
      const auto start = std::chrono::steady_clock::now();
      buffer.barrier(buffer.comm_stream());
      try {
        buffer.synchronize(buffer.comm_stream());
        ADD_FAILURE() << "barrier with absent peers returned without error";
      } catch (const Error& e) {
        const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
        const std::string msg = e.what();
        EXPECT_NE(msg.find("rank 0"), std::string::npos) << msg;
        EXPECT_NE(msg.find("for peer "), std::string::npos) << msg;
        EXPECT_NE(msg.find("phase 'barrier'"), std::string::npos) << msg;
        EXPECT_GE(elapsed, timeout_s * 0.9);
        EXPECT_LT(elapsed, timeout_s + 5.0) << "the error must arrive within the timeout, not after a hang";
      }
      // The Buffer now refuses work.
      try {
        buffer.barrier(buffer.comm_stream());
        ADD_FAILURE() << "a failed Buffer accepted more work";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::kBufferFailed) << e.what();
      }
    }
    host_barrier();  // the stalled ranks wait here until rank 0 has seen its error
  }
  host_barrier();
}

OPENEP_RANKS_TEST(Buffer, BadExpertIdSurfacesAtSynchronize) {
  Buffer buffer(world_group(), small_options());
  const int R = buffer.num_ranks();
  std::vector<int64_t> topk = uniform_routing(64, 2, 8 * R, 5);
  topk[2 * 10 + 1] = -7;
  DeviceArray<int64_t> d_topk(topk);
  DeviceArray<int> per_rank(R), per_expert(8 * R);
  DeviceArray<bool> in_rank(64 * R);
  LayoutArgs a;
  a.topk_idx = d_topk.get();
  a.num_tokens = 64;
  a.num_topk = 2;
  a.num_experts = 8 * R;
  a.num_tokens_per_rank = per_rank.get();
  a.num_tokens_per_expert = per_expert.get();
  a.is_token_in_rank = in_rank.get();
  buffer.get_dispatch_layout(a, buffer.comm_stream());
  try {
    buffer.synchronize(buffer.comm_stream());
    ADD_FAILURE() << "expert id -7 was not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kDeviceCheck);
    EXPECT_NE(std::string(e.what()).find("topk_idx row 10 holds expert id -7"), std::string::npos) << e.what();
  }
  EXPECT_THROW(buffer.get_dispatch_layout(a, buffer.comm_stream()), Error);
  host_barrier();
}

// Needs the NCCL communicator of a real Group: one process per GPU only.
OPENEP_MGPU_TEST(Group, SplitFromExistingCommunicatorWorks) {
  auto split = Group::split_from(world_group().comm(), rank_env().local_rank);
  EXPECT_EQ(split->rank(), world_group().rank());
  EXPECT_EQ(split->num_ranks(), world_group().num_ranks());
  EXPECT_EQ(split->num_nvlink_ranks(), split->num_ranks());
  {
    Buffer buffer(*split, small_options());
    for (int i = 0; i < 10; ++i) buffer.barrier(buffer.comm_stream());
    EXPECT_NO_THROW(buffer.synchronize(buffer.comm_stream()));
  }
  host_barrier();  // the parent communicator still works
}

// Group::shrink checks its argument before any collective (so every rank can call it with a bad list), and a Group
// of virtual ranks, which has no communicator, refuses it. The real shrink after a killed rank runs on fake nodes
// (FakeNodeRecovery in fakenode/fake_node_test.cu).
OPENEP_RANKS_TEST(Group, ShrinkChecksItsArgumentsFirst) {
  Group& g = world_group();
  const int R = g.num_ranks(), me = g.rank();
  const auto code_of = [&](const std::vector<int>& excluded) {
    try {
      (void)g.shrink(excluded);
    } catch (const Error& e) {
      return std::string(error_code_name(e.code())) + ": " + e.what();
    }
    return std::string("no error");
  };
  const std::string invalid = error_code_name(ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of({}).rfind(invalid, 0), 0u) << code_of({});
  EXPECT_EQ(code_of({R}).rfind(invalid, 0), 0u) << code_of({R});
  EXPECT_EQ(code_of({-1}).rfind(invalid, 0), 0u) << code_of({-1});
  EXPECT_EQ(code_of({me}).rfind(invalid, 0), 0u) << code_of({me});
  const int other = (me + 1) % R;
  EXPECT_EQ(code_of({other, other}).rfind(invalid, 0), 0u) << code_of({other, other});
  std::vector<int> all_others;
  for (int r = 0; r < R; ++r)
    if (r != me) all_others.push_back(r);
  all_others.push_back(me);  // every rank: nobody would remain
  EXPECT_EQ(code_of(all_others).rfind(invalid, 0), 0u) << code_of(all_others);
  if (g.comm() == nullptr) {
    const std::string got = code_of({other});
    EXPECT_EQ(got.rfind(error_code_name(ErrorCode::kUnsupported), 0), 0u) << got;
    EXPECT_NE(got.find("virtual ranks"), std::string::npos) << got;
  }
  host_barrier();
}

}  // namespace openep::test
