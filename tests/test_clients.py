"""Real clients against real servers: httpx-sse, EventSource in Chromium.

What a client sees of the wire rules: no empty events from blocks that are
not events, a last event that tells "finished" and "failed" from "cut", and
refusals that a browser's ``EventSource`` comes back from by itself.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import typing as t
import uuid

import httpx
import pytest
import requests
from httpx_sse import connect_sse
from httpx_sse import ServerSentEvent
from werkzeug.exceptions import Forbidden

from flask_eventstream.testing import parse

from .apps.streams import FAILURE_MESSAGE
from .servers import EventClient
from .servers import ROOT
from .servers import serve
from .servers import Server
from .servers import wait_for
from .test_browser import browser  # noqa: F401

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from playwright.sync_api import Browser

pytestmark = pytest.mark.e2e

KINDS = ["gevent", "gthread", "werkzeug"]
#: Blueprint streams open with a retry field and send keep-alives often.
ENV = {"FLASK_EVENTSTREAM_RETRY": "3000", "FLASK_EVENTSTREAM_KEEPALIVE": "0.2"}
#: What ``EventSource`` sends; ``*/*`` does not name event streams.
EVENT_STREAM = "text/event-stream"
#: The delay a refused client is told, in seconds.
RETRY_AFTER_SECONDS = 5
#: The longest any single wait in the browser may take, in milliseconds.
WAIT_MS = 10_000

# A page that opens one EventSource and records what the page's script sees.
OPEN_EVENT_SOURCE = """url => {
    window.received = [];
    window.states = [];
    window.source = new EventSource(url);
    window.source.onmessage = (e) => window.received.push(e.data);
    window.source.onerror = () => window.states.push(window.source.readyState);
}"""
#: ``EventSource.readyState`` once it gives up for good.
CLOSED = 2


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest) -> cabc.Iterator[Server]:
    with serve(request.param, env=ENV) as running:
        yield running


@pytest.fixture(scope="module")
def process_limited() -> cabc.Iterator[Server]:
    """A server that holds one stream at most."""
    with serve("gevent", env={"FLASK_EVENTSTREAM_MAX_CONNECTIONS": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def client_limited() -> cabc.Iterator[Server]:
    """A server that holds one stream at most per client address."""
    env = {"FLASK_EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT": "1"}
    with serve("gevent", env=env) as running:
        yield running


#: Each limit: the server that has it, and the status of a refusal.
LIMITS = {"process": ("process_limited", 503), "client": ("client_limited", 429)}


class Tap(httpx.BaseTransport):
    """An HTTP transport that records every body byte as it arrives.

    :param on_chunk: called with all the body received so far, after each
        chunk, before the client sees the chunk.
    :param timeout: seconds after which receiving fails, so that a stream
        that never sends what a test waits for cannot hang it.
    """

    def __init__(
        self, on_chunk: cabc.Callable[[bytes], None], timeout: float = 20.0
    ) -> None:
        self.raw = bytearray()
        self._on_chunk = on_chunk
        self._deadline = time.monotonic() + timeout
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Recorded(t.cast(httpx.SyncByteStream, response.stream), self),
            extensions=response.extensions,
        )

    def record(self, chunk: bytes) -> None:
        if time.monotonic() > self._deadline:
            raise TimeoutError(f"Still streaming at the deadline; got {self.raw!r}")
        self.raw += chunk
        self._on_chunk(bytes(self.raw))

    def close(self) -> None:
        self._inner.close()


class _Recorded(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, tap: Tap) -> None:
        self._stream = stream
        self._tap = tap

    def __iter__(self) -> cabc.Iterator[bytes]:
        for chunk in self._stream:
            self._tap.record(chunk)
            yield chunk

    def close(self) -> None:
        self._stream.close()


def once_after_keepalive(
    marker: bytes, action: cabc.Callable[[], None]
) -> cabc.Callable[[bytes], None]:
    """An ``on_chunk`` that runs ``action`` once a keep-alive follows ``marker``."""
    done: list[bool] = []

    def on_chunk(raw: bytes) -> None:
        at = raw.find(marker)
        if not done and at >= 0 and raw.find(b": keep-alive\n", at) >= 0:
            done.append(True)
            action()

    return on_chunk


def same_in_our_parser(raw: bytes, seen: list[ServerSentEvent]) -> None:
    """The project's parser reads the recorded bytes as httpx-sse did."""
    ours = [(e.event, e.data, e.id or "", e.retry) for e in parse(raw)]
    assert ours == [(e.event, e.data, e.id, e.retry) for e in seen]


def publish(server: Server, channel: str, data: str) -> str:
    rv = requests.post(
        f"{server.url}/publish", data={"channel": channel, "data": data}, timeout=10
    )
    rv.raise_for_status()
    return t.cast(str, rv.json()["id"])


def subscribers(server: Server) -> dict[str, int]:
    """Open subscriptions of the server's worker, per channel."""
    rv = requests.get(f"{server.url}/subscribers", timeout=10)
    rv.raise_for_status()
    return t.cast(dict[str, int], rv.json())


def fetch(
    server: Server, path: str, accept: str | None, timeout: float = 15.0
) -> tuple[httpx.Response, bytes]:
    """GET ``path`` and read its body to the end, which must come in time.

    :param accept: the ``Accept`` header; None sends none.
    """
    deadline = time.monotonic() + timeout
    body = bytearray()
    with httpx.Client(timeout=10) as client:
        request = client.build_request("GET", f"{server.url}{path}")
        del request.headers["Accept"]
        if accept is not None:
            request.headers["Accept"] = accept
        response = client.send(request, stream=True)
        try:
            for chunk in response.iter_bytes():
                body += chunk
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path} did not end; got {body[-300:]!r}")
        finally:
            response.close()
    return response, bytes(body)


def read_stream(server: Server, path: str) -> bytes:
    """The whole body of a stream that ends by itself."""
    response, body = fetch(server, path, EVENT_STREAM)
    assert response.status_code == 200, body
    assert response.headers["Content-Type"].startswith(EVENT_STREAM)
    return body


@contextlib.contextmanager
def held_slot(server: Server) -> cabc.Iterator[EventClient]:
    """Hold a stream on the channel ``held``; give its slot back afterwards."""
    wait_for(lambda: not subscribers(server), 10, "no stream open before")
    held = EventClient(server.port, "/events?channel=held")
    try:
        assert held.status == 200, held.body
        yield held
    finally:
        held.close()
        wait_for(lambda: "held" not in subscribers(server), 10, "the slot came back")


def test_httpx_sse_reads_only_the_data_events_of_a_view(server: Server) -> None:
    """Comments, retry fields, empty events and keep-alives make no event.

    Nor after an id has been seen, when httpx-sse would report any blank
    line as an event of its own.
    """
    key = uuid.uuid4().hex

    def release() -> None:
        requests.post(
            f"{server.url}/release", data={"key": key}, timeout=10
        ).raise_for_status()

    # The view waits after "two" until a keep-alive has reached the client.
    tap = Tap(once_after_keepalive(b"data: two\n", release))
    seen: list[ServerSentEvent] = []
    with (
        httpx.Client(transport=tap, timeout=10) as client,
        connect_sse(client, "GET", f"{server.url}/fields?key={key}") as source,
    ):
        for sse in source.iter_sse():
            seen.append(sse)
            if sse.data == "three" or len(seen) > 10:
                break
    assert [(e.event, e.data, e.id) for e in seen] == [
        ("message", "one", "1"),
        ("message", "two", "1"),
        ("named", "three", "3"),
    ]
    raw = bytes(tap.raw)
    # Keep-alives may come between any two blocks, on a busy machine.
    blocks = raw.replace(b": keep-alive\n", b"")
    assert blocks.startswith(b": stream opened\nretry: 3000\n: a comment\nretry:")
    # A blank line ends each of the three events, and nothing else.
    assert raw.count(b"\n\n") == 3, raw
    same_in_our_parser(raw, seen)


def test_httpx_sse_reads_only_the_published_events_of_a_channel(
    server: Server,
) -> None:
    """A channel stream with EVENTSTREAM_RETRY, with keep-alives between its
    events, reads as its events alone."""
    channel = f"c{uuid.uuid4().hex}"
    ids: list[str] = []
    # The second event is published once a keep-alive follows the first.
    tap = Tap(
        once_after_keepalive(
            b"data: a\n", lambda: ids.append(publish(server, channel, "b"))
        )
    )
    seen: list[ServerSentEvent] = []
    with (
        httpx.Client(transport=tap, timeout=10) as client,
        connect_sse(client, "GET", f"{server.url}/events?channel={channel}") as source,
    ):
        # The response has begun, so the subscription exists.
        ids.append(publish(server, channel, "a"))
        for sse in source.iter_sse():
            seen.append(sse)
            if sse.data == "b" or len(seen) > 10:
                break
    assert [(e.event, e.data, e.id) for e in seen] == [
        ("message", "a", ids[0]),
        ("message", "b", ids[1]),
    ]
    raw = bytes(tap.raw)
    assert raw.startswith(b": stream opened\nretry: 3000\n")
    assert raw.count(b"\n\n") == 2, raw
    same_in_our_parser(raw, seen)


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/raises?tag={tag}", 500, "Internal Server Error"),
        ("/forbidden", 403, Forbidden.description),
    ],
)
def test_exception_after_the_first_event_ends_the_stream_with_an_error_event(
    server: Server, path: str, status: int, message: str
) -> None:
    """The last event is ``eventstream.error`` with a status and a message,
    never the exception's text; the worker carries on."""
    tag = uuid.uuid4().hex
    pid = server.state()["pid"]
    raw = read_stream(server, path.format(tag=tag))
    events = list(parse(raw))
    assert [e.event for e in events] == ["message", "eventstream.error"], raw
    assert events[0].data == "first"
    assert json.loads(events[-1].data) == {"status": status, "message": message}
    for leak in ("Traceback", "RuntimeError", FAILURE_MESSAGE, tag, ".py", str(ROOT)):
        assert leak.encode() not in raw, raw
    # The same worker serves the next stream whole.
    assert [e.data for e in parse(read_stream(server, "/finishes?count=2"))][:2] == [
        "0",
        "1",
    ]
    assert server.state()["pid"] == pid


def test_exception_after_the_first_event_is_logged_with_its_traceback(
    server: Server,
) -> None:
    """What the client is not told goes to the server's log."""
    tag = uuid.uuid4().hex
    read_stream(server, f"/raises?tag={tag}")
    line = f"RuntimeError: {FAILURE_MESSAGE} ({tag})."
    wait_for(lambda: line in server.output(), 10, "the exception was logged")
    output = server.output()
    before = output[: output.index(line)]
    assert "Traceback (most recent call last):" in before
    assert "tests/apps/streams.py" in before[before.rindex("Traceback") :]


def test_generator_that_returns_ends_the_stream_with_an_end_event(
    server: Server,
) -> None:
    """A finished stream's last event is ``eventstream.end`` with ``{}``."""
    raw = read_stream(server, "/finishes?count=3")
    events = list(parse(raw))
    assert [e.event for e in events] == ["message"] * 3 + ["eventstream.end"], raw
    assert [e.data for e in events[:3]] == ["0", "1", "2"]
    assert json.loads(events[-1].data) == {}


def test_stream_ended_by_max_age_sends_no_end_or_error_event(server: Server) -> None:
    """A stream cut by ``max_age`` ends without a last word: clients reconnect."""
    events = list(parse(read_stream(server, "/aged")))
    assert [(e.event, e.data) for e in events] == [("message", "first")]


@pytest.mark.parametrize("limit", LIMITS)
def test_refused_event_source_gets_200_one_retry_line_and_the_end(
    request: pytest.FixtureRequest, limit: str
) -> None:
    """Over a limit, ``Accept: text/event-stream`` gets a jittered retry field.

    A browser's EventSource gives up on any status but 200; a stream that
    ends makes it come back after the retry delay.
    """
    server: Server = request.getfixturevalue(LIMITS[limit][0])
    delays = []
    with held_slot(server):
        for _ in range(10):
            response, body = fetch(server, "/events?channel=refused", EVENT_STREAM)
            assert response.status_code == 200, body
            assert response.headers["Content-Type"].startswith(EVENT_STREAM)
            match = re.fullmatch(rb"retry: ([0-9]+)\n", body)
            assert match is not None, body
            delays.append(int(match[1]))
        with (
            httpx.Client(timeout=10) as client,
            connect_sse(client, "GET", f"{server.url}/events?channel=x") as source,
        ):
            assert list(source.iter_sse()) == []
        # A refused stream holds no slot.
        assert subscribers(server) == {"held": 1}
    # The Retry-After delay, in milliseconds, give or take 20%.
    delay_ms = RETRY_AFTER_SECONDS * 1000
    assert all(0.8 * delay_ms <= d <= 1.2 * delay_ms for d in delays), delays
    assert len(set(delays)) > 1, f"The delays are not jittered: {delays}"
    # The slot is free again: a stream is served.
    again = EventClient(server.port, "/events?channel=again")
    try:
        assert again.status == 200
    finally:
        again.close()


@pytest.mark.parametrize("accept", ["*/*", None, "application/json"])
@pytest.mark.parametrize("limit", LIMITS)
def test_refused_request_of_another_client_gets_a_status_and_retry_after(
    request: pytest.FixtureRequest, limit: str, accept: str | None
) -> None:
    """Without ``text/event-stream`` in Accept: 503 or 429, and Retry-After."""
    server: Server = request.getfixturevalue(LIMITS[limit][0])
    with held_slot(server):
        response, body = fetch(server, "/events?channel=refused", accept)
        assert subscribers(server) == {"held": 1}
    assert response.status_code == LIMITS[limit][1], body
    assert response.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    assert response.headers["Content-Type"].startswith("text/plain")
    assert b"Too many open streams" in body


def test_event_source_refused_at_the_limit_comes_back_and_streams(
    process_limited: Server,
    browser: Browser,  # noqa: F811
) -> None:
    """Chromium refused at EVENTSTREAM_MAX_CONNECTIONS is not stranded.

    Its EventSource stays CONNECTING, comes back once a slot is free, and
    gets what is published afterwards.
    """
    server = process_limited
    context = browser.new_context()
    try:
        page = context.new_page()
        streams: list[str] = []
        page.on(
            "request", lambda r: streams.append(r.url) if "/events?" in r.url else None
        )
        # Any page of the server's origin will do.
        page.goto(f"{server.url}/state")
        with held_slot(server):
            page.evaluate(OPEN_EVENT_SOURCE, "/events?channel=browser")
            page.wait_for_function("window.states.length > 0", timeout=WAIT_MS)
            assert streams, "The page's EventSource made no request."
            assert subscribers(server) == {"held": 1}
            assert CLOSED not in page.evaluate("window.states"), (
                "The refused EventSource gave up for good."
            )
        wait_for(
            lambda: subscribers(server) == {"browser": 1},
            30,
            "the page's EventSource came back by itself and subscribed",
        )
        data = uuid.uuid4().hex
        publish(server, "browser", data)
        page.wait_for_function(
            "data => window.received.includes(data)", arg=data, timeout=WAIT_MS
        )
        assert page.evaluate("window.received") == [data]
        assert CLOSED not in page.evaluate("window.states")
        assert len(streams) >= 2
    finally:
        context.close()
    wait_for(lambda: not subscribers(server), 10, "the page's stream was closed")
