"""The Redis reader: one per worker, on a connection of its own, it feeds
the stream of all events to the worker's subscribers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import typing as t

import redis

from ..concurrency import current_backend
from ..event import Event
from .base import Message
from .base import parse_id

if t.TYPE_CHECKING:
    from .redis import RedisBroker

logger = logging.getLogger(__name__)

#: How long the reader's XREAD blocks before it looks around.
READ_BLOCK_MS = 1000
#: How many events the reader takes from Redis at once.
READ_COUNT = 1000
#: The longest pause between attempts after a failure.
MAX_BACKOFF_SECONDS = 5.0
#: How often the reader refreshes its worker's key for ``eventstream stats``.
WORKER_KEY_SECONDS = 5
#: The field of an entry that ends the streams of the channels it names.
DISCONNECT = "disconnect"

#: What the reader hands over: a channel's message, or channels to end.
Read: t.TypeAlias = "tuple[str, Message] | tuple[None, list[str]]"


class RedisReader:
    """Reads the stream of all events for ``broker``'s subscribers.

    Its :attr:`state` is ``stopped`` (no subscribers, no connection),
    ``reading``, or ``failing``: a failure of any kind is logged and waited
    out with a growing pause, and reading goes on from the last id
    delivered; an entry that is not an event is logged and skipped. It never
    uses the commands connection, so a publish burst or a replay storm does
    not delay live events.
    """

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.state: t.Literal["stopped", "reading", "failing"] = "stopped"
        self.stopping = False

    def start(self) -> None:
        """Start reading; the caller holds the fan-out lock and has just set
        the position to read from."""
        if self.state == "stopped":
            self.state, self.stopping = "reading", False
            current_backend().spawn(self._run, "eventstream-redis-reader")

    def _run(self) -> None:
        store = self.broker.store
        key = f"{store.prefix}:worker:{socket.gethostname()}:{os.getpid()}"
        connection = store.connect("reader", socket_timeout=READ_BLOCK_MS / 1000 + 10)
        failures, announced = 0, 0.0
        try:
            while (position := self._position()) is not None:
                try:
                    reply: t.Any = connection.xread(
                        {store.all: position}, count=READ_COUNT, block=READ_BLOCK_MS
                    )
                    if failures:
                        logger.warning("Redis is back after %d failed reads.", failures)
                        failures, self.state = 0, "reading"
                    if reply:
                        self._hand_over(connection, position, reply[0][1])
                    if time.monotonic() - announced >= WORKER_KEY_SECONDS:
                        announced = time.monotonic()
                        stats = {"host": socket.gethostname(), "pid": os.getpid()}
                        stats.update(self.broker.stats())
                        connection.set(
                            key, json.dumps(stats), ex=3 * WORKER_KEY_SECONDS
                        )
                except Exception as e:
                    failures, self.state = failures + 1, "failing"
                    if failures == 1 and isinstance(e, redis.RedisError):
                        logger.warning(
                            "Lost Redis; live events wait until it is back: %s", e
                        )
                    elif failures == 1:
                        logger.exception("The Redis reader failed; it starts again.")
                    time.sleep(min(0.1 * 2**failures, MAX_BACKOFF_SECONDS))
        finally:
            with self.broker.fanout.lock:
                # Ended by an exception that is not an Exception: the next
                # subscriber starts a new reader.
                if self.state != "stopped":
                    self.state, self.broker.fanout.position = "stopped", None
            with contextlib.suppress(Exception):
                connection.delete(key)
            connection.connection_pool.disconnect()

    def _position(self) -> str | None:
        # The decision to stop is made under the fan-out lock, in the same
        # step as its state, so a subscriber attached next starts a reader.
        with self.broker.fanout.lock:
            if self.stopping or not len(self.broker.fanout):
                self.state, self.broker.fanout.position = "stopped", None
            return self.broker.fanout.position

    def _hand_over(
        self, connection: redis.Redis, position: str, entries: list[t.Any]
    ) -> None:
        last = entries[-1][0].decode()
        if self.broker.store.overtaken(connection, position):
            # Trimming passed the reader (it fell further behind than the
            # stream of all events holds): its streams end, and their
            # clients replay or learn of the gap.
            logger.warning("The Redis reader fell behind; ending streams.")
            self.broker.overtaken(last)
            return
        messages: list[Read] = []
        for entry_id, fields in entries:
            try:
                text = {k.decode(): v.decode() for k, v in fields.items()}
                if DISCONNECT in text:
                    messages.append((None, text[DISCONNECT].split()))
                    continue
                messages.append((text["c"], message(entry_id.decode(), text)))
            except Exception as e:
                logger.error(
                    "Skipped the entry %s, not an event: %s", entry_id.decode(), e
                )
        self.broker.deliver(messages, last)


def message(entry_id: str, fields: dict[str, str]) -> Message:
    """The message for a stream entry; raises if the entry is malformed."""
    retry = fields.get("r")
    event = Event(
        fields.get("d"),
        event=fields.get("e"),
        id=fields.get("i", entry_id),
        retry=int(retry) if retry is not None else None,
    )
    return Message.of(event, parse_id(entry_id))
