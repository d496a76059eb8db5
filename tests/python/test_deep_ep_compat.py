"""CPU tests of what makes code written for DeepEP V1 run on OpenEP unchanged (issue 15, parts 1-3).

* ``import deep_ep`` through OpenEP's alias (python/deep_ep_alias): the names are OpenEP's objects, a real DeepEP
  is never shadowed silently, OPENEP_SHADOW_DEEP_EP makes the choice explicit. Each case runs in a fresh Python
  process (the alias changes sys.meta_path and sys.modules), against fake "real" DeepEPs in temporary folders.
* ``previous_event``: None and an EventOverlap without an event both mean "no previous event".
* ``Buffer.runtime``: DeepEP's runtime queries with DeepEP's meaning, checked on fake topologies.
No GPU and no PyTorch needed; the same behaviours on a GPU are in test_gpu.py.
"""

import importlib.machinery
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import openep
from openep import _C
from openep._runtime import DeepEPRuntimeQueries, Runtime
from openep.utils import EventHandle, EventOverlap, _previous_event_handle

ALIAS_DIR = Path(__file__).resolve().parents[2] / "python" / "deep_ep_alias"
OPENEP_PARENT = str(Path(openep.__file__).resolve().parents[1])  # the folder openep is imported from
REAL_DEEP_EP_HERE = any(importlib.machinery.PathFinder.find_spec(n) is not None for n in ("deep_ep", "deep_ep_cpp"))
no_real_deep_ep = pytest.mark.skipif(REAL_DEEP_EP_HERE, reason="a real deep_ep is importable in this environment; "
                                     "the cases that need none are checked where there is none")


def _python(code, path=(), env=None, flags=(), with_openep=True):
    """Runs ``code`` in a fresh interpreter with ``path`` (+ openep's folder) on PYTHONPATH; returns (rc, out, err)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OPENEP_SHADOW_DEEP_EP", "PYTHONPATH")}
    environ.update(env or {})
    environ["PYTHONPATH"] = os.pathsep.join([str(p) for p in path] + ([OPENEP_PARENT] if with_openep else []))
    with tempfile.TemporaryDirectory() as cwd:  # an empty working directory: CTest runs from build/python, which
        # holds an openep package that `python -c` would otherwise find through sys.path[0]
        r = subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                           text=True, timeout=120, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


def _ok(code, **kwargs):
    rc, out, err = _python(code, **kwargs)
    assert rc == 0 and out.strip().endswith("OK"), f"rc={rc}\nstdout:\n{out}\nstderr:\n{err}"
    return out, err


_INSTALL = """
import warnings
import _openep_deep_ep_alias as alias
alias.install()
"""


# ---- part 1: import deep_ep ----------------------------------------------------------------------------------
@no_real_deep_ep
def test_deep_ep_names_are_openep_objects_not_copies():
    _ok(_INSTALL + """
warnings.simplefilter("error")            # no warning when no other deep_ep exists
import importlib.util, sys
import openep, openep.buffer, openep.utils
from openep import _C
assert importlib.util.find_spec("deep_ep") is not None   # vLLM's has_deep_ep() probe
import deep_ep
from deep_ep import Buffer, EventOverlap, Config                      # SGLang, Megatron
from deep_ep.utils import EventHandle, EventOverlap as UtilsOverlap   # Megatron
import deep_ep.buffer
import deep_ep_cpp
from deep_ep_cpp import Config as CppConfig, EventHandle as CppHandle
same = {
    "deep_ep.Buffer": deep_ep.Buffer is openep.Buffer and Buffer is openep.Buffer,
    "deep_ep.buffer.Buffer": deep_ep.buffer.Buffer is openep.Buffer,
    "deep_ep.Config": Config is openep.Config is _C.Config,
    "deep_ep.EventOverlap": EventOverlap is openep.EventOverlap is UtilsOverlap,
    "deep_ep.utils.EventHandle": EventHandle is openep.utils.EventHandle is openep.EventHandle,
    "deep_ep.buffer.EventHandle": deep_ep.buffer.EventHandle is openep.EventHandle,
    "deep_ep_cpp.Config": CppConfig is openep.Config,
    "deep_ep_cpp.EventHandle": CppHandle is openep.EventHandle,
    "deep_ep.OpenEPError": deep_ep.OpenEPError is openep.OpenEPError,
    "sys.modules": sys.modules["deep_ep.buffer"] is deep_ep.buffer and sys.modules["deep_ep.utils"] is deep_ep.utils,
    "size hint": deep_ep_cpp.get_low_latency_rdma_size_hint(128, 7168, 2, 288)
                 == openep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 2, 288),
    "is_sm90_compiled": deep_ep_cpp.is_sm90_compiled() is True,
    "Buffer.num_sms": deep_ep.Buffer.num_sms == openep.Buffer.num_sms,
}
assert all(same.values()), [k for k, v in same.items() if not v]
assert alias.decision() == "openep"
assert "torch" not in sys.modules, "import deep_ep must not import torch"
try:
    from deep_ep import HybridEPBuffer    # Megatron probes it inside try/except ImportError
except ImportError:
    pass
else:
    raise AssertionError("deep_ep.HybridEPBuffer resolved")
print("OK")
""", path=[ALIAS_DIR])


@no_real_deep_ep
def test_deep_ep_topk_idx_t_is_openeps():
    _ok(_INSTALL + """
try:
    import torch
except ImportError:
    torch = None
import openep, deep_ep, deep_ep_cpp
if torch is not None:
    assert deep_ep.topk_idx_t is torch.int64 is openep.topk_idx_t is deep_ep_cpp.topk_idx_t
else:   # the same lazy attribute as openep's: it says PyTorch is missing
    for module in (deep_ep, deep_ep_cpp):
        try:
            module.topk_idx_t
        except openep.OpenEPError as e:
            assert e.code == "unsupported" and "PyTorch" in str(e)
        else:
            raise AssertionError("topk_idx_t without torch")
print("OK")
""", path=[ALIAS_DIR])


@no_real_deep_ep
def test_openep_alone_provides_no_deep_ep():
    """Only the alias provides deep_ep: installing OpenEP never changes what `import deep_ep` gives."""
    _ok("""
import openep
try:
    import deep_ep
except ModuleNotFoundError as e:
    assert e.name == "deep_ep"
else:
    raise AssertionError("deep_ep importable without the alias: " + deep_ep.__file__)
print("OK")
""", flags=("-S",))  # -S: no site-packages .pth files run (the alias may be installed in this environment)


@no_real_deep_ep
def test_the_pth_file_installs_the_finder_when_python_starts(tmp_path):
    """The installed layout: the .pth next to the module in a site folder (what pip puts in site-packages)."""
    lines = (ALIAS_DIR / "openep_deep_ep_alias.pth").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import "), lines
    site_dir = tmp_path / "site-packages"
    shutil.copytree(ALIAS_DIR / "_openep_deep_ep_alias", site_dir / "_openep_deep_ep_alias")
    shutil.copy(ALIAS_DIR / "openep_deep_ep_alias.pth", site_dir)
    _ok(f"""
import site, sys
sys.path.insert(0, {str(site_dir)!r})  # ahead of an installed alias (openep's own site-packages may hold one)
site.addsitedir({str(site_dir)!r})     # processes the .pth as Python does at start-up for site-packages
import _openep_deep_ep_alias as alias
assert alias.decision() is None and sys.meta_path[0] is alias._finder   # installed, nothing decided or imported
assert "openep" not in sys.modules
import deep_ep, openep
assert deep_ep.Buffer is openep.Buffer and alias.decision() == "openep"
assert deep_ep.__file__.startswith({str(site_dir)!r})
print("OK")
""", flags=("-S",))  # -S: only this site folder's .pth runs (the alias may be installed in this environment)


def _fake_real_deep_ep(root, names=("deep_ep", "deep_ep_cpp")):
    """A stand-in for an installed DeepEP 1.2.1 (package, extension module stand-in, distribution metadata)."""
    root.mkdir(parents=True)
    if "deep_ep" in names:
        (root / "deep_ep").mkdir()
        (root / "deep_ep" / "__init__.py").write_text("REAL = True\n")
    if "deep_ep_cpp" in names:
        (root / "deep_ep_cpp.py").write_text("REAL = True\n")
    meta = root / "deep_ep-1.2.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: deep_ep\nVersion: 1.2.1\n")
    return root


_IMPORT_BOTH = _INSTALL + """
import openep
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import deep_ep, deep_ep_cpp
real = (getattr(deep_ep, "REAL", False), getattr(deep_ep_cpp, "REAL", False))
ours = (getattr(deep_ep, "Buffer", None) is openep.Buffer, getattr(deep_ep_cpp, "Config", None) is openep.Config)
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
"""


@pytest.mark.parametrize("names", [("deep_ep", "deep_ep_cpp"), ("deep_ep",), ("deep_ep_cpp",)],
                         ids=["both", "deep_ep_only", "deep_ep_cpp_only"])
def test_a_real_deep_ep_is_kept_and_named_in_a_warning_by_default(tmp_path, names):
    real_dir = _fake_real_deep_ep(tmp_path / "real", names)
    found = str(real_dir / ("deep_ep/__init__.py" if "deep_ep" in names else "deep_ep_cpp.py"))
    missing = [n for n in ("deep_ep", "deep_ep_cpp") if n not in names]
    _ok(_INSTALL + f"""
import importlib
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    modules = [importlib.import_module(n) for n in {names!r}]
assert all(getattr(m, "REAL", False) for m in modules), modules
assert alias.decision() == "other", alias.decision()
for name in {missing!r}:   # the other name follows the same decision: OpenEP does not fill in a missing half
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(name + " served by OpenEP next to a real DeepEP")
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1, messages
for needle in ({found!r}, "deep_ep 1.2.1", "OPENEP_SHADOW_DEEP_EP=1", "OPENEP_SHADOW_DEEP_EP=0",
               "pip uninstall openep-deep-ep-alias"):
    assert needle in messages[0], (needle, messages[0])
print("OK")
""", path=[ALIAS_DIR, real_dir])


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_openep_shadow_deep_ep_1_lets_openep_take_deep_eps_place(tmp_path, value):
    real_dir = _fake_real_deep_ep(tmp_path / "real")
    _ok(_IMPORT_BOTH + """
assert alias.decision() == "openep"
assert all(ours) and not any(real), (ours, real)
assert not messages, messages
import deep_ep.buffer
assert deep_ep.buffer.Buffer is openep.Buffer    # submodules follow the package
print("OK")
""", path=[ALIAS_DIR, real_dir], env={"OPENEP_SHADOW_DEEP_EP": value})


@pytest.mark.parametrize("value", ["0", "false", "no", "OFF"])
def test_openep_shadow_deep_ep_0_keeps_the_real_one_quietly(tmp_path, value):
    real_dir = _fake_real_deep_ep(tmp_path / "real")
    _ok(_IMPORT_BOTH + """
assert alias.decision() == "other" and all(real) and not messages, (real, messages)
print("OK")
""", path=[ALIAS_DIR, real_dir], env={"OPENEP_SHADOW_DEEP_EP": value})


def test_a_malformed_openep_shadow_deep_ep_is_reported_and_treated_as_unset(tmp_path):
    real_dir = _fake_real_deep_ep(tmp_path / "real")
    _ok(_IMPORT_BOTH + """
assert alias.decision() == "other" and all(real)
assert len(messages) == 2 and "'maybe' is not one of" in messages[0] and "OPENEP_SHADOW_DEEP_EP=1" in messages[1], \\
    messages
print("OK")
""", path=[ALIAS_DIR, real_dir], env={"OPENEP_SHADOW_DEEP_EP": "maybe"})


@no_real_deep_ep
def test_openep_shadow_deep_ep_0_without_a_real_deep_ep_still_serves_openep():
    _ok(_IMPORT_BOTH + """
assert alias.decision() == "openep" and all(ours) and not messages
print("OK")
""", path=[ALIAS_DIR], env={"OPENEP_SHADOW_DEEP_EP": "0"})


def test_a_directory_named_deep_ep_is_not_taken_for_a_real_deep_ep(tmp_path):
    """A bare folder called deep_ep (a namespace package, e.g. data in the working directory) is no DeepEP."""
    (tmp_path / "data" / "deep_ep").mkdir(parents=True)
    if REAL_DEEP_EP_HERE:
        pytest.skip("a real deep_ep is importable in this environment")
    _ok(_IMPORT_BOTH + """
assert alias.decision() == "openep" and all(ours) and not messages, (ours, messages)
print("OK")
""", path=[ALIAS_DIR, tmp_path / "data"])


@no_real_deep_ep
def test_the_alias_without_openep_says_what_to_install():
    _ok(_INSTALL + """
try:
    import deep_ep
except ImportError as e:   # an ImportError, so the engines' `try: import deep_ep except ImportError` still works
    assert "OpenEP itself cannot be imported" in str(e) and "pip uninstall openep-deep-ep-alias" in str(e), str(e)
else:
    raise AssertionError("imported without openep: " + deep_ep.__file__)
print("OK")
""", path=[ALIAS_DIR], with_openep=False, flags=("-S",))  # -S: no site-packages, so no installed openep either


def test_the_alias_distribution_can_neither_replace_nor_overwrite_deep_ep():
    """pip would uninstall a real DeepEP for a distribution named deep_ep, and overwrite its files for one that
    installs a deep_ep/ folder; the alias is neither, and depends on no package that an index could resolve to
    something other than OpenEP."""
    text = (ALIAS_DIR / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads(text)
    name = project["project"]["name"].lower().replace("_", "-")
    assert name == "openep-deep-ep-alias"
    assert project["project"]["dependencies"] == []
    packages = project["tool"]["scikit-build"]["wheel"]["packages"]
    assert sorted(packages) == ["_openep_deep_ep_alias", "openep_deep_ep_alias.pth"]
    assert not (ALIAS_DIR / "deep_ep").exists() and not (ALIAS_DIR / "deep_ep_cpp.py").exists()


# ---- part 2: previous_event ----------------------------------------------------------------------------------
class _FakeHandle(EventHandle):
    """An EventHandle without a CUDA event (EventHandle() records on the current stream, which needs torch)."""

    def __init__(self):
        self.waited = []

    def stream_wait(self, stream):
        self.waited.append(stream)


def test_none_and_an_eventless_event_overlap_mean_no_previous_event():
    h = _FakeHandle()
    assert _previous_event_handle("dispatch", None) is None
    assert _previous_event_handle("dispatch", EventOverlap(None)) is None
    assert _previous_event_handle("dispatch", EventOverlap()) is None
    assert _previous_event_handle("dispatch", EventOverlap(None, extra_tensors=(1, 2))) is None
    assert _previous_event_handle("dispatch", EventOverlap(h)) is h
    assert _previous_event_handle("dispatch", h) is h


@pytest.mark.parametrize("bad", [42, "event", EventOverlap(42), object()])
def test_a_previous_event_of_another_type_is_refused_naming_the_op(bad):
    with pytest.raises(openep.OpenEPError) as e:
        _previous_event_handle("combine", bad)
    assert e.value.code == "invalid_argument"
    assert "combine: previous_event expected None, an EventOverlap" in str(e.value)


class _StubRuntime:
    def __init__(self):
        self.waits = []

    def stream_wait(self, waiter, waited):
        self.waits.append((waiter, waited))


def _stream_buffer(monkeypatch):
    """A Buffer without a GPU whose _begin runs for real against a stub core and a fake current stream."""
    import openep._streams as streams_module
    monkeypatch.setattr(streams_module, "current_raw_stream", lambda device: 0xC0FFEE)
    buf = object.__new__(openep.Buffer)
    buf.runtime, buf._device, buf._comm_ptr, buf._comm_stream = _StubRuntime(), 0, 0xC0, "comm-stream"
    return buf


@pytest.mark.parametrize("previous", [None, EventOverlap(None), EventOverlap()])
def test_without_an_event_the_comm_stream_waits_for_the_current_stream(monkeypatch, previous):
    buf = _stream_buffer(monkeypatch)
    compute = buf._begin("get_dispatch_layout", previous, False, False)
    assert compute == (0xC0FFEE, None)
    assert buf.runtime.waits == [(0xC0, 0xC0FFEE)]  # comm stream after the current stream, as with None


@pytest.mark.parametrize("wrap", [EventOverlap, lambda h: h])
def test_with_an_event_the_comm_stream_waits_for_that_event_only(monkeypatch, wrap):
    buf = _stream_buffer(monkeypatch)
    h = _FakeHandle()
    buf._begin("dispatch", wrap(h), True, False)
    assert h.waited == ["comm-stream"] and buf.runtime.waits == []


@pytest.mark.parametrize("previous", [None, EventOverlap(None)])
def test_allocate_on_comm_stream_needs_a_previous_event_that_holds_an_event(monkeypatch, previous):
    buf = _stream_buffer(monkeypatch)
    with pytest.raises(openep.OpenEPError) as e:
        buf._begin("combine", previous, True, True)
    assert e.value.code == "invalid_argument" and "allocate_on_comm_stream=True requires" in str(e.value)
    assert buf.runtime.waits == []


def test_every_normal_mode_method_takes_previous_event_with_deepeps_default():
    takes = sorted(name for name, fn in inspect.getmembers(openep.Buffer, inspect.isfunction)
                   if "previous_event" in inspect.signature(fn).parameters)
    assert takes == ["_begin", "_cached_dispatch", "_cached_dispatch_call", "_combine_call",
                     "_internode_cached_dispatch", "combine", "dispatch", "get_dispatch_layout", "internode_combine",
                     "internode_dispatch"]
    for name in takes:
        if not name.startswith("_"):
            assert inspect.signature(getattr(openep.Buffer, name)).parameters["previous_event"].default is None


# ---- part 3: Buffer.runtime ----------------------------------------------------------------------------------
class _FakeCore(DeepEPRuntimeQueries):
    """The core properties DeepEPRuntimeQueries reads, for a given topology."""

    def __init__(self, rank, num_ranks, ranks_per_node, internode=False, alive=True, device=0):
        self.rank, self.num_ranks, self.num_nvlink_ranks = rank, num_ranks, ranks_per_node
        self.is_internode, self.alive, self.device = internode, alive, device


# (rank, ranks, ranks per NVLink domain) -> (get_num_rdma_ranks, get_rdma_rank, get_root_rdma_rank(True),
# get_num_nvl_ranks); DeepEP's meaning: nodes, this rank's node, the rank of my local index on node 0, node size.
TOPOLOGIES = {
    (5, 8, 8): (1, 0, 5, 8),        # intranode EP8
    (1, 2, 2): (1, 0, 1, 2),        # intranode EP2
    (3, 16, 8): (2, 0, 3, 8),       # DeepEP's 2 nodes x 8: node 0
    (13, 16, 8): (2, 1, 5, 8),      # node 1, local index 5 -> root rank 5
    (31, 32, 8): (4, 3, 7, 8),
    (1, 2, 1): (2, 1, 0, 1),        # 2 fake nodes of 1 rank (tools/launch.py --ranks-per-node 1)
    (6, 8, 2): (4, 3, 0, 2),        # 4 nodes x 2
    (5, 8, 2): (4, 2, 1, 2),
}


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES), ids=lambda t: f"rank{t[0]}_of{t[1]}_per_node{t[2]}")
def test_runtime_topology_answers_have_deepeps_meaning(topology):
    rank, R, M = topology
    rt = _FakeCore(rank, R, M, internode=R > M)
    assert (rt.get_num_rdma_ranks(), rt.get_rdma_rank(), rt.get_root_rdma_rank(True),
            rt.get_num_nvl_ranks()) == TOPOLOGIES[topology]
    assert rt.get_root_rdma_rank(False) == 0
    # DeepEP's consistency: rank = rdma_rank * ranks_per_node + local index; the root shares my local index
    assert rt.get_rdma_rank() * rt.get_num_nvl_ranks() + rt.get_root_rdma_rank(True) == rank
    assert all(isinstance(v, int) for v in (rt.get_num_rdma_ranks(), rt.get_rdma_rank(), rt.get_root_rdma_rank(1)))


def test_runtime_availability_and_device():
    assert _FakeCore(0, 8, 8, device=3).get_local_device_id() == 3
    live_intra, live_inter = _FakeCore(0, 8, 8), _FakeCore(0, 16, 8, internode=True)
    assert live_intra.is_available() and not live_intra.is_internode_available()
    assert live_inter.is_available() and live_inter.is_internode_available()
    gone = _FakeCore(0, 16, 8, internode=True, alive=False)
    assert gone.is_available() is False and gone.is_internode_available() is False


@pytest.mark.parametrize("method,args,code,needle", [
    ("get_local_ipc_handle", (), "not_available", "no CUDA IPC handles"),
    ("get_local_nvshmem_unique_id", (), "not_available", "does not use NVSHMEM"),
    ("sync", ([0, 1], [None, None], None), "invalid_argument", "already connected")])
def test_runtime_bootstrap_methods_say_that_openep_has_none(method, args, code, needle):
    with pytest.raises(openep.OpenEPError) as e:
        getattr(_FakeCore(0, 2, 2), method)(*args)
    assert e.value.code == code and needle in str(e.value)
    if code == "not_available":
        assert isinstance(e.value, NotImplementedError)


# What DeepEP V1's buffer.py and the engines call on buffer.runtime (csrc/deep_ep.cpp binds these).
DEEPEP_RUNTIME_METHODS = ["destroy", "get_comm_stream", "get_local_buffer_tensor", "get_local_device_id",
                          "get_local_ipc_handle", "get_local_nvshmem_unique_id", "get_num_rdma_ranks", "get_rdma_rank",
                          "get_root_rdma_rank", "is_available", "is_internode_available", "sync"]


def test_buffer_runtime_has_every_deepep_runtime_method():
    import openep.buffer
    assert openep.buffer.Runtime is Runtime and issubclass(Runtime, _C.Runtime)  # what Buffer() creates
    missing = [m for m in DEEPEP_RUNTIME_METHODS if not callable(getattr(Runtime, m, None))]
    assert not missing, missing
    undocumented = [m for m in DEEPEP_RUNTIME_METHODS if not (getattr(Runtime, m).__doc__ or "").strip()]
    assert not undocumented, undocumented
    params = list(inspect.signature(Runtime.get_local_buffer_tensor).parameters.values())
    assert [(p.name, p.default) for p in params[1:]] == [("dtype", inspect.Parameter.empty), ("offset", 0),
                                                          ("use_rdma_buffer", False)]  # DeepEP's C++ order


def test_get_local_buffer_tensor_rejects_a_bad_offset_before_touching_memory():
    class Core(_FakeCore):
        def local_buffer(self, rdma):
            return (0x1000, 256)

    for offset, needle in ((-1, "offset must be >= 0"), (512, "exceeds the region's 256 bytes"),
                           (1.5, "offset expected an int")):
        with pytest.raises(openep.OpenEPError) as e:
            Core(0, 2, 2).get_local_buffer_tensor("int32", offset)  # checked before torch is needed
        assert e.value.code == "invalid_argument" and needle in str(e.value)
