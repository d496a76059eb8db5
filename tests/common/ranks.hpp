// Multi-rank tests written once, run two ways:
//   openep_mgpu_tests   one process per GPU (tools/launch.py), the world is the NCCL Group of all processes;
//                       a test registered as OPENEP_RANKS_TEST(Suite, Name) is Suite + "Mgpu".Name.
//   openep_vrank_tests  virtual ranks (openep/testing.hpp): N ranks as N host threads of one process on ONE
//                       GPU; the same test is Suite + "Vrank".Name/EP<N>, once per EP size it lists.
// A test body runs on every rank (every process, or every rank thread) and uses the functions below for its
// rank's view of the world. Case lists are registered one named test per case (OPENEP_RANKS_CASES), so one
// case can be run alone with --gtest_filter.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "openep/group.hpp"

namespace openep::test {

struct RankEnv {
  int rank = 0, world_size = 1, local_rank = 0;  // local_rank: the CUDA device of this rank
  bool virtual_ranks = false;                    // true in openep_vrank_tests
};

// This rank's environment and its world Group (valid during the test body).
const RankEnv& rank_env();
Group& world_group();
// Every rank meets on the host (bounded: a missing rank becomes an error, not a hang).
void host_barrier();

// Values computed once per world and shared read-only by every rank: on virtual ranks rank 0 computes and
// the other rank threads wait for it (so a big CPU reference is built once, not once per rank thread); with
// one process per GPU every process computes its own. Every rank must call these in the same order.
class SharedSlots {
 public:
  virtual ~SharedSlots() = default;
  virtual void put(uint64_t index, std::shared_ptr<const void> value) = 0;  // rank 0; nullptr = it failed
  virtual std::shared_ptr<const void> get(uint64_t index) = 0;             // other ranks; bounded wait
};
SharedSlots* shared_slots();  // nullptr with one process per GPU
uint64_t next_shared_index();

template <typename T, typename Fn>
std::shared_ptr<const T> once_per_world(Fn&& make) {
  SharedSlots* slots = shared_slots();
  if (slots == nullptr) return std::make_shared<const T>(make());
  const uint64_t index = next_shared_index();
  if (rank_env().rank == 0) {
    std::shared_ptr<const T> v;
    try {
      v = std::make_shared<const T>(make());
    } catch (...) {
      slots->put(index, nullptr);
      throw;
    }
    slots->put(index, v);
    return v;
  }
  std::shared_ptr<const void> v = slots->get(index);
  if (!v) throw std::runtime_error("rank 0 failed to build a value shared by all ranks (see its error)");
  return std::static_pointer_cast<const T>(v);
}

// ---- registration ----

struct RanksTestSpec {
  std::string suite, name;
  const char* file;
  int line;
  std::vector<int> ep_sizes;  // virtual-rank EP sizes; ignored with one process per GPU
  std::function<void()> body;
  bool mgpu_only = false;     // needs a real NCCL communicator (not registered on virtual ranks)
  // Virtual ranks with emulated nodes (internode tests): shapes nodes * 100 + ranks_per_node, registered as
  // Name/N<nodes>xM<ranks_per_node> instead of the EP sizes.
  std::vector<int> node_shapes = {};
};
// Implemented by each binary's main (common/mgpu_main.cpp, common/vrank_main.cpp).
bool register_ranks_test(RanksTestSpec spec);

template <typename Case>
bool register_ranks_cases(const char* suite, const char* name, const char* file, int line, std::vector<int> ep_sizes,
                          const std::vector<std::pair<std::string, Case>>& cases, void (*body)(const Case&),
                          std::vector<int> node_shapes = {}) {
  for (const auto& nc : cases) {
    const Case c = nc.second;
    register_ranks_test(
        {suite, std::string(name) + "/" + nc.first, file, line, ep_sizes, [body, c] { body(c); }, false, node_shapes});
  }
  return true;
}

}  // namespace openep::test

#define OPENEP_RANKS_TEST_IMPL(suite, name, mgpu_only, ...)                                                     \
  static void openep_ranks_body_##suite##_##name();                                                            \
  [[maybe_unused]] static const bool openep_ranks_registered_##suite##_##name =                                \
      ::openep::test::register_ranks_test({#suite, #name, __FILE__, __LINE__, std::vector<int>{__VA_ARGS__},   \
                                           &openep_ranks_body_##suite##_##name, mgpu_only});                   \
  static void openep_ranks_body_##suite##_##name()

// A multi-rank test run at the listed virtual-rank EP sizes (and once per launch with one process per GPU).
#define OPENEP_RANKS_TEST_EP(suite, name, ...) OPENEP_RANKS_TEST_IMPL(suite, name, false, __VA_ARGS__)
// The default sizes: EP2, EP4, EP8.
#define OPENEP_RANKS_TEST(suite, name) OPENEP_RANKS_TEST_EP(suite, name, 2, 4, 8)
// A test that needs a real NCCL communicator: only in openep_mgpu_tests.
#define OPENEP_MGPU_TEST(suite, name) OPENEP_RANKS_TEST_IMPL(suite, name, true, 2)

// A multi-rank test over emulated nodes: on virtual ranks once per shape (nodes * 100 + ranks_per_node, e.g.
// 202 = 2 nodes of 2 ranks), as Name/N2xM2; with one process per GPU once per launch (the body must skip a
// single-node world itself).
#define OPENEP_RANKS_TEST_NODES(suite, name, ...)                                                               \
  static void openep_ranks_body_##suite##_##name();                                                            \
  [[maybe_unused]] static const bool openep_ranks_registered_##suite##_##name =                                \
      ::openep::test::register_ranks_test({#suite, #name, __FILE__, __LINE__, {}, &openep_ranks_body_##suite##_##name, \
                                           false, std::vector<int>{__VA_ARGS__}});                             \
  static void openep_ranks_body_##suite##_##name()
#define OPENEP_RANKS_CASES_NODES(suite, name, CaseT, cases_fn, ...)                                            \
  static void openep_ranks_body_##suite##_##name(const CaseT& c);                                              \
  [[maybe_unused]] static const bool openep_ranks_registered_##suite##_##name =                                \
      ::openep::test::register_ranks_cases<CaseT>(#suite, #name, __FILE__, __LINE__, {}, cases_fn(),             \
                                                  &openep_ranks_body_##suite##_##name, std::vector<int>{__VA_ARGS__}); \
  static void openep_ranks_body_##suite##_##name(const CaseT& c)

// One named test per case: `cases_fn()` returns std::vector<std::pair<std::string, CaseT>>; the body receives
// `const CaseT& c`. Test names are Name/<case name>.
#define OPENEP_RANKS_CASES(suite, name, CaseT, cases_fn, ...)                                                  \
  static void openep_ranks_body_##suite##_##name(const CaseT& c);                                              \
  [[maybe_unused]] static const bool openep_ranks_registered_##suite##_##name =                                \
      ::openep::test::register_ranks_cases<CaseT>(#suite, #name, __FILE__, __LINE__, std::vector<int>{__VA_ARGS__}, \
                                                  cases_fn(), &openep_ranks_body_##suite##_##name);            \
  static void openep_ranks_body_##suite##_##name(const CaseT& c)
