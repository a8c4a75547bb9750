"""The in-memory broker: ids, history, replay, fan-out, slow subscribers."""

from __future__ import annotations

import gc
import typing as t

import pytest

from flask_eventstream import Event
from flask_eventstream.brokers import broker_from_url
from flask_eventstream.brokers import MemoryBroker
from flask_eventstream.brokers.base import Message
from flask_eventstream.brokers.base import parse_id
from flask_eventstream.brokers.fanout import Subscription
from flask_eventstream.concurrency import THREADS
from flask_eventstream.parser import parse

if t.TYPE_CHECKING:
    import collections.abc as cabc


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("flask_eventstream.brokers.memory.time.time", clock)
    return clock


def started(
    broker: MemoryBroker, *channels: str, last: str | None = None
) -> Subscription:
    return broker.subscribe(channels, last, queue_size=10, backend=THREADS)


def received(sub: Subscription) -> list[Event]:
    """Everything queued for ``sub`` now, parsed back from its bytes."""
    return list(parse(b"".join(sub.take(0))))


def test_ids_are_time_based_and_increase_within_one_millisecond(clock: Clock) -> None:
    """Ids are ``<ms>-<seq>``; the sequence orders events of one millisecond."""
    broker = MemoryBroker()
    ids = [broker.publish("a", Event("x")) for _ in range(3)]
    assert ids == ["1700000000000-0", "1700000000000-1", "1700000000000-2"]
    clock.now += 0.01
    assert broker.publish("a", Event("x")) == "1700000000010-0"


def test_ids_keep_increasing_across_a_restart(clock: Clock) -> None:
    """A new broker's ids come after an old one's, so no id is reused."""
    old = MemoryBroker().publish("a", Event("x"))
    clock.now += 1
    new = MemoryBroker().publish("a", Event("x"))
    assert parse_id(new) > parse_id(old)


def test_ids_do_not_go_back_when_the_clock_does(clock: Clock) -> None:
    """A clock stepped back does not reorder ids."""
    broker = MemoryBroker()
    first = broker.publish("a", Event("x"))
    clock.now -= 10
    assert parse_id(broker.publish("a", Event("x"))) > parse_id(first)


def test_history_is_bounded_per_channel() -> None:
    """Each channel keeps its last ``history`` events."""
    broker = MemoryBroker(history=5)
    ids = [broker.publish("a", Event(str(n))) for n in range(8)]
    broker.publish("b", Event("b"))
    sub = started(broker, "a", last=ids[3])
    assert [e.data for e in received(sub)] == ["4", "5", "6", "7"]


@pytest.mark.parametrize("kind", ["text", "json"])
def test_history_moves_nothing_into_the_oldest_generation(kind: str) -> None:
    """A thousand events in history leave nothing for the garbage collector
    to promote to its oldest generation: a busy channel would otherwise
    bring on collections of that generation, which pause every stream."""
    broker = MemoryBroker(history=1000)
    broker.publish("a", Event("first"))
    gc.collect()
    gc.disable()
    try:
        before = len(gc.get_objects(generation=2))
        for n in range(1000):
            data = f"event {n}" if kind == "text" else {"author": "ann", "n": n}
            broker.publish("a", Event(data, event="chat"))
        # What survives a collection of each young generation is promoted.
        gc.collect(0)
        gc.collect(1)
        promoted = len(gc.get_objects(generation=2)) - before
    finally:
        gc.enable()
    assert promoted < 50


def test_replay_gives_back_every_field_of_the_event() -> None:
    """A replayed event equals the one published, with its id."""
    broker = MemoryBroker()
    first = broker.publish("a", Event("x"))
    data = {"text": "hi", "tags": ["a"]}
    given = Event(data, event="chat", id="m-1", retry=500, comment="c")
    broker.publish("a", given)
    plain = Event("plain")
    plain_id = broker.publish("a", plain)
    sub = broker.subscribe(["a"], first)
    events = iter(sub)
    assert [next(events), next(events)] == [given, Event("plain", id=plain_id)]
    sub.interrupt()
    assert list(events) == []


def test_given_ids_are_forgotten_with_their_events() -> None:
    """History holds the ids an app gave only for the events it still
    holds, so a channel whose every event has an id of its own stays
    bounded."""
    broker = MemoryBroker(history=5)
    for n in range(20):
        broker.publish("a", Event(str(n), id=f"k{n}"))
    given = broker.store._channels["a"].given
    assert sorted(given) == [f"k{n}" for n in range(15, 20)]


def test_replay_merges_channels_in_id_order() -> None:
    """Replay over several channels is one sequence, ordered by id."""
    broker = MemoryBroker()
    first = broker.publish("a", Event("a0"))
    for n in range(1, 5):
        broker.publish("a" if n % 2 else "b", Event(f"{n}"))
        broker.publish("c", Event("other"))
    sub = started(broker, "a", "b", last=first)
    assert [e.data for e in received(sub)] == ["1", "2", "3", "4"]


def test_expired_id_starts_with_a_reset_naming_it() -> None:
    """An id that history no longer covers gives eventstream.reset first."""
    broker = MemoryBroker(history=2)
    ids = [broker.publish("a", Event(str(n))) for n in range(5)]
    events = received(started(broker, "a", last=ids[0]))
    assert (events[0].event, events[0].data) == ("eventstream.reset", ids[0])
    assert [e.data for e in events[1:]] == ["3", "4"]


def test_expired_id_on_a_quiet_channel_is_not_a_reset() -> None:
    """Eviction on one channel does not reset subscribers of another."""
    broker = MemoryBroker(history=2)
    last = broker.publish("quiet", Event("q"))
    for n in range(5):
        broker.publish("busy", Event(str(n)))
    assert received(started(broker, "quiet", last=last)) == []


@pytest.mark.parametrize("when", ["before start", "in the future"])
def test_unknown_id_starts_with_a_reset(clock: Clock, when: str) -> None:
    """An id this broker never issued (say, from before a restart) resets."""
    broker = MemoryBroker()
    broker.publish("a", Event("x"))
    unknown = "1600000000000-0" if when == "before start" else "1900000000000-0"
    (reset, *replayed) = received(started(broker, "a", last=unknown))
    assert (reset.event, reset.data) == ("eventstream.reset", unknown)
    # Whatever history holds after the id still follows.
    assert [e.data for e in replayed] == (["x"] if when == "before start" else [])


def test_fan_out_encodes_once_and_shares_the_bytes(encodings: list[Event]) -> None:
    """100 subscribers cost one encoding; each queue holds the same bytes."""
    broker = MemoryBroker()
    subs = [started(broker, "a") for _ in range(100)]
    broker.publish("a", Event("hello"))
    assert len(encodings) == 1
    chunks = [sub.take(0) for sub in subs]
    assert all(c[0] is chunks[0][0] for c in chunks)


def test_slow_subscriber_is_dropped_without_blocking_publish() -> None:
    """A full queue ends that subscription; others and publish go on."""
    broker = MemoryBroker()
    slow = broker.subscribe(["a"], queue_size=3, backend=THREADS)
    fast = broker.subscribe(["a"], queue_size=100, backend=THREADS)
    for n in range(10):
        broker.publish("a", Event(str(n)))
    assert slow.overflowed and not fast.overflowed
    assert broker.stats() == {"subscriptions": 1, "channels": {"a": 1}}
    # What was queued is still sent, then the stream ends.
    assert [e.data for e in received(slow)] == ["0", "1", "2"]
    assert slow.drained
    assert len(received(fast)) == 10


def test_closing_a_subscription_detaches_it_once() -> None:
    """Close releases the subscription and calls on_close exactly once."""
    broker = MemoryBroker()
    closed: list[int] = []
    sub = broker.subscribe(["a", "b"], on_close=lambda: closed.append(1))
    assert broker.stats()["subscriptions"] == 1
    sub.close()
    sub.close()
    assert broker.stats() == {"subscriptions": 0, "channels": {}}
    assert closed == [1]


def test_subscription_queues_from_the_moment_it_is_made() -> None:
    """Events published right after subscribe are kept for the stream."""
    broker = MemoryBroker()
    sub = broker.subscribe(["a"])
    broker.publish("a", Event("early"))
    assert [e.data for e in received(sub)] == ["early"]
    sub.close()
    assert broker.stats()["subscriptions"] == 0


def test_iterating_a_subscription_yields_events() -> None:
    """Iterated directly, a subscription gives Event objects."""
    broker = MemoryBroker()
    first = broker.publish("a", Event("old"))
    broker.publish("a", Event("replayed"))
    sub = broker.subscribe(["a"], first)
    events: cabc.Iterator[Event] = iter(sub)
    assert next(events).data == "replayed"
    broker.publish("a", Event("live"))
    assert next(events).data == "live"
    sub.interrupt()
    assert list(events) == []
    assert broker.stats()["subscriptions"] == 0


def test_broker_close_ends_every_subscription() -> None:
    """Closing the broker drains all its streams."""
    broker = MemoryBroker()
    subs = [started(broker, "a") for _ in range(3)]
    broker.close()
    assert all(sub.drained for sub in subs)


def test_broker_url_selects_the_broker() -> None:
    """memory:// is the in-memory broker; an unknown scheme is refused."""
    assert isinstance(broker_from_url("memory://", history=5), MemoryBroker)
    with pytest.raises(ValueError, match="EVENTSTREAM_BROKER_URL"):
        broker_from_url("kafka://x", history=5)


def test_message_of_encodes_the_event() -> None:
    """A message carries the event's wire bytes."""
    message = Message.of(Event("x", id="1-0"), (1, 0))
    assert message.data == b"id: 1-0\ndata: x\n\n"
