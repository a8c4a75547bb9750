"""The Redis broker: any number of workers and hosts share one Redis.

Every event goes, in one atomic script, into two Redis streams: the app's
stream of all events, which gives each event an id that orders it against
every other, and its channel's stream, which keeps that channel's history
for replay. Each worker process runs one reader that blocks on the stream of
all events and fans each event out, encoded once, to the worker's own
subscribers. A worker therefore holds two Redis connections whatever its
number of clients: the reader's, and one shared by publish and replay.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import socket
import time
import typing as t
import urllib.parse

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "The Redis broker needs 'redis'. Install 'flask-eventstream[redis]'."
    ) from e

from ..concurrency import current_backend
from ..event import data_text
from ..event import Event
from .base import Broker
from .base import BrokerError
from .base import Message
from .base import parse_id
from .base import reset_message

if t.TYPE_CHECKING:
    from .base import Subscription

logger = logging.getLogger(__name__)

#: How long the reader's XREAD blocks before it looks around.
READ_BLOCK_MS = 1000
#: How many events the reader takes from Redis at once.
READ_COUNT = 1000
#: The longest wait between reconnection attempts of the reader.
MAX_BACKOFF_SECONDS = 5.0
#: How often a worker refreshes its entry in ``flask eventstream stats``.
HEARTBEAT_SECONDS = 5.0

# One script, so an event is stored in full or not at all. The channel
# stream reuses the id from the stream of all events, which is larger than
# any earlier id of every channel. Both streams are trimmed exactly, and the
# newest id each trim removed is kept in a hash: replay compares a client's
# id with it to know whether the client missed events.
_PUBLISH = """
local function add(key, field, maxlen, id, fields)
  local length = redis.call('XLEN', key)
  local gone = nil
  if length >= maxlen then
    local old = redis.call('XRANGE', key, '-', '+', 'COUNT', length - maxlen + 1)
    gone = old[#old][1]
  end
  -- XADD checks a given id first: a refused one stops the script here,
  -- before anything is written.
  local new = redis.call('XADD', key, 'MAXLEN', maxlen, id, unpack(fields))
  if gone then redis.call('HSET', KEYS[3], field, gone) end
  if length == 0 and field == '*' then
    redis.call('SET', KEYS[4], new, 'NX')
  end
  return new
end
local fields = {'c', ARGV[1]}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = add(KEYS[1], '*', tonumber(ARGV[2]), ARGV[3], fields)
add(KEYS[2], ARGV[1], tonumber(ARGV[4]), id, fields)
return id
"""


class RedisBroker(Broker):
    """Keeps history in Redis Streams and fans out within each worker.

    :param url: ``redis://host:port/db``.
    :param history: events kept per channel for replay.
    :param prefix: the start of every key this broker uses, so several apps
        can share one Redis database.

    .. versionadded:: 0.1
    """

    shared = True

    def __init__(self, url: str, *, history: int = 1000, prefix: str = "eventstream"):
        super().__init__()
        self.url = url
        self.history = history
        self.prefix = prefix
        self._all = f"{prefix}:all"
        # Per channel (and "*" for the stream of all events), the newest id
        # that trimming removed.
        self._trimmed = f"{prefix}:trimmed"
        # The first id this Redis ever issued for the app: an id older than
        # it comes from history that Redis lost (a restart without
        # persistence, a flush).
        self._first = f"{prefix}:first"
        # The stream of all events only feeds readers, which keep up, but a
        # reader back from a Redis outage resumes from it.
        self._all_length = max(10 * history, 10_000)
        self._commands_for: tuple[int, redis.Redis, t.Any] | None = None
        # The reader's position in the stream of all events: everything up to
        # it has been fanned out. None while no reader runs.
        self._cursor: str | None = None
        self._pid = os.getpid()
        self._closed = False

    def publish(self, channel: str, event: Event) -> str:
        if event.id is not None:
            parse_id(event.id)
        fields = []
        if event.data is not None:
            fields += ["d", data_text(event.data)]
        if event.event is not None:
            fields += ["e", event.event]
        if event.retry is not None:
            fields += ["r", str(event.retry)]
        try:
            return t.cast(
                str,
                self._publish_script()(
                    keys=[
                        self._all,
                        self._channel_key(channel),
                        self._trimmed,
                        self._first,
                    ],
                    args=[
                        channel,
                        self._all_length,
                        event.id or "*",
                        self.history,
                        *fields,
                    ],
                ),
            )
        except redis.ResponseError as e:
            if event.id is not None and "ID" in str(e):
                raise ValueError(
                    f"An event id must be greater than the last one issued; got"
                    f" {event.id!r} ({e}). Leave 'id' out to have one assigned."
                ) from None
            raise BrokerError(f"Redis refused the event: {e}") from e
        except redis.RedisError as e:
            raise self._unreachable("publish", e) from e

    def attach(self, subscription: Subscription) -> list[Message]:
        last = subscription.last_event_id
        after = None if last is None else parse_id(last)
        # The newest id Redis has issued, fetched when it is needed: to start
        # the reader, or to learn whether a client is ahead of the reader.
        newest: str | None = None
        while True:
            with self._lock:
                self._forget_parent()
                if self._cursor is None and newest is not None:
                    self._cursor = newest
                    current_backend().spawn(self._read)
                cursor = self._cursor
                ahead = (
                    after is not None
                    and cursor is not None
                    and after > parse_id(cursor)
                )
                if cursor is not None and (not ahead or newest is not None):
                    # The client saw, on another worker, events this reader
                    # has yet to read: they must not come twice. (An id Redis
                    # never issued gets a reset instead.)
                    if (
                        ahead
                        and after is not None
                        and newest is not None
                        and after <= parse_id(newest)
                    ):
                        subscription.skip_through(after)
                    # Live delivery starts after the reader's position, and
                    # replay ends at it: one hand-over point, no gap.
                    bound = cursor
                    self._add(subscription)
                    break
            try:
                newest = self._newest_id()
            except redis.RedisError as e:
                raise self._unreachable("subscribe", e) from e
        last_id = subscription.last_event_id
        if last_id is None:
            return []
        try:
            return self._replay(subscription.channels, last_id, bound)
        except redis.RedisError as e:
            with self._lock:
                self._remove(subscription)
            raise self._unreachable("replay", e) from e

    def cluster_stats(self) -> list[dict[str, t.Any]]:
        """Every live worker's subscriptions, from their heartbeat keys.

        :raises BrokerError: if Redis cannot be reached.
        """
        try:
            keys = sorted(self._commands().scan_iter(f"{self.prefix}:worker:*"))
            values = self._commands().mget(keys) if keys else []
        except redis.RedisError as e:
            raise self._unreachable("read stats", e) from e
        return [json.loads(v) for v in values if v]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            reading = self._cursor is not None
        super().close()
        if not reading:
            self._disconnect()

    def _disconnect(self) -> None:
        # The client does not own a pool it was given: disconnect the pool.
        if self._commands_for is not None:
            self._commands_for[1].connection_pool.disconnect()

    def _commands(self) -> redis.Redis:
        """The worker's connection for publish and replay.

        Made in the worker itself, so that its name in ``CLIENT LIST``
        carries the worker's pid, even when the app was loaded before fork.
        """
        pid = os.getpid()
        if self._commands_for is None or self._commands_for[0] != pid:
            client = redis.Redis(
                connection_pool=redis.BlockingConnectionPool.from_url(
                    self.url,
                    max_connections=1,
                    timeout=10,
                    decode_responses=True,
                    socket_timeout=10,
                    socket_connect_timeout=5,
                    client_name=_client_name("commands"),
                    # A publish is not retried: a retry after a reply was lost
                    # would store the event twice. The caller gets
                    # BrokerError and decides.
                    retry=Retry(NoBackoff(), 0),
                )
            )
            self._commands_for = (pid, client, client.register_script(_PUBLISH))
        return self._commands_for[1]

    def _publish_script(self) -> t.Any:
        self._commands()
        assert self._commands_for is not None
        return self._commands_for[2]

    def _channel_key(self, channel: str) -> str:
        return f"{self.prefix}:channel:{channel}"

    def _unreachable(self, action: str, error: Exception) -> BrokerError:
        parts = urllib.parse.urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
        return BrokerError(
            f"Could not {action}: Redis at {where} did not answer ({error})."
            " Is redis-server running and reachable?"
        )

    def _replay(
        self, channels: tuple[str, ...], last_id: str, bound: str
    ) -> list[Message]:
        after = parse_id(last_id)
        pipe = self._commands().pipeline(transaction=False)
        for channel in channels:
            pipe.xrange(self._channel_key(channel), min=f"({last_id}", max=bound)
        pipe.hmget(self._trimmed, list(channels))
        pipe.get(self._first)
        pipe.xinfo_stream(self._all)
        *runs, trimmed, first, info = pipe.execute(raise_on_error=False)
        for result in (*runs, trimmed, first):
            if isinstance(result, Exception):
                raise result
        # No stream of all events yet: nothing was ever issued.
        newest = (0, 0) if isinstance(info, Exception) else _order(info)
        messages = [
            [_message(entry_id, fields) for entry_id, fields in run] for run in runs
        ]
        backlog = list(heapq.merge(*messages, key=lambda m: m.order))
        lost = (
            after > newest
            or (first is not None and after < parse_id(first))
            or any(gone is not None and parse_id(gone) > after for gone in trimmed)
        )
        return [reset_message(last_id), *backlog] if lost else backlog

    def _forget_parent(self) -> None:
        # A forked worker starts with no reader and no subscribers of its own.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._cursor = None
            self._subscribers.clear()
            self._count = 0

    def _newest_id(self) -> str:
        try:
            info = self._commands().xinfo_stream(self._all)
        except redis.ResponseError:
            return "0-0"
        return t.cast(str, info["last-generated-id"])

    def _read(self) -> None:
        connection = redis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=READ_BLOCK_MS / 1000 + 10,
            socket_connect_timeout=5,
            single_connection_client=True,
            client_name=_client_name("reader"),
            # The read loop has its own backoff.
            retry=Retry(NoBackoff(), 0),
        )
        failures = 0
        next_heartbeat = 0.0
        heartbeat_key = f"{self.prefix}:worker:{socket.gethostname()}:{os.getpid()}"
        try:
            while True:
                with self._lock:
                    if self._closed or not self._count:
                        # Nobody listens: stop, and start afresh when
                        # someone does.
                        self._cursor = None
                        return
                    cursor = self._cursor
                assert cursor is not None
                try:
                    reply = connection.xread(
                        {self._all: cursor}, count=READ_COUNT, block=READ_BLOCK_MS
                    )
                    overtaken = bool(reply) and self._overtaken(connection, cursor)
                except redis.RedisError as e:
                    failures += 1
                    if failures == 1:
                        logger.warning(
                            "Lost Redis; live events wait until it is back: %s", e
                        )
                    time.sleep(min(0.1 * 2**failures, MAX_BACKOFF_SECONDS))
                    continue
                if failures:
                    logger.warning("Redis is back after %d failed reads.", failures)
                    failures = 0
                if overtaken:
                    # Trimming passed the reader (it fell further behind than
                    # the stream of all events holds): the streams end, so
                    # their clients replay or learn of the gap.
                    logger.warning("The reader fell behind; ending streams.")
                    super().close()
                for _key, entries in t.cast("list[t.Any]", reply or []):
                    self._deliver([] if overtaken else entries, entries[-1][0])
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
                    self._heartbeat(heartbeat_key)
        finally:
            connection.close()
            with contextlib.suppress(redis.RedisError):
                self._commands().delete(heartbeat_key)
            if self._closed:
                # close() left the shared connection to the reader.
                self._disconnect()

    def _deliver(self, entries: list[tuple[str, dict[str, str]]], last: str) -> None:
        messages = [(fields.get("c", ""), _message(i, fields)) for i, fields in entries]
        with self._lock:
            for channel, message in messages:
                self._fan_out(channel, message)
            # In the same step as the fan-out: a subscription attached
            # now replays up to here and is live after it.
            if self._cursor is not None:
                self._cursor = last

    def _overtaken(self, connection: redis.Redis, cursor: str) -> bool:
        gone = connection.hget(self._trimmed, "*")
        return gone is not None and parse_id(str(gone)) > parse_id(cursor)

    def _heartbeat(self, key: str) -> None:
        value = {"host": socket.gethostname(), "pid": os.getpid(), **self.stats()}
        with contextlib.suppress(redis.RedisError):
            self._commands().set(key, json.dumps(value), ex=int(HEARTBEAT_SECONDS * 3))


def _client_name(role: str) -> str:
    return f"eventstream:{role}:{socket.gethostname()}:{os.getpid()}"


def _order(info: dict[str, t.Any]) -> tuple[int, int]:
    return parse_id(info.get("last-generated-id", "0-0"))


def _message(entry_id: str, fields: dict[str, str]) -> Message:
    retry = fields.get("r")
    event = Event(
        fields.get("d"),
        event=fields.get("e"),
        id=entry_id,
        retry=int(retry) if retry is not None else None,
    )
    return Message.of(event, parse_id(entry_id))
