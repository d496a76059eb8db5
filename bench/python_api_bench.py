"""Times openep's Python API (the drop-in deep_ep surface) on all local GPUs, one process per GPU.

Three timings per op, each the median of --iters (after --warmup), the slowest rank's median, one JSON line
per op:
  synced     host time around the call plus torch.cuda.synchronize() (Python, argument checks, allocation,
             the exact-mode host wait and the kernels, one call at a time);
  host_call  host time of the call alone (what the API costs the CPU; the exact-mode host wait is inside);
  gpu        CUDA-event time on the current stream around each call, calls issued back to back (what the
             GPU spends per call when the host keeps ahead, as in a real pipeline). Compare with bench/openep_bench (C++, event-timed)
on the same card to see the Python layer's cost.

    python3 bench/python_api_bench.py --tokens 4096 --hidden 7168 --topk 8 --experts 256 --num-sms 24
"""

import argparse
import json
import os
import statistics
import time


def worker(rank, world, port, a, results):
    import torch
    import torch.distributed as dist
    import openep as deep_ep

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    deep_ep.Buffer.set_num_sms(a.num_sms)
    nvl = deep_ep.Buffer.get_nvl_buffer_size_hint_for_tokens(world, a.tokens, a.hidden, 2, a.hidden // 128, a.topk)
    buf = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=nvl, explicitly_destroy=True)
    if world == 1:  # --ranks 1: DeepEP's config tables start at 2 ranks, so EP1 borrows EP2's configs
        cfg_d, cfg_c = deep_ep.Buffer.get_dispatch_config(2), deep_ep.Buffer.get_combine_config(2)
        buf.get_dispatch_config, buf.get_combine_config = (lambda n: cfg_d), (lambda n: cfg_c)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(a.tokens, a.hidden, device="cuda", generator=g).to(torch.bfloat16)
    x_fp8 = (x.to(torch.float8_e4m3fn), torch.ones(a.tokens, a.hidden // 128, device="cuda"))
    scores = torch.rand(a.tokens, a.experts, device="cuda", generator=g)
    topk_idx = scores.topk(a.topk, dim=1).indices.to(deep_ep.topk_idx_t)
    topk_w = torch.rand(a.tokens, a.topk, device="cuda", generator=g)
    layout = buf.get_dispatch_layout(topk_idx, a.experts)
    routing = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    out = buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, **routing)
    handle = out[4]
    ops = {
        "layout": lambda: buf.get_dispatch_layout(topk_idx, a.experts),
        "dispatch_bf16": lambda: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, **routing),
        "dispatch_fp8": lambda: buf.dispatch(x_fp8, topk_idx=topk_idx, topk_weights=topk_w, **routing),
        "dispatch_bf16_worst": lambda: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w,
                                                    num_worst_tokens=a.tokens * world, **routing),
        "dispatch_bf16_cached": lambda: buf.dispatch(x, handle=handle),
        "combine_bf16": lambda: buf.combine(out[0], handle),
    }
    if a.ll_tokens > 0:  # low-latency mode: a second Buffer (DeepEP: one mode per Buffer)
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(a.ll_tokens, a.hidden, world, a.ll_experts)
        ll = deep_ep.Buffer(dist.group.WORLD, num_rdma_bytes=rdma, low_latency_mode=True,
                            num_qps_per_rank=a.ll_experts // world, explicitly_destroy=True)
        lx = torch.randn(a.ll_tokens, a.hidden, device="cuda", generator=g).to(torch.bfloat16)
        lscores = torch.rand(a.ll_tokens, a.ll_experts, device="cuda", generator=g)
        lidx = lscores.topk(a.topk, dim=1).indices.to(deep_ep.topk_idx_t)
        lw = torch.rand(a.ll_tokens, a.topk, device="cuda", generator=g)
        lrecv, _, lhandle, _, _ = ll.low_latency_dispatch(lx, lidx, a.ll_tokens, a.ll_experts, use_fp8=False)
        ops["ll_dispatch_fp8"] = lambda: ll.low_latency_dispatch(lx, lidx, a.ll_tokens, a.ll_experts)
        ops["ll_dispatch_bf16"] = lambda: ll.low_latency_dispatch(lx, lidx, a.ll_tokens, a.ll_experts,
                                                                  use_fp8=False)
        ops["ll_combine_bf16"] = lambda: ll.low_latency_combine(lrecv, lidx, lw, lhandle)
    if a.breakdown:  # host cost of the pieces of a call (rank 0 prints; every op still runs on both ranks)
        import timeit

        class TimedRuntime:  # wraps Buffer.runtime: accumulates the host time spent inside the core's calls
            def __init__(self, rt):
                self._rt, self.t, self.n = rt, 0.0, 0

            def __getattr__(self, name):
                f = getattr(self._rt, name)
                if not callable(f):
                    return f

                def timed(*args, **kw):
                    t0 = time.perf_counter()
                    try:
                        return f(*args, **kw)
                    finally:
                        self.t += time.perf_counter() - t0
                        self.n += 1
                return timed

        buffers = [buf] + ([ll] if a.ll_tokens > 0 else [])
        for b in buffers:
            b.runtime = TimedRuntime(b.runtime)
        for name, fn in ops.items():
            for b in buffers:
                b.runtime.t, b.runtime.n = 0.0, 0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                fn()
            total = time.perf_counter() - t0
            torch.cuda.synchronize()
            core = sum(b.runtime.t for b in buffers)
            if rank == 0:
                print(f"breakdown {name}: host per call {total / a.iters * 1e6:.1f} us, inside the core "
                      f"{core / a.iters * 1e6:.1f} us ({sum(b.runtime.n for b in buffers) / a.iters:.1f} core calls)",
                      flush=True)
        for b in buffers:
            b.runtime = b.runtime._rt
        if rank == 0:
            comm = torch.cuda.ExternalStream(buf.runtime.comm_stream)
            cur = torch.cuda.current_stream()
            ev = torch.cuda.Event()
            dev = torch.device("cuda", rank)
            from openep._checks import check_tensor
            micro = {
                "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(),
                "torch._C._cuda_getCurrentRawStream(i)": lambda: torch._C._cuda_getCurrentRawStream(rank),
                "comm.wait_stream(cur)": lambda: comm.wait_stream(cur),
                "reused event record+wait": lambda: (ev.record(cur), comm.wait_event(ev)),
                "torch.empty(1024, device=str)": lambda: torch.empty(1024, device=f"cuda:{rank}"),
                "torch.empty(1024, device=obj)": lambda: torch.empty(1024, device=dev),
                "check_tensor": lambda: check_tensor("op", "x", x, ("bfloat16",), (a.tokens, None), True,
                                                     f"cuda:{rank}"),
                "x.data_ptr()": lambda: x.data_ptr(),
                "str(x.device)": lambda: str(x.device),
                "str(x.dtype)": lambda: str(x.dtype),
                "tuple(x.shape)": lambda: tuple(x.shape),
                "x.is_contiguous()": lambda: x.is_contiguous(),
            }
            for k, f in micro.items():
                n = 2000
                print(f"micro {k}: {timeit.timeit(f, number=n) / n * 1e6:.2f} us", flush=True)
            torch.cuda.synchronize()
    if a.profile:  # cProfile of the host side of each named op on rank 0 (both ranks call it: it is collective)
        import cProfile
        import pstats
        for name in a.profile.split(","):
            fn = ops[name]
            for _ in range(a.warmup):
                fn()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(a.iters):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            if rank == 0:
                print(f"==== profile of {name}: {a.iters} calls, rank 0 (tottime = own time) ====", flush=True)
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    res = {}
    for name, fn in ops.items():
        synced, host_call, gpu = [], [], []
        # (1) synced: host time of call + torch.cuda.synchronize(), one call at a time.
        for i in range(a.warmup + a.iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i >= a.warmup:
                synced.append((time.perf_counter() - t0) * 1e6)
                host_call.append((t1 - t0) * 1e6)
        # (2) gpu: calls issued back to back (no host sync in between), each bracketed by CUDA events on the
        # current stream (with async_finish=False the current stream waits for the communication stream, so the
        # end event covers the kernels); the ranks start together after a barrier.
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(a.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(a.iters)]
        torch.cuda.synchronize()
        dist.barrier()
        for i in range(a.iters):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        gpu = [starts[i].elapsed_time(ends[i]) * 1e3 for i in range(a.iters)]
        res[name] = {"synced": statistics.median(synced), "host_call": statistics.median(host_call),
                     "gpu": statistics.median(gpu)}
    results.put((rank, res, torch.cuda.get_device_name()))
    buf.destroy()
    if a.ll_tokens > 0:
        ll.destroy()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--num-sms", type=int, default=24)
    p.add_argument("--ll-tokens", type=int, default=128, help="low-latency ops at this many tokens (0: skip)")
    p.add_argument("--ll-experts", type=int, default=288)
    p.add_argument("--breakdown", action="store_true", help="host cost of the core calls and of torch pieces")
    p.add_argument("--profile", default="", help="comma-separated ops to run under cProfile first (rank 0 prints)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ranks", type=int, default=0,
                   help="processes, one per GPU (default: every GPU, at least 2); 1 = EP1 on one GPU, which measures "
                        "the Python layer's host cost (host_call) with no NVLink traffic: compare such rows only "
                        "with each other")
    a = p.parse_args()
    import socket

    import torch
    import torch.multiprocessing as mp
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    gpus = torch.cuda.device_count()
    world = a.ranks or gpus
    if world > gpus or (a.ranks == 0 and world < 2):
        print(f"python_api_bench: needs {'>= 2' if a.ranks == 0 else a.ranks} GPUs (or --ranks 1), found {gpus}")
        raise SystemExit(77)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, a, q)) for r in range(world)]
    for pr in procs:
        pr.start()
    got = [q.get(timeout=600) for _ in range(world)]
    for pr in procs:
        pr.join()
    gpu = got[0][2]
    for name in got[0][1]:
        row = {"bench": "python_api", "op": name, "gpu": gpu, "ranks": world, "tokens": a.tokens,
               "hidden": a.hidden, "topk": a.topk, "experts": a.experts, "num_sms": a.num_sms}
        for key in ("synced", "host_call", "gpu"):
            row[f"us_{key}_median_slowest_rank"] = round(max(r[1][name][key] for r in got), 1)
        print(json.dumps(row))

if __name__ == "__main__":
    main()
