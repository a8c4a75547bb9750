"""Real servers for end-to-end tests, run as subprocesses on free ports."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t

import requests

from flask_eventstream.event import Event
from flask_eventstream.parser import EventParser

ROOT = pathlib.Path(__file__).resolve().parent.parent
APP = "tests.apps.streams:create_app()"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Server:
    """A running server subprocess."""

    kind: str
    port: int
    process: subprocess.Popen[bytes]
    log: t.IO[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def state(self) -> dict[str, t.Any]:
        """The test app's ``/state`` report from inside the worker."""
        rv = requests.get(f"{self.url}/state", timeout=5)
        rv.raise_for_status()
        return t.cast(dict[str, t.Any], rv.json())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")


def _gunicorn_version() -> tuple[int, ...]:
    version = importlib.metadata.version("gunicorn")
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def command(kind: str, port: int, app: str = APP, workers: int = 1) -> list[str]:
    """The command line that serves ``app`` with the server ``kind``."""
    bind = f"127.0.0.1:{port}"
    gunicorn = [sys.executable, "-m", "gunicorn", "--bind", bind]
    gunicorn += ["--workers", str(workers)]
    if _gunicorn_version() >= (26,):
        # Each test server would otherwise share one control socket path.
        gunicorn.append("--no-control-socket")
    if kind == "gevent":
        return [
            *gunicorn,
            "-k",
            "gevent",
            "--worker-connections",
            "4000",
            "--graceful-timeout",
            "30",
            app,
        ]
    if kind == "gthread":
        return [
            *gunicorn,
            "-k",
            "gthread",
            "--threads",
            "64",
            "--graceful-timeout",
            "30",
            app,
        ]
    if kind == "werkzeug":
        return [
            sys.executable,
            "-m",
            "flask",
            "--app",
            app,
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--with-threads",
        ]
    raise ValueError(f"Unknown server kind {kind!r}.")


@contextlib.contextmanager
def serve(
    kind: str,
    app: str = APP,
    env: dict[str, str] | None = None,
    ready: str = "/state",
    workers: int = 1,
) -> t.Iterator[Server]:
    """Run a server until the block ends, then stop it and all it started.

    :param ready: a path that answers 2xx once the app is up.
    :param workers: gunicorn worker processes.
    """
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command(kind, port, app, workers),
            cwd=ROOT,
            env={**_clean_environ(), "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(kind, port, process, log)
        try:
            _wait_until_ready(server, ready)
            yield server
        finally:
            stop_group(process)


def _clean_environ() -> dict[str, str]:
    # The demo reads FLASK_* settings from the environment; a developer's own
    # must not change what the tests see.
    return {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}


def _wait_until_ready(server: Server, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            requests.get(f"{server.url}{path}", timeout=5).raise_for_status()
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"The {server.kind} server did not start:\n{server.output()}")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` and every process of its session, at once.

    SIGTERM is a fast shutdown for nginx and a graceful one for gunicorn;
    whatever is left after ten seconds is killed.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    # A worker that outlived its master would keep the port.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def open_stream(
    port: int,
    path: str,
    *,
    rcvbuf: int | None = None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> socket.socket:
    """Send a request on a raw socket and return the socket unread.

    It accepts ``text/event-stream``, as EventSource does, unless ``headers``
    say otherwise.
    """
    sock = socket.socket()
    headers = {"Accept": "text/event-stream", **(headers or {})}
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n"
        sock.sendall(request.encode())
    except BaseException:
        sock.close()
        raise
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    """Read from ``sock`` until ``marker`` has arrived; fail after ``timeout``."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{marker!r} did not arrive; got {data[-500:]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"The stream ended before {marker!r}; got {data[-500:]!r}")
        data += chunk
    return data


def wait_for(
    predicate: t.Callable[[], bool], timeout: float, what: str, poll: float = 0.05
) -> float:
    """Wait until ``predicate()`` is true; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"Not within {timeout} seconds: {what}.")
        time.sleep(poll)
    return time.monotonic() - start


class EventClient:
    """A plain HTTP/1.1 client that reads one event stream, de-chunked.

    It keeps its own buffer and takes a chunk from it only once the whole
    chunk has arrived, so a read that times out loses nothing and the stream
    can be read on afterwards. (http.client cannot do that: a socket timeout
    makes its response unreadable, or leaves its chunk parser mid-frame.)

    :param port: the server's port on 127.0.0.1.
    :param path: the stream's path.
    :param last_event_id: sent as the ``Last-Event-ID`` header.
    """

    def __init__(
        self,
        port: int,
        path: str,
        last_event_id: str | None = None,
        accept: str = "text/event-stream",
    ) -> None:
        headers = {"Accept": accept}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.sock = open_stream(port, path, headers=headers)
        self.parser = EventParser()
        self.events: list[Event] = []
        self.ended = False
        try:
            deadline = time.monotonic() + 10
            received = read_until(self.sock, b"\r\n\r\n")
            head, _, rest = received.partition(b"\r\n\r\n")
            self._buffer = bytearray(rest)
            status_line, *fields = head.decode("latin-1").split("\r\n")
            self.status = int(status_line.split()[1])
            #: Response headers, by lower-case name.
            self.headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (f.partition(":") for f in fields)
            }
            #: The whole body of a response other than 200.
            self.body = b""
            if self.status != 200:
                self.body = self._whole_body(deadline)
                self.ended = True
            else:
                # The opening comment: the subscription exists from here on.
                while not self._take_chunks() and not self.ended:
                    self._fill(deadline)
        except BaseException:
            self.sock.close()
            raise

    def read(self, count: int, timeout: float = 10.0) -> list[Event]:
        """Read until ``count`` events have come in all, or the stream ends."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count and not self.ended:
            if self._take_chunks():
                continue
            try:
                self._fill(deadline)
            except TimeoutError:
                raise TimeoutError(
                    f"Expected {count} events, got {len(self.events)}:"
                    f" {self.events[-3:]!r}"
                ) from None
            except (EOFError, ConnectionError):
                self.ended = True
        return self.events

    def close(self) -> None:
        self.sock.close()

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("Nothing more arrived in time.")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("The server closed the connection.")
        self._buffer += data

    def _take_chunks(self, sink: t.Callable[[bytes], t.Any] | None = None) -> bool:
        """Take every complete chunk in the buffer; True if there was one.

        Each chunk's data goes to ``sink``, by default the event parser.
        """
        took = False
        while not self.ended:
            size_end = self._buffer.find(b"\r\n")
            if size_end < 0:
                break
            size = int(bytes(self._buffer[:size_end]).split(b";")[0], 16)
            end = size_end + 2 + size + 2
            if len(self._buffer) < end:
                break
            data = bytes(self._buffer[size_end + 2 : end - 2])
            del self._buffer[:end]
            took = True
            if size == 0:
                self.ended = True
            if sink is None:
                self.events.extend(self.parser.feed(data))
            else:
                sink(data)
        return took

    def _whole_body(self, deadline: float) -> bytes:
        if self.headers.get("transfer-encoding") == "chunked":
            parts: list[bytes] = []
            while True:
                self._take_chunks(parts.append)
                if self.ended:
                    return b"".join(parts)
                self._fill(deadline)
        length = int(self.headers.get("content-length", "0"))
        while len(self._buffer) < length:
            self._fill(deadline)
        return bytes(self._buffer[:length])
