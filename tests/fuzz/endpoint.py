"""Fuzz the subscribe endpoint with raw requests built from fuzz bytes.

    python tests/fuzz/endpoint.py -runs=100000

Each input becomes a WSGI request: a method, a query string and a
``Last-Event-ID`` header of any bytes. The answer must be a 2xx or a 4xx
with a short plain message, and a stream's first bytes must carry no event
or field taken from the request.
"""

from __future__ import annotations

import io
import sys
import typing as t

import atheris

with atheris.instrument_imports(include=["flask_eventstream"]):
    from flask import Flask

    from flask_eventstream import EventStream
    from flask_eventstream.parser import EventParser

METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "X"]

app = Flask(__name__)
app.config["PROPAGATE_EXCEPTIONS"] = False
app.register_blueprint(EventStream(), url_prefix="/events")


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    method = METHODS[provider.ConsumeIntInRange(0, len(METHODS) - 1)]
    header = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 200))
    query = provider.ConsumeBytes(sys.maxsize)
    environ: dict[str, t.Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": "/events",
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
    if header:
        environ["HTTP_LAST_EVENT_ID"] = header.decode("latin-1")
    answer: list[t.Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], *_: t.Any) -> t.Any:
        answer[:] = [int(status.split()[0]), dict(headers)]
        return lambda data: None

    body = app.wsgi_app(environ, start_response)
    try:
        first = next(iter(body), b"")
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    status, headers = answer
    if not (200 <= status < 300 or 400 <= status < 500) or b"Traceback" in first:
        raise AssertionError(f"{method} ?{query!r} {header!r}: {status} {first!r}")
    # A method no route knows is refused by Flask's routing, with its own
    # error page; every method the endpoint answers gets plain text.
    plain = headers["Content-Type"].startswith("text/plain")
    if status >= 400 and method != "X" and not plain:
        raise AssertionError(f"{status} answered with {headers['Content-Type']}")
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        events = EventParser().feed(first + b"\n\n")
        if events:
            raise AssertionError(f"the stream opened with events: {events!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
