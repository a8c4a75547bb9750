from __future__ import annotations

import typing as t

import pytest
from flask import Flask

from flask_eventstream import Event

if t.TYPE_CHECKING:
    from flask.testing import FlaskClient

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
