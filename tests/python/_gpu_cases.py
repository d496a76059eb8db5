"""GPU test cases, run on every rank at once by _mp_pool workers (one process per GPU).

Every rank builds the inputs of ALL ranks from fixed seeds, so each rank can run the CPU reference (the core's,
through openep.reference) for the whole group without exchanging data; it then checks its own results.
Dispatch is compared byte for byte, combine bit for bit (the kernels sum in the reference's order).
"""

import openep
import openep.reference as ref

HIDDEN, TOPK, EXPERTS = 512, 4, 16


class Context:
    def __init__(self, rank, world_size, group):
        import torch
        self.torch, self.rank, self.R, self.group = torch, rank, world_size, group
        self.device = f"cuda:{rank}"
        self.max_tokens = _num_tokens(world_size - 1) + 8
        nvl = openep.Buffer.get_nvl_buffer_size_hint_for_tokens(world_size, 2 * self.max_tokens, HIDDEN, 2,
                                                                 HIDDEN // 128, TOPK)
        self.buffer = openep.Buffer(group, num_nvl_bytes=nvl, explicitly_destroy=True)

    def close(self):
        self.buffer.destroy()


def _num_tokens(rank):
    return 64 + 24 * rank  # ranks send different amounts


class RankInput:
    pass


def make_inputs(ctx, seed, fp8=False, idx_dtype=None, num_tokens=None):
    """Inputs of every rank (CPU tensors), identical on all ranks."""
    torch = ctx.torch
    out = []
    for s in range(ctx.R):
        g = torch.Generator().manual_seed(seed * 1000 + s)
        n = _num_tokens(s) if num_tokens is None else num_tokens
        i = RankInput()
        if fp8:
            i.x = torch.randint(0, 256, (n, HIDDEN), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
            i.scales = torch.randn(HIDDEN // 128, n, generator=g).t()  # column-major, as DeepEP's tests pass them
        else:
            i.x = torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16)
            i.scales = None
        idx = torch.rand(n, EXPERTS, generator=g).topk(TOPK, dim=1).indices
        idx[torch.rand(n, TOPK, generator=g) < 0.25] = -1
        idx[:3] = -1  # tokens that go nowhere
        i.topk_idx = idx.to(idx_dtype or torch.int64)
        i.topk_weights = torch.rand(n, TOPK, generator=g)
        i.bias = (torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16),
                  torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16))
        out.append(i)
    return out


def reference_dispatch(inputs, with_topk=True, alignment=1):
    return ref.dispatch([i.x for i in inputs], [i.topk_idx for i in inputs], EXPERTS,
                        topk_weights=[i.topk_weights for i in inputs],
                        x_scales=[i.scales for i in inputs] if inputs[0].scales is not None else None,
                        expert_alignment=alignment, with_topk=with_topk)


def _bytes_equal(a, b):
    """Byte-for-byte equality of two tensors of the same dtype (NaN payloads included)."""
    import torch
    a = a.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    b = b.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return a.shape == b.shape and bool((a == b).all())


def _to_gpu(ctx, i):
    return (i.x.to(ctx.device), i.scales.to(ctx.device) if i.scales is not None else None,
            i.topk_idx.to(ctx.device), i.topk_weights.to(ctx.device))


def run_dispatch(ctx, inputs, with_topk=True, async_finish=False, previous=False, alignment=1, worst=0):
    b = ctx.buffer
    x, scales, idx, w = _to_gpu(ctx, inputs[ctx.rank])
    ntpr, ntprdma, ntpe, itir, ev = b.get_dispatch_layout(idx, EXPERTS)
    assert ntprdma is None and ev.event is None
    prev = b.capture() if previous else None
    out = b.dispatch((x, scales) if scales is not None else x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                     num_tokens_per_expert=ntpe, topk_idx=idx if with_topk else None,
                     topk_weights=w if with_topk else None, expert_alignment=alignment, num_worst_tokens=worst,
                     previous_event=prev, async_finish=async_finish)
    event = out[-1]
    assert (event.event is not None) == async_finish
    if async_finish:
        event.current_stream_wait()
    return out, itir


def check_dispatch(ctx, out, itir, expect, worst=0, with_topk=True, fp8=False):
    torch = ctx.torch
    recv_x, recv_idx, recv_w, per_expert, handle, _ = out
    e = expect.recv(ctx.rank)
    n = e["num_recv_tokens"]
    rows = worst if worst else n
    if fp8:
        recv_x, recv_scales = recv_x
        assert recv_scales.shape == (rows, HIDDEN // 128) and recv_scales.is_contiguous()
        assert _bytes_equal(recv_scales[:n], e["x_scales"]), "scales differ"
    assert recv_x.shape == (rows, HIDDEN) and recv_x.dtype == expect.x_dtype
    assert _bytes_equal(recv_x[:n], e["x"]), "recv_x differs from the reference"
    assert isinstance(handle, openep.IntranodeHandle) and len(handle) == 6
    assert handle.is_token_in_rank is itir
    assert torch.equal(handle.rank_prefix_matrix[:, ctx.rank].cpu(), e["rank_prefix"])
    assert torch.equal(handle.recv_src_idx[:n].cpu(), e["src_idx"])
    assert torch.equal(handle.send_pos.cpu(), e["send_pos"])
    assert torch.equal(handle.num_tokens_per_src.cpu(),
                       torch.tensor([_num_tokens(s) for s in range(ctx.R)], dtype=torch.int32))
    if worst:
        assert per_expert == []
    else:
        assert per_expert == e["num_recv_tokens_per_expert"]
    if with_topk:
        assert recv_idx.shape == (rows, TOPK) and recv_w.dtype == torch.float32
        assert torch.equal(recv_idx[:n].cpu().to(torch.int64), e["topk_idx"])
        assert torch.equal(recv_w[:n].cpu(), e["topk_weights"])
        if worst:
            assert bool((recv_idx[n:] == -1).all()), "padded recv_topk_idx rows must be -1"
    else:
        assert recv_idx is None and recv_w is None


def run_and_check_combine(ctx, inputs, expect, handle, recv_w, seed, worst=0, with_topk=True, bias=True,
                          async_finish=False):
    torch = ctx.torch
    ys = []
    for d in range(ctx.R):
        g = torch.Generator().manual_seed(seed * 7919 + d)
        ys.append(torch.randn(expect.recv(d)["num_recv_tokens"], HIDDEN, generator=g).to(torch.bfloat16))
    e_w = [expect.recv(d)["topk_weights"] for d in range(ctx.R)] if with_topk else None
    want = ref.combine(expect, ys, e_w, bias_0=[i.bias[0] for i in inputs] if bias else None,
                       bias_1=[i.bias[1] for i in inputs] if bias else None)[ctx.rank]
    y = ys[ctx.rank].to(ctx.device)
    if worst:  # padded rows must be ignored: fill them with NaN
        pad = torch.full((worst - y.shape[0], HIDDEN), float("nan"), dtype=torch.bfloat16, device=ctx.device)
        y = torch.cat([y, pad])
    mine = inputs[ctx.rank]
    b = (mine.bias[0].to(ctx.device), mine.bias[1].to(ctx.device)) if bias else None
    combined, combined_w, event = ctx.buffer.combine(y, handle, topk_weights=recv_w if with_topk else None,
                                                     bias=b, async_finish=async_finish)
    if async_finish:
        with event:
            pass
    else:
        assert event.event is None
    assert combined.shape == (mine.x.shape[0], HIDDEN) and combined.dtype == torch.bfloat16
    assert _bytes_equal(combined, want[0]), "combined_x differs from the reference (bitwise)"
    if with_topk:
        assert torch.equal(combined_w.cpu(), want[1])
    else:
        assert combined_w is None


# ---------------------------------------------------------------------------------------------------------
# Cases (called by name from test_gpu.py)
def layout(ctx):
    torch = ctx.torch
    for seed, dt in ((1, torch.int64), (2, torch.int32)):
        inputs = make_inputs(ctx, seed, idx_dtype=dt)
        idx = inputs[ctx.rank].topk_idx.to(ctx.device)
        ntpr, ntprdma, ntpe, itir, ev = ctx.buffer.get_dispatch_layout(idx, EXPERTS)
        want = ref.get_dispatch_layout(inputs[ctx.rank].topk_idx, EXPERTS, ctx.R)
        assert ntprdma is None and want[1] is None
        assert ntpr.dtype == torch.int32 and ntpe.dtype == torch.int32 and itir.dtype == torch.bool
        assert torch.equal(ntpr.cpu(), want[0]) and torch.equal(ntpe.cpu(), want[2])
        assert torch.equal(itir.cpu(), want[3])
    # async form: event returned, current stream does not wait until asked
    _, _, ntpe, _, ev = ctx.buffer.get_dispatch_layout(idx, EXPERTS, async_finish=True)
    assert ev.event is not None
    ev.current_stream_wait()
    assert torch.equal(ntpe.cpu(), want[2])


def _dispatch_combine(ctx, seed, fp8, with_topk, async_finish, previous, idx_dtype=None):
    inputs = make_inputs(ctx, seed, fp8=fp8, idx_dtype=idx_dtype)
    expect = reference_dispatch(inputs, with_topk=with_topk)
    out, itir = run_dispatch(ctx, inputs, with_topk=with_topk, async_finish=async_finish, previous=previous)
    if idx_dtype is not None and with_topk:
        assert out[1].dtype == idx_dtype
    check_dispatch(ctx, out, itir, expect, with_topk=with_topk, fp8=fp8)
    run_and_check_combine(ctx, inputs, expect, out[4], out[2], seed, with_topk=with_topk,
                          async_finish=async_finish)


def dispatch_combine_bf16(ctx):
    seed = 10
    for with_topk in (True, False):
        for async_finish in (False, True):
            for previous in (False, True):
                seed += 1
                _dispatch_combine(ctx, seed, False, with_topk, async_finish, previous)


def dispatch_combine_fp8(ctx):
    seed = 30
    for with_topk in (True, False):
        for async_finish in (False, True):
            seed += 1
            _dispatch_combine(ctx, seed, True, with_topk, async_finish, previous=async_finish)


def dispatch_int32_topk(ctx):
    _dispatch_combine(ctx, 40, False, True, False, False, idx_dtype=ctx.torch.int32)


def dispatch_expert_alignment(ctx):
    inputs = make_inputs(ctx, 41)
    expect = reference_dispatch(inputs, alignment=8)
    out, itir = run_dispatch(ctx, inputs, alignment=8)
    assert all(v % 8 == 0 for v in out[3])
    check_dispatch(ctx, out, itir, expect)


def dispatch_worst_tokens(ctx):
    for fp8 in (False, True):
        inputs = make_inputs(ctx, 50 + fp8, fp8=fp8)
        expect = reference_dispatch(inputs)
        worst = inputs[ctx.rank].x.shape[0] * ctx.R
        out, itir = run_dispatch(ctx, inputs, worst=worst)
        check_dispatch(ctx, out, itir, expect, worst=worst, fp8=fp8)
        n = expect.recv(ctx.rank)["num_recv_tokens"]
        assert int(out[4].rank_prefix_matrix[ctx.R - 1, ctx.rank]) == n  # the real count stays on the GPU
        if not fp8:
            run_and_check_combine(ctx, inputs, expect, out[4], out[2], 52, worst=worst)


def dispatch_cached(ctx):
    torch = ctx.torch
    inputs = make_inputs(ctx, 60)
    expect = reference_dispatch(inputs)
    out, itir = run_dispatch(ctx, inputs)
    handle = out[4]
    # same routing, new data (BF16, then FP8 with scales): only x moves, the handle fixes the layout
    for fp8 in (False, True):
        new = make_inputs(ctx, 61 + fp8, fp8=fp8)
        for s in range(ctx.R):
            new[s].topk_idx, new[s].topk_weights = inputs[s].topk_idx, inputs[s].topk_weights
        want = reference_dispatch(new, with_topk=False).recv(ctx.rank)
        x, scales, _, _ = _to_gpu(ctx, new[ctx.rank])
        for async_finish in (False, True):
            res = ctx.buffer.dispatch((x, scales) if fp8 else x, handle=handle, async_finish=async_finish,
                                      previous_event=ctx.buffer.capture() if async_finish else None)
            assert res[1:5] == (None, None, None, None)
            if async_finish:
                res[5].current_stream_wait()
            recv = res[0]
            if fp8:
                recv, recv_scales = recv
                assert _bytes_equal(recv_scales, want["x_scales"])
            assert _bytes_equal(recv, want["x"])
    # the handle is unchanged and still combines correctly
    assert torch.equal(handle.recv_src_idx.cpu(), expect.recv(ctx.rank)["src_idx"])
    run_and_check_combine(ctx, inputs, expect, handle, out[2], 63, bias=False)
    # cached mode refuses top-k
    try:
        ctx.buffer.dispatch(x, handle=handle, topk_idx=_to_gpu(ctx, inputs[ctx.rank])[2])
        raise AssertionError("cached dispatch accepted topk_idx")
    except openep.OpenEPError as e:
        assert e.code == "invalid_argument"


def stream_current_stream_is_waited_for(ctx):
    """Without previous_event the comm stream waits for the CURRENT stream (here a side stream whose x is
    written only after a long device sleep)."""
    torch = ctx.torch
    inputs = make_inputs(ctx, 70)
    expect = reference_dispatch(inputs)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros(inputs[ctx.rank].x.shape, dtype=torch.bfloat16, device=ctx.device)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device time before x gets its value
        x.copy_(inputs[ctx.rank].x.to(ctx.device, non_blocking=True))
        idx = inputs[ctx.rank].topk_idx.to(ctx.device)
        w = inputs[ctx.rank].topk_weights.to(ctx.device)
        ntpr, _, ntpe, itir, _ = ctx.buffer.get_dispatch_layout(idx, EXPERTS)
        out = ctx.buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                                  topk_idx=idx, topk_weights=w)
        # non-async: the side stream now waits for the comm stream, so reading on it is safe
        check_dispatch(ctx, out, itir, expect)


def stream_previous_event_and_comm_allocation(ctx):
    """previous_event replaces the wait on the current stream; allocate_on_comm_stream allocates outputs with
    the comm stream current; async_finish returns an event the caller waits on (also in the `with` form)."""
    torch = ctx.torch
    inputs = make_inputs(ctx, 71)
    expect = reference_dispatch(inputs)
    b = ctx.buffer
    comm = b.get_comm_stream()
    assert isinstance(comm, torch.cuda.Stream) and comm.cuda_stream == b.runtime.comm_stream
    assert comm.device == torch.device(ctx.device)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros(inputs[ctx.rank].x.shape, dtype=torch.bfloat16, device=ctx.device)
        torch.cuda._sleep(200_000_000)
        x.copy_(inputs[ctx.rank].x.to(ctx.device, non_blocking=True))
        idx = inputs[ctx.rank].topk_idx.to(ctx.device)
        w = inputs[ctx.rank].topk_weights.to(ctx.device)
        produced = openep.Buffer.capture()  # recorded on the side stream
    ntpr, _, ntpe, itir, ev = b.get_dispatch_layout(idx, EXPERTS, previous_event=produced, async_finish=True,
                                                    allocate_on_comm_stream=True)
    out = b.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                     topk_idx=idx, topk_weights=w, previous_event=ev, async_finish=True,
                     allocate_on_comm_stream=True)
    out[-1].current_stream_wait()
    check_dispatch(ctx, out, itir, expect)
    # combine with the `with` form
    y = out[0]
    with b.combine(y, out[4], previous_event=b.capture(), async_finish=True,
                   allocate_on_comm_stream=True)[2] as event:
        assert event.event is not None
    torch.cuda.current_stream().synchronize()
    # allocate_on_comm_stream without previous_event/async_finish is refused (DeepEP rule)
    for kwargs in ({"allocate_on_comm_stream": True}, {"allocate_on_comm_stream": True, "async_finish": True}):
        try:
            b.get_dispatch_layout(idx, EXPERTS, **kwargs)
            raise AssertionError(f"accepted {kwargs}")
        except openep.OpenEPError as e:
            assert e.code == "invalid_argument" and "allocate_on_comm_stream" in str(e)


def errors_are_exceptions(ctx):
    torch = ctx.torch
    b = ctx.buffer
    inputs = make_inputs(ctx, 80)
    x, _, idx, w = _to_gpu(ctx, inputs[ctx.rank])
    ntpr, _, ntpe, itir, _ = b.get_dispatch_layout(idx, EXPERTS)

    def expect_error(code, needle, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except openep.OpenEPError as e:
            assert e.code == code, (e.code, str(e))
            assert needle in str(e), str(e)
            return e
        raise AssertionError(f"no error (expected {code}: {needle})")

    routing = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
    expect_error("invalid_argument", "dispatch: x expected 2-byte", b.dispatch, x.float(), **routing)
    expect_error("invalid_argument", "x must be contiguous", b.dispatch, x.t(), **routing)
    expect_error("invalid_argument", "topk_idx and topk_weights must be given together", b.dispatch, x,
                 topk_idx=idx, **routing)
    expect_error("invalid_argument", "is_token_in_rank expected shape", b.dispatch, x,
                 num_tokens_per_rank=ntpr, is_token_in_rank=itir[1:], num_tokens_per_expert=ntpe)
    expect_error("invalid_argument", "topk_idx expected on device", b.get_dispatch_layout, idx.cpu(), EXPERTS)
    expect_error("invalid_argument", "x_scales given", b.dispatch, (x, torch.ones(x.shape[0], 4, device=ctx.device)),
                 **routing)
    # errors found by the C++ core keep its message and code
    expect_error("invalid_argument", "num_experts", b.get_dispatch_layout, idx, EXPERTS + 1)
    expect_error("buffer_too_small", "num_nvl_bytes", b.dispatch, x, topk_idx=idx, topk_weights=w,
                 num_worst_tokens=10_000_000, **routing)
    # a combine with a wrong x shape
    out, itir = run_dispatch(ctx, inputs)
    expect_error("invalid_argument", "combine: x expected shape", b.combine, out[0][1:], out[4])
    expect_error("invalid_argument", "handle expected the 6-tuple", b.combine, out[0], out[4][:5])
    # the Buffer is still usable after argument errors
    check_dispatch(ctx, out, itir, reference_dispatch(inputs))


def errors_device_side_and_destroy(ctx):
    """An expert id out of range is found on the device and raised at the next synchronisation point; the
    Buffer then refuses further work. destroy() rules."""
    torch = ctx.torch
    nb = openep.Buffer(ctx.group, num_nvl_bytes=1 << 22, explicitly_destroy=True)
    bad = torch.full((16, TOPK), EXPERTS + 5, dtype=torch.int64, device=ctx.device)
    nb.get_dispatch_layout(bad, EXPERTS)
    try:
        nb.synchronize()
        raise AssertionError("bad expert id not reported")
    except openep.OpenEPError as e:
        assert e.code == "device_check" and "expert id" in str(e), str(e)
    try:
        nb.get_dispatch_layout(bad, EXPERTS)
        raise AssertionError("failed Buffer accepted work")
    except openep.OpenEPError as e:
        assert e.code == "buffer_failed", str(e)
    nb.destroy()
    assert nb.runtime is None
    try:
        nb.get_dispatch_layout(bad, EXPERTS)
        raise AssertionError("destroyed Buffer accepted work")
    except openep.OpenEPError as e:
        assert e.code == "invalid_argument" and "destroyed" in str(e)
    # destroy() requires explicitly_destroy=True (DeepEP rule); such a Buffer is released by the GC
    nb2 = openep.Buffer(ctx.group, num_nvl_bytes=1 << 22)
    try:
        nb2.destroy()
        raise AssertionError("destroy() accepted without explicitly_destroy")
    except openep.OpenEPError as e:
        assert e.code == "invalid_argument"
    del nb2
    import gc
    gc.collect()


def local_buffer_tensor(ctx):
    torch = ctx.torch
    b = ctx.buffer
    t = b.get_local_buffer_tensor(torch.int32)
    assert t.is_cuda and t.dtype == torch.int32 and t.numel() == b.num_nvl_bytes // 4
    v = b.get_local_buffer_tensor(torch.bfloat16, torch.Size([4, 8]), offset=256)
    assert v.shape == (4, 8) and v.data_ptr() == t.data_ptr() + 256
    v.fill_(1.5)
    assert float(v.float().sum()) == 48.0
    torch.cuda.synchronize()
    try:
        b.get_local_buffer_tensor(torch.int32, offset=b.num_nvl_bytes + 4)
        raise AssertionError("offset past the region accepted")
    except openep.OpenEPError as e:
        assert e.code == "invalid_argument"


def low_latency_not_available(ctx):
    for call in (lambda: ctx.buffer.low_latency_dispatch(None, None, 128, EXPERTS),
                 lambda: ctx.buffer.clean_low_latency_buffer(128, HIDDEN, EXPERTS)):
        try:
            call()
            raise AssertionError("low-latency call did not raise")
        except NotImplementedError as e:
            assert isinstance(e, openep.OpenEPNotAvailableError) and "not available yet" in str(e)


def moe_layer_end_to_end(ctx):
    """A small MoE layer written against the DeepEP V1 API (router, dispatch, per-expert matmul, combine) equals
    the same layer computed densely on one GPU without communication."""
    import openep as deep_ep
    torch = ctx.torch
    H, E, K, N = 256, 8, 2, 96
    E_local = E // ctx.R
    g = torch.Generator().manual_seed(1234)  # same weights on every rank
    router = (torch.randn(H, E, generator=g) / H ** 0.5).to(ctx.device)
    experts = (torch.randn(E, H, H, generator=g) / H ** 0.5).to(torch.bfloat16).to(ctx.device)
    gx = torch.Generator().manual_seed(99 + ctx.rank)
    x = torch.randn(N, H, generator=gx).to(torch.bfloat16).to(ctx.device)

    # router
    probs = torch.softmax(x.float() @ router, dim=-1)
    topk_weights, topk_idx = probs.topk(K, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)

    # DeepEP-style dispatch
    buffer = ctx.buffer
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, E)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, config=deep_ep.Buffer.get_dispatch_config(ctx.R))
    assert sum(num_recv_tokens_per_expert_list) == int((recv_topk_idx >= 0).sum())

    # experts: each received row, weighted per local expert
    y = torch.zeros(recv_x.shape, dtype=torch.float32, device=ctx.device)
    for le in range(E_local):
        sel = recv_topk_idx == le
        rows = sel.any(dim=1)
        if not bool(rows.any()):
            continue
        w = (recv_topk_weights * sel).sum(dim=1)[rows]
        y[rows] += w[:, None] * (recv_x[rows] @ experts[ctx.rank * E_local + le]).float()
    combined_x, _, event = buffer.combine(y.to(torch.bfloat16), handle,
                                          config=deep_ep.Buffer.get_combine_config(ctx.R))

    # single-GPU reference of the same layer
    want = torch.zeros(N, H, dtype=torch.float32, device=ctx.device)
    for k in range(K):
        for e in range(E):
            rows = topk_idx[:, k] == e
            if bool(rows.any()):
                want[rows] += topk_weights[rows, k, None] * (x[rows] @ experts[e]).float()
    diff = (combined_x.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert diff <= 0.02 * scale, f"MoE output differs: max |diff| {diff} vs max |ref| {scale}"
    num = 2 * (combined_x.double() * want.double()).sum()
    den = (combined_x.double() ** 2 + want.double() ** 2).sum()
    assert 1 - float(num / den) < 1e-4


def torch_group_undisturbed(ctx):
    """OpenEP runs on its own NCCL communicator: the torch group keeps working between and around OpenEP calls,
    and a second Buffer on the same group coexists with the first."""
    import torch.distributed as dist
    torch = ctx.torch
    t = torch.full((1024,), float(ctx.rank + 1), device=ctx.device)
    dist.all_reduce(t, group=ctx.group)
    assert bool((t == sum(range(1, ctx.R + 1))).all())
    inputs = make_inputs(ctx, 90)
    expect = reference_dispatch(inputs)
    other = openep.Buffer(ctx.group, num_nvl_bytes=ctx.buffer.num_nvl_bytes, explicitly_destroy=True)
    try:
        out, itir = run_dispatch(ctx, inputs)
        t2 = torch.arange(16, device=ctx.device, dtype=torch.float32) * (ctx.rank + 1)
        dist.all_reduce(t2, group=ctx.group)
        check_dispatch(ctx, out, itir, expect)
        saved, ctx.buffer = ctx.buffer, other
        try:
            out2, itir2 = run_dispatch(ctx, inputs)
            check_dispatch(ctx, out2, itir2, expect)
        finally:
            ctx.buffer = saved
        assert torch.equal(t2.cpu(), torch.arange(16, dtype=torch.float32) * sum(range(1, ctx.R + 1)))
    finally:
        other.destroy()
    dist.barrier(group=ctx.group)
