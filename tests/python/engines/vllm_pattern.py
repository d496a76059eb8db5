"""vLLM's DeepEP call pattern (the deepep_high_throughput and deepep_low_latency all2all backends), replayed
through ``import deep_ep`` and checked against openep.reference. RUN on 2 fake nodes on one H200
(86e625e, 2026-12-02: internode normal mode; the decode part skips there); NOT YET RUN on 2 real GPUs.

What it follows (read in vllm-project/vllm):
  * vllm/distributed/device_communicators/all2all.py: has_deep_ep() is ``importlib.util.find_spec("deep_ep")``.
    DeepEPHTAll2AllManager._make_all2all_kwargs / get_handle: Buffer(group=<the CPU (gloo) group>,
    num_nvl_bytes=VLLM_DEEPEP_BUFFER_SIZE_MB MiB, num_rdma_bytes=the same when internode else 0,
    low_latency_mode=False, num_qps_per_rank=num_sms // 2 internode else 1, explicitly_destroy=True);
    set_num_sms(n) calls Buffer.set_num_sms(min(n, 20)). DeepEPLLAll2AllManager: num_nvl_bytes as above,
    num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank=..., hidden=...,
    num_ranks=..., num_experts=...), low_latency_mode=True, num_qps_per_rank=local experts,
    allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=True, enable_shrink=False.
    destroy() calls destroy() on every cached Buffer.
  * vllm/model_executor/layers/fused_moe/prepare_finalize/deepep_ht.py (DeepEPHTPrepareAndFinalize): block-FP8
    models quantize before dispatch (x = (x_fp8, scales)); get_dispatch_layout(topk_idx=..., num_experts=...,
    previous_event=None, async_finish=False, allocate_on_comm_stream=False); dispatch(x=..., handle=None, ...,
    expert_alignment=1, config=Buffer.get_dispatch_config(R), previous_event=None, async_finish=True,
    allocate_on_comm_stream=False); the receiver waits when ``event.event is not None``, remaps the received
    local topk ids to global ones (-1 -> E-1 on rank 0, else 0); finalize applies the top-k weights on the
    receiving side (weighted sum over the K slots) and combines with topk_weights=None,
    config=get_combine_config(R), async_finish=do_async, then output.copy_(combined_x).
  * .../prepare_finalize/deepep_ll.py (DeepEPLLPrepareAndFinalize): hidden size from its supported list (2048);
    low_latency_dispatch(a1, topk_ids, max_tokens_per_rank, E, use_fp8=..., round_scale=use_ue8m0,
    use_ue8m0=use_ue8m0, async_finish=False, return_recv_hook=True), then hook(); FP8 with block 128 is used as
    (x, scales) (other block shapes are dequantized: dequant_fp8); finalize: low_latency_combine(out_of_experts,
    topk_ids, topk_weights, handle, async_finish=False, zero_copy=False, return_recv_hook=do_async, out=output)
    and the hook when one is returned. Two micro-batches (dual-batch overlap) keep one handle each.
Outputs given as ``out=`` (low-latency combine) or copied into (HT finalize) are pre-filled with NaN.

In a fake-node world (--ranks-per-node 1) the HT Buffer is built as vLLM builds an internode one (RDMA bytes too,
exactly its rule) and normal mode runs as internode mode; the low-latency part is SKIPPED with the reason.

    python3 tools/launch.py --nproc 2 -- python3 tests/python/engines/vllm_pattern.py
    python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 -- python3 tests/python/engines/vllm_pattern.py
VLLM_DEEPEP_BUFFER_SIZE_MB (default 1024, vLLM's default) sizes num_nvl_bytes as in vLLM.
Exits 0 when every check passes on this rank, 1 otherwise (2: deep_ep not importable).
"""
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

H, K, E = 2048, 8, 32           # hidden (in DeepEPLLPrepareAndFinalize.SUPPORTED_HIDDEN_SIZES), top-k, experts
HT_TOKENS = (160, 99)           # prefill tokens per rank (HT)
T = 128                         # max_num_tokens_per_dp_rank (LL)
NUM_SMS = 20                    # DeepEPAll2AllManagerBase.num_sms
BUFFER_MB = int(os.environ.get("VLLM_DEEPEP_BUFFER_SIZE_MB", "1024"))


class HandleCache:
    """vLLM's Cache: one Buffer per kwargs."""

    def __init__(self):
        self._cache = {}

    def get_or_create(self, kwargs, func):
        key = tuple(sorted((k, id(v) if k == "group" else v) for k, v in kwargs.items()))
        if key not in self._cache:
            self._cache[key] = func(**kwargs)
        return self._cache[key]

    def destroy(self):
        for handle in self._cache.values():
            handle.destroy()
        self._cache.clear()


def weighted_reduce(torch, x, w):
    """TopKWeightAndReduceContiguous with identity experts: sum over the K slots of w_k * x, in float32, one
    elementwise multiply and add per slot (correctly rounded on CPU and GPU alike), then BF16."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xf = x.float()
    for k in range(w.shape[1]):
        t = w[:, k:k + 1] * xf
        acc = acc + t
    return acc.to(torch.bfloat16)


def ht_round(chk, torch, deep_ep, reference, buffer, world, dev, seed, block_fp8, do_async):
    rank, R = world.rank, world.world_size
    rpn = world.ranks_per_node if world.internode else None
    El = E // R
    offset = rank * El
    xs, idxs, ws, qs = [], [], [], []
    for s in range(R):
        g = torch.Generator().manual_seed(seed * 1000 + s)
        x = C.hidden_rows(g, HT_TOKENS[s], H)
        idx, w, _ = C.routing(g, x.shape[0], E, K)
        xs.append(x), idxs.append(idx), ws.append(w)
        qs.append(C.per_token_group_quant_fp8(x) if block_fp8 else (x, None))
    ref_d = reference.dispatch([q[0] for q in qs], idxs, E, topk_weights=ws,
                               x_scales=[q[1] for q in qs] if block_fp8 else None)
    want = ref_d.recv(rank)

    # prepare_async / _do_dispatch
    topk_ids, topk_weights = idxs[rank].to(dev), ws[rank].to(dev)
    tokens, token_scales = qs[rank][0].to(dev), (qs[rank][1].to(dev) if block_fp8 else None)
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(
        topk_idx=topk_ids, num_experts=E, previous_event=None, async_finish=False, allocate_on_comm_stream=False)
    token_data = (tokens, token_scales) if token_scales is not None else tokens
    token_data, recv_ids, recv_w, per_expert_list, handle, event = buffer.dispatch(
        x=token_data, handle=None, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_ids, topk_weights=topk_weights,
        expert_alignment=1, config=deep_ep.Buffer.get_dispatch_config(R), previous_event=None, async_finish=True,
        allocate_on_comm_stream=False)
    # _receiver
    chk.expect(event.event is not None, "dispatch(async_finish=True) returns an event")
    if event.event is not None:
        event.current_stream_wait()
    expert_x, expert_x_scale = token_data if block_fp8 else (token_data, None)
    chk.expect(C.bytes_equal(expert_x, want["x"]), f"dispatch: recv x ({'block FP8' if block_fp8 else 'BF16'}) "
               "equals the reference (bitwise)")
    if block_fp8:
        chk.expect(C.bytes_equal(expert_x_scale, want["x_scales"]), "dispatch: recv block scales")
    chk.expect(C.bytes_equal(recv_w, want["topk_weights"]), "dispatch: recv topk_weights")
    global_ids = torch.where(recv_ids == -1, E - 1 if offset == 0 else 0, recv_ids + offset)
    want_ids = want["topk_idx"]
    want_global = torch.where(want_ids == -1, E - 1 if offset == 0 else 0, want_ids + offset)
    chk.expect(torch.equal(global_ids.cpu(), want_global), "dispatch: remapped global topk ids equal the reference's")
    chk.expect(torch.equal(torch.tensor(per_expert_list, dtype=torch.int32),
                           torch.tensor(want["num_recv_tokens_per_expert"], dtype=torch.int32)),
               "dispatch: expert_num_tokens (from the list) equals the reference")

    # experts (identity on the dequantized rows) + TopKWeightAndReduceContiguous, then _finalize
    rows_gpu = C.dequant_rows(expert_x, expert_x_scale) if block_fp8 else expert_x
    fused_expert_output = weighted_reduce(torch, rows_gpu, recv_w)
    output = torch.full((HT_TOKENS[rank], H), float("nan"), dtype=torch.bfloat16, device=dev)
    combined_x, _, event = buffer.combine(x=fused_expert_output, handle=handle, topk_weights=None,
                                          config=deep_ep.Buffer.get_combine_config(R), previous_event=None,
                                          async_finish=do_async, allocate_on_comm_stream=False)
    if do_async:
        chk.expect(event.event is not None, "combine(async_finish=True) returns an event")
        if event.event is not None:
            event.current_stream_wait()
    output.copy_(combined_x, non_blocking=True)
    rows = []
    for d in range(R):
        r = ref_d.recv(d)
        deq = C.dequant_rows(r["x"], r["x_scales"]) if block_fp8 else r["x"]
        rows.append(weighted_reduce(torch, deq, r["topk_weights"]))
    want_c = reference.combine(ref_d, rows, ranks_per_node=rpn)[rank][0]
    chk.expect(C.bytes_equal(output, want_c), f"finalize (async={do_async}): output equals the reference combine "
               "(bitwise)")


def ll_round(chk, torch, deep_ep, reference, buffer, world, dev, seed, use_fp8, use_ue8m0, do_async, ntok, ubatches):
    rank, R = world.rank, world.world_size
    El = E // R
    what = f"LL fp8={use_fp8} ue8m0={use_ue8m0} async={do_async}"
    rounds = []
    for ub in range(ubatches):
        xs, idxs, ws = [], [], []
        for s in range(R):
            g = torch.Generator().manual_seed((seed + ub) * 1000 + s)
            n = ntok[s] if ub == 0 else max(ntok[s] - 17, 0)
            xs.append(C.hidden_rows(g, n, H))
            idx, w, _ = C.routing(g, n, E, K)
            idxs.append(idx), ws.append(w)
        ref_ll = reference.low_latency_dispatch(xs, idxs, E, T, use_fp8=use_fp8, round_scale=use_ue8m0,
                                                use_ue8m0=use_ue8m0, topk_weights=ws)
        rounds.append((xs, idxs, ws, ref_ll))
    handles, receivers = [None] * ubatches, []
    for ub, (xs, idxs, ws, ref_ll) in enumerate(rounds):  # prepare_async of each micro-batch
        a1, topk_ids = xs[rank].to(dev), idxs[rank].to(dev)
        expert_x, expert_num_tokens, handle, _, hook = buffer.low_latency_dispatch(
            a1, topk_ids, T, E, use_fp8=use_fp8, round_scale=use_ue8m0, use_ue8m0=use_ue8m0, async_finish=False,
            return_recv_hook=True)
        handles[ub] = handle
        receivers.append((hook, expert_x, expert_num_tokens))
    # receive every micro-batch, then combine each (send 0, send 1, receive 0, receive 1; the combines the same
    # way): the two-in-flight order OpenEP's low-latency tests run
    placed = []
    for ub, ((hook, expert_x, expert_num_tokens), (xs, idxs, ws, ref_ll)) in enumerate(zip(receivers, rounds)):
        hook()
        src, rng = C.check_ll_dispatch(chk, f"{what} ubatch {ub}: dispatch", expert_x, expert_num_tokens,
                                       handles[ub], ref_ll, rank, use_fp8, use_ue8m0)
        if use_fp8 and not use_ue8m0:  # what _do_quant's dequant_fp8 computes for other block shapes
            x_fp8, scales = expert_x
            deq = (x_fp8.to(torch.float32).view(El, -1, 128) * scales.contiguous().view(El, -1, 1)).view(x_fp8.size())
            deq = deq.cpu()
            bad = 0
            for i in range(El):
                perm = C.ll_canonical_rows(src, rng, i, R)
                if perm.numel() == 0:
                    continue
                srcs = torch.cat([torch.full((c,), s) for s, (_, c) in enumerate(C.ll_ranges(rng, i, R))])
                x = torch.stack([xs[int(s)][int(t)] for s, t in zip(srcs, src[i, perm])]).float()
                sc = scales.cpu()[i][perm].float().repeat_interleave(128, dim=1)
                bad += int(((deq[i, perm] - x).abs() > C.fp8_dequant_bound(x.abs(), sc)).sum())
            chk.expect(bad == 0, f"{what} ubatch {ub}: dequant_fp8 of the received rows is within the FP8 bound of "
                       f"the source rows ({bad} elements outside)")
        placed.append(C.ll_expert_out(rank, R, T, H, E, src, rng).to(dev))
    outs = []
    for ub, (y, (xs, idxs, ws, ref_ll)) in enumerate(zip(placed, rounds)):  # finalize(_async)
        output = torch.full((xs[rank].shape[0], H), float("nan"), dtype=torch.bfloat16, device=dev)
        _, _, recv_hook = buffer.low_latency_combine(y, idxs[rank].to(dev), ws[rank].to(dev), handles[ub],
                                                     async_finish=False, zero_copy=False, return_recv_hook=do_async,
                                                     out=output)
        chk.expect((recv_hook is not None) == do_async, f"{what}: combine returns a hook only when asked")
        if not do_async:
            chk.expect(C.bytes_equal(output, C.ll_expected_combine(reference, ref_ll, rank)),
                       f"{what} ubatch {ub}: combine into out= equals the reference (bitwise)")
        outs.append((output, recv_hook))
    for ub, ((output, recv_hook), (_, _, _, ref_ll)) in enumerate(zip(outs, rounds)):
        if recv_hook is None:
            continue
        recv_hook()
        chk.expect(C.bytes_equal(output, C.ll_expected_combine(reference, ref_ll, rank)),
                   f"{what} ubatch {ub}: combine into out= equals the reference (bitwise)")


def main():
    if importlib.util.find_spec("deep_ep") is None:  # vLLM's has_deep_ep()
        print(C.DEEP_EP_MISSING, file=sys.stderr, flush=True)
        return 2
    deep_ep = C.import_deep_ep()
    import torch
    import torch.distributed as dist

    from openep import reference
    world = C.init_world()
    rank, R = world.rank, world.world_size
    dev = torch.device("cuda", world.local_rank)
    cpu_group = dist.new_group(list(range(R)), backend="gloo")  # vLLM passes its CPU group
    chk = C.Checks(rank, f"vllm pattern on {world.describe()}")
    ht_cache, ll_cache = HandleCache(), HandleCache()

    chk.begin("DeepEPHTAll2AllManager: set_num_sms(24) -> Buffer.set_num_sms(min(24, 20))")
    deep_ep.Buffer.set_num_sms(min(24, NUM_SMS))
    chk.expect(getattr(deep_ep.Buffer.get_dispatch_config(R), "num_sms", NUM_SMS) == NUM_SMS, "num_sms is 20")
    internode = world.internode
    ht_kwargs = dict(group=cpu_group, num_nvl_bytes=BUFFER_MB * 1024 * 1024,
                     num_rdma_bytes=BUFFER_MB * 1024 * 1024 if internode else 0, low_latency_mode=False,
                     num_qps_per_rank=NUM_SMS // 2 if internode else 1, explicitly_destroy=True)
    ht = ht_cache.get_or_create(ht_kwargs, deep_ep.Buffer)
    chk.expect(ht_cache.get_or_create(ht_kwargs, deep_ep.Buffer) is ht, "the cache returns the same Buffer")
    for i, (block_fp8, do_async) in enumerate(((False, False), (False, True), (True, True), (True, False))):
        chk.begin(f"HT round {i}: block_fp8={block_fp8} finalize_async={do_async}")
        ht_round(chk, torch, deep_ep, reference, ht, world, dev, 41 + i, block_fp8, do_async)
    chk.begin("HT manager destroy()")
    ht_cache.destroy()
    chk.expect(ht.runtime is None, "destroy() released the HT Buffer")

    reason = C.low_latency_skip_reason(world)
    if reason:
        chk.skip(reason)
    else:
        chk.begin("DeepEPLLAll2AllManager: Buffer sized by get_low_latency_rdma_size_hint")
        ll_kwargs = dict(group=cpu_group, num_nvl_bytes=BUFFER_MB * 1024 * 1024,
                         num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(
                             num_max_dispatch_tokens_per_rank=T, hidden=H, num_ranks=R, num_experts=E),
                         low_latency_mode=True, num_qps_per_rank=E // R, allow_nvlink_for_low_latency_mode=True,
                         allow_mnnvl=False, explicitly_destroy=True, enable_shrink=False)
        ll = ll_cache.get_or_create(ll_kwargs, deep_ep.Buffer)
        for i, (use_fp8, ue8m0, do_async, ntok, ub) in enumerate((
                (False, False, False, (128, 40), 1), (True, False, True, (77, 128), 1),
                (True, True, False, (128, 128), 1), (True, False, True, (96, 50), 2), (False, False, True, (0, 5), 2))):
            chk.begin(f"LL round {i}: use_fp8={use_fp8} use_ue8m0={ue8m0} finalize_async={do_async} tokens={ntok} "
                      f"ubatches={ub}")
            ll_round(chk, torch, deep_ep, reference, ll, world, dev, 71 + 3 * i, use_fp8, ue8m0, do_async, ntok, ub)
        chk.begin("LL manager destroy()")
        ll_cache.destroy()
        chk.expect(ll.runtime is None, "destroy() released the LL Buffer")
    return C.finish(chk)


if __name__ == "__main__":
    sys.exit(main())
