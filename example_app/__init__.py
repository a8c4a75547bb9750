"""The Flask-EventStream demo: a counter and a chat, streamed over SSE.

``python -m example_app`` serves it under gunicorn with the gevent worker.
Settings come from ``FLASK_*`` environment variables too, so
``FLASK_EVENTSTREAM_MAX_AGE=30`` makes every chat stream end after 30
seconds (and the browser reconnect and replay what it missed).
"""

from __future__ import annotations

import re
import time
import typing as t

from flask import abort
from flask import Flask
from flask import render_template
from flask import request
from flask import Response
from flask import url_for

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events

if t.TYPE_CHECKING:
    import collections.abc as cabc

#: A room is part of a channel name, ``chat.<room>``, which is at most 200
#: characters long.
ROOM_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,195}")
DEFAULT_ROOM = "lobby"
DEFAULT_NAME = "anonymous"
MAX_NAME_CHARS = 50
MAX_TEXT_CHARS = 2000


def create_app(config: dict[str, t.Any] | None = None) -> Flask:
    """Create the demo app.

    :param config: settings that override the defaults and the environment.
    """
    app = Flask(__name__)
    app.config.from_prefixed_env()
    app.config.update(config or {})
    # Registration reads the EVENTSTREAM_* settings, so it comes after them.
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.get("/stream")
    @stream_events
    def stream() -> t.Iterator[Event]:
        # A browser that reconnects sends the last id it saw, as a header
        # (EventSource's own retry) or in the query string (eventstream.js
        # after an error status); carry on from there rather than starting
        # the count again.
        last = request.headers.get("Last-Event-ID") or request.args.get(
            "lastEventId", ""
        )
        n = int(last) + 1 if last.isdigit() else 0
        while True:
            yield Event(f"Hello, world! ({n})", event="foo", id=str(n))
            n += 1
            time.sleep(1)

    @app.get("/chat")
    def chat() -> str:
        room = _room(request.args.get("room"))
        return render_template(
            "chat.html",
            room=room,
            stream_url=url_for("eventstream.subscribe", channel=f"chat.{room}"),
        )

    @app.post("/chat/send")
    def send() -> tuple[dict[str, str], int]:
        fields: cabc.Mapping[str, t.Any]
        if request.is_json:
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                _bad_request("Send a JSON object with 'room', 'name' and 'text'.")
            fields = body
        else:
            fields = request.form
        room = _room(_text_field(fields, "room"))
        name = _text_field(fields, "name") or DEFAULT_NAME
        if len(name) > MAX_NAME_CHARS:
            _bad_request(
                f"'name' is at most {MAX_NAME_CHARS} characters (got {len(name)})."
            )
        text = _text_field(fields, "text")
        if not text or text.isspace():
            _bad_request("'text' is required: write a message.")
        if len(text) > MAX_TEXT_CHARS:
            _bad_request(
                f"'text' is at most {MAX_TEXT_CHARS} characters (got {len(text)})."
            )
        event_id = sse.publish(
            {"name": name, "text": text}, event="chat", channel=f"chat.{room}"
        )
        return {"id": event_id}, 201

    return app


def _room(value: str | None) -> str:
    if value is None:
        return DEFAULT_ROOM
    if ROOM_PATTERN.fullmatch(value) is None:
        _bad_request(
            f"'room' is 1-195 characters of A-Z a-z 0-9 . _ : - (got {value[:60]!r})."
        )
    return value


def _text_field(fields: cabc.Mapping[str, t.Any], key: str) -> str | None:
    value = fields.get(key)
    if value is not None and not isinstance(value, str):
        _bad_request(f"'{key}' must be a string (got {type(value).__name__}).")
    return value


def _bad_request(message: str) -> t.NoReturn:
    abort(Response(message + "\n", 400, mimetype="text/plain"))
