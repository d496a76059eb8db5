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

}  // namespace openep
