"""Megatron-LM's DeepEP call pattern (the "flex" token dispatcher with the deepep backend), replayed through
``import deep_ep`` and checked against openep.reference. RUN on 2 fake nodes on one H200
(86e625e, 2026-12-02: internode normal mode; the decode part skips there); NOT YET RUN on 2 real GPUs.

What it follows (read in NVIDIA/Megatron-LM, megatron/core/transformer/moe/):
  * token_dispatcher.py, _DeepepManager: __init__ calls set_deepep_num_sms(20) (Buffer.set_num_sms);
    setup_metadata turns router probabilities into (token_probs, token_indices) with torch.topk and masks dropped
    tokens (probability 0) with -1; dispatch() / combine() call fused_dispatch / fused_combine.
  * fused_a2a.py: get_buffer() sizes the Buffer with DeepEP's Config hints (max over get_dispatch_config and
    get_combine_config of get_nvl/rdma_buffer_size_hint(hidden_bytes, group size)) and reuses it while it is big
    enough (checks buffer.group, num_nvl_bytes, num_rdma_bytes); FusedDispatch (autograd.Function): forward =
    get_dispatch_layout + dispatch with previous_event = EventOverlap(EventHandle()) when async_finish (else None),
    the layout's event handed on to dispatch, after_event.current_stream_wait() when async; backward = combine of
    the gradient with topk_weights = grad of the probabilities. FusedCombine: forward = combine without weights;
    backward = cached dispatch of the gradient through the saved handle.
This script writes its own autograd Functions with that call sequence (not Megatron's code), runs forward and
backward for async_finish / allocate_on_comm_stream = (False, False), (True, False), (True, True), and compares
forward outputs and both gradients bit for bit with the reference. The 'expert' is y = 2 * recv_x (exact in BF16).

In a fake-node world (--ranks-per-node 1) normal mode is internode mode; DeepEP's hint gives num_rdma_bytes = 0
for 2 ranks (it assumes <= 8 ranks are one node), so the Buffer then takes the larger of that and OpenEP's
Buffer.get_internode_buffer_size_hint (a deviation from Megatron, printed).

    python3 tools/launch.py --nproc 2 -- python3 tests/python/engines/megatron_pattern.py
    python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 -- python3 tests/python/engines/megatron_pattern.py
Exits 0 when every check passes on this rank, 1 otherwise (2: deep_ep not importable).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

T, H, K, E = 96, 2048, 4, 16   # tokens per rank (rank r sends T + 24 r), hidden, top-k, experts
NUM_SMS = 20                   # Megatron: moe_flex_dispatcher_num_sms unset -> 20

_buffer = None                 # one Buffer per process, as fused_a2a.get_buffer keeps it


def get_buffer(deep_ep, world, group, hidden_bytes, notes):
    """fused_a2a.get_buffer's sizing and reuse rule (plus the fake-node deviation)."""
    global _buffer
    Buffer = deep_ep.Buffer
    R = group.size()
    nvl, rdma = C.deepep_style_buffer_bytes((Buffer.get_dispatch_config(R), Buffer.get_combine_config(R)),
                                            hidden_bytes, R)
    if world.internode and rdma == 0:
        inl, ird = Buffer.get_internode_buffer_size_hint(R, world.ranks_per_node, T + 24 * (R - 1), H, 2, 0, K)
        if not notes:
            notes.append(f"fake nodes: DeepEP's hint gives num_rdma_bytes=0 for {R} ranks; using OpenEP's internode "
                         f"hint ({inl}, {ird}) where larger")
        nvl, rdma = max(nvl, inl), max(rdma, ird)
    if _buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < nvl or _buffer.num_rdma_bytes < rdma:
        _buffer = Buffer(group, nvl, rdma)
    return _buffer


def make_functions(torch, deep_ep, world, group, notes):
    EventOverlap, EventHandle = deep_ep.utils.EventOverlap, deep_ep.utils.EventHandle

    def hidden_bytes(x):
        return x.size(1) * max(x.element_size(), 2)

    class Dispatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, token_indices, token_probs, num_experts, async_finish, allocate_on_comm_stream):
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            buffer = get_buffer(deep_ep, world, group, hidden_bytes(x), notes)
            per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
                token_indices, num_experts, previous_event=previous_event, async_finish=async_finish,
                allocate_on_comm_stream=allocate_on_comm_stream)
            recv_x, recv_idx, recv_probs, per_expert_list, handle, after = buffer.dispatch(
                x, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=per_rank,
                num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                previous_event=event, async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after.current_stream_wait()
            ctx.handle, ctx.async_finish, ctx.allocate = handle, async_finish, allocate_on_comm_stream
            return recv_x, recv_idx, recv_probs, torch.tensor(per_expert_list), handle

        @staticmethod
        def backward(ctx, grad_out, grad_idx, grad_probs, grad_counts, grad_handle):
            buffer = get_buffer(deep_ep, world, group, hidden_bytes(grad_out), notes)
            previous_event = EventOverlap(EventHandle()) if ctx.async_finish else None
            grad_x, grad_token_probs, after = buffer.combine(
                grad_out.contiguous(), ctx.handle, topk_weights=grad_probs.float(), previous_event=previous_event,
                async_finish=ctx.async_finish, allocate_on_comm_stream=ctx.allocate)
            if ctx.async_finish:
                after.current_stream_wait()
            return grad_x, None, grad_token_probs, None, None, None

    class Combine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, handle, async_finish, allocate_on_comm_stream):
            previous_event = EventOverlap(EventHandle()) if async_finish else None
            buffer = get_buffer(deep_ep, world, group, hidden_bytes(x), notes)
            combined, _, after = buffer.combine(x, handle=handle, async_finish=async_finish,
                                                previous_event=previous_event,
                                                allocate_on_comm_stream=allocate_on_comm_stream)
            if async_finish:
                after.current_stream_wait()
            ctx.handle, ctx.async_finish, ctx.allocate = handle, async_finish, allocate_on_comm_stream
            return combined

        @staticmethod
        def backward(ctx, grad_out):
            previous_event = EventOverlap(EventHandle()) if ctx.async_finish else None
            buffer = get_buffer(deep_ep, world, group, hidden_bytes(grad_out), notes)
            grad_x, _, _, _, _, after = buffer.dispatch(grad_out.contiguous(), handle=ctx.handle,
                                                        previous_event=previous_event, async_finish=ctx.async_finish,
                                                        allocate_on_comm_stream=ctx.allocate)
            if ctx.async_finish:
                after.current_stream_wait()
            return grad_x, None, None, None

    return Dispatch, Combine


def inputs(torch, R, seed):
    """Every rank's (x, token_indices, token_probs), as _DeepepManager.setup_metadata makes them."""
    out = []
    for s in range(R):
        g = torch.Generator().manual_seed(seed * 1000 + s)
        x = C.hidden_rows(g, T + 24 * s, H, blocky=False)
        idx, probs_k, _ = C.routing(g, x.shape[0], E, K)   # topk of softmax probs; dropped slots -1 with prob 0
        out.append((x, idx, probs_k))
    return out


def main():
    deep_ep = C.import_deep_ep()
    import torch
    import torch.distributed as dist

    from openep import reference
    world = C.init_world()
    rank, R, M = world.rank, world.world_size, world.ranks_per_node
    rpn = M if world.internode else None
    dev = torch.device("cuda", world.local_rank)
    group = dist.group.WORLD
    chk = C.Checks(rank, f"megatron pattern on {world.describe()}")
    notes = []

    chk.begin("set_deepep_num_sms(20) = Buffer.set_num_sms")
    deep_ep.Buffer.set_num_sms(NUM_SMS)
    chk.expect(deep_ep.Buffer.num_sms == NUM_SMS, "Buffer.num_sms is 20")
    chk.expect(getattr(deep_ep.Buffer.get_dispatch_config(R), "num_sms", NUM_SMS) == NUM_SMS,
               "get_dispatch_config uses the new SM count")

    Dispatch, Combine = make_functions(torch, deep_ep, world, group, notes)
    first = None
    for step, (async_finish, allocate) in enumerate(((False, False), (True, False), (True, True))):
        chk.begin(f"step {step}: async_finish={async_finish} allocate_on_comm_stream={allocate}")
        ins = inputs(torch, R, 11 + step)
        xs, idxs, ws = [i[0] for i in ins], [i[1] for i in ins], [i[2] for i in ins]
        ref_d = reference.dispatch(xs, idxs, E, topk_weights=ws)
        want = ref_d.recv(rank)
        n = want["num_recv_tokens"]

        x = xs[rank].to(dev).requires_grad_(True)
        probs = ws[rank].to(dev).requires_grad_(True)
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = Dispatch.apply(
            x, idxs[rank].to(dev), probs, E, async_finish, allocate)
        buf = _buffer
        if first is None:
            first = buf
        chk.expect(buf is first, "get_buffer reuses the Buffer it made (same group, big enough)")
        chk.expect(C.bytes_equal(recv_x, want["x"]), "dispatch: recv_x equals the reference (bitwise)")
        chk.expect(recv_idx.dtype == torch.int64 and torch.equal(recv_idx.cpu(), want["topk_idx"]),
                   "dispatch: recv token_indices (local ids, -1 elsewhere) equal the reference")
        chk.expect(C.bytes_equal(recv_probs, want["topk_weights"]), "dispatch: recv token_probs equal the reference")
        chk.expect(tokens_per_expert.tolist() == want["num_recv_tokens_per_expert"],
                   "dispatch: tokens_per_expert equals the reference")

        y = recv_x * 2  # the 'expert'
        combined = Combine.apply(y, handle, async_finish, allocate)
        rows = [(ref_d.recv(d)["x"].float() * 2).to(torch.bfloat16) for d in range(R)]
        want_c = reference.combine(ref_d, rows, ranks_per_node=rpn)[rank][0]
        chk.expect(C.bytes_equal(combined, want_c), "combine: combined hidden states equal the reference (bitwise)")

        # backward: loss = sum(combined * G) + sum(recv_probs * P)  =>  d combined = G, d recv_probs = P
        Gs = [(torch.randn(xs[s].shape, generator=torch.Generator().manual_seed(500 + 10 * step + s)) * 0.25)
              .to(torch.bfloat16) for s in range(R)]
        Ps = [torch.rand(ref_d.recv(d)["num_recv_tokens"], K, generator=torch.Generator().manual_seed(700 + d))
              for d in range(R)]
        chk.expect(recv_probs.shape == (n, K), "recv_probs has [N_recv, K] rows")
        loss = (combined.float() * Gs[rank].to(dev).float()).sum() + (recv_probs * Ps[rank].to(dev)).sum()
        loss.backward()
        # Combine.backward = cached dispatch of G; then d recv_x = 2 * that; Dispatch.backward = combine with P
        cached = reference.dispatch(Gs, idxs, E, with_topk=False)
        grad_rows = [(cached.recv(d)["x"].float() * 2).to(torch.bfloat16) for d in range(R)]
        want_gx, want_gp = reference.combine(ref_d, grad_rows, topk_weights=Ps, ranks_per_node=rpn)[rank]
        chk.expect(x.grad is not None and C.bytes_equal(x.grad, want_gx),
                   "backward: grad of x (combine of the cached-dispatch gradient) equals the reference")
        chk.expect(probs.grad is not None and C.bytes_equal(probs.grad, want_gp),
                   "backward: grad of token_probs (combined topk_weights) equals the reference")
    for note in notes:
        print(f"[rank {rank}] note: {note}", flush=True)
    return C.finish(chk)


if __name__ == "__main__":
    sys.exit(main())
