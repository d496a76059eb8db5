"""DeepEP-style Python code over internode normal mode in a fake-node world, checked against openep.reference.

Ran on 1x H200, 2 fake nodes x 1 (2026-12-01, ef6e5bb): ok. Start it through the launcher, which gives every fake node its own NCCL_HOSTID before torch initialises NCCL:

    python3 tools/launch.py --nproc 2 --ranks-per-node 1 --min-gpus 1 -- python3 tests/python/fakenode_internode.py

What it does on every rank: DeepEP's runtime queries (get_num_rdma_ranks, get_rdma_rank, ...), get_dispatch_layout
(num_tokens_per_rdma_rank per node), dispatch (exact), combine (the received rows back: equals
openep.reference.combine with ranks_per_node), a cached dispatch of new data as the backward pass, and a
worst-case dispatch. Exits 0 when every check passes, 1 otherwise.
"""
import os
import sys

import torch
import torch.distributed as dist

import openep
from openep import reference


def group_limited_routing(gen, T, K, R, M, El, groups=4):
    N = R // M
    G = min(N, groups)
    topk = torch.full((T, K), -1, dtype=torch.int64)
    for t in range(T):
        nodes = torch.randperm(N, generator=gen)[:G]
        pool = torch.cat([torch.arange(int(n) * M * El, (int(n) + 1) * M * El) for n in nodes])
        take = min(K, pool.numel())
        topk[t, :take] = pool[torch.randperm(pool.numel(), generator=gen)[:take]]
    return topk


def inputs(R, M, T, H, K, E, seed):
    xs, topks, ws = [], [], []
    for r in range(R):
        gen = torch.Generator().manual_seed(seed * 1000 + r)
        xs.append((torch.randn((T, H), generator=gen) * 0.5).to(torch.bfloat16))
        topks.append(group_limited_routing(gen, T, K, R, M, E // R))
        ws.append(torch.rand((T, K), generator=gen))
    return xs, topks, ws


def main():
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    M = int(os.environ.get("OPENEP_RANKS_PER_NODE", "1"))
    torch.cuda.set_device(local)
    store = os.environ["OPENEP_UNIQUE_ID_FILE"] + ".torch_store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", local))
    R, N, T, H, K = world, world // M, 128, 2048, 8
    E = 8 * R
    nvl, rdma = openep.Buffer.get_internode_buffer_size_hint(R, M, T + 4, H, 2, 0, K)
    buf = openep.Buffer(dist.group.WORLD, nvl, rdma, timeout_seconds=60)
    failures = []

    def expect(ok, what):
        if not ok:
            failures.append(what)
            print(f"[rank {rank}] FAILED: {what}", flush=True)

    rt = buf.runtime  # DeepEP's runtime queries, answered from the topology
    expect(rt.get_num_rdma_ranks() == N, f"get_num_rdma_ranks() == {N}")
    expect(rt.get_rdma_rank() == rank // M, f"get_rdma_rank() == {rank // M}")
    expect(rt.get_root_rdma_rank(True) == rank % M and rt.get_root_rdma_rank(False) == 0, "get_root_rdma_rank()")
    expect(rt.get_num_nvl_ranks() == M, f"get_num_nvl_ranks() == {M}")
    expect(rt.is_available() and rt.is_internode_available(), "is_available() and is_internode_available()")
    expect(rt.get_local_device_id() == local, f"get_local_device_id() == {local}")
    xs, topks, ws = inputs(R, M, T, H, K, E, 1)
    dev = torch.device("cuda", local)
    x, topk, w = xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev)

    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, E)
    ref_layout = reference.get_dispatch_layout(topks[rank], E, R, ranks_per_node=M)
    expect(torch.equal(per_rdma.cpu(), ref_layout[1]), "num_tokens_per_rdma_rank equals the reference")
    expect(torch.equal(per_rank.cpu(), ref_layout[0]), "num_tokens_per_rank equals the reference")

    recv_x, recv_topk, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk, topk_weights=w)
    ref = reference.dispatch(xs, topks, E, topk_weights=ws)
    want = ref.recv(rank)
    expect(isinstance(handle, openep.InternodeHandle), "dispatch on a multi-node group returns an InternodeHandle")
    expect(torch.equal(recv_x.cpu().view(torch.int16), want["x"].view(torch.int16)), "recv_x equals the reference")
    expect(torch.equal(recv_topk.cpu(), want["topk_idx"]), "recv_topk_idx equals the reference")
    expect(torch.equal(recv_w.cpu(), want["topk_weights"]), "recv_topk_weights equals the reference")
    expect(counts == want["num_recv_tokens_per_expert"], "per-expert counts equal the reference")
    expect(torch.equal(handle[-4].cpu(), want["rank_prefix"]), "handle[-4] (recv_gbl_rank_prefix_sum)")
    expect(handle[7].size(0) == want["num_recv_tokens"], "handle[7].size(0) is the row count")

    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    rows = [ref.recv(d)["x"] for d in range(R)]
    wts = [ref.recv(d)["topk_weights"] for d in range(R)]
    ref_c = reference.combine(ref, rows, topk_weights=wts, ranks_per_node=M)[rank]
    expect(torch.equal(combined.cpu().view(torch.int16), ref_c[0].view(torch.int16)), "combine equals the reference")
    expect(torch.equal(combined_w.cpu(), ref_c[1]), "combined weights equal the reference")

    # Backward pattern: cached dispatch of new data with the same handle.
    xs2 = [(torch.randn((T, H), generator=torch.Generator().manual_seed(77 + r)) * 0.5).to(torch.bfloat16)
           for r in range(R)]
    recv2, _, _, _, _, _ = buf.dispatch(xs2[rank].to(dev), handle=handle)
    ref2 = reference.dispatch(xs2, topks, E, with_topk=False).recv(rank)
    expect(torch.equal(recv2.cpu().view(torch.int16), ref2["x"].view(torch.int16)), "cached dispatch equals the reference")

    # Worst-case mode (no host wait): the valid rows equal exact mode, padded top-k rows are -1.
    worst = T * R + 3
    rw, rtw, _, counts_w, hw, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk, topk_weights=w, num_worst_tokens=worst)
    n = want["num_recv_tokens"]
    expect(rw.shape[0] == worst and counts_w == [], "worst-case shapes")
    expect(torch.equal(rw[:n].cpu().view(torch.int16), want["x"].view(torch.int16)), "worst-case rows equal exact")
    expect(bool((rtw[n:] == -1).all()), "worst-case padded top-k is -1")

    buf.runtime.synchronize(buf.runtime.comm_stream)
    dist.barrier()
    print(f"[rank {rank}] python internode on {N} fake nodes x {M}: "
          f"{'ok' if not failures else str(len(failures)) + ' FAILED'}", flush=True)
    dist.destroy_process_group()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
