"""The ``EventStream`` blueprint: channels, publishing and replay."""

from __future__ import annotations

import dataclasses
import functools
import random
import typing as t
import weakref

from flask import abort
from flask import Blueprint
from flask import current_app
from flask import has_request_context
from flask import request
from flask import Response

from . import metrics
from .body import EventStreamBody
from .brokers.base import BrokerError
from .brokers.base import check_channel
from .cli import eventstream as eventstream_commands
from .event import Event
from .request_args import check_last_event_id
from .request_args import query_args
from .request_args import refuse
from .request_args import request_last_event_id
from .request_args import wants_event_stream
from .script import add_script_version
from .script import serve_script
from .settings import DEFAULTS
from .settings import EventStreamState
from .stream import event_stream_response
from .stream import HEADERS
from .stream import own_until_streamed
from .stream import release_unstreamed
from .stream import StreamOptions

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.sansio.app import App

    from .brokers.fanout import Subscription

#: What a client over ``EVENTSTREAM_MAX_CONNECTIONS`` is told to wait.
RETRY_AFTER_SECONDS = 5
# Methods the endpoint answers itself, so that those a client may try get a
# plain 405 rather than the app's HTML error page, and OPTIONS lists only
# what is allowed.
_ROUTED_METHODS = ["GET", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]
_ALLOW = {"Allow": "GET, HEAD, OPTIONS"}


class _Unset:
    def __repr__(self) -> str:
        return "from the config"


# The default of a stream option that the app's config sets.
UNSET: t.Any = _Unset()


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
    :param keep_alive: seconds of silence before a keep-alive; ``None``
        sends none. Defaults to ``EVENTSTREAM_KEEPALIVE``.
    :param heartbeat: an event to send instead of the keep-alive comment.
    :param retry: the reconnection delay sent as a stream opens, in
        milliseconds. Defaults to ``EVENTSTREAM_RETRY``.
    :param max_age: seconds after which a stream ends cleanly. Defaults to
        ``EVENTSTREAM_MAX_AGE``.
    :param send_timeout: seconds a client may take no data before its
        stream ends. Defaults to ``EVENTSTREAM_SEND_TIMEOUT``.
    :param metrics: turn on Prometheus metrics for the process, as
        ``EVENTSTREAM_METRICS`` does; see :doc:`/metrics`.
    :param blueprint_kwargs: passed on to :class:`flask.Blueprint`.

    The stream options apply to the blueprint's endpoint, as those of
    :func:`~flask_eventstream.stream_events` to a view; they are checked
    here, and the config's at registration.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        name: str = "eventstream",
        import_name: str = __name__,
        *,
        keep_alive: float | None = UNSET,
        heartbeat: Event | None = None,
        retry: int | None = UNSET,
        max_age: float | None = UNSET,
        send_timeout: float | None = UNSET,
        metrics: bool = False,
        **blueprint_kwargs: t.Any,
    ) -> None:
        given: dict[str, t.Any] = {
            "keep_alive": keep_alive,
            "heartbeat": heartbeat,
            "retry": retry,
            "max_age": max_age,
            "send_timeout": send_timeout,
        }
        self._given_options = {k: v for k, v in given.items() if v is not UNSET}
        # Checked now, so a wrong argument fails where it is written.
        StreamOptions.create(**self._given_options)
        if not isinstance(metrics, bool):
            raise TypeError(f"'metrics' is True or False (got {metrics!r}).")
        self._metrics = metrics
        self._options: weakref.WeakKeyDictionary[App, StreamOptions] = (
            weakref.WeakKeyDictionary()
        )
        blueprint_kwargs.setdefault("cli_group", "eventstream")
        super().__init__(name, import_name, **blueprint_kwargs)
        for command in eventstream_commands.commands.values():
            self.cli.add_command(command)
        self._authorize: cabc.Callable[[str], bool] | None = None
        self._client_key: cabc.Callable[[], str | None] = _remote_addr
        self.teardown_app_request(release_unstreamed)
        self.add_url_rule("/eventstream.js", "script", serve_script)
        self.url_defaults(add_script_version)
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
        if not options.get("url_prefix", self.url_prefix):
            raise ValueError(
                "Register the EventStream blueprint with a url_prefix, such as"
                " url_prefix='/events': without one its endpoint is the site's"
                " root, where an index view would shadow it. Pass"
                " url_prefix='/' to serve it there on purpose."
            )
        if "eventstream" not in app.extensions:
            for key, value in DEFAULTS.items():
                app.config.setdefault(key, value)
            app.extensions["eventstream"] = EventStreamState(app.config)
        state: EventStreamState = app.extensions["eventstream"]
        if self._metrics or state.metrics:
            metrics.enable()
        self._options[app] = StreamOptions.create(
            **{**state.stream_defaults, **self._given_options}
        )
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

        Works in any app context (a request, a CLI command, a background
        job) and from any thread.

        .. code-block:: python

            sse.publish({"text": "hi"}, event="message", channel="room.1")
            sse.publish(Event({"text": "hi"}, event="message", id=str(row.id)))

        :param data: a ``str``, anything the app's JSON provider dumps, or
            an :class:`~flask_eventstream.Event`, published with its own
            type, id and retry.
        :param event: the event type.
        :param id: the id: any string of 1-200 characters without a line
            break or NUL, such as a database key; by default the broker
            assigns one. A client that comes back with it is replayed what
            was published after its event.
        :param channel: the channel name.
        :param retry: reconnection delay for the clients, in milliseconds.
        :raises BrokerError: if the broker cannot be reached.
        :raises TypeError: for ``event``, ``id`` or ``retry`` beside an Event.
        """
        check_channel(channel)
        if isinstance(data, Event):
            for name, value in [("event", event), ("id", id), ("retry", retry)]:
                if value is not None:
                    raise TypeError(
                        f"'{name}' cannot be given beside an Event; set it on"
                        " the Event instead."
                    )
            if data.comment is not None:
                raise ValueError("A published Event cannot have a comment.")
            message = data
        else:
            message = Event(data, event=event, id=id, retry=retry)
        if message.data is None:
            raise ValueError("'data' is required: clients ignore events without it.")
        if not isinstance(message.data, str):
            message = dataclasses.replace(
                message, data=current_app.json.dumps(message.data)
            )
        return _state().broker.publish(channel, message)

    def disconnect(self, *channels: str) -> None:
        """End every open stream subscribed to any of ``channels``, in every
        process that shares the broker (through Redis, within about a
        second); other streams go on.

        The streams end as a cut one does, so browsers reconnect, and meet
        the :meth:`authorize` hook again: a logout or a revoked permission
        takes effect at once.

        .. code-block:: python

            @app.post("/logout")
            def logout():
                sse.disconnect(f"user.{current_user.id}")
                logout_user()
                return redirect("/")

        :raises BrokerError: if the broker cannot be reached.
        """
        names = list(dict.fromkeys(check_channel(c) for c in channels))
        if not names:
            raise TypeError("disconnect() needs at least one channel name.")
        _state().broker.disconnect(names)

    def listen(
        self, *channels: str, last_event_id: str | None = None, authorize: bool = True
    ) -> Subscription:
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
        :param authorize: in a request, ask the :meth:`authorize` hook for
            each channel, and refuse with 403 if it says no; pass False for
            channels the view has checked itself.
        :raises werkzeug.exceptions.Forbidden: if the hook refuses a channel.
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
        if authorize and self._authorize is not None and has_request_context():
            for name in names:
                if not self._authorize(name):
                    refuse(403, f"Not allowed to subscribe to the channel {name!r}.")
        if last_event_id is None and has_request_context():
            last_event_id = request_last_event_id()
        elif last_event_id:
            check_last_event_id(last_event_id, "The last event id")
        client = None
        if state.max_per_client is not None and has_request_context():
            client = self._client_key()
        refused = state.reserve(client)
        if refused is not None and wants_event_stream():
            # EventSource gives up for good on any status but 200; told to
            # retry, it comes back by itself, and the jitter keeps refused
            # browsers from all coming back at once.
            delay = round(RETRY_AFTER_SECONDS * 1000 * random.uniform(0.8, 1.2))
            metrics.hooks.refused(200)
            abort(Response(Event(retry=delay).encode(), headers=HEADERS))
        retry_after = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if refused == "process":
            refuse(503, "Too many open streams; try again shortly.", retry_after)
        if refused == "client":
            refuse(
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
            refuse(
                405,
                f"Subscribe with GET; {request.method} is not allowed here.",
                _ALLOW,
            )
        state = _state()
        try:
            names = _channel_names(query_args().getlist("channel"), state.max_channels)
        except ValueError as e:
            refuse(400, str(e))
        options = self._options[current_app._get_current_object()]  # type: ignore[attr-defined]
        response = event_stream_response(self.listen(*names), options, "eventstream")
        if isinstance(response.response, EventStreamBody):
            # Streams of the endpoint itself; those of views stay "view".
            response.response.kind = "blueprint"
        return response


def _channel_names(channels: cabc.Iterable[str], most: int) -> list[str]:
    names = list(dict.fromkeys(check_channel(c) for c in channels)) or ["sse"]
    if len(names) > most:
        raise ValueError(
            f"At most {most} channels (EVENTSTREAM_MAX_CHANNELS) may be listened"
            f" to at once (got {len(names)})."
        )
    return names


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
