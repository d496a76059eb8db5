"""``Buffer.runtime``: OpenEP's core Buffer (openep._C.Runtime) plus the queries DeepEP V1 callers make on it.

DeepEP's ``buffer.runtime`` is its C++ ``deep_ep_cpp.Buffer``; engines and DeepEP's own buffer.py ask it about
the topology (``get_num_rdma_ranks() > 1`` picks internode mode, ``get_rdma_rank()``, ``get_root_rdma_rank()``),
the device, availability, the communication stream and the raw buffer. :class:`Runtime` answers those with
DeepEP's meaning, from OpenEP's topology:

* a "node" (DeepEP: RDMA rank) is one NVLink domain of the Group (NCCL's LSA team, ``num_nvlink_ranks``
  ranks; DeepEP fixes it at 8 GPUs), ranks numbered node-major (rank = node * ranks_per_node + local rank,
  which internode mode requires and checks; the answers assume it for every Buffer);
* ``get_num_rdma_ranks()`` = number of nodes (1 on one NVLink domain), ``get_rdma_rank()`` = this rank's node,
  ``get_root_rdma_rank(global_)`` = the rank with this rank's local index on node 0 (``global_=True``: its global
  rank, which is the local index; ``False``: its node index, 0), ``get_num_nvl_ranks()`` = ranks per node;
* ``get_local_device_id()`` = the CUDA device the Buffer lives on (the current device at creation);
* ``is_available()`` = created and not destroyed; ``is_internode_available()`` = available and internode (a
  normal-mode Buffer over several nodes: ``dispatch``/``combine`` take the internode path);
* ``get_comm_stream()`` = the communication stream as a ``torch.cuda.Stream``;
  ``get_local_buffer_tensor(dtype, offset=0, use_rdma_buffer=False)`` = the raw region as a 1-D tensor.

DeepEP's bootstrap methods (``get_local_ipc_handle``, ``get_local_nvshmem_unique_id``, ``sync``) exist so that a
caller probing them gets a clear answer: OpenEP has no CUDA IPC handles and no NVSHMEM (peers reach each other
through one NCCL symmetric window, registered when ``openep.Buffer`` is created), so the first two raise
:class:`openep.OpenEPNotAvailableError` and ``sync`` raises ``OpenEPError(code="invalid_argument")`` (the Buffer is
already connected, as DeepEP's ``sync`` refuses a runtime that is already available).

The operation methods of the runtime (``get_dispatch_layout``, ``dispatch``, ``low_latency_dispatch``, ...) take
OpenEP's internal argument structs (``_C.DispatchArgs``, ...), not DeepEP's tensor arguments: call the Buffer's
methods.

The queries live in :class:`DeepEPRuntimeQueries`, a plain mixin that reads only ``rank``, ``num_ranks``,
``num_nvlink_ranks``, ``is_internode``, ``alive``, ``device``, ``comm_stream`` and ``local_buffer`` from the core, so
the CPU tests check the answers on fake topologies.
"""

from . import _C
from ._checks import check_int
from ._torch import torch_module
from .errors import OpenEPNotAvailableError, invalid_argument

__all__ = ["Runtime", "DeepEPRuntimeQueries"]


def _wrap_device_memory(owner, address, num_bytes, device):
    """A 1-D uint8 tensor over ``num_bytes`` of device memory at ``address`` that keeps ``owner`` alive."""
    torch = torch_module()

    class _Region:  # __cuda_array_interface__ keeps a reference to the owner alive with the tensor
        buffer = owner
        __cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (address, False),
                                    "version": 3}

    return torch.as_tensor(_Region(), device=device)


def _no_equivalent(what, why):
    return OpenEPNotAvailableError(f"OpenEP not available: {what} has no OpenEP equivalent: {why}")


class DeepEPRuntimeQueries:
    """DeepEP V1's ``buffer.runtime`` queries, with DeepEP's meaning (module docstring)."""

    def _ranks_per_node(self):
        return max(1, int(self.num_nvlink_ranks))

    def get_num_rdma_ranks(self):
        """Number of nodes (NVLink domains) of the group; 1 when every rank shares one NVLink domain."""
        return max(1, -(-int(self.num_ranks) // self._ranks_per_node()))

    def get_rdma_rank(self):
        """This rank's node: ``rank // ranks_per_node`` (0 on one NVLink domain)."""
        return int(self.rank) // self._ranks_per_node()

    def get_num_nvl_ranks(self):
        """Ranks per node (the NVLink domain size; the group size on one NVLink domain)."""
        return min(self._ranks_per_node(), int(self.num_ranks))

    def get_root_rdma_rank(self, global_):
        """The rank with this rank's local index on node 0: its global rank (``global_=True``, equal to the local
        index ``rank % ranks_per_node``) or its node index (``global_=False``, always 0). DeepEP uses it to pick
        the root of each per-local-index NVSHMEM world."""
        return int(self.rank) % self._ranks_per_node() if global_ else 0

    def get_local_device_id(self):
        """The CUDA device ordinal the Buffer lives on (the current device when it was created)."""
        return int(self.device)

    def is_available(self):
        """True from creation until ``destroy()``."""
        return bool(self.alive)

    def is_internode_available(self):
        """True while available for an internode Buffer (normal mode over several nodes: dispatch/combine take
        the internode path, run from Python on fake nodes only, see Buffer.internode_dispatch)."""
        return bool(self.alive) and bool(self.is_internode)

    def get_comm_stream(self):
        """The communication stream the normal-mode kernels run on, as a ``torch.cuda.Stream`` (an
        ``ExternalStream`` over the core's stream; the same stream as ``Buffer.get_comm_stream()``)."""
        torch = torch_module()
        return torch.cuda.ExternalStream(self.comm_stream, device=torch.device("cuda", self.get_local_device_id()))

    def get_local_buffer_tensor(self, dtype, offset=0, use_rdma_buffer=False):
        """This rank's normal-mode region (or low-latency region with ``use_rdma_buffer``) as a 1-D tensor of
        ``dtype`` starting ``offset`` BYTES in (DeepEP's C++ signature). Unlike DeepEP, the element count is
        reduced by the offset so the view never runs past the region. The tensor keeps this runtime alive but
        must not be used after ``destroy()``; the memory belongs to OpenEP's kernels between calls."""
        address, num_bytes = self.local_buffer(bool(use_rdma_buffer))
        check_int("get_local_buffer_tensor", "offset", offset, 0)
        if offset > num_bytes:
            raise invalid_argument(f"get_local_buffer_tensor: offset {offset} exceeds the region's {num_bytes} bytes")
        torch = torch_module()
        elem = torch.empty((), dtype=dtype).element_size()
        count = (num_bytes - offset) // elem
        raw = _wrap_device_memory(self, address + offset, num_bytes - offset,
                                  torch.device("cuda", self.get_local_device_id()))
        return raw[:count * elem].view(dtype)

    def get_local_ipc_handle(self):
        """DeepEP's CUDA IPC handle of the local buffer. OpenEP has none: raises OpenEPNotAvailableError."""
        raise _no_equivalent("runtime.get_local_ipc_handle()",
                             "OpenEP shares no CUDA IPC handles; the ranks reach each other's memory through one NCCL "
                             "symmetric window, registered when openep.Buffer is created")

    def get_local_nvshmem_unique_id(self):
        """DeepEP's NVSHMEM unique id. OpenEP does not use NVSHMEM: raises OpenEPNotAvailableError."""
        raise _no_equivalent("runtime.get_local_nvshmem_unique_id()",
                             "OpenEP does not use NVSHMEM; openep.Buffer exchanges an NCCL unique id through the "
                             "group itself when it is created")

    def sync(self, *args, **kwargs):
        """DeepEP's second bootstrap step. An OpenEP runtime is connected when created: always raises
        OpenEPError(code="invalid_argument") (DeepEP's sync refuses a runtime that is already available)."""
        raise invalid_argument("runtime.sync: this runtime is already connected (openep.Buffer exchanges the NCCL "
                               "unique id and registers the symmetric window when it is created); there is nothing "
                               "to synchronise")


class Runtime(DeepEPRuntimeQueries, _C.Runtime):
    """``Buffer.runtime``: openep._C.Runtime (the core Group + Buffer) with DeepEP V1's runtime queries.

    Created by :class:`openep.Buffer` (collective); not meant to be created directly. See the module docstring for
    what each DeepEP query answers."""
