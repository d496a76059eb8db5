// The IPC test fabric's host rendezvous (src/runtime/ipc_rendezvous.hpp) with real processes (fork), no GPU: values
// and file descriptors reach every peer in order, late starters and early messages of a later exchange are handled,
// a rank that never comes is a kTimeout naming it, and bad directories are refused naming the option.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "openep/error.hpp"
#include "runtime/ipc_rendezvous.hpp"

namespace openep::detail {
namespace {

std::string make_dir() {
  char tmpl[] = "/tmp/openep_ipc_test_XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  if (d == nullptr) throw std::runtime_error("mkdtemp failed");
  return d;
}

testing::IpcFabricOptions options(int rank, int num_ranks, const std::string& dir, double timeout_s = 20) {
  testing::IpcFabricOptions o;
  o.rank = rank;
  o.num_ranks = num_ranks;
  o.rendezvous_dir = dir;
  o.rendezvous_timeout_seconds = timeout_s;
  return o;
}

// Runs body(rank) in a child process per rank in `children`; returns their exit codes (0 = all checks held).
std::vector<int> run_children(const std::vector<int>& children, const std::function<int(int)>& body) {
  std::vector<pid_t> pids;
  for (int r : children) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      int code = 99;
      try {
        code = body(r);
      } catch (...) {
        code = 98;
      }
      std::_Exit(code);
    }
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int status = 0;
    ::waitpid(pid, &status, 0);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  }
  return codes;
}

constexpr int kRanks = 3, kExchanges = 4;

// Every rank: kExchanges exchanges of value rank * 100 + k; in exchange 1 each rank also sends the write end of a
// pipe, every receiver writes its rank into it, and the sender reads back R - 1 bytes naming the other ranks.
// Returns 0 when everything matched, else the number of the first failed check.
int exchanges(int rank, const std::string& dir, int delay_ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));  // a late starter: peers retry connecting
  IpcEndpoint ep(options(rank, kRanks, dir));
  for (int k = 0; k < kExchanges; ++k) {
    int pipe_fds[2] = {-1, -1};
    if (k == 1 && ::pipe(pipe_fds) != 0) return 1;
    const std::vector<IpcEndpoint::Received> got = ep.exchange(rank * 100 + k, pipe_fds[1], "test exchange");
    if (static_cast<int>(got.size()) != kRanks) return 2;
    for (int r = 0; r < kRanks; ++r) {
      if (got[r].value != static_cast<uint64_t>(r * 100 + k)) return 3;
      if (r == rank) continue;
      if ((k == 1) != (got[r].fd >= 0)) return 4;
      if (got[r].fd >= 0) {
        const char me = static_cast<char>('0' + rank);
        if (::write(got[r].fd, &me, 1) != 1) return 5;
        ::close(got[r].fd);
      }
    }
    if (k == 1) {
      ::close(pipe_fds[1]);
      std::string seen;
      char c;
      while (seen.size() < kRanks - 1 && ::read(pipe_fds[0], &c, 1) == 1) seen += c;
      ::close(pipe_fds[0]);
      for (int r = 0; r < kRanks; ++r)
        if (r != rank && seen.find(static_cast<char>('0' + r)) == std::string::npos) return 6;
    }
    if (rank == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the others run ahead
  }
  return 0;
}

TEST(IpcRendezvous, ExchangesValuesAndDescriptorsInOrder) {
  const std::string dir = make_dir();
  // Every rank is a child process (rank 2 starts late); the test process only waits for them.
  const std::vector<int> codes = run_children({0, 1, 2}, [&](int r) { return exchanges(r, dir, r == 2 ? 300 : 0); });
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(codes[r], 0) << "rank " << r << " (see exchanges() for the check number)";
}

TEST(IpcRendezvous, MissingRankTimesOutNamingIt) {
  const std::string dir = make_dir();
  IpcEndpoint ep(options(0, 2, dir, 0.5));  // rank 1 never starts
  const auto t0 = std::chrono::steady_clock::now();
  try {
    ep.exchange(7, -1, "test exchange");
    ADD_FAILURE() << "an exchange without rank 1 returned";
  } catch (const Error& e) {
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("test exchange"), std::string::npos) << e.what();
    EXPECT_LT(waited, 5.0);
  }
}

TEST(IpcRendezvous, PeerThatDiesAfterAnExchangeIsATimeoutNamingIt) {
  const std::string dir = make_dir();
  // Rank 1 (a child) takes part in one exchange, then dies without cleaning up (its socket file stays, nobody
  // listens: connect is refused); rank 0's second exchange must be a kTimeout naming rank 1.
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 1;
    try {
      IpcEndpoint ep(options(1, 2, dir));
      code = ep.exchange(11, -1, "first").at(0).value == 10 ? 0 : 2;
    } catch (...) {
      code = 3;
    }
    std::_Exit(code);  // no destructors: like a killed process
  }
  ASSERT_GT(pid, 0);
  IpcEndpoint ep(options(0, 2, dir, 0.5));
  const std::vector<IpcEndpoint::Received> got = ep.exchange(10, -1, "first");
  EXPECT_EQ(got.at(1).value, 11u);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  try {
    ep.exchange(12, -1, "second");
    ADD_FAILURE() << "an exchange with a dead rank 1 returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kTimeout) << e.what();
    EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("second"), std::string::npos) << e.what();
  }
}

TEST(IpcRendezvous, RefusesAMissingDirectoryAndTooLongAPath) {
  try {
    IpcEndpoint ep(options(0, 2, "/nonexistent/openep/dir"));
    ADD_FAILURE() << "a missing directory was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("rendezvous_dir"), std::string::npos) << e.what();
  }
  try {
    IpcEndpoint ep(options(0, 2, "/tmp/" + std::string(200, 'x')));
    ADD_FAILURE() << "a 200-character directory was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find("too long"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace openep::detail
