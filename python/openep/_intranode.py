"""Intranode normal mode of openep.Buffer (DeepEP V1 sections 2.4 - 2.6): layout, dispatch (exact, worst-case,
cached), combine. A mixin of :class:`openep.Buffer`; tensor checks happen here (the core cannot see tensors), the
core validates the rest again before it launches anything."""

from . import _C
from ._checks import INDEX_DTYPES, SCALE_DTYPES, check_int, check_tensor, dtype_name, element_size
from ._handles import IntranodeHandle
from ._torch import torch_module
from .errors import invalid_argument


class _PoolBlock:
    """`nbytes` of a Buffer's window-backed pool, seen by torch through __cuda_array_interface__ (the tensor keeps
    the block alive). When the last tensor over it goes, the memory returns to the pool once the stream current at
    that moment has passed this point (Buffer::free_recv); after Buffer.destroy() the pool is gone and this is a
    no-op."""

    def __init__(self, runtime, ptr, nbytes, device):
        self._runtime, self._ptr, self._device = runtime, ptr, device
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None, "stream": None}

    def __del__(self):
        try:
            torch = torch_module()
            self._runtime.free_recv(self._ptr, torch.cuda.current_stream(self._device).cuda_stream)
        except Exception:  # interpreter shutdown or a destroyed Buffer: the pool is gone with it
            pass

__all__ = ["IntranodeOps"]


class IntranodeOps:
    """get_dispatch_layout, dispatch, combine and the helpers internode mode shares (x checks, outputs, combine)."""

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        """Computes where this rank's tokens go (no communication).

        Args:
            topk_idx: ``[N, K]`` int64 (``openep.topk_idx_t``) or int32, contiguous, on the Buffer's GPU; ``-1``
                means no expert in that slot. Expert ``e`` lives on rank ``e // (num_experts // R)``.
            num_experts: total experts ``E``, a multiple of the group size.
            previous_event, async_finish, allocate_on_comm_stream: stream control (module docstring).

        Returns:
            ``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event)``:
            ``[R]`` int32 tokens sent to each rank (once per rank); ``None`` (no RDMA ranks intranode);
            ``[E]`` int32 (token, slot) pairs per expert; ``[N, R]`` bool; an :class:`EventOverlap`.
            An expert id outside ``[-1, E)`` is found on the device and raised as
            ``OpenEPError(code="device_check")`` at the next call or synchronisation.
        """
        op = "get_dispatch_layout"
        rt = self._rt(op)
        check_tensor(op, "topk_idx", topk_idx, INDEX_DTYPES, (None, None), True, self._dev)
        check_int(op, "num_experts", num_experts, 1)
        torch = torch_module()
        num_tokens, num_topk = topk_idx.shape
        R = self.group_size
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            dev = self._dev
            num_tokens_per_rank = torch.empty((R,), dtype=torch.int32, device=dev)
            num_tokens_per_expert = torch.empty((num_experts,), dtype=torch.int32, device=dev)
            is_token_in_rank = torch.empty((num_tokens, R), dtype=torch.bool, device=dev)
            layout = _C.LayoutArgs()
            layout.topk_idx = topk_idx.data_ptr()
            layout.topk_int64 = dtype_name(topk_idx.dtype) == "int64"
            layout.num_tokens, layout.num_topk, layout.num_experts = num_tokens, num_topk, num_experts
            layout.num_tokens_per_rank = num_tokens_per_rank.data_ptr()
            layout.num_tokens_per_expert = num_tokens_per_expert.data_ptr()
            layout.is_token_in_rank = is_token_in_rank.data_ptr()
            num_tokens_per_rdma_rank = None
            if getattr(self, "_internode", False):
                num_tokens_per_rdma_rank = torch.empty((rt.num_nodes,), dtype=torch.int32, device=dev)
                layout.num_tokens_per_rdma_rank = num_tokens_per_rdma_rank.data_ptr()
            rt.get_dispatch_layout(layout, self._comm_stream.cuda_stream)
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank))
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event

    def _check_x(self, op, x):
        """Splits x into (data, scales) and checks both."""
        if isinstance(x, tuple):
            if len(x) != 2:
                raise invalid_argument(f"{op}: x as a tuple must be (x_fp8, x_scales), got {len(x)} items")
            x, scales = x
        else:
            scales = None
        check_tensor(op, "x", x, None, (None, None), True, self._dev)
        esize = element_size(x)
        if esize not in (1, 2):
            raise invalid_argument(f"{op}: x expected 2-byte (bfloat16) or 1-byte (float8_e4m3fn) elements, got "
                                   f"{dtype_name(x.dtype)}")
        if (x.shape[1] * esize) % 16 != 0:
            raise invalid_argument(f"{op}: x rows must be a multiple of 16 bytes, got {x.shape[1]} x {esize} bytes")
        if scales is not None:
            if esize != 1:
                raise invalid_argument(f"{op}: x_scales given, so x expected 1-byte (float8_e4m3fn) elements, got "
                                       f"{dtype_name(x.dtype)}")
            check_tensor(op, "x_scales", scales, SCALE_DTYPES, (x.shape[0], None), False, self._dev)
        return x, scales

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        """Sends every token to the ranks that hold its experts (intranode normal mode).

        Args:
            x: ``[N, H]`` bfloat16 contiguous, or a tuple ``(x_fp8, x_scales)``: ``[N, H]`` float8_e4m3fn and
                ``[N, S]`` float32 (or int32 packed UE8M0) scales with any strides. Rows: multiple of 16 bytes.
            handle: an :class:`IntranodeHandle` from an earlier non-cached dispatch: cached mode (same layout,
                new ``x``; ``topk_idx``/``topk_weights`` must be None; the routing arguments are ignored; no host
                wait).
            num_tokens_per_rank: ``[R]`` int32, is_token_in_rank: ``[N, R]`` bool contiguous,
                num_tokens_per_expert: ``[E]`` int32 — from :meth:`get_dispatch_layout` (required unless cached).
            num_tokens_per_rdma_rank: ignored intranode.
            topk_idx: optional ``[N, K]`` int64/int32 with ``topk_weights`` ``[N, K]`` float32, both contiguous
                (``K <= 32``); required when ``num_worst_tokens > 0``.
            expert_alignment: rounds every entry of the returned per-expert list up to a multiple of it.
            num_worst_tokens: if > 0, outputs have exactly this many rows, the host does not wait, and the list is
                empty (the real count is ``handle.rank_prefix_matrix[R-1, rank]``; padded ``recv_topk_idx`` rows
                are -1).
            config: a :class:`Config` (default ``get_dispatch_config(group_size)``); ``num_sms`` blocks are used.
            previous_event, async_finish, allocate_on_comm_stream: stream control (module docstring).

        Returns:
            ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)``:
            ``recv_x`` ``[N_recv, H]`` of x's dtype (a tuple with contiguous ``[N_recv, S]`` scales for FP8), rows
            ordered by (source rank, source token); ``recv_topk_idx`` ``[N_recv, K]`` (x's index dtype) holding
            LOCAL expert ids in ``[0, E/R)`` or -1 where the expert is elsewhere; ``recv_topk_weights``
            ``[N_recv, K]`` float32 (0 where the id is -1); both None without top-k; a Python list of ``E/R`` ints
            (rows per local expert, aligned); the :class:`IntranodeHandle`; an :class:`EventOverlap`.
            Cached mode returns ``(recv_x, None, None, None, None, event)``.
        """
        if getattr(self, "_internode", False):  # DeepEP: dispatch picks internode mode for such groups
            return self.internode_dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                           num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                                           num_worst_tokens, config, previous_event, async_finish,
                                           allocate_on_comm_stream)
        op = "dispatch"
        rt = self._rt(op)
        config, x, scales = self._dispatch_inputs(op, x, handle, topk_idx, topk_weights, expert_alignment,
                                                  num_worst_tokens, config)
        if handle is not None:
            return self._cached_dispatch(rt, x, scales, handle, config, previous_event, async_finish,
                                         allocate_on_comm_stream)
        torch = torch_module()
        R, dev = self.group_size, self._dev
        num_tokens, hidden = x.shape
        args, num_topk = self._routed_dispatch_args(
            op, x, scales, config, (("num_tokens_per_rank", num_tokens_per_rank, ("int32",), (R,)),
                                    ("is_token_in_rank", is_token_in_rank, ("bool",), (num_tokens, R)),
                                    ("num_tokens_per_expert", num_tokens_per_expert, ("int32",), (None,))),
            topk_idx, topk_weights, expert_alignment, num_worst_tokens)
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            rank_prefix_matrix = torch.empty((R, R), dtype=torch.int32, device=dev)
            num_tokens_per_src = torch.empty((R,), dtype=torch.int32, device=dev)
            send_pos = torch.empty((num_tokens, R), dtype=torch.int32, device=dev)
            hd = _C.IntranodeHandle()
            hd.num_tokens, hd.is_token_in_rank = num_tokens, is_token_in_rank.data_ptr()
            hd.rank_prefix_matrix, hd.num_tokens_per_src = rank_prefix_matrix.data_ptr(), num_tokens_per_src.data_ptr()
            hd.send_pos = send_pos.data_ptr()
            stream = self._comm_stream.cuda_stream
            num_recv, per_expert = rt.dispatch_prepare(args, hd, stream)
            recv_src_idx = self._recv_empty((num_recv,), torch.int32)
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, num_recv)
            recv_topk_idx = recv_topk_weights = None
            if num_topk > 0:
                recv_topk_idx = self._recv_empty((num_recv, num_topk), topk_idx.dtype)
                recv_topk_weights = self._recv_empty((num_recv, num_topk), torch.float32)
                outs.recv_topk_idx, outs.recv_topk_weights = recv_topk_idx.data_ptr(), recv_topk_weights.data_ptr()
            hd.num_recv_tokens, hd.recv_src_idx = num_recv, recv_src_idx.data_ptr()
            rt.dispatch(args, hd, outs, stream)
            handle = IntranodeHandle(rank_prefix_matrix, num_tokens_per_src, None, recv_src_idx, is_token_in_rank,
                                     send_pos)
            handle._openep_checked = (self._token, hd)  # hd holds exactly what _unpack_handle would build
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                                  num_tokens_per_expert, recv_x, recv_scales, recv_topk_idx, recv_topk_weights)
                                 + tuple(handle))
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        per_expert_list = list(per_expert) if num_worst_tokens == 0 else []
        return recv, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event

    def _dispatch_inputs(self, op, x, handle, topk_idx, topk_weights, expert_alignment, num_worst_tokens, config):
        """The first checks intranode and internode dispatch share; returns ``(config, x, scales)``."""
        config = self.get_dispatch_config(self.group_size) if config is None else config
        x, scales = self._check_x(op, x)
        check_int(op, "expert_alignment", expert_alignment, 1)
        check_int(op, "num_worst_tokens", num_worst_tokens, 0)
        if handle is not None and (topk_idx is not None or topk_weights is not None):
            raise invalid_argument(f"{op}: cached mode (handle given) takes no topk_idx/topk_weights")
        return config, x, scales

    def _routed_dispatch_args(self, op, x, scales, config, routing, topk_idx, topk_weights, expert_alignment,
                              num_worst_tokens):
        """Checks the routing tensors and top-k of a non-cached dispatch (intranode or internode) and returns
        ``(the core's argument dict, num_topk)``. ``routing``: ``(name, tensor, dtypes, shape)`` of every layout
        tensor the mode needs, in check order, all contiguous; ``num_tokens_per_expert`` among them gives E."""
        dev = self._dev
        num_tokens = x.shape[0]
        for name, t, _, _ in routing:
            if t is None:
                raise invalid_argument(f"{op}: {name} is required without a handle (from get_dispatch_layout)")
        for name, t, dtypes, shape in routing:
            check_tensor(op, name, t, dtypes, shape, True, dev)
        if (topk_idx is None) != (topk_weights is None):
            raise invalid_argument(f"{op}: topk_idx and topk_weights must be given together")
        num_topk = 0
        if topk_idx is not None:
            check_tensor(op, "topk_idx", topk_idx, INDEX_DTYPES, (num_tokens, None), True, dev)
            num_topk = topk_idx.shape[1]
            check_tensor(op, "topk_weights", topk_weights, ("float32",), (num_tokens, num_topk), True, dev)
        args = self._dispatch_args(x, scales, config)
        for name, t, _, _ in routing:
            setattr(args, name, t.data_ptr())
        if topk_idx is not None:
            args.topk_idx, args.topk_weights = topk_idx.data_ptr(), topk_weights.data_ptr()
            args.topk_int64 = dtype_name(topk_idx.dtype) == "int64"
        args.num_topk, args.num_experts = num_topk, routing[-1][1].shape[0]
        args.expert_alignment, args.num_worst_tokens = expert_alignment, num_worst_tokens
        return args, num_topk

    def _dispatch_args(self, x, scales, config):
        args = _C.DispatchArgs()
        args.x = x.data_ptr()
        args.num_tokens, args.hidden = x.shape
        args.x_elem_bytes, args.config = element_size(x), config
        if scales is not None:
            args.x_scales, args.num_scales = scales.data_ptr(), scales.shape[1]
            args.scale_token_stride, args.scale_hidden_stride = scales.stride(0), scales.stride(1)
        return args

    def _recv_tensors(self, x, scales, num_recv):
        recv_x = self._recv_empty((num_recv, x.shape[1]), x.dtype)
        outs = _C.DispatchOutputs()
        outs.recv_x = recv_x.data_ptr()
        recv_scales = None
        if scales is not None:
            recv_scales = self._recv_empty((num_recv, scales.shape[1]), scales.dtype)
            outs.recv_x_scales = recv_scales.data_ptr()
        return recv_x, recv_scales, outs

    def _recv_empty(self, shape, dtype):
        """A dispatch output: from the window-backed pool (num_recv_pool_bytes) while it has room, else torch's."""
        torch = torch_module()
        if self.num_recv_pool_bytes and not self._internode:
            nbytes = dtype.itemsize
            for n in shape:
                nbytes *= n
            ptr = self.runtime.alloc_recv(nbytes) if nbytes else 0
            if ptr:
                raw = torch.as_tensor(_PoolBlock(self.runtime, ptr, nbytes, self._device), device=self._dev)
                return raw.view(dtype).view(shape)
        return torch.empty(shape, dtype=dtype, device=self._dev)

    def _unpack_handle(self, op, handle):
        checked = getattr(handle, "_openep_checked", None)
        if checked is not None and checked[0] is self._token:
            return checked[1]
        if not isinstance(handle, tuple) or len(handle) != 6:
            raise invalid_argument(f"{op}: handle expected the 6-tuple an intranode dispatch returns, got "
                                   f"{type(handle).__name__}")
        rank_prefix_matrix, num_tokens_per_src, _, recv_src_idx, is_token_in_rank, send_pos = handle
        R, dev = self.group_size, self._dev
        check_tensor(op, "handle.rank_prefix_matrix", rank_prefix_matrix, ("int32",), (R, R), True, dev)
        check_tensor(op, "handle.num_tokens_per_src", num_tokens_per_src, ("int32",), (R,), True, dev)
        check_tensor(op, "handle.recv_src_idx", recv_src_idx, ("int32",), (None,), True, dev)
        check_tensor(op, "handle.is_token_in_rank", is_token_in_rank, ("bool",), (None, R), True, dev)
        check_tensor(op, "handle.send_pos", send_pos, ("int32",), (is_token_in_rank.shape[0], R), True, dev)
        hd = _C.IntranodeHandle()
        hd.num_tokens, hd.num_recv_tokens = is_token_in_rank.shape[0], recv_src_idx.shape[0]
        hd.is_token_in_rank, hd.rank_prefix_matrix = is_token_in_rank.data_ptr(), rank_prefix_matrix.data_ptr()
        hd.num_tokens_per_src, hd.send_pos = num_tokens_per_src.data_ptr(), send_pos.data_ptr()
        hd.recv_src_idx = recv_src_idx.data_ptr()
        return hd

    def _cached_dispatch(self, rt, x, scales, handle, config, previous_event, async_finish,
                         allocate_on_comm_stream):
        op = "dispatch"
        return self._cached_dispatch_call(op, rt.dispatch_cached, self._unpack_handle(op, handle), tuple(handle), x,
                                          scales, config, previous_event, async_finish, allocate_on_comm_stream)

    def _cached_dispatch_call(self, op, launch, hd, handle_tensors, x, scales, config, previous_event, async_finish,
                              allocate_on_comm_stream):
        """The body intranode and internode cached dispatch share. ``launch(args, core handle, outputs, stream)``
        is the core call; ``handle_tensors`` are kept alive."""
        if x.shape[0] != hd.num_tokens:
            raise invalid_argument(f"{op}: cached mode expected x with {hd.num_tokens} rows (the handle's token "
                                   f"count), got {x.shape[0]}")
        args = self._dispatch_args(x, scales, config)
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, hd.num_recv_tokens)
            launch(args, hd, outs, self._comm_stream.cuda_stream)
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, scales, recv_x, recv_scales) + handle_tensors)
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        return recv, None, None, None, None, event

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish=False, allocate_on_comm_stream=False):
        """Returns every received row to its source rank and sums there (the reverse of dispatch).

        Args:
            x: ``[N_recv, H]`` bfloat16 contiguous, rows in the order the matching dispatch produced.
            handle: the :class:`IntranodeHandle` of that (non-cached) dispatch.
            topk_weights: optional ``[N_recv, K]`` float32 contiguous, summed the same way.
            bias: None, a tensor, or a tuple of up to two tensors, each ``[N, H]`` bfloat16 contiguous, added once
                to every output row.
            config: a :class:`Config` (default ``get_combine_config(group_size)``).
            previous_event, async_finish, allocate_on_comm_stream: stream control (module docstring).

        Returns:
            ``(combined_x, combined_topk_weights, event)``: ``[N, H]`` bfloat16 (per token: the float32 sum over
            the ranks it was sent to, in ascending rank order, plus bias, rounded once: deterministic);
            ``[N, K]`` float32 or None; an :class:`EventOverlap`. Never blocks the host.
        """
        if getattr(self, "_internode", False):
            return self.internode_combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                                          allocate_on_comm_stream)
        op = "combine"
        rt = self._rt(op)
        config = self.get_combine_config(self.group_size) if config is None else config
        hd = self._unpack_handle(op, handle)
        return self._combine_call(op, rt.combine, hd, tuple(handle), x, topk_weights, bias, config, previous_event,
                                  async_finish, allocate_on_comm_stream)

    def _combine_call(self, op, launch, hd, handle_tensors, x, topk_weights, bias, config, previous_event,
                      async_finish, allocate_on_comm_stream):
        """The body intranode and internode combine share: tensor checks, arguments, outputs, streams.
        ``launch(args, core handle, outputs, stream)`` is the core call; ``handle_tensors`` are kept alive."""
        torch = torch_module()
        dev = self._dev
        num_recv, num_tokens = hd.num_recv_tokens, hd.num_tokens
        check_tensor(op, "x", x, ("bfloat16",), (num_recv, None), True, dev)
        hidden = x.shape[1]
        num_topk = 0
        if topk_weights is not None:
            check_tensor(op, "topk_weights", topk_weights, ("float32",), (num_recv, None), True, dev)
            num_topk = topk_weights.shape[1]
        biases = () if bias is None else (bias if isinstance(bias, tuple) else (bias,))
        if len(biases) > 2:
            raise invalid_argument(f"{op}: bias expected a tensor or a tuple of at most 2 tensors, got {len(biases)}")
        for i, b in enumerate(biases):
            check_tensor(op, f"bias[{i}]", b, ("bfloat16",), (num_tokens, hidden), True, dev)
        args = _C.CombineArgs()
        args.x, args.hidden, args.num_topk, args.config = x.data_ptr(), hidden, num_topk, config
        if topk_weights is not None:
            args.topk_weights = topk_weights.data_ptr()
        if biases:
            args.bias_0 = biases[0].data_ptr()
            if len(biases) > 1:
                args.bias_1 = biases[1].data_ptr()
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            combined_x = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=dev)
            outs = _C.CombineOutputs()
            outs.combined_x = combined_x.data_ptr()
            combined_w = None
            if num_topk > 0:
                combined_w = torch.empty((num_tokens, num_topk), dtype=torch.float32, device=dev)
                outs.combined_topk_weights = combined_w.data_ptr()
            launch(args, hd, outs, self._comm_stream.cuda_stream)
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, topk_weights, combined_x, combined_w) + tuple(biases) + handle_tensors)
        return combined_x, combined_w, event
