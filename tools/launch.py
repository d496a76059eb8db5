#!/usr/bin/env python3
"""Multi-GPU launcher for OpenEP's tests and benchmark: one process per GPU.

    python3 tools/launch.py [--nproc N] [--min-gpus 2] [--timeout 540] [--log-dir DIR] -- CMD [ARGS...]

Each process gets RANK, WORLD_SIZE, LOCAL_RANK and OPENEP_UNIQUE_ID_FILE (a path in a fresh temporary folder;
rank 0 writes the NCCL unique id there and the others read it). Output of every rank goes to DIR/rank<i>.log
(and rank 0's is also echoed live). If CMD is a gtest binary, each rank also writes DIR/rank<i>.xml.

Exit status: 0 when every rank exits 0; 77 (skip) when the machine has fewer GPUs than --min-gpus (the reason
is printed); 124 when the global timeout expires (all ranks are killed); otherwise the first non-zero rank
status. The NVLink-multicast switches are forced off in every child (NCCL_NVLS_ENABLE=0 and friends).
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
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("no command given")

    num_gpus = count_gpus()
    nproc = args.nproc or num_gpus
    if num_gpus < args.min_gpus or nproc < args.min_gpus:
        print(f"launch.py: skipped: needs at least {args.min_gpus} GPUs, this machine has {num_gpus}"
              + (f" (and --nproc {nproc})" if args.nproc else ""), flush=True)
        return SKIP
    if nproc > num_gpus:
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
        env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   OPENEP_UNIQUE_ID_FILE=os.path.join(id_dir, "nccl_id"),
                   NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
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

    deadline = time.time() + args.timeout
    status = 0
    failed_rank = None
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
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
    if status != 0 or any(c != 0 for c in codes):
        if failed_rank is not None:
            print(f"launch.py: rank {failed_rank} failed with status {status}; its log follows:", flush=True)
            with open(os.path.join(log_dir, f"rank{failed_rank}.log")) as f:
                sys.stdout.write(f.read()[-8000:])
        return status if status != 0 else next(c for c in codes if c != 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
