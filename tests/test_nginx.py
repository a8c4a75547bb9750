"""Streams behind Debian's nginx, configured as ``docs/deploying.rst`` says.

The ``location`` block of the docs is served word for word; besides it,
nginx passes on only ``/page``, so every stream request reaches the app
through the documented location or not at all. gunicorn runs on a port of
its own, and the tests stop it and start it again there, as a deployment
does behind the proxy.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import textwrap
import typing as t
import uuid

import pytest
import requests
from flask import url_for
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PageTimeout

from flask_eventstream import EventStream

from .apps.pages import APP
from .apps.pages import create_app
from .nginx import DocsChanged
from .nginx import documented_location
from .nginx import Location
from .nginx import Nginx
from .nginx import run_nginx
from .redis_server import redis_server
from .servers import command
from .servers import free_port
from .servers import ROOT
from .servers import stop_group
from .servers import wait_for
from .test_browser import browser  # noqa: F401
from .test_browser import new_page  # noqa: F401

if t.TYPE_CHECKING:
    import collections.abc as cabc
    from pathlib import Path

pytestmark = [pytest.mark.e2e]

#: The longest any single wait in the browser may take, in milliseconds.
WAIT_MS = 30_000
#: What an EventSource sends.
EVENT_STREAM = {"Accept": "text/event-stream"}
#: The browser waits half a second before its own reconnects.
SHORT_DELAYS = {"FLASK_EVENTSTREAM_RETRY": "500"}
#: The browser module waits at most two seconds before a new EventSource.
BACKOFF = {"minDelay": 200, "maxDelay": 2000}


class Upstream:
    """gunicorn's gevent worker on one port, stopped and started at will.

    :param env: environment variables for the app, on top of this process's.
    :param log: where gunicorn's output goes, across restarts.
    """

    def __init__(self, env: dict[str, str], log: t.IO[bytes]) -> None:
        self.port = free_port()
        # The app reads FLASK_* settings from the environment; a developer's
        # own must not change what the tests see.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
        self.env.update(env, PYTHONUNBUFFERED="1")
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            command("gevent", self.port, APP),
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._answers, 60, "gunicorn answers", poll=0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None

    def publish(self, channel: str, data: str) -> str:
        """Publish through the app's own route, inside the worker."""
        rv = requests.post(
            f"{self.url}/publish", data={"channel": channel, "data": data}, timeout=10
        )
        rv.raise_for_status()
        return t.cast(str, rv.json()["id"])

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            self.log.seek(0)
            output = self.log.read().decode("utf-8", "replace")
            raise RuntimeError(f"gunicorn exited:\n{output}")
        try:
            return requests.get(f"{self.url}/page", timeout=5).ok
        except requests.RequestException:
            return False


@contextlib.contextmanager
def upstream(env: dict[str, str]) -> cabc.Iterator[Upstream]:
    """Start gunicorn; stop it when the block ends, whatever its state."""
    with tempfile.TemporaryFile() as log:
        server = Upstream(env, log)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def location() -> Location:
    return documented_location()


def stream_url(channel: str) -> str:
    """The path of the blueprint's endpoint, as the app builds it for pages."""
    with create_app().test_request_context():
        return url_for("eventstream.subscribe", channel=channel)


@contextlib.contextmanager
def proxy(location: Location, server: Upstream) -> cabc.Iterator[Nginx]:
    """nginx with the documented location, and ``/page`` for the browser."""
    page = f"location = /page {{\n    proxy_pass http://{location.upstream};\n}}"
    with run_nginx({location.upstream: server.port}, [location.text, page]) as nginx:
        yield nginx


def watch(page: Page, nginx: Nginx, url: str) -> int:
    """Open the test page through nginx and connect to ``url`` with the module."""
    page.goto(f"{nginx.url}/page")
    page.wait_for_function("() => typeof window.watch === 'function'", timeout=WAIT_MS)
    return t.cast(int, page.evaluate("([u, o]) => watch(u, o)", [url, BACKOFF]))


def log(page: Page, index: int) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], page.evaluate("i => logs[i]", index))


def wait_in_page(page: Page, index: int, condition: str, what: str) -> None:
    """Wait until ``condition``, JavaScript about ``log``, holds in the page."""
    try:
        page.wait_for_function(
            f"i => {{ const log = logs[i]; return {condition}; }}",
            arg=index,
            timeout=WAIT_MS,
        )
    except PageTimeout as e:
        raise AssertionError(f"{what}; the page logged {log(page, index)}") from e


def gave_up_and_waits(page: Page, index: int) -> None:
    """Wait until EventSource gave up and the module waits to start anew."""
    wait_in_page(
        page,
        index,
        "log.states.some(([state, delay]) => state === 'reconnecting'"
        " && delay !== null)",
        "The browser module never had to start a new EventSource",
    )


def proxy_status(nginx: Nginx, path: str) -> int:
    rv = requests.get(f"{nginx.url}{path}", headers=EVENT_STREAM, timeout=10)
    return rv.status_code


UPSTREAM = "upstream app {\n    server 127.0.0.1:8000;\n}\n"
LOCATION = "location /events {\n    proxy_pass http://app;\n}\n"


def _page(*blocks: str) -> str:
    """An rST page with each of ``blocks`` in a code block of its own."""
    return "".join(
        "Text.\n\n.. code-block:: nginx\n\n"
        + "".join(f"    {line}\n" for line in block.splitlines())
        + "\nMore text.\n"
        for block in blocks
    )


def test_documented_location_is_read_with_its_upstream(tmp_path: Path) -> None:
    """The block comes out whole, dedented, whatever surrounds it."""
    location = LOCATION.replace("{\n", '{\n    # Not its end: } "}"\n', 1)
    server = f"server {{\n{textwrap.indent(location, '    ')}}}\n"
    docs = tmp_path / "deploying.rst"
    docs.write_text(_page(UPSTREAM + "\n" + server))
    found = documented_location(docs)
    assert found.upstream == "app"
    assert found.text == location.strip()


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ((UPSTREAM,), "exactly one nginx 'location' block"),
        ((UPSTREAM + LOCATION, LOCATION), "exactly one nginx 'location' block"),
        ((LOCATION.replace("app", "127.0.0.1:8000"),), "proxy_pass http://<upstream"),
        ((LOCATION,), "should define 'upstream app'"),
        ((UPSTREAM + LOCATION.rstrip("}\n"),), "no closing brace"),
    ],
)
def test_docs_of_another_shape_fail_saying_what_changed(
    tmp_path: Path, blocks: tuple[str, ...], message: str
) -> None:
    """The tests refuse to run an nginx example they cannot read as documented."""
    docs = tmp_path / "deploying.rst"
    docs.write_text(_page(*blocks))
    with pytest.raises(DocsChanged, match=re.escape(message)):
        documented_location(docs)


def test_documented_location_streams_at_once_without_a_redirect(
    location: Location,
) -> None:
    """An EventSource request to the documented location gets the stream.

    Status 200 and ``text/event-stream`` with no redirect on the way, and
    the opening comment arrives before there is any event: nginx passes
    bytes on as they come.
    """
    channel = f"c{uuid.uuid4().hex}"
    url = stream_url(channel)
    with (
        upstream({}) as server,
        proxy(location, server) as nginx,
        requests.get(
            f"{nginx.url}{url}",
            headers=EVENT_STREAM,
            stream=True,
            allow_redirects=False,
            timeout=30,
        ) as rv,
    ):
        assert (rv.status_code, rv.history) == (200, []), rv.headers
        assert rv.headers["Content-Type"].startswith("text/event-stream")
        chunks = rv.iter_content(chunk_size=None)
        received = b""
        # Each read is bounded by the timeout above: nothing has been
        # published yet, so only an unbuffered proxy lets this through.
        while b": stream opened" not in received:
            received += next(chunks)
        server.publish(channel, "through nginx")
        while b"data: through nginx\n\n" not in received:
            received += next(chunks)


def test_page_behind_nginx_gets_every_event_published_while_the_app_restarts(
    location: Location,
    new_page: t.Callable[[], Page],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn stops, nginx answers 502, events are published; once the app is
    back the page has each of them, once and in order (Redis broker).
    """
    channel = f"c{uuid.uuid4().hex}"
    url = stream_url(channel)
    with redis_server() as redis:
        env = {
            **SHORT_DELAYS,
            "FLASK_EVENTSTREAM_BROKER_URL": redis.url,
            "FLASK_EVENTSTREAM_KEY_PREFIX": f"t{uuid.uuid4().hex}",
        }
        # The test publishes as any process that shares the Redis can: with
        # the app's own settings, in an app context of its own.
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        publisher = create_app()
        sse = t.cast(EventStream, publisher.blueprints["eventstream"])

        def publish(data: str) -> str:
            with publisher.app_context():
                return sse.publish(data, channel=channel)

        try:
            with upstream(env) as server, proxy(location, server) as nginx:
                page = new_page()
                index = watch(page, nginx, url)
                wait_in_page(page, index, "log.opens === 1", "The stream did not open")
                sent = [publish(f"before {n}") for n in range(3)]
                wait_in_page(page, index, "log.received.length === 3", "No events")

                server.stop()
                assert proxy_status(nginx, url) == 502
                gave_up_and_waits(page, index)
                sent += [publish(f"meanwhile {n}") for n in range(3)]

                server.start()
                wait_in_page(
                    page, index, "log.received.length >= 6", "The page did not resume"
                )
                # One more, so that a repeat of an earlier event would have
                # arrived before it.
                sent.append(publish("after"))
                wait_in_page(
                    page, index, "log.received.length >= 7", "No live event after"
                )
                record = log(page, index)
        finally:
            publisher.extensions["eventstream"].broker.close()

    texts = [f"before {n}" for n in range(3)]
    texts += [f"meanwhile {n}" for n in range(3)]
    assert [(e["id"], e["data"]) for e in record["received"]] == list(
        zip(sent, [*texts, "after"], strict=True)
    )
    assert (record["resets"], record["errors"], record["ends"]) == ([], [], 0)
    assert record["opens"] >= 2


def test_page_behind_nginx_is_told_of_the_reset_after_a_memory_broker_restart(
    location: Location,
    new_page: t.Callable[[], Page],  # noqa: F811
) -> None:
    """With the in-memory broker the restarted app cannot resume: ``onReset``."""
    channel = f"c{uuid.uuid4().hex}"
    url = stream_url(channel)
    with upstream(SHORT_DELAYS) as server, proxy(location, server) as nginx:
        page = new_page()
        index = watch(page, nginx, url)
        wait_in_page(page, index, "log.opens === 1", "The stream did not open")
        last = server.publish(channel, "before")
        wait_in_page(page, index, "log.received.length === 1", "No event")

        server.stop()
        assert proxy_status(nginx, url) == 502
        gave_up_and_waits(page, index)

        server.start()
        wait_in_page(page, index, "log.resets.length === 1", "No reset")
        after = server.publish(channel, "after")
        wait_in_page(page, index, "log.received.length === 2", "No live event after")
        record = log(page, index)

    assert last in record["resets"][0]
    assert [(e["id"], e["data"]) for e in record["received"]] == [
        (last, "before"),
        (after, "after"),
    ]
    assert (record["errors"], record["ends"]) == ([], 0)
