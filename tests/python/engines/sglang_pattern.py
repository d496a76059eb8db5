"""SGLang's DeepEP call pattern (prefill in normal mode, decode in low-latency mode, one shared Buffer), replayed
through ``import deep_ep`` and checked against openep.reference. RUN on 2 fake nodes on one H200
(86e625e, 2026-12-02: internode normal mode; the decode part skips there); NOT YET RUN on 2 real GPUs.

What it follows (read in sgl-project/sglang, python/sglang/srt/layers/moe/token_dispatcher/deepep.py):
  * DeepEPConfig: --deepep-config JSON turned into ``Config(**normal_dispatch)`` / ``Config(**normal_combine)``
    (passed as ``config=`` to dispatch / combine), else None and ``num_sms = Buffer.num_sms``.
  * DeepEPBuffer.get_deepep_buffer (deepep_mode auto): num_nvl_bytes = max over the two configs (or
    get_dispatch_config / get_combine_config) of get_nvl_buffer_size_hint(hidden * param_bytes, group size);
    num_rdma_bytes = max(those rdma hints, get_low_latency_rdma_size_hint(T, hidden, group size, E));
    Buffer(group, nvl, rdma, low_latency_mode=True, num_qps_per_rank=max(num_sms, E / group size),
    allow_mnnvl=True). param_bytes is 1 for the FP8 (DeepGEMM) output dtype, which this script uses.
  * _DeepEPDispatcherImplNormal (prefill): topk_ids.to(int64); FP8 per-token-group quantization before dispatch
    (x becomes (x_fp8, scales)); previous_event = Buffer.capture() if async_finish else None;
    get_dispatch_layout(..., allocate_on_comm_stream=previous_event is not None); dispatch(..., previous_event =
    the layout's event, allocate_on_comm_stream = (event is not None) and async_finish, expert_alignment=128
    (DeepGEMM), config=...); event.current_stream_wait() if async_finish; combine(expert output, handle,
    previous_event=Buffer.capture() if async_finish else None, config=...) without topk_weights (SGLang weights
    the expert outputs itself).
  * set_dispatch_mode_as_low_latency: clean_low_latency_buffer(T, hidden, E) when coming from normal mode.
  * _DeepEPDispatcherImplLowLatency (decode): expected_m = (N * group_size * K + E) // E; low_latency_dispatch(x,
    topk_ids, T, E, use_fp8, async_finish=not hook, return_recv_hook=hook); then hook() or
    event.current_stream_wait(); low_latency_combine(x=..., topk_idx=..., topk_weights=..., handle=...,
    async_finish=not hook, return_recv_hook=hook) and the same wait. With two-batch overlap (hooks) two
    micro-batches are in flight.
Expert outputs: normal mode sends back the dequantized received rows (bit-exact on CPU and GPU), checked bitwise
against the reference combine and within a derived FP8 bound against the original rows; low-latency mode uses
deterministic rows per (expert, source rank, token).

In a fake-node world (--ranks-per-node 1) the Buffer is made as SGLang's --deepep-mode normal makes it
(low_latency_mode=False) and normal mode runs as internode mode; DeepEP's rdma hint is 0 for 2 ranks, so OpenEP's
internode hint is used where larger (printed); the decode part is SKIPPED with the reason.

    python3 tools/launch.py --nproc 2 -- python3 tests/python/engines/sglang_pattern.py
    python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 -- python3 tests/python/engines/sglang_pattern.py
Exits 0 when every check passes on this rank, 1 otherwise (2: deep_ep not importable).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

H, K, E = 2048, 8, 32          # hidden, top-k, experts (16 local experts on 2 ranks)
PREFILL_TOKENS = (200, 136)    # tokens per rank in prefill
T = 128                        # SGLANG_DEEPEP_NUM_MAX_DISPATCH_TOKENS_PER_RANK (decode batch bound)
PARAM_BYTES = 1                # FP8 output dtype (DeepGEMM)
DEEPEP_CONFIG = {              # what --deepep-config holds (normal_dispatch / normal_combine)
    "normal_dispatch": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 16, "num_max_nvl_chunked_recv_tokens": 256,
                        "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128},
    "normal_combine": {"num_sms": 24, "num_max_nvl_chunked_send_tokens": 6, "num_max_nvl_chunked_recv_tokens": 256,
                       "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128},
}


def make_buffer(deep_ep, world, group, dispatch_cfg, combine_cfg, num_sms, notes):
    Buffer = deep_ep.Buffer
    R = group.size()
    low_latency = not world.internode          # fake nodes: --deepep-mode normal
    nvl, rdma = C.deepep_style_buffer_bytes((dispatch_cfg or Buffer.get_dispatch_config(R),
                                             combine_cfg or Buffer.get_combine_config(R)), H * PARAM_BYTES, R)
    if low_latency:
        rdma = max(rdma, Buffer.get_low_latency_rdma_size_hint(T, H, R, E))
        qps = max(num_sms, E // R)
    else:
        qps = num_sms
        if rdma == 0:
            inl, ird = Buffer.get_internode_buffer_size_hint(R, world.ranks_per_node, max(PREFILL_TOKENS), H, 2,
                                                             H // 128, K)  # BF16 and FP8 prefill
            notes.append(f"fake nodes: deepep_mode normal; DeepEP's rdma hint is 0 for {R} ranks, using OpenEP's "
                         f"internode hint ({inl}, {ird}) where larger")
            nvl, rdma = max(nvl, inl), max(rdma, ird)
    return Buffer(group, nvl, rdma, low_latency_mode=low_latency, num_qps_per_rank=qps, allow_mnnvl=True)


def prefill(chk, torch, deep_ep, reference, buffer, world, dev, seed, async_finish, dispatch_cfg, combine_cfg, fp8,
            alignment):
    """One normal-mode dispatch (dispatch_a / dispatch_b) + combine (combine_a / combine_b)."""
    rank, R = world.rank, world.world_size
    rpn = world.ranks_per_node if world.internode else None
    Buffer = deep_ep.Buffer
    xs, idxs, ws, qs = [], [], [], []
    for s in range(R):
        g = torch.Generator().manual_seed(seed * 1000 + s)
        x = C.hidden_rows(g, PREFILL_TOKENS[s], H)
        idx, w, _ = C.routing(g, x.shape[0], E, K)
        xs.append(x), idxs.append(idx), ws.append(w)
        qs.append(C.per_token_group_quant_fp8(x) if fp8 else (x, None))
    ref_d = reference.dispatch([q[0] for q in qs], idxs, E, topk_weights=ws,
                               x_scales=[q[1] for q in qs] if fp8 else None, expert_alignment=alignment)
    want = ref_d.recv(rank)
    n = want["num_recv_tokens"]

    # dispatch_a
    topk_ids = idxs[rank].to(dev).to(torch.int64)
    topk_weights = ws[rank].to(dev)
    hidden_states = (qs[rank][0].to(dev), qs[rank][1].to(dev)) if fp8 else qs[rank][0].to(dev)
    previous_event = Buffer.capture() if async_finish else None
    # dispatch_b / _dispatch_core
    per_rank, per_rdma, per_expert, in_rank, previous_event = buffer.get_dispatch_layout(
        topk_ids, E, previous_event=previous_event, async_finish=async_finish,
        allocate_on_comm_stream=previous_event is not None)
    recv_x, recv_ids, recv_w, per_expert_list, handle, event = buffer.dispatch(
        hidden_states, topk_idx=topk_ids, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
        num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        previous_event=previous_event, async_finish=async_finish,
        allocate_on_comm_stream=(previous_event is not None) and async_finish, expert_alignment=alignment,
        config=dispatch_cfg)
    if async_finish:
        event.current_stream_wait()
    if isinstance(recv_x, tuple):
        recv_x, recv_scale = recv_x
    else:
        recv_scale = None
    lay = reference.get_dispatch_layout(idxs[rank], E, R, ranks_per_node=rpn)
    chk.expect(torch.equal(per_rank.cpu(), lay[0]) and torch.equal(per_expert.cpu(), lay[2]) and
               torch.equal(in_rank.cpu(), lay[3]), "get_dispatch_layout equals the reference")
    chk.expect((per_rdma is None) == (lay[1] is None) and (per_rdma is None or torch.equal(per_rdma.cpu(), lay[1])),
               "num_tokens_per_rdma_rank equals the reference (None on one node)")
    chk.expect(C.bytes_equal(recv_x, want["x"]), f"dispatch: recv hidden states ({'FP8' if fp8 else 'BF16'}) "
               f"equal the reference (bitwise)")
    if fp8:
        chk.expect(recv_scale is not None and C.bytes_equal(recv_scale, want["x_scales"]),
                   "dispatch: recv scales equal the reference")
    chk.expect(torch.equal(recv_ids.cpu().to(torch.int64), want["topk_idx"]), "dispatch: recv topk_ids")
    chk.expect(C.bytes_equal(recv_w, want["topk_weights"]), "dispatch: recv topk_weights")
    chk.expect(per_expert_list == want["num_recv_tokens_per_expert"] and
               all(c % alignment == 0 for c in per_expert_list),
               f"dispatch: num_recv_tokens_per_expert equals the reference (aligned to {alignment})")

    # the 'expert': the (dequantized) received rows, sent back unchanged
    output = C.dequant_rows(recv_x, recv_scale) if fp8 else recv_x.clone()
    rows = [(C.dequant_rows(ref_d.recv(d)["x"], ref_d.recv(d)["x_scales"]) if fp8 else ref_d.recv(d)["x"])
            for d in range(R)]
    # combine_a / combine_b / _combine_core
    previous_event = Buffer.capture() if async_finish else None
    combined, combined_w, event = buffer.combine(output, handle, async_finish=async_finish,
                                                 previous_event=previous_event,
                                                 allocate_on_comm_stream=previous_event is not None,
                                                 config=combine_cfg)
    if async_finish:
        event.current_stream_wait()
    want_c = reference.combine(ref_d, rows, ranks_per_node=rpn)[rank][0]
    chk.expect(combined_w is None, "combine without topk_weights returns None weights")
    chk.expect(C.bytes_equal(combined, want_c), "combine equals the reference (bitwise)")
    # independent check: combine(rows) ~= (ranks the token went to) * x
    count = lay[3].sum(dim=1, keepdim=True).float()
    x = xs[rank].float()
    if fp8:
        scale = qs[rank][1].repeat_interleave(128, dim=1)
        bound = C.fp8_sum_bound(x.abs(), scale, count)
    else:
        bound = count * x.abs() / 128
    err = (combined.cpu().float() - count * x).abs()
    chk.expect(bool((err <= bound).all()), f"combine is within the derived bound of (ranks reached) * x "
               f"(max err/bound {float((err / bound.clamp_min(1e-30)).max()):.3g})")
    return n


def decode(chk, torch, deep_ep, reference, buffer, world, dev, seed, use_fp8, hook, num_tokens):
    """Two micro-batches of low-latency decode as SGLang runs them (with hooks: both in flight)."""
    rank, R = world.rank, world.world_size
    batches = []
    for mb in range(2):
        xs, idxs, ws = [], [], []
        for s in range(R):
            g = torch.Generator().manual_seed((seed + mb) * 1000 + s)
            n = num_tokens[s] if mb == 0 else max(num_tokens[s] // 2, 1)
            xs.append(C.hidden_rows(g, n, H))
            idx, w, _ = C.routing(g, n, E, K)
            idxs.append(idx), ws.append(w)
        ref_ll = reference.low_latency_dispatch(xs, idxs, E, T, use_fp8=use_fp8, topk_weights=ws)
        batches.append((xs, idxs, ws, ref_ll))

    states = []
    for xs, idxs, ws, ref_ll in batches:  # dispatch_a of each micro-batch
        x, topk_ids, topk_w = xs[rank].to(dev), idxs[rank].to(dev).to(torch.int64), ws[rank].to(dev)
        em = C.expected_m(x.shape[0], buffer.group_size, topk_ids.shape[1], E)
        hidden, masked_m, handle, event, h = buffer.low_latency_dispatch(
            x, topk_ids, T, E, use_fp8=use_fp8, async_finish=not hook, return_recv_hook=hook)
        chk.expect(callable(h) if hook else (h is None and event.event is not None),
                   "low_latency_dispatch returns a hook (hook mode) or an event (async_finish)")
        states.append([x, topk_ids, topk_w, hidden, masked_m, handle, event, h, em])
        if not hook:  # without hooks SGLang finishes each micro-batch before the next
            event.current_stream_wait()
    for st, (_, _, _, ref_ll) in zip(states, batches):  # dispatch_b
        if hook:
            st[7]()
        src, rng = C.check_ll_dispatch(chk, f"decode dispatch (fp8={use_fp8}, hook={hook})", st[3], st[4], st[5],
                                       ref_ll, rank, use_fp8)
        chk.expect(st[8] == C.expected_m(st[0].shape[0], R, K, E), "expected_m")
        st.append(C.ll_expert_out(rank, R, T, H, E, src, rng).to(dev))
    combos = []
    for st in states:  # combine_a
        combined, event, h = buffer.low_latency_combine(x=st[9], topk_idx=st[1], topk_weights=st[2], handle=st[5],
                                                        async_finish=not hook, return_recv_hook=hook)
        combos.append((combined, event, h))
        if not hook:
            event.current_stream_wait()
    for (combined, event, h), (_, _, _, ref_ll) in zip(combos, batches):  # combine_b
        if hook:
            h()
        chk.expect(C.bytes_equal(combined, C.ll_expected_combine(reference, ref_ll, rank)),
                   f"decode combine (fp8={use_fp8}, hook={hook}) equals the reference (bitwise)")


def main():
    deep_ep = C.import_deep_ep()
    import torch
    import torch.distributed as dist

    from openep import reference
    from deep_ep import Buffer, Config  # what SGLang imports
    world = C.init_world()
    rank = world.rank
    dev = torch.device("cuda", world.local_rank)
    chk = C.Checks(rank, f"sglang pattern on {world.describe()}")
    notes = []

    chk.begin("DeepEPConfig from --deepep-config")
    dispatch_cfg = Config(**DEEPEP_CONFIG["normal_dispatch"])
    combine_cfg = Config(**DEEPEP_CONFIG["normal_combine"])
    num_sms = DEEPEP_CONFIG["normal_dispatch"]["num_sms"]
    chk.expect(getattr(dispatch_cfg, "num_sms", num_sms) == num_sms, "Config(**json) keeps num_sms")
    buffer = make_buffer(deep_ep, world, dist.group.WORLD, dispatch_cfg, combine_cfg, num_sms, notes)
    chk.expect(buffer.group_size == world.world_size, "Buffer.group_size")
    chk.expect(Buffer is deep_ep.Buffer, "from deep_ep import Buffer gives deep_ep.Buffer")

    for i, (async_finish, cfgs, fp8, align) in enumerate((
            (False, (dispatch_cfg, combine_cfg), True, 128),   # DeepGEMM FP8 prefill, configs from JSON
            (True, (dispatch_cfg, combine_cfg), True, 128),    # the same with async_finish (overlap)
            (False, (None, None), False, 1),                   # BF16 output dtype, default configs
            (True, (None, None), True, 1))):
        chk.begin(f"prefill {i}: normal mode async_finish={async_finish} fp8={fp8} expert_alignment={align} "
                  f"config={'json' if cfgs[0] is not None else 'default'}")
        prefill(chk, torch, deep_ep, reference, buffer, world, dev, 31 + i, async_finish, cfgs[0], cfgs[1], fp8,
                align)

    reason = C.low_latency_skip_reason(world)
    if reason:
        chk.skip(reason)
    else:
        chk.begin("switch to low-latency: clean_low_latency_buffer(T, hidden, E)")
        buffer.clean_low_latency_buffer(T, H, E)
        for i, (use_fp8, hook, ntok) in enumerate(((True, False, (128, 57)), (True, True, (64, 128)),
                                                   (False, True, (1, 0)), (False, False, (128, 128)))):
            chk.begin(f"decode {i}: low-latency use_fp8={use_fp8} return_recv_hook={hook} tokens={ntok}")
            decode(chk, torch, deep_ep, reference, buffer, world, dev, 61 + 2 * i, use_fp8, hook, ntok)
        chk.begin("back to prefill after decode (same Buffer)")
        prefill(chk, torch, deep_ep, reference, buffer, world, dev, 91, False, dispatch_cfg, combine_cfg, True, 128)
        chk.begin("decode again after prefill: clean_low_latency_buffer first")
        buffer.clean_low_latency_buffer(T, H, E)
        decode(chk, torch, deep_ep, reference, buffer, world, dev, 95, True, True, (100, 3))
    for note in notes:
        print(f"[rank {rank}] note: {note}", flush=True)
    return C.finish(chk)


if __name__ == "__main__":
    sys.exit(main())
