// Routing and data generators for OpenEP tests (header-only, gtest-free).
//
// Every generator is deterministic: the same arguments and seed give the same result on every
// machine and compiler (std::mt19937_64's output sequence is fixed by the standard, and all
// reductions of it to ranges are written out here instead of using the implementation-defined
// std::*_distribution classes).
//
// Routing matrices are std::vector<int64_t> of shape [num_tokens][num_topk], row-major, holding a
// global expert id in [0, num_experts) or -1 (no expert). Expert e lives on rank e / (E / R).
// Invalid arguments throw std::invalid_argument.
//
// random_bf16 uses openep::ref::float_to_bf16, so users link openep_reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <openep/reference.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace openep::test {

namespace detail {

inline void require(bool ok, const char* fn, const std::string& message) {
  if (!ok) throw std::invalid_argument(std::string("openep::test::") + fn + ": " + message);
}

// Unbiased integer in [0, n), n >= 1 (rejection of the incomplete top interval).
inline uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t max = std::mt19937_64::max();
  const uint64_t limit = max - (max % n + 1) % n;  // accept v <= limit: (limit + 1) is a multiple of n
  uint64_t v = rng();
  while (v > limit) v = rng();
  return v % n;
}

// Writes `count` distinct entries of `pool` to out (uniformly random subset, random order) by a
// partial Fisher-Yates shuffle. The pool stays a permutation of its values, so it can be reused.
inline void pick_distinct(std::mt19937_64& rng, std::vector<int64_t>& pool, int count, int64_t* out) {
  for (int k = 0; k < count; ++k) {
    const size_t j = k + static_cast<size_t>(uniform_below(rng, pool.size() - k));
    std::swap(pool[k], pool[j]);
    out[k] = pool[k];
  }
}

// Fills each row with min(num_topk, pool.size()) distinct random entries of pool, then -1.
inline std::vector<int64_t> rows_from_pool(std::vector<int64_t> pool, int num_tokens, int num_topk, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> topk(static_cast<size_t>(num_tokens) * num_topk, -1);
  const int take = static_cast<int>(std::min<size_t>(num_topk, pool.size()));
  for (int t = 0; t < num_tokens; ++t) pick_distinct(rng, pool, take, topk.data() + static_cast<size_t>(t) * num_topk);
  return topk;
}

inline void check_shape(const char* fn, int num_tokens, int num_topk, int num_experts) {
  require(num_tokens >= 0, fn, "num_tokens expected >= 0, got " + std::to_string(num_tokens));
  require(num_topk >= 1, fn, "num_topk expected >= 1, got " + std::to_string(num_topk));
  require(num_experts >= 1, fn, "num_experts expected >= 1, got " + std::to_string(num_experts));
}

inline void check_ranks(const char* fn, int num_experts, int num_ranks) {
  require(num_ranks >= 1 && num_experts % num_ranks == 0, fn,
          "num_experts expected a multiple of num_ranks (" + std::to_string(num_ranks) + "), got " +
              std::to_string(num_experts));
}

}  // namespace detail

// Closed form, no randomness: topk[t][k] = (t * K + k) % E. Distinct per token when K <= E;
// consecutive tokens walk over all experts (hence all ranks) in order.
// REQUIRES: K <= E.
inline std::vector<int64_t> round_robin_routing(int num_tokens, int num_topk, int num_experts) {
  detail::check_shape("round_robin_routing", num_tokens, num_topk, num_experts);
  detail::require(num_topk <= num_experts, "round_robin_routing", "num_topk expected <= num_experts");
  std::vector<int64_t> topk(static_cast<size_t>(num_tokens) * num_topk);
  for (size_t i = 0; i < topk.size(); ++i) topk[i] = static_cast<int64_t>(i % num_experts);
  return topk;
}

// K distinct uniformly random experts per token (random slot order). REQUIRES: K <= E.
inline std::vector<int64_t> uniform_routing(int num_tokens, int num_topk, int num_experts, uint64_t seed) {
  detail::check_shape("uniform_routing", num_tokens, num_topk, num_experts);
  detail::require(num_topk <= num_experts, "uniform_routing", "num_topk expected <= num_experts");
  std::vector<int64_t> pool(num_experts);
  for (int e = 0; e < num_experts; ++e) pool[e] = e;
  return detail::rows_from_pool(pool, num_tokens, num_topk, seed);
}

// Slot 0 of every token is expert `hot`; slots 1..K-1 are distinct random experts other than hot.
// REQUIRES: 0 <= hot < E, K <= E.
inline std::vector<int64_t> hot_expert_routing(int num_tokens, int num_topk, int num_experts, int hot, uint64_t seed) {
  detail::check_shape("hot_expert_routing", num_tokens, num_topk, num_experts);
  detail::require(num_topk <= num_experts, "hot_expert_routing", "num_topk expected <= num_experts");
  detail::require(hot >= 0 && hot < num_experts, "hot_expert_routing",
                  "hot expected in [0, num_experts), got " + std::to_string(hot));
  std::vector<int64_t> pool;
  for (int e = 0; e < num_experts; ++e) {
    if (e != hot) pool.push_back(e);
  }
  std::vector<int64_t> rest = detail::rows_from_pool(pool, num_tokens, num_topk - 1, seed);
  std::vector<int64_t> topk(static_cast<size_t>(num_tokens) * num_topk);
  for (int t = 0; t < num_tokens; ++t) {
    topk[static_cast<size_t>(t) * num_topk] = hot;
    for (int k = 1; k < num_topk; ++k) {
      topk[static_cast<size_t>(t) * num_topk + k] = rest[static_cast<size_t>(t) * (num_topk - 1) + k - 1];
    }
  }
  return topk;
}

// Every selected expert lives on rank dst_rank: min(K, E_local) distinct random local experts per
// token in the first slots, the remaining slots (if K > E_local) are -1.
// REQUIRES: E % R == 0, 0 <= dst_rank < R.
inline std::vector<int64_t> single_rank_routing(
    int num_tokens, int num_topk, int num_experts, int num_ranks, int dst_rank, uint64_t seed) {
  detail::check_shape("single_rank_routing", num_tokens, num_topk, num_experts);
  detail::check_ranks("single_rank_routing", num_experts, num_ranks);
  detail::require(dst_rank >= 0 && dst_rank < num_ranks, "single_rank_routing",
                  "dst_rank expected in [0, num_ranks), got " + std::to_string(dst_rank));
  const int num_local = num_experts / num_ranks;
  std::vector<int64_t> pool(num_local);
  for (int i = 0; i < num_local; ++i) pool[i] = static_cast<int64_t>(dst_rank) * num_local + i;
  return detail::rows_from_pool(pool, num_tokens, num_topk, seed);
}

// Never selects an expert on the ranks listed in `empty_ranks` (they receive nothing): min(K, #allowed)
// distinct random allowed experts per token, then -1 slots.
// REQUIRES: E % R == 0, every listed rank in [0, R).
inline std::vector<int64_t> empty_ranks_routing(
    int num_tokens, int num_topk, int num_experts, int num_ranks, uint64_t seed, std::vector<int> empty_ranks) {
  detail::check_shape("empty_ranks_routing", num_tokens, num_topk, num_experts);
  detail::check_ranks("empty_ranks_routing", num_experts, num_ranks);
  std::vector<bool> is_empty(num_ranks, false);
  for (int r : empty_ranks) {
    detail::require(r >= 0 && r < num_ranks, "empty_ranks_routing",
                    "empty_ranks entry expected in [0, num_ranks), got " + std::to_string(r));
    is_empty[r] = true;
  }
  const int num_local = num_experts / num_ranks;
  std::vector<int64_t> pool;
  for (int e = 0; e < num_experts; ++e) {
    if (!is_empty[e / num_local]) pool.push_back(e);
  }
  return detail::rows_from_pool(pool, num_tokens, num_topk, seed);
}

// Group-limited gating (DeepSeek-V3): ranks form nodes of M consecutive ranks with El experts each; every token
// picks min(N, groups) distinct random nodes, then min(K, experts there) distinct random experts among theirs
// (then -1 slots). REQUIRES: R % M == 0, groups >= 1.
inline std::vector<int64_t> group_limited_routing(int num_tokens, int num_topk, int num_ranks, int ranks_per_node,
                                                  int experts_per_rank, int groups, uint64_t seed) {
  detail::check_shape("group_limited_routing", num_tokens, num_topk, num_ranks * experts_per_rank);
  detail::require(ranks_per_node >= 1 && num_ranks % ranks_per_node == 0 && groups >= 1, "group_limited_routing",
                  "num_ranks expected a multiple of ranks_per_node and groups >= 1");
  const int N = num_ranks / ranks_per_node, G = std::min(N, groups), per_node = ranks_per_node * experts_per_rank;
  std::mt19937_64 rng(seed);
  std::vector<int64_t> nodes(N);
  for (int n = 0; n < N; ++n) nodes[n] = n;
  std::vector<int64_t> topk(static_cast<size_t>(num_tokens) * num_topk, -1);
  std::vector<int64_t> chosen(G), pool;
  for (int t = 0; t < num_tokens; ++t) {
    detail::pick_distinct(rng, nodes, G, chosen.data());
    pool.clear();
    for (int64_t n : chosen)
      for (int e = 0; e < per_node; ++e) pool.push_back(n * per_node + e);
    const int take = std::min<int>(num_topk, static_cast<int>(pool.size()));
    detail::pick_distinct(rng, pool, take, topk.data() + static_cast<size_t>(t) * num_topk);
  }
  return topk;
}

// Copy of topk with exactly round(frac * topk.size()) uniformly chosen slots set to -1.
// REQUIRES: 0 <= frac <= 1.
inline std::vector<int64_t> with_minus_one(std::vector<int64_t> topk, double frac, uint64_t seed) {
  detail::require(frac >= 0.0 && frac <= 1.0, "with_minus_one", "frac expected in [0, 1], got " + std::to_string(frac));
  const int count = static_cast<int>(std::lround(frac * static_cast<double>(topk.size())));
  std::vector<int64_t> positions(topk.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int64_t>(i);
  std::vector<int64_t> chosen(count);
  std::mt19937_64 rng(seed);
  detail::pick_distinct(rng, positions, count, chosen.data());
  for (int64_t i : chosen) topk[i] = -1;
  return topk;
}

// Copy of topk ([N][num_topk]) with every row t where t % every_nth == 0 set entirely to -1
// (tokens sent nowhere). REQUIRES: num_topk >= 1, topk.size() % num_topk == 0, every_nth >= 1.
inline std::vector<int64_t> all_minus_one_rows(std::vector<int64_t> topk, int num_topk, int every_nth) {
  detail::require(num_topk >= 1 && topk.size() % num_topk == 0, "all_minus_one_rows",
                  "topk.size() expected a multiple of num_topk (" + std::to_string(num_topk) + "), got " +
                      std::to_string(topk.size()));
  detail::require(every_nth >= 1, "all_minus_one_rows", "every_nth expected >= 1, got " + std::to_string(every_nth));
  const size_t num_tokens = topk.size() / num_topk;
  for (size_t t = 0; t < num_tokens; t += every_nth) {
    for (int k = 0; k < num_topk; ++k) topk[t * num_topk + k] = -1;
  }
  return topk;
}

// n BF16 values bf16(scale * u), u uniform on the grid {j * 2^-23 : -2^23 <= j < 2^23} in [-1, 1).
// All values are finite for any finite scale below 1e38.
inline std::vector<uint16_t> random_bf16(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::vector<uint16_t> values(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t j = static_cast<int64_t>(rng() >> 40) - (int64_t{1} << 23);  // in [-2^23, 2^23)
    const float u = std::ldexp(static_cast<float>(j), -23);                    // exact
    values[i] = openep::ref::float_to_bf16(scale * u);
  }
  return values;
}

// n float weights uniform on the grid {j * 2^-24 : 1 <= j <= 2^24}, i.e. in (0, 1], all exact floats.
inline std::vector<float> random_weights(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> weights(n);
  for (size_t i = 0; i < n; ++i) weights[i] = std::ldexp(static_cast<float>((rng() >> 40) + 1), -24);
  return weights;
}

}  // namespace openep::test
