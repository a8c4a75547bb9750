"""Server-Sent Events for Flask."""

from __future__ import annotations

from .blueprint import EventStream
from .brokers.base import BrokerError
from .event import Event
from .metrics import metrics_view
from .stream import stream_events

__all__ = ["BrokerError", "Event", "EventStream", "metrics_view", "stream_events"]
