"""The app the load tools serve: the interface of benchmarks/README.md."""

from __future__ import annotations

import os
import typing as t

from flask import Flask
from flask import request

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events


def create_app() -> Flask:
    """An app with ``/events``, ``POST /publish``, ``/throughput`` and ``/state``."""
    app = Flask(__name__)
    app.config.from_prefixed_env()
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")

    @app.post("/publish")
    def publish() -> dict[str, str]:
        return {
            "id": sse.publish(request.args["data"], channel=request.args["channel"])
        }

    @app.get("/throughput")
    @stream_events
    def throughput() -> t.Iterator[Event]:
        count = request.args.get("n", 1000, type=int)
        # One Event yielded again and again: each is still encoded and sent
        # on its own, so what is measured is the stream path, not building
        # the objects.
        event = Event("x" * request.args.get("size", 100, type=int))
        for _ in range(count):
            yield event

    @app.get("/state")
    def state() -> dict[str, int]:
        return {"pid": os.getpid(), "streams": app.extensions["eventstream"].streams}

    return app
