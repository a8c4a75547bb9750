"""The Redis broker against a real redis-server, in process."""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import typing as t
import uuid

import pytest
import redis
from flask import Flask

from flask_eventstream import BrokerError
from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream.brokers.base import parse_id
from flask_eventstream.brokers.base import RESET_EVENT
from flask_eventstream.brokers.redis import RedisBroker
from flask_eventstream.concurrency import THREADS
from flask_eventstream.parser import parse
from flask_eventstream.settings import EventStreamState
from flask_eventstream.testing import read_events

from . import scenarios
from .redis_server import redis_server
from .redis_server import RedisServer
from .servers import free_port
from .servers import wait_for

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.testing import FlaskClient
    from werkzeug.test import TestResponse
    from werkzeug.wrappers import Response

    from flask_eventstream.brokers.fanout import Subscription

    MakeBroker = cabc.Callable[..., RedisBroker]


@pytest.fixture
def own_server() -> cabc.Iterator[RedisServer]:
    """A redis-server of the test's own, for counting or killing it."""
    with redis_server() as server:
        yield server


@pytest.fixture
def new_broker(server: RedisServer, prefix: str) -> cabc.Iterator[MakeBroker]:
    """Make brokers (by default on the test's keys); close them all after."""
    made: list[RedisBroker] = []

    def make(
        *, url: str | None = None, prefix: str = prefix, history: int = 1000
    ) -> RedisBroker:
        broker = RedisBroker(url or server.url, history=history, prefix=prefix)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def broker(new_broker: MakeBroker) -> RedisBroker:
    return new_broker()


@pytest.fixture
def store(server: RedisServer) -> cabc.Iterator[redis.Redis]:
    """A plain client, to look at what the broker wrote."""
    with redis.Redis.from_url(server.url, decode_responses=True) as client:
        yield client


@pytest.fixture
def redis_app(
    app: Flask, server: RedisServer, prefix: str
) -> cabc.Iterator[tuple[Flask, EventStream]]:
    """An app with a registered EventStream on the test's Redis keys."""
    app.config.update(EVENTSTREAM_BROKER_URL=server.url, EVENTSTREAM_KEY_PREFIX=prefix)
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    yield app, sse
    state(app).broker.close()


def state(app: Flask) -> EventStreamState:
    return t.cast(EventStreamState, app.extensions["eventstream"])


def subscribed(
    broker: RedisBroker,
    *channels: str,
    last: str | None = None,
    queue_size: int = 1000,
) -> Subscription:
    return broker.subscribe(channels, last, queue_size=queue_size, backend=THREADS)


def taken(sub: Subscription, count: int, timeout: float = 5.0) -> list[bytes]:
    """Wait for ``count`` chunks of wire bytes on ``sub``; fail clearly if not.

    Live events pass through the broker's reader thread, so they arrive a
    moment after ``publish`` returns.
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(chunks) < count:
        if sub.drained:
            raise AssertionError(f"The stream ended after {len(chunks)} of {count}.")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"Expected {count} events within {timeout} seconds, got"
                f" {len(chunks)}; the last ones: {chunks[-3:]!r}"
            )
        chunks += sub.take(0.2)
    return chunks


def received(sub: Subscription, count: int, timeout: float = 5.0) -> list[Event]:
    """Wait for ``count`` events on ``sub`` and parse them."""
    return list(parse(b"".join(taken(sub, count, timeout))))


def replayed(sub: Subscription) -> list[Event]:
    """What ``sub`` holds right after subscribing, before any live event."""
    chunks: list[bytes] = []
    while batch := sub.take(0):
        chunks += batch
    return list(parse(b"".join(chunks)))


def stream_lengths(store: redis.Redis, prefix: str) -> dict[str, int]:
    """The length of every Redis stream under ``prefix``."""
    keys = sorted(store.scan_iter(f"{prefix}:*", _type="stream"))
    return {key: store.xlen(key) for key in keys}


def connections(url: str, role: str = "") -> int:
    """This process's broker connections to Redis, by their client names."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        names = [c["name"] for c in client.client_list()]
    pid = str(os.getpid())
    return sum(
        name.startswith(f"eventstream:{role}") and name.split(":")[-1] == pid
        for name in names
    )


def test_ids_come_from_redis_and_order_events_across_channels(
    broker: RedisBroker, store: redis.Redis, prefix: str
) -> None:
    """Ids are Redis's ``<ms>-<seq>``, increasing over all channels."""
    ids = [broker.publish("abc"[n % 3], Event(str(n))) for n in range(30)]
    assert all(re.fullmatch(r"\d+-\d+", i) for i in ids)
    orders = [parse_id(i) for i in ids]
    assert orders == sorted(orders)
    assert len(set(orders)) == len(orders)
    assert abs(orders[0][0] - time.time() * 1000) < 60_000
    # Redis holds each event once, in its channel's stream, under the id
    # that publish returned.
    held = {
        key: [entry_id for entry_id, _ in t.cast("list[t.Any]", store.xrange(key))]
        for key in stream_lengths(store, prefix)
    }
    assert sorted(held.values()) == sorted([ids[::3], ids[1::3], ids[2::3]])


def test_ids_the_app_gave_leave_the_hash_with_their_entries(
    broker: RedisBroker, store: redis.Redis, prefix: str
) -> None:
    """The hash that finds an app's ids holds only those still in history."""
    small = RedisBroker(broker.store.url, history=2, prefix=prefix)
    try:
        for given in ["a0", "a1", "a2"]:
            small.publish("a", Event("x", id=given))
        entries = t.cast("list[t.Any]", store.xrange(f"{prefix}:channel:a"))
        assert store.hgetall(f"{prefix}:ids:a") == {
            fields["i"]: entry_id for entry_id, fields in entries
        }
        assert sorted(store.hkeys(f"{prefix}:ids:a")) == ["a1", "a2"]
        assert 0 < store.pttl(f"{prefix}:ids:a") <= 86400 * 1000
    finally:
        small.close()


def test_publish_on_one_broker_reaches_subscribers_of_another(
    new_broker: MakeBroker,
) -> None:
    """Two workers on one Redis and prefix: one publishes, the other delivers."""
    publisher, worker = new_broker(), new_broker()
    sub = subscribed(worker, "news")
    sent = [publisher.publish("news", Event(f"n{n}", event="note")) for n in range(20)]
    events = received(sub, 20)
    assert [e.id for e in events] == sent
    assert [(e.event, e.data) for e in events] == [("note", f"n{n}") for n in range(20)]


def test_brokers_with_different_prefixes_are_isolated(new_broker: MakeBroker) -> None:
    """Another prefix is another app: neither live events nor replay cross."""
    ours, theirs = new_broker(), new_broker(prefix=f"t{uuid.uuid4().hex}")
    first = ours.publish("news", Event("ours, old"))
    sub = subscribed(theirs, "news")
    ours.publish("news", Event("ours, live"))
    marker = theirs.publish("news", Event("theirs"))
    assert [(e.id, e.data) for e in received(sub, 1)] == [(marker, "theirs")]
    # Their history holds nothing of ours either; our id, older than their
    # first event, is one they cannot resume from.
    reset, *replay = replayed(subscribed(theirs, "news", last=first))
    assert (reset.event, reset.data) == (RESET_EVENT, first)
    assert [(e.id, e.data) for e in replay] == [(marker, "theirs")]


def test_replay_after_an_id_that_history_no_longer_holds_starts_with_a_reset(
    new_broker: MakeBroker,
) -> None:
    """The reset names the id; what history still holds follows, in order."""
    broker = new_broker(history=5)
    ids = [broker.publish("a", Event(str(n))) for n in range(20)]
    reset, *tail = replayed(subscribed(broker, "a", last=ids[1]))
    assert (reset.event, reset.data) == (RESET_EVENT, ids[1])
    # History is trimmed exactly: the last 5, in order.
    assert [(e.id, e.data) for e in tail] == [(ids[n], str(n)) for n in range(15, 20)]


def test_id_just_before_history_replays_without_reset(
    new_broker: MakeBroker,
) -> None:
    """The newest trimmed id is still a place to resume from."""
    broker = new_broker(history=5)
    ids = [broker.publish("a", Event(str(n))) for n in range(20)]
    events = replayed(subscribed(broker, "a", last=ids[14]))
    assert [e.data for e in events] == [str(n) for n in range(15, 20)]


def test_ids_from_before_redis_lost_its_data_reset_even_after_new_events(
    broker: RedisBroker, store: redis.Redis, prefix: str
) -> None:
    """History Redis lost (a flush, a restart without persistence) resets."""
    old = broker.publish("a", Event("before"))
    for key in store.scan_iter(f"{prefix}:*"):
        store.delete(key)
    broker.publish("a", Event("after"))
    reset, *rest = replayed(subscribed(broker, "a", last=old))
    assert (reset.event, reset.data) == (RESET_EVENT, old)
    assert [e.data for e in rest] == ["after"]


def test_refused_id_leaves_no_trace(
    new_broker: MakeBroker, store: redis.Redis, prefix: str
) -> None:
    """A refused id writes nothing, not even the record of trimming."""
    broker = new_broker(history=1)
    broker.publish("a", Event("x"))
    before = {key: store.dump(key) for key in store.scan_iter(f"{prefix}:*")}
    with pytest.raises(ValueError):
        broker.publish("a", Event("y", id="x" * 201))
    after = {key: store.dump(key) for key in store.scan_iter(f"{prefix}:*")}
    assert after == before


@pytest.mark.parametrize("history", [5000, 1], ids=["history-holds-it", "trimmed"])
def test_reader_cut_off_by_redis_catches_up_from_history_or_ends_streams(
    own_server: RedisServer,
    prefix: str,
    history: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis drops a reader that falls behind its output buffer limit; back,
    the reader delivers what it missed from history, in order and once, or,
    if history lost some of it, ends the channel's streams so that their
    clients replay and learn of the gap."""
    worker = RedisBroker(own_server.url, history=history, prefix=prefix)
    other = RedisBroker(own_server.url, history=history, prefix=prefix)
    with redis.Redis.from_url(own_server.url) as admin:
        admin.config_set("client-output-buffer-limit", "pubsub 65536 32768 1")
    try:
        sub = subscribed(worker, "a", queue_size=5000)
        other.publish("a", Event("first"))
        assert [e.data for e in received(sub, 1)] == ["first"]
        # Stall the worker's reader (it waits for the lock to fan out) while
        # another process publishes more than Redis buffers for it.
        # Events big enough to fill the socket's buffers too.
        with worker.fanout.lock:
            sent = [other.publish("a", Event(f"{n:04d}" * 1000)) for n in range(2000)]
        wait_for(lambda: "Lost Redis" in caplog.text, 20, "Redis to drop the reader")
        if history == 1:
            deadline = time.monotonic() + 10
            while not sub.drained:
                assert time.monotonic() < deadline, "the stream did not end"
                sub.take(0.2)
        else:
            assert [e.id for e in received(sub, 2000, timeout=30)] == sent
            late = other.publish("a", Event("live again"))
            assert [e.id for e in received(sub, 1)] == [late]
    finally:
        worker.close()
        other.close()


def test_replay_after_a_recent_id_gives_exactly_the_later_events(
    new_broker: MakeBroker,
) -> None:
    """No reset when history holds everything after the id; live follows."""
    broker = new_broker(history=5)
    ids = [broker.publish("a", Event(str(n))) for n in range(20)]
    sub = subscribed(broker, "a", last=ids[-3])
    assert [(e.event, e.id, e.data) for e in replayed(sub)] == [
        ("message", ids[-2], "18"),
        ("message", ids[-1], "19"),
    ]
    live = broker.publish("a", Event("20"))
    assert [(e.id, e.data) for e in received(sub, 1)] == [(live, "20")]


def test_id_newer_than_any_redis_issued_gives_a_reset(broker: RedisBroker) -> None:
    """An id from the future (another Redis, a wiped one) cannot be resumed."""
    newest = broker.publish("a", Event("x"))
    future = f"{parse_id(newest)[0] + 3_600_000}-0"
    sub = subscribed(broker, "a", last=future)
    assert [(e.event, e.data) for e in replayed(sub)] == [(RESET_EVENT, future)]
    live = broker.publish("a", Event("live"))
    assert [(e.id, e.data) for e in received(sub, 1)] == [(live, "live")]


def test_replay_over_several_channels_merges_in_id_order(
    broker: RedisBroker,
) -> None:
    """Replay of a and b is one sequence by id, without channel c."""
    first = broker.publish("a", Event("a0"))
    expected = []
    for n in range(1, 9):
        channel = "ab"[n % 2]
        expected.append(
            (broker.publish(channel, Event(f"{channel}{n}")), f"{channel}{n}")
        )
        broker.publish("c", Event("other"))
    events = replayed(subscribed(broker, "a", "b", last=first))
    assert [(e.id, e.data) for e in events] == expected


def test_subscribing_during_a_burst_hands_over_without_gap_or_duplicate(
    new_broker: MakeBroker,
) -> None:
    """Replay ends where live delivery starts, even while events pour in."""
    broker = new_broker(history=5000)
    total = 2000
    ids = [broker.publish("burst", Event(f"early {n}")) for n in range(100)]
    data = {i: f"early {n}" for n, i in enumerate(ids)}

    def publisher() -> None:
        for n in range(total):
            new_id = broker.publish("burst", Event(f"burst {n}"))
            data[new_id] = f"burst {n}"
            ids.append(new_id)
            if n % 20 == 0:
                # Pace the burst, so subscriptions land inside it.
                time.sleep(0.001)

    rng = random.Random(5)
    subs: list[tuple[str, Subscription]] = []
    during_burst = 0
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        for threshold in range(150, 100 + total, 200):
            wait_for(lambda: len(ids) >= threshold, 10, "the burst", poll=0.001)  # noqa: B023
            last = ids[rng.randrange(len(ids) - 50, len(ids))]
            subs.append((last, subscribed(broker, "burst", last=last, queue_size=5000)))
            during_burst += len(ids) < 100 + total
    finally:
        thread.join(30)
    assert during_burst >= 5
    end = broker.publish("burst", Event("end"))
    for last, sub in subs:
        expected = [*ids[ids.index(last) + 1 :], end]
        events = received(sub, len(expected), timeout=10)
        assert [e.id for e in events] == expected, f"after {last}"
        assert [e.data for e in events] == [*(data[i] for i in expected[:-1]), "end"]


def test_fan_out_encodes_each_event_once_per_broker(
    broker: RedisBroker, encodings: list[Event]
) -> None:
    """50 subscribers of one broker cost one encoding and share the bytes."""
    subs = [subscribed(broker, "a") for _ in range(50)]
    broker.publish("a", Event("hello"))
    chunks = [taken(sub, 1) for sub in subs]
    assert len(encodings) == 1
    assert all(len(c) == 1 and c[0] is chunks[0][0] for c in chunks)


def test_redis_connections_do_not_grow_with_subscribers(
    own_server: RedisServer, new_broker: MakeBroker
) -> None:
    """One subscriber or 200: two connections, commands and reader."""
    broker = new_broker(url=own_server.url)
    subs = [subscribed(broker, "c1")]
    broker.publish("c1", Event("one"))
    received(subs[0], 1)
    with_one = connections(own_server.url)
    subs += [subscribed(broker, "c1", f"c{n % 10}") for n in range(199)]
    broker.publish("c1", Event("two"))
    for sub in subs:
        assert received(sub, 1)[-1].data == "two"
    assert connections(own_server.url) == with_one == 2
    for sub in subs:
        sub.close()
    # The reader stops once nobody listens; it looks around every second.
    wait_for(lambda: connections(own_server.url, "reader") == 0, 5, "reader gone")
    assert connections(own_server.url) == 1


def test_closing_the_broker_releases_its_redis_connections(
    own_server: RedisServer, new_broker: MakeBroker
) -> None:
    """After close() the broker holds no connection to Redis."""
    broker = new_broker(url=own_server.url)
    sub = subscribed(broker, "a")
    broker.publish("a", Event("x"))
    received(sub, 1)
    sub.close()
    broker.close()
    wait_for(lambda: connections(own_server.url) == 0, 5, "no connection left")


def test_publish_and_subscribe_without_redis_raise_broker_error(
    new_broker: MakeBroker,
) -> None:
    """The error names where Redis was expected and what to check."""
    port = free_port()
    broker = new_broker(url=f"redis://127.0.0.1:{port}/0")
    said = re.escape(f"127.0.0.1:{port}") + ".*Is redis-server running and reachable"
    with pytest.raises(BrokerError, match=f"Could not publish.*{said}"):
        broker.publish("a", Event("x"))
    with pytest.raises(BrokerError, match=f"Could not subscribe.*{said}"):
        subscribed(broker, "a")
    with pytest.raises(BrokerError, match=f"Could not subscribe.*{said}"):
        subscribed(broker, "a", last="1700000000000-0")
    assert broker.stats() == {"subscriptions": 0, "channels": {}}


@pytest.mark.parametrize("others", [0, 1], ids=["no-reader", "reader-failing"])
def test_blueprint_holds_a_stream_while_redis_is_down_and_replays_when_back(
    app: Flask, client: FlaskClient, own_server: RedisServer, others: int
) -> None:
    """While Redis is down the endpoint answers 200 and keeps the stream
    open; once Redis is back the stream replays from its id, then goes live.
    A browser would give up for good on a 503."""
    app.config.update(EVENTSTREAM_BROKER_URL=own_server.url, EVENTSTREAM_KEEPALIVE=0.1)
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    # With a subscriber already open, the worker's reader is running, and
    # fails, while Redis is away; without one, there is no reader yet.
    open_before = [client.get("/events?channel=b") for _ in range(others)]
    try:
        with app.app_context():
            seen = sse.publish("seen", channel="a")
            missed = [sse.publish(f"missed {n}", channel="a") for n in range(3)]
        own_server.kill()
        with app.app_context(), pytest.raises(BrokerError, match="redis-server"):
            sse.publish("refused", channel="a")
        with client.get("/events?channel=a", headers={"Last-Event-ID": seen}) as rv:
            assert rv.status_code == 200
            chunks = iter(t.cast("cabc.Iterable[bytes]", rv.response))
            assert next(chunks) == b": stream opened\n"
            assert next(chunks) == b": keep-alive\n"
            assert state(app).streams == 1 + others
            own_server.start()
            with app.app_context():
                live = sse.publish("live", channel="a")
            events = read_events(rv, 4, timeout=15)
        assert [(e.id, e.data) for e in events] == [
            *[(id, f"missed {n}") for n, id in enumerate(missed)],
            (live, "live"),
        ]
        assert state(app).streams == others
    finally:
        for rv in open_before:
            rv.close()
        state(app).broker.close()


def test_subscriber_survives_a_redis_restart_and_misses_nothing(
    own_server: RedisServer,
    new_broker: MakeBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kill Redis, start it again: every accepted event arrives once, in order."""
    broker = new_broker(url=own_server.url)
    sub = subscribed(broker, "orders")
    accepted = [broker.publish("orders", Event(f"before {n}")) for n in range(10)]
    assert [e.id for e in received(sub, 10)] == accepted
    own_server.kill()
    with pytest.raises(BrokerError, match="Is redis-server running"):
        broker.publish("orders", Event("refused"))
    wait_for(lambda: "Lost Redis" in caplog.text, 10, "the reader losing Redis")
    own_server.start()
    accepted += [broker.publish("orders", Event(f"after {n}")) for n in range(10)]
    events = received(sub, 10, timeout=15)
    assert [e.id for e in events] == accepted[10:]
    assert [e.data for e in events] == [f"after {n}" for n in range(10)]
    # The reader came back by itself and went on from the last id it saw.
    assert "Redis is back" in caplog.text
    end = broker.publish("orders", Event("end"))
    assert [e.id for e in received(sub, 1)] == [end]
    assert broker.stats() == {"subscriptions": 1, "channels": {"orders": 1}}


def test_cluster_stats_list_this_process_while_it_has_subscribers(
    broker: RedisBroker,
) -> None:
    """The reader's heartbeat names host, pid and subscriptions per channel."""
    assert broker.cluster_stats() == []
    subs = [subscribed(broker, "a", "b"), subscribed(broker, "a")]
    expected = [
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "subscriptions": 2,
            "channels": {"a": 2, "b": 1},
        }
    ]
    # The key follows the worker's streams within a second or so.
    wait_for(lambda: broker.cluster_stats() == expected, 5, "a heartbeat")
    for sub in subs:
        sub.close()
    wait_for(lambda: broker.cluster_stats() == [], 5, "the heartbeat removed")


def test_cli_publishes_and_shows_stats_through_redis(
    redis_app: tuple[Flask, EventStream], new_broker: MakeBroker
) -> None:
    """``flask eventstream publish`` reaches a worker; ``stats`` lists it."""
    app, _ = redis_app
    worker = new_broker()
    sub = subscribed(worker, "chan")
    runner = app.test_cli_runner()
    result = runner.invoke(
        args=["eventstream", "publish", "chan", "hello", "--event", "note"]
    )
    assert result.exit_code == 0, result.output
    (event,) = received(sub, 1)
    assert (event.event, event.data, event.id) == (
        "note",
        "hello",
        result.output.strip(),
    )
    wait_for(lambda: worker.cluster_stats() != [], 5, "a heartbeat")
    result = runner.invoke(args=["eventstream", "stats"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{socket.gethostname()} pid {os.getpid()}: 1 subscriptions",
        "In all: 1 subscriptions",
        "  chan: 1",
    ]
    result = runner.invoke(args=["eventstream", "stats", "--json"])
    assert json.loads(result.output) == worker.cluster_stats()


@pytest.mark.parametrize(
    "args", [["eventstream", "publish", "chan", "hello"], ["eventstream", "stats"]]
)
def test_cli_with_the_memory_broker_says_to_configure_redis(
    app: Flask, args: list[str]
) -> None:
    """The commands reach servers only through Redis, and say so."""
    app.register_blueprint(EventStream(), url_prefix="/events")
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code != 0
    assert "EVENTSTREAM_BROKER_URL=redis://" in result.output


def test_importing_the_redis_broker_without_redis_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ImportError names the extra to install."""
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "flask_eventstream.brokers.redis")
    message = "The Redis broker needs 'redis'. Install 'flask-eventstream[redis]'."
    with pytest.raises(ImportError, match=f"^{re.escape(message)}$"):
        importlib.import_module("flask_eventstream.brokers.redis")


def test_client_ahead_of_this_workers_reader_gets_no_duplicate(
    new_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id this worker's reader has not delivered yet is not sent again."""
    worker, other = new_broker(), new_broker()
    first = subscribed(worker, "a")
    release = threading.Event()
    reading = threading.Event()
    deliver = worker.deliver

    def held(*args: t.Any) -> None:
        reading.set()
        release.wait(10)
        deliver(*args)

    monkeypatch.setattr(worker, "deliver", held)
    seen_elsewhere = other.publish("a", Event("one"))
    assert reading.wait(10)
    # The client got "one" from another worker and comes here with its id,
    # while this worker's reader still holds "one" back.
    second = subscribed(worker, "a", last=seen_elsewhere)
    release.set()
    other.publish("a", Event("two"))
    assert [e.data for e in received(first, 2)] == ["one", "two"]
    assert [e.data for e in received(second, 1)] == ["two"]


# Through the app only (the blueprint, publish, the endpoint) and a plain
# Redis client, so that these hold whatever the broker looks like inside.


@pytest.fixture
def redis_sse(
    app: Flask, server: RedisServer, prefix: str
) -> cabc.Iterator[cabc.Callable[..., EventStream]]:
    """Register an EventStream on the test's Redis keys, with more settings."""

    def register(**config: t.Any) -> EventStream:
        app.config.update(
            EVENTSTREAM_BROKER_URL=server.url, EVENTSTREAM_KEY_PREFIX=prefix, **config
        )
        sse = EventStream()
        app.register_blueprint(sse, url_prefix="/events")
        return sse

    yield register
    if "eventstream" in app.extensions:
        state(app).broker.close()


def published(app: Flask, sse: EventStream, data: str, **kwargs: t.Any) -> str:
    with app.app_context():
        return sse.publish(data, **kwargs)


def opened(client: FlaskClient, url: str, **kwargs: t.Any) -> TestResponse:
    """Open a stream; it is subscribed once the response exists."""
    rv = client.get(url, buffered=False, **kwargs)
    assert rv.status_code == 200, rv.data
    return rv


def next_events(rv: Response, count: int) -> list[tuple[str | None, str | None, t.Any]]:
    """The next ``count`` events of ``rv`` as (event, id, data)."""
    return [(e.event, e.id, e.data) for e in read_events(rv, count, timeout=5)]


def stored(store: redis.Redis, key: str, data: str) -> list[str]:
    """The ids of the entries of the stream ``key`` whose data is ``data``."""
    entries = t.cast("list[tuple[str, dict[str, str]]]", store.xrange(key))
    return [entry_id for entry_id, fields in entries if fields.get("d") == data]


def wait_until_older_than(event_id: str, seconds: float) -> None:
    """Wait until ``event_id`` (``<ms>-<seq>``) is older than ``seconds``."""
    ms = int(event_id.split("-")[0]) + seconds * 1000 + 200
    wait_for(lambda: time.time() * 1000 > ms, seconds + 5, f"{event_id} grown old")


def skipped(caplog: pytest.LogCaptureFixture, entry_id: str) -> list[str]:
    """The library's warnings and errors that name ``entry_id``."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("flask_eventstream")
        and record.levelno >= logging.WARNING
        and entry_id in record.getMessage()
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"o": "1-0", "d": "x", "r": "soon", "m": "MARK"}',
        b'{"o": "1-0", "d": "\xff\xfe", "m": "MARK"}',
        b"not json MARK",
    ],
    ids=["retry-not-a-number", "data-not-utf-8", "not-json"],
)
def test_reader_skips_a_message_it_cannot_decode_and_keeps_delivering(
    redis_app: tuple[Flask, EventStream],
    store: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
    payload: bytes,
) -> None:
    """An undecodable message is logged once and skipped; delivery goes on."""
    caplog.set_level(logging.WARNING, logger="flask_eventstream")
    app, sse = redis_app
    client = app.test_client()
    with opened(client, "/events?channel=a") as rv:
        first = published(app, sse, "first", channel="a")
        assert next_events(rv, 1) == [("message", first, "first")]
        # Another service, or another release of this one, sent it.
        bad = f"MARK{uuid.uuid4().hex}"
        store.publish(f"{prefix}:live:a", payload.replace(b"MARK", bad.encode()))
        after = published(app, sse, "after", channel="a")
        assert next_events(rv, 1) == [("message", after, "after")]
        # The worker still delivers, to its streams and to new ones.
        with opened(client, "/events?channel=a") as late:
            later = published(app, sse, "later", channel="a")
            assert next_events(late, 1) == [("message", later, "later")]
            assert next_events(rv, 1) == [("message", later, "later")]
    wait_for(lambda: bool(skipped(caplog, bad)), 5, f"a log line naming {bad}")
    assert len(skipped(caplog, bad)) == 1, skipped(caplog, bad)


def channel_ahead_of_newest(
    app: Flask, sse: EventStream, store: redis.Redis, prefix: str
) -> str:
    """Leave channel a's stream with a greater id than the app's newest, and
    return that id: an entry an hour ahead (Redis's clock stepped back, or
    another writer), then the key of the newest id deleted or evicted."""
    published(app, sse, "old", channel="a")
    ahead = f"{int(time.time() * 1000) + 3_600_000}-0"
    store.xadd(f"{prefix}:channel:a", {"d": "ahead"}, id=ahead)
    store.delete(f"{prefix}:last")
    return ahead


def test_publish_after_the_newest_id_was_lost_stores_it_whole(
    redis_app: tuple[Flask, EventStream], store: redis.Redis, prefix: str
) -> None:
    """Publish with the app's newest id behind the channel's never fails."""
    app, sse = redis_app
    channel_ahead_of_newest(app, sse, store, prefix)
    with opened(app.test_client(), "/events?channel=a") as rv:
        new = published(app, sse, "new", channel="a")
        newer = published(app, sse, "newer", channel="a")
        for data, event_id in [("new", new), ("newer", newer)]:
            assert stored(store, f"{prefix}:channel:a", data) == [event_id]
        assert next_events(rv, 2) == [
            ("message", new, "new"),
            ("message", newer, "newer"),
        ]


def test_given_id_while_the_channel_is_ahead_is_stored_once(
    redis_app: tuple[Flask, EventStream], store: redis.Redis, prefix: str
) -> None:
    """An app's id, even one that looks like an id Redis gave, is the app's:
    the event is stored once, after the channel's newest."""
    app, sse = redis_app
    newest = channel_ahead_of_newest(app, sse, store, prefix)
    before = store.xlen(f"{prefix}:channel:a")
    for given in (newest, "0-1"):
        assert published(app, sse, given, channel="a", id=given) == given
    assert store.xlen(f"{prefix}:channel:a") == before + 2
    newest_entry = t.cast(
        "list[t.Any]", store.xrevrange(f"{prefix}:channel:a", count=1)
    )
    (entry_id, fields), *_ = newest_entry
    assert parse_id(entry_id) > parse_id(newest) and fields["i"] == "0-1"


@pytest.mark.parametrize(
    "lost", [["trimmed"], ["trimmed", "first"]], ids=["trimmed", "trimmed-first"]
)
def test_replay_past_trimmed_events_resets_though_other_keys_are_lost(
    redis_sse: cabc.Callable[..., EventStream],
    app: Flask,
    store: redis.Redis,
    prefix: str,
    lost: list[str],
) -> None:
    """Trimmed history is announced whatever other key Redis lost."""
    sse = redis_sse(EVENTSTREAM_HISTORY=3)
    ids = [published(app, sse, f"a{n}", channel="a") for n in range(6)]
    store.delete(*(f"{prefix}:{key}" for key in lost))
    assert scenarios.resumed(app, sse, "a", ids[0]) == [
        ("eventstream.reset", ids[0]),
        ("message", "a3"),
        ("message", "a4"),
        ("message", "a5"),
    ]


def test_replay_from_a_channel_whose_stream_was_lost_resets_after_the_ttl(
    redis_sse: cabc.Callable[..., EventStream],
    app: Flask,
    store: redis.Redis,
    prefix: str,
) -> None:
    """An id older than the TTL on a channel with no stream gets a reset."""
    sse = redis_sse(EVENTSTREAM_HISTORY_TTL=1)
    a0 = published(app, sse, "a0", channel="a")
    store.delete(f"{prefix}:channel:a")
    published(app, sse, "b0", channel="b")
    wait_until_older_than(a0, 1)
    assert scenarios.resumed(app, sse, "a", a0) == [("eventstream.reset", a0)]


def test_channel_history_expires_after_the_ttl_without_events(
    redis_sse: cabc.Callable[..., EventStream],
    app: Flask,
    store: redis.Redis,
    prefix: str,
) -> None:
    """A channel's stream expires after the TTL, renewed by each event."""
    sse = redis_sse(EVENTSTREAM_HISTORY_TTL=1)
    key = f"{prefix}:channel:a"
    a0 = published(app, sse, "a0", channel="a")
    first = store.pttl(key)
    assert 0 < first <= 1000
    wait_for(lambda: store.pttl(key) < first - 200, 5, "the expiry running down")
    lowered = store.pttl(key)
    published(app, sse, "a1", channel="a")
    assert 0 < lowered < store.pttl(key) <= 1000
    wait_for(lambda: not store.exists(key), 5, f"{key} expired")
    assert scenarios.resumed(app, sse, "a", a0) == [("eventstream.reset", a0)]


def test_a_worker_receives_only_the_channels_its_clients_listen_to(
    new_broker: MakeBroker, store: redis.Redis, prefix: str
) -> None:
    """Each worker's reader subscribes to the channels of its own clients, and
    lets one go when its last client leaves: an event reaches only the
    workers that want it."""
    one, two = new_broker(), new_broker()

    def readers(channel: str) -> int:
        counts = dict(store.pubsub_numsub(f"{prefix}:live:{channel}"))
        return int(counts[f"{prefix}:live:{channel}"])

    on_a = subscribed(one, "a")
    on_b = [subscribed(two, "b"), subscribed(two, "b", "c")]
    assert (readers("a"), readers("b"), readers("c")) == (1, 1, 1)
    assert one.reader.active == {"a"} and two.reader.active == {"b", "c"}
    sent = one.publish("b", Event("for b"))
    assert [e.id for e in received(on_b[0], 1)] == [sent]
    assert on_a.take(0.5) == []
    on_b[1].close()
    wait_for(lambda: readers("c") == 0, 5, "the reader to let c go")
    assert readers("b") == 1
    on_a.close()
    wait_for(lambda: readers("a") == 0, 5, "the reader to let a go")
