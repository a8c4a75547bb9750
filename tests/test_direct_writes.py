"""Events written straight to idle streams' sockets under gunicorn's gevent
worker, and the rest through the stream's own queue.

The fan-out writes an event to a waiting stream's socket itself, framed as
gunicorn would; what the socket does not take is written by the stream,
before anything queued after it. These tests hold real clients against a
real ``gunicorn -k gevent`` and check the bytes on the wire.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import typing as t

import pytest
import requests

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask_eventstream.brokers.base import Message
    from flask_eventstream.brokers.fanout import Subscription

from flask_eventstream.concurrency import Mailbox
from flask_eventstream.concurrency import THREADS
from flask_eventstream.event import Event
from flask_eventstream.parser import EventParser
from flask_eventstream.socket_writer import Frames
from flask_eventstream.socket_writer import SocketWriter
from tests.servers import EventClient
from tests.servers import open_stream
from tests.servers import serve
from tests.servers import Server
from tests.servers import wait_for

OPENING = b": stream opened\n"
SEND_TIMEOUT = 2
ACCESS_LOG = "--access-logfile - --access-logformat 'access %(r)s %(s)s %(B)s'"


@pytest.fixture(scope="module")
def server() -> t.Iterator[Server]:
    env = {
        "GUNICORN_CMD_ARGS": ACCESS_LOG,
        "LOG_LEVEL": "INFO",
        "FLASK_EVENTSTREAM_SEND_TIMEOUT": str(SEND_TIMEOUT),
        "FLASK_EVENTSTREAM_KEEPALIVE": "1",
    }
    with serve("gevent", env=env) as server:
        yield server


def publish(server: Server, channel: str, data: str) -> None:
    rv = requests.post(
        f"{server.url}/publish", data={"channel": channel, "data": data}, timeout=30
    )
    rv.raise_for_status()


def subscribers(server: Server, channel: str) -> int:
    rv = requests.get(f"{server.url}/subscribers", timeout=5)
    return int(rv.json().get(channel, 0))


def dechunk(body: bytes) -> bytes:
    """The data of a chunked body, checking every size line and CRLF."""
    out, view = [], memoryview(body)
    while view:
        size_end = bytes(view[:20]).index(b"\r\n")
        size = int(bytes(view[:size_end]), 16)
        assert size > 0, "an empty chunk would end the response"
        start = size_end + 2
        assert bytes(view[start + size : start + size + 2]) == b"\r\n"
        out.append(bytes(view[start : start + size]))
        view = view[start + size + 2 :]
    return b"".join(out)


class SlowReader:
    """A client with a small receive buffer that reads a little at a time,
    in a thread of its own, until it has ``until`` or its deadline passes."""

    def __init__(self, port: int, path: str, until: bytes, pause: float) -> None:
        self.sock = open_stream(port, path, rcvbuf=4096)
        self.received = bytearray()
        self._until, self._pause = until, pause
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        checked = 0
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            self.received += data
            if self._until in self.received[max(0, checked - len(self._until)) :]:
                return
            checked = len(self.received)
            time.sleep(self._pause)

    def body(self, timeout: float) -> bytes:
        """The de-chunked body received, once reading has stopped."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the reader did not get everything"
        head, _, body = bytes(self.received).partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        return dechunk(body)


def _numbers(events: list[Event]) -> list[int]:
    return [int(e.data.split(" ", 1)[0]) for e in events]


def test_events_to_an_idle_stream_are_written_past_gunicorn(server: Server) -> None:
    # gunicorn writes the head and the opening comment; the events go to the
    # socket from the library, so gunicorn's access log counts only those.
    client = EventClient(server.port, "/events?channel=direct.log")
    for n in range(5):
        publish(server, "direct.log", f"event {n}")
    assert [e.data for e in client.read(5)] == [f"event {n}" for n in range(5)]
    client.close()
    line = "access GET /events?channel=direct.log HTTP/1.1 200"
    wait_for(lambda: line in server.output(), 10, "the stream's access log line")
    logged = re.search(re.escape(line) + r" (\d+)", server.output())
    assert logged is not None
    assert int(logged[1]) == len(OPENING)


def test_middleware_that_wraps_the_body_sees_every_event() -> None:
    with serve("gevent", env={"WRAP_BODY": "1"}) as server:
        client = EventClient(server.port, "/events?channel=direct.wrapped")
        before = server.state()["wrapped_bytes"]["/events"]
        for n in range(5):
            publish(server, "direct.wrapped", f"event {n}")
        events = client.read(5)
        client.close()
        assert [e.data for e in events] == [f"event {n}" for n in range(5)]
        # The middleware passed on every event's bytes, not just the opening.
        passed = server.state()["wrapped_bytes"]["/events"] - before
        assert passed >= sum(len(f"data: {e.data}\n\n") for e in events)


def test_http_1_0_client_gets_the_events_unframed(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        b"GET /events?channel=direct.h10 HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n"
    )
    received = b""
    while OPENING not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    big = "b" * 3_000_000  # more than the socket takes at once
    sent = ["small", big, "after the big one"]
    for text in sent:
        publish(server, "direct.h10", text)
    while not body.endswith(b"data: after the big one\n\n"):
        data = sock.recv(1 << 20)
        assert data, "the stream ended early"
        body += data
    sock.close()
    # The events as they are, without a chunk's size or CRLF around them.
    assert body.startswith(OPENING)
    assert b"\r" not in body
    assert [e.data for e in EventParser().feed(body)] == sent


def test_http_1_1_client_gets_whole_chunks(server: Server) -> None:
    sock = open_stream(server.port, "/events?channel=direct.h11")
    big = "c" * 3_000_000
    sent = ["small", big, "after the big one", "last"]
    received = b""
    while OPENING not in received:
        received += sock.recv(65536)
    for text in sent:
        publish(server, "direct.h11", text)
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    while True:
        # Whole chunks only: the last event's chunk ends the check.
        if body.endswith(b"data: last\n\n\r\n"):
            break
        data = sock.recv(1 << 20)
        assert data, "the stream ended early"
        body += data
    sock.close()
    events = dechunk(body)
    assert events.startswith(OPENING)
    assert [e.data for e in EventParser().feed(events)] == sent


def test_burst_reaches_idle_and_slow_subscribers_whole_in_order_once(
    server: Server,
) -> None:
    count, size = 300, 4000
    path = "/events?channel=direct.burst"
    fast = [EventClient(server.port, path) for _ in range(40)]
    last = f"data: {count - 1} {'x' * size}\n\n".encode()
    slow = [SlowReader(server.port, path, last, pause=0.01) for _ in range(4)]
    wait_for(lambda: subscribers(server, "direct.burst") == 44, 10, "44 streams")
    rv = requests.post(
        f"{server.url}/burst",
        data={"channel": "direct.burst", "count": count, "size": size},
        timeout=30,
    )
    assert rv.json() == {"published": count}
    results: list[list[int]] = [[] for _ in fast]

    def read(n: int) -> None:
        results[n] = _numbers(fast[n].read(count, timeout=30))

    threads = [threading.Thread(target=read, args=(n,)) for n in range(len(fast))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    for client in fast:
        client.close()
    assert all(r == list(range(count)) for r in results), [len(r) for r in results]
    for reader in slow:
        events = EventParser().feed(reader.body(timeout=60))
        reader.sock.close()
        # Comments are not events: keep-alives may come between the events.
        assert _numbers(events) == list(range(count))
        assert [e.id for e in events] == [str(n) for n in range(count)]


def test_subscriber_that_leaves_mid_write_ends_alone(server: Server) -> None:
    path = "/events?channel=direct.leave"
    staying = EventClient(server.port, path)
    leaving = open_stream(server.port, path, rcvbuf=4096)
    wait_for(lambda: subscribers(server, "direct.leave") == 2, 10, "2 streams")
    publish(server, "direct.leave", "l" * 4_000_000)
    taken = 0
    while taken < 100_000:
        taken += len(leaving.recv(65536))
    # Closing with unread data resets the connection mid-write.
    leaving.close()
    wait_for(lambda: subscribers(server, "direct.leave") == 1, 10, "1 stream left")
    publish(server, "direct.leave", "next")
    events = staying.read(2, timeout=20)
    staying.close()
    assert [len(e.data) for e in events] == [4_000_000, 4]
    assert "Traceback" not in server.output()
    assert "ERROR" not in server.output()


def test_stalled_subscriber_is_cut_by_the_send_timeout(server: Server) -> None:
    path = "/events?channel=direct.stall"
    reading = EventClient(server.port, path)
    stalled = open_stream(server.port, path, rcvbuf=4096)
    wait_for(lambda: subscribers(server, "direct.stall") == 2, 10, "2 streams")
    cuts = server.output().count("took nothing for")
    publish(server, "direct.stall", "s" * 4_000_000)
    reader = threading.Thread(target=reading.read, args=(2, 30))
    reader.start()
    took = wait_for(
        lambda: subscribers(server, "direct.stall") == 1, 15, "the stalled stream cut"
    )
    assert took >= SEND_TIMEOUT - 0.5
    publish(server, "direct.stall", "next")
    reader.join(30)
    assert [len(e.data) for e in reading.events] == [4_000_000, 4]
    reading.close()
    stalled.close()
    output = server.output()
    assert output.count("took nothing for") == cuts + 1
    assert "Traceback" not in output


def test_stream_fed_by_direct_writes_sends_no_keep_alive(server: Server) -> None:
    # The blueprint's keep-alive is 1 s here: a stream that gets an event
    # every 0.3 s is never silent that long, one that gets none is.
    busy = open_stream(server.port, "/events?channel=direct.busy")
    quiet = open_stream(server.port, "/events?channel=direct.quiet")
    wait_for(lambda: subscribers(server, "direct.busy") == 1, 10, "the busy stream")
    for n in range(10):
        publish(server, "direct.busy", f"tick {n}")
        time.sleep(0.3)

    def body(sock: socket.socket) -> bytes:
        sock.settimeout(0.5)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
        sock.close()
        return dechunk(data.partition(b"\r\n\r\n")[2])

    assert body(busy).count(b": keep-alive\n") == 0
    assert body(quiet).count(b": keep-alive\n") >= 2


def _pair(buffer: int = 4096) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    ours.settimeout(5)  # non-blocking underneath, as under gevent
    return ours, theirs


def _recv_now(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 20, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class IdleTaker:
    """A stream's side of a mailbox with a writer, waiting idle in a thread."""

    def __init__(self, sock: socket.socket, size: int = 100) -> None:
        self.writer = SocketWriter(sock, chunked=True)
        self.mailbox: Mailbox[bytes] = Mailbox(THREADS, size)
        self.mailbox.write_through(self.writer)
        self.taken: list[bytes] = []
        self._thread = threading.Thread(target=self._take)
        self._thread.start()
        wait_for(lambda: self.mailbox._taker_idle, 5, "the taker waits")

    def _take(self) -> None:
        self.taken = self.mailbox.take(5, idle=True)

    def offer(self, *chunks: bytes) -> int:
        return self.mailbox.offer(list(chunks), Frames.join(list(chunks), 0.0))

    def join(self) -> list[bytes]:
        self._thread.join(10)
        return self.taken + self.mailbox.take(0)


def test_events_offered_together_go_out_in_one_chunk_without_waking() -> None:
    ours, theirs = _pair()
    taker = IdleTaker(ours)
    assert taker.offer(b"one\n\n") == 1
    assert _recv_now(theirs) == b"5\r\none\n\n\r\n"
    assert taker.offer(b"two\n\n", b"three\n\n") == 2
    assert _recv_now(theirs) == b"c\r\ntwo\n\nthree\n\n\r\n"
    # Nothing was queued: the taker still waits.
    assert taker._thread.is_alive() and len(taker.mailbox) == 0
    taker.mailbox.close()
    assert taker.join() == []
    ours.close()
    theirs.close()


def test_what_the_socket_does_not_take_goes_before_what_is_queued() -> None:
    ours, theirs = _pair()
    taker = IdleTaker(ours)
    big = b"B" * 200_000
    assert taker.offer(b"small", big) == 2
    assert taker.writer.rest, "a socket buffer of a few KiB took 200 kB"
    # The taker is woken for the rest; later chunks are queued behind it.
    assert taker.offer(b"later") == 1
    assert taker.join() == [b"later"]
    received = bytearray()

    def drain() -> None:
        while not received.endswith(b"later\r\n"):
            received.extend(theirs.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    taker.writer.write(b"later", lambda: None)
    reader.join(10)
    assert dechunk(bytes(received)) == b"small" + big + b"later"
    ours.close()
    theirs.close()


def test_more_events_than_the_queue_size_are_queued_up_to_it() -> None:
    # A burst to a stream that may fall 3 events behind: not written, as
    # the client could not keep up with it either; 3 are queued for the
    # stream to send before it ends.
    ours, theirs = _pair()
    taker = IdleTaker(ours, size=3)
    assert taker.offer(*[b"%d" % n for n in range(6)]) == 3
    assert _recv_now(theirs) == b""
    assert taker.join() == [b"0", b"1", b"2"]
    ours.close()
    theirs.close()


def test_empty_chunk_is_never_written() -> None:
    ours, theirs = _pair()
    taker = IdleTaker(ours)
    assert taker.offer(b"") == 1
    assert taker.offer(Event().encode()) == 1
    assert taker.offer(b"x") == 1
    assert _recv_now(theirs) == b"1\r\nx\r\n"
    taker.mailbox.close()
    taker.join()
    ours.close()
    theirs.close()


class Streams:
    """Subscriptions of a memory broker under a gevent backend, each read
    by a greenlet that waits idle, as a stream's body does, and written to
    directly through a socket pair."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, count: int, channel: str = "c"
    ) -> None:
        from flask_eventstream.brokers.memory import MemoryBroker
        from flask_eventstream.concurrency import GeventBackend

        self.backend = GeventBackend()
        for module in ("brokers.fanout", "concurrency"):
            monkeypatch.setattr(
                f"flask_eventstream.{module}.current_backend", lambda: self.backend
            )
        self.broker = MemoryBroker()
        self.subs: list[Subscription] = []
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.takers: list[t.Any] = []
        for _ in range(count):
            self.subscribe(channel)
        self.wait_until(self.idle, "every stream to wait idle")

    def wait_until(self, done: cabc.Callable[[], bool], what: str) -> None:
        """Let the loop run until ``done()``; fail, naming ``what``, if that
        takes more than 5 s."""
        import gevent

        deadline = time.monotonic() + 5
        while not done():
            assert time.monotonic() < deadline, f"waited 5 s for {what}"
            gevent.sleep(0.001)

    def idle(self, *subs: Subscription) -> bool:
        """Whether the greenlets reading ``subs`` (default: all) wait idle."""
        return all(self.mailbox(sub)._taker_idle for sub in subs or self.subs)

    def flushed(self) -> None:
        """Let the loop run until the fan-out's flush has finished."""
        fanout = self.broker.fanout
        self.wait_until(lambda: fanout._flushing_in is None, "the flush to finish")

    @staticmethod
    def mailbox(sub: Subscription) -> Mailbox[Message]:
        assert sub._mailbox is not None
        return sub._mailbox

    def subscribe(
        self, *channels: str, last_id: str | None = None, idle: bool = True
    ) -> Subscription:
        import gevent

        from flask_eventstream.brokers.fanout import Subscription

        ours, theirs = _pair(1 << 20)
        sub = Subscription(self.broker, channels, last_id, 1000)
        sub.start(self.backend)
        sub.write_through(SocketWriter(ours, chunked=False))
        self.subs.append(sub)
        self.pairs.append((ours, theirs))
        if idle:
            self.takers.append(gevent.spawn(sub.take, 30))
        return sub

    def publish(self, channel: str, data: str) -> str:
        return self.broker.publish(channel, Event(data, id=None))

    def received(self, index: int) -> list[str]:
        parser = EventParser()
        return [e.data for e in parser.feed(_recv_now(self.pairs[index][1]))]

    def close(self) -> None:
        import gevent

        for sub in self.subs:
            sub.close()
        gevent.joinall(self.takers, timeout=5)
        for ours, theirs in self.pairs:
            ours.close()
            theirs.close()


@pytest.fixture
def streams(monkeypatch: pytest.MonkeyPatch) -> t.Iterator[Streams]:
    made = Streams(monkeypatch, 250)
    yield made
    made.close()


def test_events_published_before_the_loop_runs_go_out_in_one_write(
    streams: Streams,
) -> None:
    for n in range(3):
        streams.publish("c", f"e{n}")
    # Nothing is written while the publisher runs: it has not waited yet.
    assert streams.received(0) == []
    streams.flushed()
    for index in range(len(streams.subs)):
        assert streams.received(index) == ["e0", "e1", "e2"]
    # The streams' greenlets were never woken.
    assert not any(taker.dead for taker in streams.takers)


def test_events_published_during_a_flush_reach_the_rest_of_it(
    streams: Streams, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask_eventstream.brokers.fanout import FLUSH_SLICE
    from flask_eventstream.brokers.fanout import Subscription

    assert len(streams.subs) > 2 * FLUSH_SLICE
    let_others_run = streams.backend.let_others_run
    pauses: list[int] = []
    deliver = Subscription.deliver
    writes: dict[int, list[list[str]]] = {id(sub): [] for sub in streams.subs}

    def publisher_runs() -> None:
        # A publishing request, answered while the flush lets the loop run
        # after its first slice.
        if not pauses:
            streams.publish("c", "second")
        pauses.append(len(pauses))
        let_others_run()

    def recorded(sub: Subscription, messages: list[Message], frames: Frames) -> int:
        writes[id(sub)].append([m.event.data for m in messages])
        return deliver(sub, messages, frames)

    monkeypatch.setattr(streams.backend, "let_others_run", publisher_runs)
    monkeypatch.setattr(Subscription, "deliver", recorded)
    streams.publish("c", "first")
    streams.flushed()
    got = [streams.received(index) for index in range(len(streams.subs))]
    assert got == [["first", "second"]] * len(streams.subs)
    # The subscriptions of the first slice get the second event at the end
    # of the flush; the others get both events in one write.
    served_first = [[["first"], ["second"]]] * FLUSH_SLICE
    rest = [[["first", "second"]]] * (len(streams.subs) - FLUSH_SLICE)
    assert sorted(writes.values(), key=len, reverse=True) == served_first + rest
    # One flush: 250 + 100 deliveries in slices of 100.
    assert len(pauses) == 4


def test_a_flush_adds_new_events_in_order_for_every_kind_of_subscription(
    streams: Streams, monkeypatch: pytest.MonkeyPatch
) -> None:
    both = streams.subscribe("c", "d")
    streams.wait_until(lambda: streams.idle(both), "the new stream to wait idle")
    let_others_run = streams.backend.let_others_run
    late: list[Subscription] = []

    def publisher_runs() -> None:
        if not late:
            late.append(streams.subscribe("c", idle=False))
            streams.publish("d", "second")
            streams.publish("c", "third")
        let_others_run()

    monkeypatch.setattr(streams.backend, "let_others_run", publisher_runs)
    streams.publish("c", "first")
    streams.flushed()
    # The subscription to both channels, served last, gets the three in
    # the order they were published.
    assert streams.received(streams.subs.index(both)) == ["first", "second", "third"]
    # Made after "first" was planned: it gets only what came after it.
    assert [m.event.data for m in streams.mailbox(late[0]).take(0)] == ["third"]
    for index in range(streams.subs.index(both)):
        assert streams.received(index) == ["first", "third"]


def test_subscription_made_before_a_flush_gets_no_earlier_event_live(
    streams: Streams,
) -> None:
    before = streams.publish("c", "before")
    streams.flushed()
    assert streams.received(0) == ["before"]
    streams.publish("c", "published")
    # Attached while "published" waits for the flush: it comes in the
    # replay of one, and is older than the other.
    replayed = streams.subscribe("c", last_id=before, idle=False)
    fresh = streams.subscribe("c", idle=False)
    streams.publish("c", "after")
    streams.flushed()
    assert streams.received(0) == ["published", "after"]
    replay = EventParser().feed(b"".join(replayed.take(0)))
    assert [e.data for e in replay] == ["published"]
    assert [m.event.data for m in streams.mailbox(replayed).take(0)] == ["after"]
    assert [m.event.data for m in streams.mailbox(fresh).take(0)] == ["after"]


def test_disconnect_delivers_what_was_published_before(streams: Streams) -> None:
    streams.publish("c", "last words")
    streams.broker.disconnect(["c"])
    streams.wait_until(
        lambda: all(taker.dead for taker in streams.takers), "every stream to end"
    )
    for index in range(len(streams.subs)):
        assert streams.received(index) == ["last words"]


def test_flush_that_fails_is_logged_and_the_next_publish_goes_on(
    streams: Streams, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flask_eventstream.brokers.fanout import Subscription

    deliver = Subscription.deliver
    failures = iter([RuntimeError("a bug")])

    def fails_once(sub: Subscription, *args: t.Any) -> int:
        for error in failures:
            raise error
        return deliver(sub, *args)

    monkeypatch.setattr(Subscription, "deliver", fails_once)
    streams.publish("c", "lost for one")
    streams.flushed()
    assert "Delivering events failed" in caplog.text
    streams.publish("c", "next")
    streams.flushed()
    got = [streams.received(index) for index in range(len(streams.subs))]
    assert sorted(map(len, got)) == [1] + [2] * (len(streams.subs) - 1)
    assert all(events[-1] == "next" for events in got)
