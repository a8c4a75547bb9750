"""Server-Sent Events for Flask."""

from __future__ import annotations

from .blueprint import EventStream
from .brokers.base import BrokerError
from .event import Event
from .stream import stream_events

__all__ = ["BrokerError", "Event", "EventStream", "stream_events"]
