"""Brokers store events and fan them out; one per app, chosen by URL."""

from __future__ import annotations

import urllib.parse

from .base import Broker
from .base import BrokerError
from .base import DEFAULT_HISTORY_TTL_SECONDS
from .memory import MemoryBroker

__all__ = ["Broker", "BrokerError", "MemoryBroker", "broker_from_url"]


def broker_from_url(
    url: str,
    *,
    history: int,
    history_ttl: float = DEFAULT_HISTORY_TTL_SECONDS,
    prefix: str = "eventstream",
) -> Broker:
    """Create the broker that ``url`` names: ``memory://``, or
    ``redis://host:port/db`` (also ``rediss://`` and ``unix://``), keeping
    ``history`` events per channel, ``history_ttl`` seconds after the last."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBroker(history=history, history_ttl=history_ttl)
    if scheme in {"redis", "rediss", "unix"}:
        # Imported here: only apps that configure Redis need the package.
        from .redis import RedisBroker

        return RedisBroker(url, history=history, prefix=prefix, history_ttl=history_ttl)
    raise ValueError(
        f"EVENTSTREAM_BROKER_URL must start with memory:// or redis:// (got {url!r})."
    )
