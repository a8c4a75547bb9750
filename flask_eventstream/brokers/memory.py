"""The in-memory broker: one process, nothing to install."""

from __future__ import annotations

import collections
import dataclasses
import heapq
import time
import typing as t

from .base import Broker
from .base import Message
from .base import parse_id
from .base import reset_message

if t.TYPE_CHECKING:
    from ..event import Event
    from .base import Subscription


class MemoryBroker(Broker):
    """Keeps history in memory and delivers within one process.

    Ids are ``<milliseconds>-<seq>``, from the clock, so they keep
    increasing across restarts and an old id never names a new event. A
    client that comes back with an id this broker cannot resume from (older
    than history, or from before it started) gets an ``eventstream.reset``
    event first.

    :param history: events kept per channel for replay.

    .. versionadded:: 0.1
    """

    def __init__(self, history: int = 1000) -> None:
        super().__init__()
        self.history = history
        self._channels: dict[str, collections.deque[Message]] = {}
        # Per channel, the newest event that history no longer holds.
        self._evicted: dict[str, tuple[int, int]] = {}
        self._started = (int(time.time() * 1000), 0)
        # Just below the first id this broker may issue.
        self._last = (self._started[0], -1)

    def publish(self, channel: str, event: Event) -> str:
        with self._lock:
            if event.id is None:
                order = self._next_order()
                event = dataclasses.replace(event, id=f"{order[0]}-{order[1]}")
            else:
                order = parse_id(event.id)
                if order <= self._last:
                    ms, seq = self._last
                    floor = f"{ms}-{seq + 1}"
                    raise ValueError(
                        f"An event id must be at least {floor}, after every id"
                        f" this broker issued; got {event.id!r}. Leave 'id' out"
                        " to have one assigned."
                    )
            self._last = order
            message = Message.of(event, order)
            kept = self._channels.get(channel)
            if kept is None:
                kept = self._channels[channel] = collections.deque(maxlen=self.history)
            if len(kept) == self.history:
                self._evicted[channel] = kept[0].order
            kept.append(message)
            self._fan_out(channel, message)
        assert event.id is not None
        return event.id

    def attach(self, subscription: Subscription) -> list[Message]:
        last_id = subscription.last_event_id
        with self._lock:
            backlog = [] if last_id is None else self._replay(subscription, last_id)
            self._add(subscription)
        return backlog

    def _replay(self, subscription: Subscription, last_id: str) -> list[Message]:
        after = parse_id(last_id)
        lost = (
            after < self._started
            or after > self._last
            or any(
                self._evicted.get(ch, (0, 0)) > after for ch in subscription.channels
            )
        )
        runs = [self._newer(ch, after) for ch in subscription.channels]
        backlog = list(heapq.merge(*runs, key=lambda m: m.order))
        return [reset_message(last_id), *backlog] if lost else backlog

    def _newer(self, channel: str, after: tuple[int, int]) -> list[Message]:
        newer = []
        for message in reversed(self._channels.get(channel, ())):
            if message.order <= after:
                break
            newer.append(message)
        newer.reverse()
        return newer

    def _next_order(self) -> tuple[int, int]:
        now = int(time.time() * 1000)
        ms, seq = self._last
        return (now, 0) if now > ms else (ms, seq + 1)
