"""``flask eventstream doctor``: probe a stream endpoint as a browser would.

It opens the stream with the headers of ``EventSource`` and times what
arrives, so it sees what a proxy on the way does to streams. On the
server's own host it also finds the gunicorn serving the URL, in ``/proc``,
and judges its worker by the rules of the startup warnings.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import http.client
import queue
import re
import secrets
import socket
import threading
import time
import typing as t
import urllib.parse
import zlib

from .gunicorn_host import Host
from .gunicorn_host import is_local
from .gunicorn_host import tcp_port
from .startup import problems

if t.TYPE_CHECKING:
    import collections.abc as cabc


#: An unbuffered stream's opening comment arrives within this long.
FIRST_BYTES_SECONDS = 1.0
#: A published test event arrives within this long.
PUBLISH_SECONDS = 1.0
#: Later than this, bytes were held back: a busy server is slow, but not
#: that slow, while a buffer holds them until it fills or the stream ends.
HELD_BACK_SECONDS = 3.0
#: How late a keep-alive may be before the doctor stops waiting for it.
KEEPALIVE_MARGIN_SECONDS = 2.0
#: How long the doctor waits for bytes when the app sends no keep-alives.
QUIET_SECONDS = 5.0
#: A shorter reconnection delay brings every client back at once after a deploy.
MIN_RETRY_MS = 1000
#: What a browser's EventSource sends, compression included.
REQUEST_HEADERS = {
    "Accept": "text/event-stream",
    "Cache-Control": "no-cache",
    "Accept-Encoding": "gzip, deflate, br, zstd",
}
_BUFFERED = (
    "proxy_buffering off; in the stream's nginx location (nginx obeys the app's"
    " X-Accel-Buffering: no unless proxy_ignore_headers drops it); elsewhere,"
    " turn response buffering off for text/event-stream."
)


class Check(t.NamedTuple):
    """The verdict of one check, printed as one line."""

    verdict: t.Literal["ok", "warn", "fail"]
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{self.verdict:<6}{self.message}{fix}"


def diagnose(
    url: str,
    *,
    keep_alive: float | None,
    publish: cabc.Callable[[str, str], object] | None = None,
    max_connections: int | None = None,
) -> cabc.Iterator[Check]:
    """Probe the stream endpoint at ``url``; yield each verdict as it is made.

    :param keep_alive: the endpoint's keep-alive interval, waited for.
    :param publish: ``publish(channel, data)`` on the app's broker; the
        doctor then adds a channel of its own to ``url`` and times a test
        event published on it.
    :param max_connections: ``EVENTSTREAM_MAX_CONNECTIONS``, which a gthread
        worker's threads are judged by.
    :raises ValueError: if ``url`` is not an http or https URL.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Give the stream's http:// or https:// URL (got {url!r}).")
    parts.port  # noqa: B018 - It raises ValueError for a port that is not one.
    send = None
    if publish is not None:
        channel = f"eventstream.doctor.{secrets.token_hex(8)}"
        query = [*urllib.parse.parse_qsl(parts.query, True), ("channel", channel)]
        parts = parts._replace(query=urllib.parse.urlencode(query))
        send = functools.partial(publish, channel)
    return _diagnose(parts, keep_alive, send, max_connections)


def _diagnose(
    url: urllib.parse.SplitResult,
    keep_alive: float | None,
    send: cabc.Callable[[str], object] | None,
    max_connections: int | None,
) -> cabc.Iterator[Check]:
    host = Host() if is_local(t.cast(str, url.hostname)) else None
    port = url.port or (443 if url.scheme == "https" else 80)
    before = host.connections(port) if host else set()
    try:
        stream = _Stream(url, (keep_alive or QUIET_SECONDS) + KEEPALIVE_MARGIN_SECONDS)
    except OSError as e:
        yield Check("fail", f"cannot reach {url.netloc}: {e}.", "check the URL.")
        return
    with contextlib.closing(stream):
        stream.wait(lambda: stream.response is not None, stream.deadline)
        # Behind a proxy on this host, the gunicorn that the proxy connected
        # to as the stream opened serves it.
        opened = host.connections(port) - before if host else set()
        yield from _check_stream(stream, keep_alive, send)
    if host is None:
        yield Check(
            "warn",
            f"the gunicorn worker was not checked: {url.hostname} is another host.",
            "run the doctor on the server's host to check it too.",
        )
    else:
        yield from _worker_checks(host, port, opened, max_connections)


class _Stream:
    """A GET request whose response a thread reads, so that each piece is
    timed as it arrives (http.client cannot read on after a read that timed
    out, so the doctor waits on the thread instead).

    :raises OSError: if the server cannot be reached.
    """

    def __init__(self, url: urllib.parse.SplitResult, timeout: float) -> None:
        https = url.scheme == "https"
        connect = http.client.HTTPSConnection if https else http.client.HTTPConnection
        connection = connect(t.cast(str, url.hostname), url.port, timeout=timeout)
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        connection.request("GET", target, headers=REQUEST_HEADERS)
        self._socket = t.cast(socket.socket, connection.sock)
        # The thread reads until close() shuts the socket down.
        self._socket.settimeout(None)
        self.response: http.client.HTTPResponse | None = None
        self.text, self.arrivals, self.closed = "", list[float](), False
        self.readable, self._encoded = True, False
        self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._pieces = queue.SimpleQueue[bytes | http.client.HTTPResponse]()
        threading.Thread(target=self._run, args=[connection], daemon=True).start()

    def _run(self, connection: http.client.HTTPConnection) -> None:
        with contextlib.closing(connection):
            with contextlib.suppress(OSError, http.client.HTTPException):
                response = connection.getresponse()
                self._pieces.put(response)
                while piece := response.read1(65536):
                    self._pieces.put(piece)
            self._pieces.put(b"")

    def wait(self, done: cabc.Callable[[], bool], until: float) -> bool:
        """Read until ``done()``; False if the time or the stream ran out."""
        while not done():
            try:
                piece = self._pieces.get(timeout=max(0, until - time.monotonic()))
            except queue.Empty:
                return False
            if isinstance(piece, http.client.HTTPResponse):
                self.response = piece
                encoding = piece.getheader("Content-Encoding", "identity").lower()
                # zlib reads gzip and zlib streams; others cannot be read.
                self.readable = encoding in ("identity", "gzip", "deflate")
                self._encoded = encoding != "identity"
            elif not piece:
                self.closed = True
                return False
            else:
                if self.readable and self._encoded:
                    # A compressor's header alone is no content yet.
                    with contextlib.suppress(zlib.error):
                        piece = self._inflate.decompress(piece)
                if piece:
                    self.arrivals.append(time.monotonic())
                if piece and self.readable:
                    self.text += self._decode(piece)
        return True

    def close(self) -> None:
        """End the request; the thread then closes the connection."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)


def _check_stream(
    stream: _Stream, keep_alive: float | None, send: cabc.Callable[[str], object] | None
) -> cabc.Iterator[Check]:
    rv, waited = stream.response, f"{stream.deadline - stream.start:g} s"
    if rv is None:
        if stream.closed:
            yield Check("fail", "the connection closed unanswered.", "check the URL.")
        else:
            yield Check(
                "fail",
                f"no response within {waited}: something on the way buffers the"
                " stream.",
                _BUFFERED,
            )
        return
    content_type = rv.getheader("Content-Type", "none")
    if rv.status != 200 or not content_type.startswith("text/event-stream"):
        yield Check(
            "fail",
            f"the URL answered {rv.status} {rv.reason} with {content_type}, not"
            " an event stream: EventSource gives up for good on that.",
            "give the URL of a stream endpoint, such as http://127.0.0.1:8000/events.",
        )
        return
    yield Check("ok", f"{rv.status} {rv.reason}, text/event-stream")
    yield _judge(
        rv.version != 10,
        "HTTP/1.1",
        "the response is HTTP/1.0: a proxy on the way speaks HTTP/1.0, so the"
        " stream is not chunked and its connection never reused",
        'proxy_http_version 1.1; and proxy_set_header Connection ""; in the'
        " stream's nginx location.",
    )
    encoding = rv.getheader("Content-Encoding", "identity")
    yield _judge(
        encoding.lower() == "identity",
        "not compressed",
        f"the stream is compressed (Content-Encoding: {encoding}): compression"
        " holds events back wherever the stream is buffered",
        "leave text/event-stream out of gzip_types, or gzip off; in the stream's"
        " nginx location; elsewhere, do not compress text/event-stream.",
        "fail",
    )
    cache = rv.getheader("Cache-Control", "")
    yield _judge(
        "no-cache" in cache or "no-store" in cache,
        f"Cache-Control: {cache}",
        f"Cache-Control is {cache or 'missing'}, not the app's no-cache: a cache"
        " may serve the stream stale",
        "remove expires and add_header Cache-Control from the stream's location.",
    )
    accel = rv.getheader("X-Accel-Buffering")
    # nginx acts on the header and keeps it from clients; gunicorn passes it.
    direct = (rv.getheader("Server") or "").startswith("gunicorn")
    yield _judge(
        accel == "no" or (accel is None and not direct),
        f"X-Accel-Buffering: {accel or 'taken by the proxy'}",
        f"X-Accel-Buffering is {accel or 'missing'}, not the app's no: a proxy"
        " that obeys it may buffer the stream",
        "do not set or remove X-Accel-Buffering for streams.",
    )
    if not stream.wait(lambda: bool(stream.arrivals), stream.deadline):
        yield Check(
            "fail",
            f"no bytes of the stream within {waited}, though the app sends a"
            " comment at once: something on the way buffers the stream.",
            _BUFFERED,
        )
        return
    first = stream.arrivals[0] - stream.start
    yield _judge(
        first <= FIRST_BYTES_SECONDS,
        f"first bytes after {first:.2f} s",
        f"the first bytes came after {first:.2f} s, not at once: a busy"
        " server, or something that buffers the stream",
        _BUFFERED,
        "fail" if first > HELD_BACK_SECONDS else "warn",
    )
    retry = re.search(r"^retry: ?(\d+)$", stream.text, re.MULTILINE)
    yield _judge(
        retry is None or int(retry[1]) >= MIN_RETRY_MS,
        f"retry: {retry[1]} ms" if retry else "no retry: browsers wait about 3 s",
        f"retry: {retry and retry[1]} ms brings every client back at once after"
        " a deploy",
        f"set EVENTSTREAM_RETRY to {MIN_RETRY_MS} ms or more.",
    )
    if send is not None:
        yield _published(stream, send)
    yield _keep_alive(stream, keep_alive)


def _judge(
    good: bool,
    ok: str,
    problem: str,
    fix: str,
    verdict: t.Literal["warn", "fail"] = "warn",
) -> Check:
    return Check("ok", ok) if good else Check(verdict, f"{problem}.", fix)


def _published(stream: _Stream, send: cabc.Callable[[str], object]) -> Check:
    data = f"doctor {secrets.token_hex(8)}"
    sent = time.monotonic()
    try:
        send(data)
    except Exception as e:  # Whatever the broker raises is a finding.
        return Check(
            "fail",
            f"could not publish a test event: {e}",
            "check EVENTSTREAM_BROKER_URL, and that the broker runs.",
        )

    def arrived() -> bool:
        return f"data: {data}\n" in stream.text

    if stream.wait(arrived, sent + PUBLISH_SECONDS):
        return Check("ok", f"test event after {time.monotonic() - sent:.2f} s")
    late = stream.wait(arrived, sent + HELD_BACK_SECONDS)
    came = f" (it came within {HELD_BACK_SECONDS:g} s: a busy server?)" if late else ""
    return Check(
        "warn" if late else "fail",
        f"a test event did not come within {PUBLISH_SECONDS:g} s{came}.",
        "give the URL of the EventStream blueprint's endpoint, and the servers"
        " this app's EVENTSTREAM_BROKER_URL; do not compress the stream.",
    )


def _keep_alive(stream: _Stream, keep_alive: float | None) -> Check:
    if keep_alive is None:
        return Check(
            "warn",
            "keep-alives are off: a proxy closes a quiet stream at its read timeout.",
            "set EVENTSTREAM_KEEPALIVE below every read timeout on the way.",
        )
    last, count = stream.arrivals[-1], len(stream.arrivals)
    limit = keep_alive + KEEPALIVE_MARGIN_SECONDS
    if stream.wait(lambda: len(stream.arrivals) > count, last + limit):
        gap = stream.arrivals[-1] - last
        return Check("ok", f"keep-alive after {gap:.2f} s (every {keep_alive:g} s)")
    if "event: eventstream.end\n" in stream.text:
        return Check("warn", "the stream ended.", "probe a stream that stays open.")
    if stream.closed:
        return Check(
            "fail",
            f"the connection closed after {time.monotonic() - last:.2f} s of"
            f" quiet, before the keep-alive due every {keep_alive:g} s: a read"
            " timeout on the way is shorter.",
            "make proxy_read_timeout in the stream's nginx location (or a load"
            " balancer's idle timeout) longer than EVENTSTREAM_KEEPALIVE; the"
            " docs use 1h.",
        )
    return Check(
        "fail",
        f"nothing came for {limit:g} s, though a keep-alive is due every"
        f" {keep_alive:g} s: something holds it back.",
        _BUFFERED,
    )


def _worker_checks(
    host: Host, port: int, opened: set[tuple[str, str]], max_connections: int | None
) -> cabc.Iterator[Check]:
    """Judge the worker of the gunicorn on ``host`` serving the URL's ``port``,
    directly or behind a proxy that ``opened`` connections to it."""
    via = {tcp_port(local) for local, _ in opened}
    found = [s for s in host.servers if port in s.ports] or [
        s for s in host.servers if s.ports & via
    ]
    if len(found) != 1:
        ports = {str(min(s.ports, default="?")) for s in host.servers}
        yield Check(
            "warn",
            "cannot tell which gunicorn serves the URL (gunicorn on this"
            f" host: {', '.join(sorted(ports)) or 'none'}), so its worker"
            " was not checked.",
            "probe gunicorn's own port too, such as http://127.0.0.1:8000/events;"
            " behind a proxy, run the doctor as a user who may read the"
            " proxy's /proc entries (root).",
        )
        return
    server = found[0]
    where = f"port {min(server.ports, default='?')}"
    name = f"the gunicorn on {where}"
    if server.settings is None:
        yield Check(
            "warn",
            f"cannot tell the worker of {name}: {server.unknown}.",
            "make sure it runs the gevent worker (-k gevent).",
        )
        return
    issues = problems(server.settings, max_connections)
    for issue in issues:
        yield Check(issue.verdict, f"on {where}, {issue.message}", issue.fix)
    if not issues:
        kind, threads = server.settings.kind, server.settings.threads
        detail = f" with {threads} threads" if kind == "gthread" else ""
        yield Check("ok", f"{name} runs the {kind} worker{detail}")
