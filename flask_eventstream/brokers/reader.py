"""The Redis reader: one per worker, on a connection of its own, it feeds
the stream of all events to the worker's subscribers.

It never uses the commands connection, so a publish burst or a replay storm
does not delay live events, and it survives anything (see :class:`RedisReader`).
"""

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
    from .redis import RedisStore

logger = logging.getLogger(__name__)

#: How long the reader's XREAD blocks before it looks around.
READ_BLOCK_MS = 1000
#: How long a read may take before the connection counts as lost.
READ_TIMEOUT_SECONDS = READ_BLOCK_MS / 1000 + 10
#: How many events the reader takes from Redis at once.
READ_COUNT = 1000
#: The longest pause between attempts after a failure.
MAX_BACKOFF_SECONDS = 5.0
#: How often the reader refreshes its worker's key for ``eventstream stats``.
WORKER_KEY_SECONDS = 5.0

State = t.Literal["stopped", "reading", "failing"]


class RedisReader:
    """Reads the stream of all events from ``store`` for ``broker``.

    Its :attr:`state` is ``stopped`` (no subscribers, no connection),
    ``reading``, or ``failing``: a failure is logged and waited out with a
    growing pause, and reading goes on from the last id delivered. An entry
    that is not an event is logged and skipped.
    """

    def __init__(self, store: RedisStore, broker: RedisBroker) -> None:
        self._store = store
        self._broker = broker
        self.state: State = "stopped"
        self._stopping = False

    def start(self) -> None:
        """Start reading, from the broker's position; the caller holds the
        fan-out lock and has just set that position."""
        if self.state == "stopped":
            self.state = "reading"
            self._stopping = False
            current_backend().spawn(self._run, "eventstream-redis-reader")

    def stop(self) -> None:
        """Stop after the current read."""
        self._stopping = True

    def _run(self) -> None:
        worker_key = f"{self._store.prefix}:worker:{socket.gethostname()}:{os.getpid()}"
        connection = self._store.connect("reader", socket_timeout=READ_TIMEOUT_SECONDS)
        failures = 0
        announced = 0.0
        try:
            while (position := self._position()) is not None:
                try:
                    reply: t.Any = connection.xread(
                        {self._store.all: position},
                        count=READ_COUNT,
                        block=READ_BLOCK_MS,
                    )
                    if failures:
                        logger.warning("Redis is back after %d failed reads.", failures)
                        failures, self.state = 0, "reading"
                    if reply:
                        self._hand_over(connection, position, reply[0][1])
                    if time.monotonic() - announced >= WORKER_KEY_SECONDS:
                        announced = time.monotonic()
                        self._announce(connection, worker_key)
                except Exception as e:
                    failures += 1
                    self.state = "failing"
                    if failures == 1 and isinstance(e, redis.RedisError):
                        logger.warning(
                            "Lost Redis; live events wait until it is back: %s", e
                        )
                    elif failures == 1:
                        logger.exception("The Redis reader failed; it starts again.")
                    time.sleep(min(0.1 * 2**failures, MAX_BACKOFF_SECONDS))
        finally:
            with self._broker.fanout.lock:
                if self.state != "stopped":
                    # Ended by an exception that is not an Exception: the
                    # next subscriber starts a new reader.
                    self.state, self._broker.fanout.position = "stopped", None
            with contextlib.suppress(Exception):
                connection.delete(worker_key)
            connection.connection_pool.disconnect()

    def _position(self) -> str | None:
        # The decision to stop is made under the fan-out lock, in the same
        # step as its state, so a subscriber attached next starts a reader.
        with self._broker.fanout.lock:
            if self._stopping or not len(self._broker.fanout):
                self.state, self._broker.fanout.position = "stopped", None
            return self._broker.fanout.position

    def _hand_over(
        self,
        connection: redis.Redis,
        position: str,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
    ) -> None:
        last = entries[-1][0].decode()
        if self._store.overtaken(connection, position):
            # Trimming passed the reader (it fell further behind than the
            # stream of all events holds): the streams end, so their
            # clients replay or learn of the gap.
            logger.warning("The Redis reader fell behind; ending streams.")
            self._broker.overtaken(last)
            return
        messages = []
        for entry_id, fields in entries:
            try:
                messages.append(_decode(entry_id, fields))
            except Exception as e:
                logger.error(
                    "Skipped the entry %s of %s, which is not an event: %s",
                    entry_id.decode(),
                    self._store.all,
                    e,
                )
        self._broker.deliver(messages, last)

    def _announce(self, connection: redis.Redis, key: str) -> None:
        value = {"host": socket.gethostname(), "pid": os.getpid()}
        value.update(self._broker.stats())
        connection.set(key, json.dumps(value), ex=int(WORKER_KEY_SECONDS * 3))


def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[str, Message]:
    text = {key.decode(): value.decode() for key, value in fields.items()}
    return text["c"], message(entry_id.decode(), text)


def message(entry_id: str, fields: dict[str, str]) -> Message:
    """The message for a stream entry; raises if the entry is malformed."""
    retry = fields.get("r")
    event = Event(
        fields.get("d"),
        event=fields.get("e"),
        id=entry_id,
        retry=int(retry) if retry is not None else None,
    )
    return Message.of(event, parse_id(entry_id))
