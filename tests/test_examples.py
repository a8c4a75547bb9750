"""The apps ported from Flask-SSE, sse-starlette and django-eventstream.

Each app of ``examples/`` is served by gunicorn's gevent worker and read by
real clients (httpx with httpx-sse, or a raw socket where comments count),
to check what ``docs/migrating.rst`` says about it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import time
import typing as t
import uuid

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from httpx_sse import connect_sse
from httpx_sse import ServerSentEvent

from examples.from_sse_starlette.app import as_event
from flask_eventstream import stream_events
from flask_eventstream.testing import read_events

from .redis_server import redis_server
from .redis_server import RedisServer
from .servers import EventClient
from .servers import open_stream
from .servers import read_until
from .servers import serve
from .servers import Server
from .servers import wait_for

pytestmark = pytest.mark.e2e

FLASK_SSE_APP = "examples.from_flask_sse.app:create_app()"
SSE_STARLETTE_APP = "examples.from_sse_starlette.app:create_app()"
DJANGO_APP = "examples.from_django_eventstream.app:create_app()"
STAFF_PASSWORD = "correct horse"
#: Keep-alives every fifth of a second, so a test sees them soon.
KEEPALIVE = {"FLASK_EVENTSTREAM_KEEPALIVE": "0.2"}
#: How long a test waits for what it expects before it fails.
PATIENCE_SECONDS = 20.0
#: Event types that mark a live but quiet stream, not content.
HEARTBEATS = frozenset({"keep-alive", "ping"})

Events = t.Iterator[ServerSentEvent]


def http(server: Server) -> httpx.Client:
    """A client of ``server``, with its own cookies; no read waits for ever."""
    return httpx.Client(base_url=server.url, timeout=10.0)


@contextlib.contextmanager
def stream(
    client: httpx.Client, path: str, headers: dict[str, str] | None = None
) -> t.Iterator[Events]:
    """Open the event stream at ``path``; its events, once it answered 200."""
    with connect_sse(client, "GET", path, headers=dict(headers or {})) as source:
        assert source.response.status_code == 200, source.response.read()
        yield source.iter_sse()


def take(events: Events, count: int) -> list[ServerSentEvent]:
    """The next ``count`` events that are not heartbeats."""
    taken: list[ServerSentEvent] = []
    deadline = time.monotonic() + PATIENCE_SECONDS
    while len(taken) < count:
        # Heartbeats keep every read short, so the deadline is looked at.
        if time.monotonic() > deadline:
            raise AssertionError(f"Got {taken!r}, waiting for {count} events.")
        event = next(events, None)
        if event is None:
            raise AssertionError(f"The stream ended after {taken!r}.")
        if event.event not in HEARTBEATS:
            taken.append(event)
    return taken


def until_end(events: Events) -> list[ServerSentEvent]:
    """Every event up to the end of the stream, heartbeats included."""
    taken: list[ServerSentEvent] = []
    deadline = time.monotonic() + PATIENCE_SECONDS
    for event in events:
        taken.append(event)
        if time.monotonic() > deadline:
            raise AssertionError(f"The stream did not end; got {taken[-5:]!r}.")
    return taken


def status_of(client: httpx.Client, path: str) -> int:
    """The status of a stream request, without reading a body that may be
    endless."""
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}) as rv:
        return rv.status_code


def key_prefix() -> dict[str, str]:
    """Redis keys of their own, so no server sees another's history."""
    return {"FLASK_EVENTSTREAM_KEY_PREFIX": f"t{uuid.uuid4().hex}"}


@pytest.fixture(scope="module")
def redis() -> t.Iterator[RedisServer]:
    with redis_server() as server:
        yield server


# Flask-SSE ---------------------------------------------------------------


def flask_sse_env(redis: RedisServer) -> dict[str, str]:
    return {
        "REDIS_URL": redis.url,
        "FLASK_SECRET_KEY": f"secret-{uuid.uuid4().hex}",
        "FLASK_STAFF_PASSWORD": STAFF_PASSWORD,
        **key_prefix(),
    }


@pytest.fixture(scope="module")
def flask_sse(redis: RedisServer) -> t.Iterator[Server]:
    with serve("gevent", app=FLASK_SSE_APP, env=flask_sse_env(redis), ready="/") as s:
        yield s


def test_flask_sse_port_page_subscribes_to_both_channels_with_one_stream(
    flask_sse: Server,
) -> None:
    """The page opens one stream for the channels ``sse`` and ``news``."""
    with http(flask_sse) as client:
        page = client.get("/").text
    # tojson escapes "&" in a script.
    assert '"/stream?channel=sse\\u0026channel=news"' in page


def test_flask_sse_port_greeting_is_json_with_its_event_type(
    flask_sse: Server,
) -> None:
    """``type="greeting"`` became ``event="greeting"``; a dict is JSON data,
    on the default channel ``sse``, and the event has an id."""
    with http(flask_sse) as client, stream(client, "/stream") as events:
        assert client.post("/hello").text == "Message sent!"
        [greeting] = take(events, 1)
    assert greeting.event == "greeting"
    assert json.loads(greeting.data) == {"message": "Hello!"}
    assert greeting.id


def test_flask_sse_port_headline_string_is_sent_as_is(flask_sse: Server) -> None:
    """A str is the data itself, as with Flask-SSE: no JSON quotes."""
    headline = 'Rain "expected" later'
    with http(flask_sse) as client, stream(client, "/stream?channel=news") as events:
        client.post("/news", data={"headline": headline}).raise_for_status()
        [event] = take(events, 1)
    assert (event.event, event.data) == ("headline", headline)


def test_flask_sse_port_staff_channel_is_checked_wherever_it_is_named(
    flask_sse: Server,
) -> None:
    """``staff`` gets 403 without a staff session, also behind another
    channel, which Flask-SSE's before_request hook let through."""
    with http(flask_sse) as client:
        assert status_of(client, "/stream?channel=staff") == 403
        assert status_of(client, "/stream?channel=news&channel=staff") == 403
        client.post("/login", data={"password": "wrong"}).raise_for_status()
        assert status_of(client, "/stream?channel=news&channel=staff") == 403

        client.post("/login", data={"password": STAFF_PASSWORD}).raise_for_status()
        with stream(client, "/stream?channel=news&channel=staff") as events:
            client.post("/news", data={"headline": "Staff only"}).raise_for_status()
            headline, posted = take(events, 2)
    assert (headline.event, headline.data) == ("headline", "Staff only")
    assert posted.event == "posted"
    assert json.loads(posted.data) == {"headline": "Staff only", "from": "127.0.0.1"}


def test_flask_sse_port_streams_outlive_a_redis_outage(
    tmp_path: pathlib.Path,
) -> None:
    """While Redis is down, publishing answers 503 and streams stay open,
    new ones too; once it is back, events flow again."""
    own_redis = RedisServer(tmp_path)
    own_redis.start()
    env = {**flask_sse_env(own_redis), **KEEPALIVE}
    try:
        with serve("gevent", app=FLASK_SSE_APP, env=env, ready="/") as server:
            reader = EventClient(server.port, "/stream?channel=news")
            try:
                with http(server) as client:
                    client.post("/news", data={"headline": "before"}).raise_for_status()
                    assert [e.data for e in reader.read(1)] == ["before"]

                    own_redis.kill()
                    refused = client.post("/news", data={"headline": "lost"})
                    assert refused.status_code == 503
                    sock = open_stream(server.port, "/stream?channel=news")
                    with sock:
                        head = read_until(sock, b"\r\n\r\n")
                        assert head.startswith(b"HTTP/1.1 200 ")
                        read_until(sock, b": keep-alive")

                    own_redis.start()

                    def published() -> bool:
                        rv = client.post("/news", data={"headline": "after"})
                        return rv.status_code == 200

                    wait_for(published, PATIENCE_SECONDS, "a publish Redis takes")
                    events = reader.read(2, timeout=PATIENCE_SECONDS)
            finally:
                reader.close()
    finally:
        own_redis.stop()
    assert [e.data for e in events] == ["before", "after"]


# sse-starlette -----------------------------------------------------------


@pytest.fixture(scope="module")
def sse_starlette() -> t.Iterator[Server]:
    with serve(
        "gevent", app=SSE_STARLETTE_APP, env=KEEPALIVE, ready="/health"
    ) as server:
        yield server


def test_sse_starlette_port_ticks_keep_the_fields_of_their_dicts(
    sse_starlette: Server,
) -> None:
    """``as_event`` turns each ``{"event", "id", "data"}`` dict into those
    fields; the data, a JSON string already, is sent as it is."""
    with http(sse_starlette) as client, stream(client, "/ticks") as events:
        ticks = take(events, 2)
    assert [(e.event, e.id) for e in ticks] == [("tick", "1"), ("tick", "2")]
    assert [json.loads(e.data) for e in ticks] == [{"n": 1}, {"n": 2}]


def test_sse_starlette_port_sends_keep_alive_comments_between_ticks(
    sse_starlette: Server,
) -> None:
    """A silence between ticks gets a keep-alive comment, which replaced
    sse-starlette's ping comment; the headers are ours."""
    with open_stream(sse_starlette.port, "/ticks") as sock:
        received = read_until(sock, b": keep-alive")
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    headers = head.split("\r\n")
    assert "cache-control: no-cache" in headers
    assert "x-accel-buffering: no" in headers
    assert b"event: ping" not in received


def start_job(client: httpx.Client, steps: int, delay: float) -> str:
    rv = client.post("/jobs", params={"steps": steps, "delay": delay})
    assert rv.status_code == 201, rv.text
    return t.cast(str, rv.json()["id"])


def test_sse_starlette_port_job_progress_ends_with_done_then_end(
    sse_starlette: Server,
) -> None:
    """A job's stream sends progress, ``ping`` events while a step is
    quiet, its own ``done``, and then ``eventstream.end``."""
    with http(sse_starlette) as client:
        job = start_job(client, steps=3, delay=1.0)
        with stream(client, f"/jobs/{job}/progress") as events:
            received = until_end(events)
    assert "ping" in {e.event for e in received}
    content = [e for e in received if e.event != "ping"]
    *progress, done, end = content
    assert {e.event for e in progress} == {"progress"}
    steps = [json.loads(e.data) for e in progress]
    assert {s["total"] for s in steps} == {3}
    counts = [s["done"] for s in steps]
    assert counts == sorted(set(counts))
    assert counts[-1] == 3
    assert (done.event, json.loads(done.data)) == ("done", {"steps": 3})
    assert (end.event, json.loads(end.data)) == ("eventstream.end", {})


def test_sse_starlette_port_finished_job_answers_204(sse_starlette: Server) -> None:
    """Once a job is done, its stream is refused with 204, which stops an
    EventSource for good rather than have it replay the job each time it
    reconnects."""
    with http(sse_starlette) as client:
        progress = f"/jobs/{start_job(client, steps=1, delay=0.1)}/progress"
        wait_for(
            lambda: status_of(client, progress) == 204,
            PATIENCE_SECONDS,
            "the job's stream answering 204",
        )
        # eventstream.js asks with HEAD why EventSource gave up.
        assert client.head(progress).status_code == 204


def test_sse_starlette_port_refuses_before_streaming(sse_starlette: Server) -> None:
    """An unknown job gets 404 and a bad job request 400, as statuses, since
    the views check before they return their generators."""
    with http(sse_starlette) as client:
        assert status_of(client, "/jobs/nope/progress") == 404
        assert client.post("/jobs", params={"steps": 0}).status_code == 400
        assert client.post("/jobs", params={"delay": "inf"}).status_code == 400


def test_a_yielded_dict_is_json_data_not_event_fields(
    app: Flask, client: FlaskClient
) -> None:
    """Unlike sse-starlette, a dict yielded as it is becomes the JSON data
    of a ``message`` event; ``as_event`` reads it as fields."""
    item = {"event": "tick", "data": "1"}

    @app.get("/bare")
    @stream_events
    def bare() -> t.Iterator[dict[str, str]]:
        yield item

    @app.get("/fields")
    @stream_events
    def fields() -> t.Iterator[t.Any]:
        yield as_event(item)

    with client.get("/bare") as rv:
        [bare_event] = read_events(rv, 1)
    with client.get("/fields") as rv:
        [fields_event] = read_events(rv, 1)
    assert bare_event.event == "message"
    assert json.loads(bare_event.data) == item
    assert (fields_event.event, fields_event.data) == ("tick", "1")


# django-eventstream -------------------------------------------------------

_user_ids = itertools.count(1)


@pytest.fixture(scope="module")
def django(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Server]:
    database = tmp_path_factory.mktemp("django") / "notifications.sqlite"
    env = {
        "REDIS_URL": redis.url,
        "FLASK_SECRET_KEY": f"secret-{uuid.uuid4().hex}",
        "FLASK_DATABASE": str(database),
        **key_prefix(),
        **KEEPALIVE,
    }
    # The blueprint's script answers once the app is up; "/" wants a user.
    ready = "/events/eventstream.js"
    with serve("gevent", app=DJANGO_APP, env=env, ready=ready) as server:
        yield server


@contextlib.contextmanager
def signed_in(server: Server) -> t.Iterator[tuple[httpx.Client, int]]:
    """A client signed in as a user that no other test uses."""
    user_id = next(_user_ids)
    with http(server) as client:
        client.post("/login", data={"user_id": user_id}).raise_for_status()
        yield client, user_id


def notify(client: httpx.Client, user_id: int, text: str) -> int:
    rv = client.post(f"/users/{user_id}/notifications", data={"text": text})
    assert rv.status_code == 201, rv.text
    return t.cast(int, rv.json()["id"])


def test_django_port_user_channel_needs_that_users_session(django: Server) -> None:
    """``listen()`` asks ``@sse.authorize``, as ``can_read_channel`` was
    asked: 403 before streaming, for the view and the endpoint alike."""
    with http(django) as anonymous:
        assert status_of(anonymous, "/users/1/events") == 403
        assert status_of(anonymous, "/events?channel=announcements") == 403
    with signed_in(django) as (client, user_id):
        assert status_of(client, f"/users/{user_id + 1000}/events") == 403
        assert status_of(client, f"/events?channel=user-{user_id + 1000}") == 403
        with stream(client, f"/users/{user_id}/events"):
            pass


def test_django_port_notification_id_is_its_database_key(django: Server) -> None:
    """``send_event(channel, type, data)`` became ``sse.publish(data,
    event=type, channel=channel)``, with the row's key as the event id."""
    with (
        signed_in(django) as (client, user_id),
        stream(client, f"/users/{user_id}/events") as events,
    ):
        pk = notify(client, user_id, "Your order shipped")
        [event] = take(events, 1)
    assert event.event == "notification"
    assert event.id == f"notification-{pk}"
    assert json.loads(event.data) == {"id": pk, "text": "Your order shipped"}


def test_django_port_replays_after_a_database_key(django: Server) -> None:
    """A client that comes back with a notification's key as its last id
    gets the notifications after it, in order; the page's list names the
    key to resume from."""
    with signed_in(django) as (client, user_id):
        first, second, third = (notify(client, user_id, f"n{n}") for n in range(3))
        header = {"Last-Event-ID": f"notification-{first}"}
        with stream(client, f"/users/{user_id}/events", header) as events:
            replayed = take(events, 2)
        assert [e.id for e in replayed] == [
            f"notification-{second}",
            f"notification-{third}",
        ]

        listed = client.get(f"/users/{user_id}/notifications").json()
        assert [n["id"] for n in listed["notifications"]] == [first, second, third]
        fourth = notify(client, user_id, "n3")
        resume = f"/users/{user_id}/events?lastEventId={listed['last_event_id']}"
        with stream(client, resume) as events:
            [event] = take(events, 1)
        assert (event.id, json.loads(event.data)["text"]) == (
            f"notification-{fourth}",
            "n3",
        )


def test_django_port_unknown_key_starts_with_a_reset(django: Server) -> None:
    """An id that history does not hold gets ``eventstream.reset``, naming
    it, where django-eventstream sent ``stream-reset``."""
    with signed_in(django) as (client, user_id):
        header = {"Last-Event-ID": "notification-999999999"}
        with stream(client, f"/users/{user_id}/events", header) as events:
            [reset] = take(events, 1)
    assert (reset.event, reset.data) == ("eventstream.reset", "notification-999999999")


def test_django_port_send_event_encodes_a_string_as_json(django: Server) -> None:
    """The ``send_event`` shim JSON-encodes a str, as django-eventstream did,
    so pages that ``JSON.parse`` every event keep working."""
    with (
        signed_in(django) as (client, _),
        stream(client, "/events?channel=announcements") as events,
    ):
        rv = client.post("/announcements", data={"text": 'Back "soon"'})
        assert rv.status_code == 204
        [event] = take(events, 1)
    assert event.event == "announcement"
    assert event.data == '"Back \\"soon\\""'
    assert json.loads(event.data) == 'Back "soon"'


@pytest.mark.parametrize("path", ["/users/{user_id}/events", "/events"])
def test_django_port_keep_alive_is_an_event(django: Server, path: str) -> None:
    """Quiet streams, of the view and of the endpoint, send a ``keep-alive``
    event with empty data, as django-eventstream did."""
    with signed_in(django) as (client, user_id):
        url = path.format(user_id=user_id)
        if path == "/events":
            url += "?channel=announcements"
        with stream(client, url) as events:
            event = next(events)
    assert (event.event, event.data) == ("keep-alive", "")


def test_django_port_logout_ends_that_users_streams_only(django: Server) -> None:
    """Signing out ends the user's streams at once (``sse.disconnect``); the
    browser's reconnect is refused, and other users' streams carry on."""
    with signed_in(django) as (client, user_id), signed_in(django) as (other, o_id):
        with (
            stream(client, f"/users/{user_id}/events") as events,
            stream(other, f"/users/{o_id}/events") as other_events,
        ):
            client.post("/logout").raise_for_status()
            # Ended for a reconnect, which is refused: no eventstream.end.
            assert {e.event for e in until_end(events)} <= {"keep-alive"}
            pk = notify(other, o_id, "still here")
            [event] = take(other_events, 1)
        assert event.id == f"notification-{pk}"
        assert status_of(client, f"/users/{user_id}/events") == 403
