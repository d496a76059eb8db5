"""Loads the extension module openep._C against the right libnccl.so.2.

OpenEP's kernels use NCCL's device API, which has no stable ABI: the loaded NCCL must be the exact version
OpenEP was compiled against. When the ``nvidia-nccl-cu13`` wheel is installed (it is PyTorch's NCCL), its
``libnccl.so.2`` is loaded first so that OpenEP and PyTorch share one copy whether or not torch is imported
before openep. The versions are compared at import (a warning) and at Buffer creation (an error).
"""

import ctypes
import os
import warnings

from .errors import OpenEPError


def _preload_nccl_wheel():
    try:
        import nvidia.nccl as wheel  # the nvidia-nccl-cu13 wheel (PyTorch's NCCL)
    except ImportError:
        return None
    for folder in list(getattr(wheel, "__path__", [])):
        path = os.path.join(folder, "lib", "libnccl.so.2")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    return None


NCCL_PRELOADED_FROM = _preload_nccl_wheel()

from . import _C  # noqa: E402  (after the preload on purpose)

_C._set_error_type(OpenEPError)


def nccl_version_message():
    """A one-line description of the compiled and the loaded NCCL versions."""
    compiled, loaded = _C.compiled_nccl_version(), _C.loaded_nccl_version()
    where = NCCL_PRELOADED_FROM or "the system library path"
    return (f"OpenEP was compiled against NCCL {compiled} and NCCL {loaded} is loaded (libnccl.so.2 from "
            f"{where})")


def check_nccl_version():
    """Raises OpenEPError(code='version_mismatch') unless the loaded NCCL equals the compiled one."""
    if _C.compiled_nccl_version() != _C.loaded_nccl_version():
        raise OpenEPError(
            "OpenEP NCCL version mismatch: " + nccl_version_message() +
            "; the NCCL device API has no stable ABI, so rebuild OpenEP (pip install .) in the environment "
            "whose NCCL (e.g. PyTorch's nvidia-nccl wheel) it will run with", "version_mismatch")


if _C.compiled_nccl_version() != _C.loaded_nccl_version():
    warnings.warn(nccl_version_message() + "; openep.Buffer will refuse to start until OpenEP is rebuilt "
                  "against the loaded NCCL", RuntimeWarning, stacklevel=2)
