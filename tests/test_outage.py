"""The Redis broker while Redis is down, under a real gunicorn gevent server.

Subscribers keep their streams and lose nothing; publishers are told.
"""

from __future__ import annotations

import contextlib
import functools
import time
import typing as t
import uuid

import httpx
import pytest
import requests

from flask_eventstream.event import Event
from flask_eventstream.parser import EventParser

from .redis_server import redis_server
from .redis_server import RedisServer
from .servers import serve
from .servers import Server

if t.TYPE_CHECKING:
    import collections.abc as cabc

pytestmark = pytest.mark.e2e

#: A subscriber gets its response within this many seconds, and a stream
#: is never silent for longer: Redis up or down.
CLIENT_TIMEOUT_SECONDS = 3.0
#: Keep-alives come well within the client's timeout.
KEEPALIVE_SECONDS = 1


def settings(store: RedisServer) -> dict[str, str]:
    """Server environment: the Redis broker, with keys of this test only."""
    return {
        "FLASK_EVENTSTREAM_BROKER_URL": store.url,
        "FLASK_EVENTSTREAM_KEY_PREFIX": f"t{uuid.uuid4().hex}",
        "FLASK_EVENTSTREAM_KEEPALIVE": str(KEEPALIVE_SECONDS),
    }


def publish(server: Server, channel: str, data: str) -> str:
    rv = requests.post(
        f"{server.url}/publish", data={"channel": channel, "data": data}, timeout=10
    )
    rv.raise_for_status()
    return t.cast(str, rv.json()["id"])


class Subscriber:
    """One stream read with httpx, as a client with a 3 s timeout reads it.

    :param last_event_id: sent as the ``Last-Event-ID`` header, or as the
        ``lastEventId`` argument when ``in_query``.
    """

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        last_event_id: str,
        *,
        in_query: bool = False,
    ) -> None:
        headers = {"Accept": "text/event-stream"}
        address = httpx.URL(url)
        if in_query:
            address = address.copy_add_param("lastEventId", last_event_id)
        else:
            headers["Last-Event-ID"] = last_event_id
        request = client.build_request("GET", address, headers=headers)
        try:
            self.response = client.send(request, stream=True)
        except httpx.TimeoutException as e:
            raise AssertionError(
                f"No response within {CLIENT_TIMEOUT_SECONDS} s: {e!r}"
            ) from None
        self.raw = bytearray()
        self.events: list[Event] = []
        self._parser = EventParser()
        self._chunks = self.response.iter_bytes()

    @property
    def status(self) -> int:
        return self.response.status_code

    def refusal(self) -> str:
        """The body of a response other than 200."""
        return self.response.read().decode("utf-8", "replace")

    def read_until(
        self, done: cabc.Callable[[], bool], what: str, timeout: float = 30.0
    ) -> None:
        """Read until ``done()``; fail if the stream ends or ``timeout`` passes.

        Each read fails on its own after the client's timeout: a stream that
        falls silent for longer sends no keep-alives.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Not within {timeout} s: {what}; got {self.raw[-500:]!r}"
                )
            chunk = next(self._chunks, None)
            if chunk is None:
                raise AssertionError(f"The stream ended before {what}: {self.raw!r}")
            self.raw += chunk
            self.events += self._parser.feed(chunk)

    def keep_alive_after(self, offset: int) -> bool:
        """Whether a keep-alive came after the first ``offset`` bytes."""
        return self.raw.find(b": keep-alive\n", offset) >= 0

    def has_data(self, data: str) -> bool:
        """Whether an event with ``data`` came."""
        return any(e.data == data for e in self.events)

    def close(self) -> None:
        self.response.close()


def test_subscriptions_made_while_redis_is_down_replay_then_go_live() -> None:
    """Redis killed: new subscriptions get 200 and keep-alives; once it is
    back, each replays from its id, then gets live events, exactly once."""
    channel = "orders"
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server())
        server = stack.enter_context(serve("gevent", env=settings(store)))
        client = stack.enter_context(httpx.Client(timeout=CLIENT_TIMEOUT_SECONDS))
        url = f"{server.url}/events?channel={channel}"

        def subscribe(last_event_id: str, in_query: bool = False) -> Subscriber:
            # Closed before the server stops, whose graceful stop would
            # otherwise wait on them.
            return stack.enter_context(
                contextlib.closing(
                    Subscriber(client, url, last_event_id, in_query=in_query)
                )
            )

        before = [publish(server, channel, f"before {n}") for n in range(5)]
        # One stream is open, and its worker reading Redis, when Redis dies.
        early = subscribe(before[0])
        early.read_until(lambda: len(early.events) == 4, "the first replay")

        store.kill()
        during = [
            subscribe(before[1]),
            subscribe(before[2], in_query=True),
            subscribe(before[4]),
        ]
        for subscriber in during:
            assert subscriber.status == 200, subscriber.refusal()
        subscribers = [early, *during]
        for subscriber in subscribers:
            subscriber.read_until(
                functools.partial(subscriber.keep_alive_after, len(subscriber.raw)),
                "a keep-alive while Redis is down",
                timeout=10,
            )

        # The same port and directory: the append-only file brings back
        # every event Redis acknowledged.
        store.start()
        after = [publish(server, channel, f"after {n}") for n in range(3)]

        data = [f"before {n}" for n in range(5)] + [f"after {n}" for n in range(3)]
        published = list(zip(before + after, data, strict=True))
        for subscriber, seen in zip(subscribers, [0, 1, 2, 4], strict=True):
            subscriber.read_until(
                functools.partial(subscriber.has_data, "after 2"),
                "the replay and the live events",
            )
            expected = [("message", i, d) for i, d in published[seen + 1 :]]
            assert [(e.event, e.id, e.data) for e in subscriber.events] == expected


def test_publish_while_redis_is_down_raises_broker_error() -> None:
    """Publishing with Redis down raises BrokerError; with Redis back, works."""
    with redis_server() as store, serve("gevent", env=settings(store)) as server:
        try_publish = f"{server.url}/try-publish"
        form = {"channel": "orders", "data": "x"}
        assert requests.post(try_publish, data=form, timeout=10).status_code == 200
        store.kill()
        rv = requests.post(try_publish, data=form, timeout=10)
        # The app's answer to BrokerError: 503 and its message.
        assert rv.status_code == 503, rv.text
        assert "Could not publish" in rv.json()["error"]
        assert "Is redis-server running" in rv.json()["error"]
        store.start()
        assert requests.post(try_publish, data=form, timeout=10).status_code == 200
