"""Engine call patterns (issue 15 item 6): Megatron-LM, SGLang and vLLM's sequences of deep_ep calls, replayed by
tests/python/engines/{megatron,sglang,vllm}_pattern.py against openep.reference on 2 ranks.

GPU part (marker ``gpu``; SKIPPED without torch or 2 GPUs): each script through tools/launch.py on 2 GPUs, one
process per GPU (with OPENEP_PYTEST_SHARE_GPU=1: 2 processes sharing GPUs, launch.py --share-gpus, gloo and the
IPC test fabric, OPENEP_TESTING_IPC_DIR), and in a world of 2 fake nodes (--ranks-per-node 1: normal mode is internode mode there, the
low-latency parts are skipped by the scripts with their reason). ``deep_ep`` must be importable (the alias:
``python3 -m pip install ./python/deep_ep_alias``); if it is not, these tests FAIL saying so.
CPU part: the scripts' pure helpers (world from the launcher's variables, sizing rules with fake deep_ep modules,
check bookkeeping, bounds), that every script imports without torch and exits 2 with the install message when
deep_ep is missing.
"""

import importlib.util
import os
import subprocess
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ENGINES_DIR = os.path.join(HERE, "engines")
ENGINES = ("megatron", "sglang", "vllm")
sys.path.insert(0, ENGINES_DIR)

import _common as C  # noqa: E402


def _load(engine):
    return importlib.import_module(f"{engine}_pattern")


# ---------------------------------------------------------------------------------------------------------------
# GPU: the scripts on 2 ranks
def _run_pattern(engine, fake_nodes, tmp_path):
    if importlib.util.find_spec("deep_ep") is None:
        pytest.fail(C.DEEP_EP_MISSING)
    script = os.path.join(ENGINES_DIR, f"{engine}_pattern.py")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "launch.py"), "--nproc", "2", "--timeout", "420",
           "--log-dir", str(tmp_path)]
    env = dict(os.environ)
    if fake_nodes:
        cmd += ["--ranks-per-node", "1", "--min-gpus", "1"]
    elif os.environ.get("OPENEP_PYTEST_SHARE_GPU") == "1":  # processes sharing GPUs, IPC test fabric, gloo
        ipc_dir = tmp_path / "ipc"
        ipc_dir.mkdir()
        env["OPENEP_TESTING_IPC_DIR"] = str(ipc_dir)
        cmd += ["--share-gpus", "--min-gpus", "1"]
    else:
        cmd += ["--min-gpus", "2"]
    cmd += ["--", sys.executable, script]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=480,
                          env=env)
    logs = {}
    for r in range(2):
        p = tmp_path / f"rank{r}.log"
        logs[r] = p.read_text(errors="replace") if p.exists() else ""
    if proc.returncode == 77:
        pytest.skip(f"tools/launch.py: not enough GPUs ({proc.stdout.strip()[-300:]})")
    failed = [line for r in logs for line in logs[r].splitlines() if "FAILED" in line or "Error" in line]
    assert proc.returncode == 0, (f"{engine} pattern ({'fake nodes' if fake_nodes else '2 GPUs'}) exited "
                                  f"{proc.returncode}:\n" + "\n".join(failed[:40]) + "\n--- launcher ---\n" +
                                  proc.stdout[-3000:])
    for r in range(2):
        assert f"{engine} pattern on" in logs[r] and ": ok (" in logs[r], f"rank {r} printed no ok summary:\n" + \
            logs[r][-2000:]
        if fake_nodes and engine != "megatron":
            assert "SKIPPED low-latency decode part" in logs[r], f"rank {r}: the low-latency skip was not reported"
    return logs


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_pattern_on_2_gpus(engine, tmp_path):
    _run_pattern(engine, False, tmp_path)


@pytest.mark.gpu1
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_pattern_on_2_fake_nodes(engine, tmp_path):
    """Normal mode as internode mode (2 fake nodes x 1 rank); the decode parts are skipped by the scripts."""
    _run_pattern(engine, True, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# CPU: helpers
def _env(**kw):
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "OPENEP_UNIQUE_ID_FILE": "/tmp/x/uid"}
    env.update({k: str(v) for k, v in kw.items()})
    return env


def test_world_from_env_one_node_and_fake_nodes():
    w = C.world_from_env(_env())
    assert (w.rank, w.world_size, w.local_rank, w.ranks_per_node, w.num_nodes) == (1, 2, 1, 2, 1)
    assert not w.internode and w.store_path == "/tmp/x/uid.torch_store" and "1 node" in w.describe()
    assert C.low_latency_skip_reason(w) is None
    f = C.world_from_env(_env(OPENEP_RANKS_PER_NODE=1, LOCAL_RANK=0))
    assert f.internode and f.num_nodes == 2 and f.ranks_per_node == 1 and f.local_rank == 0
    reason = C.low_latency_skip_reason(f)
    assert reason.startswith("SKIPPED low-latency decode part") and "fake nodes" in reason and "GIN" in reason


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "2"}, "missing RANK, LOCAL_RANK, OPENEP_UNIQUE_ID_FILE"),
    (_env(WORLD_SIZE=4), "written for 2 ranks"),
    (_env(RANK=2), "outside"),
    (_env(OPENEP_RANKS_PER_NODE=3), "does not divide"),
])
def test_world_from_env_refuses_what_it_cannot_run(env, needle):
    with pytest.raises(RuntimeError, match=needle):
        C.world_from_env(env)
    if "missing" in needle:
        with pytest.raises(RuntimeError, match="tools/launch.py"):
            C.world_from_env(env)


def test_expected_m_is_sglangs_formula():
    assert C.expected_m(128, 2, 8, 32) == (128 * 2 * 8 + 32) // 32 == 65
    assert C.expected_m(0, 2, 8, 32) == 1


def test_checks_count_failures_and_skips():
    import io
    out = io.StringIO()
    chk = C.Checks(3, "demo", out)
    chk.begin("part")
    assert chk.expect(True, "fine") and not chk.expect(False, "broken")
    chk.skip("SKIPPED something")
    assert chk.exit_code() == 1 and chk.failed == ["part: broken"]
    assert "[rank 3] FAILED: part: broken" in out.getvalue() and "SKIPPED something" in out.getvalue()
    assert "1 FAILED" in chk.summary() and "1 checks passed" in chk.summary() and "1 part(s) skipped" in chk.summary()
    ok = C.Checks(0, "demo", out)
    ok.expect(True, "x")
    assert ok.exit_code() == 0 and ": ok (" in ok.summary()


def test_fp8_bounds_cover_e4m3_rounding():
    # e4m3: 3 mantissa bits -> relative half-ulp 2^-4 for normals; subnormal spacing 2^-9 (times the scale)
    for x, s in ((448.0, 1.0), (1.0, 1.0), (1e-3, 1.0), (3.0, 0.01)):
        assert C.fp8_dequant_bound(x, s) >= x * 2 ** -4 + s * 2 ** -10
    for n in (0, 1, 2):
        assert C.fp8_sum_bound(1.0, 1.0, n) >= n * C.fp8_dequant_bound(1.0, 1.0)


class _FakeConfig:
    def __init__(self, nvl, rdma):
        self.nvl, self.rdma, self.seen = nvl, rdma, []

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        self.seen.append((hidden_bytes, num_ranks))
        return self.nvl

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        return self.rdma


def test_deepep_style_buffer_bytes_is_the_max_over_configs():
    a, b = _FakeConfig(1280, 0), _FakeConfig(2560, 128)
    assert C.deepep_style_buffer_bytes((a, b), 4096, 2) == (2560, 128)
    assert a.seen == [(4096, 2)] and b.seen == [(4096, 2)]


def _fake_deep_ep(created):
    class Buffer:
        num_sms = 20

        def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, **kw):
            self.group, self.num_nvl_bytes, self.num_rdma_bytes, self.kw = group, num_nvl_bytes, num_rdma_bytes, kw
            self.group_size = group.size()
            created.append(self)

        @staticmethod
        def get_dispatch_config(r):
            return _FakeConfig(1024 * r, 0)

        @staticmethod
        def get_combine_config(r):
            return _FakeConfig(512 * r, 0)

        @staticmethod
        def get_internode_buffer_size_hint(num_ranks, ranks_per_node, max_tokens, hidden, elem, scales, topk):
            return (4096, 8192)

        @staticmethod
        def get_low_latency_rdma_size_hint(T, hidden, num_ranks, num_experts):
            return 1 << 20

    return types.SimpleNamespace(Buffer=Buffer)


class _Group:
    def size(self):
        return 2


def test_megatron_get_buffer_reuses_and_grows_and_handles_fake_nodes():
    m = _load("megatron")
    created = []
    dep = _fake_deep_ep(created)
    one, g = C.world_from_env(_env()), _Group()
    m._buffer = None
    notes = []
    b = m.get_buffer(dep, one, g, 2 * m.H, notes)
    assert (b.num_nvl_bytes, b.num_rdma_bytes) == (2048, 0) and not notes
    assert m.get_buffer(dep, one, g, 2 * m.H, notes) is b and len(created) == 1   # reused
    assert m.get_buffer(dep, one, _Group(), 2 * m.H, notes) is not b              # another group: a new Buffer
    fake = C.world_from_env(_env(OPENEP_RANKS_PER_NODE=1))
    m._buffer = None
    b2 = m.get_buffer(dep, fake, g, 2 * m.H, notes)
    assert (b2.num_nvl_bytes, b2.num_rdma_bytes) == (4096, 8192) and notes and "internode" in notes[0]
    m._buffer = None


def test_sglang_make_buffer_auto_mode_and_fake_nodes():
    s = _load("sglang")
    created = []
    dep = _fake_deep_ep(created)
    notes = []
    b = s.make_buffer(dep, C.world_from_env(_env()), _Group(), None, None, 24, notes)
    assert b.kw["low_latency_mode"] is True and b.kw["num_qps_per_rank"] == max(24, s.E // 2)
    assert b.kw["allow_mnnvl"] is True and b.num_rdma_bytes == 1 << 20 and b.num_nvl_bytes == 2048 and not notes
    b = s.make_buffer(dep, C.world_from_env(_env(OPENEP_RANKS_PER_NODE=1)), _Group(), _FakeConfig(99 * 128, 0),
                      _FakeConfig(128, 0), 24, notes)
    assert b.kw["low_latency_mode"] is False and b.kw["num_qps_per_rank"] == 24
    assert (b.num_nvl_bytes, b.num_rdma_bytes) == (99 * 128, 8192) and notes


def test_vllm_handle_cache_one_buffer_per_kwargs_and_destroy():
    v = _load("vllm")
    made, destroyed = [], []

    class B:
        def __init__(self, **kw):
            made.append(kw)

        def destroy(self):
            destroyed.append(self)

    cache, g = v.HandleCache(), object()
    a = cache.get_or_create(dict(group=g, num_nvl_bytes=128), B)
    assert cache.get_or_create(dict(group=g, num_nvl_bytes=128), B) is a
    assert cache.get_or_create(dict(group=g, num_nvl_bytes=256), B) is not a
    cache.destroy()
    assert len(made) == 2 and len(destroyed) == 2 and cache._cache == {}


def test_engine_shapes_fit_openeps_own_requirement():
    """The scripts size their Buffers the engines' way; at the scripts' shapes that must cover what OpenEP needs
    (Buffer.get_nvl_buffer_size_hint_for_tokens: worst case, every token to every rank), else the GPU run would
    fail with buffer_too_small instead of testing the pattern."""
    openep = pytest.importorskip("openep")
    Buffer = openep.Buffer
    saved = Buffer.num_sms
    try:
        m = _load("megatron")
        Buffer.set_num_sms(m.NUM_SMS)
        nvl, rdma = C.deepep_style_buffer_bytes((Buffer.get_dispatch_config(2), Buffer.get_combine_config(2)),
                                                2 * m.H, 2)
        assert rdma == 0
        assert nvl >= Buffer.get_nvl_buffer_size_hint_for_tokens(2, m.T + 24, m.H, 2, 0, m.K)
        s = _load("sglang")
        cfgs = [openep.Config(**s.DEEPEP_CONFIG[k]) for k in ("normal_dispatch", "normal_combine")]
        for configs in (cfgs, (Buffer.get_dispatch_config(2), Buffer.get_combine_config(2))):
            nvl, _ = C.deepep_style_buffer_bytes(configs, s.H * s.PARAM_BYTES, 2)
            need = max(Buffer.get_nvl_buffer_size_hint_for_tokens(2, max(s.PREFILL_TOKENS), s.H, 1, s.H // 128, s.K),
                       Buffer.get_nvl_buffer_size_hint_for_tokens(2, max(s.PREFILL_TOKENS), s.H, 2, 0, s.K))
            assert nvl >= need, (nvl, need)
        v = _load("vllm")
        assert v.BUFFER_MB * 1024 * 1024 >= Buffer.get_nvl_buffer_size_hint_for_tokens(
            2, max(v.HT_TOKENS), v.H, 2, v.H // 128, v.K)
        for mod in (s, v):
            assert Buffer.get_low_latency_rdma_size_hint(mod.T, mod.H, 2, mod.E) > 0
    finally:
        Buffer.set_num_sms(saved)


@pytest.mark.parametrize("engine", ENGINES)
def test_scripts_import_without_torch_and_say_how_to_install_deep_ep(engine):
    mod = _load(engine)
    assert "NOT YET RUN on 2 real GPUs" in mod.__doc__ and "tools/launch.py --nproc 2" in mod.__doc__
    assert "--ranks-per-node 1 --min-gpus 1" in mod.__doc__
    # -S: no site-packages, so neither the alias nor openep is importable: the script must stop with the message
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-S", os.path.join(ENGINES_DIR, f"{engine}_pattern.py")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "pip install ./python/deep_ep_alias" in proc.stderr
