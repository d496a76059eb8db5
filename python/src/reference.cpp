// Binding of the CPU reference (reference/openep/reference.hpp), so that the Python tests compare the GPU
// results with the specification itself rather than with a Python rewrite of it.
//
// Arrays cross as `bytes` (little-endian, row-major, the element types documented in reference.hpp); the
// Python side turns them into tensors with torch.frombuffer. Errors of the reference (std::invalid_argument)
// arrive as ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "openep/reference.hpp"

namespace nb = nanobind;
namespace ref = openep::ref;

namespace {

template <typename T>
std::vector<T> from_bytes(const nb::bytes& b, const char* what) {
  if (b.size() % sizeof(T) != 0) {
    throw std::invalid_argument(std::string(what) + ": byte length " + std::to_string(b.size()) +
                                " is not a multiple of " + std::to_string(sizeof(T)));
  }
  std::vector<T> v(b.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), b.c_str(), b.size());
  return v;
}

template <typename T>
nb::bytes to_bytes(const std::vector<T>& v) {
  return nb::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// A reference dispatch kept alive for the matching reference combine.
struct RefDispatch {
  ref::NormalConfig cfg;
  std::vector<ref::RankInput> inputs;
  std::vector<ref::RankRecv> recv;
};

nb::dict recv_dict(const ref::RankRecv& r) {
  nb::dict d;
  d["num_recv_tokens"] = r.num_recv_tokens;
  d["x"] = to_bytes(r.x);
  d["x_scales"] = to_bytes(r.x_scales);
  d["topk_idx"] = to_bytes(r.topk_idx);
  d["topk_weights"] = to_bytes(r.topk_weights);
  d["src_rank"] = to_bytes(r.src_rank);
  d["src_idx"] = to_bytes(r.src_idx);
  d["num_recv_from_rank"] = r.num_recv_from_rank;
  d["rank_prefix"] = r.rank_prefix;
  d["num_recv_tokens_per_expert"] = r.num_recv_tokens_per_expert;
  d["send_pos"] = to_bytes(r.send_pos);
  return d;
}

// A reference low-latency dispatch over all ranks, kept for the matching reference combine.
struct RefLowLatency {
  ref::LowLatencyConfig cfg;
  std::vector<ref::LowLatencyInput> inputs;
  std::vector<ref::LowLatencyRecv> recv;
};

}  // namespace

void bind_reference(nb::module_& m) {
  m.def("ref_get_dispatch_layout",
        [](nb::bytes topk_idx_int64, int num_tokens, int num_topk, int num_experts, int num_ranks, int ranks_per_node) {
          const std::vector<int64_t> topk = from_bytes<int64_t>(topk_idx_int64, "topk_idx");
          const ref::Layout l =
              ranks_per_node > 0
                  ? ref::get_dispatch_layout(topk, num_tokens, num_topk, num_experts, num_ranks, ranks_per_node)
                  : ref::get_dispatch_layout(topk, num_tokens, num_topk, num_experts, num_ranks);
          nb::dict d;
          d["num_tokens_per_rank"] = l.num_tokens_per_rank;
          d["num_tokens_per_rdma_rank"] = l.num_tokens_per_rdma_rank;
          d["num_tokens_per_expert"] = l.num_tokens_per_expert;
          d["is_token_in_rank"] = to_bytes(l.is_token_in_rank);
          return d;
        },
        nb::arg("topk_idx_int64"), nb::arg("num_tokens"), nb::arg("num_topk"), nb::arg("num_experts"),
        nb::arg("num_ranks"), nb::arg("ranks_per_node") = 0,
        "openep::ref::get_dispatch_layout. topk_idx as int64 bytes [N][K]; returns lists and bool bytes [N][R]. "
        "ranks_per_node > 0: nodes of that many ranks (num_tokens_per_rdma_rank per node, internode); 0: DeepEP's "
        "rule (nodes of 8 above 8 ranks).");

  nb::class_<RefDispatch>(m, "RefDispatch", "Result of ref_dispatch (all ranks), input of ref_combine.")
      .def("recv", [](const RefDispatch& r, int rank) {
        if (rank < 0 || rank >= static_cast<int>(r.recv.size())) throw std::invalid_argument("rank out of range");
        return recv_dict(r.recv[rank]);
      }, nb::arg("rank"),
      "Rows received by `rank`: dict of num_recv_tokens, x (bytes), x_scales (uint32 bytes), topk_idx (int64 "
      "bytes, local ids), topk_weights (float32 bytes), src_rank/src_idx (int32 bytes), num_recv_from_rank, "
      "rank_prefix, num_recv_tokens_per_expert (lists), send_pos (int32 bytes [N][R], this rank as source).");

  m.def("ref_dispatch",
        [](int num_ranks, int num_experts, int hidden, int num_topk, int elem_bytes, int num_scales,
           int expert_alignment, bool with_topk, std::vector<std::tuple<int, nb::bytes, nb::bytes, nb::bytes, nb::bytes>>
               ranks) {
          RefDispatch r;
          r.cfg.num_ranks = num_ranks;
          r.cfg.num_experts = num_experts;
          r.cfg.hidden = hidden;
          r.cfg.num_topk = num_topk;
          r.cfg.elem_bytes = elem_bytes;
          r.cfg.num_scales = num_scales;
          r.cfg.expert_alignment = expert_alignment;
          r.cfg.with_topk = with_topk;
          for (auto& [n, x, scales, idx, w] : ranks) {
            ref::RankInput in;
            in.num_tokens = n;
            in.x = from_bytes<uint8_t>(x, "x");
            in.x_scales = from_bytes<uint32_t>(scales, "x_scales");
            in.topk_idx = from_bytes<int64_t>(idx, "topk_idx");
            in.topk_weights = from_bytes<float>(w, "topk_weights");
            r.inputs.push_back(std::move(in));
          }
          r.recv = ref::dispatch(r.inputs, r.cfg);
          return r;
        },
        nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("hidden"), nb::arg("num_topk"), nb::arg("elem_bytes"),
        nb::arg("num_scales"), nb::arg("expert_alignment"), nb::arg("with_topk"), nb::arg("ranks"),
        "openep::ref::dispatch over all ranks. ranks[s] = (num_tokens, x bytes, x_scales uint32 bytes, topk_idx "
        "int64 bytes, topk_weights float32 bytes).");

  m.def("ref_combine",
        [](const RefDispatch& r, std::vector<std::tuple<nb::bytes, nb::bytes>> ranks, std::vector<nb::bytes> bias0,
           std::vector<nb::bytes> bias1, int ranks_per_node) {
          std::vector<ref::CombineInput> in;
          for (auto& [x, w] : ranks) {
            ref::CombineInput c;
            c.x = from_bytes<uint16_t>(x, "x");
            c.topk_weights = from_bytes<float>(w, "topk_weights");
            in.push_back(std::move(c));
          }
          std::vector<std::vector<uint16_t>> b0, b1;
          for (auto& b : bias0) b0.push_back(from_bytes<uint16_t>(b, "bias_0"));
          for (auto& b : bias1) b1.push_back(from_bytes<uint16_t>(b, "bias_1"));
          const std::vector<ref::CombineOutput> out =
              ranks_per_node > 0 ? ref::combine_internode(in, r.recv, r.inputs, r.cfg, ranks_per_node, b0, b1)
                                 : ref::combine(in, r.recv, r.inputs, r.cfg, b0, b1);
          std::vector<std::tuple<nb::bytes, nb::bytes>> res;
          for (const auto& o : out) res.emplace_back(to_bytes(o.x), to_bytes(o.topk_weights));
          return res;
        },
        nb::arg("dispatched"), nb::arg("ranks"), nb::arg("bias_0"), nb::arg("bias_1"), nb::arg("ranks_per_node") = 0,
        "openep::ref::combine (ranks_per_node = 0) or ref::combine_internode (nodes of ranks_per_node ranks: per "
        "node in fp32, BF16 node partials, nodes ascending). ranks[d] = (x bf16 bytes [num_recv][H], topk_weights "
        "float32 bytes); bias lists empty or one bf16 bytes [N][H] per rank. Returns [(x bf16 bytes, weights "
        "float32 bytes)] per rank.");

  nb::class_<RefLowLatency>(m, "RefLowLatency", "Result of ref_low_latency_dispatch (all ranks), input of "
                            "ref_low_latency_combine.")
      .def("recv", [](const RefLowLatency& r, int rank) {
        if (rank < 0 || rank >= static_cast<int>(r.recv.size())) throw std::invalid_argument("rank out of range");
        const ref::LowLatencyRecv& v = r.recv[rank];
        nb::dict d;
        d["count"] = v.count;
        d["packed_x"] = to_bytes(v.packed_x);
        d["packed_scales"] = to_bytes(v.packed_scales);
        d["packed_scales_ue8m0"] = to_bytes(v.packed_scales_ue8m0);
        d["src_info"] = to_bytes(v.src_info);
        d["layout_range"] = to_bytes(v.layout_range);
        return d;
      }, nb::arg("rank"),
      "What `rank` receives (reference placement): count (list [E_local]), packed_x bytes [E_local][R*T][row bytes], "
      "packed_scales float32 bytes [E_local][R*T][hidden/128] (logical layout; empty unless FP8 without UE8M0), "
      "packed_scales_ue8m0 uint32 bytes [E_local][R*T][hidden/512] (empty unless UE8M0), src_info int32 bytes "
      "[E_local][R*T] (-1 beyond count), layout_range int64 bytes [E_local][R].");

  m.def("ref_low_latency_dispatch",
        [](int num_ranks, int num_experts, int hidden, int num_topk, int T, bool use_fp8, bool round_scale,
           bool use_ue8m0, std::vector<std::tuple<int, nb::bytes, nb::bytes, nb::bytes>> ranks) {
          RefLowLatency r;
          r.cfg.num_ranks = num_ranks;
          r.cfg.num_experts = num_experts;
          r.cfg.hidden = hidden;
          r.cfg.num_topk = num_topk;
          r.cfg.num_max_dispatch_tokens_per_rank = T;
          r.cfg.use_fp8 = use_fp8;
          r.cfg.round_scale = round_scale;
          r.cfg.use_ue8m0 = use_ue8m0;
          for (auto& [n, x, idx, w] : ranks) {
            ref::LowLatencyInput in;
            in.num_tokens = n;
            in.x = from_bytes<uint16_t>(x, "x");
            in.topk_idx = from_bytes<int64_t>(idx, "topk_idx");
            in.topk_weights = from_bytes<float>(w, "topk_weights");
            r.inputs.push_back(std::move(in));
          }
          {
            nb::gil_scoped_release release;
            r.recv = ref::low_latency_dispatch(r.inputs, r.cfg);
          }
          return r;
        },
        nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("hidden"), nb::arg("num_topk"),
        nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("use_fp8"), nb::arg("round_scale"), nb::arg("use_ue8m0"),
        nb::arg("ranks"),
        "openep::ref::low_latency_dispatch over all ranks. ranks[s] = (num_tokens, x bf16 bytes [N][H], topk_idx "
        "int64 bytes [N][K], topk_weights float32 bytes [N][K] (may be empty when only dispatch is checked)).");

  m.def("ref_low_latency_combine",
        [](const RefLowLatency& r, std::vector<nb::bytes> expert_out, bool use_logfmt) {
          std::vector<std::vector<uint16_t>> eo;
          for (auto& b : expert_out) eo.push_back(from_bytes<uint16_t>(b, "expert_out"));
          std::vector<std::vector<uint16_t>> out;
          {
            nb::gil_scoped_release release;
            out = ref::low_latency_combine(eo, r.recv, r.inputs, r.cfg, use_logfmt);
          }
          std::vector<nb::bytes> res;
          for (const auto& o : out) res.push_back(to_bytes(o));
          return res;
        },
        nb::arg("dispatched"), nb::arg("expert_out"), nb::arg("use_logfmt") = false,
        "openep::ref::low_latency_combine with the reference's own placement. expert_out[d] = bf16 bytes "
        "[E_local][R*T][H] of rank d, rows placed as dispatched.recv(d) says; use_logfmt: the LogFMT-10 transport. "
        "Returns bf16 bytes [N_s][H] per rank.");
}
