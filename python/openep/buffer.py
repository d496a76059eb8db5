"""openep.Buffer: DeepEP V1's ``deep_ep.Buffer`` on OpenEP's NCCL-only core.

Names, argument order, defaults, return tuples and stream semantics follow DeepEP V1
(../shared/docs/deepep-v1-interface.md sections 2, 4 and 5.11), so code written for ``deep_ep`` runs unchanged
after ``import openep as deep_ep``, or after ``import deep_ep`` once OpenEP's alias is installed
(``pip install ./python/deep_ep_alias``, see python/deep_ep_alias/README.md), for everything OpenEP has landed:
intranode normal mode and low-latency mode (EP 2..8 ranks on one NVLink domain), internode normal mode (NVLink inside
a node, NCCL between nodes; from Python run only on fake nodes over sockets), LogFMT combine and shrink mode. What
OpenEP has no counterpart for (CUDA IPC and NVSHMEM bootstrap) raises :class:`openep.OpenEPNotAvailableError`.

Streams (DeepEP 5.11), for get_dispatch_layout, dispatch and combine (the low-latency rules are stated above
``Buffer.low_latency_dispatch`` and in its docstring):
  * kernels run on the Buffer's communication stream (``get_comm_stream()``), which first waits for
    ``previous_event`` if it holds an event, else for the current stream (``None`` and an EventOverlap whose
    ``event`` is None, e.g. the one a call with ``async_finish=False`` returns, both mean "no previous event");
  * ``async_finish=True``: an event is recorded on the communication stream and returned in the EventOverlap,
    and every input/output tensor is ``record_stream``-ed on it; the current stream does not wait;
  * ``async_finish=False``: the current stream waits for the communication stream before the call returns
    (no host synchronisation), and the EventOverlap holds ``None``;
  * ``allocate_on_comm_stream=True`` (requires a ``previous_event`` holding an event and ``async_finish=True``):
    outputs are allocated with the communication stream current, and also ``record_stream``-ed on the calling
    stream.
A non-cached dispatch with ``num_worst_tokens == 0`` blocks the host until the receive counts are known (to
size its outputs); cached dispatch, worst-case dispatch and combine never block the host.
"""

import contextlib
import os
from collections import namedtuple

from . import _C
from ._checks import INDEX_DTYPES, SCALE_DTYPES, check_int, check_tensor, dtype_name, element_size
from ._loader import check_nccl_version
from ._runtime import Runtime, _wrap_device_memory
from ._torch import current_raw_stream, torch_module
from .errors import invalid_argument
from .utils import EventHandle, EventOverlap, _previous_event_handle

__all__ = ["Buffer", "IntranodeHandle", "InternodeHandle", "LowLatencyHandle"]

_IntranodeHandleBase = namedtuple(
    "IntranodeHandle",
    ["rank_prefix_matrix", "num_tokens_per_src", "reserved", "recv_src_idx", "is_token_in_rank", "send_pos"])


class IntranodeHandle(_IntranodeHandleBase):
    """The handle an intranode dispatch returns: a 6-tuple laid out like DeepEP V1's, all tensors on the GPU.

    ==  ====================  ===============  ===========================================================
    #   name                  shape / dtype    content
    ==  ====================  ===============  ===========================================================
    0   rank_prefix_matrix    [R, R] int32     [i][j] = rows rank j receives from ranks 0..i (inclusive);
                                               column ``rank`` is DeepEP's, and [R-1][rank] = rows received
    1   num_tokens_per_src    [R] int32        token count of every rank in that dispatch (DeepEP: the
                                               channel prefix matrix; OpenEP has no channels)
    2   reserved              None             (DeepEP: recv_channel_prefix_matrix; OpenEP has no channels)
    3   recv_src_idx          [N_recv] int32   index of every received row in its source rank's ``x``
    4   is_token_in_rank      [N, R] bool      the routing mask passed to dispatch
    5   send_pos              [N, R] int32     row of my token t in rank r's received rows, -1 if not sent
                                               (DeepEP: send_head, a queue slot or -1)
    ==  ====================  ===============  ===========================================================

    Received rows are ordered by (source rank, source token index), so rows from rank s are
    ``rank_prefix_matrix[s-1, rank] : rank_prefix_matrix[s, rank]``. With ``num_worst_tokens > 0``,
    ``N_recv = num_worst_tokens`` and the real count is ``rank_prefix_matrix[R-1, rank]``.
    The tensors must stay unmodified while the handle is used (combine, cached dispatch).
    """
    # No __slots__: a handle made by Buffer.dispatch carries its already-checked core form (_openep_checked),
    # so combine and cached dispatch skip re-validating it (~10 us per call).


_InternodeHandleBase = namedtuple(
    "InternodeHandle",
    ["is_token_in_rank", "rdma_channel_prefix_matrix", "gbl_channel_prefix_matrix", "recv_rdma_channel_prefix_matrix",
     "recv_rdma_rank_prefix_sum", "recv_gbl_channel_prefix_matrix", "recv_gbl_rank_prefix_sum", "recv_src_meta",
     "send_rdma_head", "send_nvl_head"])


class InternodeHandle(_InternodeHandleBase):
    """The handle an internode dispatch returns: DeepEP V1's 10-tuple where its meaning is kept (GPU tensors).

    ==  ===============================  ===================  ==================================================
    #   name                             shape / dtype        content
    ==  ===============================  ===================  ==================================================
    0   is_token_in_rank                 [N, R] bool          the routing mask passed to dispatch
    1   rdma_channel_prefix_matrix       None                 (DeepEP: per channel; OpenEP has no channels)
    2   gbl_channel_prefix_matrix        None                 (same)
    3   recv_rdma_channel_prefix_matrix  None                 (same)
    4   recv_rdma_rank_prefix_sum        [num_nodes] int32    inclusive prefix of the records this rank forwards,
                                                              per source node
    5   recv_gbl_channel_prefix_matrix   None                 (no channels)
    6   recv_gbl_rank_prefix_sum         [R] int32            inclusive prefix of the rows received per source
                                                              rank (``handle[-4]`` in DeepEP's callers)
    7   recv_src_meta                    [N_recv, 2] int32    (source rank, record index at its forwarder)
    8   send_rdma_head                   [N, num_nodes] int32 index of token t among my records to node n, or -1
    9   send_nvl_head                    [N_rdma_recv] int32  OpenEP: bit j set if forwarded record i went to local
                                                              rank j (DeepEP: [N_rdma_recv, M] queue slots)
    ==  ===============================  ===================  ==================================================

    The handle also holds OpenEP's own state (send positions, node prefixes, source indices and the counts of the
    network legs): pass the handle internode_dispatch returned, unmodified, to combine and cached dispatch.
    """


_LowLatencyHandleBase = namedtuple(
    "LowLatencyHandle",
    ["packed_recv_src_info", "packed_recv_layout_range", "num_max_dispatch_tokens_per_rank", "hidden",
     "num_experts"])


class LowLatencyHandle(_LowLatencyHandleBase):
    """The handle a low-latency dispatch returns: DeepEP V1's 5-tuple, tensors on the GPU.

    ==  ================================  ==================  ================================================
    #   name                              shape / dtype       content
    ==  ================================  ==================  ================================================
    0   packed_recv_src_info              [E/R, R*T] int32    source token index (row of the source rank's x)
                                                              of every packed row
    1   packed_recv_layout_range          [E/R, R] int64      ``(start << 32) | count``: the rows local expert
                                                              e received from source rank s
    2   num_max_dispatch_tokens_per_rank  int                 T of the dispatch
    3   hidden                            int                 H of the dispatch
    4   num_experts                       int                 E of the dispatch
    ==  ================================  ==================  ================================================

    The ranges of one expert are consecutive in source-rank order; inside a range the rows come in no
    particular order. Pass the handle unchanged to :meth:`Buffer.low_latency_combine` (and
    :meth:`Buffer.get_next_low_latency_combine_buffer`); the tensors must stay unmodified until then.
    """
    # No __slots__: see IntranodeHandle (_openep_checked).


# internode_backend values and openep::InternodeBackend (include/openep/buffer.hpp).
_INTERNODE_BACKENDS = {"host_p2p": 0, "gin": 1}


def _env_flag(name):
    """True for 1/true/yes/on, False when unset or 0/false/no/off/empty; anything else is an error."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise invalid_argument(f"{name}: expected 0/1/true/false/yes/no/on/off, got {os.environ[name]!r}")


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


class Buffer:
    """The communication buffer of one expert-parallel group (DeepEP V1's ``deep_ep.Buffer``).

    One process per GPU; every rank of ``group`` creates its Buffer with the same arguments (collective).
    OpenEP creates its own NCCL communicator over the ranks of ``group`` (an NCCL unique id is exchanged
    through ``group``), so the group's own communicator is never touched. Create one Buffer at start-up and
    keep it: creation registers an NCCL symmetric window (a world barrier).

    Args:
        group: the ``torch.distributed`` process group of the EP ranks (or None when ``comm`` is given). Its
            ranks must share one NVLink domain (intranode; 2..8 ranks). The current CUDA device
            (``torch.cuda.set_device``) is the Buffer's device.
        num_nvl_bytes: bytes for the normal-mode kernels, a multiple of 128. OpenEP writes every received row
            straight into this region, so it must hold the rows this rank receives: see
            :meth:`get_nvl_buffer_size_hint_for_tokens`; a call that does not fit raises
            ``OpenEPError(code="buffer_too_small")`` naming the size needed.
        num_rdma_bytes: bytes for the low-latency kernels (and future internode mode), a multiple of 128; size
            it with :meth:`get_low_latency_rdma_size_hint` (OpenEP's requirement; a call that does not fit raises
            ``OpenEPError(code="buffer_too_small")`` naming the size needed).
        low_latency_mode: required (True) by the low-latency methods, as in DeepEP. The low-latency kernels use
            NVLink among the ranks of one NVLink domain; ranks on other nodes need ``allow_network``.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, use_fabric: accepted for DeepEP
            compatibility and ignored (OpenEP uses NCCL symmetric memory, not NVSHMEM queue pairs or CUDA IPC).
        explicitly_destroy: if True, :meth:`destroy` must be called; otherwise resources are released when the
            Buffer is garbage-collected (a collective barrier, bounded by ``timeout_seconds``).
        enable_shrink: low-latency failure masking (DeepEP's shrink mode; low-latency mode over NVLink only): a
            rank whose low-latency receive (or barrier) does not arrive within ``timeout_seconds`` is masked
            instead of raising, and the survivors carry on without it; see the ``low_latency_*_mask_buffer``
            methods. Its kernels have run on virtual ranks (C++ tests, EP2/4/8); from Python not yet on a GPU.
        comm: an mpi4py communicator to use instead of ``group`` for the unique-id exchange.
        timeout_seconds: OpenEP extension: how long a device-side wait on a peer may take before it is reported
            as ``OpenEPError(code="timeout")`` (default 10 s, or ``OPENEP_TIMEOUT_SECONDS``).
        allow_network: OpenEP extension (default False, or ``OPENEP_ALLOW_NETWORK=1``): lets a low-latency Buffer
            whose ranks span several NVLink domains (nodes) use the network path over NCCL GIN. EXPERIMENTAL: that
            path has never run on a real network (no RDMA NICs on the test machines); it has run only under
            OpenEP's loopback GIN test plugin between fake nodes on one H200 (2026-12-02, one rank per node). Ignored
            when all ranks share one NVLink domain (NVLink is always used there); without it such a group raises
            ``OpenEPError(code="unsupported")``. Normal mode across nodes (internode) needs no flag, only
            ``num_rdma_bytes > 0``.
        internode_backend: OpenEP extension, internode normal mode only (default ``"host_p2p"``, or
            ``OPENEP_INTERNODE_BACKEND``): how the network leg between nodes moves. ``"host_p2p"``: host-enqueued
            NCCL send/recv, any network NCCL runs on. ``"gin"``: device-initiated NCCL GIN puts and signals; needs
            RDMA NICs (InfiniBand / RoCE) that NCCL drives with GIN, else ``OpenEPError(code="unsupported")`` at
            creation. Never run on a real network (no RDMA NICs on the test machines); it has run only under the
            loopback GIN test plugin between fake nodes on one H200 (2026-12-02, one rank per node: the internode
            suite passes bitwise in 2- and 4-node worlds).

    Attributes (DeepEP's): ``rank``, ``group``, ``group_size``, ``num_nvl_bytes``, ``num_rdma_bytes``,
    ``low_latency_mode``, ``explicitly_destroy``, ``enable_shrink``, ``runtime`` (None after destroy()): an
    ``openep._runtime.Runtime`` answering DeepEP's runtime queries (``get_num_rdma_ranks()``,
    ``get_rdma_rank()``, ``get_root_rdma_rank(global_)``, ``get_local_device_id()``, ``is_available()``,
    ``is_internode_available()``, ``get_comm_stream()``, ``get_local_buffer_tensor(dtype, offset,
    use_rdma_buffer)``) with DeepEP's meaning; DeepEP's IPC/NVSHMEM bootstrap methods raise (OpenEP has none).
    """

    #: SMs the default configs use (DeepEP's class attribute); change it with :meth:`set_num_sms`.
    num_sms = 20

    def __init__(self, group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                 allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, use_fabric=False,
                 explicitly_destroy=False, enable_shrink=False, comm=None, timeout_seconds=None,
                 allow_network=None, internode_backend=None):
        self.runtime = None
        # Checks that need no GPU come first.
        if group is None and comm is None:
            raise ValueError("openep.Buffer: either group (a torch.distributed ProcessGroup) or comm (an mpi4py "
                             "communicator) must be given")
        check_int("Buffer", "num_nvl_bytes", num_nvl_bytes, 0)
        check_int("Buffer", "num_rdma_bytes", num_rdma_bytes, 0)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if value % 128 != 0:
                raise invalid_argument(f"Buffer: {name} must be a multiple of 128, got {value}")
        if timeout_seconds is None:
            timeout_seconds = float(os.environ.get("OPENEP_TIMEOUT_SECONDS", "10"))
        if not (0 < timeout_seconds <= 3600):
            raise invalid_argument(f"Buffer: timeout_seconds must be in (0, 3600], got {timeout_seconds}")
        if allow_network is None:
            allow_network = _env_flag("OPENEP_ALLOW_NETWORK")
        if not isinstance(allow_network, bool):
            raise invalid_argument(f"Buffer: allow_network expected a bool or None, got {type(allow_network).__name__}")
        if internode_backend is None:
            internode_backend = os.environ.get("OPENEP_INTERNODE_BACKEND", "host_p2p")
        if internode_backend not in _INTERNODE_BACKENDS:
            raise invalid_argument(f"Buffer: internode_backend must be one of {sorted(_INTERNODE_BACKENDS)}, got "
                                   f"{internode_backend!r}")
        check_nccl_version()

        torch = torch_module()
        self.group = group if group is not None else comm
        if group is not None:
            self.rank, self.group_size = group.rank(), group.size()
        else:
            self.rank, self.group_size = comm.Get_rank(), comm.Get_size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.timeout_seconds = timeout_seconds
        self.allow_network = allow_network
        self.internode_backend = internode_backend
        self._device = torch.cuda.current_device()
        self._dev = torch.device("cuda", self._device)  # a device object: cheaper than a string per torch.empty
        self._token = object()  # marks the handles this Buffer made (their checked form is reused)

        # One NCCL unique id from rank 0 of the group, shipped through the group itself.
        uid = _C.make_unique_id() if self.rank == 0 else None
        if group is not None:
            import torch.distributed as dist
            gathered = [None] * self.group_size
            dist.all_gather_object(gathered, uid, group=group)
            uid = gathered[0]
        else:
            uid = comm.bcast(uid, root=0)
        self.runtime = Runtime(uid, self.rank, self.group_size, self._device, num_nvl_bytes, num_rdma_bytes,
                               bool(low_latency_mode), float(timeout_seconds), allow_network,
                               _INTERNODE_BACKENDS[internode_backend], bool(enable_shrink))
        self._internode = bool(self.runtime.is_internode)
        self._comm_ptr = self.runtime.comm_stream
        self._comm_stream = torch.cuda.ExternalStream(self._comm_ptr, device=self._device)

    # ------------------------------------------------------------------------------------------------------
    # Lifetime
    def destroy(self):
        """Releases the Buffer now (DeepEP: requires ``explicitly_destroy=True``). Collective: every rank calls it.

        Waits for the communication stream, runs a final device barrier with the peers, then frees the
        symmetric window and the private NCCL communicator. ``runtime`` becomes None; later calls raise.
        """
        if not self.explicitly_destroy:
            raise invalid_argument("Buffer.destroy: only allowed with explicitly_destroy=True (DeepEP V1 rule); "
                                   "otherwise the Buffer is released when garbage-collected")
        if self.runtime is None:
            raise invalid_argument("Buffer.destroy: the Buffer was already destroyed")
        self.__dict__.pop("_zero_copy_views", None)
        self.runtime.destroy()
        self.runtime = None

    def __del__(self):
        if getattr(self, "explicitly_destroy", False) and getattr(self, "runtime", None) is not None:
            import sys
            print("OpenEP warning: Buffer(explicitly_destroy=True) was never destroyed; releasing it now",
                  file=sys.stderr)

    def _rt(self, op):
        if self.runtime is None:
            raise invalid_argument(f"{op}: this Buffer was destroyed")
        return self.runtime

    # ------------------------------------------------------------------------------------------------------
    # Static helpers (DeepEP 2.3)
    @staticmethod
    def is_sm90_compiled():
        """True: OpenEP is always built for sm_90a (Hopper)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms):
        """Sets the SM count of the default configs for all Buffers (``Buffer.num_sms``). Must be even and > 0."""
        if isinstance(new_num_sms, bool) or not isinstance(new_num_sms, int) or new_num_sms <= 0 or \
                new_num_sms % 2 != 0:
            raise invalid_argument(f"Buffer.set_num_sms: new_num_sms must be an even int > 0, got {new_num_sms!r}")
        _C.set_default_num_sms(new_num_sms)
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture():
        """Records an event on the current stream and returns it as an :class:`EventOverlap` (for previous_event)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks):
        """DeepEP V1's recommended dispatch :class:`Config` for ``num_ranks`` (2, 4, 8, 16, ..., 160), with
        ``num_sms = Buffer.num_sms``. Other rank counts raise ``OpenEPError(code="invalid_argument")``."""
        c = _C.get_dispatch_config(num_ranks)
        return _C.Config(Buffer.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
                         c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens)

    @staticmethod
    def get_combine_config(num_ranks):
        """DeepEP V1's recommended combine :class:`Config` for ``num_ranks``, with ``num_sms = Buffer.num_sms``."""
        c = _C.get_combine_config(num_ranks)
        return _C.Config(Buffer.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
                         c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens)

    @staticmethod
    def get_nvl_buffer_size_hint_for_tokens(num_ranks, max_tokens_per_rank, hidden, x_elem_bytes=2, num_scales=0,
                                            num_topk=0):
        """OpenEP extension: ``num_nvl_bytes`` that intranode dispatch and combine need when every rank sends up
        to ``max_tokens_per_rank`` tokens of ``hidden`` elements of ``x_elem_bytes`` bytes (2 = BF16, 1 = FP8),
        with ``num_scales`` 4-byte scales and ``num_topk`` top-k columns per token (worst case: every token goes
        to every rank). A multiple of 128. For BF16 and FP8 on one Buffer take the larger of the two."""
        return _C.intranode_buffer_size_hint(num_ranks, max_tokens_per_rank, hidden, x_elem_bytes, num_scales,
                                             num_topk)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts):
        """``num_rdma_bytes`` a low-latency Buffer needs for these shapes (a multiple of 128).

        OpenEP's own requirement (``openep::low_latency_buffer_size_hint``), not DeepEP's formula: code that sizes
        its Buffer with this method keeps working. It covers BF16 and FP8 dispatch and the zero-copy combine
        buffer (T=128, H=7168, E=288, EP2: 1,615,396,864 bytes; DeepEP's formula gives 2,146,961,792). Unlike DeepEP's, ``num_ranks`` enters it (local expert count).

        Args:
            num_max_dispatch_tokens_per_rank: T, 1..4096. hidden: H, a positive multiple of 8.
            num_ranks: R, the group size. num_experts: E, a multiple of R.
        """
        op = "get_low_latency_rdma_size_hint"
        for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
                            ("hidden", hidden), ("num_ranks", num_ranks), ("num_experts", num_experts)):
            check_int(op, name, value, 1)
        return _C.low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ------------------------------------------------------------------------------------------------------
    # Utilities (DeepEP 2.9)
    def get_comm_stream(self):
        """The communication stream the normal-mode kernels run on, as a ``torch.cuda.Stream``
        (a ``torch.cuda.ExternalStream`` over the core Buffer's stream)."""
        self._rt("get_comm_stream")
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype, size=None, offset=0, use_rdma_buffer=False):
        """This rank's normal-mode region (or low-latency region with ``use_rdma_buffer``) as a 1-D tensor.

        Args:
            dtype: element type of the view.
            size: optional ``torch.Size``; the first ``size.numel()`` elements are returned viewed as ``size``.
            offset: start of the view in BYTES (as DeepEP's C++ does). Unlike DeepEP, the element count is
                reduced by the offset so the view never runs past the region.
        The memory belongs to OpenEP's kernels between calls; writing it while a call runs corrupts that call.
        """
        t = self._rt("get_local_buffer_tensor").get_local_buffer_tensor(dtype, offset, use_rdma_buffer)
        if size is not None:
            n = 1
            for d in size:
                n *= d
            if n > t.numel():
                raise invalid_argument(f"get_local_buffer_tensor: size {tuple(size)} needs {n} elements, the region "
                                       f"holds {t.numel()}")
            t = t[:n].view(size)
        return t

    def synchronize(self):
        """OpenEP extension: waits for the communication stream and raises any error a kernel recorded (e.g. a
        peer timeout) as OpenEPError."""
        self._rt("synchronize").synchronize(self._comm_stream.cuda_stream)

    # ------------------------------------------------------------------------------------------------------
    # Stream plumbing (DeepEP 5.11)
    def _begin(self, op, previous_event, async_finish, allocate_on_comm_stream):
        """Orders the communication stream after the caller's work; returns the caller's stream for _finish.

        ``previous_event``: None or an EventOverlap whose event is None mean "no previous event" (DeepEP V1), so
        the communication stream waits for the current stream; otherwise it waits for that event only.
        Hot path: raw stream addresses and one reused event in the core (Runtime.stream_wait), no torch Stream
        or Event objects (those cost ~6-8 us each per call)."""
        previous = _previous_event_handle(op, previous_event)
        if allocate_on_comm_stream and (previous is None or not async_finish):
            raise invalid_argument(f"{op}: allocate_on_comm_stream=True requires a previous_event holding an event "
                                   f"(None or EventOverlap(None) is no event) and async_finish=True (DeepEP V1 rule)")
        compute = current_raw_stream(self._device)
        # the torch Stream object is only needed to record_stream the outputs on it (allocate_on_comm_stream)
        compute_obj = torch_module().cuda.current_stream() if allocate_on_comm_stream else None
        if previous is not None:
            previous.stream_wait(self._comm_stream)
        else:
            self.runtime.stream_wait(self._comm_ptr, compute)
        return compute, compute_obj

    def _alloc_context(self, allocate_on_comm_stream):
        if allocate_on_comm_stream:
            return torch_module().cuda.stream(self._comm_stream)
        return contextlib.nullcontext()

    def _finish(self, compute, async_finish, allocate_on_comm_stream, tensors):
        compute_ptr, compute_obj = compute
        if async_finish:
            torch = torch_module()
            event = EventHandle(self._comm_stream)
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self._comm_stream)
                    if allocate_on_comm_stream:
                        t.record_stream(compute_obj)
            return EventOverlap(event)
        self.runtime.stream_wait(compute_ptr, self._comm_ptr)
        return EventOverlap(None)

    # ------------------------------------------------------------------------------------------------------
    # Normal mode (DeepEP 2.4 - 2.6)
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
            layout = {
                "topk_idx": topk_idx.data_ptr(), "topk_int64": int(dtype_name(topk_idx.dtype) == "int64"),
                "num_tokens": num_tokens, "num_topk": num_topk, "num_experts": num_experts,
                "num_tokens_per_rank": num_tokens_per_rank.data_ptr(),
                "num_tokens_per_expert": num_tokens_per_expert.data_ptr(),
                "is_token_in_rank": is_token_in_rank.data_ptr()}
            num_tokens_per_rdma_rank = None
            if getattr(self, "_internode", False):
                num_tokens_per_rdma_rank = torch.empty((rt.num_nodes,), dtype=torch.int32, device=dev)
                layout["num_tokens_per_rdma_rank"] = num_tokens_per_rdma_rank.data_ptr()
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
        config = self.get_dispatch_config(self.group_size) if config is None else config
        x, scales = self._check_x(op, x)
        check_int(op, "expert_alignment", expert_alignment, 1)
        check_int(op, "num_worst_tokens", num_worst_tokens, 0)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise invalid_argument("dispatch: cached mode (handle given) takes no topk_idx/topk_weights")
            return self._cached_dispatch(rt, x, scales, handle, config, previous_event, async_finish,
                                         allocate_on_comm_stream)
        torch = torch_module()
        R, dev = self.group_size, self._dev
        num_tokens, hidden = x.shape
        for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                        ("num_tokens_per_expert", num_tokens_per_expert)):
            if t is None:
                raise invalid_argument(f"dispatch: {name} is required without a handle (from get_dispatch_layout)")
        check_tensor(op, "num_tokens_per_rank", num_tokens_per_rank, ("int32",), (R,), True, dev)
        check_tensor(op, "is_token_in_rank", is_token_in_rank, ("bool",), (num_tokens, R), True, dev)
        check_tensor(op, "num_tokens_per_expert", num_tokens_per_expert, ("int32",), (None,), True, dev)
        num_experts = num_tokens_per_expert.shape[0]
        if (topk_idx is None) != (topk_weights is None):
            raise invalid_argument("dispatch: topk_idx and topk_weights must be given together")
        num_topk = 0
        if topk_idx is not None:
            check_tensor(op, "topk_idx", topk_idx, INDEX_DTYPES, (num_tokens, None), True, dev)
            num_topk = topk_idx.shape[1]
            check_tensor(op, "topk_weights", topk_weights, ("float32",), (num_tokens, num_topk), True, dev)
        args = self._dispatch_args(x, scales, config)
        args.update({"topk_idx": topk_idx.data_ptr() if topk_idx is not None else 0,
                     "topk_int64": int(topk_idx is None or dtype_name(topk_idx.dtype) == "int64"),
                     "topk_weights": topk_weights.data_ptr() if topk_weights is not None else 0,
                     "num_topk": num_topk, "is_token_in_rank": is_token_in_rank.data_ptr(),
                     "num_tokens_per_rank": num_tokens_per_rank.data_ptr(),
                     "num_tokens_per_expert": num_tokens_per_expert.data_ptr(), "num_experts": num_experts,
                     "expert_alignment": expert_alignment, "num_worst_tokens": num_worst_tokens})
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            rank_prefix_matrix = torch.empty((R, R), dtype=torch.int32, device=dev)
            num_tokens_per_src = torch.empty((R,), dtype=torch.int32, device=dev)
            send_pos = torch.empty((num_tokens, R), dtype=torch.int32, device=dev)
            hd = {"num_tokens": num_tokens, "is_token_in_rank": is_token_in_rank.data_ptr(),
                  "rank_prefix_matrix": rank_prefix_matrix.data_ptr(),
                  "num_tokens_per_src": num_tokens_per_src.data_ptr(), "send_pos": send_pos.data_ptr()}
            stream = self._comm_stream.cuda_stream
            num_recv, per_expert = rt.dispatch_prepare(args, hd, stream)
            recv_src_idx = torch.empty((num_recv,), dtype=torch.int32, device=dev)
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, num_recv)
            recv_topk_idx = recv_topk_weights = None
            if num_topk > 0:
                recv_topk_idx = torch.empty((num_recv, num_topk), dtype=topk_idx.dtype, device=dev)
                recv_topk_weights = torch.empty((num_recv, num_topk), dtype=torch.float32, device=dev)
                outs.update(recv_topk_idx=recv_topk_idx.data_ptr(), recv_topk_weights=recv_topk_weights.data_ptr())
            hd.update(num_recv_tokens=num_recv, recv_src_idx=recv_src_idx.data_ptr())
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

    def _dispatch_args(self, x, scales, config):
        num_tokens, hidden = x.shape
        args = {"x": x.data_ptr(), "num_tokens": num_tokens, "hidden": hidden, "x_elem_bytes": element_size(x),
                "config": config}
        if scales is not None:
            args.update(x_scales=scales.data_ptr(), num_scales=scales.shape[1],
                        scale_token_stride=scales.stride(0), scale_hidden_stride=scales.stride(1))
        return args

    def _recv_tensors(self, x, scales, num_recv):
        torch = torch_module()
        recv_x = torch.empty((num_recv, x.shape[1]), dtype=x.dtype, device=self._dev)
        outs = {"recv_x": recv_x.data_ptr()}
        recv_scales = None
        if scales is not None:
            recv_scales = torch.empty((num_recv, scales.shape[1]), dtype=scales.dtype, device=self._dev)
            outs["recv_x_scales"] = recv_scales.data_ptr()
        return recv_x, recv_scales, outs

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
        hd = {"num_tokens": is_token_in_rank.shape[0], "num_recv_tokens": recv_src_idx.shape[0],
              "is_token_in_rank": is_token_in_rank.data_ptr(), "rank_prefix_matrix": rank_prefix_matrix.data_ptr(),
              "num_tokens_per_src": num_tokens_per_src.data_ptr(), "send_pos": send_pos.data_ptr(),
              "recv_src_idx": recv_src_idx.data_ptr()}
        return hd

    def _cached_dispatch(self, rt, x, scales, handle, config, previous_event, async_finish,
                         allocate_on_comm_stream):
        op = "dispatch"
        hd = self._unpack_handle(op, handle)
        if x.shape[0] != hd["num_tokens"]:
            raise invalid_argument(f"dispatch: cached mode expected x with {hd['num_tokens']} rows (the handle's "
                                   f"token count), got {x.shape[0]}")
        args = self._dispatch_args(x, scales, config)
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, hd["num_recv_tokens"])
            rt.dispatch_cached(args, hd, outs, self._comm_stream.cuda_stream)
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, scales, recv_x, recv_scales) + tuple(handle))
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
        ``launch(args, handle dict, outputs, stream)`` is the core call; ``handle_tensors`` are kept alive."""
        torch = torch_module()
        dev = self._dev
        num_recv, num_tokens = hd["num_recv_tokens"], hd["num_tokens"]
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
        args = {"x": x.data_ptr(), "hidden": hidden, "num_topk": num_topk, "config": config,
                "topk_weights": topk_weights.data_ptr() if topk_weights is not None else 0}
        for i, b in enumerate(biases):
            args[f"bias_{i}"] = b.data_ptr()
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            combined_x = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=dev)
            outs = {"combined_x": combined_x.data_ptr()}
            combined_w = None
            if num_topk > 0:
                combined_w = torch.empty((num_tokens, num_topk), dtype=torch.float32, device=dev)
                outs["combined_topk_weights"] = combined_w.data_ptr()
            launch(args, hd, outs, self._comm_stream.cuda_stream)
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, topk_weights, combined_x, combined_w) + tuple(biases) + handle_tensors)
        return combined_x, combined_w, event

    # ------------------------------------------------------------------------------------------------------
    # Internode normal mode (DeepEP 2.7; C++ semantics in include/openep/internode.hpp). Run from Python on fake
    # NCCL nodes over sockets (tests/python/fakenode_internode.py); never on a real network (docs/INTERNODE.md).
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
        config = self.get_dispatch_config(self.group_size) if config is None else config
        x, scales = self._check_x(op, x)
        check_int(op, "expert_alignment", expert_alignment, 1)
        check_int(op, "num_worst_tokens", num_worst_tokens, 0)
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise invalid_argument(f"{op}: cached mode (handle given) takes no topk_idx/topk_weights")
            return self._internode_cached_dispatch(rt, x, scales, handle, config, previous_event, async_finish,
                                                   allocate_on_comm_stream)
        torch = torch_module()
        R, dev = self.group_size, self._dev
        N, M = rt.num_nodes, rt.ranks_per_node
        num_tokens = x.shape[0]
        for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("num_tokens_per_rdma_rank",
                        num_tokens_per_rdma_rank), ("is_token_in_rank", is_token_in_rank),
                        ("num_tokens_per_expert", num_tokens_per_expert)):
            if t is None:
                raise invalid_argument(f"{op}: {name} is required without a handle (from get_dispatch_layout)")
        check_tensor(op, "num_tokens_per_rank", num_tokens_per_rank, ("int32",), (R,), True, dev)
        check_tensor(op, "num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, ("int32",), (N,), True, dev)
        check_tensor(op, "is_token_in_rank", is_token_in_rank, ("bool",), (num_tokens, R), True, dev)
        check_tensor(op, "num_tokens_per_expert", num_tokens_per_expert, ("int32",), (None,), True, dev)
        if (topk_idx is None) != (topk_weights is None):
            raise invalid_argument(f"{op}: topk_idx and topk_weights must be given together")
        num_topk = 0
        if topk_idx is not None:
            check_tensor(op, "topk_idx", topk_idx, INDEX_DTYPES, (num_tokens, None), True, dev)
            num_topk = topk_idx.shape[1]
            check_tensor(op, "topk_weights", topk_weights, ("float32",), (num_tokens, num_topk), True, dev)
        args = self._dispatch_args(x, scales, config)
        args.update({"topk_idx": topk_idx.data_ptr() if topk_idx is not None else 0,
                     "topk_int64": int(topk_idx is None or dtype_name(topk_idx.dtype) == "int64"),
                     "topk_weights": topk_weights.data_ptr() if topk_weights is not None else 0,
                     "num_topk": num_topk, "is_token_in_rank": is_token_in_rank.data_ptr(),
                     "num_tokens_per_rank": num_tokens_per_rank.data_ptr(),
                     "num_tokens_per_rdma_rank": num_tokens_per_rdma_rank.data_ptr(),
                     "num_tokens_per_expert": num_tokens_per_expert.data_ptr(),
                     "num_experts": num_tokens_per_expert.shape[0], "expert_alignment": expert_alignment,
                     "num_worst_tokens": num_worst_tokens})
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            send_pos = torch.empty((num_tokens, R), dtype=torch.int32, device=dev)
            send_rdma_head = torch.empty((num_tokens, N), dtype=torch.int32, device=dev)
            node_prefix = torch.empty((R, M), dtype=torch.int32, device=dev)
            gbl = torch.empty((R,), dtype=torch.int32, device=dev)
            rdma = torch.empty((N,), dtype=torch.int32, device=dev)
            hd = {"num_tokens": num_tokens, "is_token_in_rank": is_token_in_rank.data_ptr(),
                  "send_pos": send_pos.data_ptr(), "send_rdma_head": send_rdma_head.data_ptr(),
                  "node_prefix": node_prefix.data_ptr(), "recv_gbl_rank_prefix_sum": gbl.data_ptr(),
                  "recv_rdma_rank_prefix_sum": rdma.data_ptr()}
            stream = self._comm_stream.cuda_stream
            num_recv, num_rdma_recv, per_expert, host = rt.internode_dispatch_prepare(args, hd, stream)
            hd.update(host)
            mask = torch.empty((num_rdma_recv,), dtype=torch.int32, device=dev)
            recv_src_idx = torch.empty((num_recv,), dtype=torch.int32, device=dev)
            recv_src_meta = torch.empty((num_recv, 2), dtype=torch.int32, device=dev)
            hd.update(recv_rdma_mask=mask.data_ptr(), recv_src_idx=recv_src_idx.data_ptr(),
                      recv_src_meta=recv_src_meta.data_ptr())
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, num_recv)
            recv_topk_idx = recv_topk_weights = None
            if num_topk > 0:
                recv_topk_idx = torch.empty((num_recv, num_topk), dtype=topk_idx.dtype, device=dev)
                recv_topk_weights = torch.empty((num_recv, num_topk), dtype=torch.float32, device=dev)
                outs.update(recv_topk_idx=recv_topk_idx.data_ptr(), recv_topk_weights=recv_topk_weights.data_ptr())
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
        hd = self._internode_handle(op, handle)
        if x.shape[0] != hd["num_tokens"]:
            raise invalid_argument(f"{op}: cached mode expected x with {hd['num_tokens']} rows (the handle's token "
                                   f"count), got {x.shape[0]}")
        args = self._dispatch_args(x, scales, config)
        compute = self._begin(op, previous_event, async_finish, allocate_on_comm_stream)
        with self._alloc_context(allocate_on_comm_stream):
            recv_x, recv_scales, outs = self._recv_tensors(x, scales, hd["num_recv_tokens"])
            rt.internode_dispatch_cached(args, hd, outs, self._comm_stream.cuda_stream)
            event = self._finish(compute, async_finish, allocate_on_comm_stream,
                                 (x, scales, recv_x, recv_scales) + tuple(t for t in handle if t is not None))
        recv = (recv_x, recv_scales) if scales is not None else recv_x
        return recv, None, None, None, None, event

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
        hd = {"src_info": src_info.data_ptr(), "layout_range": layout_range.data_ptr(),
              "num_max_dispatch_tokens_per_rank": T, "hidden": hidden, "num_experts": num_experts}
        return hd, El, T, hidden, num_experts

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
        args = {"x": x.data_ptr(), "num_tokens": num_tokens, "hidden": hidden, "topk_idx": topk_idx.data_ptr(),
                "topk_int64": int(dtype_name(topk_idx.dtype) == "int64"), "num_topk": num_topk,
                "num_max_dispatch_tokens_per_rank": T, "num_experts": num_experts, "use_fp8": int(use_fp8),
                "round_scale": int(round_scale), "use_ue8m0": int(use_ue8m0),
                "return_recv_hook": int(bool(return_recv_hook))}
        if cumulative_local_expert_recv_stats is not None:
            args["cumulative_local_expert_recv_stats"] = cumulative_local_expert_recv_stats.data_ptr()
        if dispatch_wait_recv_cost_stats is not None:
            args["dispatch_wait_recv_cost_stats"] = dispatch_wait_recv_cost_stats.data_ptr()
        hd = {"src_info": src_info.data_ptr(), "layout_range": layout_range.data_ptr()}
        hd_full = dict(hd, num_max_dispatch_tokens_per_rank=T, hidden=hidden, num_experts=num_experts)
        outs = {"packed_recv_x": packed_recv_x.data_ptr(), "packed_recv_count": recv_count.data_ptr()}
        if scales is not None:
            outs["packed_recv_scales"] = scales.data_ptr()
        if return_recv_hook:
            stream = compute
        else:
            stream = self._comm_ptr
            rt.stream_wait(stream, compute)
        core_hook = rt.low_latency_dispatch(args, hd, outs, stream)
        handle = LowLatencyHandle(src_info, layout_range, T, hidden, num_experts)
        handle._openep_checked = (self._token, (hd_full, El, T, hidden, num_experts))  # = _ll_unpack_handle's
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
        args = {"x": x.data_ptr() if x is not None else 0, "topk_idx": topk_idx.data_ptr(),
                "topk_int64": int(dtype_name(topk_idx.dtype) == "int64"), "topk_weights": topk_weights.data_ptr(),
                "num_tokens": num_tokens, "num_topk": num_topk, "zero_copy": int(bool(zero_copy)),
                "use_logfmt": int(bool(use_logfmt)), "return_recv_hook": int(bool(return_recv_hook))}
        if combine_wait_recv_cost_stats is not None:
            args["combine_wait_recv_cost_stats"] = combine_wait_recv_cost_stats.data_ptr()
        if return_recv_hook:
            stream = compute
        else:
            stream = self._comm_ptr
            rt.stream_wait(stream, compute)
        core_hook = rt.low_latency_combine(args, hd, {"combined_x": combined_x.data_ptr()}, stream)
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
