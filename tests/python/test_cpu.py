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
    # own rows never pass through the window: 7 peer parts of 1024 rows of 7168 BF16 at EP8
    assert a % 128 == 0 and b % 128 == 0 and b > a > 7 * 1024 * 7168 * 2
    assert h(8, 4096, 7168, 1, 56, 8) <= h(8, 4096, 7168, 2, 0, 8)  # combine (BF16) sizes both
    with pytest.raises(openep.OpenEPError):
        h(0, 16, 128)


def test_low_latency_size_hint_is_the_cores_requirement():
    h = openep.Buffer.get_low_latency_rdma_size_hint
    for args in ((128, 7168, 8, 288), (128, 7168, 2, 32), (1, 8, 2, 2), (1024, 4096, 4, 64)):
        v = h(*args)
        assert v == _C.low_latency_buffer_size_hint(*args) and v % 128 == 0
    # OpenEP's layout (two dispatch receive halves of R x T per-rank messages, two combine receive halves and the
    # zero-copy buffer) at the headline shape, next to DeepEP's formula, whose worked example (interface spec
    # 3.4) is checked here so the comparison in the docs holds.
    assert _C.deepep_low_latency_rdma_size_hint(128, 7168, 288) == 2146961792
    # Recomputed from the layout documented in src/protocol/low_latency_layout.hpp (not read back from the core):
    # signal area (2 flag tables of 2 x 8192 uint64 + 2 x 8192 int32 counts), two dispatch halves of R x T
    # messages (128-byte routing header + the larger of the BF16 row and the FP8 row with its scales), two
    # combine halves of E x T BF16 rows, two halves of their LogFMT metadata (E x T rows of H/128 uint32, padded
    # to 16 bytes), and the zero-copy buffer [E/R][R x T][H] BF16.
    def align(v, a):
        return (v + a - 1) // a * a

    def layout_bytes(T, H, R, E):
        signals = 2 * 8 * 2 * 8192 + 4 * 2 * 8192
        msg = align(128 + max(2 * H, H + H // 128 * 4), 16)
        meta = align(H // 128 * 4, 16)
        return align(signals + 2 * align(R * T * msg, 128) + 2 * align(E * T * H * 2, 128) +
                     2 * align(E * T * meta, 128) + (E // R) * R * T * H * 2, 128)

    assert h(128, 7168, 8, 288) == layout_bytes(128, 7168, 8, 288) == 1631911936
    assert h(128, 7168, 2, 32) == layout_bytes(128, 7168, 2, 32)
    # the combine receive region alone: 2 halves x E x T BF16 rows
    assert h(128, 7168, 8, 288) > 2 * 288 * 128 * 2 * 7168
    assert h(256, 7168, 8, 288) > h(128, 7168, 8, 288) > h(128, 4096, 8, 288)


@pytest.mark.parametrize("args,needle", [((0, 7168, 8, 288), "num_max_dispatch_tokens_per_rank"),
                                         ((5000, 7168, 8, 288), "num_max_dispatch_tokens_per_rank"),
                                         ((128, 7170, 8, 288), "hidden"), ((128, 7168, 8, 100), "num_experts"),
                                         ((128, 7168, 0, 288), "num_ranks"),
                                         ((128.0, 7168, 8, 288), "expected an int")])
def test_low_latency_size_hint_rejects_bad_arguments(args, needle):
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer.get_low_latency_rdma_size_hint(*args)
    assert e.value.code == "invalid_argument" and needle in str(e.value)


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


def test_buffer_rejects_a_non_bool_allow_network():
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer(_FakeGroup(), allow_network=1)
    assert e.value.code == "invalid_argument" and "allow_network expected a bool or None, got int" in str(e.value)


def test_buffer_rejects_a_malformed_openep_allow_network(monkeypatch):
    monkeypatch.setenv("OPENEP_ALLOW_NETWORK", "maybe")
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer(_FakeGroup())
    assert e.value.code == "invalid_argument" and "OPENEP_ALLOW_NETWORK" in str(e.value) and "maybe" in str(e.value)


def test_buffer_rejects_an_unknown_internode_backend():
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer(_FakeGroup(), internode_backend="rdma")
    assert e.value.code == "invalid_argument" and "internode_backend must be one of ['gin', 'host_p2p']" in str(e.value)


def test_buffer_rejects_a_malformed_openep_internode_backend(monkeypatch):
    monkeypatch.setenv("OPENEP_INTERNODE_BACKEND", "nvshmem")
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer(_FakeGroup())
    assert e.value.code == "invalid_argument" and "'nvshmem'" in str(e.value)


@pytest.mark.parametrize("value,want", [("", False), ("0", False), ("off", False), ("1", True), ("TRUE", True),
                                        (" yes ", True)])
def test_env_flag_parsing(monkeypatch, value, want):
    from openep.buffer import _env_flag
    monkeypatch.setenv("OPENEP_TEST_FLAG", value)
    assert _env_flag("OPENEP_TEST_FLAG") is want
    monkeypatch.delenv("OPENEP_TEST_FLAG")
    assert _env_flag("OPENEP_TEST_FLAG") is False


def test_internode_calls_on_a_destroyed_buffer_name_the_call():
    buf = object.__new__(openep.Buffer)
    buf.runtime = None
    for method, args in (("internode_dispatch", (None,)), ("internode_combine", (None, None))):
        with pytest.raises(openep.OpenEPError) as e:
            getattr(buf, method)(*args)
        assert method in str(e.value) and "destroyed" in str(e.value)


def test_internode_handle_keeps_deepep_positions():
    h = openep.InternodeHandle(*range(10))
    assert len(h) == 10 and h[0] == 0 and h[-4] == 6 and h[7] == 7 and h[8] == 8  # callers read 0, -4, 7, 8
    assert h.recv_gbl_rank_prefix_sum == 6 and h.send_rdma_head == 8


def test_internode_size_hint_matches_the_core():
    nvl, rdma = openep.Buffer.get_internode_buffer_size_hint(16, 8, 4096, 7168, 2, 0, 8)
    # Worst case: 16 x 4096 rows of 7168 BF16 per half of the node window; 2 nodes x 4096 records per rail half.
    assert nvl % 128 == 0 and rdma % 128 == 0 and nvl > 16 * 4096 * 14336 * 2 and rdma > 2 * 4096 * 14336 * 2
    with pytest.raises(openep.OpenEPError) as e:
        openep.Buffer.get_internode_buffer_size_hint(16, 9, 4096, 7168)
    assert "ranks_per_node must be in [1, 8], got 9" in str(e.value)


@pytest.mark.parametrize("method,args", [
    ("low_latency_update_mask_buffer", (1,)), ("low_latency_query_mask_buffer", (None,)),
    ("low_latency_clean_mask_buffer", ())])
def test_mask_methods_need_enable_shrink(method, args):
    buf = object.__new__(openep.Buffer)  # no GPU: the check comes before any use of the core
    buf.runtime, buf.enable_shrink = object(), False
    with pytest.raises(openep.OpenEPError) as e:
        getattr(buf, method)(*args)
    assert f"{method} requires Buffer(enable_shrink=True)" in str(e.value)


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


def test_reference_layout_counts_tokens_once_per_node():
    # 2 tokens, top-2, 8 experts on 4 ranks in nodes of 2: t0 -> {0 (rank 0), 3 (rank 1)}: node 0 once;
    # t1 -> {2 (rank 1), 7 (rank 3)}: nodes 0 and 1.
    d = _C.ref_get_dispatch_layout(_i64(0, 3, 2, 7), 2, 2, 8, 4, 2)
    assert d["num_tokens_per_rank"] == [1, 2, 0, 1]
    assert d["num_tokens_per_rdma_rank"] == [2, 1]
    assert _C.ref_get_dispatch_layout(_i64(0, 3, 2, 7), 2, 2, 8, 4)["num_tokens_per_rdma_rank"] == []


def test_reference_internode_combine_rounds_node_partials():
    # 4 ranks in nodes of 2, one expert per rank, hidden 8, top-3: rank 0's one token goes to ranks 0, 1 (node 0)
    # and 2 (node 1). Returned rows 1.0, 2^-8, 2^-8: the flat fp32 sum 1 + 2^-7 is a BF16 value (0x3F81); per node,
    # 1 + 2^-8 rounds (tie to even) to 1.0, and 1.0 + 2^-8 rounds to 1.0 again (0x3F80).
    def bf16(v):
        return struct.pack("<8H", *([v] * 8))
    ranks = [(1, bf16(0x3F80), b"", _i64(0, 1, 2), struct.pack("<3f", 0.5, 0.25, 0.125))] + \
            [(0, b"", b"", b"", b"") for _ in range(3)]
    r = _C.ref_dispatch(4, 4, 8, 3, 2, 0, 1, True, ranks)
    rows = [r.recv(d) for d in range(4)]
    ins = [(bf16(0x3F80), rows[0]["topk_weights"]), (bf16(0x3B80), rows[1]["topk_weights"]),
           (bf16(0x3B80), rows[2]["topk_weights"]), (b"", b"")]
    flat = _C.ref_combine(r, ins, [], [])
    assert flat[0][0] == bf16(0x3F81)
    assert _C.ref_combine(r, ins, [], [], 1)[0][0] == flat[0][0]  # one rank per node: the flat order
    node2 = _C.ref_combine(r, ins, [], [], 2)
    assert node2[0][0] == bf16(0x3F80)
    assert struct.unpack("<3f", node2[0][1]) == (0.5, 0.25, 0.125)  # weights come back (fp32, not rounded)


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


# ---- low-latency mode: DeepEP signatures and argument checks that need no GPU --------------------------------
def _params(fn):
    import inspect
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


_E = object()  # "no default"


def _sig(*items):
    return [(n, d) if d is not _E else (n, __import__("inspect").Parameter.empty) for n, d in items]


# DeepEP V1's signatures (interface spec 2.1, 2.3, 2.8): names, order and defaults.
DEEPEP_SIGNATURES = {
    "low_latency_dispatch": _sig(("self", _E), ("x", _E), ("topk_idx", _E), ("num_max_dispatch_tokens_per_rank", _E),
                                 ("num_experts", _E), ("cumulative_local_expert_recv_stats", None),
                                 ("dispatch_wait_recv_cost_stats", None), ("use_fp8", True), ("round_scale", False),
                                 ("use_ue8m0", False), ("async_finish", False), ("return_recv_hook", False)),
    "low_latency_combine": _sig(("self", _E), ("x", _E), ("topk_idx", _E), ("topk_weights", _E), ("handle", _E),
                                ("use_logfmt", False), ("zero_copy", False), ("async_finish", False),
                                ("return_recv_hook", False), ("out", None), ("combine_wait_recv_cost_stats", None)),
    "get_next_low_latency_combine_buffer": _sig(("self", _E), ("handle", _E)),
    "clean_low_latency_buffer": _sig(("self", _E), ("num_max_dispatch_tokens_per_rank", _E), ("hidden", _E),
                                     ("num_experts", _E)),
    "get_low_latency_rdma_size_hint": _sig(("num_max_dispatch_tokens_per_rank", _E), ("hidden", _E),
                                           ("num_ranks", _E), ("num_experts", _E)),
}


@pytest.mark.parametrize("method", sorted(DEEPEP_SIGNATURES))
def test_low_latency_signatures_match_deepep(method):
    assert _params(getattr(openep.Buffer, method)) == DEEPEP_SIGNATURES[method]


def test_buffer_constructor_signature_matches_deepep():
    want = _sig(("self", _E), ("group", _E), ("num_nvl_bytes", 0), ("num_rdma_bytes", 0), ("low_latency_mode", False),
                ("num_qps_per_rank", 24), ("allow_nvlink_for_low_latency_mode", True), ("allow_mnnvl", False),
                ("use_fabric", False), ("explicitly_destroy", False), ("enable_shrink", False), ("comm", None))
    assert _params(openep.Buffer.__init__)[:len(want)] == want
    assert isinstance(openep.Buffer.__dict__["get_low_latency_rdma_size_hint"], staticmethod)


class _LLTensor(_FakeTensor):
    def data_ptr(self):
        return 0


def _ll_buffer(low_latency_mode=True, R=2):
    """A Buffer object without a GPU: the low-latency argument checks run before anything touches the device."""
    buf = object.__new__(openep.Buffer)
    buf.runtime = object()
    buf.group_size, buf.rank, buf._dev, buf.low_latency_mode = R, 0, "cuda:0", low_latency_mode
    return buf


T_, H_, E_ = 128, 1024, 8  # 2 ranks -> 4 local experts


def _dispatch_args(**over):
    a = dict(x=_LLTensor((64, H_)), topk_idx=_LLTensor((64, 4), "torch.int64"), num_max_dispatch_tokens_per_rank=T_,
             num_experts=E_)
    a.update(over)
    return a


@pytest.mark.parametrize("over,needle", [
    ({"x": _LLTensor((64, H_), "torch.float32")}, "x expected dtype bfloat16, got float32"),
    ({"x": _LLTensor((64, H_), contiguous=False)}, "x must be contiguous"),
    ({"x": _LLTensor((64, H_), device="cuda:1")}, "x expected on device cuda:0"),
    ({"x": _LLTensor((129, H_)), "topk_idx": _LLTensor((129, 4), "torch.int64")},
     "more than num_max_dispatch_tokens_per_rank = 128"),
    ({"topk_idx": _LLTensor((63, 4), "torch.int64")}, "topk_idx expected shape [64, *]"),
    ({"topk_idx": _LLTensor((64, 4), "torch.float32")}, "topk_idx expected dtype int64 or int32"),
    ({"topk_idx": _LLTensor((64, 33), "torch.int64")}, "topk_idx must have 1..32 columns"),
    ({"num_experts": 7}, "num_experts must be a multiple of the group size 2"),
    ({"num_max_dispatch_tokens_per_rank": 0}, "num_max_dispatch_tokens_per_rank must be >= 1"),
    ({"cumulative_local_expert_recv_stats": _LLTensor((8,), "torch.int32")},
     "cumulative_local_expert_recv_stats expected shape [4]"),
    ({"dispatch_wait_recv_cost_stats": _LLTensor((2,), "torch.int32")},
     "dispatch_wait_recv_cost_stats expected dtype int64"),
    ({"async_finish": True, "return_recv_hook": True}, "mutually exclusive"),
    ({"use_ue8m0": True}, "use_ue8m0=True requires round_scale=True"),
    ({"x": _LLTensor((64, 1000))}, "hidden must be a multiple of 128 with use_fp8"),
    ({"x": _LLTensor((64, 1152)), "round_scale": True, "use_ue8m0": True}, "hidden must be a multiple of 512"),
    ({"x": _LLTensor((64, 1004)), "use_fp8": False}, "hidden must be a multiple of 8 with BF16"),
])
def test_low_latency_dispatch_argument_checks(over, needle):
    a = _dispatch_args(**over)
    if "x" in over and "topk_idx" not in over:
        a["topk_idx"] = _LLTensor((a["x"].shape[0], 4), "torch.int64")
    with pytest.raises(openep.OpenEPError) as e:
        _ll_buffer().low_latency_dispatch(**a)
    assert e.value.code == "invalid_argument", str(e.value)
    assert needle in str(e.value) and str(e.value).startswith("OpenEP invalid argument: low_latency_dispatch:")


def test_low_latency_methods_require_low_latency_mode():
    buf = _ll_buffer(low_latency_mode=False)
    handle = openep.LowLatencyHandle(_LLTensor((4, 256), "torch.int32"), _LLTensor((4, 2), "torch.int64"), T_, H_, E_)
    calls = [lambda: buf.low_latency_dispatch(**_dispatch_args()),
             lambda: buf.low_latency_combine(None, None, None, handle),
             lambda: buf.get_next_low_latency_combine_buffer(handle),
             lambda: buf.clean_low_latency_buffer(T_, H_, E_)]
    for call in calls:
        with pytest.raises(openep.OpenEPError) as e:
            call()
        assert e.value.code == "invalid_argument" and "low_latency_mode=True" in str(e.value)


def _ll_handle(El=4, R=2, T=T_, H=H_, E=E_, src_dtype="torch.int32"):
    return openep.LowLatencyHandle(_LLTensor((El, R * T), src_dtype), _LLTensor((El, R), "torch.int64"), T, H, E)


def _combine_args(**over):
    a = dict(x=_LLTensor((4, 2 * T_, H_)), topk_idx=_LLTensor((64, 4), "torch.int64"),
             topk_weights=_LLTensor((64, 4), "torch.float32"), handle=_ll_handle())
    a.update(over)
    return a


@pytest.mark.parametrize("over,needle", [
    ({"handle": _ll_handle()[:4]}, "handle expected the 5-tuple"),
    ({"handle": _ll_handle(src_dtype="torch.int64")}, "handle.packed_recv_src_info expected dtype int32"),
    ({"handle": _ll_handle(El=3)}, "handle.packed_recv_src_info expected shape [4, 256]"),
    ({"x": _LLTensor((4, 2 * T_, 512))}, "x expected shape [4, 256, 1024], got [4, 256, 512]"),
    ({"x": None}, "x expected a tensor"),
    ({"topk_weights": _LLTensor((64, 4), "torch.bfloat16")}, "topk_weights expected dtype float32"),
    ({"topk_weights": _LLTensor((64, 3), "torch.float32")}, "topk_weights expected shape [64, 4]"),
    ({"topk_idx": _LLTensor((129, 4), "torch.int64")}, "more than the handle's num_max_dispatch_tokens_per_rank"),
    ({"out": _LLTensor((64, 512))}, "out expected shape [64, 1024]"),
    ({"combine_wait_recv_cost_stats": _LLTensor((3,), "torch.int64")}, "combine_wait_recv_cost_stats expected shape"),
    ({"async_finish": True, "return_recv_hook": True}, "mutually exclusive"),
])
def test_low_latency_combine_argument_checks(over, needle):
    with pytest.raises(openep.OpenEPError) as e:
        _ll_buffer().low_latency_combine(**_combine_args(**over))
    assert e.value.code == "invalid_argument", str(e.value)
    assert needle in str(e.value) and str(e.value).startswith("OpenEP invalid argument: low_latency_combine:")


def test_low_latency_combine_passes_use_logfmt_to_the_core(monkeypatch):
    """use_logfmt reaches the core's arguments (the core validates it: hidden % 128 == 0, NVLink transport)."""
    import openep._low_latency as ll_module
    calls = []

    class FakeRuntime:
        def low_latency_combine(self, args, handle, out, stream):
            calls.append(args)

        def stream_wait(self, waiting, waited):
            pass

    buf = _ll_buffer()
    buf.runtime, buf._device, buf._comm_ptr = FakeRuntime(), 0, 0
    monkeypatch.setattr(ll_module, "torch_module", lambda: None)
    monkeypatch.setattr(ll_module, "current_raw_stream", lambda device: 0)
    for flag in (True, False):
        buf.low_latency_combine(**_combine_args(use_logfmt=flag, out=_LLTensor((64, H_))))
        assert calls[-1].use_logfmt is flag


def test_low_latency_handle_is_deepeps_5_tuple():
    h = _ll_handle()
    assert isinstance(h, tuple) and len(h) == 5
    src, rng, T, H, E = h
    assert (T, H, E) == (T_, H_, E_) and h.packed_recv_src_info is src and h.packed_recv_layout_range is rng
    assert h.num_max_dispatch_tokens_per_rank == T_ and h.hidden == H_ and h.num_experts == E_


# ---- the low-latency CPU reference through the binding (hand-computed cases) -------------------------------
def _bf16_row(v, n):
    return struct.pack(f"<{n}H", *([v] * n))


def test_reference_low_latency_bf16_dispatch_and_combine_hand_case():
    # 2 ranks, 2 experts (one per rank), T = 2, hidden 8 BF16, top-1. Rank 0: t0 -> e1, t1 -> e0. Rank 1: t0 -> e0.
    ranks = [(2, _bf16_row(0x3F80, 8) + _bf16_row(0x4000, 8), _i64(1, 0), struct.pack("<2f", 0.5, 0.25)),
             (1, _bf16_row(0x4040, 8), _i64(0), struct.pack("<f", 1.0))]
    r = _C.ref_low_latency_dispatch(2, 2, 8, 1, 2, False, True, True, ranks)  # scale flags ignored without FP8
    r0, r1 = r.recv(0), r.recv(1)
    assert r0["count"] == [2] and r1["count"] == [1]
    assert struct.unpack("<4i", r0["src_info"]) == (1, 0, -1, -1)
    assert struct.unpack("<2q", r0["layout_range"]) == ((0 << 32) | 1, (1 << 32) | 1)
    assert struct.unpack("<2q", r1["layout_range"])[0] == (0 << 32) | 1
    assert struct.unpack("<2q", r1["layout_range"])[1] & 0xFFFFFFFF == 0
    assert r0["packed_x"][:32] == _bf16_row(0x4000, 8) + _bf16_row(0x4040, 8)  # rank 0's t1, then rank 1's t0
    assert r0["packed_scales"] == b"" and r0["packed_scales_ue8m0"] == b""
    # combine: each expert returns the row it received
    out = _C.ref_low_latency_combine(r, [r0["packed_x"], r1["packed_x"]])
    assert out[0] == _bf16_row(0x3F00, 8) + _bf16_row(0x3F00, 8)  # 0.5 * 1.0, 0.25 * 2.0
    assert out[1] == _bf16_row(0x4040, 8)                          # 1.0 * 3.0


def test_reference_low_latency_logfmt_combine_hand_case():
    # 1 rank, 1 expert, T = 1, hidden 128, top-1, weight 1. Rows of 1.0 (amax >= 1) travel as BF16 (unchanged); the
    # row (0.25, 0, 0.5 ...) is encoded with amax 0.5, amin 0 -> log2 amin clipped to -1 - 32: 0.5 = amax
    # round-trips to 0.5 (within 1e-6: BF16 0x3F00), 0 -> code 0 -> 0, 0.25 -> code 495 -> 2^(494 * 32/510 - 33)
    # = 0.24932 (BF16 0x3E7F).
    H = 128
    ranks = [(1, _bf16_row(0x3F80, H), _i64(0), struct.pack("<f", 1.0))]
    r = _C.ref_low_latency_dispatch(1, 1, H, 1, 1, False, False, False, ranks)
    assert _C.ref_low_latency_combine(r, [_bf16_row(0x3F80, H)], True)[0] == _bf16_row(0x3F80, H)
    row = struct.pack("<2H", 0x3E80, 0x0000) + _bf16_row(0x3F00, H - 2)
    assert _C.ref_low_latency_combine(r, [row], False)[0] == row
    want = struct.pack("<2H", 0x3E7F, 0x0000) + _bf16_row(0x3F00, H - 2)
    assert _C.ref_low_latency_combine(r, [row], True)[0] == want


@pytest.mark.parametrize("round_scale,ue8m0,byte,scale", [(False, False, 0x7E, 1.0 / 448),
                                                          (True, False, 0x78, 2.0 ** -8), (True, True, 0x78, None)])
def test_reference_low_latency_fp8_cast_hand_case(round_scale, ue8m0, byte, scale):
    # One token of ones, hidden 512, on rank 0 to expert 0: amax 1 -> scale 1/448 (data 448 = e4m3 0x7E), or with
    # round_scale 2^ceil(log2(1/448)) = 2^-8 (data 256 = 0x78); UE8M0 stores the biased exponent 127 - 8 = 0x77.
    H = 512
    ranks = [(1, _bf16_row(0x3F80, H), _i64(0), b""), (0, b"", b"", b"")]
    r = _C.ref_low_latency_dispatch(2, 2, H, 1, 1, True, round_scale, ue8m0, ranks).recv(0)
    assert r["count"] == [1]
    assert r["packed_x"][:H] == bytes([byte]) * H
    if ue8m0:
        assert r["packed_scales"] == b""
        assert struct.unpack("<1I", r["packed_scales_ue8m0"][:4])[0] == 0x77777777
    else:
        assert struct.unpack("<4f", r["packed_scales"][:16]) == (struct.unpack("<f", struct.pack("<f", scale))[0],) * 4


def _fake_buffer(R=2):
    buf = object.__new__(openep.Buffer)
    buf.runtime = object()
    buf.group_size, buf.rank, buf._dev, buf.low_latency_mode = R, 0, "cuda:0", True
    buf._token = object()
    return buf


def test_a_handle_skips_revalidation_only_in_the_buffer_that_made_it():
    buf, other = _fake_buffer(), _fake_buffer()
    marker = {"made_by": "buf"}
    h = openep.IntranodeHandle(None, None, None, None, None, None)  # contents that would fail validation
    h._openep_checked = (buf._token, marker)
    assert buf._unpack_handle("combine", h) is marker
    with pytest.raises(openep.OpenEPError) as e:
        other._unpack_handle("combine", h)  # another Buffer validates it in full
    assert e.value.code == "invalid_argument" and "handle.rank_prefix_matrix expected a tensor" in str(e.value)
    with pytest.raises(openep.OpenEPError):
        buf._unpack_handle("combine", h._replace(reserved=None))  # a copy carries no mark
    with pytest.raises(openep.OpenEPError):
        buf._unpack_handle("combine", tuple(h))  # nor does a plain tuple


def test_a_low_latency_handle_skips_revalidation_only_in_the_buffer_that_made_it():
    buf, other = _fake_buffer(), _fake_buffer()
    marker = ({"made_by": "buf"}, 4, 128, 1024, 8)
    h = openep.LowLatencyHandle(None, None, 128, 1024, 8)
    h._openep_checked = (buf._token, marker)
    assert buf._ll_unpack_handle("low_latency_combine", h) is marker
    with pytest.raises(openep.OpenEPError) as e:
        other._ll_unpack_handle("low_latency_combine", h)
    assert "handle.packed_recv_src_info expected a tensor" in str(e.value)


@pytest.mark.parametrize("ranks_per_node", [None, 1])
def test_reference_combine_without_weights_after_a_topk_dispatch(ranks_per_node):
    # DeepEP's combine with topk_weights=None after a dispatch that carried top-k: same rows, weights None. (The
    # engine call patterns combine this way; the reference refused it before.) Needs torch (CPU is enough).
    torch = pytest.importorskip("torch")
    from openep import reference
    R, H, K, E = 2, 8, 2, 4
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, H, generator=g).to(torch.bfloat16) for _ in range(R)]
    idxs = [torch.tensor([[0, 3], [1, 2], [-1, 2]]) for _ in range(R)]
    ws = [torch.rand(3, K, generator=g) for _ in range(R)]
    d = reference.dispatch(xs, idxs, E, topk_weights=ws)
    rows = [d.recv(r)["x"] for r in range(R)]
    weighted = reference.combine(d, rows, topk_weights=[d.recv(r)["topk_weights"] for r in range(R)],
                                 ranks_per_node=ranks_per_node)
    bare = reference.combine(d, rows, ranks_per_node=ranks_per_node)
    for r in range(R):
        assert torch.equal(bare[r][0], weighted[r][0])
        assert bare[r][1] is None and weighted[r][1] is not None


# ---- the core's structs as bound by python/src/buffer.cpp (bind_structs) ----------------------------------------
# name: (address fields, integer fields, bool fields)
_STRUCTS = {
    "LayoutArgs": (("topk_idx", "num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank",
                    "num_tokens_per_rdma_rank"), ("num_tokens", "num_topk", "num_experts"), ()),
    "IntranodeHandle": (("is_token_in_rank", "rank_prefix_matrix", "num_tokens_per_src", "send_pos", "recv_src_idx"),
                        ("num_tokens", "num_recv_tokens", "max_pair_rows", "max_num_tokens"), ()),
    "DispatchArgs": (("x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank", "num_tokens_per_rank",
                      "num_tokens_per_expert", "num_tokens_per_rdma_rank"),
                     ("num_tokens", "hidden", "x_elem_bytes", "num_scales", "scale_token_stride", "scale_hidden_stride",
                      "num_topk", "num_experts", "expert_alignment", "num_worst_tokens", "max_tokens_per_rank"), ()),
    "DispatchOutputs": (("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights"), (), ()),
    "CombineArgs": (("x", "topk_weights", "bias_0", "bias_1"), ("hidden", "num_topk"), ()),
    "CombineOutputs": (("combined_x", "combined_topk_weights"), (), ()),
    "InternodeHandle": (("is_token_in_rank", "send_pos", "send_rdma_head", "node_prefix", "recv_gbl_rank_prefix_sum",
                         "recv_rdma_rank_prefix_sum", "recv_rdma_mask", "recv_src_idx", "recv_src_meta"),
                        ("num_tokens", "num_recv_tokens", "num_rdma_recv_tokens"), ()),
    "LowLatencyHandle": (("src_info", "layout_range"), ("num_max_dispatch_tokens_per_rank", "hidden", "num_experts"),
                         ()),
    "LowLatencyDispatchArgs": (("x", "topk_idx", "cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats"),
                               ("num_tokens", "hidden", "num_topk", "num_max_dispatch_tokens_per_rank", "num_experts"),
                               ("use_fp8", "round_scale", "use_ue8m0", "return_recv_hook")),
    "LowLatencyDispatchOutputs": (("packed_recv_x", "packed_recv_scales", "packed_recv_count"), (), ()),
    "LowLatencyCombineArgs": (("x", "topk_idx", "topk_weights", "combine_wait_recv_cost_stats"),
                              ("num_tokens", "num_topk"), ("zero_copy", "use_logfmt", "return_recv_hook")),
    "LowLatencyCombineOutputs": (("combined_x",), (), ()),
}


@pytest.mark.parametrize("name", sorted(_STRUCTS))
def test_core_structs_keep_every_field_and_refuse_unknown_ones(name):
    """Every field the Python layer sets holds what it was given (addresses up to 2**64 - 16 with null as 0, ints,
    bools), the top-k index type round-trips through topk_int64, and a misspelt field raises instead of being
    dropped (the structs have no __dict__)."""
    addresses, ints, flags = _STRUCTS[name]
    s = getattr(_C, name)()
    for i, field in enumerate(addresses):
        assert getattr(s, field) == 0, f"{name}.{field} is not null by default"
        for value in (2 ** 64 - 16, 0, (1 << 47) + 16 * i):
            setattr(s, field, value)
            assert getattr(s, field) == value, (name, field, value)
    for i, field in enumerate(ints):
        setattr(s, field, 1000 + i)
        assert getattr(s, field) == 1000 + i, (name, field)
    # each field is its own member: none of the later assignments changed an earlier one
    assert [getattr(s, f) for f in addresses] == [(1 << 47) + 16 * i for i in range(len(addresses))], name
    assert [getattr(s, f) for f in ints] == [1000 + i for i in range(len(ints))], name
    for field in flags:
        for value in (True, False):
            setattr(s, field, value)
            assert getattr(s, field) is value, (name, field)
    if hasattr(s, "topk_int64"):
        assert s.topk_int64 is True  # IndexType::kInt64, DeepEP's default index type
        s.topk_int64 = False
        assert s.topk_int64 is False
    with pytest.raises(AttributeError):
        s.no_such_field = 1
