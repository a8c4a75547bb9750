"""``flask eventstream doctor`` against gunicorn, directly and behind nginx.

The servers send a keep-alive every second, so each probe takes a few
seconds. The doctor runs through the app's CLI, in this process, with the
servers' settings and Redis broker, so ``--publish`` reaches them.
"""

from __future__ import annotations

import contextlib
import pathlib
import socket
import threading
import typing as t
import uuid

import pytest

from example_app import create_app
from flask_eventstream.doctor import Check
from flask_eventstream.doctor import diagnose
from flask_eventstream.gunicorn_host import gunicorn_args
from flask_eventstream.gunicorn_host import gunicorn_of
from flask_eventstream.startup import WorkerSettings

from .nginx import documented_location
from .nginx import Location
from .nginx import run_nginx
from .redis_server import redis_server
from .servers import free_port
from .servers import serve
from .test_startup import gunicorn

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from click.testing import Result

    from .redis_server import RedisServer
    from .servers import Server

#: Where the test app's EventStream blueprint serves its channels.
EVENTS = "/events"
#: The fix the doctor prints for a stream that something buffers.
UNBUFFER = "Fix: proxy_buffering off; in the stream's nginx location"


@pytest.mark.parametrize(
    ("check", "line"),
    [
        (Check("ok", "first bytes after 0.01 s"), "ok    first bytes after 0.01 s"),
        (Check("warn", "a thing.", "do this."), "warn  a thing. Fix: do this."),
        (Check("fail", "a thing.", "do that."), "fail  a thing. Fix: do that."),
    ],
)
def test_each_check_is_one_line_with_its_verdict_first(check: Check, line: str) -> None:
    """The verdict, padded, then the finding and its fix."""
    assert str(check) == line


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/events", "127.0.0.1:8000/events", "http:///events"]
)
def test_a_url_that_is_not_http_is_refused(url: str) -> None:
    """The URL must name an http or https server."""
    with pytest.raises(ValueError, match="Give the stream's http:// or https:// URL"):
        diagnose(url, keep_alive=1)
    result = create_app().test_cli_runner().invoke(args=["eventstream", "doctor", url])
    assert result.exit_code == 2
    assert "Invalid value for 'URL': Give the stream's http" in result.output


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/python", "-m", "gunicorn", "-k", "gevent"], ["-k", "gevent"]),
        (["/venv/bin/python3", "/venv/bin/gunicorn", "app:app"], ["app:app"]),
        (["gunicorn"], ["--"]),
        (["gunicorn: master [app:app]"], None),
        (["/venv/bin/python", "-m", "flask", "run"], []),
        (["/usr/sbin/nginx", "-g", "daemon off;"], []),
    ],
)
def test_gunicorn_command_lines_are_told_from_others(
    argv: list[str], expected: list[str] | None
) -> None:
    """gunicorn run any way; a process title hides its options."""
    assert gunicorn_args(argv) == expected


@pytest.mark.parametrize(
    ("args", "environ", "files", "ports", "settings"),
    [
        (["-k", "gevent", "-b", "127.0.0.1:9000"], {}, [], {9000}, "gevent"),
        (["app:app"], {}, [], {8000}, "sync"),
        (["app:app"], {"PORT": "5000"}, [], {5000}, "sync"),
        (["-b", "unix:/run/g.sock", "--bind=[::1]:8001"], {}, [], {8001}, "sync"),
        (
            ["app:app"],
            {"GUNICORN_CMD_ARGS": "-k gevent -b :7000"},
            [],
            {7000},
            "gevent",
        ),
        (
            ["-k", "sync", "app:app"],
            {"GUNICORN_CMD_ARGS": "-k gevent"},
            [],
            {8000},
            "sync",
        ),
        (["app:app"], {}, ["gunicorn.conf.py"], {8000}, None),
        (["-c", "conf/g.py"], {}, ["conf/g.py"], {8000}, None),
        (["-c", "python:settings"], {}, [], {8000}, None),
        (["-k", "gevent", "-c", "g.py"], {}, ["g.py"], {8000}, "gevent"),
    ],
)
def test_gunicorn_is_judged_by_its_command_line_environment_and_files(
    tmp_path: pathlib.Path,
    args: list[str],
    environ: dict[str, str],
    files: list[str],
    ports: set[int],
    settings: str | None,
) -> None:
    """What /proc shows of a gunicorn master; a config file may set the worker."""
    proc = tmp_path / "1234"
    (proc / "cwd").mkdir(parents=True)
    (proc / "environ").write_bytes(
        b"".join(f"{k}={v}\0".encode() for k, v in environ.items())
    )
    for name in files:
        (proc / "cwd" / name).parent.mkdir(exist_ok=True)
        (proc / "cwd" / name).touch()
    found = gunicorn_of(args, proc)
    assert found.ports == ports
    if settings is None:
        assert found.settings is None
        assert "its worker may be set in" in found.unknown
    else:
        assert found.settings == WorkerSettings(settings)


def test_an_environment_it_cannot_read_leaves_the_worker_unknown(
    tmp_path: pathlib.Path,
) -> None:
    """Another user's gunicorn may set its worker in GUNICORN_CMD_ARGS."""
    (tmp_path / "cwd").mkdir()
    found = gunicorn_of(["app:app"], tmp_path)
    assert found.settings is None
    assert "GUNICORN_CMD_ARGS, which only its user can read" in found.unknown
    assert gunicorn_of(["-k", "gevent"], tmp_path).settings == WorkerSettings("gevent")


def test_a_process_title_leaves_the_worker_unknown(tmp_path: pathlib.Path) -> None:
    """setproctitle replaces the command line, and with it the options."""
    found = gunicorn_of(None, tmp_path)
    assert (found.settings, found.unknown) == (
        None,
        "its process title hides its options",
    )


@pytest.fixture(scope="module")
def redis() -> cabc.Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def config(redis: RedisServer) -> dict[str, t.Any]:
    """The settings of the servers and of the app that runs the doctor."""
    return {
        "EVENTSTREAM_KEEPALIVE": 1,
        "EVENTSTREAM_BROKER_URL": redis.url,
        "EVENTSTREAM_KEY_PREFIX": f"t{uuid.uuid4().hex}",
    }


@pytest.fixture(scope="module")
def server(config: dict[str, t.Any]) -> cabc.Iterator[Server]:
    """gunicorn's gevent worker with the test app, one keep-alive a second."""
    env = {f"FLASK_{key}": str(value) for key, value in config.items()}
    with serve("gevent", env=env) as server:
        yield server


@pytest.fixture
def doctor(config: dict[str, t.Any]) -> cabc.Iterator[cabc.Callable[..., Result]]:
    """Run ``flask eventstream doctor`` in an app configured as the servers."""
    app = create_app(config)

    def run(*args: str) -> Result:
        result = app.test_cli_runner().invoke(args=["eventstream", "doctor", *args])
        # The doctor's report, for ``pytest -rP`` and for failures.
        print(f"$ flask eventstream doctor {' '.join(args)}\n{result.output}")
        return result

    yield run
    app.extensions["eventstream"].broker.close()


def lines(result: Result) -> list[str]:
    return result.output.splitlines()


@pytest.mark.e2e
def test_gunicorn_gevent_passes_every_check(
    server: Server, doctor: cabc.Callable[..., Result]
) -> None:
    """Straight to gunicorn: headers, timing, the test event, keep-alive, worker."""
    result = doctor(f"{server.url}{EVENTS}", "--publish")
    assert result.exit_code == 0, result.output
    assert all(line.startswith("ok    ") for line in lines(result)), result.output
    for found in [
        "ok    200 OK, text/event-stream",
        "ok    not compressed",
        "ok    Cache-Control: no-cache",
        "ok    X-Accel-Buffering: no",
        "ok    first bytes after ",
        "ok    test event after ",
        "ok    keep-alive after ",
        f"ok    the gunicorn on port {server.port} runs the gevent worker",
    ]:
        assert any(line.startswith(found) for line in lines(result)), found


@pytest.mark.e2e
def test_a_url_that_is_no_stream_fails(
    server: Server, doctor: cabc.Callable[..., Result]
) -> None:
    """A JSON view is not an event stream."""
    result = doctor(f"{server.url}/state")
    assert result.exit_code == 1
    assert lines(result)[0].startswith(
        "fail  the URL answered 200 OK with application/json, not an event stream"
    )


def test_a_server_that_does_not_answer_fails() -> None:
    """Nothing listens on the port."""
    url = f"http://127.0.0.1:{free_port()}{EVENTS}"
    result = create_app().test_cli_runner().invoke(args=["eventstream", "doctor", url])
    assert result.exit_code == 1
    assert lines(result)[0].startswith("fail  cannot reach 127.0.0.1:")


def test_publishing_needs_a_broker_the_servers_share() -> None:
    """The in-memory broker cannot reach another process: say so, probe nothing."""
    result = (
        create_app()
        .test_cli_runner()
        .invoke(
            args=["eventstream", "doctor", "http://127.0.0.1:1/events", "--publish"]
        )
    )
    assert result.exit_code == 1
    assert "'doctor --publish' talks to the running servers through the broker" in (
        result.output
    )


@pytest.mark.e2e
def test_keep_alives_turned_off_are_warned_about(
    server: Server, config: dict[str, t.Any]
) -> None:
    """Without keep-alives a proxy's read timeout ends quiet streams."""
    app = create_app({**config, "EVENTSTREAM_KEEPALIVE": None})
    try:
        result = app.test_cli_runner().invoke(
            args=["eventstream", "doctor", f"{server.url}{EVENTS}"]
        )
    finally:
        app.extensions["eventstream"].broker.close()
    assert result.exit_code == 0, result.output
    assert "warn  keep-alives are off" in result.output


@pytest.fixture(scope="module")
def location() -> Location:
    return documented_location()


def edited(location: Location, *changes: tuple[str, str]) -> str:
    """The documented location with each ``(old, new)`` text replaced."""
    text = location.text
    for old, new in changes:
        assert old in text, f"The documented location has no {old!r}."
        text = text.replace(old, new)
    return text


@pytest.mark.e2e
def test_documented_nginx_location_passes(
    server: Server, location: Location, doctor: cabc.Callable[..., Result]
) -> None:
    """Through nginx as the docs set it up, the doctor finds nothing to fix."""
    with run_nginx({location.upstream: server.port}, [location.text]) as nginx:
        result = doctor(f"{nginx.url}{EVENTS}", "--publish")
    assert result.exit_code == 0, result.output
    assert "fail" not in result.output
    assert "ok    X-Accel-Buffering: taken by the proxy" in lines(result)
    assert any(line.startswith("ok    test event after ") for line in lines(result))
    assert any(line.startswith("ok    keep-alive after ") for line in lines(result))


@pytest.mark.e2e
def test_proxy_buffering_on_is_overruled_by_the_apps_header(
    server: Server, location: Location, doctor: cabc.Callable[..., Result]
) -> None:
    """nginx obeys the stream's X-Accel-Buffering: no, so the stream flows."""
    text = edited(location, ("proxy_buffering off;", "proxy_buffering on;"))
    with run_nginx({location.upstream: server.port}, [text]) as nginx:
        result = doctor(f"{nginx.url}{EVENTS}")
    assert result.exit_code == 0, result.output
    assert "fail" not in result.output


GZIP = "\n    gzip on;\n    gzip_types text/event-stream;"
BUFFERING = "proxy_buffering on;\n    proxy_ignore_headers X-Accel-Buffering;"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("changes", "finding", "fix"),
    [
        pytest.param(
            [("proxy_buffering off;", f"proxy_buffering off;{GZIP}")],
            "fail  the stream is compressed (Content-Encoding: gzip)",
            "Fix: leave text/event-stream out of gzip_types, or gzip off;",
            id="gzip",
        ),
        pytest.param(
            [("proxy_buffering off;", f"{BUFFERING}{GZIP}")],
            "fail  no response within 3 s: something on the way buffers the stream.",
            UNBUFFER,
            id="buffering-and-gzip",
        ),
        pytest.param(
            [("proxy_buffering off;", BUFFERING), ("proxy_http_version 1.1;\n", "")],
            "fail  no response within 3 s: something on the way buffers the stream.",
            UNBUFFER,
            id="buffering-over-http-1.0",
        ),
        pytest.param(
            [("proxy_read_timeout 1h;", "proxy_read_timeout 500ms;")],
            "fail  the connection closed after 0.",
            "Fix: make proxy_read_timeout in the stream's nginx location",
            id="read-timeout-below-keep-alive",
        ),
    ],
)
def test_nginx_location_that_holds_streams_back_fails_with_the_fix(
    server: Server,
    location: Location,
    doctor: cabc.Callable[..., Result],
    changes: list[tuple[str, str]],
    finding: str,
    fix: str,
) -> None:
    """Each mistake is a fail line that says what to change; exit status 1."""
    text = edited(location, *changes)
    with run_nginx({location.upstream: server.port}, [text]) as nginx:
        result = doctor(f"{nginx.url}{EVENTS}")
    assert result.exit_code == 1, result.output
    (line,) = [line for line in lines(result) if line.startswith(finding)]
    assert fix in line


@contextlib.contextmanager
def odd_stream_server() -> cabc.Iterator[int]:
    """A server on a port of its own that answers one request with an
    HTTP/1.0 event stream that sets a short retry and leaves out the
    app's Cache-Control and X-Accel-Buffering, then sends a keep-alive
    every tenth of a second until the client leaves."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as client:
            request = b""
            while b"\r\n\r\n" not in request:
                request += client.recv(4096)
            client.sendall(
                b"HTTP/1.0 200 OK\r\nServer: gunicorn\r\n"
                b"Content-Type: text/event-stream\r\n\r\n"
                b": stream opened\nretry: 500\n"
            )
            while not stop.wait(0.1):
                client.sendall(b": keep-alive\n")

    thread = threading.Thread(target=answer, daemon=True)
    with listener:
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            listener.close()
            thread.join(10)


def test_stream_that_works_but_lacks_what_the_app_sends_is_warned_about() -> None:
    """HTTP/1.0, a short retry and missing headers are warnings; exit status 0."""
    with odd_stream_server() as port:
        result = (
            create_app()
            .test_cli_runner()
            .invoke(
                args=[
                    "eventstream",
                    "doctor",
                    f"http://127.0.0.1:{port}{EVENTS}",
                    "--keep-alive",
                    "0.1",
                ]
            )
        )
    assert result.exit_code == 0, result.output
    expected = [
        "ok    200 OK, text/event-stream",
        "warn  the response is HTTP/1.0: a proxy on the way speaks HTTP/1.0",
        "ok    not compressed",
        "warn  Cache-Control is missing, not the app's no-cache",
        "warn  X-Accel-Buffering is missing, not the app's no",
        "ok    first bytes after ",
        "warn  retry: 500 ms brings every client back at once after a deploy.",
        "ok    keep-alive after ",
        "warn  cannot tell which gunicorn serves the URL",
    ]
    assert len(lines(result)) == len(expected), result.output
    for line, start in zip(lines(result), expected, strict=True):
        assert line.startswith(start), result.output


@pytest.mark.e2e
def test_sync_gunicorn_fails_with_the_gevent_fix(
    doctor: cabc.Callable[..., Result],
) -> None:
    """The streams flow, but the worker serves one at a time."""
    with gunicorn("-k", "sync", env={"FLASK_EVENTSTREAM_KEEPALIVE": "1"}) as server:
        result = doctor(f"{server.url}{EVENTS}")
    assert result.exit_code == 1, result.output
    (line,) = [line for line in lines(result) if line.startswith("fail")]
    assert line.startswith(
        f"fail  on port {server.port}, gunicorn's sync worker serves one request"
    )
    assert line.endswith(
        "Fix: serve streams with the gevent worker, gunicorn -k gevent."
    )
