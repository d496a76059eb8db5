"""``deep_ep`` served by OpenEP (the openep-deep-ep-alias distribution): DeepEP V1's package, OpenEP's objects.

Every name is OpenEP's own object, not a copy: ``deep_ep.Buffer is openep.Buffer``, ``deep_ep.Config is
openep.Config``, ``deep_ep.EventOverlap is openep.EventOverlap``, ``deep_ep.topk_idx_t`` is ``torch.int64``;
``deep_ep.buffer`` and ``deep_ep.utils`` re-export the same objects (``deep_ep.utils.EventHandle``), and
``deep_ep_cpp`` exposes ``Config``, ``EventHandle``, ``topk_idx_t``, ``get_low_latency_rdma_size_hint`` and
``is_sm90_compiled``. OpenEP's own names (``OpenEPError``, ``OpenEPNotAvailableError``, the handle types) are
exported too. What differs from DeepEP is listed in OpenEP's README ("Differences worth knowing").

This package is only imported when no other deep_ep is importable, or when OPENEP_SHADOW_DEEP_EP=1 asks for it
(``_openep_deep_ep_alias`` decides). Importing it imports openep, not torch (torch is imported on first use).
"""

try:
    import openep as _openep
except ImportError as _error:
    raise ImportError(
        f"deep_ep is provided by OpenEP's alias (openep-deep-ep-alias), but OpenEP itself cannot be imported "
        f"({_error}); install OpenEP (python3 -m pip install . --no-build-isolation in the OpenEP repository) or "
        f"remove the alias (pip uninstall openep-deep-ep-alias)") from _error

from openep import (  # noqa: F401  (re-exports)
    ERROR_CODES, Buffer, Config, EventHandle, EventOverlap, InternodeHandle, IntranodeHandle, LowLatencyHandle,
    OpenEPError, OpenEPNotAvailableError, compiled_nccl_version, loaded_nccl_version)

from . import buffer, utils  # noqa: F401,E402  (DeepEP's submodules)

#: DeepEP V1's public names (its ``__init__``); the OpenEP names above are extra.
__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]
#: The OpenEP version behind this deep_ep (DeepEP V1 itself defines no ``__version__``).
__openep_version__ = _openep.__version__


def __getattr__(name):
    # topk_idx_t is a torch dtype: resolved on use, so that importing deep_ep does not import torch.
    if name == "topk_idx_t":
        return _openep.topk_idx_t
    raise AttributeError(f"module 'deep_ep' (served by OpenEP {_openep.__version__}, DeepEP V1's interface) has no "
                         f"attribute {name!r}")
