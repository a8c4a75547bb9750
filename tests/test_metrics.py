"""Prometheus metrics: counts under real gunicorn workers, the exposition
format, and a package that works without prometheus_client."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import typing as t

import pytest
import requests
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from flask_eventstream import EventStream
from flask_eventstream import metrics
from flask_eventstream import stream_events
from flask_eventstream.testing import read_events

from .redis_server import redis_server
from .servers import EventClient
from .servers import open_stream
from .servers import ROOT
from .servers import serve
from .servers import Server
from .servers import wait_for

if t.TYPE_CHECKING:
    from flask_eventstream.brokers.fanout import Subscription
    from flask_eventstream.metrics import CloseReason
    from flask_eventstream.metrics import Kind

APP = "tests.apps.metered:create_app()"
#: Small, so that a burst of events overflows a subscription at once.
QUEUE_SIZE = 8
#: Streams of the blueprint one worker holds before it refuses more.
MAX_CONNECTIONS = 3
#: Events published to the client that does not read.
BURST = 50
ENV = {
    "QUEUE_SIZE": str(QUEUE_SIZE),
    "MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "SEND_TIMEOUT": "1",
}


def closed(reason: str) -> str:
    """The key of the count of streams closed for ``reason``."""
    return f'eventstream_streams_closed_total{{reason="{reason}"}}'


def samples(text: str) -> dict[str, float]:
    """Every sample of an exposition, by name and labels as they are written."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = (
                sample.value
            )
    return found


def scrape(server: Server) -> dict[str, float]:
    """The server's ``eventstream_*`` samples, without the creation times."""
    rv = requests.get(f"{server.url}/metrics", timeout=5)
    rv.raise_for_status()
    return {
        k: v
        for k, v in samples(rv.text).items()
        if k.startswith("eventstream_") and "_created" not in k
    }


def wait_for_value(server: Server, key: str, value: float) -> None:
    wait_for(lambda: scrape(server).get(key) == value, 15, f"{key} == {value}")


def open_or_refused(port: int, accept: str) -> socket.socket | int:
    """Open a stream of the blueprint; if refused, close it and return the
    status (200 for the ``retry:`` answer)."""
    sock = open_stream(port, "/events?channel=fill", headers={"Accept": accept})
    data = _read_to(sock, b"", b"\r\n\r\n")
    status = int(data.split(b" ", 2)[1])
    head = data.partition(b"\r\n\r\n")[0].lower()
    if status == 200 and b"transfer-encoding: chunked" in head:
        _read_to(sock, data, b"stream opened")
        return sock
    sock.close()
    return status


def _read_to(sock: socket.socket, data: bytes, marker: bytes) -> bytes:
    # The socket has a timeout of its own (open_stream), so this cannot hang.
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"The stream ended before {marker!r}; got {data[-300:]!r}")
        data += chunk
    return data


def fill_until_refused(port: int, accept: str, held: list[socket.socket]) -> int:
    """Open streams until one is refused; return its status."""
    # Each worker takes MAX_CONNECTIONS, so two workers refuse by the 7th.
    for _ in range(2 * MAX_CONNECTIONS + 1):
        opened = open_or_refused(port, accept)
        if isinstance(opened, int):
            return opened
        held.append(opened)
    raise AssertionError(f"No stream was refused after {len(held)} were opened.")


def publish(server: Server, channel: str, count: int, size: int = 1) -> list[str]:
    rv = requests.post(
        f"{server.url}/publish/{channel}?count={count}&size={size}", timeout=30
    )
    rv.raise_for_status()
    return t.cast(list[str], rv.json()["ids"])


def play_scenario(server: Server, broker: str) -> dict[str, float]:
    """Run every way a stream starts and ends once; return what was counted
    beyond the expected values, which it asserts."""
    port = server.port
    # Over the limit: 503 for a client that is not an EventSource, 200 with
    # only a retry delay for one that is.
    held: list[socket.socket] = []
    assert fill_until_refused(port, "*/*", held) == 503
    assert fill_until_refused(port, "text/event-stream", held) == 200
    filled = len(held)
    for sock in held:
        sock.close()
    wait_for_value(
        server, 'eventstream_streams_closed_total{reason="client_left"}', filled
    )

    # Two readers of one channel: each event is delivered to both.
    a = EventClient(port, "/events?channel=room")
    b = EventClient(port, "/events?channel=room")
    ids = publish(server, "room", 5)
    assert [e.id for e in a.read(5)] == ids
    assert [e.id for e in b.read(5)] == ids
    counted = scrape(server)
    assert counted['eventstream_streams_open{kind="blueprint"}'] == 2
    assert counted["eventstream_subscriptions"] == 2
    assert counted["eventstream_events_delivered_total"] == 10
    a.close()
    wait_for_value(server, "eventstream_subscriptions", 1)

    # A client that reads nothing falls the whole queue behind and is dropped.
    slow = open_stream(port, "/events?channel=slow", rcvbuf=4096)
    try:
        _read_to(slow, b"", b"stream opened")
        publish(server, "slow", BURST, size=65536)
        wait_for_value(server, "eventstream_subscriptions", 1)
    finally:
        slow.close()
    wait_for_value(
        server, 'eventstream_streams_closed_total{reason="slow_consumer"}', 1
    )
    delivered = scrape(server)["eventstream_events_delivered_total"] - 10
    # The client's socket takes a few events before it is full, and its
    # queue as many again before the stream is dropped.
    assert QUEUE_SIZE <= delivered < BURST

    # An id the broker never issued gets a reset; a known one, a replay.
    reset = EventClient(port, "/events?channel=room", last_event_id="1-0")
    assert reset.read(1)[0].event == "eventstream.reset"
    reset.close()
    replay = EventClient(port, "/events?channel=room", last_event_id=ids[1])
    assert [e.id for e in replay.read(3)] == ids[2:]
    replay.close()

    # Views: one returns, one raises, one reaches its max_age.
    for path, last in [
        ("/finite", "eventstream.end"),
        ("/failing", "eventstream.error"),
    ]:
        view = EventClient(port, path)
        assert view.read(10)[-1].event == last and view.ended
        view.close()
    aged = EventClient(port, "/aged")
    assert [e.data for e in aged.read(10)] == ["first"] and aged.ended
    aged.close()

    # A view's client that stops reading is cut after the send timeout.
    large = open_stream(port, "/large", rcvbuf=4096)
    try:
        _read_to(large, b"", b"stream opened")
        wait_for_value(
            server, 'eventstream_streams_closed_total{reason="send_timeout"}', 1
        )
    finally:
        large.close()
    b.close()

    def all_closed() -> float:
        counted = scrape(server)
        return sum(v for k, v in counted.items() if "streams_closed_total" in k)

    wait_for(lambda: all_closed() == filled + 9, 15, "every stream closed")
    expected: dict[str, float] = {
        'eventstream_streams_open{kind="blueprint"}': 0,
        'eventstream_streams_open{kind="view"}': 0,
        "eventstream_subscriptions": 0,
        f'eventstream_events_published_total{{broker="{broker}"}}': 5 + BURST,
        "eventstream_events_delivered_total": 10 + delivered,
        'eventstream_streams_closed_total{reason="client_left"}': filled + 4,
        'eventstream_streams_closed_total{reason="send_timeout"}': 1,
        'eventstream_streams_closed_total{reason="slow_consumer"}': 1,
        'eventstream_streams_closed_total{reason="max_age"}': 1,
        'eventstream_streams_closed_total{reason="shutdown"}': 0,
        'eventstream_streams_closed_total{reason="error"}': 1,
        'eventstream_streams_closed_total{reason="end"}': 1,
        "eventstream_replays_total": 1,
        "eventstream_resets_total": 1,
        'eventstream_refused_total{status="200"}': 1,
        'eventstream_refused_total{status="503"}': 1,
        'eventstream_refused_total{status="400"}': 0,
        'eventstream_refused_total{status="403"}': 0,
        "eventstream_broker_errors_total": 0,
    }
    counted = scrape(server)
    assert {k: counted.get(k) for k in expected} == expected
    return {k: v for k, v in counted.items() if k not in expected}


def check_exposition(text: str) -> None:
    """``promtool check metrics`` finds nothing wrong with ``text``."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed; it comes with Debian's 'prometheus'"
            " package: apt-get install prometheus"
        )
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.e2e
def test_counts_match_a_scripted_scenario_under_one_gevent_worker() -> None:
    """Each open, close (for each reason), publish, delivery, replay, reset
    and refusal of one worker is counted once, under its label."""
    with serve("gevent", app=APP, env=ENV, ready="/ready") as server:
        rest = play_scenario(server, "memory")
        assert rest['eventstream_events_published_total{broker="redis"}'] == 0
        assert rest["eventstream_reader_lag_seconds_count"] == 0
        check_exposition(requests.get(f"{server.url}/metrics", timeout=5).text)


@pytest.mark.e2e
def test_counts_are_summed_over_two_workers_in_multiprocess_mode() -> None:
    """With PROMETHEUS_MULTIPROC_DIR, the view sums every worker's counts;
    a graceful stop ends open streams as shutdown."""
    with redis_server() as redis, tempfile.TemporaryDirectory() as directory:
        env = {
            **ENV,
            "BROKER_URL": redis.url,
            "PROMETHEUS_MULTIPROC_DIR": directory,
        }
        with serve("gevent", app=APP, env=env, ready="/ready", workers=2) as server:
            rest = play_scenario(server, "redis")
            # Each event reached the reader of a worker with a subscriber.
            assert rest["eventstream_reader_lag_seconds_count"] >= 5 + QUEUE_SIZE
            check_exposition(requests.get(f"{server.url}/metrics", timeout=5).text)
            staying = EventClient(server.port, "/events?channel=room")
        staying.close()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        after = {
            f"{s.name}{s.labels}": s.value
            for family in registry.collect()
            for s in family.samples
        }
        assert after["eventstream_streams_closed_total{'reason': 'shutdown'}"] == 1


class Recorder(metrics.Hooks):
    """Hooks that keep what streams report, with no prometheus_client."""

    def __init__(self) -> None:
        self.streams: list[tuple[str, Kind, CloseReason | None]] = []

    def stream_opened(self, kind: Kind) -> None:
        self.streams.append(("opened", kind, None))

    def stream_closed(self, kind: Kind, reason: CloseReason) -> None:
        self.streams.append(("closed", kind, reason))


def test_streams_of_views_and_of_the_blueprint_have_their_kind(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blueprint's endpoint is ``blueprint``; a view, even one that
    returns a subscription, is ``view``; a client that left, ``client_left``."""
    recorder = Recorder()
    monkeypatch.setattr(metrics, "hooks", recorder)
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")

    @app.get("/mine")
    @stream_events
    def mine() -> Subscription:
        return sse.listen("mine")

    @app.get("/finite")
    @stream_events
    def finite() -> t.Iterator[str]:
        yield "x"

    client = app.test_client()
    for path in ["/events?channel=mine", "/mine"]:
        with client.get(path) as rv:
            with app.app_context():
                sse.publish("x", channel="mine")
            assert [e.data for e in read_events(rv, 1)] == ["x"]
    with client.get("/finite") as rv:
        assert read_events(rv, 5)[-1].event == "eventstream.end"
    assert recorder.streams == [
        ("opened", "blueprint", None),
        ("closed", "blueprint", "client_left"),
        ("opened", "view", None),
        ("closed", "view", "client_left"),
        ("opened", "view", None),
        ("closed", "view", "end"),
    ]


def run_python(*parts: str) -> str:
    """Run the code ``parts`` in a fresh interpreter from the project's root."""
    code = "\n".join(textwrap.dedent(part) for part in parts)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# Streams of the blueprint and of a view, a publish and a replay.
STREAMS = """
from flask import Flask
from flask_eventstream import EventStream, stream_events
from flask_eventstream.testing import read_events

app = Flask(__name__)
sse = EventStream()
app.register_blueprint(sse, url_prefix="/events")

@app.get("/view")
@stream_events
def view():
    yield "x"

client = app.test_client()
with client.get("/view") as rv:
    assert read_events(rv, 2)[-1].event == "eventstream.end"
with client.get("/events?channel=a&lastEventId=1-0") as rv:
    with app.app_context():
        sse.publish("y", channel="a")
    assert [e.data for e in read_events(rv, 2)][1] == "y"
"""


def test_package_works_without_prometheus_client() -> None:
    """Without prometheus_client the package imports and streams; turning
    metrics on then names the extra to install."""
    out = run_python(
        """
        import sys
        sys.modules["prometheus_client"] = None
        """,
        STREAMS,
        """
        import flask_eventstream
        ways = [(True, EventStream()), (False, EventStream(metrics=True))]
        for config, blueprint in ways:
            on = Flask("on")
            on.config["EVENTSTREAM_METRICS"] = config
            try:
                on.register_blueprint(blueprint, url_prefix="/events")
            except ImportError as e:
                print(e)
        try:
            flask_eventstream.metrics_view()
        except ImportError as e:
            print(e)
        """,
    )
    message = "Install 'flask-eventstream[metrics]'."
    assert out.count(message) == 3, out


def test_nothing_is_registered_with_metrics_off() -> None:
    """With metrics off, prometheus_client is never imported, and its
    registry holds nothing of the package."""
    out = run_python(
        STREAMS,
        """
        import sys
        print("prometheus_client" in sys.modules)
        from prometheus_client import REGISTRY
        print([m.name for m in REGISTRY.collect() if "eventstream" in m.name])
        """,
    )
    assert out.split("\n")[:2] == ["False", "[]"]


@pytest.mark.parametrize("metrics_on", ["yes", 1, None])
def test_metrics_argument_must_be_a_bool(metrics_on: t.Any) -> None:
    """EventStream(metrics=...) takes True or False only."""
    with pytest.raises(TypeError, match="'metrics' is True or False"):
        EventStream(metrics=metrics_on)
