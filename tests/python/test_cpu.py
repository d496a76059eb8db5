"""CPU tests of the openep package: no GPU and no PyTorch needed (CI runs them)."""

import pickle
import struct

import pytest

import openep
from openep import _C
from openep._checks import check_tensor

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


# ---- import, versions ------------------------------------------------------------------------------------
def test_import_exports_deepep_names():
    for name in ("Buffer", "Config", "EventOverlap", "EventHandle"):
        assert hasattr(openep, name), name
    assert openep.Buffer.num_sms == 20
    assert openep.Buffer.is_sm90_compiled() is True


def test_nccl_versions_match_and_are_reported():
    assert openep.compiled_nccl_version() == openep.loaded_nccl_version()
    assert openep.compiled_nccl_version() >= 22809
    assert str(openep.compiled_nccl_version()) in openep.nccl_version_message()
    openep.check_nccl_version()  # no raise


@pytest.mark.skipif(HAVE_TORCH, reason="checks the message shown when PyTorch is missing")
def test_torch_is_optional_until_needed():
    with pytest.raises(openep.OpenEPError) as e:
        openep.topk_idx_t
    assert e.value.code == "unsupported" and "PyTorch" in str(e.value)


# ---- Config ----------------------------------------------------------------------------------------------
def test_config_defaults_and_rdma_rounding():
    c = openep.Config()
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens) == (20, 6, 256, 6)
    assert c.num_max_rdma_chunked_recv_tokens == 258  # 256 rounded up to a multiple of 6 (DeepEP behaviour)
    c = openep.Config(24, 8, 256, 16, 128)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens) == (24, 8, 128)


@pytest.mark.parametrize("args,field", [((21,), "num_sms"), ((20, 0), "num_max_nvl_chunked_send_tokens"),
                                        ((20, 8, 8), "num_max_nvl_chunked_send_tokens"),
                                        ((20, 6, 256, 0), "num_max_rdma_chunked_send_tokens"),
                                        ((20, 6, 256, 100, 100), "num_max_rdma_chunked_send_tokens")])
def test_config_rejects_bad_values_naming_the_field(args, field):
    with pytest.raises(openep.OpenEPError) as e:
        openep.Config(*args)
    assert e.value.code == "invalid_argument"
    assert field in str(e.value)


# DeepEP V1 tables (interface spec 3.2 / 3.3): ranks -> (nvl_send, nvl_recv, rdma_send, rdma_recv after rounding)
DISPATCH = {2: (24, 256, 6, 132), 4: (6, 256, 6, 132), 8: (6, 256, 6, 132), 16: (36, 288, 20, 140),
            24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
            96: (20, 480, 12, 132), 128: (20, 560, 12, 132), 144: (32, 720, 12, 132), 160: (28, 720, 12, 132)}
COMBINE = {2: (10, 256, 6, 132), 4: (9, 256, 6, 132), 8: (4, 256, 6, 132), 16: (4, 288, 12, 132),
           24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
           96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def _fields(c):
    return (c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
            c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens)


@pytest.mark.parametrize("ranks", sorted(DISPATCH))
def test_default_config_tables(ranks):
    assert _fields(openep.Buffer.get_dispatch_config(ranks)) == DISPATCH[ranks]
    assert _fields(openep.Buffer.get_combine_config(ranks)) == COMBINE[ranks]
    assert openep.Buffer.get_dispatch_config(ranks).num_sms == openep.Buffer.num_sms


@pytest.mark.parametrize("ranks", [1, 3, 6, 12, 256])
def test_default_config_rejects_unsupported_rank_counts(ranks):
    for fn in (openep.Buffer.get_dispatch_config, openep.Buffer.get_combine_config):
        with pytest.raises(openep.OpenEPError) as e:
            fn(ranks)
        assert e.value.code == "invalid_argument" and str(ranks) in str(e.value)


def test_set_num_sms_is_global_and_checked():
    old = openep.Buffer.num_sms
    try:
        openep.Buffer.set_num_sms(24)
        assert openep.Buffer.num_sms == 24
        assert openep.Buffer.get_dispatch_config(8).num_sms == 24
        assert openep.Buffer.get_combine_config(2).num_sms == 24
        for bad in (23, 0, -2, 2.0, True):
            with pytest.raises(openep.OpenEPError) as e:
                openep.Buffer.set_num_sms(bad)
            assert e.value.code == "invalid_argument"
        assert openep.Buffer.num_sms == 24
    finally:
        openep.Buffer.set_num_sms(old)


# ---- size hints ------------------------------------------------------------------------------------------
def test_nvl_size_hint_matches_deepep_worked_example():
    # Interface spec 3.4: 8 ranks, default 20-SM dispatch config, hidden 7168 BF16 -> 335,709,824 bytes.
    assert openep.Buffer.get_dispatch_config(8).get_nvl_buffer_size_hint(7168 * 2, 8) == 335709824


def test_rdma_size_hint():
    c = openep.Buffer.get_dispatch_config(16)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 8) == 0
    # 16 ranks, 20 SMs: C=10, m=2, P=140; 10*2*18*2*4 + 10*2*140*(2*14336 + 16 + 2048 + 1024 + 1024 + 32)
    assert c.get_rdma_buffer_size_hint(7168 * 2, 16) == (2880 + 2800 * 32816 + 127) // 128 * 128


def test_size_hints_reject_bad_arguments():
    c = openep.Config()
    for args in ((0, 8), (1024, 12), (1024, 0)):
        with pytest.raises(openep.OpenEPError) as e:
            c.get_nvl_buffer_size_hint(*args)
        assert e.value.code == "invalid_argument"


def test_token_size_hint_grows_with_tokens_and_is_aligned():
    h = openep.Buffer.get_nvl_buffer_size_hint_for_tokens
    a, b = h(8, 1024, 7168), h(8, 4096, 7168)
    assert a % 128 == 0 and b % 128 == 0 and b > a > 8 * 1024 * 7168 * 2
    assert h(8, 4096, 7168, 1, 56, 8) <= h(8, 4096, 7168, 2, 0, 8)  # combine (BF16) sizes both
    with pytest.raises(openep.OpenEPError):
        h(0, 16, 128)


def test_low_latency_size_hint_not_available_yet():
    with pytest.raises(openep.OpenEPNotAvailableError) as e:
        openep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288)
    assert isinstance(e.value, NotImplementedError) and isinstance(e.value, openep.OpenEPError)
    assert e.value.code == "not_available" and "not available yet" in str(e.value)


# ---- Buffer argument validation that needs no GPU ----------------------------------------------------------
class _FakeGroup:
    def rank(self):
        return 0

    def size(self):
        return 2


def test_buffer_needs_group_or_comm():
    with pytest.raises(ValueError):
        openep.Buffer(None)


@pytest.mark.parametrize("kwargs,needle", [({"num_nvl_bytes": 100}, "num_nvl_bytes must be a multiple of 128"),
                                           ({"num_rdma_bytes": 129}, "num_rdma_bytes must be a multiple of 128"),
                                           ({"num_nvl_bytes": -128}, "num_nvl_bytes must be >= 0"),
                                           ({"num_nvl_bytes": 1.5}, "num_nvl_bytes expected an int"),
                                           ({"timeout_seconds": 0}, "timeout_seconds")])
def test_buffer_rejects_bad_sizes_before_touching_the_gpu(kwargs, needle):
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer(_FakeGroup(), **kwargs)
    assert e.value.code == "invalid_argument" and needle in str(e.value)


def test_buffer_shrink_mode_not_available_yet():
    with pytest.raises(openep.OpenEPNotAvailableError):
        openep.Buffer(_FakeGroup(), enable_shrink=True)


@pytest.mark.parametrize("method,args", [
    ("low_latency_dispatch", (None, None, 128, 288)), ("low_latency_combine", (None, None, None, None)),
    ("clean_low_latency_buffer", (128, 7168, 288)), ("get_next_low_latency_combine_buffer", (None,)),
    ("low_latency_update_mask_buffer", (1,)), ("low_latency_query_mask_buffer", (None,)),
    ("low_latency_clean_mask_buffer", ()), ("internode_dispatch", (None,)), ("internode_combine", (None, None))])
def test_unlanded_methods_raise_not_available(method, args):
    buf = object.__new__(openep.Buffer)  # no GPU: the stubs fail before touching the Buffer's state
    with pytest.raises(openep.OpenEPNotAvailableError) as e:
        getattr(buf, method)(*args)
    assert "not available yet" in str(e.value)


# ---- tensor checks (duck-typed, so they run without torch) ------------------------------------------------
class _FakeTensor:
    def __init__(self, shape, dtype="torch.bfloat16", device="cuda:0", contiguous=True):
        self.shape, self.dtype, self.device, self._c = tuple(shape), dtype, device, contiguous

    def is_contiguous(self):
        return self._c

    def stride(self):
        return (1, self.shape[0])


@pytest.mark.parametrize("tensor,needle", [
    (_FakeTensor((4, 8), "torch.float32"), "x expected dtype bfloat16, got float32"),
    (_FakeTensor((4, 9)), "x expected shape [*, 8], got [4, 9]"),
    (_FakeTensor((4,)), "x expected shape [*, 8], got [4]"),
    (_FakeTensor((4, 8), contiguous=False), "x must be contiguous"),
    (_FakeTensor((4, 8), device="cuda:1"), "x expected on device cuda:0, got cuda:1"),
    ([1, 2], "x expected a tensor, got list")])
def test_tensor_checks_name_argument_expected_and_seen(tensor, needle):
    with pytest.raises(openep.OpenEPError) as e:
        check_tensor("dispatch", "x", tensor, ("bfloat16",), (None, 8), True, "cuda:0")
    assert e.value.code == "invalid_argument"
    assert needle in str(e.value) and str(e.value).startswith("OpenEP invalid argument: dispatch:")


def test_event_overlap_without_event():
    ev = openep.EventOverlap()
    with ev as same:
        assert same is ev
    with pytest.raises(openep.OpenEPError):
        ev.current_stream_wait()


def test_errors_pickle_with_their_code():
    e = pickle.loads(pickle.dumps(openep.OpenEPError("OpenEP timeout: x", "timeout")))
    assert isinstance(e, openep.OpenEPError) and e.code == "timeout" and str(e) == "OpenEP timeout: x"


# ---- the CPU reference through the binding ------------------------------------------------------------------
def _i64(*v):
    return struct.pack(f"<{len(v)}q", *v)


def test_reference_layout_hand_case():
    # 3 tokens, top-2, 4 experts on 2 ranks: t0 -> {0, 3}, t1 -> {1, 1}, t2 -> {-1, -1}
    d = _C.ref_get_dispatch_layout(_i64(0, 3, 1, 1, -1, -1), 3, 2, 4, 2)
    assert d["num_tokens_per_rank"] == [2, 1]
    assert d["num_tokens_per_expert"] == [1, 2, 0, 1]
    assert d["num_tokens_per_rdma_rank"] == []
    assert d["is_token_in_rank"] == bytes([1, 1, 1, 0, 0, 0])


def test_reference_errors_arrive_as_value_error():
    with pytest.raises(ValueError) as e:
        _C.ref_get_dispatch_layout(_i64(0, 9), 1, 2, 4, 2)
    assert "topk_idx" in str(e.value)


def test_reference_dispatch_and_combine_hand_case():
    # 2 ranks, 2 experts (one per rank), hidden 8 BF16, top-1. Rank 0: t0 -> e1, t1 -> e0. Rank 1: t0 -> e0.
    def bf16(v):
        return struct.pack("<8H", *([v] * 8))
    ranks = [(2, bf16(0x3F80) + bf16(0x4000), b"", _i64(1, 0), struct.pack("<2f", 0.5, 0.25)),
             (1, bf16(0x4040), b"", _i64(0), struct.pack("<f", 1.0))]
    r = _C.ref_dispatch(2, 2, 8, 1, 2, 0, 1, True, ranks)
    r0, r1 = r.recv(0), r.recv(1)
    assert r0["num_recv_tokens"] == 2 and r1["num_recv_tokens"] == 1
    assert r0["x"] == bf16(0x4000) + bf16(0x4040)           # ordered by (source rank, source token)
    assert struct.unpack("<2i", r0["src_rank"]) == (0, 1) and struct.unpack("<2i", r0["src_idx"]) == (1, 0)
    assert r0["rank_prefix"] == [1, 2] and r0["num_recv_tokens_per_expert"] == [2]
    assert struct.unpack("<2q", r0["topk_idx"]) == (0, 0)     # local expert ids
    assert struct.unpack("<4i", r0["send_pos"]) == (-1, 0, 0, -1)  # rank 0 as source: t0 -> rank 1 row 0
    out = _C.ref_combine(r, [(r0["x"], r0["topk_weights"]), (r1["x"], r1["topk_weights"])], [], [])
    assert out[0][0] == bf16(0x3F80) + bf16(0x4000)
    assert struct.unpack("<2f", out[0][1]) == (0.5, 0.25)


# ---- package hygiene ----------------------------------------------------------------------------------------
def test_import_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, openep; openep.Config(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _public_callables(cls):
    for name in dir(cls):
        if name.startswith("_") and name not in ("__init__", "__enter__", "__exit__"):
            continue
        attr = getattr(cls, name)
        if callable(attr):
            yield name, attr


@pytest.mark.parametrize("cls", [openep.Buffer, openep.EventOverlap, openep.EventHandle, openep.Config,
                                 openep.OpenEPError])
def test_every_public_method_has_a_docstring(cls):
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no docstring"
    missing = [n for n, f in _public_callables(cls)
               if n != "__init__" and not (getattr(f, "__doc__", None) or "").strip()]
    # methods inherited from object/RuntimeError carry their own docstrings; ours must too
    assert not missing, f"{cls.__name__}: no docstring on {missing}"
