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

import os

from . import _C
from ._checks import check_int
from ._handles import InternodeHandle, IntranodeHandle, LowLatencyHandle
from ._internode import InternodeOps
from ._intranode import IntranodeOps
from ._loader import check_nccl_version
from ._low_latency import LowLatencyOps
from ._runtime import Runtime
from ._streams import StreamOps
from ._torch import torch_module
from .errors import invalid_argument
from .utils import EventHandle, EventOverlap

__all__ = ["Buffer", "IntranodeHandle", "InternodeHandle", "LowLatencyHandle"]

# internode_backend values and openep::InternodeBackend (include/openep/buffer.hpp).
_INTERNODE_BACKENDS = {"host_p2p": 0, "gin": 1}


_ipc_buffers = [0]  # Buffers this process made under OPENEP_TESTING_IPC_DIR (each gets its own rendezvous folder)


def _next_ipc_index():
    i = _ipc_buffers[0]
    _ipc_buffers[0] += 1
    return i


def _env_flag(name):
    """True for 1/true/yes/on, False when unset or 0/false/no/off/empty; anything else is an error."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise invalid_argument(f"{name}: expected 0/1/true/false/yes/no/on/off, got {os.environ[name]!r}")


class Buffer(StreamOps, IntranodeOps, InternodeOps, LowLatencyOps):
    """The communication buffer of one expert-parallel group (DeepEP V1's ``deep_ep.Buffer``).

    Its methods live by job: lifetime, static helpers and utilities here; stream plumbing in ``openep._streams``;
    intranode normal mode in ``openep._intranode``; internode normal mode in ``openep._internode``; low-latency and
    shrink mode in ``openep._low_latency`` (mixins of this class, documented there, listed by ``help(Buffer)``).

    One process per GPU; every rank of ``group`` creates its Buffer with the same arguments (collective).
    OpenEP creates its own NCCL communicator over the ranks of ``group`` (an NCCL unique id is exchanged
    through ``group``), so the group's own communicator is never touched. Create one Buffer at start-up and
    keep it: creation registers an NCCL symmetric window (a world barrier).

    Args:
        group: the ``torch.distributed`` process group of the EP ranks (or None when ``comm`` is given). Its
            ranks must share one NVLink domain (intranode; 2..8 ranks). The current CUDA device
            (``torch.cuda.set_device``) is the Buffer's device.
        num_nvl_bytes: bytes for the normal-mode kernels, a multiple of 128. DeepEP's sizing
            (``Config.get_nvl_buffer_size_hint``) works for any batch: exact-mode dispatch, cached dispatch and
            combine run in rounds through the region when the batch exceeds it (each extra round costs a barrier).
            :meth:`get_nvl_buffer_size_hint_for_tokens` gives the size that runs a batch in one round; worst-case
            mode (``num_worst_tokens``) always runs in one round and raises ``OpenEPError(code="buffer_too_small")``
            naming the size needed when it does not fit.
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
        num_recv_pool_bytes: OpenEP extension (default 0, or ``OPENEP_RECV_POOL_BYTES``; a multiple of 128;
            intranode Buffers only): window-backed memory for intranode dispatch outputs. While it has room,
            ``dispatch`` takes recv_x, its scales, top-k ids and weights and the handle's source indices from it
            (ordinary torch tensors whose memory returns to the pool when they are freed, in the order of the
            stream current at that moment), so the peers store rows straight into them and this rank copies
            nothing out of the window: a third less copying in dispatch. When it is full, torch memory is used as
            without it. Has run on one H200 (virtual ranks; from Python on one rank and as two processes sharing the
            GPU), not yet on several GPUs.

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
                 allow_network=None, internode_backend=None, num_recv_pool_bytes=None):
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
        if num_recv_pool_bytes is None:
            num_recv_pool_bytes = int(os.environ.get("OPENEP_RECV_POOL_BYTES", "0"))
        check_int("Buffer", "num_recv_pool_bytes", num_recv_pool_bytes, 0)
        if num_recv_pool_bytes % 128 != 0:
            raise invalid_argument(f"Buffer: num_recv_pool_bytes must be a multiple of 128, got {num_recv_pool_bytes}")
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

        ipc_dir = os.environ.get("OPENEP_TESTING_IPC_DIR", "")
        if ipc_dir:
            # Testing only (PYTHON.md "Processes sharing a GPU"): the Group is made by the IPC test fabric, processes
            # sharing GPUs without NCCL; the group is used for rank and size only. One rendezvous folder per Buffer:
            # every rank creates its Buffers in the same order.
            ipc_dir = os.path.join(ipc_dir, f"buffer-{_next_ipc_index()}")
            os.makedirs(ipc_dir, exist_ok=True)
            uid = b""
        else:
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
                               _INTERNODE_BACKENDS[internode_backend], bool(enable_shrink),
                               int(num_recv_pool_bytes), ipc_dir)
        self.num_recv_pool_bytes = num_recv_pool_bytes
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
        """OpenEP extension: ``num_nvl_bytes`` with which intranode dispatch and combine run in ONE round when every
        rank sends up to ``max_tokens_per_rank`` tokens of ``hidden`` elements of ``x_elem_bytes`` bytes (2 = BF16,
        1 = FP8), with ``num_scales`` 4-byte scales and ``num_topk`` top-k columns per token (worst case: every
        token goes to every rank; own rows never pass through the region). A multiple of 128. For BF16 and FP8 on
        one Buffer take the larger of the two. Smaller Buffers run exact-mode calls in rounds."""
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

    def empty_recv(self, shape, dtype):
        """OpenEP extension: an uninitialised tensor on this rank's GPU from the window-backed recv pool
        (``num_recv_pool_bytes``), or from torch when the pool has no room (or the Buffer has none). Its memory returns
        to the pool when the tensor is freed, in the order of the stream current at that moment.

        Use it for an intranode combine input (the expert output): when ``x`` (and ``topk_weights``, if given) come
        from the pool, the peers read this rank's rows straight from it and this rank pushes nothing (no sender
        blocks; the combine returns only once every peer has finished reading). Any other tensor works as before.
        Ran in C++ on virtual ranks on one GPU; from Python only on one rank (no peer), NOT YET on 2+ GPUs.
        """
        self._rt("empty_recv")
        return self._recv_empty(tuple(shape), dtype)

    def synchronize(self):
        """OpenEP extension: waits for the communication stream and raises any error a kernel recorded (e.g. a
        peer timeout) as OpenEPError."""
        self._rt("synchronize").synchronize(self._comm_stream.cuda_stream)
