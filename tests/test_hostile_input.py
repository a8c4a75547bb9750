"""Hostile input against the subscribe endpoint, the parser and the encoder.

Requests are built as raw WSGI environs, so that anything a client can put
on the wire reaches the app: query strings of arbitrary bytes, repeated and
very long parameters, ``Last-Event-ID`` headers of any bytes, any method.
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import typing as t

import pytest
from flask import Flask
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream.testing import parse
from flask_eventstream.testing import read_events

FUZZ = pathlib.Path(__file__).parent / "fuzz"
EXAMPLES = 600
METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH", "TRACE", "BREW"]

# Bytes a client may send, weighted towards what the endpoint treats
# specially: separators, escapes, line breaks, NUL and non-ASCII.
SPECIAL = [
    b"channel=", b"lastEventId=", b"&", b"=", b"%", b"%0a", b"%0d", b"%00",
    b"%ff", b"\xff", b"\n", b"\r", b":", b"a", b"sse", b"1700000000000-0",
    b"-", b"\x00", "\u00e9".encode(), b"data: x", b"+",
]  # fmt: skip
wire_bytes = st.binary(max_size=300) | st.lists(
    st.sampled_from(SPECIAL), max_size=40
).map(b"".join)


def make_app() -> Flask:
    app = Flask(__name__)
    app.config.update(TESTING=False, PROPAGATE_EXCEPTIONS=False)
    app.register_blueprint(EventStream(), url_prefix="/events")
    return app


APP = make_app()


def call(
    method: str, query: bytes, last_event_id: bytes | None
) -> tuple[str, dict[str, str], bytes]:
    """Call the app as a WSGI server would; return status, headers, first bytes.

    A stream is read only up to its first chunk and then closed, as a
    client that leaves at once would.
    """
    environ: dict[str, t.Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": "/events",
        # WSGI strings carry the request's bytes as latin-1.
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if last_event_id is not None:
        environ["HTTP_LAST_EVENT_ID"] = last_event_id.decode("latin-1")
    started: list[t.Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], *_: t.Any) -> t.Any:
        started[:] = [status, dict(headers)]
        return lambda data: None

    body = APP.wsgi_app(environ, start_response)
    try:
        first = next(iter(body), b"")
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return started[0], started[1], first


STANDARD = {"GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"}


def check_response(
    status: str, headers: dict[str, str], first: bytes, method: str = "GET"
) -> None:
    code = int(status.split()[0])
    assert 200 <= code < 300 or 400 <= code < 500, (status, first)
    assert b"Traceback" not in first
    # A method no route knows (TRACE, BREW) is refused by Flask's routing,
    # with the app's own error page, before the endpoint is reached.
    if code >= 400 and method in STANDARD:
        assert headers["Content-Type"].startswith("text/plain"), headers
        assert len(first) < 400
    elif headers.get("Content-Type", "").startswith("text/event-stream"):
        # Nothing the client sent comes back as an event or a field.
        assert list(parse(first + b"\n\n")) == [], first


@settings(max_examples=EXAMPLES, deadline=None)
@given(method=st.sampled_from(METHODS), query=wire_bytes)
def test_any_query_string_gets_2xx_or_a_plain_4xx(method: str, query: bytes) -> None:
    """No query string, with any method, gives a 5xx, a traceback or a field."""
    check_response(*call(method, query, None), method=method)


@settings(max_examples=EXAMPLES, deadline=None)
@given(last_event_id=wire_bytes | st.binary(min_size=1000, max_size=20000))
def test_any_last_event_id_header_gets_2xx_or_a_plain_4xx(last_event_id: bytes) -> None:
    """Huge, binary or non-UTF-8 Last-Event-ID headers are refused plainly."""
    status, headers, first = call("GET", b"channel=a", last_event_id)
    check_response(status, headers, first)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    value=st.text(
        st.characters(codec="utf-8", categories=["Cc", "Cs", "Zs", "Nd", "Po"]),
        max_size=60,
    )
)
def test_last_event_id_argument_with_control_characters(value: str) -> None:
    """lastEventId with control characters or odd digits: a stream or a plain 4xx."""
    from urllib.parse import quote

    query = f"channel=a&lastEventId={quote(value, safe='', errors='surrogatepass')}"
    check_response(*call("GET", query.encode(), None))


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(1, 400),
    size=st.integers(1, 5000),
)
def test_many_and_long_channel_parameters(count: int, size: int) -> None:
    """Repeated and very long channel parameters never cause a 5xx."""
    query = b"&".join([b"channel=" + b"c" * size] * count)
    check_response(*call("GET", query, None))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    data=st.text(max_size=200),
    event=st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s),
)
def test_hostile_data_reaches_subscribers_exactly(data: str, event: str) -> None:
    """Whatever text is published arrives as exactly one event with that data."""
    app = make_app()
    sse = t.cast(EventStream, app.blueprints["eventstream"])
    client = app.test_client()
    response = client.get("/events?channel=x")
    try:
        with app.app_context():
            event_id = sse.publish(data, event=event or None, channel="x")
        (received,) = read_events(response, 1)
    finally:
        response.close()
    lines = data.replace("\r\n", "\n").replace("\r", "\n")
    assert received == Event(lines, event=event or "message", id=event_id)


def run_harness(name: str, runs: int) -> str:
    """Run one atheris harness in its own process; return what it printed."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail("atheris is not installed; pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, str(FUZZ / f"{name}.py"), f"-runs={runs}", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=1100,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Done {runs} runs" in output, output[-3000:]
    return output


@pytest.mark.parametrize("name", ["parser", "encoder", "endpoint"])
def test_fuzz_harness(name: str) -> None:
    """atheris finds no crash in the parser, the encoder or the endpoint."""
    print(run_harness(name, 20_000).strip().splitlines()[-1])


@pytest.mark.long
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", ["parser", "encoder", "endpoint"])
def test_fuzz_harness_long(name: str) -> None:
    """The same, for a million runs each."""
    print(run_harness(name, 1_000_000).strip().splitlines()[-1])
