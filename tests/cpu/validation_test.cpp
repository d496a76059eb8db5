// Host-side validation, configs and error messages of the core (no GPU needed).
#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "kernels/launch.hpp"
#include "kernels/low_latency_launch.hpp"
#include "openep/buffer.hpp"
#include "openep/config.hpp"
#include "openep/error.hpp"
#include "openep/event.hpp"
#include "openep/low_latency.hpp"
#include "runtime/buffer_impl.hpp"

namespace openep {
namespace {

// Runs fn, expects an openep::Error with `code` whose message contains `needle`.
template <typename Fn>
void expect_error(Fn&& fn, ErrorCode code, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an openep::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message was: " << e.what();
  }
}

LayoutArgs valid_layout_args() {
  static int dummy[16];
  LayoutArgs a;
  a.topk_idx = dummy;
  a.num_tokens = 4;
  a.num_topk = 2;
  a.num_experts = 16;
  a.num_tokens_per_rank = dummy;
  a.num_tokens_per_expert = dummy;
  a.is_token_in_rank = reinterpret_cast<bool*>(dummy);
  return a;
}

TEST(LayoutValidation, AcceptsValidArguments) { EXPECT_NO_THROW(detail::validate_layout_args(valid_layout_args(), 4, 1)); }

TEST(LayoutValidation, NamesExpertsNotDivisibleByRanks) {
  LayoutArgs a = valid_layout_args();
  a.num_experts = 10;
  expect_error([&] { detail::validate_layout_args(a, 4, 1); }, ErrorCode::kInvalidArgument,
               "num_experts (10) must be a multiple of the number of ranks (4)");
}

TEST(LayoutValidation, NamesTopkOutOfRange) {
  LayoutArgs a = valid_layout_args();
  a.num_topk = 0;
  expect_error([&] { detail::validate_layout_args(a, 4, 1); }, ErrorCode::kInvalidArgument, "num_topk must be in [1, ");
}

TEST(LayoutValidation, RequiresRdmaCountsExactlyOnInternodeBuffers) {
  LayoutArgs a = valid_layout_args();
  a.num_experts = 32;
  expect_error([&] { detail::validate_layout_args(a, 16, 2); }, ErrorCode::kInvalidArgument,
               "num_tokens_per_rdma_rank output is required on an internode Buffer (2 nodes)");
  EXPECT_NO_THROW(detail::validate_layout_args(a, 16, 1));  // 16 ranks in one NVLink domain: no node counts
  int dummy[2];
  a.num_tokens_per_rdma_rank = dummy;
  EXPECT_NO_THROW(detail::validate_layout_args(a, 16, 2));
  expect_error([&] { detail::validate_layout_args(a, 4, 1); }, ErrorCode::kInvalidArgument,
               "num_tokens_per_rdma_rank must be null unless the Buffer is internode");
}

TEST(LayoutValidation, NamesNullTopkIdx) {
  LayoutArgs a = valid_layout_args();
  a.topk_idx = nullptr;
  expect_error([&] { detail::validate_layout_args(a, 4, 1); }, ErrorCode::kInvalidArgument,
               "topk_idx is null with num_tokens = 4");
  a.num_tokens = 0;  // no tokens: no input needed
  EXPECT_NO_THROW(detail::validate_layout_args(a, 4, 1));
}

TEST(ConfigTables, MatchDeepEpV1ForTwoRanks) {
  const Config d = get_dispatch_config(2);
  EXPECT_EQ(d.num_sms, default_num_sms());
  EXPECT_EQ(d.num_max_nvl_chunked_send_tokens, 24);
  EXPECT_EQ(d.num_max_nvl_chunked_recv_tokens, 256);
  EXPECT_EQ(d.num_max_rdma_chunked_recv_tokens, 132);  // 128 rounded up to a multiple of 6
  const Config c = get_combine_config(8);
  EXPECT_EQ(c.num_max_nvl_chunked_send_tokens, 4);
}

TEST(ConfigTables, RejectsUnsupportedRankCount) {
  expect_error([] { get_dispatch_config(3); }, ErrorCode::kInvalidArgument, "unsupported number of EP ranks 3");
}

TEST(ConfigValidation, RejectsOddSmCount) {
  Config c;
  c.num_sms = 7;
  expect_error([&] { c.validate_and_normalize(); }, ErrorCode::kInvalidArgument,
               "Config.num_sms must be even and > 0, got 7");
  expect_error([] { set_default_num_sms(3); }, ErrorCode::kInvalidArgument, "num_sms must be even and > 0, got 3");
}

TEST(ShrinkValidation, NeedsLowLatencyModeOverNvlink) {
  EXPECT_NO_THROW(detail::validate_shrink_options(false, false, detail::Transport::kHostP2p));
  EXPECT_NO_THROW(detail::validate_shrink_options(true, true, detail::Transport::kNvlink));
  expect_error([] { detail::validate_shrink_options(true, false, detail::Transport::kNvlink); },
               ErrorCode::kInvalidArgument, "enable_shrink requires low_latency_mode");
  expect_error([] { detail::validate_shrink_options(true, true, detail::Transport::kGin); }, ErrorCode::kUnsupported,
               "enable_shrink is available over NVLink only");
}

TEST(ConfigValidation, RejectsInternodeChunksOutOfRange) {
  for (int bad : {0, 17, -1}) {
    Config c;
    c.num_internode_chunks = bad;
    expect_error([&] { c.validate_and_normalize(); }, ErrorCode::kInvalidArgument,
                 "Config.num_internode_chunks must be in [1, 16], got " + std::to_string(bad));
  }
  Config c;
  EXPECT_EQ(c.num_internode_chunks, 4);
  c.num_internode_chunks = 16;
  EXPECT_NO_THROW(c.validate_and_normalize());
}

TEST(NcclVersion, CompiledVersionIsTheHeaderVersion) {
  EXPECT_EQ(compiled_nccl_version(), NCCL_VERSION_CODE);
  // The library on this machine is loadable without a GPU and must match what we compiled against.
  EXPECT_EQ(loaded_nccl_version(), compiled_nccl_version());
}

TEST(NcclVersion, MismatchIsRefusedNamingBothVersions) {
  EXPECT_NO_THROW(detail::check_nccl_version(22809, 22809));
  expect_error([] { detail::check_nccl_version(22809, 22903); }, ErrorCode::kVersionMismatch,
               "compiled against NCCL 22809 but NCCL 22903 is loaded");
}

TEST(ErrorFormatting, CarriesCodeAndMessage) {
  const Error e(ErrorCode::kTimeout, "f.cpp", 12, "rank 0 waited for peer 1");
  EXPECT_EQ(e.code(), ErrorCode::kTimeout);
  EXPECT_EQ(e.line(), 12);
  EXPECT_EQ(std::string(e.what()), "OpenEP timeout: rank 0 waited for peer 1");
}

}  // namespace
}  // namespace openep

namespace openep {
namespace {

TEST(EventValidation, EmptyEventIsRejectedWithoutTouchingCuda) {
  Event e;
  EXPECT_TRUE(e.empty());
  for (int op = 0; op < 3; ++op) {
    try {
      if (op == 0) e.wait(nullptr);
      if (op == 1) (void)e.query();
      if (op == 2) e.synchronize();
      ADD_FAILURE() << "operation " << op << " on an empty Event did not throw";
    } catch (const Error& err) {
      EXPECT_EQ(err.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(err.what()).find("empty Event"), std::string::npos) << err.what();
    }
  }
  Event moved = std::move(e);
  EXPECT_TRUE(moved.empty());
}

}  // namespace
}  // namespace openep

// ---- Low-latency validation (src/runtime/low_latency.cpp) ----

namespace openep {
namespace {

struct LowLatencyFixture {
  int dummy[64] = {};
  LowLatencyDispatchArgs a;
  LowLatencyDispatchOutputs out;
  LowLatencyHandle h;
  size_t bytes = 0;
  LowLatencyFixture() {
    a.x = reinterpret_cast<const uint16_t*>(dummy);
    a.num_tokens = 4;
    a.hidden = 2048;
    a.topk_idx = dummy;
    a.num_topk = 8;
    a.num_max_dispatch_tokens_per_rank = 128;
    a.num_experts = 32;
    out.packed_recv_x = dummy;
    out.packed_recv_scales = dummy;
    out.packed_recv_count = dummy;
    h.src_info = dummy;
    h.layout_range = reinterpret_cast<int64_t*>(dummy);
    bytes = low_latency_buffer_size_hint(128, 2048, 2, 32);
  }
  void check() { detail::validate_low_latency_dispatch(a, h, out, 2, bytes); }
};

TEST(LowLatencyValidation, AcceptsValidArguments) {
  LowLatencyFixture f;
  EXPECT_NO_THROW(f.check());
}

TEST(LowLatencyValidation, SizeHintGrowsWithShapesAndIsAligned) {
  const size_t a = low_latency_buffer_size_hint(128, 7168, 2, 288);
  EXPECT_EQ(a % 128, 0u);
  EXPECT_GT(low_latency_buffer_size_hint(256, 7168, 2, 288), a);
  EXPECT_GT(low_latency_buffer_size_hint(128, 8192, 2, 288), a);
  expect_error([] { low_latency_buffer_size_hint(0, 7168, 2, 288); }, ErrorCode::kInvalidArgument,
               "num_max_dispatch_tokens_per_rank");
  expect_error([] { low_latency_buffer_size_hint(128, 7168, 2, 289); }, ErrorCode::kInvalidArgument, "num_experts");
  expect_error([] { low_latency_buffer_size_hint(128, 7170, 2, 288); }, ErrorCode::kInvalidArgument, "hidden");
}

TEST(LowLatencyValidation, RejectsBadArgumentsNamingThem) {
  {
    LowLatencyFixture f;
    f.a.num_tokens = 129;
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "num_tokens");
  }
  {
    LowLatencyFixture f;
    f.a.num_topk = 0;
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "num_topk");
  }
  {
    LowLatencyFixture f;
    f.a.use_ue8m0 = true;
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "use_ue8m0 requires round_scale");
  }
  {
    LowLatencyFixture f;
    f.a.use_fp8 = false;
    f.a.round_scale = true;
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "round_scale requires use_fp8");
  }
  {
    LowLatencyFixture f;
    f.a.hidden = 2048 + 128;
    f.a.round_scale = true;
    f.a.use_ue8m0 = true;
    f.bytes = low_latency_buffer_size_hint(128, 2048 + 128, 2, 32);
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "multiple of 512");
  }
  {
    LowLatencyFixture f;
    f.a.hidden = 2048 + 8;
    f.bytes = low_latency_buffer_size_hint(128, 2048 + 8, 2, 32);
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "multiple of 128");
    f.a.use_fp8 = false;
    EXPECT_NO_THROW(f.check());
  }
  {
    LowLatencyFixture f;
    f.bytes -= 128;
    expect_error([&] { f.check(); }, ErrorCode::kBufferTooSmall, "num_rdma_bytes >= ");
  }
  {
    LowLatencyFixture f;
    f.out.packed_recv_scales = nullptr;
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "packed_recv_scales");
  }
  {
    LowLatencyFixture f;
    f.h.layout_range = nullptr;
    expect_error([&] { f.check(); }, ErrorCode::kInvalidArgument, "handle.layout_range");
  }
  {
    LowLatencyFixture f;
    LowLatencyCombineArgs c;
    LowLatencyCombineOutputs co;
    f.h.num_max_dispatch_tokens_per_rank = 128;
    f.h.hidden = 2048;
    f.h.num_experts = 32;
    c.topk_idx = f.dummy;
    c.topk_weights = reinterpret_cast<const float*>(f.dummy);
    c.num_tokens = 4;
    c.num_topk = 8;
    co.combined_x = reinterpret_cast<uint16_t*>(f.dummy);
    expect_error([&] { detail::validate_low_latency_combine(c, f.h, co, 2, f.bytes); }, ErrorCode::kInvalidArgument,
                 "x is null");
    c.zero_copy = true;
    EXPECT_NO_THROW(detail::validate_low_latency_combine(c, f.h, co, 2, f.bytes));
    c.num_tokens = 200;
    expect_error([&] { detail::validate_low_latency_combine(c, f.h, co, 2, f.bytes); }, ErrorCode::kInvalidArgument,
                 "num_tokens");
  }
}

TEST(LowLatencyValidation, LogfmtRequiresHiddenMultipleOf128NamingBoth) {
  LowLatencyFixture f;
  LowLatencyCombineArgs c;
  LowLatencyCombineOutputs co;
  f.h.num_max_dispatch_tokens_per_rank = 128;
  f.h.num_experts = 32;
  c.topk_idx = f.dummy;
  c.topk_weights = reinterpret_cast<const float*>(f.dummy);
  c.num_tokens = 4;
  c.num_topk = 8;
  c.zero_copy = true;  // LogFMT encodes from the zero-copy buffer too
  c.use_logfmt = true;
  co.combined_x = reinterpret_cast<uint16_t*>(f.dummy);
  f.h.hidden = 2048;
  EXPECT_NO_THROW(detail::validate_low_latency_combine(c, f.h, co, 2, f.bytes));
  f.h.hidden = 2048 + 8;
  f.bytes = low_latency_buffer_size_hint(128, 2048 + 8, 2, 32);
  expect_error([&] { detail::validate_low_latency_combine(c, f.h, co, 2, f.bytes); }, ErrorCode::kInvalidArgument,
               "use_logfmt requires hidden (of the handle) to be a multiple of 128 (one LogFMT metadata word per 128 "
               "channels), got 2056");
  c.use_logfmt = false;
  EXPECT_NO_THROW(detail::validate_low_latency_combine(c, f.h, co, 2, f.bytes));
}

TEST(LowLatencyValidation, SizeHintHoldsTheLogfmtMetadataOfBothCombineHalves) {
  // [signals][2 dispatch halves][2 combine halves][2 metadata halves][zero-copy]: the metadata of a combine row
  // is one uint32 per 128 channels, padded to 16 bytes.
  const detail::LowLatencyLayout l = detail::LowLatencyLayout::make(128, 2560, 2, 32);
  EXPECT_EQ(l.meta_row_bytes, 80u);
  EXPECT_EQ(l.combine_meta_offset, l.combine_offset + 2 * l.combine_half);
  EXPECT_EQ(l.combine_meta_half, 32u * 128 * 80);
  EXPECT_EQ(l.staging_offset, l.combine_meta_offset + 2 * l.combine_meta_half);
  EXPECT_EQ(l.combine_meta(1, 3, 5), l.combine_meta_offset + l.combine_meta_half + (3 * 128 + 5) * 80u);
  EXPECT_EQ(detail::LowLatencyLayout::make(128, 384, 2, 32).meta_row_bytes, 16u);  // 12 bytes, padded
  EXPECT_EQ(low_latency_buffer_size_hint(128, 2560, 2, 32), l.total);
}

}  // namespace
}  // namespace openep
