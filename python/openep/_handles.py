"""The handles openep.Buffer's dispatch calls return (DeepEP V1's tuples, with OpenEP's meaning of each entry)."""

from collections import namedtuple

__all__ = ["IntranodeHandle", "InternodeHandle", "LowLatencyHandle"]

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
