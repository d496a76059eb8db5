"""Internode normal mode of openep.Buffer (DeepEP V1 section 2.7; C++ semantics in include/openep/internode.hpp).
A mixin of :class:`openep.Buffer`, built on the intranode mixin's helpers. Run from Python on fake NCCL nodes over
sockets (tests/python/fakenode_internode.py); never on a real network (docs/INTERNODE.md)."""

from . import _C
from ._handles import InternodeHandle
from ._torch import torch_module
from .errors import invalid_argument

__all__ = ["InternodeOps"]


class InternodeOps:
    """internode_dispatch, internode_combine and their handle (dispatch/combine route here for such groups)."""

    def _require_internode(self, op):
        rt = self._rt(op)
        if not rt.is_internode:
            raise invalid_argument(f"{op}: this Buffer is not internode (its group is one NVLink domain, or "
                                   f"num_rdma_bytes is 0); use dispatch/combine")
        return rt

    @staticmethod
    def get_internode_buffer_size_hint(num_ranks, ranks_per_node, max_tokens_per_rank, hidden, x_elem_bytes=2,
                                       num_scales=0, num_topk=8):
        """``(num_nvl_bytes, num_rdma_bytes)`` an internode Buffer needs for up to ``max_tokens_per_rank`` tokens
        per rank in any routing (openep::internode_buffer_size_hint)."""
        return _C.internode_buffer_size_hint(num_ranks, ranks_per_node, max_tokens_per_rank, hidden, x_elem_bytes,
                                             num_scales, num_topk)

    def internode_dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                           is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                           expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None,
                           async_finish=False, allocate_on_comm_stream=False):
        """Internode normal dispatch (run on fake nodes only, see above). Arguments and results as
        :meth:`dispatch`, plus ``num_tokens_per_rdma_rank`` ``[num_nodes]`` int32 from :meth:`get_dispatch_layout`;
        returns an :class:`InternodeHandle`. With ``num_worst_tokens > 0`` every rank must pass the same number of
        tokens (the network legs then have fixed sizes)."""
        op = "internode_dispatch"
        rt = self._require_internode(op)
        config, x, scales = self._dispatch_inputs(op, x, handle, topk_idx, topk_weights, expert_alignment,
                                                  num_worst_tokens, config)
        if handle is not None:
            return self._internode_cached_dispatch(rt, x, scales, handle, config, previous_event, async_finish,
                                                   allocate_on_comm_stream)
        torch = torch_module()
        R, dev = self.group_size, self._dev
        N, M = rt.num_nodes, rt.ranks_per_node
        num_tokens = x.shape[0]
        args, num_topk = self._routed_dispatch_args(
            op, x, scales, config, (("num_tokens_per_rank", num_tokens_per_rank, ("int32",), (R,)),
                                    ("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, ("int32",), (N,)),
                                    ("is_token_in_rank", is_token_in_rank, ("bool",), (num_tokens, R)),
                                    ("num_tokens_per_expert", num_tokens_per_expert, ("int32",), (None,))),
            topk_idx, topk_weights, expert_alignment, num_worst_tokens)
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            send_pos = torch.empty((num_tokens, R), dtype=torch.int32, device=dev)
            send_rdma_head = torch.empty((num_tokens, N), dtype=torch.int32, device=dev)
            node_prefix = torch.empty((R, M), dtype=torch.int32, device=dev)
            gbl = torch.empty((R,), dtype=torch.int32, device=dev)
            rdma = torch.empty((N,), dtype=torch.int32, device=dev)
            hd = _C.InternodeHandle()
            hd.num_tokens, hd.is_token_in_rank = num_tokens, is_token_in_rank.data_ptr()
            hd.send_pos, hd.send_rdma_head = send_pos.data_ptr(), send_rdma_head.data_ptr()
            hd.node_prefix, hd.recv_gbl_rank_prefix_sum = node_prefix.data_ptr(), gbl.data_ptr()
            hd.recv_rdma_rank_prefix_sum = rdma.data_ptr()
            stream = self._comm_stream.cuda_stream
            # fills the handle's counts (host fields) in place
            num_recv, num_rdma_recv, per_expert = rt.internode_dispatch_prepare(args, hd, stream)
            mask = torch.empty((num_rdma_recv,), dtype=torch.int32, device=dev)
            recv_src_idx = torch.empty((num_recv,), dtype=torch.int32, device=dev)
            recv_src_meta = torch.empty((num_recv, 2), dtype=torch.int32, device=dev)
            hd.recv_rdma_mask, hd.recv_src_idx = mask.data_ptr(), recv_src_idx.data_ptr()
            hd.recv_src_meta = recv_src_meta.data_ptr()
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, num_recv)
            recv_topk_idx = recv_topk_weights = None
            if num_topk > 0:
                recv_topk_idx = torch.empty((num_recv, num_topk), dtype=topk_idx.dtype, device=dev)
                recv_topk_weights = torch.empty((num_recv, num_topk), dtype=torch.float32, device=dev)
                outs.recv_topk_idx, outs.recv_topk_weights = recv_topk_idx.data_ptr(), recv_topk_weights.data_ptr()
            rt.internode_dispatch(args, hd, outs, stream)
            handle = InternodeHandle(is_token_in_rank, None, None, None, rdma, None, gbl, recv_src_meta, send_rdma_head,
                                     mask)
            handle._openep_checked = (self._token, hd)
            handle._openep_tensors = (send_pos, node_prefix, recv_src_idx)  # kept alive with the handle
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                  is_token_in_rank, num_tokens_per_expert, recv_x, recv_scales, recv_topk_idx,
                                  recv_topk_weights, send_pos, node_prefix, recv_src_idx) + tuple(
                                      t for t in handle if t is not None))
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        per_expert_list = list(per_expert) if num_worst_tokens == 0 else []
        return recv, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event

    def _internode_handle(self, op, handle):
        checked = getattr(handle, "_openep_checked", None)
        if not isinstance(handle, InternodeHandle) or checked is None or checked[0] is not self._token:
            raise invalid_argument(f"{op}: handle expected the InternodeHandle this Buffer's internode_dispatch "
                                   f"returned (it carries OpenEP's state beyond DeepEP's 10 entries), got "
                                   f"{type(handle).__name__}")
        return checked[1]

    def _internode_cached_dispatch(self, rt, x, scales, handle, config, previous_event, async_finish,
                                   allocate_on_comm_stream):
        op = "internode_dispatch"
        return self._cached_dispatch_call(op, rt.internode_dispatch_cached, self._internode_handle(op, handle),
                                          tuple(t for t in handle if t is not None), x, scales, config,
                                          previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                          async_finish=False, allocate_on_comm_stream=False):
        """Internode normal combine (run on fake nodes only, see above). Arguments and results as :meth:`combine`;
        the order is the reference's ``combine_internode``: per node in fp32, BF16 node partials, nodes ascending."""
        op = "internode_combine"
        rt = self._require_internode(op)
        config = self.get_combine_config(self.group_size) if config is None else config
        hd = self._internode_handle(op, handle)
        return self._combine_call(op, rt.internode_combine, hd, tuple(t for t in handle if t is not None), x,
                                  topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream)
