// openep._C: the nanobind module under the Python package openep. The ONLY place nanobind appears.
//
// Never compiled against torch: every tensor crosses as a device address (int) plus the shapes the core
// needs; python/openep/ checks dtypes, shapes, devices and contiguity before calling in here. This file holds
// the error translation, the versions and Config; buffer.cpp binds Group + Buffer, reference.cpp the CPU
// reference (the specification the Python tests compare against).
#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "openep/buffer.hpp"
#include "openep/config.hpp"
#include "openep/error.hpp"
#include "openep/intranode.hpp"

namespace nb = nanobind;

void bind_buffer(nb::module_& m);
void bind_reference(nb::module_& m);

namespace {

// The Python exception class (openep.OpenEPError) raised for every openep::Error. Set once by the package
// at import (a borrowed reference kept for the life of the process, never released: releasing it during
// interpreter shutdown would touch a finalised interpreter).
PyObject* g_error_type = nullptr;

// Stable short names for ErrorCode, used as OpenEPError.code.
const char* code_key(openep::ErrorCode c) {
  switch (c) {
    case openep::ErrorCode::kInvalidArgument: return "invalid_argument";
    case openep::ErrorCode::kBufferTooSmall: return "buffer_too_small";
    case openep::ErrorCode::kCuda: return "cuda";
    case openep::ErrorCode::kNccl: return "nccl";
    case openep::ErrorCode::kVersionMismatch: return "version_mismatch";
    case openep::ErrorCode::kTimeout: return "timeout";
    case openep::ErrorCode::kDeviceCheck: return "device_check";
    case openep::ErrorCode::kBufferFailed: return "buffer_failed";
    case openep::ErrorCode::kUnsupported: return "unsupported";
    case openep::ErrorCode::kInternal: return "internal";
  }
  return "internal";
}

void translate_error(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const openep::Error& e) {
    if (g_error_type == nullptr) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
      return;
    }
    PyObject* inst = PyObject_CallFunction(g_error_type, "ss", e.what(), code_key(e.code()));
    if (inst == nullptr) return;  // the constructor raised; that error stands
    PyErr_SetObject(g_error_type, inst);
    Py_DECREF(inst);
  }
}


void bind_config(nb::module_& m) {
  nb::class_<openep::Config>(m, "Config",
      R"doc(Performance knobs of the normal-mode kernels (DeepEP V1's Config).

Config(num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
       num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)

num_sms: thread blocks (SMs) the normal-mode kernels use; even and > 0.
The four chunk sizes are DeepEP's ring parameters. They are validated like DeepEP's (nvl_send < nvl_recv;
rdma_recv is rounded up to a multiple of rdma_send, which must be <= half of it) but do not change OpenEP's
kernels, which write each token straight to its final row. Fields are readable (DeepEP's are not).
Invalid values raise OpenEPError(code="invalid_argument") naming the field.

get_nvl_buffer_size_hint(hidden_bytes, num_ranks) and get_rdma_buffer_size_hint(hidden_bytes, num_ranks)
return DeepEP V1's sizes for this config; OpenEP's own requirement depends on the token count:
Buffer.get_nvl_buffer_size_hint_for_tokens.)doc")
      .def("__init__",
           [](openep::Config* self, int num_sms, int nvl_send, int nvl_recv, int rdma_send, int rdma_recv) {
             openep::Config c;
             c.num_sms = num_sms;
             c.num_max_nvl_chunked_send_tokens = nvl_send;
             c.num_max_nvl_chunked_recv_tokens = nvl_recv;
             c.num_max_rdma_chunked_send_tokens = rdma_send;
             c.num_max_rdma_chunked_recv_tokens = rdma_recv;
             c.validate_and_normalize();
             new (self) openep::Config(c);
           },
           nb::arg("num_sms") = 20, nb::arg("num_max_nvl_chunked_send_tokens") = 6,
           nb::arg("num_max_nvl_chunked_recv_tokens") = 256, nb::arg("num_max_rdma_chunked_send_tokens") = 6,
           nb::arg("num_max_rdma_chunked_recv_tokens") = 256)
      .def_ro("num_sms", &openep::Config::num_sms)
      .def_ro("num_max_nvl_chunked_send_tokens", &openep::Config::num_max_nvl_chunked_send_tokens)
      .def_ro("num_max_nvl_chunked_recv_tokens", &openep::Config::num_max_nvl_chunked_recv_tokens)
      .def_ro("num_max_rdma_chunked_send_tokens", &openep::Config::num_max_rdma_chunked_send_tokens)
      .def_ro("num_max_rdma_chunked_recv_tokens", &openep::Config::num_max_rdma_chunked_recv_tokens)
      .def("get_nvl_buffer_size_hint",
           [](const openep::Config& c, int64_t hidden_bytes, int num_ranks) {
             return openep::deepep_nvl_buffer_size_hint(c, hidden_bytes, num_ranks);
           },
           nb::arg("hidden_bytes"), nb::arg("num_ranks"),
           "DeepEP V1's NVLink-buffer size for this config, in bytes (a multiple of 128).")
      .def("get_rdma_buffer_size_hint",
           [](const openep::Config& c, int64_t hidden_bytes, int num_ranks) {
             return openep::deepep_rdma_buffer_size_hint(c, hidden_bytes, num_ranks);
           },
           nb::arg("hidden_bytes"), nb::arg("num_ranks"),
           "DeepEP V1's RDMA-buffer size for this config, in bytes; 0 when num_ranks <= 8.")
      .def("__repr__", [](const openep::Config& c) {
        return "Config(num_sms=" + std::to_string(c.num_sms) +
               ", num_max_nvl_chunked_send_tokens=" + std::to_string(c.num_max_nvl_chunked_send_tokens) +
               ", num_max_nvl_chunked_recv_tokens=" + std::to_string(c.num_max_nvl_chunked_recv_tokens) +
               ", num_max_rdma_chunked_send_tokens=" + std::to_string(c.num_max_rdma_chunked_send_tokens) +
               ", num_max_rdma_chunked_recv_tokens=" + std::to_string(c.num_max_rdma_chunked_recv_tokens) + ")";
      });

  m.def("get_dispatch_config", &openep::get_dispatch_config, nb::arg("num_ranks"));
  m.def("get_combine_config", &openep::get_combine_config, nb::arg("num_ranks"));
  m.def("default_num_sms", &openep::default_num_sms);
  m.def("set_default_num_sms", &openep::set_default_num_sms, nb::arg("num_sms"));
  m.def("intranode_buffer_size_hint", &openep::intranode_buffer_size_hint, nb::arg("num_ranks"),
        nb::arg("max_tokens_per_rank"), nb::arg("hidden"), nb::arg("x_elem_bytes"), nb::arg("num_scales"),
        nb::arg("num_topk"));
  m.def("internode_buffer_size_hint",
        [](int num_ranks, int ranks_per_node, int max_tokens_per_rank, int hidden, int x_elem_bytes, int num_scales,
           int num_topk) {
          const openep::InternodeBufferSize s = openep::internode_buffer_size_hint(
              num_ranks, ranks_per_node, max_tokens_per_rank, hidden, x_elem_bytes, num_scales, num_topk);
          return std::make_tuple(s.num_nvl_bytes, s.num_rdma_bytes);
        },
        nb::arg("num_ranks"), nb::arg("ranks_per_node"), nb::arg("max_tokens_per_rank"), nb::arg("hidden"),
        nb::arg("x_elem_bytes"), nb::arg("num_scales"), nb::arg("num_topk"),
        "openep::internode_buffer_size_hint: (num_nvl_bytes, num_rdma_bytes) for internode normal mode.");
  m.def("low_latency_buffer_size_hint", &openep::low_latency_buffer_size_hint,
        nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_ranks"), nb::arg("num_experts"),
        "openep::low_latency_buffer_size_hint: num_rdma_bytes the low-latency kernels need (a multiple of 128).");
  m.def("deepep_low_latency_rdma_size_hint", [](int64_t T, int64_t hidden, int64_t num_experts) {
          // DeepEP V1's formula (deepep-v1-interface.md 3.4), for comparison only: OpenEP sizes with its own.
          const int64_t S = hidden / 128;
          const int64_t dispatch_msg = 16 + std::max(hidden * 2, hidden + S * 4);
          const int64_t combine_msg = S * 4 + hidden * 2;
          const int64_t send = std::max(T * dispatch_msg, num_experts * T * combine_msg);
          const int64_t recv = std::max(num_experts * T * dispatch_msg, num_experts * T * combine_msg);
          const int64_t sig = (num_experts * 4 + 127) / 128 * 128;
          const int64_t total = 2 * send + 2 * recv + 2 * sig;
          return (total + 128) / 128 * 128;
        }, nb::arg("num_max_dispatch_tokens_per_rank"), nb::arg("hidden"), nb::arg("num_experts"));
  m.attr("LOW_LATENCY_MAX_TOKENS_PER_RANK") = openep::kMaxLowLatencyTokensPerRank;
  m.attr("LOW_LATENCY_MAX_TOPK") = openep::kMaxLowLatencyTopk;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "OpenEP core binding (torch-free). Use the package openep, not this module.";
  nb::register_exception_translator(translate_error);
  m.def("_set_error_type", [](nb::handle type) {
    Py_INCREF(type.ptr());
    g_error_type = type.ptr();
  });
  m.def("compiled_nccl_version", &openep::compiled_nccl_version,
        "NCCL_VERSION_CODE OpenEP was compiled against (e.g. 22809).");
  m.def("loaded_nccl_version", &openep::loaded_nccl_version, "ncclGetVersion() of the loaded libnccl.so.2.");
  bind_config(m);
  bind_buffer(m);
  bind_reference(m);
}
