"""Prometheus metrics, off unless an app turns them on (the ``metrics`` extra).

The engine calls the methods of :data:`hooks` where the thing it counts
happens. Until :func:`enable` runs, ``hooks`` is a :class:`Hooks` whose
methods do nothing, so a process without metrics pays one empty call per
hook and never imports ``prometheus_client``.
"""

from __future__ import annotations

import os
import time
import typing as t

from .concurrency import os_lock

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask import Response

#: Which code served a stream: the blueprint's endpoint, or a view.
Kind = t.Literal["blueprint", "view"]
#: Why a stream ended; the first cause counts.
CloseReason = t.Literal[
    "client_left",
    "send_timeout",
    "slow_consumer",
    "max_age",
    "shutdown",
    "error",
    "end",
]
#: Every status a stream may be refused with; 200 is the ``retry:`` refusal.
REFUSED_STATUSES = (200, 400, 403, 405, 429, 503)
#: From a millisecond (a worker close to Redis) to a stalled reader.
LAG_BUCKETS_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_MISSING = "Metrics need 'prometheus_client'. Install 'flask-eventstream[metrics]'."


class Hooks:
    """What the engine reports; every method does nothing until enabled."""

    def stream_opened(self, kind: Kind) -> None:
        """A stream started sending."""

    def stream_closed(self, kind: Kind, reason: CloseReason) -> None:
        """A stream that started has ended, for ``reason``."""

    def subscriptions_changed(self, delta: int) -> None:
        """Subscriptions were added (positive) or removed (negative)."""

    def published(self, broker: t.Literal["memory", "redis"]) -> None:
        """An event was stored by the broker."""

    def delivered(self, count: int) -> None:
        """An event was queued for ``count`` subscriptions."""

    def replayed(self, lost: bool) -> None:
        """A subscription resumed from an id; ``lost``: it was told to reset."""

    def refused(self, status: int) -> None:
        """A stream was refused with ``status``."""

    def broker_error(self) -> None:
        """The broker could not be reached, or failed."""

    def received(self, order_ms: int) -> None:
        """The reader received an event whose id was given at ``order_ms``."""


class _Prometheus(Hooks):
    # Label values are fixed by the package, so the series per metric are few.
    def __init__(self) -> None:
        import prometheus_client as p

        self._open = p.Gauge(
            "eventstream_streams_open",
            "Event streams open now.",
            ["kind"],
            multiprocess_mode="livesum",
        )
        self._subscriptions = p.Gauge(
            "eventstream_subscriptions",
            "Channel subscriptions open now.",
            multiprocess_mode="livesum",
        )
        self._published = p.Counter(
            "eventstream_events_published_total", "Events published.", ["broker"]
        )
        self._delivered = p.Counter(
            "eventstream_events_delivered_total", "Events queued for a subscriber."
        )
        self._closed = p.Counter(
            "eventstream_streams_closed_total", "Event streams ended.", ["reason"]
        )
        self._replays = p.Counter(
            "eventstream_replays_total", "Streams that resumed from an event id."
        )
        self._resets = p.Counter(
            "eventstream_resets_total", "Streams told that events they missed are gone."
        )
        self._refused = p.Counter(
            "eventstream_refused_total", "Streams refused.", ["status"]
        )
        self._broker_errors = p.Counter(
            "eventstream_broker_errors_total", "Failures to reach or read the broker."
        )
        self._lag = p.Histogram(
            "eventstream_reader_lag_seconds",
            "Time from publishing an event to its worker's reader receiving it.",
            buckets=LAG_BUCKETS_SECONDS,
        )
        # Every series exists from the start, at zero, so a rate over it is
        # defined before the first event of its kind.
        for kind in t.get_args(Kind):
            self._open.labels(kind)
        for reason in t.get_args(CloseReason):
            self._closed.labels(reason)
        for broker in ("memory", "redis"):
            self._published.labels(broker)
        for status in REFUSED_STATUSES:
            self._refused.labels(str(status))

    def stream_opened(self, kind: Kind) -> None:
        self._open.labels(kind).inc()

    def stream_closed(self, kind: Kind, reason: CloseReason) -> None:
        self._open.labels(kind).dec()
        self._closed.labels(reason).inc()

    def subscriptions_changed(self, delta: int) -> None:
        self._subscriptions.inc(delta)

    def published(self, broker: t.Literal["memory", "redis"]) -> None:
        self._published.labels(broker).inc()

    def delivered(self, count: int) -> None:
        self._delivered.inc(count)

    def replayed(self, lost: bool) -> None:
        (self._resets if lost else self._replays).inc()

    def refused(self, status: int) -> None:
        self._refused.labels(str(status)).inc()

    def broker_error(self) -> None:
        self._broker_errors.inc()

    def received(self, order_ms: int) -> None:
        # Clocks of Redis and the worker may disagree by a little.
        self._lag.observe(max(0.0, time.time() - order_ms / 1000))


#: The engine's hooks: a :class:`Hooks` that does nothing, until enabled.
hooks: Hooks = Hooks()
_lock = os_lock()


def enable() -> None:
    """Turn metrics on for this process; the blueprint calls this when
    :data:`EVENTSTREAM_METRICS` is true. Apps that serve only
    :func:`~flask_eventstream.stream_events` views call it themselves.

    :raises ImportError: if ``prometheus_client`` is not installed.

    .. versionadded:: 0.1
    """
    global hooks
    with _lock:
        if isinstance(hooks, _Prometheus):
            return
        try:
            import prometheus_client  # noqa: F401
        except ImportError as e:
            raise ImportError(_MISSING) from e
        # Made once per process, in prometheus_client's default registry.
        hooks = _Prometheus()


def metrics_view() -> cabc.Callable[[], Response]:
    """Return a view function that renders the metrics in Prometheus's text
    format; nothing is mounted unless the app routes it.

    .. code-block:: python

        app.add_url_rule("/metrics", view_func=metrics_view())

    With ``PROMETHEUS_MULTIPROC_DIR`` set, the view sums every worker's
    metrics (prometheus_client's multiprocess mode); otherwise it renders
    this process's default registry.

    :raises ImportError: if ``prometheus_client`` is not installed.

    .. versionadded:: 0.1
    """
    try:
        import prometheus_client as p
        from prometheus_client import multiprocess
    except ImportError as e:
        raise ImportError(_MISSING) from e
    from flask import Response

    def metrics() -> Response:
        registry = p.REGISTRY
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # A fresh registry per scrape: the collector reads the files of
            # every worker, live and dead, each time.
            registry = p.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = p.generate_latest(registry)
        return Response(body, headers={"Content-Type": p.CONTENT_TYPE_LATEST})

    return metrics
