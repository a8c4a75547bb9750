"""Per-user notifications and announcements, ported from django-eventstream.

A signed-in user follows ``/users/<id>/events``, their own channel, and
everyone signed in follows the ``announcements`` channel. Each notification
is a row of the database, and its key is its event's id, so a page that
shows the rows resumes its stream right after the newest. It needs Redis at
``REDIS_URL``, as ``EVENTSTREAM_REDIS`` did::

    gunicorn -k gevent 'examples.from_django_eventstream.app:create_app()'
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import typing as t

from flask import abort
from flask import current_app
from flask import Flask
from flask import g
from flask import render_template
from flask import request
from flask import session

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events

if t.TYPE_CHECKING:
    import collections.abc as cabc

#: django-eventstream's keep-alive was an event, which pages could listen for.
KEEP_ALIVE = Event("", event="keep-alive")
SCHEMA = """
CREATE TABLE IF NOT EXISTS notification (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL,
    text TEXT NOT NULL
)
"""

sse = EventStream(heartbeat=KEEP_ALIVE)


@sse.authorize
def can_read_channel(channel: str) -> bool:
    # Asked for the channels of /events and for those a view listens to.
    user_id = session.get("user_id")
    return user_id is not None and channel in ("announcements", f"user-{user_id}")


def send_event(channel: str, event_type: str, data: t.Any) -> str:
    """Publish as django-eventstream's ``send_event`` did, for code that
    calls it in many places: every data is JSON, a string too, since pages
    ``JSON.parse`` every event."""
    return sse.publish(current_app.json.dumps(data), event=event_type, channel=channel)


def event_id(notification_id: int) -> str:
    return f"notification-{notification_id}"


def signed_in_user() -> int:
    user_id = session.get("user_id")
    if user_id is None:
        abort(401)
    return t.cast(int, user_id)


def db() -> sqlite3.Connection:
    if "db" not in g:
        g.db = sqlite3.connect(current_app.config["DATABASE"])
    return t.cast(sqlite3.Connection, g.db)


def close_db(exc: BaseException | None) -> None:
    connection = g.pop("db", None)
    if connection is not None:
        connection.close()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["EVENTSTREAM_BROKER_URL"] = os.environ.get(
        "REDIS_URL", "redis://localhost:6379/0"
    )
    # django-eventstream sent its keep-alive every 20 seconds.
    app.config["EVENTSTREAM_KEEPALIVE"] = 20
    app.config["DATABASE"] = os.path.join(app.instance_path, "notifications.sqlite")
    app.config.from_prefixed_env()
    app.register_blueprint(sse, url_prefix="/events")
    app.teardown_appcontext(close_db)
    os.makedirs(os.path.dirname(app.config["DATABASE"]), exist_ok=True)
    with contextlib.closing(sqlite3.connect(app.config["DATABASE"])) as connection:
        connection.execute(SCHEMA)

    @app.get("/")
    def home() -> str:
        return render_template("home.html", user_id=signed_in_user())

    @app.post("/login")
    def login() -> tuple[str, int]:
        # A stand-in for the app's own sign-in, which Django's auth was.
        user_id = request.form.get("user_id", type=int)
        if user_id is None:
            abort(400)
        session["user_id"] = user_id
        return "", 204

    @app.post("/logout")
    def logout() -> tuple[str, int]:
        user_id = session.pop("user_id", None)
        if user_id is not None:
            # Ends the streams of the user's channel now, in every worker. A
            # browser that reconnects is asked can_read_channel again.
            sse.disconnect(f"user-{user_id}")
        return "", 204

    @app.get("/users/<int:user_id>/events")
    @stream_events(heartbeat=KEEP_ALIVE)
    def user_events(user_id: int) -> cabc.Iterable[Event]:
        # Was {"format-channels": ["user-{user_id}"]}. listen() asks
        # can_read_channel, and refuses with 403 before streaming.
        return sse.listen(f"user-{user_id}")

    @app.get("/users/<int:user_id>/notifications")
    def list_notifications(user_id: int) -> dict[str, t.Any]:
        if signed_in_user() != user_id:
            abort(403)
        cursor = db().execute(
            "SELECT id, text FROM notification WHERE user_id = ? ORDER BY id",
            (user_id,),
        )
        rows = cursor.fetchall()
        return {
            "notifications": [{"id": pk, "text": text} for pk, text in rows],
            # Was get_current_event_id(): the stream resumes after this.
            "last_event_id": event_id(rows[-1][0]) if rows else None,
        }

    @app.post("/users/<int:user_id>/notifications")
    def notify(user_id: int) -> tuple[dict[str, t.Any], int]:
        signed_in_user()
        text = request.form["text"]
        with db() as connection:
            # An INSERT always sets lastrowid.
            pk = t.cast(
                int,
                connection.execute(
                    "INSERT INTO notification (user_id, text) VALUES (?, ?)",
                    (user_id, text),
                ).lastrowid,
            )
        note = {"id": pk, "text": text}
        sse.publish(
            note, event="notification", id=event_id(pk), channel=f"user-{user_id}"
        )
        return note, 201

    @app.post("/announcements")
    def announce() -> tuple[str, int]:
        signed_in_user()
        send_event("announcements", "announcement", request.form["text"])
        return "", 204

    return app
