"""Warnings, once per worker, about a gunicorn worker that cannot stream well."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import types
import typing as t

import pytest
import requests
from flask import Flask
from gunicorn.config import Config
from gunicorn.workers.gthread import ThreadWorker

from flask_eventstream import Event
from flask_eventstream import startup
from flask_eventstream import stream_events
from flask_eventstream.startup import command_line_options
from flask_eventstream.startup import command_line_settings
from flask_eventstream.startup import problems
from flask_eventstream.startup import settings_of
from flask_eventstream.startup import WorkerSettings

from .servers import command
from .servers import free_port
from .servers import ROOT
from .servers import serve
from .servers import Server
from .servers import stop_group
from .servers import wait_for

if t.TYPE_CHECKING:
    import collections.abc as cabc

SYNC = "gunicorn's sync worker serves one request at a time"
FEW_THREADS = "gunicorn's gthread worker has 2 threads"
HTTP2 = "gunicorn serves HTTP/2"


@pytest.mark.parametrize(
    ("settings", "max_connections", "expected"),
    [
        (WorkerSettings("gevent"), None, []),
        (WorkerSettings("eventlet"), None, []),
        (WorkerSettings("sync"), None, [("fail", SYNC)]),
        (WorkerSettings("sync", threads=4), None, [("warn", "has 4 threads")]),
        (WorkerSettings("gthread", threads=32), None, [("warn", "has 32 threads")]),
        (WorkerSettings("gthread", threads=33), None, []),
        (WorkerSettings("gthread", threads=64), 64, [("warn", "has 64 threads")]),
        (WorkerSettings("gthread", threads=8), 7, []),
        (WorkerSettings("gevent", http2=True), None, [("fail", HTTP2)]),
        (WorkerSettings("gthread", 64, http2=True), None, [("fail", HTTP2)]),
        # The sync worker falls back to HTTP/1.1 by itself.
        (WorkerSettings("sync", http2=True), None, [("fail", SYNC)]),
    ],
)
def test_problems_follow_the_worker_settings(
    settings: WorkerSettings,
    max_connections: int | None,
    expected: list[tuple[str, str]],
) -> None:
    """sync fails, gthread warns with too few threads, HTTP/2 fails."""
    found = problems(settings, max_connections)
    assert [p.verdict for p in found] == [verdict for verdict, _ in expected]
    for problem, (_, text) in zip(found, expected, strict=True):
        assert text in problem.message
        assert problem.fix


def test_gthread_warning_names_the_connection_limit_it_is_judged_by() -> None:
    """With EVENTSTREAM_MAX_CONNECTIONS set, the fix names it."""
    (found,) = problems(WorkerSettings("gthread", threads=10), 40)
    assert "more --threads than EVENTSTREAM_MAX_CONNECTIONS (40)" in found.fix


def stand_in(**settings: t.Any) -> ThreadWorker:
    """A gthread worker object as gunicorn makes it, with ``settings`` in its
    config; it is never started."""
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    worker = ThreadWorker.__new__(ThreadWorker)
    worker.cfg = cfg
    return worker


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"threads": 2}, WorkerSettings("gthread", 2, False)),
        (
            {"http_protocols": "h2,h1", "certfile": "c.pem", "keyfile": "k.pem"},
            WorkerSettings("gthread", 1, True),
        ),
        (
            {"http_protocols": "h2", "http2_cleartext": "prior-knowledge"},
            WorkerSettings("gthread", 1, True),
        ),
        # Without TLS nor cleartext HTTP/2, no client ever gets HTTP/2.
        ({"http_protocols": "h2,h1"}, WorkerSettings("gthread", 1, False)),
        ({"http_protocols": "h1", "certfile": "c.pem"}, WorkerSettings("gthread")),
    ],
)
def test_settings_are_read_from_the_worker_config(
    settings: dict[str, t.Any], expected: WorkerSettings
) -> None:
    """The worker's class gives its kind; its cfg the threads and HTTP/2."""
    assert settings_of(stand_in(**settings)) == expected


def test_a_gunicorn_without_http2_settings_is_read_as_http1() -> None:
    """gunicorn before 25 has no http_protocols: the HTTP/2 check does nothing."""
    worker = ThreadWorker.__new__(ThreadWorker)
    worker.cfg = types.SimpleNamespace(threads=64)
    assert settings_of(worker) == WorkerSettings("gthread", 64, False)
    assert problems(settings_of(worker), None) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["app:app"], WorkerSettings("sync")),
        (["-k", "gevent", "app:app"], WorkerSettings("gevent")),
        (["-kgevent", "app:app"], WorkerSettings("gevent")),
        (["--worker-class=gthread", "--threads", "8"], WorkerSettings("gthread", 8)),
        (["-k", "egg:gunicorn#eventlet"], WorkerSettings("eventlet")),
        (
            ["-k", "gunicorn.workers.ggevent.GeventWorker", "-k", "sync"],
            WorkerSettings("sync"),
        ),
        (["-k", "gevent", "--http-protocols", "h2,h1"], WorkerSettings("gevent")),
        (
            ["-k", "gevent", "--http-protocols=h2,h1", "--certfile", "c.pem"],
            WorkerSettings("gevent", http2=True),
        ),
        (
            ["--http-protocols", "h2", "--http2-cleartext", "upgrade"],
            WorkerSettings("sync", http2=True),
        ),
    ],
)
def test_settings_are_read_from_a_command_line(
    args: list[str], expected: WorkerSettings
) -> None:
    """The doctor judges a gunicorn command line by the same settings."""
    assert command_line_settings(command_line_options(args)) == expected


@pytest.fixture
def once_more(monkeypatch: pytest.MonkeyPatch) -> cabc.Callable[[t.Any], None]:
    """Let this process be checked again, as served by the given worker."""
    monkeypatch.setattr(startup, "_checked_pid", None)

    def serve_with(worker: t.Any) -> None:
        monkeypatch.setattr(startup, "_gunicorn_worker", lambda: worker)

    return serve_with


def streaming_app() -> Flask:
    app = Flask(__name__)

    @app.get("/stream")
    @stream_events
    def stream() -> cabc.Iterator[Event]:
        yield Event("one")

    return app


def test_http2_worker_is_warned_about_once_per_process(
    once_more: cabc.Callable[[t.Any], None], caplog: pytest.LogCaptureFixture
) -> None:
    """The first stream logs the warning; later streams do not."""
    once_more(stand_in(threads=64, http_protocols="h2,h1", certfile="c.pem"))
    client = streaming_app().test_client()
    with caplog.at_level(logging.WARNING, "flask_eventstream"):
        for _ in range(2):
            assert b"data: one" in client.get("/stream").data
    warnings = [r for r in caplog.records if r.name == "flask_eventstream.startup"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert HTTP2 in warnings[0].getMessage()
    assert "drop h2 from --http-protocols" in warnings[0].getMessage()


def test_nothing_is_logged_outside_gunicorn(
    once_more: cabc.Callable[[t.Any], None], caplog: pytest.LogCaptureFixture
) -> None:
    """Under another server there is no gunicorn worker to judge."""
    once_more(None)
    client = streaming_app().test_client()
    with caplog.at_level(logging.DEBUG, "flask_eventstream"):
        client.get("/stream").close()
    assert [r for r in caplog.records if r.name == "flask_eventstream.startup"] == []


@contextlib.contextmanager
def gunicorn(*worker: str, env: dict[str, str] | None = None) -> cabc.Iterator[Server]:
    """gunicorn serving the test app with the ``worker`` options, logging the
    library's warnings to its output.

    :param env: environment variables for the app, such as its settings.
    """
    port = free_port()
    # The test servers' command line, with these worker options for gevent's.
    base = command("gevent", port)
    argv = [*base[: base.index("-k")], *worker, base[-1]]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    environ.update(PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING", **(env or {}))
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(" ".join(worker), port, process, log)
        try:
            wait_for(lambda: _answers(server), 30, f"gunicorn {server.kind} answers")
            yield server
        finally:
            stop_group(process)


def _answers(server: Server) -> bool:
    if server.process.poll() is not None:
        raise RuntimeError(f"gunicorn exited:\n{server.output()}")
    try:
        return requests.get(f"{server.url}/state", timeout=5).ok
    except requests.RequestException:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("worker", "warning"),
    [(["-k", "sync"], SYNC), (["-k", "gthread", "--threads", "2"], FEW_THREADS)],
)
def test_worker_that_cannot_stream_well_logs_its_warning_once(
    worker: list[str], warning: str
) -> None:
    """Two streams in one worker process; the warning is in its log once."""
    with gunicorn(*worker) as server:
        for _ in range(2):
            rv = requests.get(f"{server.url}/finishes?count=1", timeout=10)
            assert rv.text.endswith("event: eventstream.end\ndata: {}\n\n")
        output = server.output()
    ours = [line for line in output.splitlines() if "flask_eventstream" in line]
    assert len(ours) == 1, output
    assert ours[0].startswith(f"WARNING flask_eventstream.startup: {warning}")
    assert "To fix it, serve streams with" in ours[0]


@pytest.mark.e2e
def test_gevent_worker_logs_no_warning() -> None:
    """The recommended worker streams without a word."""
    with serve("gevent", env={"LOG_LEVEL": "WARNING"}) as server:
        for _ in range(2):
            requests.get(
                f"{server.url}/finishes?count=1", timeout=10
            ).raise_for_status()
        assert "flask_eventstream" not in server.output()
