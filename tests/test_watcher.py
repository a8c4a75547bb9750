"""The per-process watcher, with threads and real sockets."""

from __future__ import annotations

import socket
import threading
import time
import typing as t

import pytest

from flask_eventstream import watcher as watcher_module
from flask_eventstream.concurrency import THREADS
from flask_eventstream.watcher import Watcher


class FakeStream:
    def __init__(self, sock: socket.socket | None, send_timeout: float | None = None):
        self.socket = sock
        self.send_timeout = send_timeout
        self.writing_since: float | None = None
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()


@pytest.fixture
def pair() -> t.Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def test_client_hangup_aborts_its_stream_only(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A peer that closes wakes its own stream and no other."""
    server_side, client_side = pair
    other_server, other_client = socket.socketpair()
    watcher = Watcher(THREADS)
    gone, staying = FakeStream(server_side), FakeStream(other_server)
    try:
        watcher.add(gone)
        watcher.add(staying)
        client_side.close()
        assert gone.aborted.wait(5)
        assert not staying.aborted.is_set()
    finally:
        watcher.discard(gone)
        watcher.discard(staying)
        other_server.close()
        other_client.close()
    assert len(watcher) == 0


def test_stalled_write_is_cut_after_send_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A write in progress for longer than the send timeout shuts the socket."""
    server_side, client_side = pair
    watcher = Watcher(THREADS)
    stream = FakeStream(server_side, send_timeout=0.2)
    stream.writing_since = time.monotonic()
    watcher.add(stream)
    try:
        assert stream.aborted.wait(5)
        # The peer sees the end of the stream: the socket was shut down.
        client_side.settimeout(5)
        assert client_side.recv(1) == b""
    finally:
        watcher.discard(stream)


def test_write_that_finishes_in_time_is_left_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Only a write that is still in progress past the timeout is cut."""
    server_side, _ = pair
    watcher = Watcher(THREADS)
    stream = FakeStream(server_side, send_timeout=0.2)
    watcher.add(stream)
    try:
        assert not stream.aborted.wait(watcher_module.TICK_SECONDS * 2 + 0.3)
    finally:
        watcher.discard(stream)


def test_worker_shutdown_aborts_every_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the gunicorn worker stops being alive, all its streams end."""

    class Worker:
        alive = True

    worker = Worker()
    monkeypatch.setattr(watcher_module, "_gunicorn_worker", lambda: worker)
    watcher = Watcher(THREADS)
    streams = [FakeStream(None) for _ in range(3)]
    for stream in streams:
        watcher.add(stream)
    try:
        worker.alive = False
        assert all(stream.aborted.wait(5) for stream in streams)
    finally:
        for stream in streams:
            watcher.discard(stream)


def test_loop_stops_when_no_stream_is_left(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The watcher thread runs only while streams are open."""
    watcher = Watcher(THREADS)
    before = set(threading.enumerate())
    stream = FakeStream(pair[0])
    watcher.add(stream)
    (loop,) = set(threading.enumerate()) - before
    watcher.discard(stream)
    loop.join(5)
    assert not loop.is_alive()
