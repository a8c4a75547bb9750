"""What a subscribe request asks for, read with a clear 4xx for what is
malformed, and the plain-text refusals of the blueprint."""

from __future__ import annotations

import typing as t

from flask import abort
from flask import has_request_context
from flask import request
from flask import Response
from werkzeug.exceptions import BadRequest

from . import metrics

if t.TYPE_CHECKING:
    from werkzeug.datastructures import MultiDict


def wants_event_stream() -> bool:
    """Whether the request is an ``EventSource``'s, by its Accept header."""
    # Named outright, as EventSource does; */* is any client's default.
    return has_request_context() and any(
        value == "text/event-stream" and quality > 0
        for value, quality in request.accept_mimetypes
    )


def query_args() -> MultiDict[str, str]:
    # Werkzeug decodes the query string on first use and raises on bytes
    # that are not UTF-8, which only a hand-made request sends unescaped.
    try:
        return request.args
    except UnicodeDecodeError:
        refuse(400, "The query string is not valid UTF-8; percent-encode it.")


def request_last_event_id() -> str | None:
    """The id the request resumes from: the ``Last-Event-ID`` header, else
    the ``lastEventId`` argument; 400 if it is malformed."""
    raw = request.headers.get("Last-Event-ID")
    if raw is not None:
        # WSGI hands headers over as latin-1; browsers send UTF-8.
        try:
            raw = raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            refuse(400, "The Last-Event-ID header is not valid UTF-8.")
    else:
        raw = query_args().get("lastEventId")
    return check_last_event_id(raw, "The Last-Event-ID") if raw else None


def check_last_event_id(value: str, what: str) -> str:
    """Return ``value`` if it may be an event id, else raise BadRequest."""
    # Any other string is an id: one the broker cannot find gets a reset.
    if len(value) > 200 or "\r" in value or "\n" in value or "\0" in value:
        message = (
            f"{what} is not an event id: ids are 1-200 characters without a line"
            f" break or NUL (got {value[:60]!r})."
        )
        raise BadRequest(message, Response(message + "\n", 400, mimetype="text/plain"))
    return value


def refuse(
    status: int, message: str, headers: dict[str, str] | None = None
) -> t.NoReturn:
    metrics.hooks.refused(status)
    abort(Response(message + "\n", status, headers, mimetype="text/plain"))
