// The gtest fixture every multi-rank test is registered with (common/ranks.hpp).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <utility>

namespace openep::test {

class RanksTest : public ::testing::Test {
 public:
  explicit RanksTest(std::function<void()> body) : body_(std::move(body)) {}
  void TestBody() override { body_(); }

 private:
  std::function<void()> body_;
};

}  // namespace openep::test
