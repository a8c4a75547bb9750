"""``@stream_events`` under real servers: gunicorn gevent and gthread, Werkzeug."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
import typing as t

import pytest
import requests

from flask_eventstream.testing import parse

from .servers import open_stream
from .servers import read_until
from .servers import serve
from .servers import Server
from .servers import wait_for

pytestmark = pytest.mark.e2e

KINDS = ["gevent", "gthread", "werkzeug"]
# The test app's writes stall for good once a client stops reading; a short
# send timeout lets the tests see the stream dropped.
ENV = {"SEND_TIMEOUT": "1"}
# A send timeout that a slow reader's whole event would overrun many times,
# and the library's log lines in the server's output.
SLOW_ENV = {"SEND_TIMEOUT": "2", "LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest) -> t.Iterator[Server]:
    with serve(request.param, env=ENV) as running:
        yield running


@pytest.fixture
def gevent_server() -> t.Iterator[Server]:
    with serve("gevent", env=ENV) as running:
        yield running


@pytest.fixture
def slow_gevent_server() -> t.Iterator[Server]:
    with serve("gevent", env=SLOW_ENV) as running:
        yield running


def test_example_stream_has_sse_headers(server: Server) -> None:
    """The stream is 200 text/event-stream with no-cache and no buffering."""
    with requests.get(f"{server.url}/stream", stream=True, timeout=10) as rv:
        assert rv.status_code == 200
        assert rv.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert rv.headers["Cache-Control"] == "no-cache"
        assert rv.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in rv.headers


def test_requests_iter_lines_reads_the_example_events(server: Server) -> None:
    """The classic ``requests`` client reads the demo's events line by line."""
    lines: list[str] = []
    with requests.get(f"{server.url}/stream", stream=True, timeout=10) as rv:
        for line in rv.iter_lines(decode_unicode=True):
            lines.append(t.cast(str, line))
            if line == "data: Hello, world! (1)":
                break
    assert lines == [
        ": stream opened",
        "event: foo",
        "id: 0",
        "data: Hello, world! (0)",
        "",
        "event: foo",
        "id: 1",
        "data: Hello, world! (1)",
    ]


def test_curl_reads_the_example_events(server: Server) -> None:
    """``curl -sN`` shows the events as they come."""
    result = subprocess.run(
        ["curl", "-sN", "--max-time", "2.5", f"{server.url}/stream"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    # 28 is curl's "operation timed out": the stream never ends by itself.
    assert result.returncode == 28, result.stderr
    events = list(parse(result.stdout))
    assert [e.data for e in events[:2]] == ["Hello, world! (0)", "Hello, world! (1)"]
    assert {e.event for e in events} == {"foo"}


def test_first_comment_then_keepalives_while_generator_is_silent(
    server: Server,
) -> None:
    """The opening comment comes at once, then a keep-alive every interval."""
    with open_stream(server.port, "/quiet") as sock:
        head = read_until(sock, b": stream opened\n")
        body = read_until(sock, b": keep-alive\n")
        body += read_until(sock, b": keep-alive\n")
    assert head.index(b": stream opened\n") > head.index(b"\r\n\r\n")
    assert b"data:" not in head + body


def test_head_sends_headers_only_and_never_starts_the_generator(
    server: Server,
) -> None:
    """HEAD is answered with the stream's headers and no body."""
    started = server.state()["started"]
    rv = requests.head(f"{server.url}/silent", timeout=10)
    assert rv.status_code == 200
    assert rv.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert rv.content == b""
    assert server.state()["started"] == started


def test_disconnect_closes_generator_within_two_seconds_under_gevent(
    gevent_server: Server,
) -> None:
    """A client that leaves a silent stream ends it at once under gevent."""
    server = gevent_server
    before = server.state()
    sock = open_stream(server.port, "/silent")
    read_until(sock, b": stream opened\n")
    wait_for(lambda: server.state()["started"] == before["started"] + 1, 5, "start")
    sock.close()
    wait_for(
        lambda: server.state()["finished"] == before["finished"] + 1,
        2.0,
        "the silent generator's finally ran (keep_alive is 15 s)",
    )


def test_disconnect_closes_generator_within_keepalive_under_threads(
    server: Server,
) -> None:
    """Under threads the generator ends by its next yield after a disconnect."""
    # A stream of an earlier test may still be ending, and would be counted
    # as this one's.
    wait_for(
        lambda: (s := server.state())["started"] == s["finished"],
        5,
        "the earlier tests' generators ended",
    )
    before = server.state()
    sock = open_stream(server.port, "/polling")
    read_until(sock, b": stream opened\n")
    wait_for(lambda: server.state()["started"] == before["started"] + 1, 5, "start")
    sock.close()
    # keep_alive is 2 s on this stream; a small margin on top.
    wait_for(
        lambda: server.state()["finished"] == before["finished"] + 1,
        3.0,
        "the generator's finally ran",
    )


def test_client_that_never_reads_is_dropped_after_send_timeout(
    server: Server,
) -> None:
    """A stalled write ends the stream after EVENTSTREAM_SEND_TIMEOUT."""
    before = server.state()
    sock = open_stream(server.port, "/large", rcvbuf=4096)
    try:
        wait_for(
            lambda: server.state()["finished"] == before["finished"] + 1,
            20,
            "the stalled stream was dropped and its finally ran",
        )
    finally:
        sock.close()
    assert server.state()["watched"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_hangup_ends_stream_when_the_server_holds_over_1024_descriptors(
    kind: str,
) -> None:
    """A busy server's watcher still sees a client leave, whatever its fd."""
    with serve(kind, env={"HOLD_FDS": "1100"}) as server:
        before = server.state()
        sock = open_stream(server.port, "/idle")
        try:
            read_until(sock, b": stream opened\n")
            wait_for(
                lambda: server.state()["started"] == before["started"] + 1, 5, "start"
            )
            # The watcher's epoll was made after the app filled the low fds.
            assert max(_epoll_fds(before["pid"])) >= 1024
        finally:
            sock.close()
        wait_for(
            lambda: server.state()["finished"] == before["finished"] + 1,
            3.0,
            "the idle generator's finally ran (keep_alive is 15 s)",
        )


def test_slow_steady_reader_gets_a_big_event_whole(
    slow_gevent_server: Server,
) -> None:
    """A client that reads a big event slowly but steadily is not cut."""
    server, size = slow_gevent_server, 6_000_000
    # About 15 s for the event, many times the send timeout; and slow enough
    # that the server's send buffer, megabytes by now, drains by a third (when
    # the kernel would wake a blocked send) only over several timeouts.
    with open_stream(server.port, f"/big?size={size}", rcvbuf=16384) as sock:
        raw = _read_paced(sock, b"\n\n\r\n", bytes_per_second=400_000, timeout=25)
    events = list(parse(_dechunk(raw.partition(b"\r\n\r\n")[2])))
    assert [len(e.data or "") for e in events] == [size]
    assert "flask_eventstream" not in server.output()


@pytest.mark.parametrize("kind", KINDS)
def test_client_that_stops_reading_is_cut_with_one_info_line(kind: str) -> None:
    """A client that takes nothing is cut after the send timeout, quietly."""
    with serve(kind, env=SLOW_ENV) as server:
        before = server.state()
        with open_stream(server.port, "/big?size=10000000", rcvbuf=16384) as sock:
            read_until(sock, b": stream opened\n")
            wait_for(
                lambda: server.state()["finished"] == before["finished"] + 1,
                15,
                "the stalled stream was cut and its finally ran",
            )
        output = server.output()
    assert "Traceback" not in output, output
    assert "ERROR" not in output, output
    ours = [line for line in output.splitlines() if "flask_eventstream" in line]
    assert len(ours) == 1, output
    assert ours[0].startswith("INFO "), output


def test_sigterm_ends_100_open_streams_promptly() -> None:
    """A graceful stop ends every stream at once; clients see a clean end."""
    with serve("gevent", env=ENV) as server:
        pid = server.state()["pid"]
        socks = [open_stream(server.port, "/silent") for _ in range(100)]
        for sock in socks:
            read_until(sock, b": stream opened\n")
        wait_for(lambda: server.state()["watched"] == 100, 10, "100 streams open")
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            tails = [_read_to_eof(sock, deadline=start + 10) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        elapsed = time.monotonic() - start
        # The chunked body's last chunk: the server ended the stream itself.
        assert all(tail.endswith(b"0\r\n\r\n") for tail in tails)
        assert elapsed < 5, f"streams took {elapsed:.1f} s to end"
        # The worker exits long before its 30 s graceful timeout.
        wait_for(lambda: not _alive(pid), 5, "the worker exited")
        # The master replaces it; stopping the server mid-boot would be slow.
        wait_for(lambda: _replaced(server, pid), 10, "a new worker took over")


def test_connect_disconnect_cycles_leave_no_greenlet_or_thread(
    gevent_server: Server,
) -> None:
    """200 connect and disconnect cycles leave the worker as it was."""
    server = gevent_server
    # One cycle first, so lazily created objects count in the baseline.
    _cycle(server.port)
    wait_for(lambda: server.state()["watched"] == 0, 5, "no stream left open")
    baseline = server.state()
    for _ in range(200):
        _cycle(server.port)
    wait_for(
        lambda: _settled(server.state(), baseline),
        10,
        f"greenlets and threads back to {baseline}",
    )
    after = server.state()
    assert after["finished"] == after["started"] == baseline["started"] + 200


def test_500_concurrent_streams_on_one_gevent_worker(gevent_server: Server) -> None:
    """One gevent worker serves 500 streams at once, each gets its events."""
    socks = [open_stream(gevent_server.port, "/stream") for _ in range(500)]
    try:
        received = _read_all(socks, b"data: Hello, world! (1)\n", timeout=30)
        assert received == len(socks)
        assert gevent_server.state()["watched"] == 500
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: gevent_server.state()["watched"] == 0, 10, "all streams closed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _replaced(server: Server, pid: int) -> bool:
    try:
        return bool(server.state()["pid"] != pid)
    except requests.RequestException:
        return False


def _cycle(port: int) -> None:
    with open_stream(port, "/silent") as sock:
        read_until(sock, b": stream opened\n")


def _settled(state: dict[str, t.Any], baseline: dict[str, t.Any]) -> bool:
    keys = ("watched", "greenlets", "threads")
    return all(state[key] == baseline[key] for key in keys)


def _epoll_fds(pid: int) -> list[int]:
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[eventpoll]":
                fds.append(int(name))
    return fds


def _read_paced(
    sock: socket.socket, marker: bytes, bytes_per_second: int, timeout: float
) -> bytes:
    """Read at about ``bytes_per_second`` until the data ends with ``marker``."""
    data = bytearray()
    start = time.monotonic()
    while not data.endswith(marker):
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise TimeoutError(f"{len(data)} bytes arrived in {timeout} s.")
        # Pacing, not waiting for anything: this is how slowly the client reads.
        ahead = len(data) / bytes_per_second - elapsed
        if ahead > 0:
            time.sleep(ahead)
            continue
        sock.settimeout(timeout - elapsed)
        chunk = sock.recv(16384)
        if not chunk:
            raise EOFError(
                f"The stream was cut after {elapsed:.1f} s; {len(data)} bytes"
                f" arrived, at {len(data) / max(elapsed, 0.001) / 1000:.0f} KB/s."
            )
        data += chunk
    return bytes(data)


def _dechunk(body: bytes) -> bytes:
    """Return the data of the complete chunks of a chunked HTTP body."""
    parts, pos = [], 0
    while (end := body.find(b"\r\n", pos)) >= 0:
        size = int(body[pos:end], 16)
        parts.append(body[end + 2 : end + 2 + size])
        pos = end + 2 + size + 2
    return b"".join(parts)


def _read_to_eof(sock: socket.socket, deadline: float) -> bytes:
    data = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def _read_all(socks: list[socket.socket], marker: bytes, timeout: float) -> int:
    """Read every socket until ``marker``; return how many saw it."""
    pending = {sock.fileno(): sock for sock in socks}
    buffers = dict.fromkeys(pending, b"")
    done = 0
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            chunk = pending[fd].recv(65536)
            buffers[fd] += chunk
            if marker in buffers[fd] or not chunk:
                done += bool(chunk)
                poller.unregister(fd)
                del pending[fd]
    return done
