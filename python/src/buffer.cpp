// Binding of openep::Group + openep::Buffer as one object, openep._C.Runtime.
//
// Arguments cross as plain dicts of ints (device addresses, shapes, strides) whose keys mirror the fields of
// the core's argument structs; unknown keys are rejected, so a typo in python/openep/ fails loudly. Streams
// cross as cudaStream_t addresses (torch.cuda.Stream.cuda_stream). Calls that may block the host (NCCL init,
// window registration, the exact-mode count wait, synchronize) release the GIL.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>

#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/group.hpp"
#include "openep/low_latency.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"

namespace nb = nanobind;

namespace {

[[noreturn]] void fail(openep::ErrorCode code, const std::string& msg) {
  throw openep::Error(code, __FILE__, __LINE__, msg);
}

// Strict dict access: every key of `d` must be in `allowed`.
void check_keys(const nb::dict& d, std::initializer_list<const char*> allowed, const char* what) {
  for (auto [k, v] : d) {
    const std::string key = nb::cast<std::string>(k);
    bool ok = false;
    for (const char* a : allowed) ok = ok || key == a;
    if (!ok) fail(openep::ErrorCode::kInternal, std::string(what) + ": unknown field '" + key + "'");
  }
}
template <typename T>
T* ptr(const nb::dict& d, const char* k) {
  return d.contains(k) ? reinterpret_cast<T*>(nb::cast<uintptr_t>(d[k])) : nullptr;
}
int64_t num(const nb::dict& d, const char* k, int64_t def) { return d.contains(k) ? nb::cast<int64_t>(d[k]) : def; }
cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

openep::Config config_of(const nb::dict& d) {
  return d.contains("config") ? nb::cast<openep::Config>(d["config"]) : openep::Config{};
}

openep::IntranodeHandle handle_of(const nb::dict& d) {
  check_keys(d, {"num_tokens", "num_recv_tokens", "is_token_in_rank", "rank_prefix_matrix", "num_tokens_per_src",
                 "send_pos", "recv_src_idx"}, "handle");
  openep::IntranodeHandle h;
  h.num_tokens = static_cast<int>(num(d, "num_tokens", 0));
  h.num_recv_tokens = static_cast<int>(num(d, "num_recv_tokens", 0));
  h.is_token_in_rank = ptr<const bool>(d, "is_token_in_rank");
  h.rank_prefix_matrix = ptr<int>(d, "rank_prefix_matrix");
  h.num_tokens_per_src = ptr<int>(d, "num_tokens_per_src");
  h.send_pos = ptr<int>(d, "send_pos");
  h.recv_src_idx = ptr<int>(d, "recv_src_idx");
  return h;
}

openep::DispatchArgs dispatch_args_of(const nb::dict& d) {
  check_keys(d, {"x", "num_tokens", "hidden", "x_elem_bytes", "x_scales", "num_scales", "scale_token_stride",
                 "scale_hidden_stride", "topk_idx", "topk_int64", "topk_weights", "num_topk", "is_token_in_rank",
                 "num_tokens_per_rank", "num_tokens_per_expert", "num_experts", "expert_alignment",
                 "num_worst_tokens", "config", "num_tokens_per_rdma_rank", "max_tokens_per_rank"}, "dispatch arguments");
  openep::DispatchArgs a;
  a.x = ptr<const void>(d, "x");
  a.num_tokens = static_cast<int>(num(d, "num_tokens", 0));
  a.hidden = static_cast<int>(num(d, "hidden", 0));
  a.x_elem_bytes = static_cast<int>(num(d, "x_elem_bytes", 2));
  a.x_scales = ptr<const void>(d, "x_scales");
  a.num_scales = static_cast<int>(num(d, "num_scales", 0));
  a.scale_token_stride = num(d, "scale_token_stride", 0);
  a.scale_hidden_stride = num(d, "scale_hidden_stride", 1);
  a.topk_idx = ptr<const void>(d, "topk_idx");
  a.index_type = num(d, "topk_int64", 1) ? openep::IndexType::kInt64 : openep::IndexType::kInt32;
  a.topk_weights = ptr<const float>(d, "topk_weights");
  a.num_topk = static_cast<int>(num(d, "num_topk", 0));
  a.is_token_in_rank = ptr<const bool>(d, "is_token_in_rank");
  a.num_tokens_per_rank = ptr<const int>(d, "num_tokens_per_rank");
  a.num_tokens_per_expert = ptr<const int>(d, "num_tokens_per_expert");
  a.num_experts = static_cast<int>(num(d, "num_experts", 0));
  a.expert_alignment = static_cast<int>(num(d, "expert_alignment", 1));
  a.num_worst_tokens = static_cast<int>(num(d, "num_worst_tokens", 0));
  a.config = config_of(d);
  a.num_tokens_per_rdma_rank = ptr<const int>(d, "num_tokens_per_rdma_rank");
  a.max_tokens_per_rank = static_cast<int>(num(d, "max_tokens_per_rank", 0));
  return a;
}

// Internode handle: device arrays as addresses, host fields as ints and lists (openep/internode.hpp).
openep::InternodeHandle internode_handle_of(const nb::dict& d) {
  check_keys(d, {"num_tokens", "num_recv_tokens", "num_rdma_recv_tokens", "is_token_in_rank", "send_pos",
                 "send_rdma_head", "node_prefix", "recv_gbl_rank_prefix_sum", "recv_rdma_rank_prefix_sum",
                 "recv_rdma_mask", "recv_src_idx", "recv_src_meta", "rdma_send_counts", "rdma_recv_counts",
                 "records_per_node", "hidden", "num_topk"}, "internode handle");
  openep::InternodeHandle h;
  h.num_tokens = static_cast<int>(num(d, "num_tokens", 0));
  h.num_recv_tokens = static_cast<int>(num(d, "num_recv_tokens", 0));
  h.num_rdma_recv_tokens = static_cast<int>(num(d, "num_rdma_recv_tokens", 0));
  h.is_token_in_rank = ptr<const bool>(d, "is_token_in_rank");
  h.send_pos = ptr<int>(d, "send_pos");
  h.send_rdma_head = ptr<int>(d, "send_rdma_head");
  h.node_prefix = ptr<int>(d, "node_prefix");
  h.recv_gbl_rank_prefix_sum = ptr<int>(d, "recv_gbl_rank_prefix_sum");
  h.recv_rdma_rank_prefix_sum = ptr<int>(d, "recv_rdma_rank_prefix_sum");
  h.recv_rdma_mask = ptr<int>(d, "recv_rdma_mask");
  h.recv_src_idx = ptr<int>(d, "recv_src_idx");
  h.recv_src_meta = ptr<int>(d, "recv_src_meta");
  if (d.contains("rdma_send_counts")) h.rdma_send_counts = nb::cast<std::vector<int>>(d["rdma_send_counts"]);
  if (d.contains("rdma_recv_counts")) h.rdma_recv_counts = nb::cast<std::vector<int>>(d["rdma_recv_counts"]);
  h.records_per_node = static_cast<int>(num(d, "records_per_node", 0));
  h.hidden = static_cast<int>(num(d, "hidden", 0));
  h.num_topk = static_cast<int>(num(d, "num_topk", 0));
  return h;
}

// The host fields internode_dispatch_prepare filled, for the Python handle to keep.
nb::dict internode_host_fields(const openep::InternodeHandle& h) {
  nb::dict d;
  d["num_recv_tokens"] = h.num_recv_tokens;
  d["num_rdma_recv_tokens"] = h.num_rdma_recv_tokens;
  d["rdma_send_counts"] = h.rdma_send_counts;
  d["rdma_recv_counts"] = h.rdma_recv_counts;
  d["records_per_node"] = h.records_per_node;
  d["hidden"] = h.hidden;
  d["num_topk"] = h.num_topk;
  return d;
}

openep::CombineArgs combine_args_of(const nb::dict& d) {
  check_keys(d, {"x", "hidden", "topk_weights", "num_topk", "bias_0", "bias_1", "config"}, "combine arguments");
  openep::CombineArgs a;
  a.x = ptr<const uint16_t>(d, "x");
  a.hidden = static_cast<int>(num(d, "hidden", 0));
  a.topk_weights = ptr<const float>(d, "topk_weights");
  a.num_topk = static_cast<int>(num(d, "num_topk", 0));
  a.bias_0 = ptr<const uint16_t>(d, "bias_0");
  a.bias_1 = ptr<const uint16_t>(d, "bias_1");
  a.config = config_of(d);
  return a;
}

openep::CombineOutputs combine_outputs_of(const nb::dict& out) {
  check_keys(out, {"combined_x", "combined_topk_weights"}, "combine outputs");
  openep::CombineOutputs o;
  o.combined_x = ptr<uint16_t>(out, "combined_x");
  o.combined_topk_weights = ptr<float>(out, "combined_topk_weights");
  return o;
}

openep::DispatchOutputs dispatch_outputs_of(const nb::dict& d) {
  check_keys(d, {"recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights"}, "dispatch outputs");
  openep::DispatchOutputs o;
  o.recv_x = ptr<void>(d, "recv_x");
  o.recv_x_scales = ptr<void>(d, "recv_x_scales");
  o.recv_topk_idx = ptr<void>(d, "recv_topk_idx");
  o.recv_topk_weights = ptr<float>(d, "recv_topk_weights");
  return o;
}

openep::LowLatencyHandle ll_handle_of(const nb::dict& d) {
  check_keys(d, {"src_info", "layout_range", "num_max_dispatch_tokens_per_rank", "hidden", "num_experts"},
             "low-latency handle");
  openep::LowLatencyHandle h;
  h.src_info = ptr<int>(d, "src_info");
  h.layout_range = ptr<int64_t>(d, "layout_range");
  h.num_max_dispatch_tokens_per_rank = static_cast<int>(num(d, "num_max_dispatch_tokens_per_rank", 0));
  h.hidden = static_cast<int>(num(d, "hidden", 0));
  h.num_experts = static_cast<int>(num(d, "num_experts", 0));
  return h;
}

openep::LowLatencyDispatchArgs ll_dispatch_args_of(const nb::dict& d) {
  check_keys(d, {"x", "num_tokens", "hidden", "topk_idx", "topk_int64", "num_topk",
                 "num_max_dispatch_tokens_per_rank", "num_experts", "use_fp8", "round_scale", "use_ue8m0",
                 "cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats", "return_recv_hook"},
             "low_latency_dispatch arguments");
  openep::LowLatencyDispatchArgs a;
  a.x = ptr<const uint16_t>(d, "x");
  a.num_tokens = static_cast<int>(num(d, "num_tokens", 0));
  a.hidden = static_cast<int>(num(d, "hidden", 0));
  a.topk_idx = ptr<const void>(d, "topk_idx");
  a.index_type = num(d, "topk_int64", 1) ? openep::IndexType::kInt64 : openep::IndexType::kInt32;
  a.num_topk = static_cast<int>(num(d, "num_topk", 0));
  a.num_max_dispatch_tokens_per_rank = static_cast<int>(num(d, "num_max_dispatch_tokens_per_rank", 0));
  a.num_experts = static_cast<int>(num(d, "num_experts", 0));
  a.use_fp8 = num(d, "use_fp8", 1) != 0;
  a.round_scale = num(d, "round_scale", 0) != 0;
  a.use_ue8m0 = num(d, "use_ue8m0", 0) != 0;
  a.cumulative_local_expert_recv_stats = ptr<int>(d, "cumulative_local_expert_recv_stats");
  a.dispatch_wait_recv_cost_stats = ptr<int64_t>(d, "dispatch_wait_recv_cost_stats");
  a.return_recv_hook = num(d, "return_recv_hook", 0) != 0;
  return a;
}

openep::LowLatencyCombineArgs ll_combine_args_of(const nb::dict& d) {
  check_keys(d, {"x", "topk_idx", "topk_int64", "topk_weights", "num_tokens", "num_topk", "zero_copy",
                 "use_logfmt", "combine_wait_recv_cost_stats", "return_recv_hook"}, "low_latency_combine arguments");
  openep::LowLatencyCombineArgs a;
  a.x = ptr<const uint16_t>(d, "x");
  a.topk_idx = ptr<const void>(d, "topk_idx");
  a.index_type = num(d, "topk_int64", 1) ? openep::IndexType::kInt64 : openep::IndexType::kInt32;
  a.topk_weights = ptr<const float>(d, "topk_weights");
  a.num_tokens = static_cast<int>(num(d, "num_tokens", 0));
  a.num_topk = static_cast<int>(num(d, "num_topk", 0));
  a.zero_copy = num(d, "zero_copy", 0) != 0;
  a.use_logfmt = num(d, "use_logfmt", 0) != 0;
  a.combine_wait_recv_cost_stats = ptr<int64_t>(d, "combine_wait_recv_cost_stats");
  a.return_recv_hook = num(d, "return_recv_hook", 0) != 0;
  return a;
}

// One Group (private NCCL communicator) and the Buffer on it. The Group must outlive the Buffer.
class Runtime {
 public:
  Runtime(nb::bytes unique_id, int rank, int num_ranks, int device, size_t num_nvl_bytes, size_t num_rdma_bytes,
          bool low_latency_mode, double timeout_seconds, bool allow_network, int internode_backend,
          bool enable_shrink) {
    if (unique_id.size() != sizeof(ncclUniqueId)) {
      fail(openep::ErrorCode::kInvalidArgument, "unique_id must be " + std::to_string(sizeof(ncclUniqueId)) +
                                                    " bytes, got " + std::to_string(unique_id.size()));
    }
    ncclUniqueId id;
    std::memcpy(&id, unique_id.c_str(), sizeof(id));
    openep::BufferOptions o;
    o.num_nvl_bytes = num_nvl_bytes;
    o.num_rdma_bytes = num_rdma_bytes;
    o.low_latency_mode = low_latency_mode;
    o.timeout_seconds = timeout_seconds;
    o.allow_network = allow_network;
    if (internode_backend != static_cast<int>(openep::InternodeBackend::kHostP2p) &&
        internode_backend != static_cast<int>(openep::InternodeBackend::kGin)) {
      fail(openep::ErrorCode::kInvalidArgument, "internode_backend must be 0 (host p2p) or 1 (GIN), got " +
                                                    std::to_string(internode_backend));
    }
    o.internode_backend = static_cast<openep::InternodeBackend>(internode_backend);
    o.enable_shrink = enable_shrink;
    device_ = device;
    nb::gil_scoped_release release;
    group_ = openep::Group::create(id, rank, num_ranks, device);
    buffer_ = std::make_unique<openep::Buffer>(*group_, o);
    OPENEP_CUDA_CHECK(cudaSetDevice(device));
    OPENEP_CUDA_CHECK(cudaEventCreateWithFlags(&order_event_, cudaEventDisableTiming));
  }
  ~Runtime() {
    if (order_event_) cudaEventDestroy(order_event_);  // never throws; an error here has no one to report to
  }
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // Makes `waiter` wait (on the device, no host wait) for the work enqueued so far on `waited`. One reused
  // event: cudaStreamWaitEvent takes the event's state at the call, so the next record cannot affect this wait;
  // under stream capture the pair becomes a graph edge, as with torch's Stream.wait_stream. The streams must
  // belong to the Buffer's device. Costs ~1-2 us instead of ~6 us for torch's wait_stream (a new event each).
  void stream_wait(uintptr_t waiter, uintptr_t waited) {
    buffer();  // refuses after destroy()
    OPENEP_CUDA_CHECK(cudaEventRecord(order_event_, as_stream(waited)));
    OPENEP_CUDA_CHECK(cudaStreamWaitEvent(as_stream(waiter), order_event_, 0));
  }

  openep::Buffer& buffer() {
    if (!buffer_) fail(openep::ErrorCode::kInvalidArgument, "this Buffer was destroyed (destroy() was called)");
    return *buffer_;
  }

  // Releases the Buffer, then the communicator. Collective in effect (the Buffer's final barrier).
  void destroy() {
    nb::gil_scoped_release release;
    buffer_.reset();
    group_.reset();
  }
  bool alive() const { return buffer_ != nullptr; }

  std::unique_ptr<openep::Group> group_;
  std::unique_ptr<openep::Buffer> buffer_;
  cudaEvent_t order_event_ = nullptr;
  int device_ = -1;  // the CUDA device passed at creation (still known after destroy())
};

// The receive half of a hook-mode low-latency call (openep._C.LowLatencyHook). Holds a reference to its
// Runtime's Python object so that the Buffer cannot be freed under it; refuses to run after destroy() and
// refuses a second call (the core's hook must run exactly once).
struct LowLatencyRecvHook {
  nb::object owner;  // the Runtime (Python object)
  Runtime* runtime = nullptr;
  openep::LowLatencyHook fn;
  const char* op = "";
  bool called = false;

  void call() {
    if (!runtime->alive()) {
      fail(openep::ErrorCode::kInvalidArgument, std::string(op) +
               " receive hook: the Buffer was destroyed before the hook was called");
    }
    if (called) {
      fail(openep::ErrorCode::kInvalidArgument, std::string(op) +
               " receive hook: already called (each hook launches its receive kernel exactly once)");
    }
    called = true;
    fn();
  }
};

nb::object make_hook(Runtime& r, openep::LowLatencyHook fn, const char* op) {
  if (!fn) return nb::none();
  LowLatencyRecvHook h;
  h.owner = nb::find(&r);
  h.runtime = &r;
  h.fn = std::move(fn);
  h.op = op;
  return nb::cast(std::move(h));
}

}  // namespace

void bind_buffer(nb::module_& m) {
  nb::class_<LowLatencyRecvHook>(m, "LowLatencyHook",
                                 "The receive half of a hook-mode low-latency call (internal; openep.Buffer wraps it).")
      .def("__call__", &LowLatencyRecvHook::call,
           "Launches the receive kernel on the stream of the call that returned this hook. Exactly once.")
      .def_prop_ro("called", [](const LowLatencyRecvHook& h) { return h.called; });

  m.def("make_unique_id", [] {
    const ncclUniqueId id = openep::Group::make_unique_id();
    return nb::bytes(reinterpret_cast<const char*>(&id), sizeof(id));
  }, "A fresh NCCL unique id (128 bytes) for Runtime(); create it on one rank and ship it to the others.");

  nb::class_<Runtime>(m, "Runtime", "openep::Group + openep::Buffer (internal; use openep.Buffer).")
      .def(nb::init<nb::bytes, int, int, int, size_t, size_t, bool, double, bool, int, bool>(), nb::arg("unique_id"),
           nb::arg("rank"), nb::arg("num_ranks"), nb::arg("device"), nb::arg("num_nvl_bytes"),
           nb::arg("num_rdma_bytes"), nb::arg("low_latency_mode"), nb::arg("timeout_seconds"),
           nb::arg("allow_network") = false, nb::arg("internode_backend") = 0, nb::arg("enable_shrink") = false)
      .def("destroy", &Runtime::destroy)
      .def("stream_wait", &Runtime::stream_wait, nb::arg("waiter"), nb::arg("waited"),
           "Makes stream `waiter` wait for the work enqueued so far on stream `waited` (cudaStream_t addresses).")
      .def_prop_ro("alive", &Runtime::alive)
      // DeepEP's topology queries (get_num_rdma_ranks, get_rdma_rank, ...) are answered in Python from these
      // (python/openep/_runtime.py), so that their meaning is written once and CPU-tested.
      .def_prop_ro("device", [](const Runtime& r) { return r.device_; },
                   "The CUDA device the Buffer was created on (also after destroy()).")
      .def_prop_ro("rank", [](Runtime& r) { return r.buffer().rank(); })
      .def_prop_ro("num_ranks", [](Runtime& r) { return r.buffer().num_ranks(); })
      .def_prop_ro("num_nvlink_ranks", [](Runtime& r) { r.buffer(); return r.group_->num_nvlink_ranks(); })
      .def_prop_ro("comm_stream", [](Runtime& r) { return reinterpret_cast<uintptr_t>(r.buffer().comm_stream()); })
      .def("local_buffer", [](Runtime& r, bool rdma) {
        // (device address, bytes) of this rank's normal-mode (or low-latency) region of the symmetric window.
        openep::Buffer::Impl& m = r.buffer().impl();
        char* base = m.win.local;
        const size_t off = rdma ? m.window_layout.rdma_offset : m.window_layout.nvl_offset;
        const size_t bytes = rdma ? m.options.num_rdma_bytes : m.options.num_nvl_bytes;
        return std::make_tuple(reinterpret_cast<uintptr_t>(base + off), bytes);
      }, nb::arg("rdma"))
      .def("get_dispatch_layout", [](Runtime& r, nb::dict d, uintptr_t stream) {
        check_keys(d, {"topk_idx", "topk_int64", "num_tokens", "num_topk", "num_experts", "num_tokens_per_rank",
                       "num_tokens_per_expert", "is_token_in_rank", "num_tokens_per_rdma_rank"},
                   "get_dispatch_layout arguments");
        openep::LayoutArgs a;
        a.topk_idx = ptr<const void>(d, "topk_idx");
        a.index_type = num(d, "topk_int64", 1) ? openep::IndexType::kInt64 : openep::IndexType::kInt32;
        a.num_tokens = static_cast<int>(num(d, "num_tokens", 0));
        a.num_topk = static_cast<int>(num(d, "num_topk", 0));
        a.num_experts = static_cast<int>(num(d, "num_experts", 0));
        a.num_tokens_per_rank = ptr<int>(d, "num_tokens_per_rank");
        a.num_tokens_per_expert = ptr<int>(d, "num_tokens_per_expert");
        a.is_token_in_rank = ptr<bool>(d, "is_token_in_rank");
        a.num_tokens_per_rdma_rank = ptr<int>(d, "num_tokens_per_rdma_rank");
        r.buffer().get_dispatch_layout(a, as_stream(stream));
      }, nb::arg("args"), nb::arg("stream"))
      .def("dispatch_prepare", [](Runtime& r, nb::dict args, nb::dict handle, uintptr_t stream) {
        // Returns (num_recv_tokens, num_recv_tokens_per_expert list). Exact mode waits on the host.
        const openep::DispatchArgs a = dispatch_args_of(args);
        openep::IntranodeHandle h = handle_of(handle);
        openep::DispatchCounts c;
        {
          nb::gil_scoped_release release;
          c = r.buffer().dispatch_prepare(a, h, as_stream(stream));
        }
        return std::make_tuple(c.num_recv_tokens, c.num_recv_tokens_per_expert);
      }, nb::arg("args"), nb::arg("handle"), nb::arg("stream"))
      .def("dispatch", [](Runtime& r, nb::dict args, nb::dict handle, nb::dict out, uintptr_t stream) {
        r.buffer().dispatch(dispatch_args_of(args), handle_of(handle), dispatch_outputs_of(out), as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("dispatch_cached", [](Runtime& r, nb::dict args, nb::dict handle, nb::dict out, uintptr_t stream) {
        r.buffer().dispatch_cached(dispatch_args_of(args), handle_of(handle), dispatch_outputs_of(out),
                                   as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("combine", [](Runtime& r, nb::dict d, nb::dict handle, nb::dict out, uintptr_t stream) {
        r.buffer().combine(combine_args_of(d), handle_of(handle), combine_outputs_of(out), as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      // ---- internode normal mode (openep/internode.hpp) ----
      .def_prop_ro("is_internode", [](Runtime& r) { return r.buffer().is_internode(); })
      .def_prop_ro("num_nodes", [](Runtime& r) { return r.buffer().num_nodes(); })
      .def_prop_ro("ranks_per_node", [](Runtime& r) { return r.buffer().ranks_per_node(); })
      .def("internode_dispatch_prepare", [](Runtime& r, nb::dict args, nb::dict handle, uintptr_t stream) {
        // Returns (num_recv_tokens, num_rdma_recv_tokens, per-expert list, host fields of the handle).
        const openep::DispatchArgs a = dispatch_args_of(args);
        openep::InternodeHandle h = internode_handle_of(handle);
        openep::InternodeDispatchCounts c;
        {
          nb::gil_scoped_release release;
          c = r.buffer().internode_dispatch_prepare(a, h, as_stream(stream));
        }
        return std::make_tuple(c.num_recv_tokens, c.num_rdma_recv_tokens, c.num_recv_tokens_per_expert,
                               internode_host_fields(h));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("stream"))
      .def("internode_dispatch", [](Runtime& r, nb::dict args, nb::dict handle, nb::dict out, uintptr_t stream) {
        openep::InternodeHandle h = internode_handle_of(handle);
        r.buffer().internode_dispatch(dispatch_args_of(args), h, dispatch_outputs_of(out), as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("internode_dispatch_cached", [](Runtime& r, nb::dict args, nb::dict handle, nb::dict out, uintptr_t stream) {
        r.buffer().internode_dispatch_cached(dispatch_args_of(args), internode_handle_of(handle),
                                             dispatch_outputs_of(out), as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("internode_combine", [](Runtime& r, nb::dict d, nb::dict handle, nb::dict out, uintptr_t stream) {
        r.buffer().internode_combine(combine_args_of(d), internode_handle_of(handle), combine_outputs_of(out),
                                     as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("low_latency_dispatch", [](Runtime& r, nb::dict args, nb::dict handle, nb::dict out, uintptr_t stream) {
        // Returns a LowLatencyHook (return_recv_hook) or None. The handle dict's pointers must be filled.
        check_keys(out, {"packed_recv_x", "packed_recv_scales", "packed_recv_count"}, "low_latency_dispatch outputs");
        const openep::LowLatencyDispatchArgs a = ll_dispatch_args_of(args);
        openep::LowLatencyHandle h = ll_handle_of(handle);
        openep::LowLatencyDispatchOutputs o;
        o.packed_recv_x = ptr<void>(out, "packed_recv_x");
        o.packed_recv_scales = ptr<void>(out, "packed_recv_scales");
        o.packed_recv_count = ptr<int>(out, "packed_recv_count");
        return make_hook(r, r.buffer().low_latency_dispatch(a, h, o, as_stream(stream)), "low_latency_dispatch");
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("low_latency_combine", [](Runtime& r, nb::dict args, nb::dict handle, nb::dict out, uintptr_t stream) {
        check_keys(out, {"combined_x"}, "low_latency_combine outputs");
        const openep::LowLatencyCombineArgs a = ll_combine_args_of(args);
        const openep::LowLatencyHandle h = ll_handle_of(handle);
        openep::LowLatencyCombineOutputs o;
        o.combined_x = ptr<uint16_t>(out, "combined_x");
        return make_hook(r, r.buffer().low_latency_combine(a, h, o, as_stream(stream)), "low_latency_combine");
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("get_next_low_latency_combine_buffer", [](Runtime& r, nb::dict handle) {
        // Device address of the [E_local][R*T][hidden] BF16 zero-copy combine input (contiguous rows).
        return reinterpret_cast<uintptr_t>(r.buffer().get_next_low_latency_combine_buffer(ll_handle_of(handle)));
      }, nb::arg("handle"))
      .def("clean_low_latency_buffer", [](Runtime& r, int T, int hidden, int num_experts, uintptr_t stream) {
        r.buffer().clean_low_latency_buffer(T, hidden, num_experts, as_stream(stream));
      }, nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_experts"), nb::arg("stream"))
      .def("low_latency_update_mask_buffer", [](Runtime& r, int rank, bool mask, uintptr_t stream) {
             r.buffer().low_latency_update_mask_buffer(rank, mask, as_stream(stream));
           }, nb::arg("rank_to_mask"), nb::arg("mask"), nb::arg("stream"))
      .def("low_latency_query_mask_buffer", [](Runtime& r, uintptr_t mask_status, uintptr_t stream) {
             r.buffer().low_latency_query_mask_buffer(reinterpret_cast<int32_t*>(mask_status), as_stream(stream));
           }, nb::arg("mask_status"), nb::arg("stream"))
      .def("low_latency_clean_mask_buffer", [](Runtime& r, uintptr_t stream) {
             r.buffer().low_latency_clean_mask_buffer(as_stream(stream));
           }, nb::arg("stream"))
      .def("barrier", [](Runtime& r, uintptr_t stream) { r.buffer().barrier(as_stream(stream)); }, nb::arg("stream"))
      .def("synchronize", [](Runtime& r, uintptr_t stream) {
        openep::Buffer& b = r.buffer();
        nb::gil_scoped_release release;
        b.synchronize(as_stream(stream));
      }, nb::arg("stream"))
      .def("check_device_errors", [](Runtime& r) { r.buffer().check_device_errors(); });
}
