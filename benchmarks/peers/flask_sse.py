"""Flask-SSE 1.0 with its Redis pub/sub, under gunicorn's gevent worker.

    FLASK_REDIS_URL=redis://127.0.0.1:6379/0 \\
        gunicorn -k gevent -w 1 --worker-connections 20000 \\
        'benchmarks.peers.flask_sse:create_app()'

Flask-SSE's stream view subscribes every client with a Redis client of its
own: a connection pool and a pub/sub connection per open stream, so Redis
holds one connection per client (and ``maxclients`` must allow it), and the
worker needs two descriptors per stream: with a hard open-file limit of
20,000 it holds about 9,990 streams, and the rest get a 500.
``publish`` builds a fresh Redis client too, so each publish connects anew.
It sends no keep-alive and no opening bytes, so a client that leaves is
noticed only when a write to it fails: at the second event on its channel
after it left. Until then its greenlet and Redis connection stay.

One addition, needed by the shared interface: the stream opens with a
comment once Flask-SSE's subscription is confirmed by Redis. Without it a
client would see no headers until the first event, and could not know when
it is subscribed. The confirmation reaches Flask-SSE's own generator as an
empty message (which it encodes as a blank line); the response sends the
opening comment in that line's place. Everything else is Flask-SSE's code.
"""

from __future__ import annotations

import json
import os
import typing as t

import redis
from flask import current_app
from flask import Flask
from flask import request
from flask import Response
from flask_sse import Message
from flask_sse import ServerSentEventsBlueprint

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from redis.client import PubSub

OPENING = ": stream opened\n"
# Flask-SSE stores each event in Redis as JSON; this one has empty data.
_SUBSCRIBED = json.dumps({"data": ""})


class _ConfirmedPubSub:
    """A redis-py ``PubSub`` whose subscription confirmation is a message."""

    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._pubsub, name)

    def listen(self) -> cabc.Iterator[dict[str, t.Any]]:
        for message in self._pubsub.listen():  # type: ignore[no-untyped-call]
            if message["type"] == "subscribe":
                message = {**message, "type": "message", "data": _SUBSCRIBED}
            yield message


class _Redis(redis.Redis):
    def pubsub(self, **kwargs: t.Any) -> PubSub:
        pubsub = super().pubsub(**kwargs)  # type: ignore[no-untyped-call]
        return t.cast("PubSub", _ConfirmedPubSub(pubsub))


class _Blueprint(ServerSentEventsBlueprint):  # type: ignore[misc]
    @property
    def redis(self) -> redis.Redis:
        # Like Flask-SSE's own property: a new client on every use.
        return _Redis.from_url(current_app.config["REDIS_URL"])


sse = _Blueprint("sse", __name__)
sse.add_url_rule(rule="", endpoint="stream", view_func=sse.stream)


def _opened(body: cabc.Iterator[str]) -> cabc.Iterator[str]:
    try:
        # The first item is the blank line for the subscription confirmation.
        next(body)
        yield OPENING
        yield from body
    finally:
        # Closing Flask-SSE's generator is what unsubscribes and lets its
        # Redis connection go.
        getattr(body, "close", lambda: None)()


def create_app() -> Flask:
    """An app with ``/events``, ``POST /publish``, ``/throughput`` and ``/state``.

    Reads ``REDIS_URL`` from ``FLASK_REDIS_URL``.
    """
    app = Flask(__name__)
    app.config.from_prefixed_env()
    # Flask-SSE reads the channel from ``?channel=``.
    app.register_blueprint(sse, url_prefix="/events")

    @app.after_request
    def open_stream(response: Response) -> Response:
        if request.endpoint == "sse.stream" and response.status_code == 200:
            body = t.cast("cabc.Iterable[str]", response.response)
            response.response = _opened(iter(body))
        return response

    @app.post("/publish")
    def publish() -> dict[str, int]:
        count = sse.publish(request.args["data"], channel=request.args["channel"])
        return {"subscribers": int(count)}

    @app.get("/throughput")
    def throughput() -> Response:
        # Flask-SSE streams only from Redis and has no helper for a view's own
        # generator, so this is a plain Flask generator using its Message.
        count = request.args.get("n", 1000, type=int)
        payload = "x" * request.args.get("size", 100, type=int)

        def generate() -> cabc.Iterator[str]:
            for _ in range(count):
                yield str(Message(payload))

        return Response(generate(), mimetype="text/event-stream")

    @app.get("/state")
    def state() -> dict[str, int]:
        return {"pid": os.getpid()}

    return app
