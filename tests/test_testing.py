"""``flask_eventstream.testing`` and the package's public names."""

from __future__ import annotations

import threading
import typing as t

import pytest
from flask import Flask

import flask_eventstream
from flask_eventstream import Event
from flask_eventstream import stream_events
from flask_eventstream.testing import read_events

if t.TYPE_CHECKING:
    from flask.testing import FlaskClient


def test_public_names_match_the_docs() -> None:
    """``__all__`` lists exactly what the API docs promise."""
    assert sorted(flask_eventstream.__all__) == [
        "BrokerError",
        "Event",
        "EventStream",
        "metrics_view",
        "stream_events",
    ]


def test_read_events_keeps_extra_events_for_the_next_call(
    app: Flask, client: FlaskClient
) -> None:
    """Events past ``count`` are not lost between calls."""

    @app.get("/s")
    @stream_events
    def s() -> t.Iterator[Event]:
        for n in range(5):
            yield Event(str(n), id=str(n))

    with client.get("/s") as rv:
        assert [e.data for e in read_events(rv, 2)] == ["0", "1"]
        assert [e.data for e in read_events(rv, 2)] == ["2", "3"]
        # The stream ends after one more and the end event: fewer than
        # asked for, no waiting.
        assert [(e.event, e.data) for e in read_events(rv, 9)] == [
            ("message", "4"),
            ("eventstream.end", "{}"),
        ]


def test_read_events_times_out_on_a_silent_stream(
    app: Flask, client: FlaskClient
) -> None:
    """A stream that sends nothing fails the read instead of hanging it."""
    release = threading.Event()

    @app.get("/s")
    @stream_events(keep_alive=None)
    def s() -> t.Iterator[str]:
        release.wait(10)
        yield "late"

    with client.get("/s") as rv:
        with pytest.raises(TimeoutError, match="Expected 1 events"):
            read_events(rv, 1, timeout=0.2)
        release.set()
        assert [e.data for e in read_events(rv, 1)] == ["late"]


def test_read_events_refuses_a_negative_count(app: Flask, client: FlaskClient) -> None:
    """A negative count is a mistake, named as such."""
    with pytest.raises(ValueError, match="count"):
        read_events(client.get("/"), -1)
