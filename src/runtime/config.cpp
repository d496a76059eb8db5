#include "openep/config.hpp"

#include <atomic>

#include "runtime/check.hpp"

namespace openep {
namespace {

std::atomic<int> g_default_num_sms{20};

struct Row {
  int ranks, nvl_send, nvl_recv, rdma_send, rdma_recv;
};
// DeepEP V1 tables (deepep-v1-interface.md 3.2 and 3.3).
constexpr Row kDispatchTable[] = {{2, 24, 256, 6, 128},   {4, 6, 256, 6, 128},    {8, 6, 256, 6, 128},
                                  {16, 36, 288, 20, 128}, {24, 32, 288, 8, 128},  {32, 32, 288, 8, 128},
                                  {48, 32, 288, 8, 128},  {64, 32, 288, 8, 128},  {96, 20, 480, 12, 128},
                                  {128, 20, 560, 12, 128}, {144, 32, 720, 12, 128}, {160, 28, 720, 12, 128}};
constexpr Row kCombineTable[] = {{2, 10, 256, 6, 128},  {4, 9, 256, 6, 128},    {8, 4, 256, 6, 128},
                                 {16, 4, 288, 12, 128}, {24, 1, 288, 8, 128},   {32, 1, 288, 8, 128},
                                 {48, 1, 288, 8, 128},  {64, 1, 288, 8, 128},   {96, 1, 480, 8, 128},
                                 {128, 1, 560, 8, 128}, {144, 2, 720, 8, 128},  {160, 2, 720, 8, 128}};

template <size_t N>
Config lookup(const Row (&table)[N], int num_ranks, const char* what) {
  for (const Row& r : table) {
    if (r.ranks == num_ranks) {
      Config c;
      c.num_sms = default_num_sms();
      c.num_max_nvl_chunked_send_tokens = r.nvl_send;
      c.num_max_nvl_chunked_recv_tokens = r.nvl_recv;
      c.num_max_rdma_chunked_send_tokens = r.rdma_send;
      c.num_max_rdma_chunked_recv_tokens = r.rdma_recv;
      c.validate_and_normalize();
      return c;
    }
  }
  OPENEP_CHECK_ARG(false, what, ": unsupported number of EP ranks ", num_ranks,
                   " (expected one of 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)");
}

}  // namespace

void Config::validate_and_normalize() {
  OPENEP_CHECK_ARG(num_internode_chunks >= 1 && num_internode_chunks <= 16,
                   "Config.num_internode_chunks must be in [1, 16], got ", num_internode_chunks);
  OPENEP_CHECK_ARG(num_sms > 0 && num_sms % 2 == 0, "Config.num_sms must be even and > 0, got ", num_sms);
  OPENEP_CHECK_ARG(num_max_nvl_chunked_send_tokens > 0, "Config.num_max_nvl_chunked_send_tokens must be > 0, got ",
                   num_max_nvl_chunked_send_tokens);
  OPENEP_CHECK_ARG(num_max_nvl_chunked_recv_tokens > 0, "Config.num_max_nvl_chunked_recv_tokens must be > 0, got ",
                   num_max_nvl_chunked_recv_tokens);
  OPENEP_CHECK_ARG(num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens,
                   "Config: num_max_nvl_chunked_send_tokens (", num_max_nvl_chunked_send_tokens,
                   ") must be < num_max_nvl_chunked_recv_tokens (", num_max_nvl_chunked_recv_tokens, ")");
  OPENEP_CHECK_ARG(num_max_rdma_chunked_send_tokens > 0, "Config.num_max_rdma_chunked_send_tokens must be > 0, got ",
                   num_max_rdma_chunked_send_tokens);
  OPENEP_CHECK_ARG(num_max_rdma_chunked_recv_tokens > 0, "Config.num_max_rdma_chunked_recv_tokens must be > 0, got ",
                   num_max_rdma_chunked_recv_tokens);
  const int send = num_max_rdma_chunked_send_tokens;
  num_max_rdma_chunked_recv_tokens = (num_max_rdma_chunked_recv_tokens + send - 1) / send * send;
  OPENEP_CHECK_ARG(send <= num_max_rdma_chunked_recv_tokens / 2, "Config: num_max_rdma_chunked_send_tokens (", send,
                   ") must be <= half of num_max_rdma_chunked_recv_tokens (", num_max_rdma_chunked_recv_tokens, ")");
}

int default_num_sms() noexcept { return g_default_num_sms.load(); }

void set_default_num_sms(int num_sms) {
  OPENEP_CHECK_ARG(num_sms > 0 && num_sms % 2 == 0, "num_sms must be even and > 0, got ", num_sms);
  g_default_num_sms.store(num_sms);
}

Config get_dispatch_config(int num_ranks) { return lookup(kDispatchTable, num_ranks, "get_dispatch_config"); }
Config get_combine_config(int num_ranks) { return lookup(kCombineTable, num_ranks, "get_combine_config"); }

namespace {
void check_hint_args(int64_t hidden_bytes, int num_ranks) {
  OPENEP_CHECK_ARG(hidden_bytes > 0, "hidden_bytes must be > 0, got ", hidden_bytes);
  OPENEP_CHECK_ARG(num_ranks >= 1 && (num_ranks <= 8 || num_ranks % 8 == 0),
                   "num_ranks must be in [1, 8] or a multiple of 8 (DeepEP V1 rule), got ", num_ranks);
}
}  // namespace

size_t deepep_nvl_buffer_size_hint(const Config& c, int64_t hidden_bytes, int num_ranks) {
  check_hint_args(hidden_bytes, num_ranks);
  const size_t channels = static_cast<size_t>(c.num_sms) / 2;
  const size_t nvl_peers = static_cast<size_t>(num_ranks < 8 ? num_ranks : 8);
  const size_t rdma_ranks = static_cast<size_t>(num_ranks / 8 > 1 ? num_ranks / 8 : 1);
  const size_t slots = channels * nvl_peers * static_cast<size_t>(c.num_max_nvl_chunked_recv_tokens);
  const size_t kTopk = 128, kScales = 128, kIndexBytes = 8, kSourceMetaBytes = 8;
  size_t bytes = channels * nvl_peers * (2 * rdma_ranks + 3) * 4;
  bytes += slots * (static_cast<size_t>(hidden_bytes) + kSourceMetaBytes + kTopk * kIndexBytes + kTopk * 4 +
                    kScales * 4);
  return (bytes + 127) / 128 * 128;
}

size_t deepep_rdma_buffer_size_hint(const Config& c, int64_t hidden_bytes, int num_ranks) {
  check_hint_args(hidden_bytes, num_ranks);
  if (num_ranks <= 8) return 0;
  const size_t channels = static_cast<size_t>(c.num_sms) / 2;
  const size_t m = static_cast<size_t>(num_ranks / 8);
  const size_t slots = channels * m * static_cast<size_t>(c.num_max_rdma_chunked_recv_tokens);
  const size_t kTopk = 128, kScales = 128, kIndexBytes = 8;
  size_t bytes = channels * m * (8 * 2 + 2) * 2 * 4;
  bytes += slots * (static_cast<size_t>(hidden_bytes) * 2 + 8 * 2 + kTopk * kIndexBytes * 2 + kTopk * 4 * 2 +
                    kScales * 4 * 2 + 16 * 2);
  return (bytes + 127) / 128 * 128;
}

}  // namespace openep
