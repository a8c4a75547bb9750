"""The ``stream_events`` decorator and the response it builds."""

from __future__ import annotations

import functools
import typing as t

from flask import current_app
from flask import g
from flask import has_app_context
from flask import has_request_context
from flask import request
from flask import Response
from werkzeug.http import is_hop_by_hop_header
from werkzeug.wrappers import Response as BaseResponse

from .body import EventStreamBody
from .body import GeneratorSource
from .concurrency import StreamSource
from .event import encode_comment
from .event import Event
from .event import set_json_dumps_lookup
from .socket_writer import writer_for
from .startup import warn_about_worker

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from _typeshed.wsgi import StartResponse
    from _typeshed.wsgi import WSGIEnvironment
    from flask import Flask

    from .event import JSONDumps

#: How long a stream may be silent before a keep-alive comment is sent.
DEFAULT_KEEPALIVE_SECONDS = 15.0
#: How long a client may take no data before its stream is ended.
DEFAULT_SEND_TIMEOUT_SECONDS = 60.0
OPENING_COMMENT = encode_comment("stream opened")
KEEPALIVE_COMMENT = encode_comment("keep-alive")
#: The headers of every event stream; a proxy must not buffer or cache it.
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class _FromConfig(t.NamedTuple):
    # A default read from the app's config when a stream starts; shown in
    # the signature as the key's name.
    key: str
    default: float

    def __repr__(self) -> str:
        return self.key

    def read(self, value: t.Any, config: cabc.Mapping[str, t.Any]) -> float | None:
        if value is not self:
            return t.cast("float | None", value)
        return seconds(self.key, config.get(self.key, self.default))


_KEEPALIVE: t.Any = _FromConfig("EVENTSTREAM_KEEPALIVE", DEFAULT_KEEPALIVE_SECONDS)
_SEND_TIMEOUT: t.Any = _FromConfig(
    "EVENTSTREAM_SEND_TIMEOUT", DEFAULT_SEND_TIMEOUT_SECONDS
)


def _app_json_dumps() -> JSONDumps | None:
    return current_app.json.dumps if has_app_context() else None


# Data that is not a string is JSON; inside an app it follows the app's JSON
# provider, so custom types encode in a stream as they do in a response.
set_json_dumps_lookup(_app_json_dumps)


class StreamOptions(t.NamedTuple):
    """How a stream behaves; built and checked by :meth:`create`."""

    keep_alive: float | None
    heartbeat: Event | None
    opening: bytes
    headers: dict[str, str]
    max_age: float | None
    send_timeout: float | None

    @classmethod
    def create(
        cls,
        *,
        keep_alive: float | None = _KEEPALIVE,
        heartbeat: Event | None = None,
        retry: int | None = None,
        headers: cabc.Mapping[str, str] | None = None,
        max_age: float | None = None,
        send_timeout: float | None = _SEND_TIMEOUT,
    ) -> StreamOptions:
        """Check the arguments of :func:`stream_events` and keep them."""
        return cls(
            keep_alive=(
                keep_alive
                if keep_alive is _KEEPALIVE
                else seconds("keep_alive", keep_alive)
            ),
            heartbeat=_heartbeat(heartbeat),
            opening=OPENING_COMMENT
            + (b"" if retry is None else Event(retry=retry).encode()),
            headers=_extra_headers(headers),
            max_age=seconds("max_age", max_age),
            send_timeout=(
                send_timeout
                if send_timeout is _SEND_TIMEOUT
                else seconds("send_timeout", send_timeout)
            ),
        )


_P = t.ParamSpec("_P")


@t.overload
def stream_events(view: cabc.Callable[_P, t.Any], /) -> cabc.Callable[_P, Response]: ...
@t.overload
def stream_events(
    *,
    keep_alive: float | None = ...,
    heartbeat: Event | None = ...,
    retry: int | None = ...,
    headers: cabc.Mapping[str, str] | None = ...,
    max_age: float | None = ...,
    send_timeout: float | None = ...,
) -> cabc.Callable[[cabc.Callable[_P, t.Any]], cabc.Callable[_P, Response]]: ...
def stream_events(
    view: t.Any = None,
    /,
    *,
    keep_alive: float | None = _KEEPALIVE,
    heartbeat: Event | None = None,
    retry: int | None = None,
    headers: cabc.Mapping[str, str] | None = None,
    max_age: float | None = None,
    send_timeout: float | None = _SEND_TIMEOUT,
) -> t.Any:
    """Turn a view into a ``text/event-stream`` response.

    The view is a generator function, or a function that returns an
    iterable (so it can :func:`~flask.abort` before streaming starts). It
    may yield :class:`Event` objects, ``str`` (data), ``dict`` or ``list``
    (JSON data), or ``None`` (skipped). A view may also return a response
    object, which is sent unchanged.

    .. code-block:: python

        @app.get("/time")
        @stream_events
        def time_stream():
            while True:
                yield Event(datetime.now().isoformat(), event="tick")
                time.sleep(1)

    :param keep_alive: seconds of silence before a keep-alive comment is
        sent; ``None`` sends none. Defaults to ``EVENTSTREAM_KEEPALIVE``.
    :param heartbeat: an event to send instead of the keep-alive comment.
    :param retry: reconnection delay in milliseconds, sent to the client as
        the stream opens.
    :param headers: extra response headers. Hop-by-hop headers such as
        ``Connection`` belong to the server and are refused.
    :param max_age: seconds after which the stream ends cleanly, so clients
        reconnect (and spread across workers).
    :param send_timeout: seconds a client may take no data before its stream
        is ended; ``None`` never ends it. Defaults to
        ``EVENTSTREAM_SEND_TIMEOUT``.

    A generator that returns ends the stream with an ``eventstream.end``
    event; one that raises, with an ``eventstream.error`` event whose JSON
    data has the ``status`` (that of an :exc:`~werkzeug.exceptions.HTTPException`,
    else 500) and a ``message``, never the exception's text.

    .. versionadded:: 0.1
    """
    options = StreamOptions.create(
        keep_alive=keep_alive,
        heartbeat=heartbeat,
        retry=retry,
        headers=headers,
        max_age=max_age,
        send_timeout=send_timeout,
    )

    def decorator(view: cabc.Callable[_P, t.Any]) -> cabc.Callable[_P, Response]:
        @functools.wraps(view)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Response:
            result = view(*args, **kwargs)
            if isinstance(result, BaseResponse):
                return t.cast(Response, result)
            return event_stream_response(result, options, view.__name__)

        return wrapper

    return decorator(view) if view is not None else decorator


# Where a request keeps the sources it owns until a stream takes them.
_UNSTREAMED = "_eventstream_unstreamed"


def own_until_streamed(source: StreamSource) -> None:
    """Give ``source`` to the request until it hands a stream response to the
    server, which then owns it; if it never does (an error, ``HEAD``, a hook
    that replaced the response), the source is closed when the request ends.
    """
    g.setdefault(_UNSTREAMED, []).append(source)


def release_unstreamed(exc: BaseException | None = None) -> None:
    """Close what the ending request still owns; a teardown function."""
    for source in g.pop(_UNSTREAMED, ()):
        source.close()


class _StreamResponse(Response):
    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> cabc.Iterable[bytes]:
        # The server takes the body now, and with it what the request owned.
        body = self.response
        if not isinstance(body, EventStreamBody):
            return super().__call__(environ, start_response)
        if has_request_context():
            for source in g.pop(_UNSTREAMED, ()):
                body.add_cleanup(source.close)
        app_iter = super().__call__(environ, start_response)
        if app_iter is body:
            body.writer = writer_for(start_response)
        return app_iter


def event_stream_response(
    result: cabc.Iterable[t.Any] | StreamSource, options: StreamOptions, name: str
) -> Response:
    """Build the streaming response for what a view returned."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    warn_about_worker(app.config)  # Once per worker: what its server cannot do.
    response = _StreamResponse(direct_passthrough=True, headers=HEADERS)
    response.headers.update(options.headers)
    if request.method == "HEAD":
        # Headers only: the generator is never started, just released.
        getattr(result, "close", lambda: None)()
        response.response = iter(())
        return response
    config = app.config
    source = (
        result
        if isinstance(result, StreamSource)
        else GeneratorSource(result, app, name)
    )
    environ = request.environ
    response.response = EventStreamBody(
        source,
        opening=options.opening,
        keep_alive=_KEEPALIVE.read(options.keep_alive, config),
        heartbeat=(
            options.heartbeat.encode() if options.heartbeat else KEEPALIVE_COMMENT
        ),
        max_age=options.max_age,
        send_timeout=_SEND_TIMEOUT.read(options.send_timeout, config),
        sock=environ.get("gunicorn.socket") or environ.get("werkzeug.socket"),
    )
    return response


def seconds(name: str, value: t.Any, optional: bool = True) -> float | None:
    """Check a setting of seconds: a positive number, or None if optional."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        off = ", or None to turn it off" if optional else ""
        raise ValueError(
            f"{name!r} is a positive number of seconds{off} (got {value!r})."
        )
    return float(value)


def _heartbeat(heartbeat: Event | None) -> Event | None:
    if heartbeat is not None and not isinstance(heartbeat, Event):
        raise TypeError(
            f"'heartbeat' is an Event, or None for a keep-alive comment"
            f" (got {type(heartbeat).__name__})."
        )
    return heartbeat


def _extra_headers(headers: cabc.Mapping[str, str] | None) -> dict[str, str]:
    extra = dict(headers or {})
    for key in extra:
        if is_hop_by_hop_header(key):
            raise ValueError(
                f"The header {key!r} is hop-by-hop and belongs to the server;"
                " remove it from 'headers'."
            )
    return extra
