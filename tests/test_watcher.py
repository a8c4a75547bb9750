"""The per-process watcher, with threads and real sockets."""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
import typing as t

import pytest

from flask_eventstream import watcher as watcher_module
from flask_eventstream.concurrency import ThreadBackend
from flask_eventstream.concurrency import THREADS
from flask_eventstream.watcher import Watcher


class FakeStream:
    def __init__(self, sock: socket.socket | None, send_timeout: float | None = None):
        self.socket = sock
        self.send_timeout = send_timeout
        self.writing_since: float | None = None
        self.interrupted = threading.Event()
        self.reason: str | None = None

    def interrupt(self, reason: str) -> None:
        self.reason = reason
        self.interrupted.set()


class FailingBackend(ThreadBackend):
    """Threads, but the watcher's first ``failures`` waits raise."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []
        self.healed = threading.Event()

    def wait_readable(self, fd: int, timeout: float) -> None:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise RuntimeError("An odd fault in the watch loop.")
        self.healed.set()
        super().wait_readable(fd, timeout)


@pytest.fixture
def pair() -> t.Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def test_client_hangup_interrupts_its_stream_only(
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
        assert gone.interrupted.wait(5)
        assert gone.reason == "client_left"
        assert not staying.interrupted.is_set()
    finally:
        watcher.discard(gone)
        watcher.discard(staying)
        other_server.close()
        other_client.close()
    assert len(watcher) == 0


def test_hangup_is_seen_with_descriptors_above_1024(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The thread backend's watcher works when its epoll's fd is over 1024."""
    server_side, client_side = pair
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held: list[int] = []
    try:
        # Fill the low descriptors, so that the watcher's epoll gets a high one.
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        watcher = Watcher(THREADS)
        stream = FakeStream(server_side)
        watcher.add(stream)
        try:
            client_side.close()
            assert stream.interrupted.wait(5)
        finally:
            watcher.discard(stream)
    finally:
        for fd in held:
            os.close(fd)


def test_watch_loop_backs_off_and_carries_on_when_ticks_fail(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A tick that raises is logged and retried after a pause, not in a spin."""
    server_side, client_side = pair
    backend = FailingBackend(failures=2)
    watcher = Watcher(backend)
    stream = FakeStream(server_side)
    with caplog.at_level(logging.ERROR, logger="flask_eventstream.watcher"):
        watcher.add(stream)
        try:
            assert backend.healed.wait(10)
            client_side.close()
            assert stream.interrupted.wait(5)
        finally:
            watcher.discard(stream)
    first, second, healed = backend.calls[:3]
    assert min(second - first, healed - second) >= 0.25, backend.calls[:3]
    assert len(caplog.records) == 2


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
        assert stream.interrupted.wait(5)
        assert stream.reason == "send_timeout"
        # The peer sees the end of the stream: the socket was shut down.
        client_side.settimeout(5)
        assert client_side.recv(1) == b""
    finally:
        watcher.discard(stream)


def test_cut_logs_one_info_line_and_ends_the_watch(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A cut is one INFO line, however long the server takes to close."""
    server_side, _ = pair
    watcher = Watcher(THREADS)
    # A server that never closes the response: the write stays stalled.
    stream = FakeStream(server_side, send_timeout=0.2)
    stream.writing_since = time.monotonic()
    with caplog.at_level(logging.INFO, logger="flask_eventstream.watcher"):
        watcher.add(stream)
        try:
            assert stream.interrupted.wait(5)
            assert len(watcher) == 0
        finally:
            watcher.discard(stream)
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "0.2 s" in caplog.records[0].getMessage()


def test_write_that_finishes_in_time_is_left_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Only a write that is still in progress past the timeout is cut."""
    server_side, _ = pair
    watcher = Watcher(THREADS)
    stream = FakeStream(server_side, send_timeout=0.2)
    watcher.add(stream)
    try:
        assert not stream.interrupted.wait(watcher_module.TICK_SECONDS * 2 + 0.3)
    finally:
        watcher.discard(stream)


def test_worker_shutdown_interrupts_every_stream(
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
        assert all(stream.interrupted.wait(5) for stream in streams)
        assert {stream.reason for stream in streams} == {"shutdown"}
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
