// The gtest fixture every multi-rank test is registered with (common/ranks.hpp).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <utility>

#include "common/ranks.hpp"

namespace openep::test {

class RanksTest : public ::testing::Test {
 public:
  explicit RanksTest(std::function<void()> body) : body_(std::move(body)) {}
  void TestBody() override { body_(); }

 private:
  std::function<void()> body_;
};

// Registers spec's body as one gtest test named (spec.suite + suffix).spec.name: the form of the binaries with one
// process per rank (suffix "Mgpu", "Ipc").
inline void register_one_test(const RanksTestSpec& spec, const char* suffix) {
  auto body = spec.body;
  ::testing::RegisterTest((spec.suite + suffix).c_str(), spec.name.c_str(), nullptr, nullptr, spec.file, spec.line,
                          [body]() -> RanksTest* { return new RanksTest(body); });
}

}  // namespace openep::test
