"""The app the load tools serve: the blueprint, a publish endpoint, state."""

from __future__ import annotations

import os

from flask import Flask
from flask import request

from flask_eventstream import EventStream


def create_app() -> Flask:
    """An app with ``/events``, ``POST /publish`` and ``/state``."""
    app = Flask(__name__)
    app.config.from_prefixed_env()
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")

    @app.post("/publish")
    def publish() -> dict[str, str]:
        return {
            "id": sse.publish(request.args["data"], channel=request.args["channel"])
        }

    @app.get("/state")
    def state() -> dict[str, int]:
        return {"pid": os.getpid(), "streams": app.extensions["eventstream"].streams}

    return app
