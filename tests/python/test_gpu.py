"""GPU tests of the openep package: one process per GPU (2 GPUs), every method against the CPU reference.

Reported as SKIPPED (with the reason) without torch or without 2 GPUs. The cases live in _gpu_cases.py and
run on all ranks at once in a pool of worker processes (_mp_pool.py) that is created once and reused; a failed
case restarts the pool so that one failure cannot poison the next test.
"""

import pytest

pytestmark = pytest.mark.gpu

_pool = None  # _mp_pool.LazyPool(2), made by the first case


def _run(name):
    global _pool
    from _mp_pool import LazyPool
    if _pool is None:
        _pool = LazyPool(2)
    _pool.run(name)


@pytest.fixture(scope="module", autouse=True)
def _shutdown_pool():
    yield
    if _pool is not None:
        _pool.close()


def test_get_dispatch_layout_matches_reference():
    _run("layout")


def test_dispatch_combine_bf16_all_stream_modes():
    _run("dispatch_combine_bf16")


def test_dispatch_combine_fp8_with_column_major_scales():
    _run("dispatch_combine_fp8")


def test_dispatch_int32_topk_idx():
    _run("dispatch_int32_topk")


def test_dispatch_window_backed_outputs():
    _run("dispatch_window_backed_outputs")


def test_combine_window_backed_input():
    _run("combine_window_backed_input")


def test_dispatch_expert_alignment():
    _run("dispatch_expert_alignment")


def test_dispatch_worst_case_tokens_and_combine():
    _run("dispatch_worst_tokens")


def test_cached_dispatch():
    _run("dispatch_cached")


def test_stream_current_stream_is_waited_for():
    _run("stream_current_stream_is_waited_for")


def test_stream_previous_event_async_and_comm_allocation():
    _run("stream_previous_event_and_comm_allocation")


def test_stream_eventless_event_overlap_means_no_previous_event():
    _run("stream_eventless_overlap_is_no_event")


def test_errors_are_python_exceptions():
    _run("errors_are_exceptions")


def test_device_errors_and_destroy():
    _run("errors_device_side_and_destroy")


def test_get_local_buffer_tensor():
    _run("local_buffer_tensor")


def test_runtime_answers_deepep_queries():
    _run("runtime_deepep_queries")


def test_deep_ep_alias_megatron_default_path():
    _run("deep_ep_alias_megatron_default_path")


def test_low_latency_dispatch_combine_bf16():
    _run("ll_dispatch_combine_bf16")


def test_low_latency_dispatch_combine_fp8_each_scale_option():
    _run("ll_dispatch_combine_fp8")


def test_low_latency_hook_mode_equals_non_hook():
    _run("ll_hook_mode_equals_non_hook")


def test_low_latency_zero_copy_combine():
    _run("ll_zero_copy_combine")


def test_low_latency_logfmt_combine():
    _run("ll_logfmt_combine")


def test_low_latency_async_finish_and_streams():
    _run("ll_async_finish_and_streams")


def test_low_latency_errors_and_clean():
    _run("ll_errors")


def test_low_latency_cuda_graph_capture_and_replays():
    _run("ll_cuda_graph_replays")


def test_low_latency_decode_moe_example_matches_single_gpu():
    _run("ll_decode_moe_example")


def test_torch_group_undisturbed_and_two_buffers():
    _run("torch_group_undisturbed")


def test_moe_layer_end_to_end_matches_single_gpu():
    _run("moe_layer_end_to_end")
