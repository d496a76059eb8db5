"""GPU tests of the openep package with ONE rank (one process, one GPU): the cases of _gpu_cases.py that need no
peer, so that a one-GPU machine checks the Python layer's own work (output allocation, window-backed outputs and
their lifetime, handles, streams) against the CPU reference. The peer paths are test_gpu.py's (2 GPUs).

Marker gpu1: reported as SKIPPED without torch or without a GPU.
"""

import pytest

pytestmark = pytest.mark.gpu1

_pool = None


def _run(name):
    global _pool
    from _mp_pool import Pool
    if _pool is None or not _pool.alive():
        _pool = Pool(1)
    try:
        _pool.run(name)
    except BaseException:
        _pool.kill()
        _pool = None
        raise


@pytest.fixture(scope="module", autouse=True)
def _shutdown_pool():
    yield
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


def test_one_rank_layout_matches_reference():
    _run("layout")


def test_one_rank_dispatch_combine_bf16():
    _run("dispatch_combine_bf16")


def test_one_rank_dispatch_window_backed_outputs():
    # the pool's tensors, the fallback to torch memory when it is full, and the memory given back when they go
    _run("dispatch_window_backed_outputs")


def test_one_rank_worst_case_tokens_and_combine():
    _run("dispatch_worst_tokens")


def test_one_rank_cached_dispatch():
    _run("dispatch_cached")
