// Internode sizing and layouts on the CPU (protocol/internode_layout.hpp, internode_buffer_size_hint): the size
// hint holds the worst case of every region, the halves never overlap, named slots are distinct, and the
// hint's errors name the argument.
#include <gtest/gtest.h>

#include <set>
#include <string>

#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "protocol/internode_gin_layout.hpp"
#include "protocol/internode_layout.hpp"

namespace openep::detail {
namespace {

struct Shape {
  int R, M, T, H, elt, S, K;
};

const Shape kShapes[] = {
    {2, 1, 0, 2048, 2, 0, 8},     {2, 1, 1, 2048, 2, 0, 8},    {4, 1, 127, 7168, 1, 56, 9},
    {4, 2, 4096, 7168, 2, 0, 8},  {16, 8, 4096, 7168, 1, 56, 8}, {64, 8, 512, 4096, 2, 0, 1},
    {8, 4, 300, 2048, 1, 16, 0},  {256, 8, 64, 7168, 2, 0, 8},
};

TEST(InternodeSizeHint, HoldsTheWorstCaseOfEveryRegion) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(std::to_string(s.R) + "x" + std::to_string(s.M) + " T" + std::to_string(s.T));
    const InternodeBufferSize b = internode_buffer_size_hint(s.R, s.M, s.T, s.H, s.elt, s.S, s.K);
    EXPECT_EQ(b.num_nvl_bytes % 128, 0u);
    EXPECT_EQ(b.num_rdma_bytes % 128, 0u);
    EXPECT_GT(b.num_rdma_bytes, 0u);
    const int N = s.R / s.M;
    const size_t row = static_cast<size_t>(s.H) * s.elt;
    const InternodeNvlLayout nl = InternodeNvlLayout::make(b.num_nvl_bytes, s.R, s.M);
    const InternodeRailLayout rl = InternodeRailLayout::make(b.num_rdma_bytes);
    const size_t nvl_row = InternodeRecord::nvl_bytes(row, s.K, s.S);
    const size_t cmb = InternodeRecord::combine_bytes(s.H, s.K);
    const size_t rec = InternodeRecord::rail_bytes(row, s.M, s.K, s.S);
    // Every rank receives at most R * T rows; a forwarder forwards at most N * T records (M slots each).
    EXPECT_GE(nl.dispatch_capacity(nvl_row), static_cast<int64_t>(s.R) * s.T);
    EXPECT_GE(nl.combine_capacity(s.M, cmb), static_cast<int64_t>(N) * s.T);
    // A rank sends at most N * T records and receives at most N * T (both halves, records and partials).
    EXPECT_GE(rl.capacity(rec), static_cast<int64_t>(N) * s.T);
    EXPECT_GE(rl.capacity(cmb), static_cast<int64_t>(N) * s.T);
    // The halves do not overlap and stay inside the region.
    EXPECT_LE(nl.dispatch_offset + nl.half_bytes, nl.combine_offset);
    EXPECT_LE(nl.combine_offset + nl.half_bytes, b.num_nvl_bytes);
    EXPECT_GE(nl.dispatch_offset, nl.headers_offset + sizeof(int32_t) * s.R * nl.header_stride_ints);
  }
}

// The rail area (both backends): the halves come first, every region is 4 KiB aligned, none overlaps the next.
TEST(InternodeRailArea, RegionsAreAlignedDisjointAndHoldTheirContents) {
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(std::to_string(s.R) + "x" + std::to_string(s.M) + " T" + std::to_string(s.T));
    const InternodeBufferSize b = internode_buffer_size_hint(s.R, s.M, s.T, s.H, s.elt, s.S, s.K);
    const int N = s.R / s.M;
    const InternodeRailArea a = InternodeRailArea::make(b.num_rdma_bytes, N, s.M);
    EXPECT_EQ(a.halves_offset, 0u);
    EXPECT_EQ(a.header_bytes,
              sizeof(int32_t) * N * static_cast<size_t>(InternodeRecord::header_ints(s.M, kMaxInternodeLocalExperts)));
    EXPECT_GE(a.header_send_offset, a.halves_offset + b.num_rdma_bytes);
    EXPECT_GE(a.header_recv_offset, a.header_send_offset + a.header_bytes);
    EXPECT_GE(a.barrier_offset, a.header_recv_offset + a.header_bytes);
    EXPECT_GE(a.total_bytes, a.barrier_offset + InternodeRailArea::barrier_bytes(N));
    for (size_t o : {a.header_send_offset, a.header_recv_offset, a.barrier_offset, a.total_bytes})
      EXPECT_EQ(o % InternodeRailArea::kAlign, 0u) << o;
  }
}

// The GIN rail window: control slots (written by exactly one rail peer each) are distinct, 8-byte aligned and lie
// before the area; the window holds the whole area.
TEST(GinRailLayout, ControlSlotsAreDistinctAlignedAndBeforeTheArea) {
  std::set<size_t> slots;
  for (int n = 0; n < kMaxInternodeNodes; ++n) {
    EXPECT_EQ(GinRailLayout::dest_offset(n), GinRailLayout::in_slot(n));
    EXPECT_EQ(GinRailLayout::dest_bytes(n), GinRailLayout::in_slot(n) + sizeof(uint64_t));
    for (size_t o : {GinRailLayout::in_slot(n), GinRailLayout::in_slot(n) + 8, GinRailLayout::out_slot(n),
                     GinRailLayout::out_slot(n) + 8}) {
      EXPECT_TRUE(slots.insert(o).second) << "slot " << o << " used twice";
      EXPECT_EQ(o % sizeof(uint64_t), 0u);
      EXPECT_LE(o + sizeof(uint64_t), GinRailLayout::kControlBytes);
    }
  }
  EXPECT_EQ(GinRailLayout::area_offset(), GinRailLayout::kControlBytes);
  EXPECT_EQ(GinRailLayout::kControlBytes % InternodeRailArea::kAlign, 0u);
  for (const Shape& s : kShapes) {
    const InternodeBufferSize b = internode_buffer_size_hint(s.R, s.M, s.T, s.H, s.elt, s.S, s.K);
    const InternodeRailArea a = InternodeRailArea::make(b.num_rdma_bytes, s.R / s.M, s.M);
    const size_t w = GinRailLayout::window_bytes(a.total_bytes);
    EXPECT_GE(w, GinRailLayout::area_offset() + a.total_bytes);
    EXPECT_EQ(w % InternodeRailArea::kAlign, 0u);
  }
}

TEST(InternodeSizeHint, NamesBadArguments) {
  const auto expect = [](auto f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "expected an error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect([] { internode_buffer_size_hint(16, 9, 128, 2048, 2, 0, 8); }, "ranks_per_node must be in [1, 8], got 9");
  expect([] { internode_buffer_size_hint(6, 4, 128, 2048, 2, 0, 8); }, "num_ranks must be a multiple of ranks_per_node (4)");
  expect([] { internode_buffer_size_hint(512, 8, 128, 2048, 2, 0, 8); }, "up to 256");
  expect([] { internode_buffer_size_hint(16, 8, -1, 2048, 2, 0, 8); }, "non-negative");
}

TEST(InternodeNvlLayout, FlagsAreDistinctAndBeforeTheHeaders) {
  std::set<size_t> offsets;
  for (int l = 0; l < kMaxInternodeRanksPerNode; ++l) {
    offsets.insert(InternodeNvlLayout::dispatch_ready(l));
    offsets.insert(InternodeNvlLayout::combine_ready(l));
    offsets.insert(InternodeNvlLayout::header_ready(l));
  }
  offsets.insert(InternodeNvlLayout::drained());
  offsets.insert(InternodeNvlLayout::reduced());
  EXPECT_EQ(offsets.size(), 3u * kMaxInternodeRanksPerNode + 2);
  for (size_t o : offsets) {
    EXPECT_EQ(o % 8, 0u);
    EXPECT_LT(o + 8, InternodeNvlLayout::kFlagsBytes);
  }
  const InternodeNvlLayout l = InternodeNvlLayout::make(1 << 26, 16, 8);
  EXPECT_EQ(l.headers_offset, InternodeNvlLayout::kFlagsBytes);
  EXPECT_EQ(l.header(1) - l.header(0), sizeof(int32_t) * InternodeRecord::header_ints(8, kMaxInternodeLocalExperts));
  EXPECT_EQ(l.dispatch_offset % 4096, 0u);
}

TEST(InternodeNvlLayout, TooSmallRegionHasNoRows) {
  const InternodeNvlLayout l = InternodeNvlLayout::make(4096, 4, 2);
  EXPECT_EQ(l.half_bytes, 0u);
  EXPECT_EQ(l.dispatch_capacity(1024), 0);
}

TEST(InternodeRecord, SizesAreAlignedAndCarryEveryField) {
  // BF16 7168, K 8, M 8: row 14336 + meta (1 + 8 + 16 + 0) ints = 100 B -> 112.
  EXPECT_EQ(InternodeRecord::rail_bytes(14336, 8, 8, 0), 14336u + 112u);
  // FP8 7168 with 56 scales, K 8: nvl meta (3 + 16 + 56) ints = 300 B -> 304.
  EXPECT_EQ(InternodeRecord::nvl_bytes(7168, 8, 56), 7168u + 304u);
  EXPECT_EQ(InternodeRecord::combine_bytes(7168, 8), 14336u + 32u);
  EXPECT_EQ(InternodeRecord::combine_bytes(2048, 0), 4096u);
  EXPECT_EQ(InternodeRecord::header_ints(2, 4), 1 + 2 + 8);
}

TEST(InternodeRailChunk, ChunksCoverEveryEntryOnceInOrder) {
  for (int64_t count = 0; count <= 70; ++count)
    for (int C = 1; C <= kMaxInternodeChunks; ++C) {
      int64_t next = 0;
      for (int c = 0; c < C; ++c) {
        const EntryRange r = rail_chunk(count, c, C);
        ASSERT_EQ(r.lo, next) << "count " << count << " chunks " << C << " chunk " << c;
        ASSERT_LE(r.lo, r.hi);
        ASSERT_LE(r.hi - r.lo, (count + C - 1) / C);
        next = r.hi;
      }
      ASSERT_EQ(next, count) << "count " << count << " chunks " << C;
    }
  // 10 entries in 4 chunks: 3, 3, 3, 1; 2 entries in 4 chunks: 1, 1, 0, 0.
  EXPECT_EQ(rail_chunk(10, 3, 4).lo, 9);
  EXPECT_EQ(rail_chunk(10, 3, 4).hi, 10);
  EXPECT_EQ(rail_chunk(2, 2, 4).lo, 2);
  EXPECT_EQ(rail_chunk(2, 2, 4).hi, 2);
}

}  // namespace
}  // namespace openep::detail
