"""The app the end-to-end tests serve: the demo plus streams that misbehave.

``/state`` reports, from inside the worker, how many generators started and
finished and how many greenlets and threads are alive, so a test can see what
a disconnect left behind.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
import typing as t

from flask import abort
from flask import Flask
from flask import request

from example_app import create_app as create_demo
from flask_eventstream import BrokerError
from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events
from flask_eventstream.concurrency import current_backend
from flask_eventstream.watcher import watcher_for

state = {"started": 0, "finished": 0}
#: Keys that ``POST /release`` has let go, for streams that wait on one.
released: set[str] = set()
#: The start of the message of the exception that ``/raises`` raises; it
#: belongs in the server's log, never on the wire.
FAILURE_MESSAGE = "The view failed with a detail the client must not see"
#: Descriptors the app holds open, as a busy server's connections would.
held_fds: list[int] = []
#: Body bytes that the middleware of ``WRAP_BODY`` passed on, by path.
wrapped: dict[str, int] = {}


def _counting_middleware(wsgi_app: t.Any) -> t.Any:
    # Wraps the body, as a middleware that logs or compresses would, and
    # passes gunicorn's own start_response on unchanged.
    def middleware(environ: t.Any, start_response: t.Any) -> t.Iterator[bytes]:
        body = wsgi_app(environ, start_response)
        try:
            path = environ["PATH_INFO"]
            for chunk in body:
                wrapped[path] = wrapped.get(path, 0) + len(chunk)
                yield chunk
        finally:
            getattr(body, "close", lambda: None)()

    return middleware


def _tracked(body: t.Iterator[t.Any]) -> t.Iterator[t.Any]:
    state["started"] += 1
    try:
        yield from body
    finally:
        state["finished"] += 1


def _greenlets() -> int:
    try:
        from greenlet import greenlet
    except ImportError:
        return 0
    # Collect first: a finished greenlet in a reference cycle is garbage
    # waiting for the collector; one still referenced after it is a leak.
    gc.collect()
    return sum(isinstance(o, greenlet) for o in gc.get_objects())


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def create_app() -> Flask:
    """Create the demo app with the test routes added."""
    app = create_demo()
    if "SEND_TIMEOUT" in os.environ:
        app.config["EVENTSTREAM_SEND_TIMEOUT"] = float(os.environ["SEND_TIMEOUT"])
    if "HOLD_FDS" in os.environ:
        # Every descriptor opened after this one (sockets, the watcher's
        # epoll) is numbered above it, as in a server with many clients.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
        while not held_fds or held_fds[-1] < int(os.environ["HOLD_FDS"]):
            held_fds.append(os.open(os.devnull, os.O_RDONLY))
    if "WRAP_BODY" in os.environ:
        app.wsgi_app = _counting_middleware(app.wsgi_app)  # type: ignore[method-assign]
    if "LOG_LEVEL" in os.environ:
        # The library's own log lines reach the server's output.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        library = logging.getLogger("flask_eventstream")
        library.addHandler(handler)
        library.setLevel(os.environ["LOG_LEVEL"])

    def silent() -> t.Iterator[None]:
        # Silent for an hour: only a killed greenlet gets past this.
        time.sleep(3600)
        yield None

    def checkpoints() -> t.Iterator[None]:
        # Silent on the wire, but gives a thread a chance to stop.
        while True:
            time.sleep(0.1)
            yield None

    def large() -> t.Iterator[Event]:
        payload = "x" * 65536
        n = 0
        while True:
            yield Event(payload, id=str(n))
            n += 1

    def big(size: int) -> t.Iterator[Event | None]:
        yield Event("x" * size)
        yield from checkpoints()

    @app.get("/silent")
    @stream_events(keep_alive=15)
    def silent_stream() -> t.Iterator[t.Any]:
        return _tracked(silent())

    @app.get("/quiet")
    @stream_events(keep_alive=0.2)
    def quiet_stream() -> t.Iterator[t.Any]:
        return _tracked(checkpoints())

    @app.get("/polling")
    @stream_events(keep_alive=2)
    def polling_stream() -> t.Iterator[t.Any]:
        return _tracked(checkpoints())

    @app.get("/large")
    @stream_events(keep_alive=15)
    def large_stream() -> t.Iterator[t.Any]:
        return _tracked(large())

    @app.get("/idle")
    @stream_events(keep_alive=15)
    def idle_stream() -> t.Iterator[t.Any]:
        # Silent on the wire for 15 s, so that only the watcher can end it
        # soon after a hang-up; yet a thread gets its chance to stop.
        return _tracked(checkpoints())

    @app.get("/big")
    @stream_events(keep_alive=15)
    def big_stream() -> t.Iterator[t.Any]:
        # One event of ``size`` bytes of data, then silence.
        return _tracked(big(request.args.get("size", 1_000_000, type=int)))

    @app.get("/worker-stream")
    @stream_events
    def worker_stream() -> t.Iterator[Event]:
        # Says which worker serves it, then streams its channels.
        sse = t.cast(EventStream, app.blueprints["eventstream"])
        sub = sse.listen(*request.args.getlist("channel"))
        yield Event(str(os.getpid()), event="worker")
        yield from sub

    @app.post("/disconnect")
    def disconnect() -> tuple[str, int]:
        sse = t.cast(EventStream, app.blueprints["eventstream"])
        sse.disconnect(*request.form.getlist("channel"))
        return "", 204

    @app.post("/publish")
    def publish() -> dict[str, str]:
        sse = t.cast(EventStream, app.blueprints["eventstream"])
        channel, data = request.form["channel"], request.form["data"]
        return {"id": sse.publish(data, channel=channel)}

    @app.get("/state")
    def report() -> dict[str, t.Any]:
        backend = current_backend()
        broker = app.extensions["eventstream"].broker
        return {
            **state,
            "subscriptions": broker.stats()["subscriptions"],
            "pid": os.getpid(),
            "backend": backend.name,
            "watched": len(watcher_for(backend)),
            # Whether the watcher's loop runs: it ends a tick after the last
            # stream, and its greenlet with it.
            "watching": watcher_for(backend).running,
            "greenlets": _greenlets(),
            "threads": threading.active_count(),
            "streams": app.extensions["eventstream"].streams,
            "fds": len(os.listdir("/proc/self/fd")),
            "rss_kib": _rss_kib(),
            "wrapped_bytes": wrapped,
        }

    def failing(tag: str) -> t.Iterator[Event]:
        yield Event("first", id="1")
        raise RuntimeError(f"{FAILURE_MESSAGE} ({tag}).")

    def forbidden() -> t.Iterator[Event]:
        yield Event("first", id="1")
        abort(403)

    def finishing(count: int) -> t.Iterator[Event]:
        for n in range(count):
            yield Event(str(n), id=str(n))

    def until_released(key: str) -> t.Iterator[None]:
        # Silent on the wire until a client says so, so that only
        # keep-alives are sent meanwhile.
        while key not in released:
            time.sleep(0.05)
            yield None

    def fields(key: str) -> t.Iterator[Event | None]:
        # Every kind of block that is not an event, before and after an id.
        yield Event(comment="a comment")
        yield Event()
        yield Event(retry=2500)
        yield Event("one", id="1")
        yield Event(comment="after an id")
        yield Event()
        yield Event(retry=2000)
        yield Event("two")
        yield from until_released(key)
        yield Event("three", event="named", id="3")
        yield Event(comment="the last event was sent")
        yield from checkpoints()

    def aging() -> t.Iterator[Event | None]:
        yield Event("first", id="1")
        yield from checkpoints()

    @app.get("/raises")
    @stream_events(keep_alive=15)
    def raising_stream() -> t.Iterator[t.Any]:
        # The tag makes each failure's log line its own.
        return _tracked(failing(request.args.get("tag", "")))

    @app.get("/forbidden")
    @stream_events(keep_alive=15)
    def forbidden_stream() -> t.Iterator[t.Any]:
        return _tracked(forbidden())

    @app.get("/finishes")
    @stream_events(keep_alive=15)
    def finishing_stream() -> t.Iterator[t.Any]:
        return _tracked(finishing(request.args.get("count", 3, type=int)))

    @app.get("/fields")
    @stream_events(keep_alive=0.2, retry=3000)
    def fields_stream() -> t.Iterator[t.Any]:
        # Waits for ``POST /release`` with the same key after its second
        # event, sending keep-alives meanwhile.
        return _tracked(fields(request.args["key"]))

    @app.get("/aged")
    @stream_events(keep_alive=15, max_age=1)
    def aged_stream() -> t.Iterator[t.Any]:
        return _tracked(aging())

    @app.post("/release")
    def release() -> dict[str, str]:
        released.add(request.form["key"])
        return {}

    @app.post("/burst")
    def burst() -> dict[str, int]:
        # Events published back to back, faster than any client reads them:
        # "<n> " and then ``size`` bytes of padding each, ids 0, 1, ...
        sse = t.cast(EventStream, app.blueprints["eventstream"])
        channel, count = request.form["channel"], int(request.form["count"])
        padding = "x" * int(request.form.get("size", 0))
        for n in range(count):
            sse.publish(f"{n} {padding}", channel=channel, id=str(n))
        return {"published": count}

    @app.post("/try-publish")
    def try_publish() -> tuple[dict[str, str], int]:
        # What an app answers when the broker cannot take an event.
        sse = t.cast(EventStream, app.blueprints["eventstream"])
        channel, data = request.form["channel"], request.form["data"]
        try:
            return {"id": sse.publish(data, channel=channel)}, 200
        except BrokerError as e:
            return {"error": str(e)}, 503

    @app.get("/subscribers")
    def subscribers() -> dict[str, int]:
        """Open subscriptions in this worker, per channel."""
        broker = app.extensions["eventstream"].broker
        return t.cast(dict[str, int], broker.stats()["channels"])

    return app
