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


class Flushable(t.Protocol):
    """What writes a writer's held bytes when the flusher says."""

    def write_held(self, now: float) -> object:
        """Write what is held; ``now`` is the time of the flush."""


class SocketWriter:
    """Writes the body of one response to its socket, chunked for HTTP/1.1.

    :param sock: the response's socket, whose descriptor is non-blocking.
    :param chunked: whether the server frames the body in chunks.
    :param flusher: what calls the owner back to write held bytes.
    """

    __slots__ = (
        "_chunked",
        "_fd",
        "_held",
        "_socket",
        "_turn",
        "flusher",
        "owner",
        "rest",
        "wrote_at",
    )

    def __init__(self, sock: socket.socket, chunked: bool, flusher: Flusher) -> None:
        self._socket = sock
        self._fd = sock.fileno()
        self._chunked = chunked
        #: Calls the owner back to write what is held, once the loop runs.
        self.flusher = flusher
        #: Whose ``write_held`` the flusher calls: the mailbox that makes
        #: sure nothing else writes meanwhile, or this writer itself.
        self.owner: Flushable = self
        # Events published for the stream since the last flush; made on
        # the first burst, as most streams never see one.
        self._held: list[bytes] | None = None
        # The flusher's turn of the stream's last write at once.
        self._turn = -1
        #: What the socket did not take at once; it goes before anything else.
        self.rest = b""
        #: When the fan-out last wrote (the time of its turn of the loop),
        #: for keep-alives.
        self.wrote_at = 0.0

    def _framed(self, data: bytes) -> tuple[bytes, ...]:
        # As gunicorn frames a chunk, or as it is for HTTP/1.0.
        if not self._chunked:
            return (data,)
        return (b"%x\r\n" % len(data), data, _CRLF)

    @property
    def held(self) -> int:
        """How many events wait for the next flush."""
        return len(self._held) if self._held else 0

    def write_or_hold(self, data: bytes) -> bool:
        """Write ``data`` at once if it is the stream's first this turn of
        the loop, else hold it for the flush at the end of the turn, which
        calls the ``write_held`` of :attr:`owner`; False if the socket did
        not take all of it, whose rest is then :attr:`rest`.

        A lone event goes out at once; a burst costs one more write per
        stream, however many events it has. Any thread may call it; the
        caller makes sure that nothing else writes to the socket meanwhile.
        """
        if not data:
            # An empty chunk would end the response.
            return True
        flusher = self.flusher
        held = self._held
        if held or self._turn == flusher.turn:
            if held is None:
                held = self._held = []
            held.append(data)
            if len(held) == 1:
                flusher.add(self.owner)
            return True
        self._turn = flusher.wrote()
        return self._write_now(data, flusher.now)

    def write_held(self, now: float) -> bool:
        """Write what is held in one write that never waits; False if the
        socket did not take all of it, whose rest is then :attr:`rest`."""
        held = self._held
        if not held:
            return True
        # However many events, one chunk: the client's parser sees a stream.
        body = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        return self._write_now(body, now)

    def _write_now(self, body: bytes, now: float) -> bool:
        parts = self._framed(body)
        try:
            sent = os.writev(self._fd, parts)
        except OSError:
            # A full buffer, or a client that left: the stream's own write
            # waits for the one and meets the other again.
            sent = 0
        if sent == len(body) + (len(parts[0]) + 2 if self._chunked else 0):
            self.wrote_at = now
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
    """Counts the turns of the loop in which streams were written to, and at
    the end of each writes what was held for idle streams meanwhile: one
    write per stream, so a burst costs a system call per stream, not per
    event.

    One per process, in the hub's thread; a publisher in another thread
    hands the work over to it.
    """

    def __init__(self, backend: GeventBackend) -> None:
        self._backend = backend
        self._lock = os_lock()
        self._due: list[Flushable] = []
        self._scheduled = False
        #: Counts the flushes, so that a stream knows if it was written to
        #: in this turn of the loop.
        self.turn = 0
        #: The time, read once a turn: reading the clock can cost a system
        #: call, and a keep-alive needs no finer time.
        self.now = time.monotonic()

    def add(self, owner: Flushable) -> None:
        """Call ``owner.write_held`` with the others at the end of this
        turn, with the time of the flush."""
        with self._lock:
            self._due.append(owner)
            self._schedule()

    def wrote(self) -> int:
        """Note a write in this turn; return the turn."""
        if not self._scheduled:
            with self._lock:
                self._schedule()
        return self.turn

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.now = time.monotonic()
            self._backend.call_soon(self._flush)

    def _flush(self) -> None:
        with self._lock:
            due, self._due = self._due, []
            self._scheduled = False
            self.turn += 1
            now = self.now = time.monotonic()
        for owner in due:
            owner.write_held(now)


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
