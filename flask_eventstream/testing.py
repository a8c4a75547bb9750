"""Helpers for testing apps that stream events.

.. code-block:: python

    from flask_eventstream.testing import read_events

    def test_ticks(client):
        with client.get("/time") as rv:
            events = read_events(rv, 3, timeout=5)
        assert [e.event for e in events] == ["tick"] * 3
"""

from __future__ import annotations

import queue
import threading
import time
import typing as t
import weakref

from .parser import EventParser
from .parser import parse

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from werkzeug.wrappers import Response

    from .event import Event

__all__ = ["parse", "read_events"]

_END = object()


# Pulls a streaming response's body in a thread of its own: reading in the
# test's thread could block for as long as the stream is silent. One reader
# serves every read_events call on a response, so no chunk is read twice.
class _Reader:
    def __init__(self, body: cabc.Iterable[bytes]) -> None:
        self.chunks: queue.Queue[t.Any] = queue.Queue()
        self.events: list[Event] = []
        self.parser = EventParser()
        self.ended = False
        self._thread = threading.Thread(
            target=self._pull, args=(body,), name="eventstream-reader", daemon=True
        )
        self._thread.start()

    def _pull(self, body: cabc.Iterable[bytes]) -> None:
        try:
            for chunk in body:
                self.chunks.put(chunk)
        except BaseException as e:
            self.chunks.put(e)
        finally:
            self.chunks.put(_END)

    def read(self, count: int, timeout: float) -> list[Event]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and not self.ended:
            remaining = deadline - time.monotonic()
            try:
                item = self.chunks.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise TimeoutError(
                    f"Expected {count} events within {timeout} seconds, got"
                    f" {len(self.events)}; the last ones: {self.events[-3:]!r}"
                ) from None
            if item is _END:
                self.ended = True
            elif isinstance(item, BaseException):
                raise item
            else:
                self.events.extend(self.parser.feed(item))
        taken, self.events = self.events[:count], self.events[count:]
        return taken


_readers: weakref.WeakKeyDictionary[Response, _Reader] = weakref.WeakKeyDictionary()


def read_events(response: Response, count: int, timeout: float = 5.0) -> list[Event]:
    """Read ``count`` events from a streaming test-client response.

    Returns fewer only if the stream ends first; raises :exc:`TimeoutError`
    if ``count`` events have not arrived within ``timeout`` seconds, so a
    test can never hang on a silent stream. Events past ``count`` are kept
    for the next call. Close the response when done, so its generator ends.

    :param response: what the Flask test client returned for the stream.
    :param count: how many events to read.
    :param timeout: seconds to wait for them, in all.

    .. versionadded:: 0.1
    """
    if count < 0:
        raise ValueError(f"'count' must not be negative (got {count}).")
    reader = _readers.get(response)
    if reader is None:
        reader = _readers[response] = _Reader(
            t.cast("cabc.Iterable[bytes]", response.response)
        )
    return reader.read(count, timeout)
