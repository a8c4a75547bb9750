"""The Flask-EventStream demo: a counter streamed to a page over SSE.

``python -m example_app`` serves it under gunicorn with the gevent worker.
"""

from __future__ import annotations

import time
import typing as t

from flask import Flask
from flask import render_template
from flask import request

from flask_eventstream import Event
from flask_eventstream import stream_events


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    """Create the demo app.

    :param config: settings that override the defaults.
    """
    app = Flask(__name__)
    app.config.update(config or {})

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.get("/stream")
    @stream_events
    def stream() -> t.Iterator[Event]:
        # A browser that reconnects sends the last id it saw; carry on from
        # there rather than starting the count again.
        last = request.headers.get("Last-Event-ID", "")
        n = int(last) + 1 if last.isdigit() else 0
        while True:
            yield Event(f"Hello, world! ({n})", event="foo", id=str(n))
            n += 1
            time.sleep(1)

    return app
