"""The Redis broker: any number of workers and hosts share one Redis.

Each event is stored, in one script, in its channel's Redis stream, which
keeps that channel's history for replay, and published on a Redis pub/sub
channel of its own. Each worker runs one :class:`~.reader.RedisReader`,
subscribed to the channels its clients listen to, so a worker receives
only the events it has subscribers for. A worker holds two Redis
connections whatever its number of clients: the reader's, and one for
publish and replay.
"""

from __future__ import annotations

import heapq
import importlib.resources
import json
import os
import socket
import typing as t
import urllib.parse

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.commands.core import Script
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "The Redis broker needs 'redis'. Install 'flask-eventstream[redis]'."
    ) from e

from .. import metrics
from ..concurrency import current_backend
from ..event import data_text
from .base import Broker
from .base import BrokerError
from .base import check_given_id
from .base import DEFAULT_HISTORY_TTL_SECONDS
from .base import expired
from .base import parse_id
from .base import replay
from .reader import DISCONNECT
from .reader import message
from .reader import RedisReader

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from ..event import Event
    from .base import Message
    from .fanout import Subscription

#: How long a new subscription waits for the reader to receive its channels.
ATTACH_TIMEOUT_SECONDS = 10.0

# The publish script, with why it is written as it is.
_PUBLISH = (importlib.resources.files(__package__) / "publish.lua").read_bytes()


class RedisStore:
    """History in Redis Streams under ``prefix``, ``history`` events per
    channel for ``ttl`` seconds after the last, on the commands connection."""

    def __init__(self, url: str, history: int, prefix: str, ttl: float) -> None:
        self.url = url
        self.history = history
        self.prefix = prefix
        self.ttl = ttl
        # The newest id issued for the app, which orders the next.
        self._last = f"{prefix}:last"
        # The first id this Redis issued for the app: an older one comes
        # from history that Redis lost (a restart without persistence).
        self._first = f"{prefix}:first"
        self._client: tuple[int, redis.Redis] | None = None
        self._publish = Script(None, _PUBLISH)  # type: ignore[arg-type]

    def live(self, channel: str) -> str:
        """The pub/sub channel that the events of ``channel`` go out on."""
        return f"{self.prefix}:live:{channel}"

    def channel_of(self, live: bytes | str) -> str:
        """The channel of a pub/sub channel name that :meth:`live` gave."""
        name = live.decode() if isinstance(live, bytes) else live
        return name[len(self.prefix) + len(":live:") :]

    def append(self, channel: str, event: Event) -> str:
        """Store ``event`` on ``channel``, publish it, and return its id."""
        given = "" if event.id is None else check_given_id(event.id)
        fields = [] if event.data is None else ["d", data_text(event.data)]
        if event.event is not None:
            fields += ["e", event.event]
        if event.retry is not None:
            fields += ["r", str(event.retry)]
        keys = [self._channel(channel), self._last, self._first, self._given(channel)]
        ttl_ms = max(1, int(self.ttl * 1000))
        args: list[t.Any] = [self.live(channel), self.history, ttl_ms, given, *fields]
        try:
            entry_id = self._publish(keys, args, self.commands())
        except redis.ResponseError as e:
            metrics.hooks.broker_error()
            raise BrokerError(f"Redis refused the event: {e}") from e
        except redis.RedisError as e:
            raise self.unreachable("publish", e) from e
        return given or t.cast(str, entry_id)

    def disconnect(self, channels: cabc.Sequence[str]) -> None:
        """Tell the readers that receive ``channels`` to end their streams."""
        pipe = self.commands().pipeline(transaction=False)
        for channel in channels:
            pipe.publish(self.live(channel), json.dumps({DISCONNECT: True}))
        try:
            pipe.execute()
        except redis.RedisError as e:
            raise self.unreachable("disconnect", e) from e

    def find(self, channels: tuple[str, ...], last_id: str) -> tuple[int, int] | None:
        """The order of the event a client saw last: the latest of
        ``channels`` that carried ``last_id`` as the app's id, else the id
        itself in the broker's form; None if it is neither."""
        pipe = self.commands().pipeline(transaction=False)
        for channel in channels:
            pipe.hget(self._given(channel), last_id)
        try:
            found = [parse_id(entry) for entry in pipe.execute() if entry]
        except redis.RedisError as e:
            raise self.unreachable("subscribe", e) from e
        if found:
            return max(found)
        try:
            return parse_id(last_id)
        except ValueError:
            return None

    def read_after(
        self,
        channels: tuple[str, ...],
        last_id: str | None,
        after: tuple[int, int] | None,
    ) -> tuple[list[Message], tuple[int, int]]:
        """What a new subscription replays, and the newest id issued when it
        was read, in one snapshot: the events of ``channels`` after
        ``last_id``, whose order is ``after`` (None if it is not found),
        after a reset if some are gone. Without ``last_id``, nothing."""
        pipe = self.commands().pipeline(transaction=True)
        pipe.get(self._last)
        pipe.get(self._first)
        start = f"({after[0]}-{after[1]}" if after else "+"
        if last_id is not None and after is not None:
            for channel in channels:
                pipe.xrange(self._channel(channel), min=start, max="+")
                pipe.xinfo_stream(self._channel(channel))
        try:
            newest, first, *replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as e:
            raise self.unreachable("replay", e) from e
        for reply in (newest, first, *replies[0::2]):
            if isinstance(reply, Exception):
                raise self.unreachable("replay", reply)
        floor = parse_id(newest or "0-0")
        if last_id is None:
            return [], floor
        if after is None:
            return replay(last_id, [], lost=True), floor
        runs, infos = replies[0::2], replies[1::2]
        lost = (
            after > floor
            or (first is not None and after < parse_id(first))
            or any(self._lost(info, after) for info in infos)
        )
        entries = [[_message(*entry) for entry in run] for run in runs]
        return replay(last_id, entries, lost), floor

    def read_missed(
        self, since: dict[str, tuple[int, int]]
    ) -> tuple[list[tuple[str, Message]], list[str]]:
        """What each channel has after its order in ``since``, in the order
        of all events, and the channels whose history lost some of it."""
        channels = list(since)
        pipe = self.commands().pipeline(transaction=True)
        for channel in channels:
            after = since[channel]
            pipe.xrange(self._channel(channel), min=f"({after[0]}-{after[1]}")
            pipe.xinfo_stream(self._channel(channel))
        replies = pipe.execute(raise_on_error=False)
        runs, infos = replies[0::2], replies[1::2]
        for run in runs:
            if isinstance(run, Exception):
                raise run
        gaps = [
            c for c, i in zip(channels, infos, strict=True) if self._lost(i, since[c])
        ]
        missed = heapq.merge(
            *[
                [(c, _message(*e)) for e in run]
                for c, run in zip(channels, runs, strict=True)
            ],
            key=lambda item: item[1].order,
        )
        return [item for item in missed if item[0] not in gaps], gaps

    def ping(self) -> None:
        """Check that Redis answers on the commands connection."""
        try:
            self.commands().ping()
        except redis.RedisError as e:
            raise self.unreachable("subscribe", e) from e

    def _lost(self, info: t.Any, after: tuple[int, int]) -> bool:
        # A channel without a stream never had an event, or none for ttl.
        if isinstance(info, Exception):
            return expired(after, self.ttl)
        return parse_id(info["max-deleted-entry-id"]) > after

    def _channel(self, channel: str) -> str:
        return f"{self.prefix}:channel:{channel}"

    def _given(self, channel: str) -> str:
        # The ids the app gave the events of the channel's history.
        return f"{self.prefix}:ids:{channel}"

    def connect(self, role: str, **options: t.Any) -> redis.Redis:
        """A connection of this worker, named for ``CLIENT LIST``."""
        return redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(
                self.url,
                # Waited for, never a second connection.
                max_connections=1,
                timeout=10,
                socket_connect_timeout=5,
                client_name=f"eventstream:{role}:{socket.gethostname()}:{os.getpid()}",
                # Not retried: a publish retried after a lost reply would be
                # stored twice, and the reader has a backoff of its own.
                retry=Retry(NoBackoff(), 0),
                **options,
            )
        )

    def commands(self) -> redis.Redis:
        """The worker's connection for publish, replay and ``stats``, made in
        the worker itself (even when the app was loaded before fork)."""
        if self._client is None or self._client[0] != os.getpid():
            client = self.connect("commands", decode_responses=True, socket_timeout=10)
            self._client = (os.getpid(), client)
        return self._client[1]

    def close(self) -> None:
        if self._client is not None:
            self._client[1].connection_pool.disconnect()

    def unreachable(self, action: str, error: Exception) -> BrokerError:
        """The error to raise when Redis does not answer ``action``."""
        # Every failure to reach Redis makes its error here, so counts here.
        metrics.hooks.broker_error()
        parts = urllib.parse.urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        return BrokerError(
            f"Could not {action}: Redis at {where} did not answer ({error})."
            " Is redis-server running and reachable?"
        )


class RedisBroker(Broker):
    """Keeps history in Redis Streams and fans out within each worker.

    :param url: ``redis://host:port/db``.
    :param history: events kept per channel for replay.
    :param prefix: the start of every key this broker uses, so several apps
        can share one Redis database.
    :param history_ttl: seconds the history of a quiet channel is kept.

    .. versionadded:: 0.1
    """

    shared = True

    def __init__(
        self,
        url: str,
        *,
        history: int = 1000,
        prefix: str = "eventstream",
        history_ttl: float = DEFAULT_HISTORY_TTL_SECONDS,
    ):
        super().__init__()
        self.store = RedisStore(url, history, prefix, history_ttl)
        self.reader = RedisReader(self)
        self._pid = os.getpid()

    def publish(self, channel: str, event: Event) -> str:
        # The commands connection belongs to the hub's thread under gevent.
        event_id = current_backend().call(lambda: self.store.append(channel, event))
        metrics.hooks.published("redis")
        return event_id

    def disconnect(self, channels: cabc.Sequence[str]) -> None:
        current_backend().call(lambda: self.store.disconnect(channels))

    def attach(self, subscription: Subscription) -> list[Message]:
        call = current_backend().call
        channels, last_id = subscription.channels, subscription.last_event_id
        found = (
            None
            if last_id is None
            else call(lambda: self.store.find(channels, last_id))
        )
        if self.reader.state == "failing":
            # Waiting for the reader to be back only makes sense if it can.
            call(self.store.ping)
        receiving = current_backend().event()
        with self.fanout.lock:
            if self._pid != os.getpid():
                # A forked worker starts with no reader of its own. (A
                # server's parent process has no subscribers to inherit.)
                self._pid, self.reader = os.getpid(), RedisReader(self)
            self.fanout.add(subscription)
            self.reader.start()
            self.reader.when_active(frozenset(channels), receiving)
        try:
            # Only once the reader receives the channels does history tell
            # what the subscription would otherwise miss.
            receiving.wait(ATTACH_TIMEOUT_SECONDS)
            with self.fanout.lock:
                if not set(channels) <= self.reader.active:
                    raise self.store.unreachable(
                        "subscribe", TimeoutError("the reader is not receiving")
                    )
            backlog, floor = call(
                lambda: self.store.read_after(channels, last_id, found)
            )
        except BrokerError:
            self.detach(subscription)
            raise
        with self.fanout.lock:
            self.reader.set_floor(channels, floor)
        # Live events up to the snapshot are in the backlog, or older than
        # the subscription.
        subscription.skip_through(floor)
        return backlog

    def deliver(
        self,
        channel: str,
        message: Message,
        delivered: dict[str, tuple[int, int] | None],
    ) -> None:
        """Fan ``message`` out unless ``channel`` had it already, which
        ``delivered`` tells for each channel the reader receives."""
        with self.fanout.lock:
            if channel not in delivered:
                return
            done = delivered[channel]
            if done is None or message.order > done:
                delivered[channel] = message.order
                self.fanout.deliver(channel, message)

    def end_channels(self, channels: cabc.Iterable[str]) -> None:
        """End this worker's streams of ``channels``; their clients replay."""
        with self.fanout.lock:
            self.fanout.end_channels(channels)

    def cluster_stats(self) -> list[dict[str, t.Any]]:
        """Every live worker's subscriptions, from the keys their readers
        keep.

        :raises BrokerError: if Redis cannot be reached.
        """
        client = self.store.commands()
        try:
            keys = sorted(client.scan_iter(f"{self.store.prefix}:worker:*"))
            values = client.mget(keys) if keys else []
        except redis.RedisError as e:
            raise self.store.unreachable("read stats", e) from e
        return [json.loads(v) for v in values if v]

    def close(self) -> None:
        super().close()
        self.reader.stopping = True
        self.store.close()


def _message(entry_id: str, fields: dict[str, str]) -> Message:
    return message({**fields, "o": entry_id})
