"""Server-Sent Events for Flask."""

from __future__ import annotations

from .event import Event
from .stream import stream_events

__all__ = ["Event", "stream_events"]
