"""The body of an event stream response, and a view's generator as its source.

The body runs in the server's greenlet or thread: it waits on its source
(a :class:`GeneratorSource`, or a channel subscription) with a timeout, and
turns a timeout into a keep-alive.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import sys
import time
import typing as t

from flask import stream_with_context
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from . import metrics
from .concurrency import current_backend
from .concurrency import Mailbox
from .concurrency import on_cut_short
from .concurrency import StreamSource
from .event import Event
from .socket_writer import iterated_by_server
from .watcher import SEND_SLICE_BYTES
from .watcher import watcher_for

if t.TYPE_CHECKING:
    import collections.abc as cabc
    import socket

    from flask import Flask

    from .concurrency import Backend
    from .concurrency import Stop
    from .metrics import CloseReason
    from .metrics import Kind
    from .socket_writer import SocketWriter
    from .watcher import Watcher

#: How many encoded events a generator may get ahead of its client.
PRODUCER_QUEUE_SIZE = 64
#: Waits are rounded up to this fraction of a second; see ``_timeout``.
TIMER_STEPS_PER_SECOND = 100
#: How long closing a stream waits for its generator's ``finally`` to run.
STOP_TIMEOUT_SECONDS = 5.0
#: The last event of a stream whose generator returned: the client should
#: not start it again, as it would after a stream that was cut.
END_EVENT = b"event: eventstream.end\ndata: {}\n\n"


def error_event(status: int, message: str | None = None) -> bytes:
    """The last event of a stream whose generator raised: its status and a
    message for the client, never the exception's text."""
    # Not the app's JSON provider: the library's own events have one form.
    data = json.dumps(
        {"status": status, "message": message or HTTP_STATUS_CODES.get(status)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return Event(data, event="eventstream.error").encode()


def encode_item(item: t.Any) -> bytes | None:
    """Return the wire form of one item yielded by a stream view.

    :param item: an :class:`Event`, a ``str`` (data), any other JSON value
        (JSON data), or ``None`` (nothing is sent).
    """
    if item is None:
        return None
    if isinstance(item, Event):
        return item.encode()
    if isinstance(item, bytes | bytearray | memoryview):
        raise TypeError(
            "A stream view yields Event, str, dict, list or None, not bytes;"
            " decode the bytes, or wrap them in Event(data=...)."
        )
    return Event(item).encode()


class GeneratorSource(StreamSource):
    """Runs a view's iterable beside the response, in a greenlet or thread.

    :param iterable: what the view returned.
    :param app: the app whose logger reports exceptions from the iterable.
    :param name: the view's name, for those reports.
    """

    def __init__(self, iterable: cabc.Iterable[t.Any], app: Flask, name: str) -> None:
        # Flask's request and app contexts are pushed again around the
        # iterable, and other context variables are carried over by copy.
        self._iterable = stream_with_context(iter(iterable))
        self._context = contextvars.copy_context()
        self._app = app
        self._name = name
        self._mailbox: Mailbox[bytes] | None = None
        self._stop: Stop | None = None
        self._was_cut_short = False

    def start(self, backend: Backend) -> None:
        self._mailbox = Mailbox(backend, PRODUCER_QUEUE_SIZE)
        self._stop = backend.spawn(
            functools.partial(self._context.run, self._run), "eventstream-producer"
        )

    def take(self, timeout: float | None) -> list[bytes]:
        assert self._mailbox is not None
        return self._mailbox.take(timeout)

    @property
    def drained(self) -> bool:
        return self._mailbox is None or self._mailbox.drained

    def interrupt(self) -> None:
        if self._mailbox is not None:
            self._mailbox.close()

    def close(self) -> None:
        self.interrupt()
        if self._stop is not None:
            self._stop(STOP_TIMEOUT_SECONDS)
        else:
            self._close_iterable()

    def _run(self) -> None:
        mailbox = self._mailbox
        assert mailbox is not None
        on_cut_short.set(self._cut_short)
        last: bytes | None = END_EVENT
        try:
            for item in self._iterable:
                chunk = encode_item(item)
                # A closed mailbox means the stream is over; a yielded None
                # is the generator's chance to notice that.
                if mailbox.closed or (chunk is not None and not mailbox.put(chunk)):
                    break
            if self._was_cut_short:
                last = None
            elif not mailbox.closed:
                self.ended_by = "end"
        except HTTPException as e:
            self._app.logger.info(
                "The event stream view %r ended its stream with %s.", self._name, e
            )
            last = error_event(e.get_response().status_code, e.description)
            self._failed(mailbox)
        except Exception:
            self._app.logger.exception(
                "The event stream view %r raised an exception; its stream was"
                " ended and the client was told.",
                self._name,
            )
            last = error_event(500)
            self._failed(mailbox)
        finally:
            if last is not None and not mailbox.closed:
                mailbox.put(last)
            mailbox.close()
            self._close_iterable()

    def _failed(self, mailbox: Mailbox[bytes]) -> None:
        # Once the stream was interrupted, its end has a cause already.
        if not mailbox.closed:
            self.ended_by = "error"

    def _cut_short(self) -> None:
        self._was_cut_short = True

    def _close_iterable(self) -> None:
        try:
            self._iterable.close()  # type: ignore[attr-defined]
        except Exception:
            self._app.logger.exception(
                "Closing the event stream view %r raised an exception.", self._name
            )


class EventStreamBody:
    """The WSGI body of an event stream: opening comment, events, keep-alives.

    Waiting happens here, in the server's greenlet or thread, on the source
    with a timeout; a timeout becomes a keep-alive. All chunks that are ready
    leave in one write.
    """

    # One per stream: slots keep an idle stream small.
    __slots__ = (
        "_cleanups",
        "_closed",
        "_ends_at",
        "_heartbeat",
        "_keep_alive",
        "_max_age",
        "_next_beat",
        "_opening",
        "_reason",
        "_rest",
        "_watcher",
        "kind",
        "send_timeout",
        "socket",
        "source",
        "writer",
        "writing_since",
    )

    def __init__(
        self,
        source: StreamSource,
        *,
        opening: bytes,
        keep_alive: float | None,
        heartbeat: bytes,
        max_age: float | None,
        send_timeout: float | None,
        sock: socket.socket | None,
    ) -> None:
        self.socket = sock
        self.send_timeout = send_timeout
        #: Set by the response when the stream may write its socket itself.
        self.writer: SocketWriter | None = None
        #: When the server was handed the slice it is writing, or None.
        self.writing_since: float | None = None
        self._rest: bytes | memoryview = b""
        self.source = source
        self._opening = opening
        self._keep_alive = keep_alive
        self._heartbeat = heartbeat
        self._max_age = max_age
        self._watcher: Watcher | None = None
        self._next_beat: float | None = None
        self._ends_at: float | None = None
        self._closed = False
        self._cleanups: list[cabc.Callable[[], None]] = []
        #: What served the stream, for metrics; the blueprint sets its own.
        self.kind: Kind = "view"
        # Why the stream ends, once the body knows or was told.
        self._reason: CloseReason | None = None

    def __iter__(self) -> EventStreamBody:
        return self

    def __next__(self) -> bytes:
        # The server asks for the next slice only once the last one is sent.
        self.writing_since = None
        if self._closed:
            raise StopIteration
        if self._rest:
            return self._sending(self._rest, time.monotonic())
        if self._watcher is None:
            if not iterated_by_server(sys._getframe(1)):
                self.writer = None
            return self._start()
        # One frame for the whole wait: an idle stream parks in it, and its
        # greenlet keeps every frame it parks in.
        writer = self.writer
        while True:
            chunks = self.source.take(self._timeout())
            if chunks or (writer is not None and writer.rest):
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if writer is None:
                    return self._sending(data, time.monotonic())
                self._write(data, writer)
                continue
            if writer is not None and self._keep_alive is not None:
                # What the fan-out wrote counts as not being silent.
                quiet_until = writer.wrote_at + self._keep_alive
                self._next_beat = max(self._next_beat or 0.0, quiet_until)
            now = time.monotonic()
            drained = self.source.drained
            if drained or (self._ends_at is not None and now >= self._ends_at):
                self._reason = self._reason or ("end" if drained else "max_age")
                self.close()
                raise StopIteration
            if self._next_beat is not None and now >= self._next_beat:
                if writer is None:
                    return self._sending(self._heartbeat, now)
                self._write(self._heartbeat, writer)

    def _write(self, data: bytes, writer: SocketWriter) -> None:
        if self._keep_alive is not None:
            self._next_beat = time.monotonic() + self._keep_alive
        try:
            writer.write(data, self._progress)
        finally:
            self.writing_since = None

    def _progress(self) -> None:
        self.writing_since = time.monotonic()

    def interrupt(self, reason: CloseReason) -> None:
        """End the stream at its next wake-up, for ``reason``; never blocks."""
        self._reason = self._reason or reason
        self.source.interrupt()

    def add_cleanup(self, fn: cabc.Callable[[], None]) -> None:
        """Call ``fn`` when the stream is closed, after its source."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Release the source and stop watching; the server calls this."""
        if self._closed:
            return
        self._closed = True
        self.writing_since = None
        if self._watcher is not None:
            self._watcher.discard(self)
            # A source that ended by itself did so before any interruption
            # (which would have closed it first); a body closed by the server
            # with no cause known was left by its client.
            reason = self.source.ended_by or self._reason or "client_left"
            metrics.hooks.stream_closed(self.kind, reason)
        self.source.close()
        for fn in self._cleanups:
            fn()

    def _start(self) -> bytes:
        backend = current_backend()
        now = time.monotonic()
        if self._max_age is not None:
            self._ends_at = now + self._max_age
        self._watcher = watcher_for(backend)
        self._watcher.add(self)
        metrics.hooks.stream_opened(self.kind)
        self.source.start(backend)
        if self.writer is not None and not self.source.write_through(self.writer):
            self.writer = None
        return self._sending(self._opening, now)

    def _sending(self, data: bytes | memoryview, now: float) -> bytes:
        if self._keep_alive is not None:
            self._next_beat = now + self._keep_alive
        self.writing_since = now
        # The send timeout runs from handing the server a write until it asks
        # for the next, so a big write goes in slices: each slice the socket
        # takes is progress, and a slow but steady reader of a big event is
        # cut only if it takes less than a slice in the whole timeout. A small
        # write is handed on as it is, without a copy.
        big = len(data) > SEND_SLICE_BYTES
        self._rest = memoryview(data)[SEND_SLICE_BYTES:] if big else b""
        return bytes(data[:SEND_SLICE_BYTES])

    def _timeout(self) -> float | None:
        # No list or generator here: this runs once per event sent.
        if self._ends_at is None:
            deadline = self._next_beat
        elif self._next_beat is None:
            deadline = self._ends_at
        else:
            deadline = min(self._next_beat, self._ends_at)
        if deadline is None:
            return None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 0.0
        # Rounded up to whole hundredths, so that a stream waiting out the
        # same keep-alive interval after each event asks for the same
        # timeout and its timer is reused (see concurrency._Signal).
        return math.ceil(remaining * TIMER_STEPS_PER_SECOND) / TIMER_STEPS_PER_SECOND
