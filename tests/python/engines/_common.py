"""Shared pieces of the engine-pattern scripts (megatron_pattern.py, sglang_pattern.py, vllm_pattern.py).

Each script replays, on every rank of a 2-rank world started by tools/launch.py, the sequence of ``deep_ep`` calls
one engine makes, and checks every output against OpenEP's CPU reference (openep.reference). Every rank builds the
inputs of ALL ranks from fixed seeds, so each rank can run the reference for the whole group without exchanging
data. The API under test is imported as ``deep_ep`` (OpenEP's alias, python/deep_ep_alias); only the reference
comes from ``openep``.

The helpers at the top (world_from_env, low_latency_skip_reason, ...) need neither torch nor a GPU and are
unit-tested on the CPU by tests/python/test_engine_patterns.py; the rest is imported lazily (torch).
"""

import os
import sys

DEEP_EP_MISSING = ("`import deep_ep` failed: the engine-pattern tests use OpenEP through the name deep_ep. Install "
                   "the alias once with `python3 -m pip install ./python/deep_ep_alias` (from the OpenEP repository; "
                   "docs/PYTHON.md, 'DeepEP callers unchanged'), with openep itself installed (`pip install .`)")

MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (no torch): unit-tested on the CPU
class World:
    """Where this process sits: rank, world size, CUDA device, and the (possibly fake) node layout."""

    def __init__(self, rank, world_size, local_rank, ranks_per_node, store_path):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.ranks_per_node = ranks_per_node
        self.num_nodes = world_size // ranks_per_node
        self.store_path = store_path

    @property
    def internode(self):
        """True when the group spans several (fake) nodes: normal mode is then internode mode."""
        return self.num_nodes > 1

    def describe(self):
        if self.internode:
            return f"{self.num_nodes} (fake) nodes x {self.ranks_per_node} rank(s)"
        return f"1 node x {self.world_size} ranks"


def world_from_env(env):
    """The World described by tools/launch.py's variables (RANK, WORLD_SIZE, LOCAL_RANK, OPENEP_UNIQUE_ID_FILE,
    and OPENEP_RANKS_PER_NODE with --ranks-per-node). Raises RuntimeError naming what is missing or wrong."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OPENEP_UNIQUE_ID_FILE") if k not in env]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: start this script through tools/launch.py, e.g. "
                           f"python3 tools/launch.py --nproc 2 -- python3 {sys.argv[0] if sys.argv else 'SCRIPT'}")
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if world != 2:
        raise RuntimeError(f"the engine-pattern tests are written for 2 ranks, got WORLD_SIZE={world} "
                           f"(use --nproc 2)")
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} outside [0, {world})")
    m = int(env.get("OPENEP_RANKS_PER_NODE", str(world)))
    if m < 1 or world % m != 0:
        raise RuntimeError(f"OPENEP_RANKS_PER_NODE={m} does not divide WORLD_SIZE={world}")
    return World(rank, world, local, m, env["OPENEP_UNIQUE_ID_FILE"] + ".torch_store")


def low_latency_skip_reason(world):
    """Why the low-latency (decode) part cannot run in this world, or None."""
    if world.internode:
        return (f"SKIPPED low-latency decode part: the group spans {world.num_nodes} fake nodes, and OpenEP refuses "
                f"low-latency mode across nodes without allow_network (its network path needs NCCL GIN, which "
                f"fake nodes over sockets do not have); the normal-mode part ran as internode mode")
    return None


def expected_m(num_tokens, group_size, num_topk, num_experts):
    """SGLang's expected rows per local expert for a low-latency batch (its DeepGEMM masked-GEMM hint)."""
    return (num_tokens * group_size * num_topk + num_experts) // num_experts


def deepep_style_buffer_bytes(configs, hidden_bytes, group_size):
    """(num_nvl_bytes, num_rdma_bytes) as Megatron's get_buffer and SGLang's get_deepep_buffer size a normal-mode
    Buffer: the maximum of DeepEP's Config hints over the dispatch and combine configs."""
    nvl = rdma = 0
    for c in configs:
        nvl = max(nvl, c.get_nvl_buffer_size_hint(hidden_bytes, group_size))
        rdma = max(rdma, c.get_rdma_buffer_size_hint(hidden_bytes, group_size))
    return nvl, rdma


def fp8_dequant_bound(abs_x, scale):
    """Largest |dequantized - x| of one element after e4m3 block quantization with this block scale (amax / 448):
    round to nearest keeps 3 mantissa bits, so normals are within |x| * 2^-4; subnormals (|x / scale| < 2^-6)
    are within scale * 2^-10. Returns |x| / 15 + scale / 512 (larger than both, for the float32 rounding of the
    product)."""
    return abs_x / 15 + scale / 512


def fp8_sum_bound(abs_x, scale, n):
    """Bound of |combine(dequantized rows) - n * x| for one element that n ranks received as the same FP8 row and
    sent back unchanged (BF16 rows, summed in float32, one BF16 rounding of each row and of the sum, 2^-9 each):
    n * (|x| * (2^-4 + 2^-8) + scale * 2^-9) is below n * (|x| / 8 + scale / 256)."""
    return n * (abs_x / 8 + scale / 256)


class Checks:
    """Collects named checks; prints each failure with the rank; the exit code says whether all passed."""

    def __init__(self, rank, name, out=None):
        self.rank, self.name, self.out = rank, name, out or sys.stdout
        self.passed, self.failed, self.skipped = 0, [], []
        self.section = ""

    def begin(self, section):
        self.section = section
        print(f"[rank {self.rank}] {self.name}: {section}", file=self.out, flush=True)

    def expect(self, ok, what):
        label = f"{self.section}: {what}" if self.section else what
        if ok:
            self.passed += 1
        else:
            self.failed.append(label)
            print(f"[rank {self.rank}] FAILED: {label}", file=self.out, flush=True)
        return bool(ok)

    def skip(self, what):
        self.skipped.append(what)
        print(f"[rank {self.rank}] {what}", file=self.out, flush=True)

    def summary(self):
        state = "ok" if not self.failed else f"{len(self.failed)} FAILED"
        skipped = f", {len(self.skipped)} part(s) skipped" if self.skipped else ""
        return f"[rank {self.rank}] {self.name}: {state} ({self.passed} checks passed{skipped})"

    def exit_code(self):
        return 0 if not self.failed else 1


# ---------------------------------------------------------------------------------------------------------------
# torch / deep_ep side
def import_deep_ep():
    """``import deep_ep``; exits 2 with DEEP_EP_MISSING when it is not importable. Reports what deep_ep is."""
    try:
        import deep_ep
    except ImportError as e:
        print(f"{DEEP_EP_MISSING}\n(ImportError: {e})", file=sys.stderr, flush=True)
        sys.exit(2)
    version = getattr(deep_ep, "__openep_version__", None)
    where = getattr(deep_ep, "__file__", "?")
    if version is None:
        print(f"note: deep_ep at {where} is not OpenEP's alias (a real DeepEP?): the checks still use OpenEP's "
              f"reference", flush=True)
    return deep_ep


def init_world():
    """World from the launcher, CUDA device set, torch.distributed (NCCL; gloo under OPENEP_TESTING_IPC_DIR, where the
    ranks share a GPU) initialised over a file store."""
    import torch
    import torch.distributed as dist
    world = world_from_env(os.environ)
    torch.cuda.set_device(world.local_rank)
    if os.environ.get("OPENEP_TESTING_IPC_DIR"):  # processes sharing a GPU (IPC test fabric): NCCL would refuse
        dist.init_process_group("gloo", init_method=f"file://{world.store_path}", rank=world.rank,
                                world_size=world.world_size)
    else:
        dist.init_process_group("nccl", init_method=f"file://{world.store_path}", rank=world.rank,
                                world_size=world.world_size, device_id=torch.device("cuda", world.local_rank))
    return world


def bytes_equal(a, b):
    """Byte-for-byte equality (shape and dtype size included) of two tensors; NaN payloads compare as bytes."""
    import torch
    if a is None or b is None:
        return a is None and b is None
    a = a.detach().contiguous().cpu()
    b = b.detach().contiguous().cpu()
    if a.shape != b.shape or a.element_size() != b.element_size():
        return False
    return bool((a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())


def per_token_group_quant_fp8(x, group=128):
    """Our own e4m3 block quantization (as an engine does before an FP8 normal-mode dispatch): per token and
    128-channel block, scale = amax / 448 (1 for an all-zero block). CPU in, CPU out: (x_fp8 [N, H], scales
    [N, H/128] float32, row-major)."""
    import torch
    n, h = x.shape
    blocks = x.float().reshape(n, h // group, group)
    amax = blocks.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scales[:, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).reshape(n, h)
    return q, scales.contiguous()


def dequant_rows(x_fp8, scales, group=128):
    """(float32(x_fp8) * scale of its block) -> bfloat16: two correctly rounded IEEE operations, so CPU and GPU give
    the same bits."""
    import torch
    return (x_fp8.float() * scales.float().repeat_interleave(group, dim=1)).to(torch.bfloat16)


def routing(gen, n, num_experts, num_topk, drop=0.2):
    """[n, K] int64 distinct experts per token, about ``drop`` of the slots -1, and the first two tokens routed
    nowhere; plus [n, K] float32 weights (0 where the slot is -1) and [n, E] float32 router probabilities."""
    import torch
    logits = torch.randn(n, num_experts, generator=gen)
    probs = torch.softmax(logits, dim=-1)
    weights, idx = torch.topk(probs, num_topk, dim=-1)
    dropped = torch.rand(n, num_topk, generator=gen) < drop
    if n > 4:
        dropped[:2] = True
    idx = idx.masked_fill(dropped, -1)
    weights = weights.masked_fill(dropped, 0.0)
    return idx.to(torch.int64).contiguous(), weights.contiguous(), probs


def hidden_rows(gen, n, hidden, blocky=True):
    """[n, H] bfloat16 rows whose magnitude varies per 128-channel block (so FP8 block scales differ)."""
    import torch
    if not blocky or hidden % 128:
        return (torch.randn(n, hidden, generator=gen) * 0.5).to(torch.bfloat16)
    mag = torch.exp(torch.randn(n, hidden // 128, 1, generator=gen))
    return (torch.randn(n, hidden // 128, 128, generator=gen) * mag).reshape(n, hidden).to(torch.bfloat16)


# Low-latency layout: DeepEP's handle[0] (packed_recv_src_info [E/R, R*T] int32) and handle[1]
# (packed_recv_layout_range [E/R, R] int64, (start << 32) | count) say where each received row sits. Kernels may
# order rows differently inside one (expert, source rank) range; the reference orders them by source token.
def ll_ranges(layout_range, i, num_ranks):
    return [(int(layout_range[i, s]) >> 32, int(layout_range[i, s]) & MASK32) for s in range(num_ranks)]


def ll_canonical_rows(src_info, layout_range, i, num_ranks):
    """Row indices of local expert i in the reference's order: by source rank (range), then source token."""
    import torch
    parts = []
    for start, count in ll_ranges(layout_range, i, num_ranks):
        if count:
            parts.append(torch.argsort(src_info[i, start:start + count], stable=True) + start)
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def check_ll_dispatch(chk, what, recv_x, recv_count, handle, want_ref, rank, use_fp8, use_ue8m0=False):
    """Checks one low_latency_dispatch result (DeepEP's outputs only) against openep.reference; returns the CPU
    (src_info, layout_range) for placing expert outputs."""
    import torch
    R, El = want_ref.num_ranks, want_ref.num_local_experts
    want = want_ref.recv(rank)
    count = recv_count.cpu()
    chk.expect(torch.equal(count.to(torch.int32), want["count"]), f"{what}: packed_recv_count equals the reference "
               f"({count.tolist()} vs {want['count'].tolist()})")
    chk.expect(tuple(handle[2:]) == (want_ref.T, want_ref.hidden, want_ref.num_experts),
               f"{what}: handle[2:] is (T, hidden, num_experts)")
    src, rng = handle[0].cpu(), handle[1].cpu()
    chk.expect(torch.equal(rng & MASK32, want["layout_range"] & MASK32), f"{what}: layout_range counts")
    if use_fp8:
        data, scales = recv_x
        chk.expect(data.dtype == torch.float8_e4m3fn, f"{what}: FP8 payload dtype")
        chk.expect(scales.dtype == (torch.int32 if use_ue8m0 else torch.float32), f"{what}: scale dtype")
        got_scales = scales.cpu().contiguous()
        want_scales = want["scales"].contiguous()
    else:
        data = recv_x
        chk.expect(data.dtype == torch.bfloat16, f"{what}: BF16 payload dtype")
    got = data.cpu().contiguous()
    bad = []
    for i in range(El):
        n = int(want["count"][i])
        perm = ll_canonical_rows(src, rng, i, R)
        if perm.numel() != n:
            bad.append(f"expert {i}: {perm.numel()} rows in the ranges, reference {n}")
            continue
        if n == 0:
            continue
        if not torch.equal(src[i, perm], want["src_info"][i, :n]):
            bad.append(f"expert {i}: src_info")
        if not bytes_equal(got[i, perm], want["packed_x"][i, :n]):
            bad.append(f"expert {i}: payload bytes")
        if use_fp8 and not bytes_equal(got_scales[i, perm], want_scales[i, :n]):
            bad.append(f"expert {i}: scales")
    chk.expect(not bad, f"{what}: every local expert's rows equal the reference" + (f" ({bad[:4]})" if bad else ""))
    return src, rng


def ll_expert_rows(e, s, t, hidden):
    """Deterministic BF16 'expert output' rows for (global expert e, source rank s, source tokens t [n])."""
    import torch
    key = ((e * 1000003 + s * 7919) + t.to(torch.int64)) * 2654435761 % (1 << 31)
    h = (key[:, None] + torch.arange(hidden, dtype=torch.int64)[None, :] * 40503) % 65521
    return ((h.to(torch.float32) - 32760.0) / 8192.0).to(torch.bfloat16)


def ll_expert_out(rank, num_ranks, T, hidden, num_experts, src, rng):
    """[E/R, R*T, H] BF16 expert outputs of ``rank`` placed as (src, rng) say; NaN outside the ranges (a kernel
    that reads them poisons its result)."""
    import torch
    El = num_experts // num_ranks
    y = torch.full((El, num_ranks * T, hidden), float("nan"), dtype=torch.bfloat16)
    for i in range(El):
        for s, (start, count) in enumerate(ll_ranges(rng, i, num_ranks)):
            if count:
                y[i, start:start + count] = ll_expert_rows(rank * El + i, s, src[i, start:start + count], hidden)
    return y


def ll_expected_combine(reference, want_ref, rank, use_logfmt=False):
    """The reference low-latency combine of ll_expert_out rows (every rank's, in the reference's placement)."""
    outs = []
    for d in range(want_ref.num_ranks):
        w = want_ref.recv(d)
        outs.append(ll_expert_out(d, want_ref.num_ranks, want_ref.T, want_ref.hidden, want_ref.num_experts,
                                  w["src_info"], w["layout_range"]))
    return reference.low_latency_combine(want_ref, outs, use_logfmt=use_logfmt)[rank]


def finish(chk, buffers=()):
    """Barrier, release, print the summary; returns the exit code."""
    import gc

    import torch
    import torch.distributed as dist
    torch.cuda.synchronize()
    dist.barrier()
    for b in buffers:
        if b is not None and getattr(b, "explicitly_destroy", False) and getattr(b, "runtime", None) is not None:
            b.destroy()
    buffers = None
    gc.collect()
    dist.barrier()
    print(chk.summary(), flush=True)
    dist.destroy_process_group()
    return chk.exit_code()
