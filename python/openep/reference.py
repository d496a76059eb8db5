"""The CPU reference (reference/openep/reference.hpp), the specification of OpenEP's results, for tests.

Thin torch wrappers over the core's reference exposed through the binding (``openep._C.ref_*``): nothing is
re-implemented here. Inputs may live on any device; results are CPU tensors. Dispatch is bit-exact; combine
sums in float32 in ascending rank order then adds bias_0 and bias_1, which the GPU kernels reproduce bit for
bit. Low-latency dispatch casts to FP8 exactly as the kernels do and places rows in a canonical order
(source rank, source token, slot); low-latency combine sums in slot order in float32 (no FMA), which the
kernels reproduce bit for bit. The raw functions (``_C.ref_get_dispatch_layout``, ``_C.ref_dispatch``,
``_C.ref_combine``, ``_C.ref_low_latency_dispatch``, ``_C.ref_low_latency_combine``) take and return ``bytes``
and need no torch.
"""

from . import _C
from ._torch import torch_module

__all__ = ["get_dispatch_layout", "dispatch", "combine", "RefDispatchResult", "low_latency_dispatch",
           "low_latency_combine", "RefLowLatencyResult"]


def _bytes(t):
    torch = torch_module()
    if t is None:
        return b""
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _tensor(b, dtype, shape):
    torch = torch_module()
    if len(b) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(b), dtype=dtype).reshape(shape)


def get_dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node=None):
    """Reference get_dispatch_layout for one rank's ``[N, K]`` topk_idx.

    Returns ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [num_nodes] int32 or None,
    num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool)`` on the CPU. Nodes hold ``ranks_per_node``
    ranks (internode); ``None`` keeps DeepEP's rule (nodes of 8 ranks above 8 ranks).
    """
    torch = torch_module()
    n, k = topk_idx.shape
    d = _C.ref_get_dispatch_layout(_bytes(topk_idx.to(torch.int64)), n, k, num_experts, num_ranks,
                                   int(ranks_per_node or 0))
    rdma = d["num_tokens_per_rdma_rank"]
    return (torch.tensor(d["num_tokens_per_rank"], dtype=torch.int32),
            torch.tensor(rdma, dtype=torch.int32) if rdma else None,
            torch.tensor(d["num_tokens_per_expert"], dtype=torch.int32),
            _tensor(d["is_token_in_rank"], torch.bool, (n, num_ranks)))


class RefDispatchResult:
    """Reference dispatch over all ranks; :meth:`recv` gives one rank's view, :func:`combine` reverses it."""

    def __init__(self, native, num_ranks, hidden, num_topk, elem_bytes, num_scales, with_topk, x_dtype,
                 scale_dtype, num_tokens):
        self.native = native
        self.num_ranks, self.hidden, self.num_topk = num_ranks, hidden, num_topk
        self.elem_bytes, self.num_scales, self.with_topk = elem_bytes, num_scales, with_topk
        self.x_dtype, self.scale_dtype, self.num_tokens = x_dtype, scale_dtype, num_tokens

    def recv(self, rank):
        """What ``rank`` receives, as a dict of CPU tensors: ``x`` [N_recv, H] (x's dtype), ``x_scales``
        [N_recv, S] (or None), ``topk_idx`` [N_recv, K] int64 local ids, ``topk_weights`` [N_recv, K] float32
        (None without top-k), ``src_rank``/``src_idx`` [N_recv] int32, ``rank_prefix`` [R] int32 (inclusive),
        ``num_recv_tokens_per_expert`` (list), ``send_pos`` [N, R] int32 (this rank as the source)."""
        torch = torch_module()
        d = self.native.recv(rank)
        n = d["num_recv_tokens"]
        out = {
            "num_recv_tokens": n,
            "x": _tensor(d["x"], torch.uint8, (n, self.hidden * self.elem_bytes)).view(self.x_dtype),
            "x_scales": (_tensor(d["x_scales"], torch.int32, (n, self.num_scales)).view(self.scale_dtype)
                         if self.num_scales else None),
            "topk_idx": _tensor(d["topk_idx"], torch.int64, (n, self.num_topk)) if self.with_topk else None,
            "topk_weights": _tensor(d["topk_weights"], torch.float32, (n, self.num_topk)) if self.with_topk else None,
            "src_rank": _tensor(d["src_rank"], torch.int32, (n,)),
            "src_idx": _tensor(d["src_idx"], torch.int32, (n,)),
            "rank_prefix": torch.tensor(d["rank_prefix"], dtype=torch.int32),
            "num_recv_tokens_per_expert": list(d["num_recv_tokens_per_expert"]),
            "send_pos": _tensor(d["send_pos"], torch.int32, (self.num_tokens[rank], self.num_ranks)),
        }
        return out


def dispatch(xs, topk_idxs, num_experts, topk_weights=None, x_scales=None, expert_alignment=1, with_topk=True):
    """Reference dispatch over all ranks.

    Args:
        xs: per source rank, ``[N_s, H]`` tensors (any 1- or 2-byte dtype; bytes are moved verbatim).
        topk_idxs: per rank ``[N_s, K]`` routing (int64 or int32).
        topk_weights: per rank ``[N_s, K]`` float32 (required with ``with_topk``).
        x_scales: per rank ``[N_s, S]`` float32/int32 (FP8), or None.
        with_topk: whether top-k travels with the rows (DeepEP: topk_idx given to dispatch).
    """
    torch = torch_module()
    R = len(xs)
    hidden = xs[0].shape[1]
    elem_bytes = xs[0].element_size()
    num_topk = topk_idxs[0].shape[1]
    num_scales = x_scales[0].shape[1] if x_scales is not None else 0
    ranks = []
    for s in range(R):
        ranks.append((xs[s].shape[0], _bytes(xs[s]), _bytes(x_scales[s]) if x_scales is not None else b"",
                      _bytes(topk_idxs[s].to(torch.int64)),
                      _bytes(topk_weights[s]) if (with_topk and topk_weights is not None) else b""))
    native = _C.ref_dispatch(R, num_experts, hidden, num_topk, elem_bytes, num_scales, expert_alignment,
                             with_topk, ranks)
    return RefDispatchResult(native, R, hidden, num_topk, elem_bytes, num_scales, with_topk, xs[0].dtype,
                             x_scales[0].dtype if x_scales is not None else None, [x.shape[0] for x in xs])


def combine(dispatched, xs, topk_weights=None, bias_0=None, bias_1=None, ranks_per_node=None):
    """Reference combine: ``xs[d]`` ``[N_recv_d, H]`` bfloat16 rows of rank d in its receive order,
    ``topk_weights[d]`` ``[N_recv_d, K]`` float32 (when the dispatch carried top-k), optional per-rank biases
    ``[N_s, H]`` bfloat16. Returns per rank ``(combined_x [N_s, H] bfloat16, combined_weights [N_s, K] or None)``.
    ``ranks_per_node``: the internode order (``ref::combine_internode``: per node in fp32, BF16 node partials,
    nodes ascending); ``None``: the flat order of intranode combine.
    Without ``topk_weights`` after a dispatch that carried top-k (DeepEP's combine with ``topk_weights=None``),
    the combined rows are the same and the combined weights are ``None``.
    """
    torch = torch_module()
    R = dispatched.num_ranks
    # Without weights after a top-k dispatch, the native reference combines zeros (the rows do not depend on them)
    # and the weights are returned as None.
    weights_given = topk_weights is not None
    zero_weights = not weights_given and dispatched.with_topk
    ranks = [(_bytes(xs[d]), _bytes(topk_weights[d]) if weights_given else
              bytes(4 * xs[d].shape[0] * dispatched.num_topk) if zero_weights else b"") for d in range(R)]
    b0 = [_bytes(b) for b in bias_0] if bias_0 is not None else []
    b1 = [_bytes(b) for b in bias_1] if bias_1 is not None else []
    res = _C.ref_combine(dispatched.native, ranks, b0, b1, int(ranks_per_node or 0))
    out = []
    for s, (x, w) in enumerate(res):
        n = dispatched.num_tokens[s]
        out.append((_tensor(x, torch.bfloat16, (n, dispatched.hidden)),
                    _tensor(w, torch.float32, (n, dispatched.num_topk)) if weights_given and (len(w) or n == 0)
                    else None))
    return out


class RefLowLatencyResult:
    """Reference low-latency dispatch over all ranks; :meth:`recv` gives one rank's packed result."""

    def __init__(self, native, num_ranks, num_experts, hidden, T, use_fp8, use_ue8m0, num_tokens):
        self.native, self.num_ranks, self.num_experts, self.hidden, self.T = native, num_ranks, num_experts, hidden, T
        self.use_fp8, self.use_ue8m0, self.num_tokens = use_fp8, use_ue8m0, num_tokens
        self.num_local_experts = num_experts // num_ranks

    def recv(self, rank):
        """What ``rank`` receives, CPU tensors in the reference's canonical placement (rows of one (expert,
        source rank) range ordered by source token, then slot; rows beyond the count are zero):
        ``count`` [E/R] int32; ``packed_x`` [E/R, R*T, H] float8_e4m3fn (use_fp8) or bfloat16; ``scales``
        [E/R, R*T, H/128] float32 or [E/R, R*T, H/512] int32 (use_ue8m0), LOGICAL layout (contiguous), or None
        without FP8; ``src_info`` [E/R, R*T] int32 (-1 beyond the count); ``layout_range`` [E/R, R] int64."""
        torch = torch_module()
        d = self.native.recv(rank)
        El, P, H = self.num_local_experts, self.num_ranks * self.T, self.hidden
        out = {"count": torch.tensor(d["count"], dtype=torch.int32),
               "src_info": _tensor(d["src_info"], torch.int32, (El, P)),
               "layout_range": _tensor(d["layout_range"], torch.int64, (El, self.num_ranks)),
               "scales": None}
        if self.use_fp8:
            out["packed_x"] = _tensor(d["packed_x"], torch.uint8, (El, P, H)).view(torch.float8_e4m3fn)
            if self.use_ue8m0:
                out["scales"] = _tensor(d["packed_scales_ue8m0"], torch.int32, (El, P, H // 512))
            else:
                out["scales"] = _tensor(d["packed_scales"], torch.float32, (El, P, H // 128))
        else:
            out["packed_x"] = _tensor(d["packed_x"], torch.uint8, (El, P, 2 * H)).view(torch.bfloat16)
        return out


def low_latency_dispatch(xs, topk_idxs, num_experts, num_max_dispatch_tokens_per_rank, use_fp8=True,
                         round_scale=False, use_ue8m0=False, topk_weights=None):
    """Reference low-latency dispatch over all ranks.

    Args:
        xs: per source rank ``[N_s, H]`` bfloat16 (``N_s <= T``).
        topk_idxs: per rank ``[N_s, K]`` routing (int64 or int32; -1 = none).
        num_experts: E (multiple of the number of ranks). num_max_dispatch_tokens_per_rank: T.
        use_fp8, round_scale, use_ue8m0: as in ``Buffer.low_latency_dispatch`` (round_scale/use_ue8m0 are
            ignored without use_fp8, as there).
        topk_weights: per rank ``[N_s, K]`` float32, needed only for :func:`low_latency_combine`.
    """
    torch = torch_module()
    R = len(xs)
    hidden = xs[0].shape[1]
    num_topk = topk_idxs[0].shape[1]
    use_fp8 = bool(use_fp8)
    round_scale, use_ue8m0 = bool(round_scale) and use_fp8, bool(use_ue8m0) and use_fp8
    ranks = [(xs[s].shape[0], _bytes(xs[s].to(torch.bfloat16)), _bytes(topk_idxs[s].to(torch.int64)),
              _bytes(topk_weights[s].to(torch.float32)) if topk_weights is not None else b"") for s in range(R)]
    native = _C.ref_low_latency_dispatch(R, num_experts, hidden, num_topk, num_max_dispatch_tokens_per_rank,
                                         use_fp8, round_scale, use_ue8m0, ranks)
    return RefLowLatencyResult(native, R, num_experts, hidden, num_max_dispatch_tokens_per_rank, use_fp8, use_ue8m0,
                               [x.shape[0] for x in xs])


def low_latency_combine(dispatched, expert_outs, use_logfmt=False):
    """Reference low-latency combine.

    Args:
        dispatched: a :class:`RefLowLatencyResult` made with ``topk_weights``.
        expert_outs: per rank ``d``, ``[E/R, R*T, H]`` bfloat16 expert outputs placed as ``dispatched.recv(d)``
            places the rows (the reference's placement).
        use_logfmt: the rows travel in OpenEP's LogFMT-10 format (``Buffer.low_latency_combine(use_logfmt=True)``).

    Returns:
        per source rank, ``[N_s, H]`` bfloat16 (CPU).
    """
    torch = torch_module()
    res = _C.ref_low_latency_combine(dispatched.native, [_bytes(y.to(torch.bfloat16)) for y in expert_outs],
                                     bool(use_logfmt))
    return [_tensor(b, torch.bfloat16, (dispatched.num_tokens[s], dispatched.hidden)) for s, b in enumerate(res)]
