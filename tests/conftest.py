from __future__ import annotations

import typing as t

import pytest
from flask import Flask

if t.TYPE_CHECKING:
    from flask.testing import FlaskClient


@pytest.fixture
def app() -> Flask:
    app = Flask(__name__)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
