"""The Redis broker: any number of workers and hosts share one Redis.

Every event goes, in one script, into two Redis streams: the app's stream of
all events, which orders it against every other, and its channel's stream,
which keeps that channel's history for replay. Each worker runs one
:class:`~.reader.RedisReader`, which fans the stream of all events out to
the worker's subscribers. A worker holds two Redis connections whatever its
number of clients: the reader's, and one for publish and replay.
"""

from __future__ import annotations

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
from .reader import Read
from .reader import RedisReader

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from ..event import Event
    from .base import Message
    from .fanout import Subscription

# One script that makes every check before its first write, so an event is
# stored whole or not at all. Its id is greater than the newest of both
# streams: a channel stream can hold a greater id than the stream of all
# events if that was deleted, or Redis's clock stepped back. Streams are
# trimmed with XDEL, not MAXLEN, because then Redis keeps the newest id it
# removed in the stream itself (max-deleted-entry-id), where replay and the
# reader find it, whatever other key is lost. An id the app gave is kept in
# the entry, and in a hash of the channel, for replay to find it, as long
# as the entry is in history.
_PUBLISH = """
local function newest(key)
  local entry = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  return entry and entry[1] or '0-0'
end
local function before(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if am ~= bm then return #am < #bm or (#am == #bm and am < bm) end
  return #as < #bs or (#as == #bs and as < bs)
end
local given = ARGV[3]
local fields = {'c', ARGV[1]}
if given ~= '' then fields = {'c', ARGV[1], 'i', given} end
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
local keys, lengths, id = {KEYS[1], KEYS[2]}, {ARGV[2], ARGV[4]}, '*'
local channel = newest(KEYS[2])
if before(newest(KEYS[1]), channel) then
  -- The channel stream gives the id: the next after its newest.
  id = string.match(channel, '%d+') .. '-*'
  keys, lengths = {KEYS[2], KEYS[1]}, {ARGV[4], ARGV[2]}
end
local function add(key, length, id)
  id = redis.call('XADD', key, id, unpack(fields))
  local over = redis.call('XLEN', key) - tonumber(length)
  if over > 0 then
    for _, entry in ipairs(redis.call('XRANGE', key, '-', '+', 'COUNT', over)) do
      redis.call('XDEL', key, entry[1])
      local f = entry[2]
      -- The app's id leaves with its entry, unless a later one took it.
      if key == KEYS[2] and f[3] == 'i'
          and redis.call('HGET', KEYS[4], f[4]) == entry[1] then
        redis.call('HDEL', KEYS[4], f[4])
      end
    end
  end
  return id
end
id = add(keys[1], lengths[1], id)
add(keys[2], lengths[2], id)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if given ~= '' then
  redis.call('HSET', KEYS[4], given, id)
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
end
redis.call('SET', KEYS[3], id, 'NX')
return id
"""


class RedisStore:
    """History in Redis Streams under ``prefix``, ``history`` events per
    channel for ``ttl`` seconds after the last, on the commands connection."""

    def __init__(self, url: str, history: int, prefix: str, ttl: float) -> None:
        self.url = url
        self.history = history
        self.prefix = prefix
        self.ttl = ttl
        #: The stream of all events: it orders them and feeds the readers.
        self.all = f"{prefix}:all"
        # The first id this Redis issued for the app: an older one comes
        # from history that Redis lost (a restart without persistence).
        self._first = f"{prefix}:first"
        # It only feeds readers, which keep up, but a reader back from a
        # Redis outage resumes from it.
        self.all_length = max(10 * history, 10_000)
        self._client: tuple[int, redis.Redis] | None = None
        self._publish = Script(None, _PUBLISH.encode())  # type: ignore[arg-type]

    def append(self, channel: str, event: Event) -> str:
        """Store ``event`` on ``channel`` and return its id."""
        given = "" if event.id is None else check_given_id(event.id)
        fields = [] if event.data is None else ["d", data_text(event.data)]
        if event.event is not None:
            fields += ["e", event.event]
        if event.retry is not None:
            fields += ["r", str(event.retry)]
        keys = [self.all, self._channel(channel), self._first, self._given(channel)]
        ttl_ms = max(1, int(self.ttl * 1000))
        args: list[t.Any] = [channel, self.all_length, given, self.history, ttl_ms]
        try:
            entry_id = self._publish(keys, args + fields, self.commands())
        except redis.ResponseError as e:
            raise BrokerError(f"Redis refused the event: {e}") from e
        except redis.RedisError as e:
            raise self.unreachable("publish", e) from e
        return given or t.cast(str, entry_id)

    def disconnect(self, channels: cabc.Sequence[str]) -> None:
        """Tell every worker's reader to end the streams of ``channels``."""
        try:
            # In the stream of all events, so that it comes in order with
            # them; replay reads channel streams only and never sees it.
            self.commands().xadd(self.all, {DISCONNECT: " ".join(channels)})
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

    def newest(self) -> str:
        """The newest id of the stream of all events ("0-0" for none)."""
        try:
            info = self.commands().xinfo_stream(self.all)
        except redis.ResponseError:
            return "0-0"
        except redis.RedisError as e:
            raise self.unreachable("subscribe", e) from e
        return t.cast(str, info["last-generated-id"])

    def read_after(
        self,
        channels: tuple[str, ...],
        last_id: str,
        after: tuple[int, int] | None,
        until: str,
    ) -> list[Message]:
        """Events of ``channels`` after ``last_id``, whose order is ``after``
        (None if not found), up to ``until``, after a reset if some are gone
        or the id is not one Redis knows."""
        if after is None:
            return replay(last_id, [], lost=True)
        pipe = self.commands().pipeline(transaction=False)
        for channel in channels:
            key = self._channel(channel)
            pipe.xrange(key, min=f"({after[0]}-{after[1]}", max=until)
            pipe.xinfo_stream(key)
        pipe.get(self._first)
        pipe.xinfo_stream(self.all)
        try:
            *replies, first, info = pipe.execute(raise_on_error=False)
        except redis.RedisError as e:
            raise self.unreachable("replay", e) from e
        runs, infos = replies[0::2], replies[1::2]
        for reply in (*runs, first):
            if isinstance(reply, Exception):
                raise self.unreachable("replay", reply)
        # No stream of all events yet: nothing was ever issued.
        newest = "0-0" if isinstance(info, Exception) else info["last-generated-id"]
        lost = (
            after > parse_id(newest)
            or (first is not None and after < parse_id(first))
            # A channel without a stream never had an event, or none for ttl.
            or any(
                expired(after, self.ttl)
                if isinstance(i, Exception)
                else parse_id(i["max-deleted-entry-id"]) > after
                for i in infos
            )
        )
        return replay(last_id, [[message(*entry) for entry in r] for r in runs], lost)

    def _channel(self, channel: str) -> str:
        return f"{self.prefix}:channel:{channel}"

    def _given(self, channel: str) -> str:
        # The ids the app gave the events of the channel's history.
        return f"{self.prefix}:ids:{channel}"

    def overtaken(self, connection: redis.Redis, position: str) -> bool:
        """Whether trimming removed events after ``position`` unread."""
        gone = connection.xinfo_stream(self.all).get("max-deleted-entry-id")
        return parse_id(bytes(gone or b"0-0").decode()) > parse_id(position)

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
        return current_backend().call(lambda: self.store.append(channel, event))

    def disconnect(self, channels: cabc.Sequence[str]) -> None:
        current_backend().call(lambda: self.store.disconnect(channels))

    def attach(self, subscription: Subscription) -> list[Message]:
        last_id = subscription.last_event_id
        found: tuple[int, int] | None = (0, 0)
        if last_id is not None:
            found = current_backend().call(
                lambda: self.store.find(subscription.channels, last_id)
            )
        # An id Redis does not know replays nothing, and is reset.
        after = found or (0, 0)
        # The newest id Redis has issued, fetched when it is needed: to start
        # the reader, or to learn whether a client is ahead of the reader.
        newest: str | None = None
        while True:
            with self.fanout.lock:
                if self._pid != os.getpid():
                    # A forked worker starts with no reader of its own. (A
                    # server's parent process has no subscribers to inherit.)
                    self._pid, self.reader = os.getpid(), RedisReader(self)
                    self.fanout.position = None
                if self.fanout.position is None and newest is not None:
                    self.fanout.position = newest
                    self.reader.start()
                position = self.fanout.position
                if position is not None and (
                    after <= parse_id(position) or newest is not None
                ):
                    # The client saw, on another worker, events this reader
                    # has yet to read: they must not come twice. (An id Redis
                    # never issued gets a reset instead.)
                    if parse_id(position) < after <= parse_id(newest or "0-0"):
                        subscription.skip_through(after)
                    self.fanout.add(subscription)
                    break
            newest = current_backend().call(self.store.newest)
        if last_id is None:
            return []
        try:
            return current_backend().call(
                lambda: self.store.read_after(
                    subscription.channels, last_id, found, position
                )
            )
        except BrokerError:
            self.detach(subscription)
            raise

    def deliver(self, messages: list[Read], position: str) -> None:
        """Fan ``messages`` out, or end the streams of the channels a
        disconnect names, and move the hand-over point to ``position``, in
        one step: a subscription attached next replays up to it."""
        with self.fanout.lock:
            for channel, item in messages:
                if channel is None:
                    self.fanout.end_channels(t.cast("list[str]", item))
                else:
                    self.fanout.deliver(channel, t.cast("Message", item))
            self.fanout.position = position

    def overtaken(self, position: str) -> None:
        """Trimming passed the reader: end every stream and go on from
        ``position``, in one step, so nobody attaches in between."""
        with self.fanout.lock:
            self.fanout.end_all()
            self.fanout.position = position

    def cluster_stats(self) -> list[dict[str, t.Any]]:
        """Every live worker's subscriptions, from the keys their readers keep.

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
