"""The ``EventStream`` blueprint: channels, publishing and replay."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import random
import typing as t

from flask import abort
from flask import Blueprint
from flask import current_app
from flask import has_request_context
from flask import request
from flask import Response
from werkzeug.exceptions import BadRequest

from .brokers import broker_from_url
from .brokers.base import BrokerError
from .brokers.base import check_channel
from .cli import eventstream as eventstream_commands
from .concurrency import os_lock
from .event import Event
from .stream import event_stream_response
from .stream import HEADERS
from .stream import own_until_streamed
from .stream import release_unstreamed
from .stream import seconds
from .stream import StreamOptions

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.sansio.app import App
    from werkzeug.datastructures import MultiDict

    from .brokers.base import Broker
    from .brokers.fanout import Subscription

#: Every setting, with its default. Read once, when the blueprint is
#: registered on an app.
DEFAULTS: dict[str, t.Any] = {
    "EVENTSTREAM_BROKER_URL": "memory://",
    "EVENTSTREAM_KEY_PREFIX": "eventstream",
    "EVENTSTREAM_HISTORY": 1000,
    "EVENTSTREAM_HISTORY_TTL": 86400,
    "EVENTSTREAM_QUEUE_SIZE": 1000,
    "EVENTSTREAM_MAX_CHANNELS": 32,
    "EVENTSTREAM_MAX_CONNECTIONS": None,
    "EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT": None,
    "EVENTSTREAM_RETRY": None,
    "EVENTSTREAM_MAX_AGE": None,
    "EVENTSTREAM_KEEPALIVE": 15.0,
    "EVENTSTREAM_SEND_TIMEOUT": 60.0,
}
#: What a client over ``EVENTSTREAM_MAX_CONNECTIONS`` is told to wait.
RETRY_AFTER_SECONDS = 5
#: How long a browser keeps ``eventstream.js`` fetched from the URL that
#: ``url_for`` gives, which names its version.
SCRIPT_MAX_AGE_SECONDS = 365 * 86400

# Methods the endpoint answers itself, so that those a client may try get a
# plain 405 rather than the app's HTML error page, and OPTIONS lists only
# what is allowed.
_ROUTED_METHODS = ["GET", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]
_ALLOW = {"Allow": "GET, HEAD, OPTIONS"}

#: Why :meth:`EventStreamState.reserve` refused a stream.
Refusal = t.Literal["process", "client"]


class EventStreamState:
    """One app's broker and limits, in ``app.extensions["eventstream"]``.

    :param config: the app's config, with the defaults filled in.
    """

    def __init__(self, config: cabc.Mapping[str, t.Any]) -> None:
        self.history = _count(config, "EVENTSTREAM_HISTORY")
        self.queue_size = _count(config, "EVENTSTREAM_QUEUE_SIZE")
        self.max_channels = _count(config, "EVENTSTREAM_MAX_CHANNELS")
        self.max_connections = _count(
            config, "EVENTSTREAM_MAX_CONNECTIONS", optional=True
        )
        self.max_per_client = _count(
            config, "EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT", optional=True
        )
        try:
            self.options = StreamOptions.create(
                retry=config["EVENTSTREAM_RETRY"],
                max_age=config["EVENTSTREAM_MAX_AGE"],
            )
            history_ttl = seconds(
                "EVENTSTREAM_HISTORY_TTL",
                config["EVENTSTREAM_HISTORY_TTL"],
                optional=False,
            )
        except ValueError as e:
            raise ValueError(
                f"Check EVENTSTREAM_RETRY, EVENTSTREAM_MAX_AGE and"
                f" EVENTSTREAM_HISTORY_TTL: {e}"
            ) from None
        self.broker: Broker = broker_from_url(
            config["EVENTSTREAM_BROKER_URL"],
            history=self.history,
            history_ttl=t.cast(float, history_ttl),
            prefix=config["EVENTSTREAM_KEY_PREFIX"],
        )
        #: Streams open now in this process.
        self.streams = 0
        #: Streams open now per client key, for clients that have any.
        self.clients: dict[str, int] = {}
        self._lock = os_lock()

    def reserve(self, client: str | None = None) -> Refusal | None:
        """Count one more open stream for ``client`` (a key, or None for the
        process's limit only); return which limit refused it, if one did."""
        with self._lock:
            if (
                self.max_connections is not None
                and self.streams >= self.max_connections
            ):
                return "process"
            if client is not None:
                count = self.clients.get(client, 0)
                if self.max_per_client is not None and count >= self.max_per_client:
                    return "client"
                self.clients[client] = count + 1
            self.streams += 1
            return None

    def release(self, client: str | None = None) -> None:
        """Count one stream fewer, for ``client`` as it was reserved."""
        with self._lock:
            self.streams -= 1
            if client is not None:
                count = self.clients.pop(client) - 1
                # Keys with no stream are dropped, so the table holds only
                # the clients connected now, however many came and went.
                if count:
                    self.clients[client] = count


class EventStream(Blueprint):
    """A blueprint that serves publish/subscribe channels over SSE.

    .. code-block:: python

        sse = EventStream()
        app.register_blueprint(sse, url_prefix="/events")

        # anywhere with an app context:
        sse.publish({"text": "hi"}, event="message", channel="room.1")

    Browsers subscribe with ``new EventSource("/events?channel=room.1")``.

    :param name: the blueprint's name.
    :param import_name: the blueprint's import name.
    :param blueprint_kwargs: passed on to :class:`flask.Blueprint`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        name: str = "eventstream",
        import_name: str = __name__,
        **blueprint_kwargs: t.Any,
    ) -> None:
        blueprint_kwargs.setdefault("cli_group", "eventstream")
        super().__init__(name, import_name, **blueprint_kwargs)
        for command in eventstream_commands.commands.values():
            self.cli.add_command(command)
        self._authorize: cabc.Callable[[str], bool] | None = None
        self._client_key: cabc.Callable[[], str | None] = _remote_addr
        self.teardown_app_request(release_unstreamed)
        self.add_url_rule("/eventstream.js", "script", _script)
        self.url_defaults(_script_version)
        # The subscribe endpoint is the prefix itself: /events?channel=a.
        self.record(
            lambda s: s.add_url_rule(
                "" if s.url_prefix else "/",
                "subscribe",
                self._subscribe,
                methods=_ROUTED_METHODS,
                provide_automatic_options=False,
            )
        )

    def register(self, app: App, options: dict[str, t.Any]) -> None:
        if "eventstream" not in app.extensions:
            for key, value in DEFAULTS.items():
                app.config.setdefault(key, value)
            app.extensions["eventstream"] = EventStreamState(app.config)
        super().register(app, options)

    def authorize(self, fn: cabc.Callable[[str], bool]) -> cabc.Callable[[str], bool]:
        """Register ``fn(channel) -> bool``, asked for each requested channel.

        It runs in the request context, before any byte is streamed; False
        for any channel refuses the request with 403.

        .. code-block:: python

            @sse.authorize
            def may_listen(channel):
                return channel == "public" or channel == f"user.{current_user.id}"
        """
        self._authorize = fn
        return fn

    def client_key(
        self, fn: cabc.Callable[[], str | None]
    ) -> cabc.Callable[[], str | None]:
        """Register ``fn() -> str | None``, the key that streams are limited by.

        :data:`EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT` caps the streams open
        at once in this process for each key. ``fn`` is called in the request
        context of each new stream; by default the key is the client's IP
        address, ``request.remote_addr``. A key of None is not limited.

        .. code-block:: python

            @sse.client_key
            def stream_owner():
                # One budget per signed-in user, wherever they connect from.
                if current_user.is_authenticated:
                    return f"user:{current_user.id}"
                return request.remote_addr
        """
        self._client_key = fn
        return fn

    def publish(
        self,
        data: t.Any,
        *,
        event: str | None = None,
        id: str | None = None,
        channel: str = "sse",
        retry: int | None = None,
    ) -> str:
        """Publish an event on ``channel`` and return its id.

        Works in any app context: a request, a CLI command, a background job.

        :param data: a ``str``, or anything the app's JSON provider dumps.
        :param event: the event type.
        :param id: the id; by default the broker assigns one. A given id must
            have the broker's form and be greater than every earlier one.
        :param channel: the channel name.
        :param retry: reconnection delay for the clients, in milliseconds.
        :raises BrokerError: if the broker cannot be reached.
        """
        check_channel(channel)
        if data is None:
            raise ValueError("'data' is required: clients ignore events without it.")
        if not isinstance(data, str):
            data = current_app.json.dumps(data)
        return _state().broker.publish(
            channel, Event(data, event=event, id=id, retry=retry)
        )

    def listen(self, *channels: str, last_event_id: str | None = None) -> Subscription:
        """Subscribe to ``channels``, for a ``@stream_events`` view to return.

        .. code-block:: python

            @app.get("/me/events")
            @stream_events
            def my_events():
                return sse.listen(f"user.{current_user.id}")

        :param channels: channel names; ``sse`` when none are given.
        :param last_event_id: replay the events after this id first. When
            ``None``, the request's ``Last-Event-ID`` header or
            ``lastEventId`` argument is used; pass ``""`` for no replay.
        :raises werkzeug.exceptions.BadRequest: for a malformed id.
        :raises BrokerError: outside a request, if the broker cannot be
            reached. In a request the stream waits for the broker instead,
            with keep-alives, and replays once it is back.

        In a request, the response that streams it closes it; without one,
        the end of the request does. Over a connection limit, a request
        that accepts ``text/event-stream`` is answered 200 with only a
        ``retry`` delay, so that a browser comes back by itself; others get
        503 or 429 with ``Retry-After``.
        """
        state = _state()
        names = _channel_names(channels, state.max_channels)
        if last_event_id is None and has_request_context():
            last_event_id = _request_last_event_id()
        elif last_event_id:
            _check_id(last_event_id, "The last event id")
        client = None
        if state.max_per_client is not None and has_request_context():
            client = self._client_key()
        refused = state.reserve(client)
        if refused is not None and _wants_event_stream():
            # EventSource gives up for good on any status but 200; told to
            # retry, it comes back by itself, and the jitter keeps refused
            # browsers from all coming back at once.
            delay = round(RETRY_AFTER_SECONDS * 1000 * random.uniform(0.8, 1.2))
            abort(Response(Event(retry=delay).encode(), headers=HEADERS))
        retry_after = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if refused == "process":
            _refuse(503, "Too many open streams; try again shortly.", retry_after)
        if refused == "client":
            _refuse(
                429,
                f"Too many open streams from this client (at most"
                f" {state.max_per_client}); close one or try again shortly.",
                retry_after,
            )
        in_request = has_request_context()
        try:
            # A request's stream waits for the broker: a browser given an
            # error status would give up for good.
            sub = state.broker.subscribe(
                names,
                last_event_id or None,
                queue_size=state.queue_size,
                on_close=functools.partial(state.release, client),
                wait_for_broker=in_request,
            )
        except BrokerError:
            state.release(client)
            raise
        if in_request:
            own_until_streamed(sub)
        return sub

    def _subscribe(self) -> Response:
        if request.method == "OPTIONS":
            return Response(status=204, headers=_ALLOW)
        if request.method not in ("GET", "HEAD"):
            _refuse(
                405,
                f"Subscribe with GET; {request.method} is not allowed here.",
                _ALLOW,
            )
        state = _state()
        try:
            names = _channel_names(_args().getlist("channel"), state.max_channels)
        except ValueError as e:
            _refuse(400, str(e))
        if self._authorize is not None:
            for name in names:
                if not self._authorize(name):
                    _refuse(403, f"Not allowed to subscribe to the channel {name!r}.")
        return event_stream_response(self.listen(*names), state.options, "eventstream")


@functools.cache
def _script_file() -> tuple[bytes, str]:
    body = (
        importlib.resources.files(__package__) / "static/eventstream.js"
    ).read_bytes()
    return body, hashlib.sha256(body).hexdigest()[:16]


def _script() -> Response:
    body, version = _script_file()
    # The URL that url_for gives names the version, so it may be kept for
    # long; any other is checked again each time, cheaply, by its ETag.
    cache = (
        f"public, max-age={SCRIPT_MAX_AGE_SECONDS}, immutable"
        if request.args.get("v") == version
        else "no-cache"
    )
    response = Response(body, mimetype="text/javascript")
    response.headers["Cache-Control"] = cache
    response.set_etag(version)
    # In place: 304 with no body when the browser has this version.
    response.make_conditional(request)
    return response


def _script_version(endpoint: str, values: dict[str, t.Any]) -> None:
    if endpoint.rpartition(".")[2] == "script":
        values.setdefault("v", _script_file()[1])


def _channel_names(channels: cabc.Iterable[str], most: int) -> list[str]:
    names = list(dict.fromkeys(check_channel(c) for c in channels)) or ["sse"]
    if len(names) > most:
        raise ValueError(
            f"At most {most} channels (EVENTSTREAM_MAX_CHANNELS) may be listened"
            f" to at once (got {len(names)})."
        )
    return names


def _wants_event_stream() -> bool:
    # Named outright, as EventSource does; */* is any client's default.
    return has_request_context() and any(
        value == "text/event-stream" and quality > 0
        for value, quality in request.accept_mimetypes
    )


def _remote_addr() -> str | None:
    return request.remote_addr


def _state() -> EventStreamState:
    try:
        return t.cast(EventStreamState, current_app.extensions["eventstream"])
    except KeyError:
        raise RuntimeError(
            "This app has no event stream state. Did you register the"
            " 'EventStream' blueprint on it?"
        ) from None


def _args() -> MultiDict[str, str]:
    # Werkzeug decodes the query string on first use and raises on bytes
    # that are not UTF-8, which only a hand-made request sends unescaped.
    try:
        return request.args
    except UnicodeDecodeError:
        _refuse(400, "The query string is not valid UTF-8; percent-encode it.")


def _request_last_event_id() -> str | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is not None:
        # WSGI hands headers over as latin-1; browsers send UTF-8.
        try:
            raw = raw.encode("latin-1").decode("utf-8")
        except UnicodeError:
            _refuse(400, "The Last-Event-ID header is not valid UTF-8.")
    else:
        raw = _args().get("lastEventId")
    return _check_id(raw, "The Last-Event-ID") if raw else None


def _check_id(value: str, what: str) -> str:
    # Any other string is an id: one the broker cannot find gets a reset.
    if len(value) > 200 or "\r" in value or "\n" in value or "\0" in value:
        message = (
            f"{what} is not an event id: ids are 1-200 characters without a line"
            f" break or NUL (got {value[:60]!r})."
        )
        raise BadRequest(message, Response(message + "\n", 400, mimetype="text/plain"))
    return value


def _refuse(
    status: int, message: str, headers: dict[str, str] | None = None
) -> t.NoReturn:
    abort(Response(message + "\n", status, headers, mimetype="text/plain"))


def _count(config: cabc.Mapping[str, t.Any], key: str, optional: bool = False) -> t.Any:
    value = config[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a positive whole number (got {value!r}).")
    return value
