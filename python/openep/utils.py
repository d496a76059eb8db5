"""Events and stream overlap (DeepEP V1's EventHandle and EventOverlap), built on torch.cuda.Event."""

from ._torch import torch_module

__all__ = ["EventHandle", "EventOverlap"]

_MISSING = object()


class EventHandle:
    """A CUDA event recorded on a stream (DeepEP V1's ``EventHandle``).

    ``EventHandle()`` records on the current CUDA stream, like DeepEP's no-argument constructor;
    ``EventHandle(stream)`` records on ``stream`` (OpenEP uses this for its communication stream).

    Attributes:
        event: the underlying ``torch.cuda.Event``.
    """

    def __init__(self, stream=None):
        torch = torch_module()
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream() if stream is None else stream)

    def current_stream_wait(self):
        """Makes the current CUDA stream wait for this event (no host synchronisation)."""
        torch_module().cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream):
        """Makes ``stream`` wait for this event (no host synchronisation)."""
        stream.wait_event(self.event)

    def synchronize(self):
        """Blocks the host until the event has completed."""
        self.event.synchronize()


class EventOverlap:
    """The event of an asynchronous OpenEP call, for overlapping communication with computation.

    Every normal-mode call returns one. With ``async_finish=True`` it wraps the event recorded on the
    communication stream after the call's kernels; otherwise ``event`` is ``None`` (the current stream already
    waits for the call). Passed on as ``previous_event``, an EventOverlap whose ``event`` is None means "no previous
    event", exactly like ``None`` (DeepEP V1's meaning), in every method that takes one.

    Use either ``event.current_stream_wait()`` where the results are needed, or the ``with`` form::

        recv_x, ..., event = buffer.dispatch(..., async_finish=True)
        with event:
            independent_compute()   # runs on the current stream while dispatch proceeds
        # here the current stream waits for the dispatch

    Args:
        event: an :class:`EventHandle` or ``None``.
        extra_tensors: optional tuple of tensors kept alive as long as this object (an alternative to
            ``record_stream`` that stays CUDA-graph friendly).
    """

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self):
        """Makes the current stream wait for the event. REQUIRES: the event is not None (async_finish=True)."""
        if self.event is None:
            from .errors import invalid_argument
            raise invalid_argument("EventOverlap.current_stream_wait: the event is None (the call was not made "
                                   "with async_finish=True)")
        self.event.current_stream_wait()

    def __enter__(self):
        """Returns self; nothing happens on entry."""
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        """Makes the current stream wait for the event, if there is one."""
        if self.event is not None:
            self.event.current_stream_wait()
        return False


def _previous_event_handle(op, previous_event):
    """The EventHandle a normal-mode call must wait for, or None for "no previous event" (wait for the current stream).

    Every method that takes ``previous_event`` goes through here (Buffer._begin), with DeepEP V1's meaning (its
    buffer.py passes ``getattr(previous_event, 'event', None)`` on): ``None`` and an EventOverlap whose ``event``
    is None (what a call with ``async_finish=False`` returns, e.g. get_dispatch_layout's event handed on to
    dispatch) both mean no event. An EventOverlap holding an EventHandle, or an EventHandle itself, means wait
    for it. Anything else raises OpenEPError(code="invalid_argument") (DeepEP would silently ignore it).
    """
    if previous_event is None:
        return None
    if isinstance(previous_event, EventHandle):
        return previous_event
    event = getattr(previous_event, "event", _MISSING)
    if event is None:
        return None
    if isinstance(event, EventHandle):
        return event
    from .errors import invalid_argument
    raise invalid_argument(f"{op}: previous_event expected None, an EventOverlap (from an earlier call or "
                           f"Buffer.capture()) or an EventHandle, got {previous_event!r}")
