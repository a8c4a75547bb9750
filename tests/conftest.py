from __future__ import annotations

import typing as t
import uuid

import pytest
from flask import Flask

from flask_eventstream import Event

from .redis_server import redis_server

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask.testing import FlaskClient

    from .redis_server import RedisServer

# The scenarios that several test modules run assert like tests do.
pytest.register_assert_rewrite("tests.scenarios")


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> list[Event]:
    """Every event encoded while the test runs, in order."""
    encoded: list[Event] = []
    encode = Event.encode

    def counting(self: Event) -> bytes:
        encoded.append(self)
        return encode(self)

    monkeypatch.setattr(Event, "encode", counting)
    return encoded


@pytest.fixture(scope="module")
def server() -> cabc.Iterator[RedisServer]:
    """A redis-server for the module's tests; modules that serve something
    else under this name define their own."""
    with redis_server() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """Redis keys of the test's own."""
    return f"t{uuid.uuid4().hex}"
