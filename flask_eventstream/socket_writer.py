"""A stream that writes its own socket, under gunicorn's gevent worker.

Through WSGI, each event costs a switch into the stream's greenlet, to take
it from its queue, and a pass through gunicorn's write path. Most streams
wait with nothing queued when an event comes, so for those the fan-out
holds the event's bytes, and as soon as the publisher lets the loop run,
one flush writes them to each socket with a write that never waits: one
system call per stream however many events came meanwhile, and no greenlet
woken. Only what a socket does not take (a slow client, a full buffer) is
left to the stream, which writes it first, waiting as usual, under its send
timeout. The stream writes everything else itself too, framed as gunicorn
frames a chunk: gunicorn sends the head, the opening comment and the last
chunk.

This is done only where the library knows the socket and the framing:
gunicorn's own ``gevent`` worker, HTTP/1.x over plain TCP, with gunicorn
itself iterating the body (no WSGI middleware in between).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
import typing as t

from .concurrency import current_backend
from .concurrency import os_lock
from .watcher import SEND_SLICE_BYTES

if t.TYPE_CHECKING:
    import collections.abc as cabc
    import socket
    import types

    from _typeshed.wsgi import StartResponse

    from .concurrency import GeventBackend

_CRLF = b"\r\n"


class SocketWriter:
    """Writes the body of one response to its socket, chunked for HTTP/1.1.

    :param sock: the response's socket, whose descriptor is non-blocking.
    :param chunked: whether the server frames the body in chunks.
    :param flusher: what writes held bytes once the publisher lets it.
    """

    __slots__ = ("_chunked", "_fd", "_flusher", "_held", "_socket", "rest", "wrote_at")

    def __init__(self, sock: socket.socket, chunked: bool, flusher: Flusher) -> None:
        self._socket = sock
        self._fd = sock.fileno()
        self._chunked = chunked
        self._flusher = flusher
        # Events published for the stream since the last flush.
        self._held: list[bytes] = []
        #: What the socket did not take at once; it goes before anything else.
        self.rest = b""
        #: When held bytes were last written, for keep-alives.
        self.wrote_at = 0.0

    def _framed(self, data: bytes) -> list[bytes]:
        if not self._chunked:
            return [data]
        return [b"%x\r\n" % len(data), data, _CRLF]

    @property
    def held(self) -> int:
        """How many events wait for the next flush."""
        return len(self._held)

    def hold(self, data: bytes, write_held: cabc.Callable[[], None]) -> None:
        """Keep ``data`` until the flusher calls ``write_held``, which calls
        :meth:`write_held` if nothing else writes to the socket by then."""
        if not data:
            # An empty chunk would end the response.
            return
        if not self._held:
            self._flusher.add(write_held)
        self._held.append(data)

    def write_held(self) -> bool:
        """Write what is held, in one write that never waits; False if the
        socket did not take all of it, whose rest is then :attr:`rest`.

        Any thread may call it; the caller makes sure that nothing else
        writes to the socket meanwhile.
        """
        if not self._held:
            return True
        held = self._held
        # However many events, one chunk: the client's parser sees a stream.
        parts = self._framed(held[0] if len(held) == 1 else b"".join(held))
        held.clear()
        try:
            sent = os.writev(self._fd, parts)
        except OSError:
            # A full buffer, or a client that left: the stream's own write
            # waits for the one and meets the other again.
            sent = 0
        if sent == sum(map(len, parts)):
            self.wrote_at = time.monotonic()
            return True
        self.rest = b"".join(parts)[sent:]
        return False

    def take_held(self) -> None:
        """Make what is held the :attr:`rest`, for the stream to send: it
        woke before the flusher ran."""
        if self._held:
            self.rest += b"".join(self._framed(b"".join(self._held)))
            self._held.clear()

    def write(self, data: bytes, progress: cabc.Callable[[], None]) -> None:
        """Write :attr:`rest`, then ``data``, waiting for the socket to take
        them; ``progress`` is called before each slice.

        :raises OSError: if the client left, or the stream was cut.
        """
        out = b"".join([self.rest, *self._framed(data)]) if data else self.rest
        self.rest = b""
        if len(out) <= SEND_SLICE_BYTES:
            progress()
            self._socket.sendall(out)
            return
        # In slices, each of which the send timeout counts as progress.
        view = memoryview(out)
        for start in range(0, len(out), SEND_SLICE_BYTES):
            progress()
            self._socket.sendall(view[start : start + SEND_SLICE_BYTES])


class Flusher:
    """Writes the events held for idle streams once the publisher lets the
    loop run: one write per stream, however many events were published
    meanwhile, so a burst costs a system call per stream, not per event.

    One per process, in the hub's thread; a publisher in another thread
    hands the work over to it.
    """

    def __init__(self, backend: GeventBackend) -> None:
        self._backend = backend
        self._lock = os_lock()
        self._due: list[cabc.Callable[[], None]] = []

    def add(self, write_held: cabc.Callable[[], None]) -> None:
        """Call ``write_held`` with the others at the next flush."""
        with self._lock:
            self._due.append(write_held)
            first = len(self._due) == 1
        if first:
            self._backend.call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for write_held in due:
            write_held()


_flushers: dict[int, Flusher] = {}


def writer_for(start_response: StartResponse) -> SocketWriter | None:
    """A writer for the response of ``start_response``, once it was called,
    if the library may write its socket itself; else None."""
    wsgi = sys.modules.get("gunicorn.http.wsgi")
    response: t.Any = getattr(start_response, "__self__", None)
    if wsgi is None or type(response) is not wsgi.Response:
        return None
    gevent_socket = sys.modules.get("gevent.socket")
    sock = response.sock
    if (
        current_backend().name != "gevent"
        or gevent_socket is None
        or type(sock) is not gevent_socket.socket  # TLS wraps it
        or getattr(response.cfg, "protocol", "http") != "http"
        or response.response_length is not None
    ):
        return None
    try:
        if not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK:
            return None
    except OSError:
        return None
    backend = t.cast("GeventBackend", current_backend())
    if os.getpid() not in _flushers:
        _flushers.clear()
        _flushers[os.getpid()] = Flusher(backend)
    return SocketWriter(sock, response.chunked, _flushers[os.getpid()])


def iterated_by_server(caller: types.FrameType | None) -> bool:
    """Whether ``caller``, the frame that asked a body for its next chunk,
    is gunicorn's request loop, and not a WSGI middleware that would miss
    what the library writes itself."""
    name = caller.f_globals.get("__name__") if caller is not None else None
    return name == "gunicorn.workers.base_async"
