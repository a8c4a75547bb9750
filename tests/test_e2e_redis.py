"""The Redis broker under real gunicorn gevent servers sharing one Redis."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import typing as t
import uuid

import pytest
import redis
import requests

from flask_eventstream import BrokerError
from flask_eventstream.brokers.redis import RedisBroker
from flask_eventstream.event import Event

from .redis_server import redis_server
from .redis_server import RedisServer
from .servers import EventClient
from .servers import ROOT
from .servers import serve
from .servers import Server
from .servers import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def shared_redis() -> t.Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def settings(server: RedisServer) -> dict[str, str]:
    """Server environment: the Redis broker, with keys of this test only."""
    return {
        "FLASK_EVENTSTREAM_BROKER_URL": server.url,
        "FLASK_EVENTSTREAM_KEY_PREFIX": f"t{uuid.uuid4().hex}",
    }


def publish(server: Server, channel: str, data: str) -> str:
    rv = requests.post(
        f"{server.url}/publish", data={"channel": channel, "data": data}, timeout=10
    )
    rv.raise_for_status()
    return t.cast(str, rv.json()["id"])


def total_subscriptions(broker: RedisBroker) -> int:
    return sum(w["subscriptions"] for w in broker.cluster_stats())


def connections_of(url: str, pid: int) -> int:
    """Redis connections that a worker process holds, by their names."""
    with redis.Redis.from_url(url) as client:
        names = [c["name"] for c in client.client_list()]
    return sum(name.endswith(f":{pid}") for name in names)


def test_publish_on_one_server_reaches_subscribers_on_all(
    shared_redis: RedisServer,
) -> None:
    """Three servers, six workers, one Redis: everyone gets every event."""
    env = settings(shared_redis)
    with (
        serve("gevent", env=env) as a,
        serve("gevent", env=env) as b,
        serve("gevent", env=env, workers=4) as c,
    ):
        clients = [
            EventClient(server.port, "/events?channel=news")
            for server, count in ((a, 5), (b, 5), (c, 40))
            for _ in range(count)
        ]
        try:
            sent = [publish(a, "news", f"event {n}") for n in range(20)]
            for client in clients:
                events = client.read(20)
                assert [e.id for e in events] == sent
                assert [e.data for e in events] == [f"event {n}" for n in range(20)]
            # Every worker with a subscriber announces itself in Redis; the
            # counts add up to every client, on at least one worker of each
            # server (gunicorn decides how -w 4 spreads them).
            prefix = env["FLASK_EVENTSTREAM_KEY_PREFIX"]
            probe = RedisBroker(shared_redis.url, prefix=prefix)
            try:
                wait_for(
                    lambda: total_subscriptions(probe) == len(clients),
                    20,
                    "heartbeats that count every client",
                )
                assert len(probe.cluster_stats()) >= 3
            finally:
                probe.close()
        finally:
            for client in clients:
                client.close()


def test_200_subscribers_use_as_many_redis_connections_as_one(
    shared_redis: RedisServer,
) -> None:
    """A worker's Redis connections do not grow with its clients."""
    with serve("gevent", env=settings(shared_redis)) as server:
        pid = server.state()["pid"]
        clients = [EventClient(server.port, "/events?channel=c1")]
        try:
            publish(server, "c1", "one")
            clients[0].read(1)
            with_one = connections_of(shared_redis.url, pid)
            clients += [
                EventClient(server.port, f"/events?channel=c1&channel=c{n % 10}")
                for n in range(199)
            ]
            publish(server, "c1", "two")
            for client in clients:
                assert client.read(len(client.events) + 1)[-1].data == "two"
            with_200 = connections_of(shared_redis.url, pid)
        finally:
            for client in clients:
                client.close()
    print(f"Redis connections of the worker: {with_one} (1 client), {with_200} (200)")
    assert with_one == with_200 == 2


@pytest.mark.parametrize("ids", ["broker", "app"])
def test_replay_across_workers_during_a_burst(
    shared_redis: RedisServer, ids: str
) -> None:
    """Reconnecting to the other server resumes exactly after the last id,
    the broker's or one the app gave (found in the channel's history)."""
    env = settings(shared_redis)
    total = 3000
    with serve("gevent", env=env) as a, serve("gevent", env=env) as b:
        publisher = RedisBroker(
            shared_redis.url, prefix=env["FLASK_EVENTSTREAM_KEY_PREFIX"]
        )

        def burst() -> None:
            for n in range(total):
                given = f"order-{n}" if ids == "app" else None
                publisher.publish("burst", Event(str(n), id=given))
                if n % 100 == 0:
                    time.sleep(0.01)

        rng = random.Random(11)
        seen: list[str] = []
        client = EventClient(a.port, "/events?channel=burst")
        thread = threading.Thread(target=burst)
        thread.start()
        hops = during_burst = 0
        last: str | None = None
        try:
            while len(seen) < total:
                want = min(rng.randint(1, 300), total - len(seen))
                events = client.read(want, timeout=20)
                seen += [e.data for e in events]
                last = events[-1].id if events else last
                client.close()
                hops += 1
                during_burst += thread.is_alive()
                port = (a, b)[hops % 2].port
                client = EventClient(port, "/events?channel=burst", last)
        finally:
            client.close()
            thread.join(30)
            publisher.close()
    print(f"replay across servers: {hops} hops, {during_burst} during the burst")
    assert during_burst > 5
    assert seen == [str(n) for n in range(total)]


class Subscriber(threading.Thread):
    """A client that reconnects with Last-Event-ID whenever its stream ends."""

    def __init__(self, server: Server, channel: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.channel = channel
        self.data: list[str] = []
        self.last: str | None = None
        self.reconnects = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                client = EventClient(
                    self.server.port, f"/events?channel={self.channel}", self.last
                )
            except OSError:
                self.stop.wait(0.2)
                continue
            try:
                if client.status != 200:
                    self.stop.wait(0.2)
                    continue
                while not client.ended and not self.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        client.read(len(client.events) + 1, timeout=0.5)
                    for event in client.events:
                        self.data.append(event.data)
                        self.last = event.id
                    client.events.clear()
                self.reconnects += 1
            finally:
                client.close()


def test_redis_restart_loses_no_accepted_event() -> None:
    """Kill Redis during a publishing burst: every accepted event arrives once."""
    with redis_server() as store:
        env = settings(store)
        with serve("gevent", env=env) as a, serve("gevent", env=env) as b:
            subscribers = [Subscriber(s, "orders") for s in (a, a, b, b)]
            for subscriber in subscribers:
                subscriber.start()
            wait_for(
                lambda: sum(s.state()["subscriptions"] for s in (a, b)) == 4,
                10,
                "four subscriptions",
            )
            publisher = RedisBroker(
                store.url, prefix=env["FLASK_EVENTSTREAM_KEY_PREFIX"]
            )
            accepted: list[str] = []
            refused: list[str] = []
            running = threading.Event()
            running.set()

            def publish_loop() -> None:
                n = 0
                while running.is_set():
                    try:
                        publisher.publish("orders", Event(f"order {n}"))
                        accepted.append(f"order {n}")
                    except BrokerError:
                        refused.append(f"order {n}")
                    n += 1
                    time.sleep(0.005)

            thread = threading.Thread(target=publish_loop)
            thread.start()
            try:
                wait_for(lambda: len(accepted) > 100, 10, "publishing")
                store.kill()
                wait_for(
                    lambda: len(refused) > 10, 10, "publish refused while Redis is down"
                )
                store.start()
                count = len(accepted)
                wait_for(lambda: len(accepted) > count + 100, 20, "publishing again")
            finally:
                running.clear()
                thread.join(10)
            try:
                for subscriber in subscribers:
                    wait_for(
                        lambda s=subscriber: len(s.data) >= len(accepted),  # type: ignore[misc]
                        30,
                        "every accepted event delivered",
                    )
            finally:
                for subscriber in subscribers:
                    subscriber.stop.set()
                for subscriber in subscribers:
                    subscriber.join(10)
                publisher.close()
            print(
                f"Redis restart: {len(accepted)} publishes accepted, {len(refused)}"
                f" refused; subscribers got {[len(x.data) for x in subscribers]}"
                f" events after {[x.reconnects for x in subscribers]} reconnects"
            )
            for subscriber in subscribers:
                # Each accepted event once, in order. A publish cut off by the
                # crash after Redis stored the event raised BrokerError too:
                # that event may arrive as well, once, in its place.
                assert len(set(subscriber.data)) == len(subscriber.data)
                assert [d for d in subscriber.data if d not in refused] == accepted
                assert set(subscriber.data) - set(accepted) <= set(refused)
            # Both workers came through it: alive, answering, not spinning.
            wait_for(
                lambda: a.state()["subscriptions"] == b.state()["subscriptions"] == 0,
                5,
                "both workers released the closed subscriptions",
            )


def test_cli_publish_reaches_a_subscriber_of_a_running_server(
    shared_redis: RedisServer,
) -> None:
    """``flask eventstream publish`` in another process reaches the stream."""
    env = settings(shared_redis)
    with serve("gevent", env=env) as server:
        client = EventClient(server.port, "/events?channel=alerts")
        try:
            result = subprocess.run(
                [
                    sys.executable, "-m", "flask",
                    "--app", "tests.apps.streams:create_app",
                    "eventstream", "publish", "alerts", "disk full",
                    "--event", "alert",
                ],
                cwd=ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            (event,) = client.read(1)
        finally:
            client.close()
    assert (event.event, event.data, event.id) == (
        "alert",
        "disk full",
        result.stdout.strip(),
    )


def test_disconnect_ends_the_channels_streams_in_every_worker(
    shared_redis: RedisServer,
) -> None:
    """Two gunicorn workers (each of a server of its own, so that each holds
    streams for sure) share Redis: disconnect() asked of one ends the
    channel's streams in both, and only those."""
    env = settings(shared_redis)
    with serve("gevent", env=env) as one, serve("gevent", env=env) as two:
        clients: dict[str, list[EventClient]] = {"revoked": [], "other": []}
        workers: set[str] = set()
        try:
            for server in (one, two):
                for channel, opened in clients.items():
                    for _ in range(3):
                        client = EventClient(
                            server.port, f"/worker-stream?channel={channel}"
                        )
                        opened.append(client)
                        (hello,) = client.read(1)
                        assert hello.event == "worker"
                        workers.add(hello.data)
                        client.events.clear()
            assert len(workers) == 2
            requests.post(
                f"{one.url}/disconnect", data={"channel": "revoked"}, timeout=10
            ).raise_for_status()
            for client in clients["revoked"]:
                # Read to the end: nothing comes but the end of the stream.
                assert client.read(1, timeout=10) == [] and client.ended
            publish(two, "other", "still open")
            for client in clients["other"]:
                assert [e.data for e in client.read(1, timeout=10)] == ["still open"]
        finally:
            for opened in clients.values():
                for client in opened:
                    client.close()
