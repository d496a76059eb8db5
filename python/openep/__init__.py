"""OpenEP: expert-parallel dispatch/combine for Mixture-of-Experts on NVIDIA GPUs, over NCCL only.

A drop-in for DeepEP V1's ``deep_ep`` package::

    import openep as deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes=...)

or, with no edit to code that says ``import deep_ep`` (Megatron-LM, SGLang, vLLM), after one step in the OpenEP
repository: ``python3 -m pip install ./python/deep_ep_alias``. Then ``deep_ep``, ``deep_ep.buffer``,
``deep_ep.utils`` and ``deep_ep_cpp`` re-export OpenEP's own objects (``deep_ep.Buffer is openep.Buffer``), unless a
real DeepEP is importable: it is kept, with a warning, until ``OPENEP_SHADOW_DEEP_EP=1`` asks for OpenEP
(python/deep_ep_alias/README.md). ``import openep`` alone never provides ``deep_ep``.

Exported (DeepEP's names): :class:`Buffer`, :class:`Config`, :class:`EventOverlap`, :class:`EventHandle`,
``topk_idx_t`` (``torch.int64``). OpenEP additions: :class:`OpenEPError` (every error OpenEP raises),
:class:`OpenEPNotAvailableError` (DeepEP capabilities OpenEP has no counterpart for, e.g. CUDA IPC handles),
:func:`compiled_nccl_version`, :func:`loaded_nccl_version`, :class:`IntranodeHandle`,
:class:`LowLatencyHandle`, and
:mod:`openep.reference` (the CPU reference, the specification the tests compare against).

PyTorch is imported lazily: ``import openep`` works without it (Config, size hints, reference).
"""

from .errors import ERROR_CODES, OpenEPError, OpenEPNotAvailableError  # noqa: F401  (before _C is loaded)
from ._loader import NCCL_PRELOADED_FROM, check_nccl_version, nccl_version_message  # noqa: F401
from ._C import Config, compiled_nccl_version, loaded_nccl_version  # noqa: F401
from .buffer import Buffer, InternodeHandle, IntranodeHandle, LowLatencyHandle  # noqa: F401
from .utils import EventHandle, EventOverlap  # noqa: F401
from . import reference  # noqa: F401

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "InternodeHandle", "IntranodeHandle", "LowLatencyHandle",
           "OpenEPError",
           "OpenEPNotAvailableError", "ERROR_CODES", "compiled_nccl_version", "loaded_nccl_version",
           "topk_idx_t", "reference"]


def __getattr__(name):
    # topk_idx_t is a torch dtype; resolve it on first use so that importing openep does not import torch.
    if name == "topk_idx_t":
        from ._torch import torch_module
        return torch_module().int64
    raise AttributeError(f"module 'openep' has no attribute {name!r}")
