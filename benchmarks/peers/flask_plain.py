"""Server-sent events in plain Flask, the way they are usually hand-rolled.

    gunicorn -k gevent -w 1 --worker-connections 20000 \\
        'benchmarks.peers.flask_plain:create_app()'

A dict of channels, a ``queue.Queue`` per client (gunicorn's gevent worker
patches it to block only the greenlet), and a generator view that yields
formatted strings. Every client costs a generator with its request context
held open by ``stream_with_context``, and a dead client is noticed only when
a write fails: at the next event or keep-alive.
"""

from __future__ import annotations

import os
import queue
import typing as t

from flask import Flask
from flask import request
from flask import Response
from flask import stream_with_context

KEEPALIVE_SECONDS = 15.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app() -> Flask:
    """An app with ``/events``, ``POST /publish``, ``/throughput`` and ``/state``."""
    app = Flask(__name__)
    channels: dict[str, set[queue.Queue[str]]] = {}

    @app.get("/events")
    def events() -> Response:
        channel = request.args.get("channel", "sse")
        messages: queue.Queue[str] = queue.Queue()
        # Subscribed before the first byte goes out, so a client that has
        # read the opening comment gets every event published after it.
        subscribers = channels.setdefault(channel, set())
        subscribers.add(messages)

        def generate() -> t.Iterator[str]:
            try:
                yield ": stream opened\n"
                while True:
                    try:
                        yield messages.get(timeout=KEEPALIVE_SECONDS)
                    except queue.Empty:
                        yield ": keep-alive\n"
            finally:
                subscribers.discard(messages)
                if not subscribers and channels.get(channel) is subscribers:
                    del channels[channel]

        return Response(
            stream_with_context(generate()),
            mimetype="text/event-stream",
            headers=HEADERS,
        )

    @app.post("/publish")
    def publish() -> dict[str, int]:
        message = f"data: {request.args['data']}\n\n"
        subscribers = list(channels.get(request.args["channel"], ()))
        for messages in subscribers:
            messages.put(message)
        return {"subscribers": len(subscribers)}

    @app.get("/throughput")
    def throughput() -> Response:
        count = request.args.get("n", 1000, type=int)
        payload = "x" * request.args.get("size", 100, type=int)

        def generate() -> t.Iterator[str]:
            for _ in range(count):
                yield f"data: {payload}\n\n"

        return Response(generate(), mimetype="text/event-stream", headers=HEADERS)

    @app.get("/state")
    def state() -> dict[str, int]:
        streams = sum(len(s) for s in channels.values())
        return {"pid": os.getpid(), "streams": streams}

    return app
