"""One watcher per process, a greenlet or thread, for every open stream.

A stream does not read its socket, so it would learn that its client left
only at its next write. The watcher holds the sockets of all open streams in
one epoll set, for peer hang-up only, and interrupts a stream whose client
has gone. Each tick it also cuts streams whose client took nothing for their
send timeout, and interrupts every stream once the gunicorn worker is told
to stop, so clients reconnect to a live worker at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time
import typing as t

from .concurrency import epoll
from .concurrency import os_lock

if t.TYPE_CHECKING:
    from .concurrency import Backend
    from .metrics import CloseReason

logger = logging.getLogger(__name__)

#: How often stalled writes and worker shutdown are checked.
TICK_SECONDS = 0.5
#: The watch loop pauses a tick more after each failed tick, up to this many.
MAX_BACKOFF_TICKS = 10
#: The grain of the send timeout: a body hands its server at most this much
#: at once, and a socket holds at most this much unsent (see ``Watcher.add``),
#: so a client that takes this much within the timeout keeps its stream.
SEND_SLICE_BYTES = 64 * 1024


class Watched(t.Protocol):
    """What the watcher needs from an open stream."""

    socket: socket.socket | None
    send_timeout: float | None
    writing_since: float | None

    def interrupt(self, reason: CloseReason) -> None:
        """End the stream at its next wake-up, for ``reason``; never block."""


class Watcher:
    """Watches the streams of one process; ``backend`` runs the loop."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._lock = os_lock()
        # Each stream with the descriptor it was registered under, kept
        # because the server may have closed the socket by the time the
        # stream is discarded.
        self._streams: dict[Watched, int | None] = {}
        self._by_fd: dict[int, Watched] = {}
        self._poller: select.epoll | None = None
        self._pid = os.getpid()
        self._worker: t.Any = None

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def running(self) -> bool:
        """Whether the watch loop runs; it stops a tick after the last stream."""
        return self._poller is not None

    def add(self, stream: Watched) -> None:
        """Start watching ``stream``; start the loop if it is not running."""
        with self._lock:
            if self._pid != os.getpid():
                # A forked child inherits the parent's state but not its loop.
                self._streams.clear()
                self._by_fd.clear()
                self._poller = None
                self._pid = os.getpid()
            if self._poller is None:
                self._poller = epoll()
                self._worker = _gunicorn_worker()
                self._backend.spawn(self._run, "eventstream-watcher")
            fd = _fileno(stream.socket)
            if fd is not None:
                # A blocked send wakes only once a third of the send buffer
                # (which grows to megabytes) is free, so a slow reader could
                # take data for longer than the send timeout before its send
                # sees progress; little unsent data makes it wake per slice.
                with contextlib.suppress(OSError):
                    t.cast(socket.socket, stream.socket).setsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SEND_SLICE_BYTES
                    )
                try:
                    self._poller.register(fd, select.EPOLLRDHUP)
                except FileExistsError:
                    # A stream that ended without being discarded left it.
                    self._poller.modify(fd, select.EPOLLRDHUP)
                self._by_fd[fd] = stream
            self._streams[stream] = fd

    def discard(self, stream: Watched) -> None:
        """Stop watching ``stream``."""
        with self._lock:
            fd = self._streams.pop(stream, None)
            if fd is not None and self._by_fd.get(fd) is stream:
                del self._by_fd[fd]
                self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        # The descriptor is gone from the set already if it was closed.
        if self._poller is not None:
            with contextlib.suppress(OSError):
                self._poller.unregister(fd)

    def _run(self) -> None:
        backoff = 0
        while True:
            with self._lock:
                poller = self._poller
                if poller is None or not self._streams:
                    if poller is not None:
                        poller.close()
                    self._poller = None
                    return
            try:
                self._tick(poller)
                backoff = 0
            except Exception:
                # The loop serves every stream of the process: it must not
                # die of one odd socket, nor spin on a fault that stays. The
                # backend's event sleeps right whatever gevent has patched.
                backoff = min(backoff + 1, MAX_BACKOFF_TICKS)
                logger.exception("The event stream watcher failed a tick.")
                self._backend.event().wait(backoff * TICK_SECONDS)

    def _tick(self, poller: select.epoll) -> None:
        self._backend.wait_readable(poller.fileno(), TICK_SECONDS)
        hung_up = []
        with self._lock:
            # Only hang-ups are registered, so every event is one.
            for fd, _mask in poller.poll(0):
                self._unregister(fd)
                stream = self._by_fd.pop(fd, None)
                if stream is not None:
                    hung_up.append(stream)
            streams = list(self._streams)
        for stream in hung_up:
            stream.interrupt("client_left")
        self._check(streams)

    def _check(self, streams: list[Watched]) -> None:
        stopping = self._worker is not None and not self._worker.alive
        now = time.monotonic()
        for stream in streams:
            if stopping:
                stream.interrupt("shutdown")
                continue
            since, limit = stream.writing_since, stream.send_timeout
            if since is not None and limit is not None and now - since > limit:
                # Once: the server may take a tick to close the response.
                self.discard(stream)
                _cut(stream)


def _fileno(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except OSError:
        return None
    return fd if fd >= 0 else None


def _cut(stream: Watched) -> None:
    logger.info("A client took nothing for %s s; stream ended.", stream.send_timeout)
    stream.interrupt("send_timeout")
    # Shutting the socket down fails the server's blocked send with EPIPE,
    # which servers take for a client that left, and the server then closes
    # the response, which closes the generator. It is done through a socket
    # object of its own on a duplicate descriptor: the server's own object,
    # under gevent, would also cancel the send's wait with EBADF, which
    # gunicorn logs as an error, with a traceback.
    if (fd := _fileno(stream.socket)) is not None:
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as dup:
            dup.shutdown(socket.SHUT_RDWR)


def _gunicorn_worker() -> t.Any:
    # gunicorn's SIGTERM handler is a bound method of the worker, whose
    # ``alive`` flag turns false when a graceful stop begins.
    base = sys.modules.get("gunicorn.workers.base")
    if base is None:
        return None
    worker = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return worker if isinstance(worker, base.Worker) else None


_watchers: dict[str, Watcher] = {}


def watcher_for(backend: Backend) -> Watcher:
    """Return the process's watcher for ``backend``."""
    if backend.name not in _watchers:
        _watchers[backend.name] = Watcher(backend)
    return _watchers[backend.name]
