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


def command(kind: str, port: int, app: str = APP) -> list[str]:
    """The command line that serves ``app`` with the server ``kind``."""
    bind = f"127.0.0.1:{port}"
    gunicorn = [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", "1"]
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
) -> t.Iterator[Server]:
    """Run a server until the block ends, then stop it and all it started.

    :param ready: a path that answers 2xx once the app is up.
    """
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command(kind, port, app),
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
            _stop(process)


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


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def open_stream(
    port: int, path: str, *, rcvbuf: int | None = None, method: str = "GET"
) -> socket.socket:
    """Send a request on a raw socket and return the socket unread."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
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
