"""The EventStream blueprint with the in-memory broker, in process."""

from __future__ import annotations

import decimal
import gc
import json
import pathlib
import random
import threading
import time
import tracemalloc
import typing as t

import flask
import pytest
from flask import abort
from flask import Flask
from flask import request
from werkzeug.exceptions import BadRequest

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events
from flask_eventstream.body import EventStreamBody
from flask_eventstream.settings import DEFAULTS
from flask_eventstream.settings import EventStreamState
from flask_eventstream.testing import read_events

from . import scenarios

ROOT = pathlib.Path(__file__).resolve().parent.parent

if t.TYPE_CHECKING:
    from flask.testing import FlaskClient
    from werkzeug.test import TestResponse

    from flask_eventstream.brokers.fanout import Subscription


@pytest.fixture
def sse(app: Flask) -> EventStream:
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    return sse


def state(app: Flask) -> EventStreamState:
    return t.cast(EventStreamState, app.extensions["eventstream"])


def publish(app: Flask, sse: EventStream, data: t.Any, **kwargs: t.Any) -> str:
    with app.app_context():
        return sse.publish(data, **kwargs)


def subscribed(client: FlaskClient, url: str, **kwargs: t.Any) -> TestResponse:
    """Open a stream; it is subscribed once the response exists."""
    rv = client.get(url, **kwargs)
    assert rv.status_code == 200, rv.data
    return rv


def test_registration_creates_per_app_state_with_defaults(app: Flask) -> None:
    """Registering fills in every setting and creates the app's broker."""
    app.register_blueprint(EventStream(), url_prefix="/events")
    assert app.config["EVENTSTREAM_HISTORY"] == 1000
    assert app.config["EVENTSTREAM_BROKER_URL"] == "memory://"
    assert state(app).max_channels == 32


def test_subscribe_endpoint_is_the_prefix(app: Flask, sse: EventStream) -> None:
    """Clients subscribe at /events, not /events/."""
    assert app.url_map.bind("").match("/events") == ("eventstream.subscribe", {})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("EVENTSTREAM_HISTORY", 0),
        ("EVENTSTREAM_QUEUE_SIZE", "10"),
        ("EVENTSTREAM_MAX_CHANNELS", True),
        ("EVENTSTREAM_MAX_CONNECTIONS", -1),
        ("EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT", 1.5),
        ("EVENTSTREAM_RETRY", -5),
        ("EVENTSTREAM_MAX_AGE", "soon"),
        ("EVENTSTREAM_BROKER_URL", "mqtt://host"),
        ("EVENTSTREAM_HISTORY_TTL", "abc"),
        ("EVENTSTREAM_HISTORY_TTL", 0),
        ("EVENTSTREAM_HISTORY_TTL", -1),
        ("EVENTSTREAM_KEEPALIVE", "abc"),
        ("EVENTSTREAM_KEEPALIVE", 0),
        ("EVENTSTREAM_SEND_TIMEOUT", "abc"),
        ("EVENTSTREAM_SEND_TIMEOUT", -1),
        ("EVENTSTREAM_KEY_PREFIX", ""),
        ("EVENTSTREAM_KEY_PREFIX", 5),
        ("EVENTSTREAM_BROKER_URL", None),
        ("EVENTSTREAM_KEEP_ALIVE", 10),
        ("EVENTSTREAM_METRICS", "yes"),
    ],
)
def test_bad_config_is_refused_at_registration_naming_the_key(
    app: Flask, key: str, value: t.Any
) -> None:
    """A wrong setting fails early, and the message names it."""
    app.config[key] = value
    with pytest.raises(ValueError, match=key):
        app.register_blueprint(EventStream(), url_prefix="/events")


def test_default_channel_is_sse(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """Without ?channel= a client listens to ``sse``, where publish goes."""
    with subscribed(client, "/events") as rv:
        publish(app, sse, "other", channel="news")
        event_id = publish(app, sse, {"text": "hi"}, event="message")
        (event,) = read_events(rv, 1)
    assert (event.event, event.id, json.loads(event.data)) == (
        "message",
        event_id,
        {"text": "hi"},
    )


def test_channels_are_isolated(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """A subscriber gets its own channels' events and no others."""
    with (
        subscribed(client, "/events?channel=a") as a,
        subscribed(client, "/events?channel=b") as b,
    ):
        for n in range(3):
            publish(app, sse, f"a{n}", channel="a")
            publish(app, sse, f"b{n}", channel="b")
        assert [e.data for e in read_events(a, 3)] == ["a0", "a1", "a2"]
        assert [e.data for e in read_events(b, 3)] == ["b0", "b1", "b2"]


def test_several_channels_in_one_request(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """Repeated ?channel= subscribes to each, in publish order."""
    with subscribed(client, "/events?channel=a&channel=b&channel=a") as rv:
        publish(app, sse, "1", channel="a")
        publish(app, sse, "x", channel="c")
        publish(app, sse, "2", channel="b")
        assert [e.data for e in read_events(rv, 2)] == ["1", "2"]
    assert state(app).broker.stats()["subscriptions"] == 0


@pytest.mark.parametrize(
    ("url", "headers", "message"),
    [
        ("/events?channel=a%20b", {}, "Channel names are 1-200 characters"),
        ("/events?channel=", {}, "Channel names are 1-200 characters"),
        ("/events?channel=" + "x" * 201, {}, "Channel names are 1-200 characters"),
        (
            "/events?" + "&".join(f"channel=c{n}" for n in range(33)),
            {},
            "At most 32 channels",
        ),
        ("/events", {"Last-Event-ID": "\xff\xfe"}, "not valid UTF-8"),
    ],
)
def test_bad_requests_get_400_with_a_plain_message(
    sse: EventStream,
    client: FlaskClient,
    url: str,
    headers: dict[str, str],
    message: str,
) -> None:
    """Invalid channels, too many channels and bad ids are 400, in words."""
    rv = client.get(url, headers=headers)
    assert rv.status_code == 400
    assert rv.mimetype == "text/plain"
    assert message in rv.get_data(as_text=True)


def test_authorize_refuses_with_403_before_streaming(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """The hook is asked per channel; one False refuses the request."""
    asked: list[str] = []

    @sse.authorize
    def may_listen(channel: str) -> bool:
        asked.append(channel)
        return not channel.startswith("private.")

    rv = client.get("/events?channel=public&channel=private.7")
    assert rv.status_code == 403
    assert "'private.7'" in rv.get_data(as_text=True)
    assert asked == ["public", "private.7"]
    assert state(app).streams == 0
    with subscribed(client, "/events?channel=public"):
        pass


def test_max_connections_gives_503_with_retry_after_and_recovers(
    app: Flask, client: FlaskClient
) -> None:
    """Over the cap a client is told to come back; a closed stream frees a slot."""
    app.config["EVENTSTREAM_MAX_CONNECTIONS"] = 2
    app.register_blueprint(EventStream(), url_prefix="/events")
    first = subscribed(client, "/events")
    with subscribed(client, "/events"):
        rv = client.get("/events")
        assert rv.status_code == 503
        assert rv.headers["Retry-After"] == "5"
        first.close()
        with subscribed(client, "/events"):
            assert state(app).streams == 2
    assert state(app).streams == 0


EVENTSOURCE = {"Accept": "text/event-stream"}


@pytest.mark.parametrize(
    "limit", ["EVENTSTREAM_MAX_CONNECTIONS", "EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT"]
)
def test_eventsource_over_a_limit_gets_200_retry_and_the_end(
    app: Flask, client: FlaskClient, limit: str
) -> None:
    """EventSource gives up for good on an error status, so a request that
    accepts text/event-stream is told, in a stream, when to come back; the
    browser reconnects by itself after that many milliseconds, jittered so
    that refused clients do not return together."""
    app.config[limit] = 1
    app.register_blueprint(EventStream(), url_prefix="/events")
    with subscribed(client, "/events"):
        delays = set()
        for _ in range(20):
            rv = client.get("/events", headers=EVENTSOURCE)
            assert rv.status_code == 200
            assert rv.mimetype == "text/event-stream"
            assert rv.headers["Cache-Control"] == "no-cache"
            (line,) = rv.data.splitlines()
            field, _, delay = line.partition(b": ")
            assert field == b"retry" and 4000 <= int(delay) <= 6000
            delays.add(int(delay))
        assert len(delays) > 1
        assert state(app).streams == 1
        # Accepting anything is not asking for an event stream.
        rv = client.get("/events", headers={"Accept": "*/*"})
        assert rv.status_code in (429, 503)
        assert rv.headers["Retry-After"] == "5"
    assert state(app).streams == 0


def from_ip(address: str) -> dict[str, t.Any]:
    return {"environ_base": {"REMOTE_ADDR": address}}


def test_max_connections_per_client_gives_429_by_ip_and_recovers(
    app: Flask, client: FlaskClient
) -> None:
    """Each IP address has its own budget; a closed stream gives one back."""
    app.config["EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT"] = 2
    app.register_blueprint(EventStream(), url_prefix="/events")
    first = subscribed(client, "/events", **from_ip("192.0.2.1"))
    with subscribed(client, "/events", **from_ip("192.0.2.1")):
        rv = client.get("/events", **from_ip("192.0.2.1"))
        assert rv.status_code == 429
        assert rv.headers["Retry-After"] == "5"
        assert rv.mimetype == "text/plain"
        assert b"at most 2" in rv.data
        # Another address is not affected by the first one's streams.
        with subscribed(client, "/events", **from_ip("192.0.2.2")):
            assert state(app).clients == {"192.0.2.1": 2, "192.0.2.2": 1}
        first.close()
        with subscribed(client, "/events", **from_ip("192.0.2.1")):
            assert state(app).streams == 2
    # Nothing is kept for clients that have no stream open.
    assert state(app).clients == {}
    assert state(app).streams == 0


def test_client_key_hook_chooses_what_is_limited(
    app: Flask, client: FlaskClient
) -> None:
    """A registered key replaces the IP address; a key of None is not limited."""
    app.config["EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT"] = 1
    sse = EventStream()

    @sse.client_key
    def by_token() -> str | None:
        return request.args.get("token")

    app.register_blueprint(sse, url_prefix="/events")
    with subscribed(client, "/events?token=a"):
        assert client.get("/events?token=a").status_code == 429
        with (
            subscribed(client, "/events?token=b"),
            subscribed(client, "/events"),
            subscribed(client, "/events"),
        ):
            assert state(app).clients == {"a": 1, "b": 1}
            assert state(app).streams == 4
    assert state(app).clients == {}


def test_per_client_refusal_holds_no_process_slot(
    app: Flask, client: FlaskClient
) -> None:
    """A stream refused for its client is not counted against the process."""
    app.config["EVENTSTREAM_MAX_CONNECTIONS"] = 2
    app.config["EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT"] = 1
    app.register_blueprint(EventStream(), url_prefix="/events")
    with subscribed(client, "/events", **from_ip("192.0.2.1")):
        for _ in range(3):
            assert client.get("/events", **from_ip("192.0.2.1")).status_code == 429
        with subscribed(client, "/events", **from_ip("192.0.2.2")):
            assert client.get("/events", **from_ip("192.0.2.3")).status_code == 503
    assert state(app).streams == 0


def test_head_on_the_endpoint_holds_no_slot(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """HEAD answers with headers only and leaves nothing subscribed."""
    rv = client.head("/events")
    assert rv.status_code == 200
    assert rv.data == b""
    assert state(app).streams == 0


def test_retry_and_max_age_come_from_config(app: Flask, client: FlaskClient) -> None:
    """EVENTSTREAM_RETRY opens the stream; EVENTSTREAM_MAX_AGE ends it."""
    app.config.update(EVENTSTREAM_RETRY=1500, EVENTSTREAM_MAX_AGE=0.2)
    app.register_blueprint(EventStream(), url_prefix="/events")
    with client.get("/events") as rv:
        body = b"".join(t.cast("t.Iterable[bytes]", rv.response))
    assert body == b": stream opened\nretry: 1500\n"
    assert state(app).streams == 0


def test_publish_needs_a_registered_blueprint(app: Flask) -> None:
    """Publishing for an app without the blueprint says what is missing."""
    with app.app_context(), pytest.raises(RuntimeError, match="register"):
        EventStream().publish("x")


def test_publish_checks_its_arguments(app: Flask, sse: EventStream) -> None:
    """Bad channel names and missing data are refused by name."""
    with app.app_context():
        with pytest.raises(ValueError, match="Channel names"):
            sse.publish("x", channel="no spaces")
        with pytest.raises(ValueError, match="'data'"):
            sse.publish(None)
        with pytest.raises(ValueError, match="'event'"):
            sse.publish("x", event="a\nb")


def test_publish_uses_the_apps_json_provider(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """Data goes through the app's JSON provider, e.g. for Decimal."""
    with subscribed(client, "/events") as rv:
        publish(app, sse, {"price": decimal.Decimal("2.50")})
        (event,) = read_events(rv, 1)
    assert json.loads(event.data) == {"price": "2.50"}


def test_custom_view_can_listen(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """``listen()`` in a @stream_events view streams that channel."""

    @app.get("/me")
    @stream_events
    def mine() -> Subscription:
        return sse.listen("user.7")

    with subscribed(client, "/me") as rv:
        publish(app, sse, "not yours", channel="user.8")
        publish(app, sse, "yours", channel="user.7", event="note")
        (event,) = read_events(rv, 1)
    assert (event.event, event.data) == ("note", "yours")
    assert state(app).streams == 0


def test_generator_may_read_a_subscription_and_is_woken_on_close(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """A view can transform a subscription; closing the stream frees it."""

    @app.get("/upper")
    @stream_events
    def upper() -> t.Iterator[str]:
        sub = sse.listen("words")
        return (event.data.upper() for event in sub)

    rv = client.get("/upper")
    publish(app, sse, "hello", channel="words")
    assert [e.data for e in read_events(rv, 1)] == ["HELLO"]
    rv.close()
    # No further publish is needed to let the generator's thread go.
    wait_until(lambda: state(app).streams == 0)
    assert state(app).broker.stats()["subscriptions"] == 0


def test_generator_over_a_subscription_that_is_cut_sends_no_end_event(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """When the broker ends a subscription, a generator reading it returns,
    but its stream was cut, not finished: the client must reconnect, so no
    end event is sent."""

    @app.get("/upper")
    @stream_events
    def upper() -> t.Iterator[str]:
        sub = sse.listen("words")
        return (event.data.upper() for event in sub)

    with client.get("/upper") as rv:
        publish(app, sse, "hello", channel="words")
        assert [e.data for e in read_events(rv, 1)] == ["HELLO"]
        state(app).broker.close()
        # The stream ends (within the timeout) with no further event.
        assert read_events(rv, 1) == []


def wait_until(predicate: t.Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_subscription_unused_by_the_response_is_released(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """A view that listens and then aborts or errors leaks nothing."""

    @app.get("/abort")
    @stream_events
    def aborts() -> Subscription:
        sse.listen("a")
        abort(403)

    @app.get("/error")
    @stream_events
    def fails() -> Subscription:
        sse.listen("a")
        raise RuntimeError("boom")

    assert client.get("/abort").status_code == 403
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert client.get("/error").status_code == 500
    assert state(app).streams == 0
    assert state(app).broker.stats()["subscriptions"] == 0


def test_listen_checks_its_arguments(app: Flask, sse: EventStream) -> None:
    """Bad channel names and too many channels raise ValueError; a bad id is 400."""
    with app.app_context():
        with pytest.raises(ValueError, match="Channel names"):
            sse.listen("a b")
        with pytest.raises(ValueError, match="At most 32"):
            sse.listen(*(f"c{n}" for n in range(33)))
        # As from the endpoint: "7" is an id (unknown, so a reset); this is not.
        with pytest.raises(BadRequest):
            sse.listen("a", last_event_id="x" * 201)


def test_replay_from_header_or_query(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """Last-Event-ID, or ?lastEventId=, replays what came after it."""
    ids = [publish(app, sse, str(n)) for n in range(4)]
    with client.get("/events", headers={"Last-Event-ID": ids[1]}) as rv:
        assert [e.data for e in read_events(rv, 2)] == ["2", "3"]
    with client.get(f"/events?lastEventId={ids[2]}") as rv:
        assert [e.data for e in read_events(rv, 1)] == ["3"]


def test_expired_id_starts_with_reset(app: Flask, client: FlaskClient) -> None:
    """An id older than history gives eventstream.reset, with data, first."""
    app.config["EVENTSTREAM_HISTORY"] = 3
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    ids = [publish(app, sse, str(n)) for n in range(6)]
    with client.get("/events", headers={"Last-Event-ID": ids[0]}) as rv:
        events = read_events(rv, 4)
    assert (events[0].event, events[0].data) == ("eventstream.reset", ids[0])
    assert [e.data for e in events[1:]] == ["3", "4", "5"]


def test_two_apps_never_share_events() -> None:
    """Each app has its own broker, even with one blueprint object."""
    sse = EventStream()
    apps = [Flask(f"app{n}") for n in range(2)]
    for app in apps:
        app.register_blueprint(sse, url_prefix="/events")
    assert state(apps[0]).broker is not state(apps[1]).broker
    clients = [app.test_client() for app in apps]
    with (
        subscribed(clients[0], "/events") as rv0,
        subscribed(clients[1], "/events") as rv1,
    ):
        publish(apps[0], sse, "for app 0")
        publish(apps[1], sse, "for app 1")
        assert [e.data for e in read_events(rv0, 1)] == ["for app 0"]
        assert [e.data for e in read_events(rv1, 1)] == ["for app 1"]
        publish(apps[0], sse, "again 0")
        with pytest.raises(TimeoutError):
            read_events(rv1, 1, timeout=0.3)


def test_reconnects_during_a_burst_see_every_event_once_in_order(
    app: Flask, client: FlaskClient
) -> None:
    """Random reconnects during 10,000 publishes lose and repeat nothing."""
    app.config["EVENTSTREAM_HISTORY"] = 10_000
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    total = 10_000
    wanted = [str(n) for n in range(total) if n % 3 != 2]

    def publisher() -> None:
        with app.app_context():
            for n in range(total):
                sse.publish(str(n), channel="abc"[n % 3])
                if n % 50 == 0:
                    # Let the reader in, so reconnects land inside the burst.
                    time.sleep(0.001)

    rng = random.Random(7)
    seen: list[str] = []
    ids: list[str] = []
    last: dict[str, str] = {}
    thread = threading.Thread(target=publisher)
    reconnects = during_burst = 0
    with subscribed(client, "/events?channel=a&channel=b", headers=last) as rv:
        thread.start()
        while len(seen) < len(wanted):
            count = min(rng.randint(1, 400), len(wanted) - len(seen))
            for event in read_events(rv, count, timeout=10):
                assert event.event == "message"
                seen.append(event.data)
                ids.append(t.cast(str, event.id))
            rv.close()
            reconnects += 1
            during_burst += thread.is_alive()
            rv = client.get(
                "/events?channel=a&channel=b", headers={"Last-Event-ID": ids[-1]}
            )
        rv.close()
    thread.join(10)
    print(f"replay: {reconnects} reconnects, {during_burst} during the burst")
    assert during_burst > 10
    assert seen == wanted
    assert len(set(ids)) == len(ids)


def test_stalled_subscriber_is_dropped_and_memory_stays_bounded(
    app: Flask, client: FlaskClient
) -> None:
    """One client stops reading during 100,000 events; the rest get all."""
    app.config["EVENTSTREAM_HISTORY"] = 100_000
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    broker = state(app).broker
    total = 100_000
    stalled = subscribed(client, "/events")
    (sub,) = broker.fanout._channels["sse"]
    largest_queue = 0
    results: dict[int, list[str]] = {0: [], 1: []}
    reconnects = [0, 0]

    def reader(n: int) -> None:
        # A real client: when the stream ends it reconnects and replays.
        rv = subscribed(client, "/events")
        got = results[n]
        last = ""
        while len(got) < total:
            count = min(5000, total - len(got))
            events = read_events(rv, count, timeout=30)
            got.extend(e.data for e in events)
            last = events[-1].id or "" if events else last
            if len(events) < count:
                rv.close()
                reconnects[n] += 1
                rv = client.get("/events", headers={"Last-Event-ID": last})
        rv.close()

    readers = [threading.Thread(target=reader, args=(n,)) for n in results]
    for thread in readers:
        thread.start()
    while broker.stats()["subscriptions"] < 3:
        threading.Event().wait(0.01)
    with app.app_context():
        for n in range(total):
            sse.publish(str(n))
            if n % 1000 == 0:
                largest_queue = max(largest_queue, len(t.cast(t.Any, sub)._mailbox))
    for thread in readers:
        thread.join(60)
    print(
        f"stalled subscriber: largest queue {largest_queue} of"
        f" {app.config['EVENTSTREAM_QUEUE_SIZE']}; the two readers reconnected"
        f" {reconnects} times and got {[len(r) for r in results.values()]} events"
    )
    assert sub.overflowed
    assert largest_queue <= app.config["EVENTSTREAM_QUEUE_SIZE"]
    assert sub not in broker.fanout._channels.get("sse", set())
    expected = [str(n) for n in range(total)]
    assert results[0] == expected
    assert results[1] == expected
    stalled.close()
    assert state(app).streams == 0


def wait_until_older_than(event_id: str, seconds: float) -> None:
    """Wait until ``event_id`` (``<ms>-<seq>``) is older than ``seconds``."""
    ms = int(event_id.split("-")[0]) + seconds * 1000 + 200
    wait_until(lambda: time.time() * 1000 > ms, seconds + 5)


def test_history_ttl_defaults_to_a_day_and_takes_any_positive_seconds(
    app: Flask,
) -> None:
    """EVENTSTREAM_HISTORY_TTL is 86400 unless set; fractions are allowed."""
    app.register_blueprint(EventStream(), url_prefix="/events")
    assert app.config["EVENTSTREAM_HISTORY_TTL"] == 86400
    for ttl in (0.5, 1, 3600):
        other = Flask(__name__)
        other.config["EVENTSTREAM_HISTORY_TTL"] = ttl
        other.register_blueprint(EventStream(), url_prefix="/events")


def test_quiet_channels_history_is_dropped_after_the_ttl(
    app: Flask, client: FlaskClient
) -> None:
    """An id from a channel quiet for EVENTSTREAM_HISTORY_TTL gets a reset."""
    app.config["EVENTSTREAM_HISTORY_TTL"] = 1
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    with app.app_context():
        ids = [sse.publish("x", channel=f"user.{n}") for n in range(2000)]
    wait_until_older_than(ids[-1], 1)
    recent = publish(app, sse, "elsewhere", channel="other")
    assert scenarios.resumed(app, sse, "user.0", ids[0]) == [
        ("eventstream.reset", ids[0])
    ]
    # A channel with a recent event keeps its history.
    assert scenarios.resumed(app, sse, "other", recent) == []


def test_memory_of_quiet_channels_is_freed_after_the_ttl(app: Flask) -> None:
    """Rounds of 20,000 one-event channels leave nothing behind after the TTL."""
    app.config["EVENTSTREAM_HISTORY_TTL"] = 1
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    channels = 20_000
    tracing = tracemalloc.is_tracing()

    def held() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - start

    def quiet_channels(round: int) -> tuple[int, int]:
        """The most memory held while publishing on new channels, and after."""
        tracemalloc.reset_peak()
        for n in range(channels):
            last = sse.publish("x", channel=f"user.{round}.{n}")
        grown = tracemalloc.get_traced_memory()[1] - start
        wait_until_older_than(last, 1)
        deadline = time.monotonic() + 3
        while True:
            # Expiry may wait for an event, on any channel.
            sse.publish("x", channel="other")
            left = held()
            if left < channels * 100 or time.monotonic() > deadline:
                return grown, left
            time.sleep(0.1)

    with app.app_context():
        sse.publish("x", channel="other")
        if not tracing:
            tracemalloc.start()
        try:
            gc.collect()
            start = tracemalloc.get_traced_memory()[0]
            grown, left = quiet_channels(0)
            # Hash tables may keep the size they grew to; a second round of
            # channels reuses them, and anything kept per channel shows.
            _, left_again = quiet_channels(1)
        finally:
            if not tracing:
                tracemalloc.stop()
    print(
        f"20,000 quiet channels took up to {grown} bytes; {left}, then"
        f" {left_again}, left after the TTL"
    )
    assert grown > 1_000_000
    assert left < channels * 100, f"{left} of {grown} bytes still held after the TTL"
    assert left_again - left < channels * 10, f"{left}, then {left_again} bytes held"


def test_browser_module_is_served_with_its_version_in_the_url(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """url_for names the module's version, so that URL may be cached for long;
    any other is revalidated by its ETag."""
    with app.test_request_context():
        url = flask.url_for("eventstream.script")
    path, _, query = url.partition("?")
    assert path == "/events/eventstream.js" and query.startswith("v=")
    shipped = (ROOT / "flask_eventstream/static/eventstream.js").read_bytes()

    versioned = client.get(url)
    assert versioned.status_code == 200
    assert versioned.mimetype == "text/javascript"
    assert versioned.data == shipped
    assert "immutable" in versioned.headers["Cache-Control"]
    etag = versioned.headers["ETag"]

    plain = client.get(path)
    assert plain.headers["Cache-Control"] == "no-cache"
    assert plain.headers["ETag"] == etag
    again = client.get(path, headers={"If-None-Match": etag})
    assert (again.status_code, again.data) == (304, b"")
    stale = client.get(url.replace("v=", "v=old"))
    assert stale.headers["Cache-Control"] == "no-cache"


def test_every_setting_has_a_bad_value_tested() -> None:
    """Each EVENTSTREAM_* key is among those checked at registration."""
    checked = {
        key
        for mark in test_bad_config_is_refused_at_registration_naming_the_key.pytestmark
        for key, _ in mark.args[1]
    }
    assert set(DEFAULTS) <= checked


def test_blueprint_without_url_prefix_is_refused(app: Flask) -> None:
    """At the site's root, an index view would silently shadow the endpoint."""
    with pytest.raises(ValueError, match="url_prefix"):
        app.register_blueprint(EventStream())
    app.register_blueprint(EventStream(), url_prefix="/")
    assert app.url_map.bind("").match("/") == ("eventstream.subscribe", {})


def test_stream_options_per_blueprint_override_the_config(
    app: Flask, client: FlaskClient
) -> None:
    """keep_alive, heartbeat, retry, max_age and send_timeout per blueprint."""
    app.config.update(EVENTSTREAM_RETRY=1000, EVENTSTREAM_SEND_TIMEOUT=30)
    sse = EventStream(
        keep_alive=0.05,
        heartbeat=Event("beat", event="ping"),
        retry=2500,
        max_age=0.5,
        send_timeout=7,
    )
    app.register_blueprint(sse, url_prefix="/events")
    with client.get("/events", buffered=False) as rv:
        body = b"".join(t.cast("t.Iterable[bytes]", rv.response))
    assert body.startswith(b": stream opened\nretry: 2500\nevent: ping\ndata: beat\n\n")
    assert body.endswith(b"event: ping\ndata: beat\n\n")
    with app.test_request_context("/events"):
        rv = t.cast(flask.Response, app.view_functions["eventstream.subscribe"]())
    assert isinstance(rv.response, EventStreamBody)
    assert rv.response.send_timeout == 7.0
    rv.close()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"keep_alive": "15"}, "keep_alive"),
        ({"max_age": 0}, "max_age"),
        ({"send_timeout": -1}, "send_timeout"),
        ({"retry": 1.5}, "retry"),
        ({"heartbeat": "ping"}, "heartbeat"),
    ],
)
def test_bad_blueprint_options_raise_naming_the_argument(
    kwargs: dict[str, t.Any], name: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=name):
        EventStream(**kwargs)


def test_publish_an_event_as_it_is(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """An Event is published with its own type, id and retry; event=, id= or
    retry= beside it is a TypeError."""
    with subscribed(client, "/events?channel=x") as rv:
        given = publish(
            app, sse, Event({"a": 1}, event="x", id="e-1", retry=5), channel="x"
        )
        (event,) = read_events(rv, 1)
    assert given == "e-1"
    assert (event.event, event.id, event.retry, event.data) == (
        "x",
        "e-1",
        5,
        '{"a": 1}',
    )
    for extra in ({"event": "y"}, {"id": "2"}, {"retry": 1}):
        with pytest.raises(TypeError, match=next(iter(extra))):
            publish(app, sse, Event("x"), **extra)


def test_listen_runs_the_authorize_hook_in_a_request(
    app: Flask, sse: EventStream, client: FlaskClient
) -> None:
    """A view that takes the channel from its URL is checked like the
    endpoint; authorize=False opts out."""

    @sse.authorize
    def only_public(channel: str) -> bool:
        return channel.startswith("public.")

    @app.get("/users/<name>/events")
    @stream_events
    def user_events(name: str) -> Subscription:
        return sse.listen(f"user.{name}")

    @app.get("/trusted/<name>")
    @stream_events
    def trusted(name: str) -> Subscription:
        return sse.listen(f"user.{name}", authorize=False)

    rv = client.get("/users/alice/events")
    assert rv.status_code == 403
    assert state(app).streams == 0
    assert state(app).broker.stats()["subscriptions"] == 0
    with subscribed(client, "/trusted/alice"):
        pass
    # Outside a request there is nobody to ask.
    with app.app_context():
        sse.listen("user.bob").close()
