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

from flask import Flask
from flask import request

from example_app import create_app as create_demo
from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events
from flask_eventstream.concurrency import current_backend
from flask_eventstream.watcher import watcher_for

state = {"started": 0, "finished": 0}
#: Descriptors the app holds open, as a busy server's connections would.
held_fds: list[int] = []


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
            "greenlets": _greenlets(),
            "threads": threading.active_count(),
            "streams": app.extensions["eventstream"].streams,
            "fds": len(os.listdir("/proc/self/fd")),
            "rss_kib": _rss_kib(),
        }

    return app
