"""What every broker shares: ids, subscriptions and in-process fan-out.

A broker stores events, gives them ids that order them, and hands each one
to the subscriptions of its channel in this process. An event is encoded
once, as a :class:`Message`; every subscriber's queue holds a reference to
the same bytes.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import threading
import typing as t

from ..concurrency import current_backend
from ..concurrency import Mailbox
from ..concurrency import StreamSource
from ..event import Event

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from ..concurrency import Backend

#: The event type that tells a client it missed events it cannot get back.
RESET_EVENT = "eventstream.reset"
#: How many replayed events go out in one write.
BACKLOG_BATCH = 256

_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_CHANNEL = re.compile(r"[A-Za-z0-9._:-]{1,200}")


class BrokerError(Exception):
    """The broker cannot be reached, so an event could not be published.

    .. versionadded:: 0.1
    """


def parse_id(value: str) -> tuple[int, int]:
    """Return the order of an event id of the form ``<milliseconds>-<seq>``.

    :param value: an id the broker issued, e.g. from ``Last-Event-ID``.
    :raises ValueError: if it is not such an id.
    """
    match = _ID.fullmatch(value)
    # Each part is an unsigned 64-bit number, as in Redis.
    if match is None or max(int(match[1]), int(match[2])) >= 2**64:
        raise ValueError(
            "Event ids look like '1700000000000-0' (milliseconds, a dash and a"
            f" sequence number); got {value[:60]!r}."
        )
    return int(match[1]), int(match[2])


def check_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel name, else raise ValueError."""
    if not isinstance(name, str) or _CHANNEL.fullmatch(name) is None:
        raise ValueError(
            "Channel names are 1-200 characters of A-Z a-z 0-9 . _ : -"
            f" (got {str(name)[:60]!r})."
        )
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """An event as it is fanned out: the event, its wire bytes, its order."""

    event: Event
    data: bytes
    order: tuple[int, int]

    @classmethod
    def of(cls, event: Event, order: tuple[int, int] = (0, 0)) -> Message:
        return cls(event, event.encode(), order)


def reset_message(last_event_id: str) -> Message:
    """The message that tells a client ``last_event_id`` cannot be resumed.

    It carries data because browsers never dispatch an event without it.
    """
    return Message.of(Event(last_event_id, event=RESET_EVENT))


class Subscription(StreamSource):
    """One client's subscription to some channels.

    Events are queued from the moment it is started (the broker starts it
    in :meth:`Broker.subscribe`), so nothing published after a client is
    subscribed can be missed, even before the first byte is streamed.
    Returned from a ``@stream_events`` view it feeds the response directly,
    with no producer of its own; iterated, it yields
    :class:`~flask_eventstream.Event` objects. It must be closed.

    :param broker: the broker to attach to.
    :param channels: the channel names.
    :param last_event_id: replay events after this id first.
    :param queue_size: how far the client may fall behind before it is
        disconnected.
    :param on_close: called once when the subscription is closed.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        broker: Broker,
        channels: cabc.Sequence[str],
        last_event_id: str | None,
        queue_size: int,
        on_close: cabc.Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.channels = tuple(channels)
        self.last_event_id = last_event_id
        #: True if the client fell ``queue_size`` events behind.
        self.overflowed = False
        # Live events up to this order were seen by the client already.
        self._skip: tuple[int, int] | None = None
        self._queue_size = queue_size
        self._on_close = on_close
        self._backlog: list[Message] = []
        self._mailbox: Mailbox[Message] | None = None
        self._closed = False

    def start(self, backend: Backend) -> None:
        if self._mailbox is not None or self._closed:
            return
        self._mailbox = Mailbox(backend, self._queue_size)
        self._backlog = self.broker.attach(self)
        self._backlog.reverse()

    def deliver(self, message: Message) -> bool:
        """Queue ``message``; False, and the stream ends, if it is full.

        Called by the broker; never blocks.
        """
        assert self._mailbox is not None
        if self._skip is not None:
            if message.order <= self._skip:
                return True
            self._skip = None
        if self._mailbox.offer(message):
            return True
        # Waiting would let one slow client hold up every publisher; the
        # client reconnects and catches up from history instead.
        self.overflowed = True
        self._mailbox.close()
        return False

    def skip_through(self, order: tuple[int, int]) -> None:
        """Drop live events up to ``order``: the client has them already.

        For a broker whose live feed can lag behind ids that clients hold,
        such as a worker whose reader has not reached an id that another
        worker delivered.
        """
        self._skip = order

    def take(self, timeout: float | None) -> list[bytes]:
        assert self._mailbox is not None
        if self._backlog:
            batch = self._backlog[-BACKLOG_BATCH:]
            del self._backlog[-BACKLOG_BATCH:]
            return [m.data for m in reversed(batch)]
        # Waited for first: a comprehension around the call would hold its
        # function object alive through the wait.
        messages = self._mailbox.take(timeout)
        return [m.data for m in messages]

    @property
    def drained(self) -> bool:
        return not self._backlog and (self._mailbox is None or self._mailbox.drained)

    def interrupt(self) -> None:
        if self._mailbox is not None:
            self._mailbox.close()

    def close(self) -> None:
        """Unsubscribe, end the stream and free the connection slot."""
        if self._closed:
            return
        self._closed = True
        self.interrupt()
        if self._mailbox is not None:
            self.broker.detach(self)
        if self._on_close is not None:
            self._on_close()

    def __iter__(self) -> cabc.Iterator[Event]:
        self.start(current_backend())
        if self._mailbox is None:
            return
        try:
            while self._backlog:
                yield self._backlog.pop().event
            while not self._mailbox.drained:
                for message in self._mailbox.take(None):
                    yield message.event
        finally:
            self.close()


class Broker(abc.ABC):
    """Stores events and fans them out to this process's subscriptions.

    Subclasses store and order events; this class keeps the subscriptions
    and hands each message to those of its channel.

    .. versionadded:: 0.1
    """

    #: True when other processes see the events, so that publishing from
    #: one process reaches the subscribers of all.
    shared: t.ClassVar[bool] = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, set[Subscription]] = {}
        self._count = 0

    @abc.abstractmethod
    def publish(self, channel: str, event: Event) -> str:
        """Store ``event`` on ``channel``, deliver it, return its id.

        :param channel: a valid channel name.
        :param event: the event; its ``id`` is assigned unless set.
        :raises BrokerError: if the broker cannot be reached.
        """

    @abc.abstractmethod
    def attach(self, subscription: Subscription) -> list[Message]:
        """Register ``subscription``; return what it must replay first.

        Replay and registration happen as one step, so nothing published
        meanwhile is missed or sent twice.
        """

    def subscribe(
        self,
        channels: cabc.Sequence[str],
        last_event_id: str | None = None,
        *,
        queue_size: int = 1000,
        on_close: cabc.Callable[[], None] | None = None,
        backend: Backend | None = None,
    ) -> Subscription:
        """Subscribe to ``channels``, replaying after ``last_event_id``.

        :param channels: valid channel names.
        :param last_event_id: an id this broker issued, or None.
        :param queue_size: how far the subscriber may fall behind.
        :param on_close: called once when the subscription is closed.
        :param backend: where the subscriber waits; by default the one that
            fits the running server.
        """
        sub = Subscription(self, channels, last_event_id, queue_size, on_close)
        sub.start(backend or current_backend())
        return sub

    def detach(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription``."""
        with self._lock:
            self._remove(subscription)

    def stats(self) -> dict[str, t.Any]:
        """Open subscriptions in this process, in all and per channel."""
        with self._lock:
            channels = {name: len(subs) for name, subs in self._subscribers.items()}
            return {"subscriptions": self._count, "channels": channels}

    def close(self) -> None:
        """End every subscription and release what the broker holds."""
        with self._lock:
            subs = {sub for subs in self._subscribers.values() for sub in subs}
        for sub in subs:
            sub.interrupt()

    def _add(self, subscription: Subscription) -> None:
        # Callers hold the lock.
        self._count += 1
        for channel in subscription.channels:
            self._subscribers.setdefault(channel, set()).add(subscription)

    def _remove(self, subscription: Subscription) -> None:
        # Callers hold the lock.
        found = False
        for channel in subscription.channels:
            subs = self._subscribers.get(channel)
            if subs is not None and subscription in subs:
                found = True
                subs.discard(subscription)
                if not subs:
                    del self._subscribers[channel]
        self._count -= found

    def _fan_out(self, channel: str, message: Message) -> None:
        # Callers hold the lock, so deliveries keep the order of ids.
        subs = self._subscribers.get(channel)
        if not subs:
            return
        full = [sub for sub in subs if not sub.deliver(message)]
        for sub in full:
            self._remove(sub)
