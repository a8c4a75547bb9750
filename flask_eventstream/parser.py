"""Read a ``text/event-stream`` back into :class:`.Event` objects.

This follows the WHATWG HTML algorithm for interpreting an event stream, so
what it reports is what a browser's ``EventSource`` would dispatch. It imports
neither Flask nor gevent.
"""

from __future__ import annotations

import codecs
import collections.abc as cabc

from .event import Event

_BOM = "\ufeff"


class EventParser:
    """Parse an event stream incrementally, one chunk at a time.

    Chunks may split the stream anywhere: inside a line, between the CR and
    LF of a line break, or inside a multi-byte UTF-8 character.

    .. code-block:: python

        parser = EventParser()
        for chunk in body:
            for event in parser.feed(chunk):
                ...
        parser.close()

    .. versionadded:: 0.1
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Text after the last line break, waiting for the rest of its line.
        self._partial: list[str] = []
        self._at_start = True
        # A chunk that ends in CR may be followed by one that starts with the
        # LF of the same CRLF; that LF must not count as a blank line.
        self._after_cr = False
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes | str) -> list[Event]:
        """Parse the next chunk of the stream.

        Returns the events that the chunk completes, which may be none.

        :param chunk: the next bytes of the stream, or text already decoded.

        .. versionadded:: 0.1
        """
        if isinstance(chunk, str):
            # Bytes left over in the decoder are an incomplete character, and
            # they come before this text.
            text = self._decoder.decode(b"", final=True) + chunk
        else:
            text = self._decoder.decode(chunk)
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text[0] == _BOM:
                text = text[1:]
        if self._after_cr:
            self._after_cr = False
            if text[:1] == "\n":
                text = text[1:]
        if "\n" not in text and "\r" not in text:
            if text:
                self._partial.append(text)
            return []
        if self._partial:
            self._partial.append(text)
            text = "".join(self._partial)
            self._partial.clear()
        if "\r" in text:
            self._after_cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        rest = lines.pop()
        if rest:
            self._partial.append(rest)
        events: list[Event] = []
        for line in lines:
            if line:
                self._process_field(line)
            elif self._data:
                events.append(self._dispatch())
            else:
                self._event = ""
                self._retry = None
        return events

    def close(self) -> list[Event]:
        """End the stream.

        An event that no blank line ended is dropped, as the spec says, so
        this returns an empty list; it is there so that every stream can be
        fed and closed the same way. Buffered text is discarded.

        .. versionadded:: 0.1
        """
        self._decoder.decode(b"", final=True)
        self._partial.clear()
        self._data.clear()
        self._event = ""
        self._retry = None
        return []

    def _process_field(self, line: str) -> None:
        if line[0] == ":":
            return
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        # isdigit() alone would accept digits of other scripts, such as "\u0661".
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self) -> Event:
        # The last event id is not reset: it carries over to later events.
        event = Event(
            "\n".join(self._data),
            event=self._event or "message",
            id=self._last_id or None,
            retry=self._retry,
        )
        self._data.clear()
        self._event = ""
        self._retry = None
        return event


def parse(data: bytes | str | cabc.Iterable[bytes | str]) -> cabc.Iterator[Event]:
    """Parse a whole event stream, yielding the events a browser would get.

    :param data: the stream as bytes or text, or an iterable of chunks of
        either, such as a streaming response body.

    .. versionadded:: 0.1
    """
    parser = EventParser()
    chunks = (data,) if isinstance(data, (str, bytes)) else data
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()
