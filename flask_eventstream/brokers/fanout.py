"""The fan-out registry: this process's subscriptions, per channel."""

from __future__ import annotations

import collections
import logging
import os
import time
import typing as t

from .. import metrics
from ..concurrency import current_backend
from ..concurrency import GeventBackend
from ..concurrency import Mailbox
from ..concurrency import on_cut_short
from ..concurrency import os_lock
from ..concurrency import StreamSource
from ..socket_writer import Frames

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from ..concurrency import Backend
    from ..event import Event
    from ..socket_writer import SocketWriter
    from .base import Broker
    from .base import Message

logger = logging.getLogger(__name__)

#: How many replayed events go out in one write.
BACKLOG_BATCH = 256
#: How often a subscription that waits for its broker tries again.
ATTACH_RETRY_SECONDS = 1.0
#: How many subscriptions a flush serves before it lets the loop run.
FLUSH_SLICE = 100


class Subscription(StreamSource):
    """One client's subscription, from :meth:`Broker.subscribe`: returned
    from a ``@stream_events`` view it feeds the response directly; iterated,
    it yields :class:`~flask_eventstream.Event` objects. Its owner closes it.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        broker: Broker,
        channels: cabc.Sequence[str],
        last_event_id: str | None,
        queue_size: int,
        on_close: cabc.Callable[[], None] | None = None,
        wait_for_broker: bool = False,
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
        #: True while the broker cannot be reached and the subscription,
        #: instead of failing, tries again to attach each time it is read.
        self.waiting_for_broker = wait_for_broker
        self._waited = False

    def start(self, backend: Backend) -> None:
        if self._mailbox is not None or self._closed:
            return
        self._mailbox = Mailbox(backend, self._queue_size)
        self._attach()

    def _attach(self) -> bool:
        # Imported here: the base module imports this one.
        from .base import BrokerError

        assert self._mailbox is not None
        try:
            self._backlog = self.broker.attach(self)
        except BrokerError as e:
            if not self.waiting_for_broker:
                raise
            if not self._waited:
                self._waited = True
                logger.info("A new stream waits for the broker: %s", e)
            # Live events taken before the replay failed come again, in
            # order, with the replay of the next attempt.
            self._mailbox.take(0)
            self._skip = None
            return False
        self.waiting_for_broker = False
        self._backlog.reverse()
        return True

    def _wait_for_broker(self, timeout: float | None) -> None:
        # Paced by the mailbox, so that closing the stream wakes it.
        assert self._mailbox is not None
        if not self._attach():
            pause = ATTACH_RETRY_SECONDS
            self._mailbox.take(pause if timeout is None else min(timeout, pause))

    def deliver(self, messages: list[Message], frames: Frames) -> int:
        """Queue ``messages``, whose bytes ``frames`` holds, never blocking;
        return how many it took (those it skips included). If that is not
        all of them, the subscription has ended."""
        assert self._mailbox is not None
        skip, skipped = self._skip, 0
        if skip is not None and messages[0].order <= skip:
            live = [m for m in messages if m.order > skip]
            skipped = len(messages) - len(live)
            if not live:
                return skipped
            messages, frames = live, Frames.join([m.data for m in live], frames.at)
        taken = self._mailbox.offer(messages, frames)
        if taken < len(messages) and not self._mailbox.closed:
            # Waiting would let one slow client hold up every publisher; the
            # client reconnects and catches up from history instead.
            self.overflowed = True
            self.ended_by = "slow_consumer"
            self._mailbox.close()
        return skipped + taken

    def skip_through(self, order: tuple[int, int]) -> None:
        """Drop live events up to ``order``: the replay has them, or they
        came before the subscription. Some may be queued already."""
        self._skip = order

    def _live(self, timeout: float | None) -> list[Message]:
        assert self._mailbox is not None
        messages = self._mailbox.take(timeout, idle=True)
        if self._skip is not None and messages:
            skip = self._skip
            messages = [m for m in messages if m.order > skip]
            if messages:
                # Queued in order: nothing after this is to be skipped.
                self._skip = None
        return messages

    def take(self, timeout: float | None) -> list[bytes]:
        assert self._mailbox is not None
        if self.waiting_for_broker:
            self._wait_for_broker(timeout)
            return []
        if self._backlog:
            batch = self._backlog[-BACKLOG_BATCH:]
            del self._backlog[-BACKLOG_BATCH:]
            return [m.data for m in reversed(batch)]
        # Waited for first: a comprehension around the call would hold its
        # function object alive through the wait.
        messages = self._live(timeout)
        return [m.data for m in messages]

    @property
    def drained(self) -> bool:
        return not self._backlog and (self._mailbox is None or self._mailbox.drained)

    def write_through(self, writer: SocketWriter) -> bool:
        if self._mailbox is None:
            return False
        self._mailbox.write_through(writer)
        return True

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
            while self.waiting_for_broker and not self._mailbox.closed:
                self._wait_for_broker(None)
            while self._backlog:
                yield self._backlog.pop().event
            while not self._mailbox.drained:
                for message in self._live(None):
                    yield message.event
            on_cut_short.get()()
        finally:
            self.close()


class FanOut:
    """Which subscriptions of this process listen on which channel, and the
    delivery of events to them.

    Under threads an event is delivered as it is published. Under gevent,
    events are delivered by a flush once the publisher lets the loop run:
    the flush serves each subscription with every event due to it in one
    write, and lets the loop run between slices of subscriptions, so that
    publishers go on meanwhile. What they publish is added to what the
    subscriptions not served yet are due, and the subscriptions served
    already are served again at the end of the flush. So an event waits
    for at most one pass over the subscribers, and the more is published,
    the more each write carries.

    Every method expects :attr:`lock` to be held, so that a broker makes a
    step of its store and one of the fan-out a single step.
    """

    def __init__(self) -> None:
        #: Held around every use; an OS lock (see ``concurrency.os_lock``).
        self.lock = os_lock()
        self._channels: dict[str, set[Subscription]] = {}
        self._count = 0
        # Channels that gained their first subscription or lost their last
        # since a reader last asked, so that it follows interest in steps
        # as small as the change, however many channels there are.
        self._changed: set[str] = set()
        #: Counts every change of subscriptions, to tell when stats change.
        self.version = 0
        # Published and not yet handed to a flush, in order.
        self._published: list[tuple[str, Message]] = []
        # The subscriptions the flush has yet to serve, served from the
        # right; those that get events once served come in on the left.
        self._due: collections.deque[Subscription] = collections.deque()
        # What each of them is due: subscriptions to one channel planned
        # together share a batch.
        self._batches: dict[Subscription, _Batch] = {}
        # The process whose flush runs, if one does: a forked worker starts
        # with none, whatever its parent was doing.
        self._flushing_in: int | None = None

    def __len__(self) -> int:
        return self._count

    def channels(self) -> set[str]:
        """The channels with a subscription in this process."""
        return set(self._channels)

    def has(self, channel: str) -> bool:
        """Whether ``channel`` has a subscription in this process."""
        return channel in self._channels

    def take_changed(self) -> set[str]:
        """The channels whose interest changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def add(self, subscription: Subscription) -> None:
        self._count += 1
        self.version += 1
        metrics.hooks.subscriptions_changed(1)
        for channel in subscription.channels:
            if channel not in self._channels:
                self._changed.add(channel)
            self._channels.setdefault(channel, set()).add(subscription)

    def remove(self, subscription: Subscription) -> None:
        found = False
        for channel in subscription.channels:
            subs = self._channels.get(channel)
            if subs is not None and subscription in subs:
                found = True
                subs.discard(subscription)
                if not subs:
                    del self._channels[channel]
                    self._changed.add(channel)
        self._count -= found
        self.version += found
        metrics.hooks.subscriptions_changed(-found)

    def deliver(self, channel: str, message: Message) -> None:
        """Hand ``message`` to every subscription of ``channel``: at once
        under threads; under gevent, with the flush that runs (it joins
        at the flush's next pause) or else with one started for it."""
        if channel not in self._channels:
            return
        self._published.append((channel, message))
        backend = current_backend()
        if not isinstance(backend, GeventBackend):
            self.finish()
        elif self._flushing_in != os.getpid():
            self._flushing_in = os.getpid()
            backend.call_soon(self._start_flush)

    def finish(self) -> None:
        """Hand everything published so far to the subscriptions, now."""
        self._plan()
        self._serve(len(self._due))

    def _start_flush(self) -> None:
        # In the hub's thread, which the publisher may not be in.
        current_backend().spawn(self._flush, "eventstream-flush")

    def _flush(self) -> None:
        backend = t.cast("GeventBackend", current_backend())
        try:
            while True:
                with self.lock:
                    # Published during the last slice: what the flush has
                    # not reached yet gets it in this flush.
                    self._plan()
                    if not self._due:
                        self._flushing_in = None
                        return
                    self._serve(FLUSH_SLICE)
                backend.let_others_run()
        except BaseException as e:
            # The next publish starts a flush again, for what is still due.
            with self.lock:
                self._flushing_in = None
            if not isinstance(e, Exception):
                raise
            logger.exception("Delivering events failed; the next publish goes on.")

    def _plan(self) -> None:
        # A subscription still due gets the new events after those it was
        # due, in the same write; one served already gets them later in
        # this flush. The events of one channel are added once for all its
        # subscriptions; a subscription to several channels has its own.
        if not self._published:
            return
        published, self._published = self._published, []
        by_channel: dict[str, list[Message]] = {}
        for channel, message in published:
            by_channel.setdefault(channel, []).append(message)
        batches, due = self._batches, self._due
        mixed: set[Subscription] = set()
        for channel, messages in by_channel.items():
            fresh: _Batch | None = None
            extended: set[_Batch] = set()
            for sub in self._channels.get(channel, ()):
                if len(sub.channels) > 1:
                    mixed.add(sub)
                    continue
                batch = batches.get(sub)
                if batch is None:
                    if fresh is None:
                        fresh = _Batch(messages)
                    batches[sub] = fresh
                    due.appendleft(sub)
                elif batch not in extended:
                    extended.add(batch)
                    batch.extend(messages)
        for sub in mixed:
            mine = [m for c, m in published if c in sub.channels]
            batch = batches.get(sub)
            if batch is None:
                batches[sub] = _Batch(mine)
                due.appendleft(sub)
            else:
                batch.extend(mine)

    def _serve(self, count: int) -> None:
        due, batches = self._due, self._batches
        if not due:
            return
        delivered = 0
        ended = []
        for _ in range(min(count, len(due))):
            sub = due.pop()
            batch = batches.pop(sub)
            taken = sub.deliver(batch.messages, batch.frames())
            delivered += taken
            if taken < len(batch.messages):
                ended.append(sub)
        metrics.hooks.delivered(delivered)
        for sub in ended:
            self.remove(sub)

    def end_channels(self, channels: cabc.Iterable[str]) -> None:
        """Interrupt and forget the subscriptions of ``channels``, once
        they have what was published before."""
        self.finish()
        for channel in channels:
            for sub in list(self._channels.get(channel, ())):
                self.remove(sub)
                sub.interrupt()

    def end_all(self) -> None:
        """Interrupt and forget every subscription, once they have what
        was published before: their streams end."""
        self.finish()
        subs = {sub for subs in self._channels.values() for sub in subs}
        self._changed.update(self._channels)
        self.version += 1
        self._channels.clear()
        metrics.hooks.subscriptions_changed(-self._count)
        self._count = 0
        for sub in subs:
            sub.interrupt()

    def stats(self) -> dict[str, t.Any]:
        channels = {name: len(subs) for name, subs in self._channels.items()}
        return {"subscriptions": self._count, "channels": channels}


class _Batch:
    """Events due to one or more subscriptions, and their bytes once joined."""

    __slots__ = ("_frames", "messages")

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self._frames: Frames | None = None

    def extend(self, messages: list[Message]) -> None:
        # A new list: a subscription served already may hold the old one.
        self.messages = self.messages + messages
        self._frames = None

    def frames(self) -> Frames:
        if self._frames is None:
            data = [m.data for m in self.messages]
            self._frames = Frames.join(data, time.monotonic())
        return self._frames
