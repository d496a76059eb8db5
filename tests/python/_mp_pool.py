"""One process per GPU for the GPU tests, started once and reused by every test (torch.multiprocessing spawn).

Each worker joins an NCCL torch.distributed group, creates an openep.Buffer, then runs the cases (functions of
_gpu_cases.py, by name) it receives, reporting success or the traceback. A case that hangs on one rank (e.g. the
other rank failed before a collective) is caught by the per-case timeout: the pool is killed and the next test
starts a fresh one.

With OPENEP_PYTEST_SHARE_GPU=1 the ranks share the machine's GPUs (rank r on GPU r % count, so both on one GPU
when there is one): torch.distributed uses gloo and openep.Buffer the IPC test fabric (OPENEP_TESTING_IPC_DIR, a
fresh folder per pool; PYTHON.md "Processes sharing a GPU"), since NCCL refuses two ranks on one GPU.
"""

import os
import queue
import shutil
import socket
import tempfile
import traceback

CASE_TIMEOUT_S = float(os.environ.get("OPENEP_PYTEST_CASE_TIMEOUT", "180"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_gpu():
    """True when the ranks share GPUs (OPENEP_PYTEST_SHARE_GPU=1): gloo and the IPC test fabric instead of NCCL."""
    return os.environ.get("OPENEP_PYTEST_SHARE_GPU") == "1"


def _worker(rank, world_size, port, ipc_dir, inbox, outbox):
    try:
        import datetime

        import torch
        import torch.distributed as dist

        device = rank % torch.cuda.device_count() if ipc_dir else rank
        torch.cuda.set_device(device)
        if ipc_dir:
            os.environ["OPENEP_TESTING_IPC_DIR"] = ipc_dir
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=120))
        else:
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=120), device_id=torch.device("cuda", rank))
        import _gpu_cases
        ctx = _gpu_cases.Context(rank, world_size, dist.group.WORLD, device)
        outbox.put((rank, "__ready__", None))
    except BaseException:
        outbox.put((rank, "__ready__", traceback.format_exc()))
        return
    while True:
        name = inbox.get()
        if name is None:
            break
        try:
            getattr(_gpu_cases, name)(ctx)
            torch.cuda.synchronize()
            outbox.put((rank, name, None))
        except BaseException:
            outbox.put((rank, name, traceback.format_exc()))
    try:
        ctx.close()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()


class Pool:
    def __init__(self, world_size):
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        port = _free_port()
        self.ipc_dir = tempfile.mkdtemp(prefix="openep_ipc_") if share_gpu() else ""
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.ipc_dir, self.inboxes[r],
                                                        self.outbox), daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self._collect("__ready__", 240)

    def _collect(self, name, timeout):
        errors = {}
        for _ in range(self.world_size):
            try:
                rank, got, err = self.outbox.get(timeout=timeout)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"case {name}: a rank did not answer within {timeout} s "
                                     f"(hang or crash); answers so far: {sorted(errors)}") from None
            assert got == name, f"protocol error: expected {name}, got {got}"
            if err:
                errors[rank] = err
        if errors:
            raise AssertionError("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))

    def run(self, name, timeout=CASE_TIMEOUT_S):
        for q in self.inboxes:
            q.put(name)
        self._collect(name, timeout)

    def alive(self):
        return all(p.is_alive() for p in self.procs)

    def close(self):
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)
        self.kill()

    def kill(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


class LazyPool:
    """A Pool of `world_size` ranks for one test module: started by the first case, restarted after a failed case
    (so one failure cannot poison the next test), closed by close()."""

    def __init__(self, world_size):
        self.world_size = world_size
        self._pool = None

    def run(self, name):
        if self._pool is None or not self._pool.alive():
            self._pool = Pool(self.world_size)
        try:
            self._pool.run(name)
        except BaseException:
            self._pool.kill()
            self._pool = None
            raise

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool = None
