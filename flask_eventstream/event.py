"""The :class:`Event` value type and its ``text/event-stream`` wire encoding.

This module imports neither Flask nor gevent, so the encoder can be used and
tested on its own.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import json
import typing as t

#: A function that turns a JSON value into a JSON string.
JSONDumps: t.TypeAlias = cabc.Callable[[t.Any], str]

# One encoder, made once: ``json.dumps`` with non-default arguments builds a
# new encoder on every call, which shows at a million events.
_compact_dumps: JSONDumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False
).encode


def _no_json_dumps() -> JSONDumps | None:
    return None


_json_dumps_lookup: cabc.Callable[[], JSONDumps | None] = _no_json_dumps


def set_json_dumps_lookup(
    lookup: cabc.Callable[[], JSONDumps | None],
) -> cabc.Callable[[], JSONDumps | None]:
    """Install ``lookup``, called when JSON data is encoded, and return the
    one it replaces. The Flask layer's returns the app's ``dumps``; when it
    returns None, compact :func:`json.dumps` is used.

    .. versionadded:: 0.1
    """
    global _json_dumps_lookup
    previous = _json_dumps_lookup
    _json_dumps_lookup = lookup
    return previous


def data_text(data: t.Any) -> str:
    """Return ``data`` as the text an event carries: a ``str`` as is, any
    other value as JSON.

    :param data: the event's data, not ``None``.

    .. versionadded:: 0.1
    """
    if isinstance(data, str):
        return data
    return (_json_dumps_lookup() or _compact_dumps)(data)


def _split_lines(text: str) -> list[str]:
    # The parser ends a line at CRLF, CR or LF, so all three must be split on,
    # or a CR in a payload could start a field of its own.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def _field_lines(prefix: str, text: str) -> str:
    # One space after the colon, because the parser strips exactly one: a
    # value that starts with a space keeps it. An empty line needs no space.
    if "\n" not in text and "\r" not in text:
        return f"{prefix} {text}\n" if text else f"{prefix}\n"
    return "".join(
        f"{prefix} {line}\n" if line else f"{prefix}\n" for line in _split_lines(text)
    )


def encode_comment(text: str) -> bytes:
    """Encode ``text`` as comment lines, one ``:`` line per line of text.

    No blank line follows, so this is not an event: clients ignore it. Used
    for the opening and keep-alive comments of a stream.

    :param text: the comment; CRLF, CR and LF all start a new line.

    .. versionadded:: 0.1
    """
    return _field_lines(":", text).encode()


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"The {name!r} field must be a str or None (got {type(value).__name__})."
        )
    return value


def _check_line(name: str, value: object, *, no_nul: bool = False) -> None:
    # A line break would end the field early and let the rest be read as
    # fields of its own; a client ignores an id that holds NUL.
    text = _check_str(name, value)
    if "\n" in text or "\r" in text or (no_nul and "\0" in text):
        what = "a line break or NUL" if no_nul else "a line break"
        raise ValueError(f"The {name!r} field cannot contain {what} (got {text!r}).")


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event. ``bytes(event)`` gives its wire form.

    An event of only ``comment`` and ``retry`` ends without the blank line
    that dispatches an event, so no client reports it as one; an event with
    no fields encodes to nothing.

    :param data: a ``str`` is sent as is; ``None`` sends no data field; any
        other value is sent as JSON. Each line of the text is its own
        ``data:`` line.
    :param event: the event type; clients use ``message`` when it is not set.
    :param id: the event id, which a reconnecting client sends back in the
        ``Last-Event-ID`` header.
    :param retry: how many milliseconds a client waits before reconnecting.
    :param comment: written as ``:`` lines, before the fields; clients
        ignore it.

    .. versionadded:: 0.1
    """

    data: t.Any = None
    event: str | None = dataclasses.field(default=None, kw_only=True)
    id: str | None = dataclasses.field(default=None, kw_only=True)
    retry: int | None = dataclasses.field(default=None, kw_only=True)
    comment: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.event is not None:
            _check_line("event", self.event)
        if self.id is not None:
            _check_line("id", self.id, no_nul=True)
        if self.comment is not None:
            _check_str("comment", self.comment)
        retry = self.retry
        if retry is not None and (
            not isinstance(retry, int) or isinstance(retry, bool) or retry < 0
        ):
            raise ValueError(
                "The 'retry' field must be a non-negative int of milliseconds"
                f" (got {retry!r})."
            )

    def encode(self) -> bytes:
        """Encode the event as UTF-8 ``text/event-stream`` bytes.

        .. versionadded:: 0.1
        """
        out = ""
        if self.comment is not None:
            out = _field_lines(":", self.comment)
        if self.event is not None:
            out += f"event: {self.event}\n" if self.event else "event:\n"
        if self.id is not None:
            out += f"id: {self.id}\n" if self.id else "id:\n"
        if self.retry is not None:
            out += f"retry: {self.retry}\n"
        data = self.data
        if data is not None:
            out += _field_lines("data:", data_text(data))
        elif self.event is None and self.id is None:
            # Comment and retry lines need no blank line, and a blank line
            # after them, which browsers ignore, is an empty event to some
            # clients (httpx-sse, for one).
            return out.encode()
        return (out + "\n").encode()

    __bytes__ = encode
