// A rank whose PROCESS is killed with SIGKILL, on processes sharing a GPU through CUDA IPC (openep::testing::
// IpcFabric): the survivors keep the dead rank's window mapped (imported handles hold the memory), so this is the
// NVLink-style failure on one GPU. Each test kills the last rank, so each runs alone in its own launch (CTest
// ipc_kill_ll_4x1 and ipc_kill_normal_4x1, launch.py --expect-killed 3) and only with OPENEP_IPC_KILL=1.
#include <sys/stat.h>

#include <chrono>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ipc/ipc_env.hpp"
#include "openep/error.hpp"
#include "openep/testing.hpp"
#include "ranks/intranode_check.hpp"
#include "ranks/low_latency_check.hpp"

namespace openep::test {
namespace {

using Clock = std::chrono::steady_clock;

__attribute__((format(printf, 1, 2))) void say(const char* fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  std::printf("[ipc rank %d] %s\n", rank_env().rank, line);
  std::fflush(stdout);
}

bool kill_tests_enabled() {
  const char* on = std::getenv("OPENEP_IPC_KILL");
  return on != nullptr && std::string(on) == "1";
}

[[noreturn]] void die_now() {
  say("killing myself with SIGKILL");
  std::raise(SIGKILL);
  std::abort();  // not reached
}

// Shrink mode (DeepEP's enable_shrink): a decode loop of low-latency dispatch + combine on every rank, then the last
// rank's process is SIGKILLed between two steps. Every survivor's next receive that waits for it times out and masks
// it (no error); the survivors carry on for six more steps (fused, hook, zero-copy and LogFMT combines), each
// bitwise equal to the reference with the dead rank masked (its experts get no tokens, it sends none); the mask then
// names exactly that rank, and the survivors destroy their Buffer without hanging.
TEST(IpcKill, LowLatencyShrinkSurvivorsOfAKilledRankCarryOn) {
  if (!kill_tests_enabled())
    GTEST_SKIP() << "kills a rank: runs only alone, with OPENEP_IPC_KILL=1 (CTest ipc_kill_ll_4x1)";
  const int R = world_group().num_ranks(), me = world_group().rank(), victim = R - 1;
  ASSERT_GE(R, 3) << "needs 3 or more ranks, so that 2 survive";
  using low_latency::LLCase;
  const LLCase c{64, 128, 2048, 8, 8, false, false, false, low_latency::Route::kUniform};
  const double timeout_s = 3.0;
  BufferOptions o = low_latency::ll_options(low_latency::buffer_bytes(c, R), timeout_s);
  o.enable_shrink = true;
  {
    Buffer buffer(world_group(), o);
    for (int step = 0; step < 2; ++step) {
      low_latency::run_case(buffer, c, 900 + step, /*hook=*/step == 1, /*zero_copy=*/false);
      ASSERT_FALSE(::testing::Test::HasFailure()) << "step " << step << " with every rank alive";
    }
    if (me == victim) die_now();
    const Clock::time_point t0 = Clock::now();
    for (int step = 2; step < 8; ++step) {
      low_latency::run_case(buffer, c, 900 + step, /*hook=*/step % 2 == 1, /*zero_copy=*/step % 3 == 0,
                            /*logfmt=*/step == 5, {victim});
      ASSERT_FALSE(::testing::Test::HasFailure()) << "step " << step << " after rank " << victim << " was killed";
      if (step == 2)
        say("first step after the kill: %.1f s (the receive that waited for rank %d timed out and masked it)",
            std::chrono::duration<double>(Clock::now() - t0).count(), victim);
    }
    DeviceArray<int32_t> status(R);
    status.poison();
    buffer.low_latency_query_mask_buffer(status.get(), buffer.comm_stream());
    buffer.synchronize(buffer.comm_stream());
    std::vector<int32_t> want(R, 0);
    want[victim] = 1;
    EXPECT_EQ(status.download(), want) << "low_latency_query_mask_buffer";
  }
  say("survivors: 6 steps after the kill equal the masked reference; Buffer destroyed");
}

// Normal mode: an intranode round on every rank, then the last rank's process is SIGKILLed. Every survivor's next
// dispatch fails with kTimeout naming the dead rank within the Buffer's timeout (plus slack), the survivors destroy
// their Buffer and Group, build a Group of the survivors (a new IPC world of R - 1 ranks) and a new Buffer, and
// run an intranode round there bitwise equal to the reference.
TEST(IpcKill, NormalModeSurvivorsGetATimeoutNamingTheDeadRankThenRegroup) {
  if (!kill_tests_enabled())
    GTEST_SKIP() << "kills a rank: runs only alone, with OPENEP_IPC_KILL=1 (CTest ipc_kill_normal_4x1)";
  const int R = world_group().num_ranks(), me = world_group().rank(), victim = R - 1;
  ASSERT_GE(R, 3) << "needs 3 or more ranks, so that 2 survive";
  const intranode::Case c{256, 2048, 8, 8, false, true, intranode::Route::kUniform};
  const double timeout_s = 3.0;
  {
    Buffer buffer(world_group(), intranode::options_for(c, R, timeout_s));
    intranode::run_case(buffer, c, 950);
    ASSERT_FALSE(::testing::Test::HasFailure()) << "the round with every rank alive";
    if (me == victim) die_now();
    const intranode::World w = intranode::make_world(c, R, 951);
    intranode::Runner run(buffer, c, w.inputs[me]);
    intranode::Dispatched d;
    const Clock::time_point t0 = Clock::now();
    try {
      run.dispatch(d, 0);
      ADD_FAILURE() << "dispatch after rank " << victim << " was killed succeeded";
    } catch (const Error& err) {
      const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
      say("dispatch after the kill: %s after %.1f s: %s", error_code_name(err.code()), waited, err.what());
      EXPECT_STREQ(error_code_name(err.code()), error_code_name(ErrorCode::kTimeout)) << err.what();
      const std::string phrase = "for peer " + std::to_string(victim) + " ";
      EXPECT_NE(std::string(err.what()).find(phrase), std::string::npos) << "expected \"" << phrase << "\" in: " << err.what();
      EXPECT_LT(waited, timeout_s + 5.0) << err.what();
    }
  }  // the Buffer is destroyed with the dead peer
  // A new world of the survivors: ranks 0 .. R - 2 keep their numbers (the victim is the last rank).
  const std::string dir = ipc_rendezvous_dir() + "/survivors";
  ::mkdir(dir.c_str(), 0700);  // every survivor tries; EEXIST is fine
  openep::testing::IpcFabricOptions so;
  so.rank = me;
  so.num_ranks = R - 1;
  so.device = world_group().device();
  so.rendezvous_dir = dir;
  std::unique_ptr<Group> survivors = openep::testing::IpcFabric::make_group(so);
  ASSERT_EQ(survivors->num_ranks(), R - 1);
  {
    Buffer buffer(*survivors, intranode::options_for(c, R - 1, timeout_s));
    intranode::run_case(buffer, c, 952);
  }
  if (!::testing::Test::HasFailure())
    say("survivors: %d ranks in a new Group, intranode round bitwise equal to the reference", R - 1);
}

}  // namespace
}  // namespace openep::test
