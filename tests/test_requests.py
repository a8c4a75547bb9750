"""What a request gets when things go wrong, with each broker.

Through public behaviour only (the scenarios are in ``scenarios``), with the
in-memory broker and with a real redis-server: what holds for one broker
holds for the other.
"""

from __future__ import annotations

import typing as t
import uuid

import pytest

from . import scenarios

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from flask import Flask

    from .redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
def any_app(app: Flask, request: pytest.FixtureRequest) -> cabc.Iterator[Flask]:
    """The app with each broker (Redis on keys of its own); closed after."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("server")
        app.config.update(
            EVENTSTREAM_BROKER_URL=server.url,
            EVENTSTREAM_KEY_PREFIX=f"t{uuid.uuid4().hex}",
        )
    yield app
    if "eventstream" in app.extensions:
        app.extensions["eventstream"].broker.close()


@pytest.mark.parametrize("view", scenarios.VIEWS)
@pytest.mark.parametrize("fault", scenarios.LATE_FAULTS)
def test_stream_replaced_by_a_late_500_releases_its_subscription_and_slot(
    any_app: Flask, fault: str, view: str
) -> None:
    """A session save or after_request hook failing after the view leaks nothing."""
    scenarios.late_error_releases_the_subscription(any_app, fault, view)


@pytest.mark.parametrize("view", scenarios.VIEWS)
@pytest.mark.parametrize("how", ["HEAD", "closed-unread"])
def test_stream_never_iterated_releases_its_subscription_and_slot(
    any_app: Flask, how: str, view: str
) -> None:
    """A HEAD, or a body the server closes unread, holds no subscription or slot."""
    scenarios.unread_streams_release_the_subscription(any_app, how, view)


@pytest.mark.parametrize("kind", scenarios.UNKNOWN_IDS)
@pytest.mark.parametrize("by", scenarios.RESUME_BY)
def test_unknown_id_of_any_form_gets_a_reset_then_live_events(
    any_app: Flask, caplog: pytest.LogCaptureFixture, by: str, kind: str
) -> None:
    """An id no event carries, in any characters, is reset: no 4xx, 5xx or warning."""
    scenarios.unknown_id_gets_a_reset(any_app, caplog, by, kind)


@pytest.mark.parametrize(
    ("by", "last_event_id"),
    list(scenarios.MALFORMED_IDS.values()),
    ids=list(scenarios.MALFORMED_IDS),
)
def test_malformed_id_gets_400_and_subscribes_nothing(
    any_app: Flask, caplog: pytest.LogCaptureFixture, by: str, last_event_id: str
) -> None:
    """Over 200 characters, CR, LF, NUL or not UTF-8: 400 from endpoint and listen."""
    scenarios.malformed_id_gets_400(any_app, caplog, by, last_event_id)


@pytest.mark.parametrize("channels", [["a"], ["a", "b", "c"]], ids=["one", "three"])
@pytest.mark.parametrize("kind", scenarios.CUSTOM_IDS)
def test_id_the_app_gave_resumes_after_its_event_during_a_burst(
    any_app: Flask, kind: str, channels: list[str]
) -> None:
    """Any string is an id: a client back with one is replayed what came after."""
    scenarios.custom_id_resumes_after_its_event(any_app, kind, channels)


def test_id_the_app_gave_is_found_while_its_event_is_in_history(any_app: Flask) -> None:
    """Found in history, the latest if reused, reset once gone; bad ones refused."""
    scenarios.given_ids_are_found_while_in_history(any_app)


def test_disconnect_ends_the_streams_of_those_channels_only(any_app: Flask) -> None:
    """The endpoint's, listen()'s and a generator's streams of the channel end."""
    scenarios.disconnect_ends_the_streams_of_those_channels(any_app)
