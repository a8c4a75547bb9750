"""Scenarios told through public behaviour only, run against each broker.

``test_blueprint`` runs them with the memory broker, ``test_redis_blueprint``
with a real redis-server. They use the app, the ``EventStream`` blueprint, its
endpoint, ``publish``, ``listen`` and ``@stream_events``; of the internals,
only ``broker.stats()``.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from urllib.parse import quote

from flask import Flask
from flask import request
from flask.sessions import SecureCookieSessionInterface

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events
from flask_eventstream.testing import read_events

if t.TYPE_CHECKING:
    import collections.abc as cabc

    import pytest
    from flask.sessions import SessionMixin
    from flask.testing import FlaskClient
    from flask.wrappers import Response
    from werkzeug.test import TestResponse

RESET = "eventstream.reset"

#: Where each kind of stream is served; every one listens to channel ``a``.
VIEWS = {
    # The blueprint's own endpoint.
    "endpoint": "/events?channel=a",
    # A @stream_events view that returns sse.listen("a").
    "listen-view": "/listen",
    # A @stream_events view that returns a generator over sse.listen("a").
    "generator-view": "/generator",
}

#: What fails after the view has returned, so that Flask sends a 500.
LATE_FAULTS = [
    "session-save",
    "after-request-hook-added-before-the-blueprint",
    "after-request-hook-added-after-the-blueprint",
]

# Arabic-Indic digits, which Python's \d and int() take for 0-9.
ARABIC_DIGITS = str.maketrans("0123456789", "".join(map(chr, range(0x660, 0x66A))))
#: "1700000000000-0" in Arabic-Indic digits; a browser sends it as UTF-8.
ARABIC_ID = "1700000000000-0".translate(ARABIC_DIGITS)

#: Ids a client may come back with that no event carries; each gets a reset.
#: Each is made from the id of a real event of the channel.
UNKNOWN_IDS: dict[str, cabc.Callable[[str], str]] = {
    "1700000000000-0-in-arabic-digits": lambda real: ARABIC_ID,
    "a-real-id-in-arabic-digits": lambda real: real.translate(ARABIC_DIGITS),
    "digits-only": lambda real: "12",
    "letters": lambda real: "abc",
    "letters-and-a-dash": lambda real: "a-b",
    "uuid": lambda real: "0b7c6a1e-3f0e-4a43-9a54-5b8f0c1d2e3f",
    "200-characters": lambda real: "x" * 200,
}

#: Ways a client names the id it resumes from: the Last-Event-ID header,
#: the lastEventId argument, or a view's sse.listen(last_event_id=...).
RESUME_BY = ["header", "argument", "listen"]

#: Ids that are not ids, each with a way to send it: each gets a 400.
MALFORMED_IDS: dict[str, tuple[str, str]] = {
    "header-201-characters": ("header", "x" * 201),
    # WSGI carries the header's bytes as latin-1; FF FE is not UTF-8.
    "header-not-utf-8": ("header", "\xff\xfe"),
    "argument-201-characters": ("argument", "x" * 201),
    "argument-nul": ("argument", "a\x00b"),
    "argument-lf": ("argument", "a\nb"),
    "argument-cr": ("argument", "a\rb"),
    "listen-201-characters": ("listen", "x" * 201),
    "listen-nul": ("listen", "a\x00b"),
    "listen-lf": ("listen", "a\nb"),
}


class Outage:
    """A dependency of the app (its session store, a hook) while it is down."""

    def __init__(self) -> None:
        self.down = True

    def check(self) -> None:
        if self.down:
            raise ConnectionError("The session store is down.")


class FlakySessions(SecureCookieSessionInterface):
    """Sessions whose store fails to save during an outage."""

    def __init__(self, outage: Outage) -> None:
        self.outage = outage

    def save_session(
        self, app: Flask, session: SessionMixin, response: Response
    ) -> None:
        self.outage.check()
        super().save_session(app, session, response)


def eventstream_app(
    app: Flask, *, fault: str | None = None, **config: t.Any
) -> tuple[EventStream, Outage]:
    """Register an ``EventStream`` at /events on ``app``, and the test views.

    :param app: an app whose config already names the broker.
    :param fault: one of :data:`LATE_FAULTS`, failing until the outage ends.
    :param config: more ``EVENTSTREAM_*`` settings.
    """
    outage = Outage()
    outage.down = fault is not None
    app.config.update(config)
    # A failure becomes a 500 response, as in production.
    app.config["PROPAGATE_EXCEPTIONS"] = False
    if fault == "session-save":
        app.secret_key = "not secret"
        app.session_interface = FlakySessions(outage)

    def failing_hook(response: Response) -> Response:
        outage.check()
        return response

    if fault == "after-request-hook-added-before-the-blueprint":
        app.after_request(failing_hook)
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    if fault == "after-request-hook-added-after-the-blueprint":
        app.after_request(failing_hook)

    @app.get("/listen")
    @stream_events
    def listening() -> t.Iterable[Event]:
        last = request.args.get("lastEventId")
        if last is None:
            return sse.listen("a")
        return sse.listen("a", last_event_id=last)

    @app.get("/generator")
    @stream_events
    def generating() -> t.Iterator[Event]:
        sub = sse.listen("a")
        return (event for event in sub)

    return sse, outage


def publish(app: Flask, sse: EventStream, data: str, **kwargs: t.Any) -> str:
    with app.app_context():
        return sse.publish(data, channel="a", **kwargs)


def stats(app: Flask) -> dict[str, t.Any]:
    """The broker's count of subscriptions, in all and per channel."""
    return t.cast("dict[str, t.Any]", app.extensions["eventstream"].broker.stats())


def settled(app: Flask, subscriptions: int, timeout: float = 5.0) -> int:
    """Wait until the broker counts ``subscriptions``; return its last count."""
    deadline = time.monotonic() + timeout
    while (count := stats(app)["subscriptions"]) != subscriptions:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return t.cast(int, count)


def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]


def new_client_is_served(app: Flask, sse: EventStream, url: str) -> None:
    """Nothing is subscribed; a new client at ``url`` is served and counted."""
    client = app.test_client()
    left = settled(app, 0)
    rv = client.get(url, buffered=False)
    try:
        # Over EVENTSTREAM_MAX_CONNECTIONS it would get a 503 (its Accept
        # header does not name text/event-stream).
        assert (left, rv.status_code) == (0, 200)
        now = stats(app)
        assert (now["subscriptions"], now["channels"]) == (1, {"a": 1})
        publish(app, sse, "for the new client")
        assert [e.data for e in read_events(rv, 1)] == ["for the new client"]
    finally:
        rv.close()
    assert settled(app, 0) == 0


def late_error_releases_the_subscription(app: Flask, fault: str, view: str) -> None:
    """Three streams replaced by a 500 free their slots of three and subscriptions."""
    sse, outage = eventstream_app(app, fault=fault, EVENTSTREAM_MAX_CONNECTIONS=3)
    url = VIEWS[view]
    client = app.test_client()
    for _ in range(3):
        with client.get(url) as rv:
            assert rv.status_code == 500
    outage.down = False
    new_client_is_served(app, sse, url)


def unread_streams_release_the_subscription(app: Flask, how: str, view: str) -> None:
    """Four HEADs, or four streams closed unread, leave a cap of three free."""
    sse, _ = eventstream_app(app, EVENTSTREAM_MAX_CONNECTIONS=3)
    url = VIEWS[view]
    client = app.test_client()
    for _ in range(4):
        if how == "HEAD":
            rv = client.head(url)
            assert (rv.status_code, rv.data) == (200, b"")
        else:
            # What a server does when the client has left before the
            # first byte: it closes the body without iterating it.
            rv = client.get(url, buffered=False)
            assert rv.status_code == 200
            rv.close()
    new_client_is_served(app, sse, url)


def resume_request(client: FlaskClient, by: str, last_event_id: str) -> TestResponse:
    """Open a stream of channel ``a`` that resumes from ``last_event_id``."""
    if by == "header":
        # WSGI carries the header's UTF-8 bytes as latin-1 text.
        header = last_event_id.encode().decode("latin-1")
        return client.get(
            "/events?channel=a", headers={"Last-Event-ID": header}, buffered=False
        )
    argument = quote(last_event_id, safe="")
    if by == "argument":
        return client.get(f"/events?channel=a&lastEventId={argument}", buffered=False)
    return client.get(f"/listen?lastEventId={argument}", buffered=False)


def unknown_id_gets_a_reset(
    app: Flask, caplog: pytest.LogCaptureFixture, by: str, kind: str
) -> None:
    """200, a reset naming the id, then live events; nothing logged."""
    sse, _ = eventstream_app(app)
    history = ["before 0", "before 1"]
    first = publish(app, sse, history[0])
    publish(app, sse, history[1])
    last_event_id = UNKNOWN_IDS[kind](first)
    rv = resume_request(app.test_client(), by, last_event_id)
    try:
        if rv.status_code != 200:
            raise AssertionError(f"{rv.status_code}: {rv.get_data()[:300]!r}")
        (reset,) = read_events(rv, 1)
        assert (reset.event, reset.data) == (RESET, last_event_id)
        publish(app, sse, "live")
        # The reset may be followed by what history holds, then live events.
        events: list[Event] = []
        while not events or events[-1].data != "live":
            assert len(events) <= len(history), [e.data for e in events]
            more = read_events(rv, 1)
            assert more, f"The stream ended after {[e.data for e in events]}."
            events += more
    finally:
        rv.close()
    assert [e.data for e in events[:-1]] in ([], history)
    assert warnings_logged(caplog) == []
    assert settled(app, 0) == 0


def malformed_id_gets_400(
    app: Flask, caplog: pytest.LogCaptureFixture, by: str, last_event_id: str
) -> None:
    """400 with a plain message from the endpoint; nothing subscribed or logged."""
    sse, _ = eventstream_app(app)
    publish(app, sse, "before")
    client = app.test_client()
    if by == "header":
        # Sent as it is: these strings are the latin-1 text WSGI carries.
        rv = client.get("/events?channel=a", headers={"Last-Event-ID": last_event_id})
    else:
        rv = resume_request(client, by, last_event_id)
    with rv:
        assert rv.status_code == 400, rv.get_data()[:300]
        if by != "listen":
            # listen() raises BadRequest: the app chooses how it looks.
            assert rv.mimetype == "text/plain"
            assert rv.get_data(as_text=True).strip()
    assert warnings_logged(caplog) == []
    assert stats(app)["subscriptions"] == 0


def resumed(app: Flask, sse: EventStream, channel: str, last_id: str) -> list[t.Any]:
    """(event, data) of what a client resuming from ``last_id`` gets first:
    everything before a marker published once it is subscribed."""
    headers = {"Last-Event-ID": last_id}
    with app.test_client().get(f"/events?channel={channel}", headers=headers) as rv:
        assert rv.status_code == 200, rv.data
        with app.app_context():
            marker = sse.publish("marker", channel=channel)
        events: list[tuple[str | None, t.Any]] = []
        while True:
            (event,) = read_events(rv, 1, timeout=5)
            if event.id == marker:
                return events
            events.append((event.event, event.data))


#: Ids an app may give its events: each kind makes the id of the n-th event.
CUSTOM_IDS: dict[str, cabc.Callable[[int], str]] = {
    "database-key": lambda n: f"order-{n}",
    "uuid": lambda n: f"0b7c6a1e-3f0e-4a43-9a54-{n:012d}",
    "counter": lambda n: str(n),
    # Looks like an id the broker gives, but is the app's own.
    "broker-like": lambda n: f"{n}-0",
    "unicode": lambda n: f"évènement {n} ☃",
}


def custom_id_resumes_after_its_event(
    app: Flask, kind: str, channels: list[str]
) -> None:
    """A client that comes back with an id the app gave gets exactly the
    events published after the event that carried it, on all its channels,
    while another thread goes on publishing: no gap, no duplicate."""
    sse, _ = eventstream_app(app)
    make_id = CUSTOM_IDS[kind]
    published: list[tuple[str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def publish_one(n: int) -> None:
        channel = channels[n % len(channels)]
        with app.app_context(), lock:
            published.append(
                (sse.publish(f"event {n}", id=make_id(n), channel=channel), channel)
            )

    for n in range(10):
        publish_one(n)

    def burst() -> None:
        n = 10
        # Fewer than a channel keeps, so the id resumed from stays in history.
        while not stop.is_set() and n < 900:
            publish_one(n)
            n += 1

    publisher = threading.Thread(target=burst)
    publisher.start()
    try:
        resume_from = make_id(4)
        query = "&".join(f"channel={c}" for c in channels)
        header = resume_from.encode().decode("latin-1")
        with app.test_client().get(
            f"/events?{query}", headers={"Last-Event-ID": header}, buffered=False
        ) as rv:
            assert rv.status_code == 200
            # Let the burst run on while the stream replays and goes live.
            got = read_events(rv, 20, timeout=10)
            stop.set()
            publisher.join(10)
            with app.app_context():
                marker = sse.publish("marker", channel=channels[0])
            while got[-1].id != marker:
                more = read_events(rv, 1, timeout=10)
                assert more, "the stream ended before the marker"
                got += more
    finally:
        stop.set()
        publisher.join(10)
    expected = [id for id, _ in published[5:]] + [marker]
    assert [e.id for e in got] == expected
    assert RESET not in {e.event for e in got}


def given_ids_are_found_while_in_history(app: Flask) -> None:
    """An id the app gave is found while its event is in history (the latest
    event that carried it, if it was reused), then reset; a bad one is
    refused and stores nothing."""
    sse, _ = eventstream_app(app, EVENTSTREAM_HISTORY=3)
    client = app.test_client()
    marks = iter(range(100))

    def replayed(last_id: str) -> list[str | None]:
        # Ended by a marker on a channel of its own, which adds nothing to
        # channel a's history.
        mark = f"mark{next(marks)}"
        headers = {"Last-Event-ID": last_id.encode().decode("latin-1")}
        url = f"/events?channel=a&channel={mark}"
        with client.get(url, headers=headers, buffered=False) as rv:
            with app.app_context():
                marker = sse.publish("marker", channel=mark)
            events: list[Event] = []
            while not events or events[-1].id != marker:
                events += read_events(rv, 1)
        return [e.data for e in events[:-1]]

    for n, given in enumerate(["k0", "k1", "dup", "k3", "dup", "k5"]):
        assert publish(app, sse, f"event {n}", id=given) == given
    assert replayed("k0") == ["k0"]  # The reset names the id.
    assert replayed("dup") == ["event 5"]
    assert replayed("k3") == ["event 4", "event 5"]
    # An app's id in the broker's form is still the app's id.
    publish(app, sse, "event 6", id="1-0")
    assert replayed("1-0") == []
    assert replayed("k5") == ["event 6"]
    for bad in ["", "x" * 201]:
        try:
            publish(app, sse, "refused", id=bad)
        except ValueError as e:
            assert "1-200 characters" in str(e)
        else:
            raise AssertionError(f"the id {bad!r} was taken")
    assert replayed("k5") == ["event 6"]


def disconnect_ends_the_streams_of_those_channels(app: Flask) -> None:
    """disconnect("a") ends every stream that listens to a, however it was
    opened, as a cut (no end event: the client reconnects); others go on."""
    sse, _ = eventstream_app(app)
    client = app.test_client()
    urls = ["/events?channel=a", "/events?channel=c&channel=a", *VIEWS.values()]
    ended = [client.get(url, buffered=False) for url in urls]
    kept = client.get("/events?channel=b&channel=c", buffered=False)
    try:
        assert settled(app, len(urls) + 1) == len(urls) + 1
        with app.app_context():
            sse.disconnect("a")
        for url, rv in zip(urls, ended, strict=True):
            # Ended, within the timeout, with no event at all.
            assert read_events(rv, 1, timeout=10) == [], url
        assert settled(app, 1) == 1
        with app.app_context():
            sse.publish("still here", channel="b")
        assert [e.data for e in read_events(kept, 1)] == ["still here"]
    finally:
        for rv in [*ended, kept]:
            rv.close()
