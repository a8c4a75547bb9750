"""A stream that writes its own socket, under gunicorn's gevent worker.

Through WSGI, each event costs a switch into the stream's greenlet, to take
it from its queue, and a pass through gunicorn's write path. Most streams
wait with nothing queued when an event comes, so the fan-out writes the
events of a flush (see ``brokers.fanout``) to each such socket itself, with
a write that never waits: one system call per stream however many events
came meanwhile, and no greenlet woken. Only what a socket does not take (a
slow client, a full buffer) is left to the stream, which writes it first,
waiting as usual, under its send timeout. The stream writes everything
else itself too, framed as gunicorn frames a chunk: gunicorn sends the
head, the opening comment and the last chunk.

This is done only where the library knows the socket and the framing:
gunicorn's own ``gevent`` worker, HTTP/1.x over plain TCP, with gunicorn
itself iterating the body (no WSGI middleware in between).
"""

from __future__ import annotations

import fcntl
import os
import sys
import typing as t

from .concurrency import current_backend
from .watcher import SEND_SLICE_BYTES

if t.TYPE_CHECKING:
    import collections.abc as cabc
    import socket
    import types

    from _typeshed.wsgi import StartResponse


class Frames:
    """Bytes that many sockets are sent, framed once for each framing.

    :param data: the bytes, the same for every socket.
    :param at: when they were made (:func:`time.monotonic`), which counts as
        when they were written, for keep-alives.
    """

    __slots__ = ("_chunk", "at", "data")

    def __init__(self, data: bytes, at: float) -> None:
        self.data = data
        self.at = at
        self._chunk: bytes | None = None

    @classmethod
    def join(cls, pieces: list[bytes], at: float) -> Frames:
        """Frames of ``pieces`` one after the other."""
        return cls(pieces[0] if len(pieces) == 1 else b"".join(pieces), at)

    def framed(self, chunked: bool) -> bytes:
        """The bytes to write, as gunicorn frames a chunk, or as they are
        for HTTP/1.0; empty if :attr:`data` is, as an empty chunk would end
        the response."""
        if not chunked or not self.data:
            return self.data
        if self._chunk is None:
            # Joined once for every socket: one buffer makes each write a
            # plain write(2), cheaper than gathering three.
            self._chunk = b"%x\r\n%b\r\n" % (len(self.data), self.data)
        return self._chunk


class SocketWriter:
    """Writes the body of one response to its socket, chunked for HTTP/1.1.

    :param sock: the response's socket, whose descriptor is non-blocking.
    :param chunked: whether the server frames the body in chunks.
    """

    __slots__ = ("_chunked", "_fd", "_socket", "rest", "wrote_at")

    def __init__(self, sock: socket.socket, chunked: bool) -> None:
        self._socket = sock
        self._fd = sock.fileno()
        self._chunked = chunked
        #: What the socket did not take at once; it goes before anything else.
        self.rest = b""
        #: When the fan-out last wrote, for keep-alives.
        self.wrote_at = 0.0

    def write_now(self, frames: Frames) -> bool:
        """Write ``frames`` in one write that never waits; False if the
        socket did not take all of it, whose rest is then :attr:`rest`.

        The caller makes sure that nothing else writes to the socket
        meanwhile.
        """
        out = frames.framed(self._chunked)
        if not out:
            return True
        try:
            sent = os.write(self._fd, out)
        except OSError:
            # A full buffer, or a client that left: the stream's own write
            # waits for the one and meets the other again.
            sent = 0
        if sent == len(out):
            self.wrote_at = frames.at
            return True
        self.rest = out[sent:]
        return False

    def write(self, data: bytes, progress: cabc.Callable[[], None]) -> None:
        """Write :attr:`rest`, then ``data``, waiting for the socket to take
        them; ``progress`` is called before each slice.

        :raises OSError: if the client left, or the stream was cut.
        """
        framed = Frames(data, 0.0).framed(self._chunked)
        out = self.rest + framed if self.rest else framed
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
    return SocketWriter(sock, response.chunked)


def iterated_by_server(caller: types.FrameType | None) -> bool:
    """Whether ``caller``, the frame that asked a body for its next chunk,
    is gunicorn's request loop, and not a WSGI middleware that would miss
    what the library writes itself."""
    name = caller.f_globals.get("__name__") if caller is not None else None
    return name == "gunicorn.workers.base_async"
