"""An app with metrics on, for the metrics tests under real servers.

``BROKER_URL``, ``SEND_TIMEOUT``, ``QUEUE_SIZE`` and ``MAX_CONNECTIONS`` in
the environment set the matching ``EVENTSTREAM_*`` settings.
"""

from __future__ import annotations

import os
import time
import typing as t

from flask import Flask
from flask import request

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import metrics_view
from flask_eventstream import stream_events

sse = EventStream()


def create_app() -> Flask:
    """Create the app: the blueprint at /events, metrics at /metrics."""
    app = Flask(__name__)
    app.config.update(
        EVENTSTREAM_METRICS=True,
        EVENTSTREAM_BROKER_URL=os.environ.get("BROKER_URL", "memory://"),
        EVENTSTREAM_SEND_TIMEOUT=float(os.environ.get("SEND_TIMEOUT", "60")),
        EVENTSTREAM_QUEUE_SIZE=int(os.environ.get("QUEUE_SIZE", "1000")),
        EVENTSTREAM_MAX_CONNECTIONS=int(os.environ.get("MAX_CONNECTIONS", "100")),
    )
    app.register_blueprint(sse, url_prefix="/events")
    app.add_url_rule("/metrics", view_func=metrics_view())

    @app.get("/ready")
    def ready() -> str:
        return "ok"

    @app.post("/publish/<channel>")
    def publish(channel: str) -> dict[str, list[str]]:
        # One request publishes them all, without pausing in between.
        count = request.args.get("count", 1, type=int)
        size = request.args.get("size", 1, type=int)
        ids = [sse.publish("x" * size, channel=channel) for _ in range(count)]
        return {"ids": ids}

    @app.get("/finite")
    @stream_events
    def finite() -> t.Iterator[Event]:
        for n in range(3):
            yield Event(str(n))

    @app.get("/failing")
    @stream_events
    def failing() -> t.Iterator[Event]:
        yield Event("first")
        raise RuntimeError("The view failed.")

    @app.get("/aged")
    @stream_events(max_age=0.2)
    def aged() -> t.Iterator[Event]:
        yield Event("first")
        # Only the end of the stream's life gets past this.
        time.sleep(3600)

    @app.get("/large")
    @stream_events
    def large() -> t.Iterator[Event]:
        payload = "x" * 65536
        while True:
            yield Event(payload)

    return app
