"""``deep_ep_cpp`` served by OpenEP: the names callers take from DeepEP's extension module, as OpenEP's objects.

``Config`` (openep.Config), ``EventHandle`` (openep.EventHandle), ``topk_idx_t`` (torch.int64, resolved on use),
``get_low_latency_rdma_size_hint`` (openep.Buffer's: OpenEP's requirement) and ``is_sm90_compiled``. DeepEP's
``deep_ep_cpp.Buffer`` (its C++ runtime, built only by its own buffer.py) has no counterpart to construct: create
``deep_ep.Buffer``; its ``.runtime`` answers DeepEP's runtime queries.
"""

try:
    import openep as _openep
except ImportError as _error:
    raise ImportError(
        f"deep_ep_cpp is provided by OpenEP's alias (openep-deep-ep-alias), but OpenEP itself cannot be imported "
        f"({_error}); install OpenEP (python3 -m pip install . --no-build-isolation in the OpenEP repository) or "
        f"remove the alias (pip uninstall openep-deep-ep-alias)") from _error

from openep import Config, EventHandle  # noqa: F401,E402

get_low_latency_rdma_size_hint = _openep.Buffer.get_low_latency_rdma_size_hint
is_sm90_compiled = _openep.Buffer.is_sm90_compiled

__all__ = ["Config", "EventHandle", "topk_idx_t", "get_low_latency_rdma_size_hint", "is_sm90_compiled"]


def __getattr__(name):
    if name == "topk_idx_t":
        return _openep.topk_idx_t
    if name == "Buffer":
        raise AttributeError("deep_ep_cpp.Buffer (DeepEP's C++ runtime) has no OpenEP counterpart to construct: create "
                             "deep_ep.Buffer (openep.Buffer); its .runtime answers DeepEP's runtime queries")
    raise AttributeError(f"module 'deep_ep_cpp' (served by OpenEP {_openep.__version__}) has no attribute {name!r}")
