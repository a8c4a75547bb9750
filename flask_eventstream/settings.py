"""An app's settings, checked once at registration, and its connection
limits: what the ``EventStream`` blueprint keeps per app."""

from __future__ import annotations

import difflib
import typing as t

from .brokers import broker_from_url
from .concurrency import os_lock
from .stream import seconds

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .brokers.base import Broker

#: Every setting, with its default. Read once, when the blueprint is
#: registered on an app.
DEFAULTS: dict[str, t.Any] = {
    "EVENTSTREAM_BROKER_URL": "memory://",
    "EVENTSTREAM_KEY_PREFIX": "eventstream",
    "EVENTSTREAM_HISTORY": 1000,
    "EVENTSTREAM_HISTORY_TTL": 86400,
    "EVENTSTREAM_QUEUE_SIZE": 1000,
    "EVENTSTREAM_MAX_CHANNELS": 32,
    "EVENTSTREAM_MAX_CONNECTIONS": None,
    "EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT": None,
    "EVENTSTREAM_RETRY": None,
    "EVENTSTREAM_MAX_AGE": None,
    "EVENTSTREAM_KEEPALIVE": 15.0,
    "EVENTSTREAM_SEND_TIMEOUT": 60.0,
    "EVENTSTREAM_METRICS": False,
}
#: Why :meth:`EventStreamState.reserve` refused a stream.
Refusal = t.Literal["process", "client"]


class EventStreamState:
    """One app's broker and limits, in ``app.extensions["eventstream"]``.

    :param config: the app's config, with the defaults filled in.
    """

    def __init__(self, config: cabc.Mapping[str, t.Any]) -> None:
        self.history = _count(config, "EVENTSTREAM_HISTORY")
        self.queue_size = _count(config, "EVENTSTREAM_QUEUE_SIZE")
        self.max_channels = _count(config, "EVENTSTREAM_MAX_CHANNELS")
        self.max_connections = _count(
            config, "EVENTSTREAM_MAX_CONNECTIONS", optional=True
        )
        self.max_per_client = _count(
            config, "EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT", optional=True
        )
        self.metrics = _flag(config, "EVENTSTREAM_METRICS")
        unknown = [k for k in config if k.startswith("EVENTSTREAM_")]
        for key in sorted(set(unknown) - set(DEFAULTS)):
            close = difflib.get_close_matches(key, DEFAULTS, 1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ValueError(f"{key} is not a setting of Flask-EventStream.{hint}")
        #: The stream options that the config sets, each checked here.
        self.stream_defaults: dict[str, t.Any] = {
            "retry": _retry(config, "EVENTSTREAM_RETRY"),
            **{
                name: seconds(key, config[key])
                for name, key in [
                    ("keep_alive", "EVENTSTREAM_KEEPALIVE"),
                    ("max_age", "EVENTSTREAM_MAX_AGE"),
                    ("send_timeout", "EVENTSTREAM_SEND_TIMEOUT"),
                ]
            },
        }
        history_ttl = seconds(
            "EVENTSTREAM_HISTORY_TTL", config["EVENTSTREAM_HISTORY_TTL"], optional=False
        )
        prefix = config["EVENTSTREAM_KEY_PREFIX"]
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(
                f"EVENTSTREAM_KEY_PREFIX must be a non-empty string (got {prefix!r})."
            )
        url = config["EVENTSTREAM_BROKER_URL"]
        if not isinstance(url, str):
            raise ValueError(
                "EVENTSTREAM_BROKER_URL must be a URL such as memory:// or"
                f" redis://host:6379/0 (got {url!r})."
            )
        self.broker: Broker = broker_from_url(
            url,
            history=self.history,
            history_ttl=t.cast(float, history_ttl),
            prefix=prefix,
        )
        #: Streams open now in this process.
        self.streams = 0
        #: Streams open now per client key, for clients that have any.
        self.clients: dict[str, int] = {}
        self._lock = os_lock()

    def reserve(self, client: str | None = None) -> Refusal | None:
        """Count one more open stream for ``client`` (a key, or None for the
        process's limit only); return which limit refused it, if one did."""
        with self._lock:
            if (
                self.max_connections is not None
                and self.streams >= self.max_connections
            ):
                return "process"
            if client is not None:
                count = self.clients.get(client, 0)
                if self.max_per_client is not None and count >= self.max_per_client:
                    return "client"
                self.clients[client] = count + 1
            self.streams += 1
            return None

    def release(self, client: str | None = None) -> None:
        """Count one stream fewer, for ``client`` as it was reserved."""
        with self._lock:
            self.streams -= 1
            if client is not None:
                count = self.clients.pop(client) - 1
                # Keys with no stream are dropped, so the table holds only
                # the clients connected now, however many came and went.
                if count:
                    self.clients[client] = count


def _retry(config: cabc.Mapping[str, t.Any], key: str) -> int | None:
    value = config[key]
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 0
    ):
        raise ValueError(
            f"{key} must be a whole number of milliseconds, or None (got {value!r})."
        )
    return value


def _flag(config: cabc.Mapping[str, t.Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False (got {value!r}).")
    return value


def _count(config: cabc.Mapping[str, t.Any], key: str, optional: bool = False) -> t.Any:
    value = config[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive whole number (got {value!r}).")
    return value
