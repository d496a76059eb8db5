"""GPU tests of the openep package with ONE rank (one process, one GPU): the cases of _gpu_cases.py that need no
peer, so that a one-GPU machine checks the Python layer's own work (output allocation, window-backed outputs and
their lifetime, handles, streams) against the CPU reference. The peer paths are test_gpu.py's (2 GPUs).

Marker gpu1: reported as SKIPPED without torch or without a GPU.
"""

import pytest

pytestmark = pytest.mark.gpu1

_pool = None  # _mp_pool.LazyPool(1), made by the first case


def _run(name):
    global _pool
    from _mp_pool import LazyPool
    if _pool is None:
        _pool = LazyPool(1)
    _pool.run(name)


@pytest.fixture(scope="module", autouse=True)
def _shutdown_pool():
    yield
    if _pool is not None:
        _pool.close()


def test_one_rank_layout_matches_reference():
    _run("layout")


# The dispatch cases pass an explicit Config on one rank (_gpu_cases._config): DeepEP's table, the default, has no
# entry for 1 rank (OpenEPError "get_dispatch_config: unsupported number of EP ranks 1", as DeepEP).
@pytest.mark.parametrize("name", ["dispatch_combine_bf16", "dispatch_combine_fp8", "dispatch_int32_topk",
                                  "dispatch_window_backed_outputs", "dispatch_expert_alignment",
                                  "dispatch_worst_tokens", "dispatch_cached", "combine_window_backed_input"])
def test_one_rank_dispatch(name):
    _run(name)
