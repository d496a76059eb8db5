// Randomized soak on virtual ranks: at least 10,000 operations, each checked bitwise against the CPU
// reference, mixing modes (intranode exact / worst-case / cached dispatch and combine; low-latency dispatch
// and combine, eager and hook, zero-copy), shapes, dtypes (BF16, FP8 with and without round_scale / UE8M0),
// routings, index types, SM counts and EP sizes (2, 4, 8 and 16; normal mode up to 8, its limit). The world
// changes every round; within a round the calls change on the same Buffers.
//   OPENEP_SOAK_SEED   the plan's seed (default 20261201); printed with every failure, so a failure replays
//   OPENEP_SOAK_CALLS  operations to reach (default 10000)
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>

#include "common/gpu_util.hpp"
#include "common/ranks.hpp"
#include "common/vrank.hpp"
#include "protocol/intranode_layout.hpp"
#include "ranks/intranode_check.hpp"
#include "ranks/low_latency_check.hpp"

namespace openep::test {
namespace {

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}

constexpr int kMaxTokens = 64, kMaxHidden = 2048, kMaxTopk = 9, kExpertsPerRank = 8;

intranode::Case random_intranode_case(std::mt19937_64& rng, int R) {
  static const int hiddens[] = {256, 512, 1024, 2048};
  intranode::Case c{static_cast<int>(rng() % (kMaxTokens + 1)), hiddens[rng() % 4], 1, kExpertsPerRank,
                    (rng() % 3) == 0, (rng() % 4) != 0, static_cast<intranode::Route>(rng() % 5)};
  c.num_topk = 1 + static_cast<int>(rng() % kMaxTopk);
  if (c.num_topk > kExpertsPerRank * R) c.num_topk = kExpertsPerRank * R;
  c.index_type = (rng() % 2) ? IndexType::kInt64 : IndexType::kInt32;
  static const int alignments[] = {1, 1, 4, 16};
  c.expert_alignment = alignments[rng() % 4];
  c.bias = (rng() % 3) == 0;
  c.num_sms = 2 * (1 + static_cast<int>(rng() % 12));
  return c;
}

// Operations intranode::run_case checks: dispatch, worst-case dispatch (with top-k), cached dispatch, combine
// (BF16).
int intranode_ops(const intranode::Case& c) { return 2 + (c.with_topk ? 1 : 0) + (c.fp8 ? 0 : 1); }

low_latency::LLCase random_ll_case(std::mt19937_64& rng, int R) {
  static const int Ts[] = {16, 32, 64};
  static const int hiddens[] = {128, 512, 1024, 2048};
  low_latency::LLCase c{};
  c.T = Ts[rng() % 3];
  c.num_tokens = static_cast<int>(rng() % (c.T + 1));
  c.hidden = hiddens[rng() % 4];
  c.experts_per_rank = 1 + static_cast<int>(rng() % kExpertsPerRank);
  c.num_topk = 1 + static_cast<int>(rng() % kMaxTopk);
  if (c.num_topk > c.experts_per_rank * R) c.num_topk = c.experts_per_rank * R;
  c.fp8 = (rng() % 2) == 0;
  c.round_scale = c.fp8 && (rng() % 2) == 0;
  c.ue8m0 = c.round_scale && c.hidden % 512 == 0 && (rng() % 2) == 0;
  c.route = static_cast<low_latency::Route>(rng() % 3);
  if (c.route == low_latency::Route::kHot && c.experts_per_rank * R < 2) c.route = low_latency::Route::kUniform;
  c.index_type = (rng() % 2) ? IndexType::kInt64 : IndexType::kInt32;
  return c;
}

struct Tally {
  std::atomic<long> ops{0};
  std::map<std::string, long> by_kind;  // rank 0 only
};

// One round on the current world: every rank draws the same plan from `seed`.
void soak_round(uint64_t seed, int round, int iterations, Tally& tally) {
  const int R = world_group().num_ranks();
  const bool rank0 = rank_env().rank == 0;
  std::unique_ptr<Buffer> normal;
  if (R <= ::openep::detail::IntranodeLayout::kMaxRanks) {
    BufferOptions o;
    o.num_nvl_bytes = intranode_buffer_size_hint(R, kMaxTokens + 2, kMaxHidden, 2, kMaxHidden / 128, kMaxTopk);
    o.timeout_seconds = test_timeout(20.0);
    normal = std::make_unique<Buffer>(world_group(), o);
  }
  Buffer ll(world_group(), low_latency::ll_options(low_latency_buffer_size_hint(64, kMaxHidden, R, kExpertsPerRank * R)));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < iterations; ++i) {
    const uint64_t call_seed = rng();
    const bool use_normal = normal && (rng() % 2) == 0;
    std::string what;
    if (use_normal) {
      const intranode::Case c = random_intranode_case(rng, R);
      what = "intranode " + intranode::name(c);
      SCOPED_TRACE("soak seed " + std::to_string(env_u64("OPENEP_SOAK_SEED", 20261201)) + " round " +
                   std::to_string(round) + " EP" + std::to_string(R) + " iteration " + std::to_string(i) + ": " + what);
      intranode::run_case(*normal, c, call_seed % 1000000);
      if (rank0) tally.ops += intranode_ops(c), tally.by_kind["intranode EP" + std::to_string(R)] += intranode_ops(c);
    } else {
      const low_latency::LLCase c = random_ll_case(rng, R);
      const bool hook = (rng() % 2) == 0, zero_copy = (rng() % 3) == 0;
      // One combine in four uses LogFMT; drawn from call_seed's high bits, not from rng, so the plan (cases, hooks,
      // seeds) is the one earlier soaks ran. Every soak hidden is a multiple of 128.
      const bool logfmt = ((call_seed >> 40) & 3) == 0;
      what = "low-latency " + low_latency::case_name(c) + (hook ? "_hook" : "") + (zero_copy ? "_zerocopy" : "") +
             (logfmt ? "_logfmt" : "");
      SCOPED_TRACE("soak seed " + std::to_string(env_u64("OPENEP_SOAK_SEED", 20261201)) + " round " +
                   std::to_string(round) + " EP" + std::to_string(R) + " iteration " + std::to_string(i) + ": " + what);
      low_latency::run_case(ll, c, call_seed % 1000000, hook, zero_copy, logfmt);
      if (rank0) tally.ops += 2, tally.by_kind["low-latency EP" + std::to_string(R)] += 2;
    }
    if (::testing::Test::HasFailure()) {
      if (rank0)
        std::printf("soak: FAILED at seed %llu, round %d (EP%d), iteration %d: %s\n",
                    static_cast<unsigned long long>(env_u64("OPENEP_SOAK_SEED", 20261201)), round, R, i, what.c_str());
      return;
    }
  }
}

}  // namespace

TEST(SoakVrank, TenThousandMixedOperationsMatchTheReference) {
  const uint64_t seed = env_u64("OPENEP_SOAK_SEED", 20261201);
  const long target = static_cast<long>(env_u64("OPENEP_SOAK_CALLS", 10000));
  std::printf("soak: seed %llu, target %ld operations (OPENEP_SOAK_SEED / OPENEP_SOAK_CALLS)\n",
              static_cast<unsigned long long>(seed), target);
  std::mt19937_64 plan(seed);
  const int eps[] = {2, 4, 8, 16};
  Tally tally;
  for (int round = 0; tally.ops < target && !HasFailure(); ++round) {
    const int R = eps[round % 4];  // every EP size in turn
    const uint64_t round_seed = plan();
    run_on_virtual_ranks([&] { soak_round(round_seed, round, 300, tally); }, R);
  }
  for (const auto& kv : tally.by_kind) std::printf("soak: %-16s %ld operations\n", kv.first.c_str(), kv.second);
  std::printf("soak: %ld operations checked against the reference, %s\n", tally.ops.load(),
              HasFailure() ? "FAILED (see above)" : "0 mismatches");
  EXPECT_GE(tally.ops.load(), target);
}

}  // namespace openep::test
