// Binding of openep::Group + openep::Buffer as one object, openep._C.Runtime.
//
// Arguments cross as the core's own structs (openep._C.DispatchArgs, IntranodeHandle, ...: bind_structs below),
// each field a property of the same name; device pointers are Python ints (addresses), IndexType is the bool
// property topk_int64. The structs have no __dict__, so a misspelt field in python/openep/ raises AttributeError.
// Handles are filled in place by the prepare calls. Streams cross as cudaStream_t addresses
// (torch.cuda.Stream.cuda_stream). Calls that may block the host (NCCL init, window registration, the exact-mode
// count wait, synchronize) release the GIL.
#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "openep/buffer.hpp"
#include "openep/error.hpp"
#include "openep/group.hpp"
#include "openep/internode.hpp"
#include "openep/intranode.hpp"
#include "openep/low_latency.hpp"
#include "openep/testing.hpp"
#include "runtime/buffer_impl.hpp"
#include "runtime/check.hpp"

namespace nb = nanobind;

namespace {

[[noreturn]] void fail(openep::ErrorCode code, const std::string& msg) {
  throw openep::Error(code, __FILE__, __LINE__, msg);
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// One Group (private NCCL communicator) and the Buffer on it. The Group must outlive the Buffer.
class Runtime {
 public:
  Runtime(nb::bytes unique_id, int rank, int num_ranks, int device, size_t num_nvl_bytes, size_t num_rdma_bytes,
          bool low_latency_mode, double timeout_seconds, bool allow_network, int internode_backend,
          bool enable_shrink, size_t num_recv_pool_bytes, const std::string& ipc_rendezvous_dir) {
    if (ipc_rendezvous_dir.empty() && unique_id.size() != sizeof(ncclUniqueId)) {
      fail(openep::ErrorCode::kInvalidArgument, "unique_id must be " + std::to_string(sizeof(ncclUniqueId)) +
                                                    " bytes, got " + std::to_string(unique_id.size()));
    }
    ncclUniqueId id{};
    if (ipc_rendezvous_dir.empty()) std::memcpy(&id, unique_id.c_str(), sizeof(id));
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
    o.num_recv_pool_bytes = num_recv_pool_bytes;
    device_ = device;
    nb::gil_scoped_release release;
    if (ipc_rendezvous_dir.empty()) {
      group_ = openep::Group::create(id, rank, num_ranks, device);
    } else {  // testing only: processes sharing GPUs through CUDA IPC (openep/testing.hpp IpcFabric), no NCCL
      openep::testing::IpcFabricOptions io;
      io.rank = rank;
      io.num_ranks = num_ranks;
      io.device = device;
      io.rendezvous_dir = ipc_rendezvous_dir;
      group_ = openep::testing::IpcFabric::make_group(io);
    }
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

// A pointer field of a core struct as a read-write property holding a device address (a Python int, 0 = null).
template <typename C, typename P>
void address(nb::class_<C>& cls, const char* name, P* C::*field) {
  cls.def_prop_rw(name, [field](const C& c) { return reinterpret_cast<uintptr_t>(c.*field); },
                  [field](C& c, uintptr_t v) { c.*field = reinterpret_cast<P*>(v); });
}
// IndexType as the bool property topk_int64 (True: int64 top-k indices, False: int32).
template <typename C>
void index_type(nb::class_<C>& cls) {
  cls.def_prop_rw("topk_int64", [](const C& c) { return c.index_type == openep::IndexType::kInt64; },
                  [](C& c, bool v) { c.index_type = v ? openep::IndexType::kInt64 : openep::IndexType::kInt32; });
}
template <typename C>
nb::class_<C> core_struct(nb::module_& m, const char* name, const char* doc) {
  nb::class_<C> cls(m, name, doc);
  cls.def(nb::init<>());
  return cls;
}

// The core's argument, output and handle structs (include/openep/{buffer,intranode,internode,low_latency}.hpp),
// field for field, for python/openep/ to fill; the headers document every field.
void bind_structs(nb::module_& m) {
  using namespace openep;
  auto la = core_struct<LayoutArgs>(m, "LayoutArgs", "openep::LayoutArgs (internal).");
  address(la, "topk_idx", &LayoutArgs::topk_idx);
  index_type(la);
  la.def_rw("num_tokens", &LayoutArgs::num_tokens).def_rw("num_topk", &LayoutArgs::num_topk)
      .def_rw("num_experts", &LayoutArgs::num_experts);
  address(la, "num_tokens_per_rank", &LayoutArgs::num_tokens_per_rank);
  address(la, "num_tokens_per_expert", &LayoutArgs::num_tokens_per_expert);
  address(la, "is_token_in_rank", &LayoutArgs::is_token_in_rank);
  address(la, "num_tokens_per_rdma_rank", &LayoutArgs::num_tokens_per_rdma_rank);

  auto ih = core_struct<IntranodeHandle>(m, "IntranodeHandle", "openep::IntranodeHandle (internal).");
  ih.def_rw("num_tokens", &IntranodeHandle::num_tokens).def_rw("num_recv_tokens", &IntranodeHandle::num_recv_tokens)
      .def_rw("max_pair_rows", &IntranodeHandle::max_pair_rows).def_rw("max_num_tokens", &IntranodeHandle::max_num_tokens);
  address(ih, "is_token_in_rank", &IntranodeHandle::is_token_in_rank);
  address(ih, "rank_prefix_matrix", &IntranodeHandle::rank_prefix_matrix);
  address(ih, "num_tokens_per_src", &IntranodeHandle::num_tokens_per_src);
  address(ih, "send_pos", &IntranodeHandle::send_pos);
  address(ih, "recv_src_idx", &IntranodeHandle::recv_src_idx);

  auto da = core_struct<DispatchArgs>(m, "DispatchArgs", "openep::DispatchArgs (internal).");
  address(da, "x", &DispatchArgs::x);
  da.def_rw("num_tokens", &DispatchArgs::num_tokens).def_rw("hidden", &DispatchArgs::hidden)
      .def_rw("x_elem_bytes", &DispatchArgs::x_elem_bytes).def_rw("num_scales", &DispatchArgs::num_scales)
      .def_rw("scale_token_stride", &DispatchArgs::scale_token_stride)
      .def_rw("scale_hidden_stride", &DispatchArgs::scale_hidden_stride).def_rw("num_topk", &DispatchArgs::num_topk)
      .def_rw("num_experts", &DispatchArgs::num_experts).def_rw("expert_alignment", &DispatchArgs::expert_alignment)
      .def_rw("num_worst_tokens", &DispatchArgs::num_worst_tokens).def_rw("config", &DispatchArgs::config)
      .def_rw("max_tokens_per_rank", &DispatchArgs::max_tokens_per_rank);
  address(da, "x_scales", &DispatchArgs::x_scales);
  address(da, "topk_idx", &DispatchArgs::topk_idx);
  index_type(da);
  address(da, "topk_weights", &DispatchArgs::topk_weights);
  address(da, "is_token_in_rank", &DispatchArgs::is_token_in_rank);
  address(da, "num_tokens_per_rank", &DispatchArgs::num_tokens_per_rank);
  address(da, "num_tokens_per_expert", &DispatchArgs::num_tokens_per_expert);
  address(da, "num_tokens_per_rdma_rank", &DispatchArgs::num_tokens_per_rdma_rank);

  auto dout = core_struct<DispatchOutputs>(m, "DispatchOutputs", "openep::DispatchOutputs (internal).");
  address(dout, "recv_x", &DispatchOutputs::recv_x);
  address(dout, "recv_x_scales", &DispatchOutputs::recv_x_scales);
  address(dout, "recv_topk_idx", &DispatchOutputs::recv_topk_idx);
  address(dout, "recv_topk_weights", &DispatchOutputs::recv_topk_weights);

  auto ca = core_struct<CombineArgs>(m, "CombineArgs", "openep::CombineArgs (internal).");
  address(ca, "x", &CombineArgs::x);
  ca.def_rw("hidden", &CombineArgs::hidden).def_rw("num_topk", &CombineArgs::num_topk)
      .def_rw("config", &CombineArgs::config);
  address(ca, "topk_weights", &CombineArgs::topk_weights);
  address(ca, "bias_0", &CombineArgs::bias_0);
  address(ca, "bias_1", &CombineArgs::bias_1);

  auto cout_ = core_struct<CombineOutputs>(m, "CombineOutputs", "openep::CombineOutputs (internal).");
  address(cout_, "combined_x", &CombineOutputs::combined_x);
  address(cout_, "combined_topk_weights", &CombineOutputs::combined_topk_weights);

  // The host fields (counts of the network legs) are filled by internode_dispatch_prepare and read by the core
  // only; Python sees the scalars.
  auto nh = core_struct<InternodeHandle>(m, "InternodeHandle", "openep::InternodeHandle (internal).");
  nh.def_rw("num_tokens", &InternodeHandle::num_tokens).def_rw("num_recv_tokens", &InternodeHandle::num_recv_tokens)
      .def_rw("num_rdma_recv_tokens", &InternodeHandle::num_rdma_recv_tokens)
      .def_ro("records_per_node", &InternodeHandle::records_per_node).def_ro("hidden", &InternodeHandle::hidden)
      .def_ro("num_topk", &InternodeHandle::num_topk);
  address(nh, "is_token_in_rank", &InternodeHandle::is_token_in_rank);
  address(nh, "send_pos", &InternodeHandle::send_pos);
  address(nh, "send_rdma_head", &InternodeHandle::send_rdma_head);
  address(nh, "node_prefix", &InternodeHandle::node_prefix);
  address(nh, "recv_gbl_rank_prefix_sum", &InternodeHandle::recv_gbl_rank_prefix_sum);
  address(nh, "recv_rdma_rank_prefix_sum", &InternodeHandle::recv_rdma_rank_prefix_sum);
  address(nh, "recv_rdma_mask", &InternodeHandle::recv_rdma_mask);
  address(nh, "recv_src_idx", &InternodeHandle::recv_src_idx);
  address(nh, "recv_src_meta", &InternodeHandle::recv_src_meta);

  auto lh = core_struct<LowLatencyHandle>(m, "LowLatencyHandle", "openep::LowLatencyHandle (internal).");
  address(lh, "src_info", &LowLatencyHandle::src_info);
  address(lh, "layout_range", &LowLatencyHandle::layout_range);
  lh.def_rw("num_max_dispatch_tokens_per_rank", &LowLatencyHandle::num_max_dispatch_tokens_per_rank)
      .def_rw("hidden", &LowLatencyHandle::hidden).def_rw("num_experts", &LowLatencyHandle::num_experts);

  auto lda = core_struct<LowLatencyDispatchArgs>(m, "LowLatencyDispatchArgs",
                                                 "openep::LowLatencyDispatchArgs (internal).");
  address(lda, "x", &LowLatencyDispatchArgs::x);
  address(lda, "topk_idx", &LowLatencyDispatchArgs::topk_idx);
  index_type(lda);
  lda.def_rw("num_tokens", &LowLatencyDispatchArgs::num_tokens).def_rw("hidden", &LowLatencyDispatchArgs::hidden)
      .def_rw("num_topk", &LowLatencyDispatchArgs::num_topk)
      .def_rw("num_max_dispatch_tokens_per_rank", &LowLatencyDispatchArgs::num_max_dispatch_tokens_per_rank)
      .def_rw("num_experts", &LowLatencyDispatchArgs::num_experts).def_rw("use_fp8", &LowLatencyDispatchArgs::use_fp8)
      .def_rw("round_scale", &LowLatencyDispatchArgs::round_scale)
      .def_rw("use_ue8m0", &LowLatencyDispatchArgs::use_ue8m0)
      .def_rw("return_recv_hook", &LowLatencyDispatchArgs::return_recv_hook);
  address(lda, "cumulative_local_expert_recv_stats", &LowLatencyDispatchArgs::cumulative_local_expert_recv_stats);
  address(lda, "dispatch_wait_recv_cost_stats", &LowLatencyDispatchArgs::dispatch_wait_recv_cost_stats);

  auto ldo = core_struct<LowLatencyDispatchOutputs>(m, "LowLatencyDispatchOutputs",
                                                    "openep::LowLatencyDispatchOutputs (internal).");
  address(ldo, "packed_recv_x", &LowLatencyDispatchOutputs::packed_recv_x);
  address(ldo, "packed_recv_scales", &LowLatencyDispatchOutputs::packed_recv_scales);
  address(ldo, "packed_recv_count", &LowLatencyDispatchOutputs::packed_recv_count);

  auto lca = core_struct<LowLatencyCombineArgs>(m, "LowLatencyCombineArgs",
                                                "openep::LowLatencyCombineArgs (internal).");
  address(lca, "x", &LowLatencyCombineArgs::x);
  address(lca, "topk_idx", &LowLatencyCombineArgs::topk_idx);
  index_type(lca);
  address(lca, "topk_weights", &LowLatencyCombineArgs::topk_weights);
  lca.def_rw("num_tokens", &LowLatencyCombineArgs::num_tokens).def_rw("num_topk", &LowLatencyCombineArgs::num_topk)
      .def_rw("zero_copy", &LowLatencyCombineArgs::zero_copy).def_rw("use_logfmt", &LowLatencyCombineArgs::use_logfmt)
      .def_rw("return_recv_hook", &LowLatencyCombineArgs::return_recv_hook);
  address(lca, "combine_wait_recv_cost_stats", &LowLatencyCombineArgs::combine_wait_recv_cost_stats);

  auto lco = core_struct<LowLatencyCombineOutputs>(m, "LowLatencyCombineOutputs",
                                                   "openep::LowLatencyCombineOutputs (internal).");
  address(lco, "combined_x", &LowLatencyCombineOutputs::combined_x);
}

}  // namespace

void bind_buffer(nb::module_& m) {
  bind_structs(m);
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
      .def(nb::init<nb::bytes, int, int, int, size_t, size_t, bool, double, bool, int, bool, size_t, const std::string&>(),
           nb::arg("unique_id"), nb::arg("rank"), nb::arg("num_ranks"), nb::arg("device"), nb::arg("num_nvl_bytes"),
           nb::arg("num_rdma_bytes"), nb::arg("low_latency_mode"), nb::arg("timeout_seconds"),
           nb::arg("allow_network") = false, nb::arg("internode_backend") = 0, nb::arg("enable_shrink") = false,
           nb::arg("num_recv_pool_bytes") = 0, nb::arg("ipc_rendezvous_dir") = "")
      .def("destroy", &Runtime::destroy)
      .def("stream_wait", &Runtime::stream_wait, nb::arg("waiter"), nb::arg("waited"),
           "Makes stream `waiter` wait for the work enqueued so far on stream `waited` (cudaStream_t addresses).")
      .def_prop_ro("alive", &Runtime::alive)
      // Window-backed dispatch outputs (openep::Buffer::alloc_recv / free_recv): addresses as integers, 0 = none.
      .def("alloc_recv", [](Runtime& r, size_t bytes) { return reinterpret_cast<uintptr_t>(r.buffer().alloc_recv(bytes)); },
           nb::arg("bytes"))
      .def("free_recv", [](Runtime& r, uintptr_t p, uintptr_t stream) {
        if (r.alive()) r.buffer().free_recv(reinterpret_cast<void*>(p), as_stream(stream));  // else the pool is gone
      }, nb::arg("ptr"), nb::arg("stream"))
      .def_prop_ro("recv_pool_free_bytes", [](Runtime& r) { return r.buffer().recv_pool_free_bytes(); })
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
      // Every operation takes the core's structs (bind_structs) and a stream address; prepare calls fill the
      // handle in place.
      .def("get_dispatch_layout", [](Runtime& r, const openep::LayoutArgs& a, uintptr_t stream) {
        r.buffer().get_dispatch_layout(a, as_stream(stream));
      }, nb::arg("args"), nb::arg("stream"))
      .def("dispatch_prepare", [](Runtime& r, const openep::DispatchArgs& a, openep::IntranodeHandle& h,
                                  uintptr_t stream) {
        // Returns (num_recv_tokens, num_recv_tokens_per_expert list). Exact mode waits on the host.
        openep::DispatchCounts c;
        {
          nb::gil_scoped_release release;
          c = r.buffer().dispatch_prepare(a, h, as_stream(stream));
        }
        return std::make_tuple(c.num_recv_tokens, c.num_recv_tokens_per_expert);
      }, nb::arg("args"), nb::arg("handle"), nb::arg("stream"))
      .def("dispatch", [](Runtime& r, const openep::DispatchArgs& a, const openep::IntranodeHandle& h,
                          const openep::DispatchOutputs& o, uintptr_t stream) {
        r.buffer().dispatch(a, h, o, as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("dispatch_cached", [](Runtime& r, const openep::DispatchArgs& a, const openep::IntranodeHandle& h,
                                 const openep::DispatchOutputs& o, uintptr_t stream) {
        r.buffer().dispatch_cached(a, h, o, as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("combine", [](Runtime& r, const openep::CombineArgs& a, const openep::IntranodeHandle& h,
                         const openep::CombineOutputs& o, uintptr_t stream) {
        r.buffer().combine(a, h, o, as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      // ---- internode normal mode (openep/internode.hpp) ----
      .def_prop_ro("is_internode", [](Runtime& r) { return r.buffer().is_internode(); })
      .def_prop_ro("num_nodes", [](Runtime& r) { return r.buffer().num_nodes(); })
      .def_prop_ro("ranks_per_node", [](Runtime& r) { return r.buffer().ranks_per_node(); })
      .def("internode_dispatch_prepare", [](Runtime& r, const openep::DispatchArgs& a, openep::InternodeHandle& h,
                                            uintptr_t stream) {
        // Returns (num_recv_tokens, num_rdma_recv_tokens, per-expert list); the host fields go into the handle.
        openep::InternodeDispatchCounts c;
        {
          nb::gil_scoped_release release;
          c = r.buffer().internode_dispatch_prepare(a, h, as_stream(stream));
        }
        return std::make_tuple(c.num_recv_tokens, c.num_rdma_recv_tokens, c.num_recv_tokens_per_expert);
      }, nb::arg("args"), nb::arg("handle"), nb::arg("stream"))
      .def("internode_dispatch", [](Runtime& r, const openep::DispatchArgs& a, openep::InternodeHandle& h,
                                    const openep::DispatchOutputs& o, uintptr_t stream) {
        r.buffer().internode_dispatch(a, h, o, as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("internode_dispatch_cached", [](Runtime& r, const openep::DispatchArgs& a, const openep::InternodeHandle& h,
                                           const openep::DispatchOutputs& o, uintptr_t stream) {
        r.buffer().internode_dispatch_cached(a, h, o, as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("internode_combine", [](Runtime& r, const openep::CombineArgs& a, const openep::InternodeHandle& h,
                                   const openep::CombineOutputs& o, uintptr_t stream) {
        r.buffer().internode_combine(a, h, o, as_stream(stream));
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("low_latency_dispatch", [](Runtime& r, const openep::LowLatencyDispatchArgs& a, openep::LowLatencyHandle& h,
                                      const openep::LowLatencyDispatchOutputs& o, uintptr_t stream) {
        // Returns a LowLatencyHook (return_recv_hook) or None. The handle's pointers must be filled.
        return make_hook(r, r.buffer().low_latency_dispatch(a, h, o, as_stream(stream)), "low_latency_dispatch");
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("low_latency_combine", [](Runtime& r, const openep::LowLatencyCombineArgs& a,
                                     const openep::LowLatencyHandle& h, const openep::LowLatencyCombineOutputs& o,
                                     uintptr_t stream) {
        return make_hook(r, r.buffer().low_latency_combine(a, h, o, as_stream(stream)), "low_latency_combine");
      }, nb::arg("args"), nb::arg("handle"), nb::arg("outputs"), nb::arg("stream"))
      .def("get_next_low_latency_combine_buffer", [](Runtime& r, const openep::LowLatencyHandle& h) {
        // Device address of the [E_local][R*T][hidden] BF16 zero-copy combine input (contiguous rows).
        return reinterpret_cast<uintptr_t>(r.buffer().get_next_low_latency_combine_buffer(h));
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
