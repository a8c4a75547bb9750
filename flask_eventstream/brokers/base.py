"""What every broker shares: ids, messages and the broker interface.

A broker composes :attr:`Broker.fanout`, the registry of this process's
subscriptions, with a store that keeps history and orders events: in
memory, or in Redis with a reader of its own. An event is encoded once, as
a :class:`Message`; every subscriber's queue holds the same bytes.
"""

from __future__ import annotations

import abc
import heapq
import re
import time
import typing as t

from .. import metrics
from ..concurrency import current_backend
from ..event import Event
from .fanout import FanOut
from .fanout import Subscription

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from ..concurrency import Backend

#: The event type that tells a client it missed events it cannot get back.
RESET_EVENT = "eventstream.reset"
#: How long a channel's history is kept after its last event, by default.
DEFAULT_HISTORY_TTL_SECONDS = 86400.0

# ASCII digits only: other Unicode digits are not a broker's id, and Redis
# would refuse them.
_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_CHANNEL = re.compile(r"[A-Za-z0-9._:-]{1,200}")


class BrokerError(Exception):
    """The broker cannot be reached, so an event could not be published.

    .. versionadded:: 0.1
    """


def parse_id(value: str) -> tuple[int, int]:
    """Return the order of an id in the broker's form, ``<milliseconds>-<seq>``.

    :raises ValueError: if ``value`` is not such an id.
    """
    match = _ID.fullmatch(value)
    # Each part is an unsigned 64-bit number, as in Redis.
    if match is None or max(int(match[1]), int(match[2])) >= 2**64:
        raise ValueError(
            "Event ids look like '1700000000000-0' (milliseconds, a dash and a"
            f" sequence number); got {value[:60]!r}."
        )
    return int(match[1]), int(match[2])


def check_given_id(value: str) -> str:
    """Return an id an app gave an event if it is one: 1-200 characters
    (the event itself refuses CR, LF and NUL), else raise ValueError."""
    if not 1 <= len(value) <= 200:
        raise ValueError(
            "An event id is 1-200 characters without a line break or NUL"
            f" (got {len(value)} characters); leave 'id' out to have one assigned."
        )
    return value


def check_channel(name: object) -> str:
    """Return ``name`` if it is a valid channel name, else raise ValueError."""
    if not isinstance(name, str) or _CHANNEL.fullmatch(name) is None:
        raise ValueError(
            "Channel names are 1-200 characters of A-Z a-z 0-9 . _ : -"
            f" (got {str(name)[:60]!r})."
        )
    return name


class Message:
    """An event as it is fanned out: the event, its wire bytes, its order."""

    # A plain class rather than a frozen dataclass: one is made per event
    # published and per event replayed, and its constructor costs a third
    # of a frozen dataclass's, which sets each field through object.
    __slots__ = ("_event", "data", "order")

    def __init__(self, event: Event, data: bytes, order: tuple[int, int]) -> None:
        self._event = event
        self.data = data
        self.order = order

    @property
    def event(self) -> Event:
        """The event, as published."""
        return self._event

    @classmethod
    def of(cls, event: Event, order: tuple[int, int] = (0, 0)) -> Message:
        return cls(event, event.encode(), order)


def replay(
    last_id: str, runs: cabc.Iterable[list[Message]], lost: bool
) -> list[Message]:
    """Merge the channels' ``runs`` in id order, after a reset if ``lost``.

    The reset names the id and carries it as data, because browsers never
    dispatch an event without data.
    """
    backlog = list(heapq.merge(*runs, key=lambda m: m.order))
    metrics.hooks.replayed(lost)
    if lost:
        backlog.insert(0, Message.of(Event(last_id, event=RESET_EVENT)))
    return backlog


def expired(after: tuple[int, int], ttl: float) -> bool:
    """Whether history after ``after`` may have been dropped for its age.

    A channel without history had no event for ``ttl`` seconds: an id
    younger than that proves nothing was missed, an older one cannot.
    """
    return after[0] < (time.time() - ttl) * 1000


class Broker(abc.ABC):
    """Stores events and fans them out to this process's subscriptions.

    .. versionadded:: 0.1
    """

    #: True when other processes see the events, so that publishing from
    #: one process reaches the subscribers of all.
    shared: t.ClassVar[bool] = False

    def __init__(self) -> None:
        self.fanout = FanOut()

    @abc.abstractmethod
    def publish(self, channel: str, event: Event) -> str:
        """Store ``event`` on ``channel``, deliver it, return its id.

        :raises BrokerError: if the broker cannot be reached.
        """

    @abc.abstractmethod
    def disconnect(self, channels: cabc.Sequence[str]) -> None:
        """End the streams of ``channels`` in every process of the broker.

        :raises BrokerError: if the broker cannot be reached.
        """

    @abc.abstractmethod
    def attach(self, subscription: Subscription) -> list[Message]:
        """Register ``subscription``; return what it must replay first, up
        to where its live events start."""

    def subscribe(
        self,
        channels: cabc.Sequence[str],
        last_event_id: str | None = None,
        *,
        queue_size: int = 1000,
        on_close: cabc.Callable[[], None] | None = None,
        backend: Backend | None = None,
        wait_for_broker: bool = False,
    ) -> Subscription:
        """Subscribe to ``channels``: events are queued from now on.

        :param last_event_id: replay after this id; one the broker cannot
            resume from gets an ``eventstream.reset`` event first.
        :param queue_size: how far the subscriber may fall behind.
        :param on_close: called once when the subscription is closed.
        :param backend: where the subscriber waits; by default the one that
            fits the running server.
        :param wait_for_broker: if the broker cannot be reached, return a
            subscription that attaches (and replays) once it can, rather
            than raise :exc:`BrokerError`.
        """
        sub = Subscription(
            self, channels, last_event_id, queue_size, on_close, wait_for_broker
        )
        sub.start(backend or current_backend())
        return sub

    def detach(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription``."""
        with self.fanout.lock:
            self.fanout.remove(subscription)

    def stats(self) -> dict[str, t.Any]:
        """Open subscriptions in this process, in all and per channel."""
        with self.fanout.lock:
            return self.fanout.stats()

    def close(self) -> None:
        """End every stream (clients reconnect and replay) and release what
        the broker holds."""
        with self.fanout.lock:
            self.fanout.end_all()
