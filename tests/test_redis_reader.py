"""The worker's Redis reader: its own connection, and one step per hand-over."""

from __future__ import annotations

import threading
import time
import typing as t
import uuid

import pytest

from flask_eventstream import Event
from flask_eventstream.brokers.redis import RedisBroker
from flask_eventstream.concurrency import THREADS
from flask_eventstream.parser import parse

from .redis_server import redis_server

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask_eventstream.brokers.fanout import Subscription

    from .redis_server import RedisServer


@pytest.fixture(scope="module")
def server() -> cabc.Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
def brokers(server: RedisServer) -> cabc.Iterator[tuple[RedisBroker, RedisBroker]]:
    """Two workers of one app: the one under test, and another publisher."""
    prefix = f"t{uuid.uuid4().hex}"
    pair = (
        RedisBroker(server.url, prefix=prefix),
        RedisBroker(server.url, prefix=prefix),
    )
    yield pair
    for broker in pair:
        broker.close()


def subscribed(broker: RedisBroker, last: str | None = None) -> Subscription:
    return broker.subscribe(["a"], last, backend=THREADS)


def test_live_events_do_not_wait_for_the_commands_connection(
    brokers: tuple[RedisBroker, RedisBroker],
) -> None:
    """A held commands connection (a long replay, a slow publish) delays no
    live event: the reader never uses it."""
    worker, other = brokers
    sub = subscribed(worker)
    other.publish("a", Event("warm"))
    assert b"warm" in b"".join(sub.take(5))
    # Something else of this worker holds its one commands connection for
    # longer than the reader's worker key is refreshed (every 5 s).
    pool = worker.store.commands().connection_pool
    held = pool.get_connection()
    lags = []
    try:
        for n in range(14):
            sent_at = time.monotonic()
            other.publish("a", Event(str(n)))
            chunks = sub.take(5)
            lags.append(time.monotonic() - sent_at)
            assert [e.data for e in parse(b"".join(chunks))] == [str(n)]
            time.sleep(0.5)
    finally:
        pool.release(held)
    # Each event is awaited for 5 s: waiting on the held connection took up
    # to 10 s (the pool's timeout). The lags are for the record, not asserted.
    print(f"delivery lag with the commands connection held: max {max(lags):.3f} s")


def test_a_subscriber_attached_while_the_reader_is_overtaken_misses_nothing(
    brokers: tuple[RedisBroker, RedisBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending the streams and moving the reader's position are one step: a
    client that resumes meanwhile replays every event up to the new position."""
    worker, other = brokers
    first = subscribed(worker)
    e0 = other.publish("a", Event("e0"))
    assert b"e0" in b"".join(first.take(5))
    # Trimming passes the reader once; another client resumes from e0 while
    # the reader handles it.
    overtaken = iter([True])
    monkeypatch.setattr(
        worker.store, "overtaken", lambda connection, at: next(overtaken, False)
    )
    resumed: list[Subscription] = []
    attaching: list[threading.Thread] = []
    stepped = threading.Event()
    end_all = worker.fanout.end_all

    def end_all_then_resume() -> None:
        end_all()
        attach = threading.Thread(target=lambda: resumed.append(subscribed(worker, e0)))
        attaching.append(attach)
        attach.start()
        # The step is still in progress: the attach waits for its end.
        attach.join(0.5)
        assert attach.is_alive()
        stepped.set()

    monkeypatch.setattr(worker.fanout, "end_all", end_all_then_resume)
    e1 = other.publish("a", Event("e1"))
    assert stepped.wait(10), "the reader was not overtaken"
    attaching[0].join(10)
    assert first.drained
    (sub,) = resumed
    e2 = other.publish("a", Event("e2"))
    got = list(parse(b"".join(sub.take(5) + sub.take(5))))
    assert [(e.id, e.data) for e in got] == [(e1, "e1"), (e2, "e2")]
    sub.close()
