"""CPU tests of tools/launch.py: fake-node device assignment and environment (docs/fake-nodes.md).

No GPU, no torch and no built openep package needed: launch.py is loaded from its path, and the end-to-end
cases start Python children with OPENEP_NUM_GPUS telling the launcher how many GPUs to assume.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH_PY = Path(__file__).resolve().parents[2] / "tools" / "launch.py"


def _load_launch():
    spec = importlib.util.spec_from_file_location("openep_launch", LAUNCH_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = _load_launch()

FAKE_ONLY = ("NCCL_HOSTID", "NCCL_NET", "NCCL_SOCKET_IFNAME", "NCCL_MNNVL_ENABLE", "OPENEP_NODE",
             "OPENEP_RANKS_PER_NODE", "LOCAL_WORLD_SIZE")


def world(nproc, m, g):
    return [launch.fake_node_env(r, nproc, m, g) for r in range(nproc)]


# ---- the pure functions ----------------------------------------------------------------------------------
def test_single_node_env_is_unchanged():
    assert launch.single_node_env(1, 2) == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_two_nodes_on_one_gpu_exact_env():
    envs = world(2, 1, 1)
    assert envs[0] == {
        "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
        "NCCL_HOSTID": "openep-fake-node-0", "NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": "lo",
        "NCCL_MNNVL_ENABLE": "0", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1", "OPENEP_NODE": "0", "OPENEP_RANKS_PER_NODE": "1", "LOCAL_WORLD_SIZE": "1"}
    assert envs[1]["RANK"] == "1" and envs[1]["LOCAL_RANK"] == "0"  # both processes on GPU 0
    assert envs[1]["NCCL_HOSTID"] == "openep-fake-node-1" and envs[1]["OPENEP_NODE"] == "1"


def test_four_nodes_on_one_gpu():
    envs = world(4, 1, 1)
    assert [e["LOCAL_RANK"] for e in envs] == ["0"] * 4
    assert [e["NCCL_HOSTID"] for e in envs] == [f"openep-fake-node-{n}" for n in range(4)]
    assert all(e["WORLD_SIZE"] == "4" and e["OPENEP_RANKS_PER_NODE"] == "1" for e in envs)


def test_two_by_two_on_four_and_on_two_gpus():
    envs = world(4, 2, 4)
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"]  # nproc <= G: device = rank
    assert [e["OPENEP_NODE"] for e in envs] == ["0", "0", "1", "1"]
    assert [e["NCCL_HOSTID"] for e in envs] == ["openep-fake-node-0"] * 2 + ["openep-fake-node-1"] * 2
    assert all(e["LOCAL_WORLD_SIZE"] == "2" for e in envs)
    assert [e["LOCAL_RANK"] for e in world(4, 2, 2)] == ["0", "1", "0", "1"]


def test_node_that_does_not_divide_the_gpus_wraps_round():
    assert [int(e["LOCAL_RANK"]) for e in world(6, 3, 4)] == [0, 1, 2, 3, 0, 1]


# Every (nodes, M, G) with M <= G (M > G is refused: test_too_many_ranks_per_node).
TOPOLOGIES = [(n, m, g) for n in (1, 2, 3, 4, 5) for m in (1, 2, 3, 4, 8) for g in (1, 2, 3, 4, 8) if m <= g]


@pytest.mark.parametrize("num_nodes,m,g", TOPOLOGIES)
def test_assignment_rules(num_nodes, m, g):
    nproc = num_nodes * m
    envs = world(nproc, m, g)
    devices = [int(e["LOCAL_RANK"]) for e in envs]
    assert all(0 <= d < g for d in devices)
    for n in range(num_nodes):
        node_envs = envs[n * m:(n + 1) * m]
        assert [int(e["RANK"]) for e in node_envs] == list(range(n * m, (n + 1) * m))  # node-major
        assert {e["NCCL_HOSTID"] for e in node_envs} == {f"openep-fake-node-{n}"}
        assert {e["OPENEP_NODE"] for e in node_envs} == {str(n)}
        node_devices = devices[n * m:(n + 1) * m]
        assert len(set(node_devices)) == m, "ranks of one node must use distinct GPUs"
        if g % m == 0:
            first = (n * m) % g
            assert node_devices == list(range(first, first + m)), "aligned GPU block per node when M | G"
    assert len({e["NCCL_HOSTID"] for e in envs}) == num_nodes
    counts = [devices.count(d) for d in range(g)]
    assert max(counts) - min(counts) <= 1, "processes spread evenly over the GPUs"
    if nproc <= g:
        assert devices == list(range(nproc))
    for e in envs:
        assert e["WORLD_SIZE"] == str(nproc) and e["LOCAL_WORLD_SIZE"] == str(m)
        assert e["NCCL_NET"] == "Socket" and e["NCCL_SOCKET_IFNAME"] == "lo"
        assert e["NCCL_MNNVL_ENABLE"] == "0" and e["NCCL_NVLS_ENABLE"] == "0"


def test_too_many_ranks_per_node():
    with pytest.raises(launch.TopologyError, match="Duplicate GPU detected"):
        launch.fake_node_env(0, 4, 2, 1)
    with pytest.raises(launch.TopologyError, match="this machine has 0"):
        launch.fake_node_env(0, 2, 1, 0)


@pytest.mark.parametrize("nproc,m,match", [(3, 2, "not a multiple"), (2, 0, ">= 1"), (0, 1, "at least one rank")])
def test_bad_topologies(nproc, m, match):
    with pytest.raises(launch.TopologyError, match=match):
        launch.check_fake_topology(nproc, m, 8)


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="rank must be in"):
        launch.fake_node_env(2, 2, 1, 1)


def test_topology_line():
    line = launch.describe_fake_topology(4, 2, 2)
    assert "\n" not in line
    assert "4 ranks = 2 nodes x 2 on 2 GPUs" in line
    assert "node 0 = ranks 0-1 on GPUs 0,1" in line and "node 1 = ranks 2-3 on GPUs 0,1" in line
    assert "up to 2 processes per GPU" in line
    assert "node 1 = rank 1 on GPU 0" in launch.describe_fake_topology(2, 1, 1)


# ---- the launcher end to end (Python children, no GPU) -------------------------------------------------
CHILD = ("import json, os; print('ENV ' + json.dumps({k: os.environ.get(k) for k in "
         "['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'OPENEP_UNIQUE_ID_FILE', 'NCCL_NVLS_ENABLE'] + "
         + repr(list(FAKE_ONLY)) + "}))")


def run_launcher(tmp_path, num_gpus, *launcher_args):
    env = {k: v for k, v in os.environ.items() if k not in FAKE_ONLY and k != "CUDA_VISIBLE_DEVICES"}
    env["OPENEP_NUM_GPUS"] = str(num_gpus)
    log_dir = tmp_path / "logs"
    out = subprocess.run([sys.executable, str(LAUNCH_PY), *launcher_args, "--timeout", "60", "--log-dir",
                          str(log_dir), "--", sys.executable, "-c", CHILD],
                         env=env, capture_output=True, text=True, timeout=120)
    return out, log_dir


def child_envs(log_dir, nproc):
    import json
    envs = []
    for r in range(nproc):
        lines = [l for l in (log_dir / f"rank{r}.log").read_text().splitlines() if l.startswith("ENV ")]
        assert len(lines) == 1, lines
        envs.append(json.loads(lines[0][4:]))
    return envs


def test_launcher_fake_nodes_end_to_end(tmp_path):
    out, log_dir = run_launcher(tmp_path, 1, "--nproc", "4", "--ranks-per-node", "1", "--min-gpus", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    topo = [l for l in out.stdout.splitlines() if l.startswith("launch.py: fake nodes:")]
    assert len(topo) == 1 and "4 ranks = 4 nodes x 1 on 1 GPU" in topo[0]
    envs = child_envs(log_dir, 4)
    for r, e in enumerate(envs):
        expected = launch.fake_node_env(r, 4, 1, 1)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NCCL_NVLS_ENABLE") + FAKE_ONLY:
            assert e[k] == expected[k], (r, k)
        assert e["OPENEP_UNIQUE_ID_FILE"] == envs[0]["OPENEP_UNIQUE_ID_FILE"] is not None


def test_launcher_without_option_sets_no_fake_variables(tmp_path):
    out, log_dir = run_launcher(tmp_path, 2, "--nproc", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fake nodes" not in out.stdout
    for r, e in enumerate(child_envs(log_dir, 2)):
        assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["NCCL_NVLS_ENABLE"]) == (str(r), "2", str(r), "0")
        assert all(e[k] is None for k in FAKE_ONLY), e


def test_launcher_without_option_still_refuses_more_ranks_than_gpus(tmp_path):
    out, _ = run_launcher(tmp_path, 1, "--nproc", "2", "--min-gpus", "1")
    assert out.returncode == 2 and "exceeds the 1 GPUs" in out.stdout


def test_launcher_skips_and_refuses(tmp_path):
    out, _ = run_launcher(tmp_path, 0, "--nproc", "2", "--ranks-per-node", "1", "--min-gpus", "1")
    assert out.returncode == 77 and "skipped" in out.stdout
    out, _ = run_launcher(tmp_path, 1, "--nproc", "4", "--ranks-per-node", "2", "--min-gpus", "1")
    assert out.returncode == 2 and "Duplicate GPU detected" in out.stdout
    out, _ = run_launcher(tmp_path, 2, "--nproc", "3", "--ranks-per-node", "2", "--min-gpus", "1")
    assert out.returncode == 2 and "not a multiple" in out.stdout


def test_gin_loopback_env_routes_the_network_through_the_plugin():
    env = launch.gin_loopback_env("/x/libopenep_gin_loopback.so")
    assert env == {"NCCL_NET_PLUGIN": "/x/libopenep_gin_loopback.so", "NCCL_NET": "OpenEPLoopback",
                   "NCCL_GIN_TYPE": "2", "OPENEP_GIN_LOOPBACK": "/x/libopenep_gin_loopback.so"}
    # The name must match the plugin's ncclNetPlugin_v11.name, or NCCL_NET selects no network.
    src = (LAUNCH_PY.parents[1] / "tests" / "gin_loopback" / "plugin.cpp").read_text()
    assert 'g_net_name[] = "OpenEPLoopback"' in src


# ---- --expect-killed (fault-tolerance tests kill one rank on purpose) --------------------------------------
KILL_CHILD = ("import os, signal, sys, time\n"
              "rank = int(os.environ['RANK'])\n"
              "if rank == int(sys.argv[1]): os.kill(os.getpid(), signal.SIGKILL)\n"
              "time.sleep(1.0)\n"  # the survivors outlive the victim: its death must not end them
              "print('survivor', rank, 'done', flush=True)\n")


def run_kill(tmp_path, victim, *launcher_args):
    env = {k: v for k, v in os.environ.items() if k not in FAKE_ONLY and k != "CUDA_VISIBLE_DEVICES"}
    env["OPENEP_NUM_GPUS"] = "1"
    return subprocess.run([sys.executable, str(LAUNCH_PY), "--nproc", "3", "--ranks-per-node", "1", "--min-gpus", "1",
                           *launcher_args, "--timeout", "60", "--log-dir", str(tmp_path / "logs"), "--",
                           sys.executable, "-c", KILL_CHILD, str(victim)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_expect_killed_rank_dying_by_sigkill_is_a_pass_and_the_others_finish(tmp_path):
    out = run_kill(tmp_path, 2, "--expect-killed", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    for r in (0, 1):
        assert f"survivor {r} done" in (tmp_path / "logs" / f"rank{r}.log").read_text()


def test_expect_killed_rank_that_lives_is_a_failure(tmp_path):
    out = run_kill(tmp_path, -1, "--expect-killed", "2")  # nobody is killed
    assert out.returncode != 0
    assert "rank 2 was expected to die by SIGKILL" in out.stdout


def test_an_unexpected_kill_is_still_a_failure(tmp_path):
    out = run_kill(tmp_path, 1, "--expect-killed", "2")
    assert out.returncode != 0, out.stdout
    assert "rank 1 failed" in out.stdout


def test_expect_killed_out_of_range_is_refused(tmp_path):
    out = run_kill(tmp_path, -1, "--expect-killed", "3")
    assert out.returncode == 2 and "--expect-killed 3" in out.stdout, out.stdout + out.stderr
