"""``deep_ep.utils`` served by OpenEP: DeepEP's ``EventHandle`` and ``EventOverlap`` are OpenEP's own classes.

(DeepEP's ``check_nvlink_connections`` has no counterpart: ``openep.Buffer`` finds the NVLink domains of its ranks
itself when it is created, and raises ``OpenEPError(code="unsupported")`` for a topology it cannot serve.)
"""

from openep.utils import EventHandle, EventOverlap  # noqa: F401

__all__ = ["EventHandle", "EventOverlap"]
