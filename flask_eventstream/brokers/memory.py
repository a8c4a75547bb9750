"""The in-memory broker: one process, nothing to install."""

from __future__ import annotations

import collections
import dataclasses
import operator
import time
import typing as t

from .. import metrics
from ..event import Event
from .base import Broker
from .base import check_given_id
from .base import DEFAULT_HISTORY_TTL_SECONDS
from .base import expired
from .base import Message
from .base import parse_id
from .base import replay

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .fanout import Subscription

#: The names of an event's fields besides its data, in the order history
#: keeps their values.
_FIELDS = tuple(f.name for f in dataclasses.fields(Event) if f.name != "data")
_field_values = operator.attrgetter(*_FIELDS)
_ID = _FIELDS.index("id")

# History keeps each event as plain values, not as its Message and Event:
# (order, wire bytes, the other fields' values) in one deque, and its data
# (its payload), as given, in another. The garbage collector stops
# tracking a tuple of plain values once it has seen it, and never tracks
# text or a dict of plain values, while it tracks an instance of a class
# for as long as it lives. Kept as objects, a busy channel's history would
# move two objects per event into the collector's oldest generation, whose
# collections then come every few seconds and pause every stream of the
# worker for tens of milliseconds.
_Kept = tuple[tuple[int, int], bytes, tuple[t.Any, ...]]


class _Replayed(Message):
    """An event from history: its Event is made again only when asked for,
    which a stream, that sends the bytes, never does."""

    __slots__ = ("_payload", "_values")

    def __init__(self, kept: _Kept, payload: t.Any) -> None:
        # Not Message's constructor: there is no Event to give it, and the
        # property below takes the place of the one that would return it.
        self.order, self.data, self._values = kept
        self._payload = payload

    @property
    def event(self) -> Event:
        return Event(self._payload, **dict(zip(_FIELDS, self._values, strict=True)))


class _History:
    __slots__ = ("events", "evicted", "given", "payloads", "touched")

    def __init__(self, size: int) -> None:
        # In step: the nth of each is the same event's.
        self.events: collections.deque[_Kept] = collections.deque(maxlen=size)
        self.payloads: collections.deque[t.Any] = collections.deque(maxlen=size)
        # The order of each event in history whose id the app gave.
        self.given: dict[str, tuple[int, int]] = {}
        # The newest event that the channel's history no longer holds.
        self.evicted = (0, 0)
        self.touched = time.monotonic()


class MemoryStore:
    """History per channel, dropped after ``ttl`` seconds without an event.

    Ids are ``<milliseconds>-<seq>`` from the clock, so they keep increasing
    across restarts and an old id never names a new event.
    """

    def __init__(self, history: int, ttl: float) -> None:
        self.history = history
        self.ttl = ttl
        # In the order of their last event, so the quiet ones come first.
        self._channels: dict[str, _History] = {}
        self._started = (int(time.time() * 1000), 0)
        #: The order of the newest event, or just below the first this
        #: store may issue.
        self.last = (self._started[0], -1)

    def append(self, channel: str, event: Event) -> Message:
        """Store ``event`` and order it; it gets an id unless it has one."""
        if event.id is not None:
            check_given_id(event.id)
        ms, seq = self.last
        now = int(time.time() * 1000)
        order = self.last = (now, 0) if now > ms else (ms, seq + 1)
        if event.id is None:
            event = dataclasses.replace(event, id=f"{order[0]}-{order[1]}")
        self._drop_quiet()
        # Moved to the end: the channels stay in the order of their last event.
        kept: _History | None = self._channels.pop(channel, None)
        kept = self._channels[channel] = kept or _History(self.history)
        kept.touched = time.monotonic()
        if len(kept.events) == self.history:
            gone_order, _, gone_values = kept.events[0]
            kept.evicted = gone_order
            if kept.given.get(gone_values[_ID]) == gone_order:
                del kept.given[gone_values[_ID]]
        message = Message.of(event, order)
        kept.events.append((order, message.data, _field_values(event)))
        kept.payloads.append(event.data)
        if event.id is not None and event.id != f"{order[0]}-{order[1]}":
            kept.given[event.id] = order
        return message

    def read_after(self, channels: tuple[str, ...], last_id: str) -> list[Message]:
        """Events of ``channels`` after ``last_id``, after a reset if some
        are gone or the id is not one this store can resume from."""
        self._drop_quiet()
        kept = [self._channels.get(ch) for ch in channels]
        # An id the app gave is found in history; the latest event that
        # carried it counts. Any other must be in the broker's form.
        given = [h.given[last_id] for h in kept if h and last_id in h.given]
        try:
            after = max(given) if given else parse_id(last_id)
        except ValueError:
            return replay(last_id, [], lost=True)
        lost = (
            not self._started <= after <= self.last
            or any(h is None and expired(after, self.ttl) for h in kept)
            or any(h is not None and h.evicted > after for h in kept)
        )
        runs = [_newer(h, after) for h in kept if h is not None]
        return replay(last_id, runs, lost)

    def _drop_quiet(self) -> None:
        horizon = time.monotonic() - self.ttl
        while self._channels:
            channel, oldest = next(iter(self._channels.items()))
            if oldest.touched >= horizon:
                return
            del self._channels[channel]


def _newer(history: _History, after: tuple[int, int]) -> list[Message]:
    newer: list[Message] = []
    events, payloads = reversed(history.events), reversed(history.payloads)
    for kept, payload in zip(events, payloads, strict=True):
        if kept[0] <= after:
            break
        newer.append(_Replayed(kept, payload))
    newer.reverse()
    return newer


class MemoryBroker(Broker):
    """Keeps history in memory and delivers within one process.

    :param history: events kept per channel for replay.
    :param history_ttl: seconds the history of a quiet channel is kept.

    .. versionadded:: 0.1
    """

    def __init__(
        self, history: int = 1000, history_ttl: float = DEFAULT_HISTORY_TTL_SECONDS
    ) -> None:
        super().__init__()
        self.store = MemoryStore(history, history_ttl)

    def publish(self, channel: str, event: Event) -> str:
        # Stored and delivered in one step, so deliveries keep the order of
        # ids and a new subscriber's replay ends where its live events start.
        with self.fanout.lock:
            message = self.store.append(channel, event)
            self.fanout.deliver(channel, message)
        metrics.hooks.published("memory")
        return t.cast(str, message.event.id)

    def disconnect(self, channels: cabc.Sequence[str]) -> None:
        with self.fanout.lock:
            self.fanout.end_channels(channels)

    def attach(self, subscription: Subscription) -> list[Message]:
        last_id = subscription.last_event_id
        with self.fanout.lock:
            self.fanout.add(subscription)
            # Events published before and not yet delivered are in the
            # replay, or older than the subscription.
            subscription.skip_through(self.store.last)
            if last_id is None:
                return []
            return self.store.read_after(subscription.channels, last_id)
