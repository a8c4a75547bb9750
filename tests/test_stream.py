"""``@stream_events`` in process, through the Flask test client (threads)."""

from __future__ import annotations

import contextvars
import decimal
import json
import logging
import queue
import threading
import typing as t

import pytest
from flask import abort
from flask import Flask
from flask import g
from flask import request
from flask import Response

from flask_eventstream import Event
from flask_eventstream import stream_events
from flask_eventstream.body import END_EVENT
from flask_eventstream.body import EventStreamBody
from flask_eventstream.concurrency import StreamSource
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events

if t.TYPE_CHECKING:
    from flask.testing import FlaskClient
    from werkzeug.wrappers import Response as BaseResponse

    from flask_eventstream.concurrency import Backend


class Chunks:
    """Reads a test response's body chunk by chunk, each read bounded."""

    def __init__(self, rv: BaseResponse) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pull, args=(rv,), daemon=True)
        self._thread.start()

    def _pull(self, rv: BaseResponse) -> None:
        for chunk in t.cast("t.Iterable[bytes]", rv.response):
            self._queue.put(chunk)
        self._queue.put(None)

    def next(self, timeout: float = 5.0) -> bytes | None:
        """The next chunk; None when the body has ended."""
        return self._queue.get(timeout=timeout)

    def rest(self, timeout: float = 5.0) -> bytes:
        """Everything until the body ends."""
        data = b""
        while (chunk := self.next(timeout)) is not None:
            data += chunk
        return data


def gated(app: Flask, decorate: t.Callable[..., t.Any]) -> threading.Event:
    """Add a stream at /s that is silent until the returned gate opens."""
    gate = threading.Event()

    @app.get("/s")
    @decorate
    def s() -> t.Iterator[str]:
        gate.wait(5)
        yield "done"

    return gate


def test_response_has_event_stream_headers_and_no_connection(
    app: Flask, client: FlaskClient
) -> None:
    """The response carries the SSE headers and leaves Connection alone."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        yield "hi"

    with client.get("/s") as rv:
        assert rv.status_code == 200
        assert rv.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert rv.headers["Cache-Control"] == "no-cache"
        assert rv.headers["X-Accel-Buffering"] == "no"
        assert "Connection" not in rv.headers
        assert "Content-Length" not in rv.headers


def test_opening_comment_comes_before_the_first_event(
    app: Flask, client: FlaskClient
) -> None:
    """The first chunk is a lone comment line, sent before any event exists."""
    go = gated(app, stream_events)

    with client.get("/s") as rv:
        chunks = Chunks(rv)
        assert chunks.next() == b": stream opened\n"
        go.set()
        assert chunks.rest() == b"data: done\n\n" + END_EVENT


def test_items_are_encoded_by_type(app: Flask, client: FlaskClient) -> None:
    """Event, str, dict, list and None items each have their wire form."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[t.Any]:
        yield Event("x", event="e", id="1")
        yield "two\nlines"
        yield None
        yield {"a": 1}
        yield [1, 2]

    with client.get("/s") as rv:
        body = Chunks(rv).rest()
    assert body == (
        b": stream opened\n"
        b"event: e\nid: 1\ndata: x\n\n"
        b"data: two\ndata: lines\n\n"
        b'data: {"a": 1}\n\n'
        b"data: [1, 2]\n\n"
        b"event: eventstream.end\ndata: {}\n\n"
    )


def test_json_data_uses_the_apps_json_provider(app: Flask, client: FlaskClient) -> None:
    """Non-string data is dumped by the app's JSON provider, e.g. Decimal."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[t.Any]:
        yield {"price": decimal.Decimal("1.50")}

    with client.get("/s") as rv:
        (event,) = read_events(rv, 1)
    assert json.loads(event.data) == {"price": "1.50"}


def test_keepalive_comment_sent_when_generator_is_idle(
    app: Flask, client: FlaskClient
) -> None:
    """A silent generator gets keep-alive comments between its events."""
    go = gated(app, stream_events(keep_alive=0.05))

    with client.get("/s") as rv:
        chunks = Chunks(rv)
        assert chunks.next() == b": stream opened\n"
        assert chunks.next() == b": keep-alive\n"
        assert chunks.next() == b": keep-alive\n"
        go.set()
        rest = chunks.rest()
    assert rest.endswith(b"data: done\n\n" + END_EVENT)
    kept_alive = rest.removesuffix(b"data: done\n\n" + END_EVENT)
    assert set(kept_alive.splitlines()) <= {b": keep-alive"}


def test_heartbeat_event_replaces_the_keepalive_comment(
    app: Flask, client: FlaskClient
) -> None:
    """``heartbeat=Event(...)`` is sent instead of the comment."""
    go = gated(
        app, stream_events(keep_alive=0.05, heartbeat=Event("{}", event="heartbeat"))
    )

    with client.get("/s") as rv:
        chunks = Chunks(rv)
        chunks.next()
        assert chunks.next() == b"event: heartbeat\ndata: {}\n\n"
        go.set()


def test_keepalive_interval_comes_from_config(app: Flask, client: FlaskClient) -> None:
    """Without ``keep_alive``, EVENTSTREAM_KEEPALIVE sets the interval."""
    app.config["EVENTSTREAM_KEEPALIVE"] = 0.05
    go = gated(app, stream_events)

    with client.get("/s") as rv:
        chunks = Chunks(rv)
        chunks.next()
        assert chunks.next() == b": keep-alive\n"
        go.set()


def test_retry_is_sent_with_the_opening_comment(
    app: Flask, client: FlaskClient
) -> None:
    """``retry`` reaches the client before any event."""

    @app.get("/s")
    @stream_events(retry=2500)
    def s() -> t.Iterator[str]:
        yield "x"

    with client.get("/s") as rv:
        assert Chunks(rv).next() == b": stream opened\nretry: 2500\n"


def test_extra_headers_are_added(app: Flask, client: FlaskClient) -> None:
    """``headers`` adds to the response, e.g. for CORS."""

    @app.get("/s")
    @stream_events(headers={"Access-Control-Allow-Origin": "*"})
    def s() -> t.Iterator[str]:
        yield "x"

    with client.get("/s") as rv:
        assert rv.headers["Access-Control-Allow-Origin"] == "*"


def test_generator_sees_request_and_app_context(
    app: Flask, client: FlaskClient
) -> None:
    """``request``, ``g`` and context variables set before it are visible."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")

    @app.before_request
    def before() -> None:
        g.user = "ada"
        var.set("carried")

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        yield request.args["name"]
        yield g.user
        yield var.get()

    with client.get("/s?name=hello") as rv:
        events = read_events(rv, 3)
    assert [e.data for e in events] == ["hello", "ada", "carried"]


def test_teardown_runs_after_the_stream_ends(app: Flask, client: FlaskClient) -> None:
    """Request teardown runs once the generator is finished."""
    log: list[str] = []

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        log.append("teardown")

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        log.append("generator")
        yield "x"

    with client.get("/s") as rv:
        Chunks(rv).rest()
    assert log[-2:] == ["generator", "teardown"]


def test_view_can_abort_before_streaming(app: Flask, client: FlaskClient) -> None:
    """A view that returns an iterable may abort first, with a normal error."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        if "token" not in request.args:
            abort(401)
        return iter(["ok"])

    assert client.get("/s").status_code == 401
    with client.get("/s?token=1") as rv:
        assert [e.data for e in read_events(rv, 1)] == ["ok"]


def test_view_returning_a_response_is_sent_unchanged(
    app: Flask, client: FlaskClient
) -> None:
    """A response object from the view bypasses streaming."""

    @app.get("/s")
    @stream_events
    def s() -> Response:
        return Response("gone", status=410)

    rv = client.get("/s")
    assert (rv.status_code, rv.data) == (410, b"gone")


def test_stream_ends_cleanly_after_max_age(app: Flask, client: FlaskClient) -> None:
    """``max_age`` ends an endless stream; what was sent stays whole."""
    stop = threading.Event()
    closed = threading.Event()

    @app.get("/s")
    @stream_events(max_age=0.2)
    def s() -> t.Iterator[str]:
        try:
            while not stop.wait(0.01):
                yield "tick"
        finally:
            closed.set()

    try:
        with client.get("/s") as rv:
            body = Chunks(rv).rest()
    finally:
        stop.set()
    assert body.startswith(b": stream opened\n")
    assert body.endswith(b"data: tick\n\n")
    assert closed.wait(5)


def test_exception_in_generator_is_logged_and_ends_stream(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An error after streaming began is logged; the stream ends cleanly."""

    @app.get("/s")
    @stream_events
    def broken() -> t.Iterator[str]:
        yield "before"
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR), client.get("/s") as rv:
        body = Chunks(rv).rest()
    # The client is told, without the traceback or the exception's text.
    assert body == (
        b": stream opened\ndata: before\n\nevent: eventstream.error\n"
        b'data: {"message":"Internal Server Error","status":500}\n\n'
    )
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "'broken'" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_http_exception_in_generator_tells_the_client_its_status(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """abort() after streaming began ends the stream with the status and the
    description, as an event; it is no server error."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        yield "before"
        abort(403, "Your session has ended.")

    with caplog.at_level(logging.INFO), client.get("/s") as rv:
        events = list(parse(Chunks(rv).rest()))
    assert events[-1] == Event(
        '{"message":"Your session has ended.","status":403}', event="eventstream.error"
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_generator_that_returns_ends_with_an_end_event(
    app: Flask, client: FlaskClient
) -> None:
    """A finished generator says so, so that a client does not run it again."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        yield "only"

    with client.get("/s") as rv:
        body = Chunks(rv).rest()
    assert body == (
        b": stream opened\ndata: only\n\nevent: eventstream.end\ndata: {}\n\n"
    )


def test_stream_ended_by_max_age_sends_no_end_event(
    app: Flask, client: FlaskClient
) -> None:
    """A stream cut short (here by max_age) is not finished: the client must
    reconnect, so it gets no end event."""

    @app.get("/s")
    @stream_events(max_age=0.2, keep_alive=None)
    def s() -> t.Iterator[str]:
        yield "first"
        threading.Event().wait(5)
        yield "never sent"

    with client.get("/s") as rv:
        body = Chunks(rv).rest()
    assert body == b": stream opened\ndata: first\n\n"


def test_bytes_item_is_refused_with_a_clear_message(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Yielding bytes is a TypeError that says what to yield instead."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[t.Any]:
        yield b"raw"

    with caplog.at_level(logging.ERROR), client.get("/s") as rv:
        Chunks(rv).rest()
    (record,) = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None
    assert "not bytes" in str(record.exc_info[1])


def test_closing_the_response_runs_the_generators_finally(
    app: Flask, client: FlaskClient
) -> None:
    """A client that leaves ends the generator, and its finally runs."""
    closed = threading.Event()

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        try:
            while True:
                yield "tick"
        finally:
            closed.set()

    rv = client.get("/s")
    read_events(rv, 3)
    rv.close()
    assert closed.wait(5)


def test_head_returns_headers_and_never_starts_the_generator(
    app: Flask, client: FlaskClient
) -> None:
    """HEAD gets the stream's headers and an empty body."""
    started = threading.Event()

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        started.set()
        yield "x"

    rv = client.head("/s")
    assert rv.status_code == 200
    assert rv.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert rv.data == b""
    assert not started.is_set()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"keep_alive": 0}, ValueError, "keep_alive"),
        ({"keep_alive": -1.0}, ValueError, "keep_alive"),
        ({"keep_alive": "15"}, ValueError, "keep_alive"),
        ({"keep_alive": True}, ValueError, "keep_alive"),
        ({"max_age": 0}, ValueError, "max_age"),
        ({"send_timeout": 0}, ValueError, "send_timeout"),
        ({"send_timeout": "60"}, ValueError, "send_timeout"),
        ({"retry": -1}, ValueError, "retry"),
        ({"retry": 1.5}, ValueError, "retry"),
        ({"heartbeat": "ping"}, TypeError, "heartbeat"),
        ({"headers": {"Connection": "close"}}, ValueError, "Connection"),
        (
            {"headers": {"Transfer-Encoding": "chunked"}},
            ValueError,
            "Transfer-Encoding",
        ),
    ],
)
def test_bad_decorator_arguments_raise_naming_the_argument(
    kwargs: dict[str, t.Any], error: type[Exception], name: str
) -> None:
    """Bad arguments fail at decoration time with the argument's name."""
    with pytest.raises(error, match=name):
        stream_events(**kwargs)


def test_send_timeout_is_set_per_view_over_the_config(app: Flask) -> None:
    """send_timeout= overrides EVENTSTREAM_SEND_TIMEOUT for its view; None
    turns the cut off."""
    app.config["EVENTSTREAM_SEND_TIMEOUT"] = 30

    def view() -> t.Iterator[str]:
        yield "x"

    app.get("/default")(stream_events(view))
    app.get("/short", endpoint="short")(stream_events(send_timeout=2.5)(view))
    app.get("/never", endpoint="never")(stream_events(send_timeout=None)(view))
    for endpoint, expected in [("view", 30.0), ("short", 2.5), ("never", None)]:
        with app.test_request_context():
            rv = t.cast(Response, app.view_functions[endpoint]())
        assert isinstance(rv.response, EventStreamBody)
        assert rv.response.send_timeout == expected, endpoint
        rv.close()


def test_bad_keepalive_config_names_the_key(app: Flask, client: FlaskClient) -> None:
    """A wrong EVENTSTREAM_KEEPALIVE is reported by name."""
    app.config["EVENTSTREAM_KEEPALIVE"] = "soon"

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[str]:
        yield "x"

    with pytest.raises(ValueError, match="EVENTSTREAM_KEEPALIVE"):
        client.get("/s")


class ListSource(StreamSource):
    """A source that hands over fixed batches of chunks."""

    def __init__(self, batches: list[list[bytes]]) -> None:
        self.batches = batches
        self.closed = False

    def start(self, backend: Backend) -> None:
        pass

    def take(self, timeout: float | None) -> list[bytes]:
        return self.batches.pop(0) if self.batches else []

    @property
    def drained(self) -> bool:
        return not self.batches

    def interrupt(self) -> None:
        self.batches.clear()

    def close(self) -> None:
        self.closed = True


def test_chunks_that_are_ready_together_leave_in_one_write() -> None:
    """Queued events are joined into one chunk, in order."""
    source = ListSource([[b"a\n\n", b"b\n\n", b"c\n\n"], [b"d\n\n"]])
    body = EventStreamBody(
        source,
        opening=b": o\n",
        keep_alive=None,
        heartbeat=b": k\n",
        max_age=None,
        send_timeout=None,
        sock=None,
    )
    assert list(body) == [b": o\n", b"a\n\nb\n\nc\n\n", b"d\n\n"]
    assert source.closed
