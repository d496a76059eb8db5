"""Stream and event plumbing of openep.Buffer's normal-mode calls (DeepEP V1 section 5.11; the rules are stated in
the docstring of openep.buffer). A mixin of :class:`openep.Buffer`: it reads ``runtime``, ``_device``,
``_comm_stream`` and ``_comm_ptr`` from the Buffer."""

import contextlib

from ._torch import current_raw_stream, torch_module
from .errors import invalid_argument
from .utils import EventHandle, EventOverlap, _previous_event_handle

__all__ = ["StreamOps"]


class StreamOps:
    """Orders a call's kernels after the caller's work and hands the result back (events, record_stream)."""

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
