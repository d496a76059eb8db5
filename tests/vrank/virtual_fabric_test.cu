// The virtual-rank fabric itself (openep/testing.hpp): options it refuses, the Group it makes, the window
// exchange a Buffer performs through it, the grid budget, and bounded host rendezvous.
#include <gtest/gtest.h>

#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/testing.hpp"
#include "protocol/limits.hpp"
#include "runtime/buffer_impl.hpp"

namespace openep::test {
namespace {

using testing::VirtualFabric;
using testing::VirtualFabricOptions;

int device_sms() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  return sms;
}

template <typename Fn>
void expect_error(Fn fn, ErrorCode code, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected openep::Error (" << error_code_name(code) << ") containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(VirtualFabric, RefusesBadOptionsAndGridsThatCannotBeCoResident) {
  VirtualFabricOptions o;
  o.num_ranks = 1;
  expect_error([&] { VirtualFabric f(o); }, ErrorCode::kInvalidArgument, "num_ranks must be in [2, ");
  o.num_ranks = detail::kMaxNvlinkPeers + 1;
  expect_error([&] { VirtualFabric f(o); }, ErrorCode::kInvalidArgument, "num_ranks must be in [2, ");
  // Two ranks whose grids each want every SM: both cannot be resident at once.
  o.num_ranks = 2;
  o.max_blocks_per_rank = device_sms();
  expect_error([&] { VirtualFabric f(o); }, ErrorCode::kUnsupported, "to be co-resident");
  // More ranks than the GPU has room for one block each plus a one-block kernel.
  o.max_blocks_per_rank = 0;
  o.num_ranks = device_sms() / 2 + 1;
  if (o.num_ranks <= detail::kMaxNvlinkPeers) expect_error([&] { VirtualFabric f(o); }, ErrorCode::kUnsupported, "co-resident");
}

TEST(VirtualFabric, DefaultGridCapLeavesRoomForEveryRank) {
  for (int n : {2, 4, 8, 16}) {
    VirtualFabricOptions o;
    o.num_ranks = n;
    VirtualFabric f(o);
    const int cap = f.max_blocks_per_rank();
    EXPECT_GE(cap, 2) << "EP" << n;
    EXPECT_EQ(cap % 2, 0) << "EP" << n;
    EXPECT_LE(n * (cap + 1), device_sms()) << "EP" << n;
  }
}

TEST(VirtualFabric, GroupsAndBuffersSeeEveryOtherRanksWindow) {
  VirtualFabricOptions o;
  o.num_ranks = 4;
  VirtualFabric f(o);
  std::mutex mu;
  std::vector<char*> locals(4, nullptr);
  std::vector<std::vector<char*>> tables(4);
  f.run([&](int rank, Group& g) {
    EXPECT_EQ(g.rank(), rank);
    EXPECT_EQ(g.num_ranks(), 4);
    EXPECT_EQ(g.num_nvlink_ranks(), 4);  // one NVLink domain
    EXPECT_EQ(g.nvlink_rank(), rank);
    EXPECT_EQ(g.comm(), nullptr);        // no NCCL
    BufferOptions bo;
    bo.num_nvl_bytes = 1 << 20;
    Buffer b(g, bo);
    const Buffer::Impl& m = b.impl();
    EXPECT_EQ(m.grids.max_blocks, f.max_blocks_per_rank());
    EXPECT_EQ(m.grids.grids_per_device, 4);
    EXPECT_TRUE(m.grids.clamp);
    {
      std::lock_guard<std::mutex> lock(mu);
      locals[rank] = m.win.local;
      tables[rank] = m.win.peer_bases;
    }
    // Everybody's window is published before anyone compares; a barrier through the device, then the host.
    b.barrier(b.comm_stream());
    b.synchronize(b.comm_stream());
    f.host_barrier(rank);
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(tables[rank], locals) << "rank " << rank << "'s peer table";
  });
}

TEST(VirtualFabric, HostBarrierFailsFastWhenARankHasEnded) {
  VirtualFabricOptions o;
  o.num_ranks = 3;
  o.rendezvous_timeout_seconds = 60;
  VirtualFabric f(o);
  f.run([&](int rank, Group&) {
    if (rank == 2) return;  // leaves without making the collective call
    const auto start = std::chrono::steady_clock::now();
    expect_error([&] { f.host_barrier(rank); }, ErrorCode::kTimeout, "2 (their threads already ended");
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(s, 30.0) << "a rank that has ended must not cost the whole rendezvous timeout";
  });
}

TEST(VirtualFabric, HostBarrierTimesOutNamingTheStalledRank) {
  VirtualFabricOptions o;
  o.num_ranks = 2;
  o.rendezvous_timeout_seconds = 1.0;
  VirtualFabric f(o);
  f.run([&](int rank, Group&) {
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // stalls past rank 0's timeout
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    expect_error([&] { f.host_barrier(rank); }, ErrorCode::kTimeout, "virtual rank 0 waited more than");
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_GE(s, 0.9);
    EXPECT_LT(s, 2.4) << "the wait must end at the timeout, not when the stalled rank ends";
  });
}

}  // namespace
}  // namespace openep::test
