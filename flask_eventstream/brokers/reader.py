"""The Redis reader: one per worker, on a connection of its own, it receives
the events of the channels the worker's clients listen to.

Each event is published, as its channel's history is written, on a Redis
pub/sub channel of that channel. The reader subscribes to those of the
channels that have a subscriber in this worker, and to no other: the cost
of an event grows with the workers that want it, not with all workers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
import typing as t

import redis

from .. import metrics
from ..concurrency import current_backend
from ..event import Event
from .base import Message
from .base import parse_id

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from ..concurrency import Waitable
    from .redis import RedisBroker

logger = logging.getLogger(__name__)

#: How long the reader waits for a message before it looks at what its
#: worker's subscribers listen to now.
POLL_SECONDS = 0.05
#: The longest pause between attempts after a failure.
MAX_BACKOFF_SECONDS = 5.0
#: The field of a message that ends the streams of its channel.
DISCONNECT = "disconnect"
#: How often the reader refreshes its worker's key for ``eventstream stats``.
WORKER_KEY_SECONDS = 5
#: How often the key is brought up to date when the worker's streams change.
STATS_CHECK_SECONDS = 0.5


class RedisReader:
    """Receives the events of ``broker``'s channels of interest.

    Its :attr:`state` is ``stopped`` (no subscribers, no connection),
    ``reading``, or ``failing``: a failure of any kind is logged and waited
    out with a growing pause. When it is back, the reader subscribes again
    and catches each channel up from history, from the last event it
    delivered there, so nothing is lost; a message it cannot decode is
    logged and skipped. Live events never wait for the commands connection.

    Its attributes are used under the fan-out lock.
    """

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.state: t.Literal["stopped", "reading", "failing"] = "stopped"
        self.stopping = False
        #: Channels whose messages arrive now (Redis confirmed them).
        self.active: set[str] = set()
        # Channels asked for and not confirmed yet.
        self._asked: set[str] = set()
        # Per channel received, the order of the last event delivered (or,
        # before any, of the newest issued when it was first received; None
        # until that is known), from which it is caught up after a reconnect.
        self._delivered: dict[str, tuple[int, int] | None] = {}
        self._waiters: list[tuple[frozenset[str], Waitable]] = []
        # Counts the starts, so that a run that ends leaves alone the state
        # of the next one.
        self._runs = 0

    def start(self) -> None:
        """Start reading, if it is not."""
        if self.state == "stopped":
            self.state, self.stopping = "reading", False
            self._runs += 1
            run = functools.partial(self._run, self._runs)
            current_backend().spawn(run, "eventstream-redis-reader")
            current_backend().spawn(self._announce, "eventstream-redis-stats")

    def when_active(self, channels: frozenset[str], done: Waitable) -> None:
        """Set ``done`` once all ``channels`` are received, or reading fails."""
        if channels <= self.active:
            done.set()
        else:
            self._waiters.append((channels, done))

    def set_floor(self, channels: cabc.Iterable[str], order: tuple[int, int]) -> None:
        """Catch ``channels`` up from ``order`` after a reconnect, those of
        them that have had nothing delivered since they were received."""
        for channel in channels:
            if channel in self._delivered and self._delivered[channel] is None:
                self._delivered[channel] = order

    def _run(self, run: int) -> None:
        connection = self.broker.store.connect("reader", socket_timeout=10)
        failures = 0
        try:
            while True:
                pubsub = connection.pubsub()  # type: ignore[no-untyped-call]
                try:
                    self._read(pubsub, recovering=failures > 0)
                    return
                except Exception as e:
                    failures += 1
                    metrics.hooks.broker_error()
                    with self.broker.fanout.lock:
                        self.state = "failing"
                        self._asked.clear()
                        self.active.clear()
                        self._wake(everyone=True)
                    if failures == 1 and isinstance(e, redis.RedisError):
                        logger.warning(
                            "Lost Redis; live events wait until it is back: %s", e
                        )
                    elif failures == 1:
                        logger.exception("The Redis reader failed; it starts again.")
                    time.sleep(min(0.1 * 2**failures, MAX_BACKOFF_SECONDS))
                finally:
                    with contextlib.suppress(Exception):
                        pubsub.reset()
        finally:
            with self.broker.fanout.lock:
                if run == self._runs:
                    self._stopped()
            connection.connection_pool.disconnect()

    def _stopped(self) -> None:
        self.state = "stopped"
        self._asked.clear()
        self.active.clear()
        self._delivered.clear()
        self._wake(everyone=True)

    def _read(self, pubsub: t.Any, recovering: bool) -> None:
        store, fanout = self.broker.store, self.broker.fanout
        # After a reconnect, what arrives waits until every channel is
        # received again and caught up from history, so it comes after.
        held: list[dict[str, t.Any]] | None = [] if recovering else None
        with fanout.lock:
            # Every channel once, then only those whose interest changed.
            fanout.take_changed()
            changed = fanout.channels()
        while True:
            with fanout.lock:
                if self.stopping or not len(fanout):
                    # In the same step as the decision, so that the next
                    # subscriber starts a reader of its own.
                    self._stopped()
                    return
                changed |= fanout.take_changed()
                new = {c for c in changed if fanout.has(c)} - self.active - self._asked
                gone = {c for c in changed if not fanout.has(c)} & self.active
                changed = set()
                self.active -= gone
                for channel in gone:
                    self._delivered.pop(channel, None)
                self._asked |= new
            if new:
                pubsub.subscribe(*map(store.live, new))
            if gone:
                pubsub.unsubscribe(*map(store.live, gone))
            reply = pubsub.get_message(timeout=POLL_SECONDS)
            if held is not None:
                if reply is not None:
                    held.append(reply)
                confirmed = {
                    store.channel_of(r["channel"])
                    for r in held
                    if r["type"] == "subscribe"
                }
                if new or self._asked - confirmed:
                    continue
                changed = self._catch_up(held)
                held = None
            elif reply is not None and self._take(reply):
                # Confirmed after its last subscription left.
                changed.add(store.channel_of(reply["channel"]))

    def _take(self, reply: dict[str, t.Any]) -> bool:
        """Hand on what Redis sent; True if it confirmed a channel that no
        subscription wants any more."""
        kind, channel = reply["type"], self.broker.store.channel_of(reply["channel"])
        if kind == "subscribe":
            with self.broker.fanout.lock:
                self._asked.discard(channel)
                self.active.add(channel)
                self._delivered.setdefault(channel, None)
                self.state = "reading"
                self._wake()
                return not self.broker.fanout.has(channel)
        elif kind == "message":
            try:
                fields = json.loads(reply["data"])
                if DISCONNECT in fields:
                    self.broker.end_channels([channel])
                    return False
                found = message(fields)
            except Exception as e:
                logger.error(
                    "Skipped a message on the channel %r, not an event (%s): %r",
                    channel,
                    e,
                    reply["data"][:200],
                )
                return False
            metrics.hooks.received(found.order[0])
            self.broker.deliver(channel, found, self._delivered)
        return False

    def _catch_up(self, replies: list[dict[str, t.Any]]) -> set[str]:
        """Deliver what the channels missed, then ``replies``; return the
        channels confirmed that no subscription wants any more."""
        with self.broker.fanout.lock:
            for channel in [
                c for c in self._delivered if not self.broker.fanout.has(c)
            ]:
                del self._delivered[channel]
            since = {c: o for c, o in self._delivered.items() if o is not None}
        missed, gaps = self.broker.store.read_missed(since)
        logger.warning("Redis is back; %d missed events are caught up.", len(missed))
        if gaps:
            logger.warning(
                "History lost events of %d channels; their streams end.", len(gaps)
            )
            self.broker.end_channels(gaps)
        unwanted = {
            self.broker.store.channel_of(r["channel"])
            for r in replies
            if r["type"] == "subscribe" and self._take(r)
        }
        for channel, found in missed:
            self.broker.deliver(channel, found, self._delivered)
        for reply in replies:
            if reply["type"] != "subscribe":
                self._take(reply)
        return unwanted

    def _wake(self, everyone: bool = False) -> None:
        waiting = []
        for channels, done in self._waiters:
            if everyone or channels <= self.active:
                done.set()
            else:
                waiting.append((channels, done))
        self._waiters = waiting

    def _announce(self) -> None:
        # The worker's key for ``eventstream stats``: written when what it
        # says changes, and refreshed before it expires, while the reader
        # runs; on the commands connection, never in the way of live events.
        store = self.broker.store
        key = f"{store.prefix}:worker:{socket.gethostname()}:{os.getpid()}"
        pause, written, at = current_backend().event(), -1, 0.0
        while self.state != "stopped":
            version = self.broker.fanout.version
            if version != written or time.monotonic() - at > WORKER_KEY_SECONDS:
                stats = {"host": socket.gethostname(), "pid": os.getpid()}
                stats.update(self.broker.stats())
                value = json.dumps(stats)
                with contextlib.suppress(Exception):
                    current_backend().call(
                        functools.partial(
                            store.commands().set, key, value, ex=3 * WORKER_KEY_SECONDS
                        )
                    )
                    written, at = version, time.monotonic()
            pause.wait(STATS_CHECK_SECONDS)
        with contextlib.suppress(Exception):
            current_backend().call(functools.partial(store.commands().delete, key))


def message(fields: dict[str, str]) -> Message:
    """The message for a stored event's fields; raises if they are malformed.

    ``o`` is the id Redis gave it, which orders it; ``i`` the id the app
    gave, if any.
    """
    retry = fields.get("r")
    order = fields["o"]
    event = Event(
        fields.get("d"),
        event=fields.get("e"),
        id=fields.get("i", order),
        retry=int(retry) if retry is not None else None,
    )
    return Message.of(event, parse_id(order))
