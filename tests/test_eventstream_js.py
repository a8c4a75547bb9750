"""The browser module ``eventstream.js`` in headless Chromium.

Each test loads ``/page`` of :mod:`tests.apps.pages` (served by gunicorn's
gevent worker), calls ``watch(url, options)`` there, and reads what the
module reported from the page's ``logs``.
"""

from __future__ import annotations

import typing as t
import uuid
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import flask
import pytest
import requests
from playwright.sync_api import Browser
from playwright.sync_api import Page
from playwright.sync_api import Request
from playwright.sync_api import Route
from werkzeug.exceptions import Forbidden

from .apps.pages import APP
from .apps.pages import create_app
from .servers import ROOT
from .servers import serve
from .servers import Server
from .test_browser import browser  # noqa: F401

if t.TYPE_CHECKING:
    import collections.abc as cabc

pytestmark = [pytest.mark.e2e]

SCRIPT = ROOT / "flask_eventstream" / "static" / "eventstream.js"
#: The longest any single wait may take, in milliseconds (Playwright's unit).
WAIT_MS = 15_000
#: Restarts after an error status wait 50-100 ms, then 100-200 ms, ...
FAST = {"minDelay": 100, "maxDelay": 800}
#: What the test app's ``/cut`` and ``/failing`` send a request without an id.
FRESH = {"header": None, "query": None}
#: The ``Accept`` header of EventSource, and of the module's probe.
EVENT_STREAM = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def server() -> cabc.Iterator[Server]:
    with serve("gevent", app=APP, ready="/page") as server:
        yield server


@pytest.fixture(scope="module")
def short_server() -> cabc.Iterator[Server]:
    """A server whose ``/events`` streams end after 3 s; the browser retries
    250 ms later."""
    env = {"FLASK_EVENTSTREAM_MAX_AGE": "3", "FLASK_EVENTSTREAM_RETRY": "250"}
    with serve("gevent", app=APP, env=env, ready="/page") as server:
        yield server


@pytest.fixture
def page(browser: Browser) -> cabc.Iterator[Page]:  # noqa: F811
    """A page of its own; an uncaught exception in its script fails the test."""
    context = browser.new_context()
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
    finally:
        context.close()
    assert errors == [], "Uncaught errors in the page's script."


def test_module_is_smaller_than_4_kib() -> None:
    """The module stays small enough to read in one sitting."""
    assert SCRIPT.stat().st_size < 4096


def test_module_is_served_as_javascript_with_cache_validators() -> None:
    """The blueprint serves the shipped file with Cache-Control and an ETag,
    and answers a request that has it already with 304."""
    app = create_app()
    with app.test_request_context():
        url = flask.url_for("eventstream.script")
    client = app.test_client()
    rv = client.get(url)
    assert rv.status_code == 200
    assert rv.mimetype == "text/javascript"
    assert rv.data == SCRIPT.read_bytes()
    assert rv.headers["Cache-Control"]
    etag = rv.headers["ETag"]
    again = client.get(url, headers={"If-None-Match": etag})
    assert (again.status_code, again.data) == (304, b"")


def test_events_reach_the_handler_of_their_type_as_text(
    server: Server, page: Page
) -> None:
    """Named events go to ``events[type]``, others to ``onMessage``; the
    handle keeps the last id seen."""
    channel = _channel()
    _open(page, server)
    i = _watch(page, f"/events?channel={channel}", events=["chat"])
    _wait(page, "i => logs[i].opens === 1", i)
    chat = _publish(server, channel, '{"text": "hi"}', event="chat")
    _publish(server, channel, "nobody listens", event="other")
    plain = _publish(server, channel, "plain")
    _wait(page, "i => logs[i].received.length >= 2", i)

    log = _log(page, i)
    assert log["received"] == [
        {"type": "chat", "data": '{"text": "hi"}', "id": chat},
        {"type": "message", "data": "plain", "id": plain},
    ]
    assert log["errors"] == [] and log["opens"] == 1
    assert log["states"] == [["connecting", None], ["open", None]]
    handle = page.evaluate(
        "i => ({lastEventId: streams[i].lastEventId, state: streams[i].state})", i
    )
    assert (handle["lastEventId"], handle["state"]) == (plain, "open")


def test_json_option_parses_data_and_reports_data_that_is_not_json(
    server: Server, page: Page
) -> None:
    """With ``json: true`` handlers get parsed data; bad data goes to
    ``onError`` with status 0 and the stream goes on."""
    channel = _channel()
    _open(page, server)
    i = _watch(page, f"/events?channel={channel}", events=["chat"], json=True)
    _wait(page, "i => logs[i].opens === 1", i)
    _publish(server, channel, '{"text": "hi"}', event="chat")
    _publish(server, channel, "not json")
    _publish(server, channel, "[1, 2]")
    _wait(page, "i => logs[i].received.length >= 2", i)

    log = _log(page, i)
    assert [(r["type"], r["data"]) for r in log["received"]] == [
        ("chat", {"text": "hi"}),
        ("message", [1, 2]),
    ]
    assert len(log["errors"]) == 1
    assert log["errors"][0]["status"] == 0 and log["errors"][0]["message"]
    assert log["opens"] == 1 and log["states"][-1] == ["open", None]


def test_stream_that_ends_with_eventstream_end_is_closed_for_good(
    server: Server, page: Page
) -> None:
    """``eventstream.end`` calls ``onEnd`` and closes: no reconnect follows."""
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, "/finite?count=2", json=True)
    _wait(page, "i => logs[i].ends === 1", i)
    _wait_for_two_browser_retries(page)

    log = _log(page, i)
    assert [(r["id"], r["data"]) for r in log["received"]] == [
        ("1", {"n": 1}),
        ("2", {"n": 2}),
    ]
    assert log["states"][-1] == ["closed", None]
    assert log["errors"] == []
    assert len([r for r in seen if "/finite" in r.url]) == 1
    assert _log(page, i)["ends"] == 1, "onEnd was called again."


def test_stream_that_ends_with_a_4xx_error_is_closed_and_reports_it(
    server: Server, page: Page
) -> None:
    """An ``eventstream.error`` with a 4xx status gives ``onError`` its
    status and message, and closes: no reconnect follows."""
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, "/failing?status=403", json=True)
    _wait(page, "i => logs[i].errors.length === 1", i)
    _wait_for_two_browser_retries(page)

    log = _log(page, i)
    assert log["errors"] == [{"status": 403, "message": Forbidden.description}]
    assert [r["data"] for r in log["received"]] == [FRESH]
    assert log["states"][-1] == ["closed", None]
    assert len([r for r in seen if "/failing" in r.url]) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_stream_that_ends_with_a_5xx_error_reports_it_and_reconnects(
    server: Server, page: Page, status: int
) -> None:
    """An ``eventstream.error`` with a 5xx status is reported, and the browser
    reconnects by itself, naming the last id."""
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, f"/failing?status={status}", json=True)
    _wait(page, "i => logs[i].errors.length >= 3", i)

    log = _log(page, i)
    assert {e["status"] for e in log["errors"]} == {status}
    assert ["closed", None] not in log["states"]
    assert log["opens"] >= 3
    streams = [r for r in seen if "/failing" in r.url]
    assert len(streams) >= 3
    assert {r.url for r in streams} == {streams[0].url}
    resumed = {"header": "1", "query": None}
    assert [r["data"] for r in log["received"]][:3] == [FRESH, resumed, resumed]


def test_browser_reconnect_after_a_stream_ends_is_left_to_eventsource(
    server: Server, page: Page
) -> None:
    """After a 200 stream ends, EventSource reconnects by itself to the same
    URL with Last-Event-ID; the module starts no EventSource of its own."""
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, "/cut", json=True, **FAST)
    _wait(page, "i => logs[i].opens >= 3", i)
    page.evaluate("i => streams[i].close()", i)

    log = _log(page, i)
    assert [(r["id"], r["data"]) for r in log["received"]][:3] == [
        ("1", FRESH),
        ("2", {"header": "1", "query": None}),
        ("3", {"header": "2", "query": None}),
    ]
    streams = [r for r in seen if "/cut" in r.url][:3]
    assert {r.url for r in streams} == {f"{server.url}/cut"}
    assert ["reconnecting", None] in log["states"]
    assert all(delay is None for _, delay in log["states"])


def test_error_status_starts_a_new_event_source_that_resumes_without_loss(
    short_server: Server, page: Page
) -> None:
    """When the browser's own reconnect gets 503, the module starts a new
    EventSource with ``?lastEventId=``; events published meanwhile arrive
    once, in order, on every channel of the URL."""
    server, a, b = short_server, _channel(), _channel()
    published: list[str] = []
    streams: list[Request] = []
    probes: list[Request] = []

    def answer(route: Route) -> None:
        if route.request.method == "HEAD":
            # The proxy refuses the module's probe as it refused the stream.
            probes.append(route.request)
            route.fulfill(status=503)
            return
        streams.append(route.request)
        # The 2nd and 4th requests are the browser's own reconnects after
        # max_age, refused as by a proxy while the app restarts.
        if len(streams) in (2, 4):
            published.append(_publish(server, a, f"missed on a {len(streams)}"))
            published.append(_publish(server, b, f"missed on b {len(streams)}"))
            route.fulfill(status=503, body="Restarting.\n")
        else:
            route.continue_()

    page.route(lambda url: "/events?" in url, answer)
    _open(page, server)
    i = _watch(page, f"/events?channel={a}&channel={b}", **FAST)
    _wait(page, "i => logs[i].opens === 1", i)
    published.append(_publish(server, a, "live 1"))
    _wait(page, "i => logs[i].received.length >= 3", i)
    published.append(_publish(server, b, "live 2"))
    _wait(page, "i => logs[i].received.length >= 6", i)
    published.append(_publish(server, a, "last"))
    _wait(
        page,
        "([i, id]) => logs[i].received.some((r) => r.id === id)",
        [i, published[-1]],
    )

    log = _log(page, i)
    assert [r["id"] for r in log["received"]] == published
    assert log["resets"] == [] and log["errors"] == []
    assert _query(streams[0]) == {"channel": [a, b]}
    # Each restart names, once, the last id received before the browser gave
    # up, and keeps the channels.
    assert log["restarts"][0] == published[0] and None not in log["restarts"]
    for restart, last in zip((2, 4), log["restarts"], strict=True):
        assert _query(streams[restart]) == {"channel": [a, b], "lastEventId": [last]}
    # Before each restart, one probe of the URL the restart then opened.
    assert [p.url for p in probes] == [streams[2].url, streams[4].url]


def test_restarts_back_off_exponentially_and_start_over_after_an_open(
    server: Server, page: Page
) -> None:
    """Each refused restart doubles the delay, up to ``maxDelay``, each wait
    drawn from its upper half; a stream that opens resets it."""
    refused = {1, 2, 3, 4, 5, 7}
    streams: list[Request] = []

    def answer(route: Route) -> None:
        if route.request.method == "HEAD":
            # The proxy refuses the module's probe as it refused the stream.
            route.fulfill(status=502)
            return
        streams.append(route.request)
        if len(streams) in refused:
            route.fulfill(status=502, body="Bad gateway.\n")
        else:
            route.continue_()

    page.route(lambda url: "/cut" in url, answer)
    _open(page, server)
    i = _watch(page, "/cut", json=True, minDelay=40, maxDelay=300)
    _wait(page, "i => logs[i].opens >= 2", i)
    page.evaluate("i => streams[i].close()", i)

    log = _log(page, i)
    delays = [delay for _, delay in log["states"] if delay is not None]
    ceilings = [40, 80, 160, 300, 300, 40]
    assert len(delays) == len(ceilings)
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    # The 6th request opened, got id 1, ended; the browser's own retry was
    # refused, and the module's restart names that id.
    assert _query(streams[7]) == {"lastEventId": ["1"]}
    assert [(r["id"], r["data"]) for r in log["received"]][:2] == [
        ("1", FRESH),
        ("2", {"header": None, "query": "1"}),
    ]
    assert log["states"][-1] == ["closed", None]


def test_close_stops_a_pending_restart(server: Server, page: Page) -> None:
    """``close()`` while a restart is waiting cancels it for good."""
    seen = _requests(page)
    page.route(
        lambda url: "/cut?closed" in url,
        lambda route: route.fulfill(status=503, body="Busy.\n"),
    )
    _open(page, server)
    i = _watch(page, "/cut?closed", minDelay=200, maxDelay=200)
    _wait(page, "i => logs[i].states.some(([, delay]) => delay !== null)", i)
    page.evaluate("i => streams[i].close()", i)
    _wait_for_two_browser_retries(page)

    log = _log(page, i)
    assert log["states"][-1] == ["closed", None]
    assert len(_sent(seen, "/cut?closed")) == 1
    assert len(_sent(seen, "/cut?closed", "HEAD")) == 1


def test_stream_answered_with_204_has_finished_and_is_closed_for_good(
    server: Server, page: Page
) -> None:
    """A 204 stops EventSource; the module's probe gets 204 too, so it calls
    ``onEnd`` and closes: no request follows."""
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, "/refused?status=204", **FAST)
    _wait(page, "i => logs[i].states.length >= 2", i)
    _wait_for_two_browser_retries(page)

    log = _log(page, i)
    assert log["states"] == [["connecting", None], ["closed", None]]
    assert (log["ends"], log["errors"], log["opens"]) == (1, [], 0)
    assert len(_sent(seen, "/refused")) == 1
    probes = _sent(seen, "/refused", "HEAD")
    assert [p.url for p in probes] == [f"{server.url}/refused?status=204"]
    assert probes[0].all_headers()["accept"] == "text/event-stream"


@pytest.mark.parametrize("status", [403, 404])
def test_stream_refused_with_a_4xx_status_reports_it_and_is_closed_for_good(
    server: Server, page: Page, status: int
) -> None:
    """A 4xx (not 408 or 429) before the stream opens gives ``onError`` the
    status and its status text, and closes: no request follows."""
    url = f"/refused?status={status}"
    reason = requests.head(f"{server.url}{url}", headers=EVENT_STREAM, timeout=5).reason
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, url, **FAST)
    _wait(page, "i => logs[i].states.length >= 2", i)
    _wait_for_two_browser_retries(page)

    log = _log(page, i)
    assert log["states"] == [["connecting", None], ["closed", None]]
    assert reason and log["errors"] == [{"status": status, "message": reason}]
    assert (log["ends"], log["opens"]) == (0, 0)
    assert len(_sent(seen, "/refused")) == 1
    assert len(_sent(seen, "/refused", "HEAD")) == 1


@pytest.mark.parametrize("status", [502, 503, 408, 429])
def test_stream_refused_with_a_status_that_may_pass_is_restarted_with_backoff(
    server: Server, page: Page, status: int
) -> None:
    """After a 5xx, a 408 or a 429, and the same answer to the probe, the
    module starts a new EventSource after a growing delay, again and again."""
    url = f"{server.url}/refused?status={status}"
    seen = _requests(page)
    _open(page, server)
    i = _watch(page, url, **FAST)
    _wait(page, "i => logs[i].restarts.length >= 3", i)
    page.evaluate("i => streams[i].close()", i)

    log = _log(page, i)
    delays = [delay for _, delay in log["states"] if delay is not None]
    for delay, ceiling in zip(delays[:3], [100, 200, 400], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert (log["errors"], log["ends"], log["opens"]) == ([], 0, 0)
    streams, probes = _sent(seen, "/refused"), _sent(seen, "/refused", "HEAD")
    assert len(streams) >= 3 and len(probes) >= 3
    assert {r.url for r in streams + probes} == {url}


def test_probe_that_gets_no_answer_is_followed_by_a_restart(
    server: Server, page: Page
) -> None:
    """A probe that fails, as with the network down or a response that CORS
    hides, counts as a refusal that may pass: the module starts again."""
    seen = _requests(page)

    def answer(route: Route) -> None:
        if route.request.method == "HEAD":
            route.abort("connectionrefused")
        else:
            route.continue_()

    page.route(lambda url: "/refused" in url, answer)
    _open(page, server)
    i = _watch(page, "/refused?status=503", **FAST)
    _wait(page, "i => logs[i].restarts.length >= 2", i)
    page.evaluate("i => streams[i].close()", i)

    log = _log(page, i)
    assert (log["errors"], log["ends"], log["opens"]) == ([], 0, 0)
    assert len(_sent(seen, "/refused")) >= 2
    assert len(_sent(seen, "/refused", "HEAD")) >= 2


@pytest.mark.parametrize("status", [204, 403, 503])
def test_close_while_the_probe_is_under_way_is_the_last_word(
    server: Server, page: Page, status: int
) -> None:
    """``close()`` before the probe has its answer: whatever the answer, no
    callback and no request follow."""
    seen = _requests(page)

    def answer(route: Route) -> None:
        if route.request.method == "HEAD":
            # The probe is on its way; the page closes before it is answered.
            page.evaluate("() => streams.forEach((stream) => stream.close())")
        route.continue_()

    page.route(lambda url: "/refused" in url, answer)
    _open(page, server)
    i = _watch(page, f"/refused?status={status}", **FAST)
    _wait(page, "i => logs[i].states.length >= 2", i)
    probes = _sent(seen, "/refused", "HEAD")
    assert len(probes) == 1
    response = probes[0].response()
    assert response is not None and response.status == status
    _wait_for_two_browser_retries(page)

    log = _log(page, i)
    assert log["states"] == [["connecting", None], ["closed", None]]
    assert (log["errors"], log["ends"], log["opens"]) == ([], 0, 0)
    assert len(_sent(seen, "/refused")) == 1
    assert len(_sent(seen, "/refused", "HEAD")) == 1


def test_reset_is_reported_when_the_server_cannot_resume(
    server: Server, page: Page
) -> None:
    """An id the server does not know gives ``onReset`` the event, whose data
    is that id; the stream goes on."""
    channel = _channel()
    _open(page, server)
    i = _watch(page, f"/events?channel={channel}", lastEventId="1-0")
    _wait(page, "i => logs[i].resets.length === 1", i)
    event_id = _publish(server, channel, "after the reset")
    _wait(page, "i => logs[i].received.length === 1", i)

    log = _log(page, i)
    assert log["resets"] == ["1-0"]
    assert log["received"] == [
        {"type": "message", "data": "after the reset", "id": event_id}
    ]
    assert page.evaluate("i => streams[i].lastEventId", i) == event_id


def test_restart_after_a_reset_names_the_id_that_was_lost_again(
    short_server: Server, page: Page
) -> None:
    """Until an event with an id arrives, a restart names the id the stream
    was started from, so a later loss is reported too, not hidden."""
    server, channel = short_server, _channel()
    streams: list[Request] = []

    def answer(route: Route) -> None:
        streams.append(route.request)
        if len(streams) == 2:
            route.fulfill(status=503, body="Restarting.\n")
        else:
            route.continue_()

    page.route(lambda url: "/events?" in url, answer)
    _open(page, server)
    i = _watch(page, f"/events?channel={channel}", lastEventId="1-0", **FAST)
    _wait(page, "i => logs[i].opens >= 2 && logs[i].resets.length >= 2", i)

    log = _log(page, i)
    assert log["resets"] == ["1-0", "1-0"] and log["received"] == []
    assert _query(streams[2]) == {"channel": [channel], "lastEventId": ["1-0"]}
    assert page.evaluate("i => streams[i].lastEventId", i) == "1-0"


def _channel() -> str:
    """A channel of its own for each use, so tests sharing a server never meet."""
    return f"test.{uuid.uuid4().hex[:12]}"


def _open(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/page")
    page.wait_for_function("typeof window.watch === 'function'", timeout=WAIT_MS)


def _watch(page: Page, url: str, **options: t.Any) -> int:
    return t.cast(
        int, page.evaluate("([url, options]) => watch(url, options)", [url, options])
    )


def _query(request: Request) -> dict[str, list[str]]:
    return parse_qs(urlsplit(request.url).query)


def _log(page: Page, i: int) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], page.evaluate("i => logs[i]", i))


def _wait(page: Page, condition: str, arg: t.Any) -> None:
    page.wait_for_function(condition, arg=arg, timeout=WAIT_MS)


def _wait_for_two_browser_retries(page: Page) -> None:
    """Wait until a stream that the browser retries after the same delay as
    the one under test has been retried twice: had the one under test been
    retried, that would have happened by then too."""
    i = _watch(page, f"/cut?control={uuid.uuid4().hex}")
    _wait(page, "i => logs[i].opens >= 3", i)
    page.evaluate("i => streams[i].close()", i)


def _requests(page: Page) -> list[Request]:
    """Every request the page makes, in order."""
    seen: list[Request] = []
    page.on("request", lambda request: seen.append(request))
    return seen


def _sent(seen: list[Request], part: str, method: str = "GET") -> list[Request]:
    """The requests in ``seen`` made with ``method`` to a URL containing ``part``."""
    return [r for r in seen if part in r.url and r.method == method]


def _publish(server: Server, channel: str, data: str, event: str | None = None) -> str:
    form = {"channel": channel, "data": data}
    if event is not None:
        form["event"] = event
    rv = requests.post(f"{server.url}/publish", data=form, timeout=5)
    assert rv.status_code == 200, rv.text
    return t.cast(str, rv.json()["id"])
