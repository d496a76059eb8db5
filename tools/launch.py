#!/usr/bin/env python3
"""Multi-GPU launcher for OpenEP's tests and benchmark: one process per GPU, or fake nodes.

    python3 tools/launch.py [--nproc N] [--min-gpus 2] [--timeout 540] [--log-dir DIR] -- CMD [ARGS...]
    python3 tools/launch.py --ranks-per-node M [--nproc N] [--min-gpus 1] ... -- CMD [ARGS...]

Each process gets RANK, WORLD_SIZE, LOCAL_RANK and OPENEP_UNIQUE_ID_FILE (a path in a fresh temporary folder;
rank 0 writes the NCCL unique id there and the others read it). Output of every rank goes to DIR/rank<i>.log
(and rank 0's is also echoed live). If CMD is a gtest binary, each rank also writes DIR/rank<i>.xml.

--share-gpus: processes on this one host may share GPUs (device = rank % G, --nproc may exceed G), with no NCCL
variable set: for binaries that do not put two ranks of one GPU into an NCCL communicator (the IPC test fabric,
openep/testing.hpp IpcFabric, whose rendezvous directory is the folder of OPENEP_UNIQUE_ID_FILE).

--expect-killed RANK (repeatable): a fault-tolerance test kills that rank with SIGKILL on purpose; its death neither
counts as a failure nor ends the others, but the run fails if that rank ends any other way.

Exit status: 0 when every rank exits 0; 77 (skip) when the machine has fewer GPUs than --min-gpus (the reason
is printed); 124 when the global timeout expires (all ranks are killed); otherwise the first non-zero rank
status. The NVLink-multicast switches are forced off in every child (NCCL_NVLS_ENABLE=0 and friends).

Fake nodes (--ranks-per-node M; docs/fake-nodes.md). Without the option every rank is in one node, exactly as
before (no other variable is set). With it the world is N = nproc / M nodes of M ranks in node-major order,
rank = node * M + local, and NCCL is told that each node is a separate host, so ranks of different nodes talk
through NCCL's network code (the Socket transport over loopback) even on one machine. Every process gets,
before it starts (NCCL reads its variables once per process):
    NCCL_HOSTID=openep-fake-node-<node>   one host id per node: NCCL counts nodes by host id
    NCCL_NET=Socket, NCCL_SOCKET_IFNAME=lo   the network NCCL uses between fake nodes: TCP over loopback
    NCCL_MNNVL_ENABLE=0, NCCL_NVLS_ENABLE=0  no multi-node NVLink / NVLink SHARP detection across fake hosts
    OPENEP_NODE=<node>, OPENEP_RANKS_PER_NODE=<M>, LOCAL_WORLD_SIZE=<M>
    RANK, WORLD_SIZE, LOCAL_RANK and OPENEP_UNIQUE_ID_FILE as above, plus the multicast switches.
LOCAL_RANK keeps its meaning for OpenEP's binaries: the CUDA device index of the process (it is NOT the rank's
index inside its node, which is rank - node * M).

Device rule: device = rank % G (G = GPUs of this machine, after CUDA_VISIBLE_DEVICES / OPENEP_NUM_GPUS),
with the requirements M <= G and nproc % M == 0. Why it is right:
  * the ranks of one node must use distinct GPUs (NCCL refuses two ranks with one host id on one GPU,
    "Duplicate GPU detected"): a node's ranks are M consecutive integers, and M consecutive integers are
    distinct modulo G when M <= G, so they land on distinct GPUs (wrapping round past the last GPU if M
    does not divide G, e.g. GPUs 3, 0, 1 for M = 3, G = 4);
  * ranks of different nodes may share a GPU (that is what lets N nodes run on one GPU);
  * nodes are spread over all GPUs: the processes per GPU differ by at most one, and when M divides G
    node n uses the aligned block of GPUs (n * M) % G .. (n * M) % G + M - 1;
  * when nproc <= G every rank gets its own GPU, device = rank, as without the option.
--nproc may then exceed the GPU count (default: G ranks); --min-gpus still decides skipping (exit 77).
One line describing the fake topology is printed before the processes start.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

SKIP = 77

# Forced off in every child, fake nodes or not: OpenEP never uses NVLink multicast.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FAKE_HOSTID_PREFIX = "openep-fake-node-"


class TopologyError(ValueError):
    """A fake-node topology that cannot be placed on this machine (the message says why)."""


def single_node_env(rank, nproc):
    """Variables of one child without --ranks-per-node (all ranks in one node, one GPU per rank)."""
    env = {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank)}
    env.update(MULTICAST_OFF)
    return env


def check_fake_topology(nproc, ranks_per_node, num_gpus):
    """Raises TopologyError unless nproc ranks in nodes of ranks_per_node fit on num_gpus GPUs."""
    if ranks_per_node < 1:
        raise TopologyError(f"--ranks-per-node must be >= 1, got {ranks_per_node}")
    if nproc < 1:
        raise TopologyError(f"the world needs at least one rank, got --nproc {nproc}")
    if nproc % ranks_per_node != 0:
        raise TopologyError(f"--nproc {nproc} is not a multiple of --ranks-per-node {ranks_per_node} "
                            "(fake nodes have equal sizes and ranks are node-major)")
    if ranks_per_node > num_gpus:
        raise TopologyError(f"--ranks-per-node {ranks_per_node} needs {ranks_per_node} distinct GPUs per node "
                            f"(NCCL refuses two ranks of one host on one GPU: \"Duplicate GPU detected\"), "
                            f"this machine has {num_gpus}")


def fake_node_device(rank, num_gpus):
    """CUDA device of `rank` in a fake-node world (see the module docstring for why rank % G)."""
    return rank % num_gpus


def fake_node_env(rank, nproc, ranks_per_node, num_gpus):
    """Variables of child `rank` in a world of nproc ranks, ranks_per_node per fake node, on num_gpus GPUs.

    Pure function (no side effects): everything but OPENEP_UNIQUE_ID_FILE. Raises TopologyError for a topology
    that does not fit (check_fake_topology) and ValueError for a rank outside [0, nproc).
    """
    check_fake_topology(nproc, ranks_per_node, num_gpus)
    if not 0 <= rank < nproc:
        raise ValueError(f"rank must be in [0, {nproc}), got {rank}")
    node = rank // ranks_per_node
    env = {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(fake_node_device(rank, num_gpus))}
    env.update(MULTICAST_OFF)
    env.update(NCCL_HOSTID=f"{FAKE_HOSTID_PREFIX}{node}", NCCL_NET="Socket", NCCL_SOCKET_IFNAME="lo",
               NCCL_MNNVL_ENABLE="0", NCCL_NVLS_ENABLE="0",
               OPENEP_NODE=str(node), OPENEP_RANKS_PER_NODE=str(ranks_per_node),
               LOCAL_WORLD_SIZE=str(ranks_per_node))
    return env


# Name of the loopback GIN plugin's network (tests/gin_loopback/plugin.cpp, ncclNetPlugin_v11.name).
GIN_LOOPBACK_NET_NAME = "OpenEPLoopback"


def gin_loopback_env(plugin_path):
    """Variables that route a fake-node world through the loopback GIN test plugin (tests/gin_loopback/).

    NCCL_NET_PLUGIN loads it, NCCL_NET picks its network instead of Socket, NCCL_GIN_TYPE=2 (proxy) pins the GIN
    type it provides, OPENEP_GIN_LOOPBACK tells the fake-node tests that GIN is expected to be present.
    """
    return {"NCCL_NET_PLUGIN": plugin_path, "NCCL_NET": GIN_LOOPBACK_NET_NAME, "NCCL_GIN_TYPE": "2",
            "OPENEP_GIN_LOOPBACK": plugin_path}


def describe_fake_topology(nproc, ranks_per_node, num_gpus, network="NCCL_NET=Socket over lo"):
    """One line naming the nodes, their ranks and GPUs (printed by main before the children start)."""
    check_fake_topology(nproc, ranks_per_node, num_gpus)
    num_nodes = nproc // ranks_per_node
    per_gpu = [0] * num_gpus
    nodes = []
    for node in range(num_nodes):
        ranks = range(node * ranks_per_node, (node + 1) * ranks_per_node)
        gpus = [fake_node_device(r, num_gpus) for r in ranks]
        for g in gpus:
            per_gpu[g] += 1
        rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        nodes.append(f"node {node} = {rank_text} on GPU{'s' if len(gpus) > 1 else ''} "
                     + ",".join(str(g) for g in gpus))
    return (f"launch.py: fake nodes: {nproc} ranks = {num_nodes} node{'s' if num_nodes != 1 else ''} x "
            f"{ranks_per_node} on {num_gpus} GPU{'s' if num_gpus != 1 else ''} (up to {max(per_gpu)} "
            f"processes per GPU); " + "; ".join(nodes)
            + f"; NCCL_HOSTID={FAKE_HOSTID_PREFIX}<node>, {network} between nodes")


def count_gpus():
    env = os.environ.get("OPENEP_NUM_GPUS")
    if env:
        return int(env)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() != "":
        return len([v for v in visible.split(",") if v.strip() != ""])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=0, help="processes (default: all GPUs)")
    ap.add_argument("--min-gpus", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=540.0, help="global timeout in seconds")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--quiet", action="store_true", help="do not echo rank 0's output")
    ap.add_argument("--ranks-per-node", type=int, default=None, metavar="M",
                    help="fake nodes of M ranks each (own NCCL_HOSTID per node, NCCL Socket network over "
                         "loopback between nodes); --nproc may then exceed the GPU count. Default: one node")
    ap.add_argument("--gin-loopback", default=None, metavar="SO",
                    help="with --ranks-per-node: use the loopback GIN test plugin at SO as NCCL's network between "
                         "fake nodes (NCCL_NET_PLUGIN=SO, NCCL_NET=OpenEPLoopback, NCCL_GIN_TYPE=2)")
    ap.add_argument("--share-gpus", action="store_true",
                    help="one node whose processes may share GPUs (device = rank %% G, --nproc may exceed G); no "
                         "NCCL variables: for the IPC test fabric")
    ap.add_argument("--expect-killed", type=int, action="append", default=[], metavar="RANK",
                    help="RANK is meant to die by SIGKILL (a fault-tolerance test kills it): its death is not a "
                         "failure and does not end the others; it IS a failure if RANK ends any other way")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("no command given")

    num_gpus = count_gpus()
    nproc = args.nproc or num_gpus
    for r in args.expect_killed:
        if not 0 <= r < nproc:
            print(f"launch.py: --expect-killed {r} is not a rank of the {nproc} started", flush=True)
            return 2
    fake = args.ranks_per_node is not None
    if fake and args.share_gpus:
        ap.error("--share-gpus and --ranks-per-node exclude each other")
    if args.gin_loopback is not None:
        if not fake:
            ap.error("--gin-loopback needs --ranks-per-node")
        if not os.path.isfile(args.gin_loopback):
            ap.error(f"--gin-loopback: no such file {args.gin_loopback}")
        args.gin_loopback = os.path.abspath(args.gin_loopback)
    if fake:
        if num_gpus < args.min_gpus:
            print(f"launch.py: skipped: needs at least {args.min_gpus} GPUs, this machine has {num_gpus}",
                  flush=True)
            return SKIP
        try:
            network = (f"NCCL_NET={GIN_LOOPBACK_NET_NAME} (loopback GIN test plugin {args.gin_loopback})"
                       if args.gin_loopback else "NCCL_NET=Socket over lo")
            print(describe_fake_topology(nproc, args.ranks_per_node, num_gpus, network), flush=True)
        except TopologyError as e:
            print(f"launch.py: {e}", flush=True)
            return 2
    elif args.share_gpus:
        if num_gpus < max(args.min_gpus, 1):
            print(f"launch.py: skipped: needs at least {max(args.min_gpus, 1)} GPUs, this machine has {num_gpus}",
                  flush=True)
            return SKIP
        print(f"launch.py: {nproc} processes sharing {num_gpus} GPU(s), device = rank % {num_gpus}", flush=True)
    elif num_gpus < args.min_gpus or nproc < args.min_gpus:
        print(f"launch.py: skipped: needs at least {args.min_gpus} GPUs, this machine has {num_gpus}"
              + (f" (and --nproc {nproc})" if args.nproc else ""), flush=True)
        return SKIP
    elif nproc > num_gpus:
        print(f"launch.py: --nproc {nproc} exceeds the {num_gpus} GPUs of this machine", flush=True)
        return 2

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="openep_logs_")
    os.makedirs(log_dir, exist_ok=True)
    id_dir = tempfile.mkdtemp(prefix="openep_id_")
    is_gtest = False
    try:
        probe = subprocess.run([cmd[0], "--help"], capture_output=True, text=True, timeout=30)
        is_gtest = "--gtest_" in probe.stdout
    except (OSError, subprocess.TimeoutExpired):
        pass

    procs, logs = [], []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(fake_node_env(rank, nproc, args.ranks_per_node, num_gpus) if fake else single_node_env(rank, nproc))
        if args.share_gpus:
            env["LOCAL_RANK"] = str(rank % num_gpus)
        if args.gin_loopback:
            env.update(gin_loopback_env(args.gin_loopback))
        env["OPENEP_UNIQUE_ID_FILE"] = os.path.join(id_dir, "nccl_id")
        full = list(cmd)
        if is_gtest:
            full.append(f"--gtest_output=xml:{os.path.join(log_dir, f'rank{rank}.xml')}")
        log = open(os.path.join(log_dir, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def pump(rank, proc, log):
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace")
            log.write(line)
            log.flush()
            if rank == 0 and not args.quiet:
                sys.stdout.write(line)
                sys.stdout.flush()

    threads = [threading.Thread(target=pump, args=(r, p, l), daemon=True) for r, (p, l) in enumerate(zip(procs, logs))]
    for t in threads:
        t.start()

    # OPENEP_LAUNCH_TIMEOUT_CAP=S lowers every launch's --timeout to at most S seconds (a short device session
    # bounding tests whose CTest command line says 600 s).
    cap = os.environ.get("OPENEP_LAUNCH_TIMEOUT_CAP")
    if cap:
        args.timeout = min(args.timeout, float(cap))
    deadline = time.time() + args.timeout
    status = 0
    failed_rank = None
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes)
               if c not in (None, 0) and not (r in args.expect_killed and c == -signal.SIGKILL)]
        if bad and failed_rank is None:
            failed_rank, status = bad[0]
            # Give the others a grace period to finish (they may report their own errors), then kill.
            deadline = min(deadline, time.time() + 30)
        if all(c is not None for c in codes):
            break
        if time.time() > deadline:
            alive = [r for r, c in enumerate(codes) if c is None]
            print(f"launch.py: timeout ({args.timeout:.0f} s) with ranks {alive} still running; killing them",
                  flush=True)
            for r in alive:
                try:
                    os.killpg(procs[r].pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if failed_rank is None:
                status = 124
            break
        time.sleep(0.1)
    for p in procs:
        p.wait()
    for t in threads:
        t.join(timeout=5)
    for log in logs:
        log.close()
    shutil.rmtree(id_dir, ignore_errors=True)

    codes = [p.returncode for p in procs]
    print(f"launch.py: {nproc} ranks, exit codes {codes}, logs in {log_dir}", flush=True)
    for r in args.expect_killed:
        if 0 <= r < nproc and codes[r] != -signal.SIGKILL:
            print(f"launch.py: rank {r} was expected to die by SIGKILL (--expect-killed) but ended with {codes[r]}",
                  flush=True)
            if status == 0:
                status, failed_rank = 1, r
    codes = [0 if (r in args.expect_killed and c == -signal.SIGKILL) else c for r, c in enumerate(codes)]
    if status != 0 or any(c != 0 for c in codes):
        if failed_rank is not None:
            print(f"launch.py: rank {failed_rank} failed with status {status}; its log follows:", flush=True)
            with open(os.path.join(log_dir, f"rank{failed_rank}.log")) as f:
                sys.stdout.write(f.read()[-8000:])
        return status if status != 0 else next(c for c in codes if c != 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
