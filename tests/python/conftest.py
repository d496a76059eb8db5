"""pytest setup for OpenEP's Python tests.

CPU tests (no marker) need only the built package. GPU tests (marker ``gpu``) need torch and at least 2 CUDA
GPUs (1 with ``OPENEP_PYTEST_SHARE_GPU=1``: the ranks are then processes sharing GPUs through the IPC test
fabric), those of marker ``gpu1`` (fake nodes sharing one GPU) torch and 1 GPU; without them they are reported as
SKIPPED with the reason, never as passed. With
``OPENEP_PYTEST_SKIP_EXIT=77`` (set by CTest) a session whose selected tests were all skipped exits 77, which
CTest reports as "Skipped".
"""

import os

import pytest

# OpenEP never uses NVLink multicast; keep NCCL, PyTorch and NVSHMEM off it in every process we start.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs torch and at least 2 CUDA GPUs (one process per GPU)")
    config.addinivalue_line("markers", "gpu1: needs torch and 1 CUDA GPU (e.g. fake nodes sharing one GPU)")


def gpu_skip_reason(min_gpus=2):
    """Why GPU tests cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    n = torch.cuda.device_count()
    if n < min_gpus:
        return f"needs {min_gpus} GPUs, found {n}"
    return None


def pytest_collection_modifyitems(config, items):
    # OPENEP_PYTEST_SHARE_GPU=1: the two-rank tests run as processes sharing GPUs (_mp_pool.py), so one GPU is enough.
    two = 1 if os.environ.get("OPENEP_PYTEST_SHARE_GPU") == "1" else 2
    for key, min_gpus in (("gpu", two), ("gpu1", 1)):
        reason = gpu_skip_reason(min_gpus)
        if reason is None:
            continue
        marker = pytest.mark.skip(reason=f"GPU test skipped: {reason}")
        for item in items:
            if key in item.keywords:
                item.add_marker(marker)


_counts = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[report.outcome] = _counts.get(report.outcome, 0) + 1


def pytest_sessionfinish(session, exitstatus):
    code = os.environ.get("OPENEP_PYTEST_SKIP_EXIT")
    if code and exitstatus == 0 and _counts["skipped"] > 0 and _counts["passed"] == 0 and _counts["failed"] == 0:
        session.exitstatus = int(code)
