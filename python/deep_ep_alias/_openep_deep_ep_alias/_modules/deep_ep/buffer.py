"""``deep_ep.buffer`` served by OpenEP: DeepEP's module of ``Buffer``; every name is OpenEP's own object."""

from openep import Config  # noqa: F401
from openep.buffer import Buffer  # noqa: F401
from openep.utils import EventHandle, EventOverlap  # noqa: F401

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap"]
