"""Low-latency mode of openep.Buffer (DeepEP V1 sections 2.8, 5.8 - 5.15) and shrink mode. A mixin of
:class:`openep.Buffer`; its stream rules are stated below and in the method docstrings."""

from . import _C
from ._checks import INDEX_DTYPES, check_int, check_tensor, dtype_name
from ._handles import LowLatencyHandle
from ._runtime import _wrap_device_memory
from ._torch import current_raw_stream, torch_module
from .errors import invalid_argument
from .utils import EventHandle, EventOverlap

__all__ = ["LowLatencyOps"]


def _make_recv_hook(op, core_hook, tensors):
    """Wraps the core's receive hook as a Python callable that keeps the call's tensors alive until it runs."""
    keep = [tensors]

    def hook():
        core_hook()
        keep.clear()

    hook.__name__ = hook.__qualname__ = f"{op}_recv_hook"
    hook.__doc__ = (f"Launches the receive kernel of this {op} on the stream that was current at the call (no "
                    f"host wait). Call it exactly once; the outputs are valid after it in stream order. A second "
                    f"call, or a call after Buffer.destroy(), raises OpenEPError(code='invalid_argument').")
    return hook


def _ll_core_handle(src_info, layout_range, T, hidden, num_experts):
    """The core's LowLatencyHandle over a Python handle's tensors and shapes."""
    hd = _C.LowLatencyHandle()
    hd.src_info, hd.layout_range = src_info.data_ptr(), layout_range.data_ptr()
    hd.num_max_dispatch_tokens_per_rank, hd.hidden, hd.num_experts = T, hidden, num_experts
    return hd


class LowLatencyOps:
    """low_latency_dispatch / combine, the zero-copy buffer, clean_low_latency_buffer and the shrink-mode masks."""

    # Low-latency mode (DeepEP 2.8, 5.8 - 5.15): decode-sized dispatch/combine among the ranks of one NVLink
    # domain, CUDA-graph capturable, optional receive hooks.
    #
    # Streams (DeepEP 5.10 / 5.11, reproduced exactly): no previous_event, no allocate_on_comm_stream.
    #   * return_recv_hook=False: the kernel (send and receive in one launch) runs on the communication stream
    #     after it waits for the current stream. async_finish=False: the current stream then waits for the
    #     communication stream (no host wait); async_finish=True: an event recorded on the communication
    #     stream is returned in the EventOverlap, whose extra_tensors keep every input/output alive (no
    #     record_stream, so it stays graph friendly).
    #   * return_recv_hook=True: only the send kernel is launched, on the CURRENT stream, and a hook is
    #     returned; calling it launches the receive kernel on that same stream. The EventOverlap holds None.
    #     async_finish and return_recv_hook are mutually exclusive.
    # All low-latency calls of a Buffer must be ordered with each other on the device (the core's rule): calls
    # without a hook are ordered by the communication stream; before a hook-mode call that follows an
    # async_finish call, wait for that call's event (event.current_stream_wait()).
    # Outputs are allocated with torch on the current stream (so inside torch.cuda.graph they come from the
    # graph's pool); the core never allocates, never waits on the host and never synchronises.
    def _ll_rt(self, op):
        rt = self._rt(op)
        if not getattr(self, "low_latency_mode", False):
            raise invalid_argument(f"{op}: requires a Buffer created with low_latency_mode=True (DeepEP V1 rule)")
        return rt

    def _ll_unpack_handle(self, op, handle):
        checked = getattr(handle, "_openep_checked", None)
        if checked is not None and checked[0] is self._token:
            return checked[1]
        if not isinstance(handle, tuple) or len(handle) != 5:
            raise invalid_argument(f"{op}: handle expected the 5-tuple low_latency_dispatch returns "
                                   f"(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, "
                                   f"num_experts), got {type(handle).__name__}"
                                   + (f" of length {len(handle)}" if isinstance(handle, tuple) else ""))
        src_info, layout_range, T, hidden, num_experts = handle
        R, dev = self.group_size, self._dev
        check_int(op, "handle.num_max_dispatch_tokens_per_rank", T, 1)
        check_int(op, "handle.hidden", hidden, 1)
        check_int(op, "handle.num_experts", num_experts, 1)
        if num_experts % R != 0:
            raise invalid_argument(f"{op}: handle.num_experts must be a multiple of the group size {R}, got "
                                   f"{num_experts}")
        El = num_experts // R
        check_tensor(op, "handle.packed_recv_src_info", src_info, ("int32",), (El, R * T), True, dev)
        check_tensor(op, "handle.packed_recv_layout_range", layout_range, ("int64",), (El, R), True, dev)
        return _ll_core_handle(src_info, layout_range, T, hidden, num_experts), El, T, hidden, num_experts

    def _ll_stream(self, rt, compute, return_recv_hook):
        """The stream a low-latency call's kernel goes on (stream rules above): the current stream in hook mode,
        else the communication stream, ordered after the current one."""
        if return_recv_hook:
            return compute
        rt.stream_wait(self._comm_ptr, compute)
        return self._comm_ptr

    def _ll_finish(self, op, compute, async_finish, return_recv_hook, core_hook, tensors):
        """The EventOverlap and hook of a low-latency call (stream rules above)."""
        keep = tuple(t for t in tensors if t is not None)
        if return_recv_hook:
            return EventOverlap(None), _make_recv_hook(op, core_hook, keep)
        if async_finish:
            return EventOverlap(EventHandle(self._comm_stream), extra_tensors=keep), None
        self.runtime.stream_wait(compute, self._comm_ptr)
        return EventOverlap(None), None

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        """Resets the low-latency signalling state of this Buffer (DeepEP 2.8). Collective: every rank calls it.

        Enqueued on the CURRENT stream: a device barrier over all ranks, zeroing of every low-latency signal
        and epoch of this rank, a second barrier. Never waits on the host. OpenEP's low-latency calls clean up
        after themselves (monotonic epochs), so this is not needed between calls; use it to restart the
        protocol from a known state (e.g. after using the region through ``get_local_buffer_tensor``).

        Args:
            num_max_dispatch_tokens_per_rank, hidden, num_experts: the shapes the low-latency calls use (they
                must fit ``num_rdma_bytes``: :meth:`get_low_latency_rdma_size_hint`).
        """
        op = "clean_low_latency_buffer"
        rt = self._ll_rt(op)
        check_int(op, "num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        check_int(op, "hidden", hidden, 1)
        check_int(op, "num_experts", num_experts, 1)
        torch = torch_module()
        rt.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts,
                                    torch.cuda.current_stream().cuda_stream)

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        """Sends this rank's decode tokens to the ranks owning their experts; returns DeepEP's packed layout.

        Collective: every rank calls it with the same ``num_max_dispatch_tokens_per_rank`` (T), hidden size,
        ``num_experts``, ``use_fp8`` and hook mode, in the same order relative to its other low-latency calls.
        One message per (token, top-k slot) with an expert >= 0 (a token listing one expert twice arrives
        twice). Never waits on the host; capturable in a CUDA graph (graph replays stay correct: the buffer
        half is chosen on the device). At most two low-latency operations may be issued but not yet received
        (e.g. two micro-batches in hook mode).

        Args:
            x: ``[N, H]`` bfloat16, contiguous, on the Buffer's GPU; ``0 <= N <= T``. ``H``: a multiple of 8
                (BF16), of 128 (``use_fp8``) or of 512 (``use_ue8m0``); values finite with ``use_fp8``.
            topk_idx: ``[N, K]`` int64 (``openep.topk_idx_t``) or int32, contiguous; ``-1`` = no expert;
                ``1 <= K <= 32``. Expert ``e`` lives on rank ``e // (num_experts // R)``.
            num_max_dispatch_tokens_per_rank: T, the capacity per source rank (identical on all ranks).
            num_experts: E, a multiple of the group size R.
            cumulative_local_expert_recv_stats: optional ``[E/R]`` int32 contiguous; the rows each local expert
                receives are ADDED to it (zero it yourself).
            dispatch_wait_recv_cost_stats: optional ``[R]`` int64 contiguous; GPU clock cycles spent waiting
                for each source rank are ADDED to it.
            use_fp8: cast to float8_e4m3fn inside the send with one float32 scale per 128 channels
                (``amax/448``); False: BF16 travels unchanged (round_scale/use_ue8m0 are then ignored, as in
                DeepEP).
            round_scale: power-of-two scales (rounded up). use_ue8m0: scales as UE8M0 exponents packed four
                per int32 (requires round_scale).
            async_finish: run on the communication stream and return an event (recorded there, holding every
                input/output in ``extra_tensors``) instead of making the current stream wait.
            return_recv_hook: launch only the send now, on the CURRENT stream, and return a hook that launches
                the receive on that stream; between the two OpenEP holds no SM.

        Streams: without a hook the kernel runs on the communication stream after it waits for the current
        stream, and (without ``async_finish``) the current stream then waits for it. Outputs are allocated on
        the current stream (inside ``torch.cuda.graph`` from the graph's pool). Low-latency calls must be
        ordered with each other on the device: before a hook-mode call that follows an ``async_finish`` call,
        wait for that call's event.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``:

            * ``recv_x``: BF16 ``[E/R, R*T, H]`` bfloat16; with ``use_fp8`` a tuple ``(data, scales)``: data
              ``[E/R, R*T, H]`` float8_e4m3fn and scales ``[E/R, R*T, H/128]`` float32 (``use_ue8m0``:
              ``[E/R, R*T, H/512]`` int32), the scales stored column-major in the last two dims (a transposed
              view of ``[E/R, H/128, R*T]``, DeepEP's layout). Row ``i`` of local expert ``e`` is valid for
              ``i < recv_count[e]``; other rows are garbage. Rows from source rank ``s`` are the range that
              ``handle`` gives; inside a range the row order is unspecified.
            * ``recv_count``: ``[E/R]`` int32, valid rows per local expert.
            * ``handle``: :class:`LowLatencyHandle`, DeepEP's 5-tuple ``(packed_recv_src_info [E/R, R*T]
              int32 (source token index of each row), packed_recv_layout_range [E/R, R] int64 ((start << 32) |
              count of the rows from each source rank), T, H, E)``; pass it to :meth:`low_latency_combine`.
            * ``event``: :class:`EventOverlap` (an event only with ``async_finish``).
            * ``hook``: with ``return_recv_hook`` a callable taking no arguments, to be called exactly once
              (outputs are valid only after it has run, in stream order); else None.
        """
        op = "low_latency_dispatch"
        rt = self._ll_rt(op)
        R, dev = self.group_size, self._dev
        T = num_max_dispatch_tokens_per_rank
        check_int(op, "num_max_dispatch_tokens_per_rank", T, 1)
        check_int(op, "num_experts", num_experts, 1)
        if num_experts % R != 0:
            raise invalid_argument(f"{op}: num_experts must be a multiple of the group size {R}, got {num_experts}")
        El = num_experts // R
        check_tensor(op, "x", x, ("bfloat16",), (None, None), True, dev)
        num_tokens, hidden = x.shape
        if num_tokens > T:
            raise invalid_argument(f"{op}: x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank "
                                   f"= {T}")
        check_tensor(op, "topk_idx", topk_idx, INDEX_DTYPES, (num_tokens, None), True, dev)
        num_topk = topk_idx.shape[1]
        if not 1 <= num_topk <= _C.LOW_LATENCY_MAX_TOPK:
            raise invalid_argument(f"{op}: topk_idx must have 1..{_C.LOW_LATENCY_MAX_TOPK} columns, got {num_topk}")
        if cumulative_local_expert_recv_stats is not None:
            check_tensor(op, "cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, ("int32",),
                         (El,), True, dev)
        if dispatch_wait_recv_cost_stats is not None:
            check_tensor(op, "dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, ("int64",), (R,),
                         True, dev)
        if async_finish and return_recv_hook:
            raise invalid_argument(f"{op}: async_finish and return_recv_hook are mutually exclusive (DeepEP V1 rule)")
        use_fp8 = bool(use_fp8)
        round_scale = bool(round_scale) and use_fp8
        use_ue8m0 = bool(use_ue8m0) and use_fp8
        if use_ue8m0 and not round_scale:
            raise invalid_argument(f"{op}: use_ue8m0=True requires round_scale=True")
        multiple = (512 if use_ue8m0 else 128) if use_fp8 else 8
        if hidden % multiple != 0:
            mode = "use_fp8 and use_ue8m0" if use_ue8m0 else ("use_fp8" if use_fp8 else "BF16 (use_fp8=False)")
            raise invalid_argument(f"{op}: hidden must be a multiple of {multiple} with {mode}, got {hidden}")

        torch = torch_module()
        P = R * T
        compute = current_raw_stream(self._device)
        packed_recv_x = torch.empty((El, P, hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                                    device=dev)
        scales = None
        if use_fp8:
            if use_ue8m0:
                scales = torch.empty((El, hidden // 512, P), dtype=torch.int32, device=dev).transpose(1, 2)
            else:
                scales = torch.empty((El, hidden // 128, P), dtype=torch.float32, device=dev).transpose(1, 2)
        recv_count = torch.empty((El,), dtype=torch.int32, device=dev)
        src_info = torch.empty((El, P), dtype=torch.int32, device=dev)
        layout_range = torch.empty((El, R), dtype=torch.int64, device=dev)
        args = _C.LowLatencyDispatchArgs()
        args.x, args.num_tokens, args.hidden = x.data_ptr(), num_tokens, hidden
        args.topk_idx, args.topk_int64, args.num_topk = topk_idx.data_ptr(), dtype_name(topk_idx.dtype) == "int64", \
            num_topk
        args.num_max_dispatch_tokens_per_rank, args.num_experts = T, num_experts
        args.use_fp8, args.round_scale, args.use_ue8m0 = use_fp8, round_scale, use_ue8m0
        args.return_recv_hook = bool(return_recv_hook)
        if cumulative_local_expert_recv_stats is not None:
            args.cumulative_local_expert_recv_stats = cumulative_local_expert_recv_stats.data_ptr()
        if dispatch_wait_recv_cost_stats is not None:
            args.dispatch_wait_recv_cost_stats = dispatch_wait_recv_cost_stats.data_ptr()
        hd = _ll_core_handle(src_info, layout_range, T, hidden, num_experts)
        outs = _C.LowLatencyDispatchOutputs()
        outs.packed_recv_x, outs.packed_recv_count = packed_recv_x.data_ptr(), recv_count.data_ptr()
        if scales is not None:
            outs.packed_recv_scales = scales.data_ptr()
        stream = self._ll_stream(rt, compute, return_recv_hook)
        core_hook = rt.low_latency_dispatch(args, hd, outs, stream)
        handle = LowLatencyHandle(src_info, layout_range, T, hidden, num_experts)
        handle._openep_checked = (self._token, (hd, El, T, hidden, num_experts))  # = _ll_unpack_handle's
        event, hook = self._ll_finish(op, compute, async_finish, return_recv_hook, core_hook,
                                      (x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                                       packed_recv_x, scales, recv_count, src_info, layout_range))
        recv_x = (packed_recv_x, scales) if use_fp8 else packed_recv_x
        return recv_x, recv_count, handle, event, hook

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None,
                            combine_wait_recv_cost_stats=None):
        """Returns the expert outputs to their source ranks and reduces them there (reverse of
        :meth:`low_latency_dispatch`). Collective; never waits on the host; capturable in a CUDA graph.

        For every token ``t`` of this rank: ``combined_x[t] = bf16(sum over slots k ascending with
        topk_idx[t, k] >= 0 of topk_weights[t, k] * y(t, k))`` with float32 multiplies and adds (no FMA) and one
        rounding to bfloat16 at the end, where ``y(t, k)`` is the row the owner of expert ``topk_idx[t, k]``
        produced for that message. Deterministic (bitwise equal to ``openep.reference.low_latency_combine``).
        Tokens with no valid slot give 0.

        Args:
            x: ``[E/R, R*T, H]`` bfloat16 contiguous: the expert outputs in the packed positions of the
                dispatch's ``recv_x`` (only valid rows are read). With ``zero_copy`` it is not read (may be None).
            topk_idx: ``[N, K]`` int64/int32 contiguous: the routing of the matching dispatch.
            topk_weights: ``[N, K]`` float32 contiguous.
            handle: the :class:`LowLatencyHandle` of the matching dispatch.
            use_logfmt: send the rows in OpenEP's 10-bit LogFMT format (per 128 channels: BF16 max/min of |x|, then
                10-bit log codes where max |x| < 1, else BF16; ~0.64x the NVLink bytes; an encoded value is within
                ~2.2% of its BF16 value). Needs ``H % 128 == 0``; works with ``zero_copy`` and hooks. Deterministic
                (bitwise equal to ``openep.reference.low_latency_combine(..., use_logfmt=True)``).
            zero_copy: the rows were written into :meth:`get_next_low_latency_combine_buffer` (before this call,
                in stream order); then ``x`` is ignored.
            async_finish, return_recv_hook: as in :meth:`low_latency_dispatch` (mutually exclusive).
            out: optional ``[N, H]`` bfloat16 contiguous tensor to write into; returned as ``combined_x``.
            combine_wait_recv_cost_stats: optional ``[R]`` int64; cycles spent waiting per source rank are ADDED.

        Returns:
            ``(combined_x, event, hook)``: ``[N, H]`` bfloat16 (valid after the receive has run: in stream order,
            or after the hook); an :class:`EventOverlap`; the hook (callable, exactly once) or None.
        """
        op = "low_latency_combine"
        rt = self._ll_rt(op)
        if async_finish and return_recv_hook:
            raise invalid_argument(f"{op}: async_finish and return_recv_hook are mutually exclusive (DeepEP V1 rule)")
        hd, El, T, hidden, num_experts = self._ll_unpack_handle(op, handle)
        R, dev = self.group_size, self._dev
        if x is not None or not zero_copy:
            check_tensor(op, "x", x, ("bfloat16",), (El, R * T, hidden), True, dev)
        check_tensor(op, "topk_idx", topk_idx, INDEX_DTYPES, (None, None), True, dev)
        num_tokens, num_topk = topk_idx.shape
        if num_tokens > T:
            raise invalid_argument(f"{op}: topk_idx has {num_tokens} tokens, more than the handle's "
                                   f"num_max_dispatch_tokens_per_rank = {T}")
        if not 1 <= num_topk <= _C.LOW_LATENCY_MAX_TOPK:
            raise invalid_argument(f"{op}: topk_idx must have 1..{_C.LOW_LATENCY_MAX_TOPK} columns, got {num_topk}")
        check_tensor(op, "topk_weights", topk_weights, ("float32",), (num_tokens, num_topk), True, dev)
        if out is not None:
            check_tensor(op, "out", out, ("bfloat16",), (num_tokens, hidden), True, dev)
        if combine_wait_recv_cost_stats is not None:
            check_tensor(op, "combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, ("int64",), (R,), True,
                         dev)

        torch = torch_module()
        compute = current_raw_stream(self._device)
        combined_x = out if out is not None else torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=dev)
        args = _C.LowLatencyCombineArgs()
        if x is not None:
            args.x = x.data_ptr()
        args.topk_idx, args.topk_int64 = topk_idx.data_ptr(), dtype_name(topk_idx.dtype) == "int64"
        args.topk_weights, args.num_tokens, args.num_topk = topk_weights.data_ptr(), num_tokens, num_topk
        args.zero_copy, args.use_logfmt = bool(zero_copy), bool(use_logfmt)
        args.return_recv_hook = bool(return_recv_hook)
        if combine_wait_recv_cost_stats is not None:
            args.combine_wait_recv_cost_stats = combine_wait_recv_cost_stats.data_ptr()
        outs = _C.LowLatencyCombineOutputs()
        outs.combined_x = combined_x.data_ptr()
        stream = self._ll_stream(rt, compute, return_recv_hook)
        core_hook = rt.low_latency_combine(args, hd, outs, stream)
        event, hook = self._ll_finish(op, compute, async_finish, return_recv_hook, core_hook,
                                      (x, topk_idx, topk_weights, combine_wait_recv_cost_stats, combined_x)
                                      + tuple(handle[:2]))
        return combined_x, event, hook

    def get_next_low_latency_combine_buffer(self, handle):
        """The zero-copy combine input (DeepEP 5.12): a ``[E/R, R*T, H]`` bfloat16 view of this rank's window.

        Write the expert outputs there in the packed positions of the dispatch (ordered before the combine on
        its stream), then call ``low_latency_combine(..., zero_copy=True)``. Unlike DeepEP's view (row stride
        larger than H) the rows are contiguous (strides ``[R*T*H, H, 1]``); index it the same way. The memory
        is the same for every call with the same shapes and belongs to OpenEP between calls: write it only
        after the previous low-latency combine has been issued on the same stream and before the next one.
        The view keeps the Buffer's memory alive until :meth:`destroy` (after which it must not be used). No
        CUDA call is made after the first call for given shapes, so it may be called inside a graph capture.
        """
        op = "get_next_low_latency_combine_buffer"
        rt = self._ll_rt(op)
        hd, El, T, hidden, num_experts = self._ll_unpack_handle(op, handle)
        key = (T, hidden, num_experts)
        cache = self.__dict__.setdefault("_zero_copy_views", {})
        if key not in cache:
            torch = torch_module()
            address = rt.get_next_low_latency_combine_buffer(hd)
            shape = (El, self.group_size * T, hidden)
            # the view holds the runtime (not the Buffer: no reference cycle through the cache)
            cache[key] = _wrap_device_memory(rt, address, El * self.group_size * T * hidden * 2,
                                             self._dev).view(torch.bfloat16).view(shape)
        return cache[key]

    # Shrink mode (failure masking; C++ semantics in include/openep/buffer.hpp, BufferOptions::enable_shrink).
    def _shrink_rt(self, op):
        rt = self._rt(op)
        if not self.enable_shrink:
            raise invalid_argument(f"{op} requires Buffer(enable_shrink=True)")
        return rt

    def low_latency_update_mask_buffer(self, rank_to_mask, mask=False):
        """Shrink mode: masks (``mask=True``) or unmasks rank ``rank_to_mask`` (DeepEP 2.8), on the current stream.

        A masked rank is not sent to, not waited for, and its experts' rows are left out of every low-latency
        combine. Requires ``enable_shrink=True``.
        """
        op = "low_latency_update_mask_buffer"
        rt = self._shrink_rt(op)
        check_int(op, "rank_to_mask", rank_to_mask, 0)
        rt.low_latency_update_mask_buffer(rank_to_mask, bool(mask), torch_module().cuda.current_stream().cuda_stream)

    def low_latency_query_mask_buffer(self, mask_status):
        """Shrink mode: copies this rank's mask into ``mask_status``, an int32 CUDA tensor of ``[group_size]``
        (1 = masked), on the current stream (DeepEP 2.8). Requires ``enable_shrink=True``."""
        op = "low_latency_query_mask_buffer"
        rt = self._shrink_rt(op)
        check_tensor(op, "mask_status", mask_status, ("int32",), (self.group_size,), True, self._dev)
        rt.low_latency_query_mask_buffer(mask_status.data_ptr(), torch_module().cuda.current_stream().cuda_stream)

    def low_latency_clean_mask_buffer(self):
        """Shrink mode: unmasks every rank, on the current stream (DeepEP 2.8). Requires ``enable_shrink=True``."""
        op = "low_latency_clean_mask_buffer"
        rt = self._shrink_rt(op)
        rt.low_latency_clean_mask_buffer(torch_module().cuda.current_stream().cuda_stream)
