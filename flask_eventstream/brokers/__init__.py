"""Brokers store events and fan them out; one per app, chosen by URL."""

from __future__ import annotations

import urllib.parse

from .base import Broker
from .base import BrokerError
from .memory import MemoryBroker

__all__ = ["Broker", "BrokerError", "MemoryBroker", "broker_from_url"]


def broker_from_url(url: str, *, history: int) -> Broker:
    """Create the broker that ``url`` names.

    :param url: ``memory://``.
    :param history: events kept per channel for replay.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBroker(history=history)
    raise ValueError(f"EVENTSTREAM_BROKER_URL must start with memory:// (got {url!r}).")
