"""The app the end-to-end tests serve: the demo plus streams that misbehave.

``/state`` reports, from inside the worker, how many generators started and
finished and how many greenlets and threads are alive, so a test can see what
a disconnect left behind.
"""

from __future__ import annotations

import gc
import os
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
