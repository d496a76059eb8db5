// Transport policy (runtime/transport.hpp) and the GIN staging layout, on the CPU. The GIN path itself has
// never run (no RDMA NICs on the test machines); these tests pin down when it is selected and how its
// window area is sized.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <utility>
#include <vector>
#include <string>

#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/low_latency.hpp"
#include "protocol/internode_gin_layout.hpp"
#include "protocol/low_latency_gin_layout.hpp"
#include "protocol/low_latency_layout.hpp"
#include "runtime/transport.hpp"

namespace openep::detail {
namespace {

TransportQuery query(int num_ranks, int num_nvlink_ranks, bool low_latency_mode, bool allow_network) {
  TransportQuery q;
  q.num_ranks = num_ranks;
  q.num_nvlink_ranks = num_nvlink_ranks;
  q.low_latency_mode = low_latency_mode;
  q.allow_network = allow_network;
  q.num_nvl_bytes = 0;
  q.num_rdma_bytes = 1 << 20;
  return q;
}

void expect_refused(const TransportQuery& q, ErrorCode code, const std::string& needle) {
  try {
    const Transport t = select_transport(q);
    ADD_FAILURE() << "expected an openep::Error containing '" << needle << "', got " << transport_name(t);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message was: " << e.what();
  }
}

TEST(TransportPolicy, SingleNodeNeverRequestsGinWhateverTheOptions) {
  for (int ranks : {1, 2, 4, 8, 72}) {
    for (bool ll : {false, true}) {
      for (bool allow : {false, true}) {
        TransportQuery q = query(ranks, ranks, ll, allow);
        q.num_nvl_bytes = 4096;  // the network-only field checks must not apply on one node
        EXPECT_EQ(select_transport(q), Transport::kNvlink) << ranks << " ranks, ll " << ll << ", allow " << allow;
      }
    }
  }
}

TEST(TransportPolicy, MultiNodeLowLatencyWithoutOptInIsRefusedNamingTheOption) {
  expect_refused(query(16, 8, true, false), ErrorCode::kUnsupported, "BufferOptions::allow_network");
  expect_refused(query(2, 1, true, false), ErrorCode::kUnsupported, "span several NVLink domains");
}

TEST(TransportPolicy, MultiNodeWithOptInSelectsGinInLowLatencyMode) {
  EXPECT_EQ(select_transport(query(16, 8, true, true)), Transport::kGin);
  EXPECT_EQ(select_transport(query(2, 1, true, true)), Transport::kGin);
}

// Internode normal mode needs no opt-in (DeepEP: num_rdma_bytes > 0 on a multi-node Group), whatever
// allow_network says, and never GIN.
TEST(TransportPolicy, MultiNodeNormalModeSelectsHostP2pWithBothRegions) {
  for (bool allow : {false, true}) {
    TransportQuery q = query(16, 8, false, allow);
    q.num_nvl_bytes = 1 << 20;
    EXPECT_EQ(select_transport(q), Transport::kHostP2p) << "allow_network " << allow;
    q = query(2, 1, false, allow);
    q.num_nvl_bytes = 1 << 20;
    EXPECT_EQ(select_transport(q), Transport::kHostP2p) << "allow_network " << allow;
  }
  TransportQuery q = query(16, 8, false, false);
  q.num_nvl_bytes = 1 << 20;
  q.num_rdma_bytes = 0;
  expect_refused(q, ErrorCode::kUnsupported, "num_rdma_bytes > 0");
  q = query(16, 8, false, false);
  q.num_nvl_bytes = 0;
  expect_refused(q, ErrorCode::kInvalidArgument, "num_nvl_bytes > 0");
}

TEST(TransportPolicy, NetworkPathValidatesItsOptions) {
  TransportQuery q = query(16, 8, true, true);
  q.num_nvl_bytes = 128;
  expect_refused(q, ErrorCode::kInvalidArgument, "num_nvl_bytes must be 0");
  q = query(16, 8, true, true);
  q.num_rdma_bytes = 0;
  expect_refused(q, ErrorCode::kInvalidArgument, "num_rdma_bytes must be > 0");
  expect_refused(query(512, 8, true, true), ErrorCode::kUnsupported, "up to 256 ranks");
}

TEST(TransportPolicy, AllowNetworkIsOffByDefault) { EXPECT_FALSE(BufferOptions{}.allow_network); }

// GIN requirements ask for `signals` user signals and nothing else (no counters, no forced GIN, no multicast, no
// barriers, no resource lists), so every rank builds the same struct.
void expect_signals_only(const ncclDevCommRequirements& r, int signals) {
  EXPECT_EQ(r.ginSignalCount, signals);
  EXPECT_EQ(r.ginCounterCount, 0);
  EXPECT_FALSE(r.ginForceEnable);
  EXPECT_FALSE(r.lsaMultimem);  // multicast stays off
  EXPECT_EQ(r.resourceRequirementsList, nullptr);
  EXPECT_EQ(r.teamRequirementsList, nullptr);
  EXPECT_EQ(r.lsaBarrierCount, 0);
  EXPECT_EQ(r.barrierCount, 0);
  EXPECT_EQ(r.railGinBarrierCount, 0);
}

TEST(GinRequirements, AskForSignalsOnlyAndTheSameOnEveryRank) {
  expect_signals_only(gin_dev_comm_requirements(16), GinSignals::count(16));
}

TEST(GinSignals, IdsAreDistinctAndInRange) {
  for (int R : {2, 3, 16, kMaxGinRanks}) {
    std::set<int> ids;
    for (int s = 0; s < R; ++s) {
      ids.insert(GinSignals::dispatch(s));
      ids.insert(GinSignals::combine(R, s));
      ids.insert(GinSignals::barrier(R, s));
      EXPECT_LT(GinSignals::dispatch(s), GinSignals::num_resettable(R));
      EXPECT_LT(GinSignals::combine(R, s), GinSignals::num_resettable(R));
      EXPECT_GE(GinSignals::barrier(R, s), GinSignals::num_resettable(R));  // barriers are never reset
    }
    EXPECT_EQ(static_cast<int>(ids.size()), GinSignals::count(R));
    EXPECT_EQ(*ids.rbegin(), GinSignals::count(R) - 1);
  }
}

// ---- internode backend: the GIN rail only when asked, only on a multi-node normal-mode Group ----

TransportQuery internode_query(int num_ranks, int num_nvlink_ranks, bool gin) {
  TransportQuery q = query(num_ranks, num_nvlink_ranks, false, false);
  q.num_nvl_bytes = 1 << 20;
  q.internode_gin = gin;
  return q;
}

TEST(TransportPolicy, InternodeBackendIsHostP2pByDefault) {
  EXPECT_EQ(BufferOptions{}.internode_backend, InternodeBackend::kHostP2p);
}

TEST(TransportPolicy, InternodeGinIsSelectedOnlyWhenAsked) {
  for (const auto& shape : {std::pair<int, int>{16, 8}, {2, 1}, {64, 8}, {256, 4}}) {
    for (bool allow : {false, true}) {
      TransportQuery q = internode_query(shape.first, shape.second, false);
      q.allow_network = allow;  // the low-latency opt-in never selects the internode GIN rail
      EXPECT_EQ(select_transport(q), Transport::kHostP2p) << shape.first << "x" << shape.second << " allow " << allow;
      q.internode_gin = true;
      EXPECT_EQ(select_transport(q), Transport::kInternodeGin) << shape.first << "x" << shape.second;
    }
  }
  EXPECT_TRUE(is_internode(Transport::kHostP2p));
  EXPECT_TRUE(is_internode(Transport::kInternodeGin));
  EXPECT_FALSE(is_internode(Transport::kNvlink));
  EXPECT_FALSE(is_internode(Transport::kGin));
  EXPECT_NE(std::string(transport_name(Transport::kInternodeGin)).find("not yet run"), std::string::npos);
}

TEST(TransportPolicy, InternodeGinOnASingleNodeIsRefusedNamingTheOption) {
  for (int ranks : {1, 2, 8}) {
    expect_refused(internode_query(ranks, ranks, true), ErrorCode::kUnsupported,
                   "BufferOptions::internode_backend = kGin needs a Group over several nodes");
    expect_refused(internode_query(ranks, ranks, true), ErrorCode::kUnsupported, "leave internode_backend at kHostP2p");
  }
}

TEST(TransportPolicy, InternodeGinInLowLatencyModeIsRefusedNamingTheOption) {
  for (const auto& shape : {std::pair<int, int>{16, 8}, {8, 8}}) {
    TransportQuery q = query(shape.first, shape.second, true, true);
    q.internode_gin = true;
    expect_refused(q, ErrorCode::kInvalidArgument, "internode_backend = kGin applies to internode normal mode");
  }
}

TEST(TransportPolicy, InternodeGinStillNeedsBothRegions) {
  TransportQuery q = internode_query(16, 8, true);
  q.num_rdma_bytes = 0;
  expect_refused(q, ErrorCode::kUnsupported, "num_rdma_bytes > 0");
  q = internode_query(16, 8, true);
  q.num_nvl_bytes = 0;
  expect_refused(q, ErrorCode::kInvalidArgument, "num_nvl_bytes > 0");
}

// The Group's and the node communicators of an internode Buffer never ask for GIN (NCCL would turn it on by itself
// and, without GIN NICs, poison them); the rail asks only under the GIN backend.
TEST(TransportPolicy, OnlyTheChosenCommunicatorEverRequestsGin) {
  for (Transport t : {Transport::kNvlink, Transport::kGin, Transport::kHostP2p, Transport::kInternodeGin}) {
    for (CommRole r : {CommRole::kGroup, CommRole::kNode, CommRole::kRail}) {
      const bool want = (t == Transport::kGin && r == CommRole::kGroup) ||
                        (t == Transport::kInternodeGin && r == CommRole::kRail);
      EXPECT_EQ(requests_gin(t, r), want) << transport_name(t) << ", role " << static_cast<int>(r);
    }
  }
  for (Transport t : {Transport::kHostP2p, Transport::kInternodeGin}) {
    EXPECT_FALSE(requests_gin(t, CommRole::kGroup)) << transport_name(t);
    EXPECT_FALSE(requests_gin(t, CommRole::kNode)) << transport_name(t);
  }
}

TEST(TransportPolicy, GinUnavailableMessageNamesTheOptionNcclsReasonAndTheWayOut) {
  const std::string m = gin_unavailable_message(kInternodeGinOption, "invalid usage", "GIN not supported.",
                                                kInternodeGinRemedy);
  for (const char* part : {"BufferOptions::internode_backend = kGin", "ncclDevCommCreate", "invalid usage",
                           "GIN not supported.", "RDMA NICs", "socket transport", "rail communicator is aborted",
                           "Group's communicator was not touched", "kHostP2p"})
    EXPECT_NE(m.find(part), std::string::npos) << "message lacks \"" << part << "\": " << m;
}

TEST(GinRailRequirements, AskForRailSignalsOnlyAndTheSameOnEveryRank) {
  for (int N : {2, 3, 16, kMaxInternodeNodes}) {
    SCOPED_TRACE(N);
    expect_signals_only(gin_rail_dev_comm_requirements(N), GinRailSignals::count(N));
  }
}

// ready(s) and data(N, s) of every rail rank s are exactly the ids 0 .. count(N) - 1, each once.
TEST(GinRailSignals, IdsAreDistinctAndInRange) {
  for (int N : {2, 3, 16, kMaxInternodeNodes}) {
    std::vector<int> ids;
    for (int s = 0; s < N; ++s) ids.push_back(GinRailSignals::ready(s)), ids.push_back(GinRailSignals::data(N, s));
    std::sort(ids.begin(), ids.end());
    ASSERT_EQ(static_cast<int>(ids.size()), GinRailSignals::count(N));
    for (int i = 0; i < GinRailSignals::count(N); ++i) EXPECT_EQ(ids[i], i) << N << " nodes";
  }
}

// For every shape the low-latency region holds (num_rdma_bytes = the size hint), the GIN staging of that
// shape fits the area the Buffer reserves, and its offsets are aligned for int4 stores.
TEST(LowLatencyGinLayout, StagingFitsTheReservedAreaForEveryShapeTheRegionHolds) {
  for (int R : {2, 3, 8, 16, 64, 256}) {
    for (int T : {1, 7, 128, 1024}) {
      for (int hidden : {128, 2048, 7168, 8192}) {
        const int E = R * 4;
        const size_t rdma = low_latency_buffer_size_hint(T, hidden, R, E);
        const LowLatencyGinLayout g = LowLatencyGinLayout::make(T, hidden, R);
        EXPECT_LE(g.used, LowLatencyGinLayout::area_bytes(rdma)) << R << " ranks, T " << T << ", hidden " << hidden;
        EXPECT_EQ(g.payload_bytes % 16, 0u);
        EXPECT_EQ(g.payload_offset % 16, 0u);
        EXPECT_EQ(g.header_offset % 128, 0u);
        EXPECT_GE(g.payload_bytes, static_cast<size_t>(2 * hidden));  // a BF16 row fits
      }
    }
  }
  EXPECT_GE(LowLatencyGinLayout::kControlBytes,
            LowLatencyGinLayout::kCombineFlags + sizeof(uint64_t) * kMaxGinRanks);
  EXPECT_EQ(LowLatencyGinLayout::kControlBytes % 4096, 0u);
}

}  // namespace
}  // namespace openep::detail
