"""``flask eventstream ...`` against a real redis-server."""

from __future__ import annotations

import re
import time
import typing as t

import pytest
import redis
from flask import Flask

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream.concurrency import THREADS
from flask_eventstream.parser import parse
from flask_eventstream.settings import EventStreamState

from .redis_server import RedisServer

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from click.testing import Result

    from flask_eventstream.brokers.fanout import Subscription


@pytest.fixture
def redis_app(app: Flask, server: RedisServer, prefix: str) -> cabc.Iterator[Flask]:
    """An app with a registered EventStream on the test's Redis keys."""
    app.config.update(EVENTSTREAM_BROKER_URL=server.url, EVENTSTREAM_KEY_PREFIX=prefix)
    app.register_blueprint(EventStream(), url_prefix="/events")
    yield app
    state(app).broker.close()


@pytest.fixture
def sub(redis_app: Flask) -> cabc.Iterator[Subscription]:
    """A subscription to channel ``room`` on the app's own broker."""
    sub = state(redis_app).broker.subscribe(["room"], backend=THREADS)
    yield sub
    sub.close()


def state(app: Flask) -> EventStreamState:
    return t.cast(EventStreamState, app.extensions["eventstream"])


def publish(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["eventstream", "publish", *args])


def wire(sub: Subscription, count: int, timeout: float = 5.0) -> bytes:
    """The wire bytes of ``count`` events on ``sub``; fail clearly if they
    do not arrive.

    Events pass through the broker's reader thread, so they arrive a moment
    after the command returns.
    """
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(chunks) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"Expected {count} events, got {chunks!r}.")
        chunks += sub.take(0.2)
    return b"".join(chunks)


def delivered(sub: Subscription, count: int) -> list[Event]:
    return list(parse(wire(sub, count)))


def streams(server: RedisServer, prefix: str) -> list[str]:
    """The Redis streams under ``prefix``: one per channel that got an event."""
    with redis.Redis.from_url(server.url, decode_responses=True) as client:
        return list(client.scan_iter(f"{prefix}:*", _type="stream"))


@pytest.mark.parametrize(
    ("data", "compact"),
    [
        ('{"a": 1}', '{"a":1}'),
        (
            '{ "z": [1, 2.5, null],\n  "a": "café ☕" }',
            '{"z":[1,2.5,null],"a":"café ☕"}',
        ),
        ('"two\\nlines"', '"two\\nlines"'),
        (" 42 ", "42"),
    ],
)
def test_publish_json_sends_the_compact_encoding_and_plain_data_as_given(
    redis_app: Flask, sub: Subscription, data: str, compact: str
) -> None:
    """With ``--json`` DATA goes out compact, keys in order and unescaped;
    without it, as typed."""
    result = publish(redis_app, "room", data, "--json")
    assert result.exit_code == 0, result.output
    assert wire(sub, 1).endswith(f"data: {compact}\n\n".encode())
    result = publish(redis_app, "room", data)
    assert result.exit_code == 0, result.output
    (event,) = delivered(sub, 1)
    assert event.data == data


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ('{"a": }', "Expecting value: line 1 column 7 (char 6)"),
        ("{'a': 1}", "Expecting property name enclosed in double quotes: line 1"),
        ("[1,\n 2", "Expecting ',' delimiter: line 2 column 3 (char 6)"),
        ("hello", "Expecting value: line 1 column 1 (char 0)"),
        ("NaN", "Out of range float values are not JSON compliant"),
        ("1e999", "Out of range float values are not JSON compliant"),
    ],
)
def test_publish_json_refuses_what_is_not_json_and_publishes_nothing(
    redis_app: Flask, server: RedisServer, prefix: str, data: str, error: str
) -> None:
    """Invalid JSON is a usage error that names ``--json`` and where it fails."""
    result = publish(redis_app, "room", data, "--json")
    assert result.exit_code == 2
    assert "Invalid value for 'DATA'" in result.output
    assert "'--json'" in result.output
    assert error in result.output
    assert streams(server, prefix) == []


def test_publish_sets_retry_beside_event_and_json(
    redis_app: Flask, sub: Subscription
) -> None:
    """``--retry`` is the event's ``retry:`` field, in milliseconds."""
    args = ["room", "[1, 2]", "--json", "--event", "note", "--retry", "2500"]
    result = publish(redis_app, *args)
    assert result.exit_code == 0, result.output
    assert (
        wire(sub, 1)
        == (
            f"event: note\nid: {result.output.strip()}\nretry: 2500\ndata: [1,2]\n\n"
        ).encode()
    )


@pytest.mark.parametrize(
    ("retry", "error"),
    [("-1", "-1 is not in the range x>=0"), ("1.5s", "'1.5s' is not a valid integer")],
)
def test_publish_refuses_a_retry_that_is_not_a_non_negative_integer(
    redis_app: Flask, server: RedisServer, prefix: str, retry: str, error: str
) -> None:
    """click refuses the value before anything is published."""
    result = publish(redis_app, "room", "hello", "--retry", retry)
    assert result.exit_code == 2
    assert f"Invalid value for '--retry': {error}" in result.output
    assert streams(server, prefix) == []


def test_publish_passes_an_id_of_the_apps_choosing_on(
    redis_app: Flask, server: RedisServer, prefix: str, sub: Subscription
) -> None:
    """Any id of 1-200 characters is the event's id; a longer one is refused."""
    result = publish(redis_app, "room", "hello", "--id", "order-42")
    assert result.exit_code == 0, result.output
    assert result.output == "order-42\n"
    (event,) = delivered(sub, 1)
    assert (event.id, event.data) == ("order-42", "hello")
    before = streams(server, prefix)
    result = publish(redis_app, "room", "hello", "--id", "x" * 201)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert streams(server, prefix) == before


@pytest.mark.parametrize("args", [["publish", "room", "hello"], ["stats"]])
def test_memory_broker_error_names_the_config_key_and_environment_variable(
    app: Flask, args: list[str]
) -> None:
    """Both ways to give an app a Redis broker are named."""
    app.register_blueprint(EventStream(), url_prefix="/events")
    result = app.test_cli_runner().invoke(args=["eventstream", *args])
    assert result.exit_code == 1
    assert re.search("(?<!FLASK_)EVENTSTREAM_BROKER_URL=redis://", result.output)
    assert "app.config.from_prefixed_env()" in result.output
    assert "FLASK_EVENTSTREAM_BROKER_URL=redis://" in result.output
