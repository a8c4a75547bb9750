"""The demo chat in a real browser: headless Chromium driven by Playwright.

Chromium is Debian's, at ``/usr/bin/chromium``; Playwright never downloads
one. The demo app runs under gunicorn's gevent worker.
"""

from __future__ import annotations

import os
import time
import typing as t
import uuid

import pytest
import requests
from playwright.sync_api import Browser
from playwright.sync_api import BrowserContext
from playwright.sync_api import expect
from playwright.sync_api import Page
from playwright.sync_api import Request
from playwright.sync_api import Route
from playwright.sync_api import sync_playwright

from .servers import serve
from .servers import Server

if t.TYPE_CHECKING:
    import collections.abc as cabc

pytestmark = [pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APP = "example_app:create_app()"
#: The longest any single wait may take, in milliseconds (Playwright's unit).
WAIT_MS = 10_000
#: Every stream ends after 3 s and the browser waits 2 s to reconnect.
SHORT_STREAMS = {"FLASK_EVENTSTREAM_MAX_AGE": "3", "FLASK_EVENTSTREAM_RETRY": "2000"}

NewPage = t.Callable[[], Page]


@pytest.fixture(scope="module")
def browser() -> cabc.Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"The browser tests need Chromium at {CHROMIUM}; install Debian's"
            " 'chromium' package (Playwright's own download is not used)."
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def chat_server() -> cabc.Iterator[Server]:
    with serve("gevent", app=APP, ready="/") as server:
        yield server


@pytest.fixture
def short_server() -> cabc.Iterator[Server]:
    """A server whose streams end after 3 s; the browser waits 2 s to reconnect.

    Tests list it before ``new_page``, so their pages close first: an open
    page keeps the server's graceful stop waiting on its connections.
    """
    with serve("gevent", app=APP, env=SHORT_STREAMS, ready="/") as server:
        yield server


@pytest.fixture
def new_page(browser: Browser) -> cabc.Iterator[NewPage]:
    """Open pages, each in its own context like a separate user's browser.

    An uncaught exception in any page's script fails the test.
    """
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_page() -> Page:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        return page

    try:
        yield open_page
    finally:
        for context in contexts:
            context.close()
    assert errors == [], "Uncaught errors in the page's script."


def test_message_sent_from_one_page_appears_in_both(
    chat_server: Server, new_page: NewPage
) -> None:
    """A message sent with the form reaches every page open on the room."""
    room = _room()
    reader = _open_chat(new_page(), chat_server, room)
    writer = _open_chat(new_page(), chat_server, room)
    writer.fill("input[name=name]", "bob")
    writer.fill("input[name=text]", "hello from page 2")
    writer.click("#send button")
    for page in (reader, writer):
        items = page.locator("#messages li")
        expect(items).to_have_count(1, timeout=WAIT_MS)
        expect(items).to_have_text(["bob: hello from page 2"])
    expect(writer.locator("input[name=text]")).to_have_value("")
    ids = {_ids(page)[0] for page in (reader, writer)}
    assert len(ids) == 1 and "" not in ids


def test_message_text_is_shown_as_text_not_html_or_stream_fields(
    chat_server: Server, new_page: NewPage
) -> None:
    """Markup and line breaks in a message stay text; nothing is injected."""
    room = _room()
    page = _open_chat(new_page(), chat_server, room)
    text = "<b>x</b>\nline2\r\ndata: injected"
    event_id = _post(chat_server, room, text, name="<i>eve</i>")
    items = page.locator("#messages li")
    expect(items).to_have_count(1, timeout=WAIT_MS)
    assert _ids(page) == [event_id]
    assert items.locator(".text").text_content() == text
    assert items.locator(".name").text_content() == "<i>eve</i>"
    expect(page.locator("#messages b, #messages i")).to_have_count(0)
    expect(page.locator("#notice")).to_be_hidden()


def test_browser_reconnects_after_max_age_and_replays_missed_messages(
    short_server: Server, new_page: NewPage
) -> None:
    """After a stream ends, Chromium resumes with Last-Event-ID: no loss, no dup."""
    server, room = short_server, _room()
    page = new_page()
    streams = _stream_requests(page)
    _open_chat(page, server, room)
    first = _post(server, room, "before the break")
    items = page.locator("#messages li")
    expect(items).to_have_count(1, timeout=WAIT_MS)
    state = page.locator("#state")
    expect(state).to_have_text("reconnecting", timeout=WAIT_MS)
    assert len(streams) == 1, "The first stream ended before max_age."

    missed = [_post(server, room, f"while away {n}") for n in range(3)]
    # The browser waits 2 s before reconnecting; the posts take far less.
    assert state.text_content() == "reconnecting", "Posted after the reconnect."
    expect(items).to_have_count(4, timeout=WAIT_MS)

    texts = ["before the break", *(f"while away {n}" for n in range(3))]
    assert _ids(page) == [first, *missed]
    assert items.locator(".text").all_text_contents() == texts
    for event_id, text in zip([first, *missed], texts, strict=True):
        expect(page.locator(f"#messages li[data-id='{event_id}']")).to_have_count(1)
        expect(items.filter(has_text=text)).to_have_count(1)
    expect(page.locator("#notice")).to_be_hidden()
    # Chromium reconnected by itself, to the same URL, naming the last id.
    reconnect = streams[1]
    assert reconnect.url == streams[0].url
    assert reconnect.all_headers().get("last-event-id") == first
    assert "last-event-id" not in streams[0].all_headers()


def test_page_restarts_its_event_source_after_an_error_status(
    short_server: Server, new_page: NewPage
) -> None:
    """A 503 stops EventSource for good; the page starts anew from its last id."""
    server, room = short_server, _room()
    page = new_page()
    streams: list[str] = []

    def answer(route: Route) -> None:
        streams.append(route.request.url)
        if len(streams) == 2:
            # The browser's own reconnect is refused, as by a busy server.
            route.fulfill(status=503, body="Too many open streams.\n")
        else:
            route.continue_()

    page.route(lambda url: "/events?" in url, answer)
    _open_chat(page, server, room)
    first = _post(server, room, "before the break")
    items = page.locator("#messages li")
    expect(items).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#state")).to_have_text("reconnecting", timeout=WAIT_MS)
    missed = [_post(server, room, f"while away {n}") for n in range(3)]
    expect(items).to_have_count(4, timeout=WAIT_MS)

    assert _ids(page) == [first, *missed]
    # The first stream, the browser's refused reconnect, then the page's own.
    assert len(streams) >= 3
    assert streams[1] == streams[0]
    assert streams[2] == f"{streams[0]}&lastEventId={first}"
    expect(page.locator("#notice")).to_be_hidden()


def test_page_shows_a_notice_when_the_server_cannot_resume_until_dismissed(
    chat_server: Server, new_page: NewPage
) -> None:
    """An ``eventstream.reset`` event shows the missed-messages notice; it
    stays, new messages or not, until the reader dismisses it."""
    page, room = new_page(), _room()
    # An id from long before the server started: it cannot be resumed from.
    page.route(
        lambda url: "/events?" in url,
        lambda route: route.continue_(url=f"{route.request.url}&lastEventId=1-0"),
    )
    _open_chat(page, chat_server, room)
    notice = page.locator("#notice")
    expect(notice).to_be_visible(timeout=WAIT_MS)
    expect(notice).to_contain_text("Some messages were missed while you were away.")
    event_id = _post(chat_server, room, "after the gap")
    expect(page.locator("#messages li")).to_have_count(1, timeout=WAIT_MS)
    assert _ids(page) == [event_id]
    expect(notice).to_be_visible()

    notice.get_by_role("button", name="Dismiss").click()
    expect(notice).to_be_hidden()
    assert _ids(page) == [event_id]


def test_send_error_is_cleared_by_the_next_successful_send(
    chat_server: Server, new_page: NewPage
) -> None:
    """A message that could not be sent says so, and keeps its text, until a
    send succeeds."""
    page, room = new_page(), _room()
    sends: list[str] = []

    def fail_first(route: Route) -> None:
        sends.append(route.request.url)
        if len(sends) == 1:
            route.abort()
        else:
            route.continue_()

    page.route(lambda url: url.endswith("/chat/send"), fail_first)
    _open_chat(page, chat_server, room)
    page.fill("input[name=text]", "try again")
    page.click("#send button")
    error = page.locator("#error")
    expect(error).to_have_text("Not sent: Failed to fetch", timeout=WAIT_MS)
    expect(page.locator("input[name=text]")).to_have_value("try again")

    page.click("#send button")
    expect(page.locator("#messages li")).to_have_count(1, timeout=WAIT_MS)
    expect(error).to_have_text("")
    expect(page.locator("input[name=text]")).to_have_value("")


def test_send_error_is_cleared_when_the_stream_opens_again(
    short_server: Server, new_page: NewPage
) -> None:
    """While the server is unreachable a send fails; once the stream is open
    again the error no longer shows."""
    server, room = short_server, _room()
    page = new_page()
    down = False
    refused: list[str] = []

    def stream(route: Route) -> None:
        if down:
            refused.append(route.request.url)
            route.fulfill(status=502, body="Bad gateway.\n")
        else:
            route.continue_()

    def send(route: Route) -> None:
        if down:
            route.abort()
        else:
            route.continue_()

    page.route(lambda url: "/events?" in url, stream)
    page.route(lambda url: url.endswith("/chat/send"), send)
    _open_chat(page, server, room)
    down = True
    page.fill("input[name=text]", "anyone there?")
    page.click("#send button")
    error = page.locator("#error")
    expect(error).to_have_text("Not sent: Failed to fetch", timeout=WAIT_MS)
    state = page.locator("#state")
    expect(state).to_have_text("reconnecting", timeout=WAIT_MS)
    _wait_until(page, lambda: len(refused) >= 1, "a reconnect was refused")
    expect(error).to_have_text("Not sent: Failed to fetch")

    down = False
    expect(state).to_have_text("open", timeout=WAIT_MS)
    expect(error).to_have_text("")
    expect(page.locator("input[name=text]")).to_have_value("anyone there?")


def test_counter_page_counts_on_after_an_error_status(
    chat_server: Server, new_page: NewPage
) -> None:
    """The counter page resumes from its last id after the browser gave up."""
    page = new_page()
    streams: list[str] = []

    def answer(route: Route) -> None:
        streams.append(route.request.url)
        if len(streams) == 1:
            # A stream that sends event 41 and ends: the browser retries.
            body = "retry: 100\nevent: foo\nid: 41\ndata: earlier\n\n"
            route.fulfill(status=200, content_type="text/event-stream", body=body)
        elif len(streams) == 2:
            route.fulfill(status=503, body="Busy.\n")
        else:
            route.continue_()

    page.route(lambda url: "/stream" in url, answer)
    page.goto(f"{chat_server.url}/")
    first = page.locator("#events li").first
    expect(first).to_have_text("id 42: Hello, world! (42)", timeout=WAIT_MS)
    expect(page.locator("#state")).to_have_text("open")
    assert streams[2] == f"{chat_server.url}/stream?lastEventId=41"


def test_form_post_uses_the_default_room_and_name(
    chat_server: Server, new_page: NewPage
) -> None:
    """A form post without room or name goes to the lobby as 'anonymous'."""
    page = _open_chat(new_page(), chat_server, None)
    rv = requests.post(f"{chat_server.url}/chat/send", data={"text": "hi"}, timeout=5)
    assert rv.status_code == 201, rv.text
    items = page.locator("#messages li")
    expect(items).to_have_count(1, timeout=WAIT_MS)
    expect(items).to_have_text(["anonymous: hi"])
    assert _ids(page) == [rv.json()["id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"room": "a b", "text": "hi"}, "room"),
        ({"text": ""}, "text"),
        ({"name": "bob"}, "text"),
        ({"text": "x" * 2001}, "text"),
        ({"text": 1}, "text"),
        ({"name": "n" * 51, "text": "hi"}, "name"),
    ],
)
def test_send_refuses_bad_input_naming_the_field(
    chat_server: Server, body: dict[str, t.Any], field: str
) -> None:
    """Bad input gets 400 with a plain-text message that names the field."""
    rv = requests.post(f"{chat_server.url}/chat/send", json=body, timeout=5)
    assert rv.status_code == 400
    assert rv.headers["Content-Type"].startswith("text/plain")
    assert f"'{field}'" in rv.text


def test_chat_page_refuses_a_bad_room(chat_server: Server) -> None:
    """A room that cannot be part of a channel name gets 400."""
    rv = requests.get(f"{chat_server.url}/chat", params={"room": "<a>"}, timeout=5)
    assert rv.status_code == 400
    assert "'room'" in rv.text


def _room() -> str:
    """A room of its own for each test, so tests sharing a server never meet."""
    return f"test-{uuid.uuid4().hex[:12]}"


def _open_chat(page: Page, server: Server, room: str | None) -> Page:
    query = "" if room is None else f"?room={room}"
    page.goto(f"{server.url}/chat{query}")
    expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
    return page


def _post(server: Server, room: str, text: str, name: str = "tester") -> str:
    rv = requests.post(
        f"{server.url}/chat/send",
        json={"room": room, "name": name, "text": text},
        timeout=5,
    )
    assert rv.status_code == 201, rv.text
    return t.cast(str, rv.json()["id"])


def _ids(page: Page) -> list[str]:
    return [
        t.cast(str, item.get_attribute("data-id"))
        for item in page.locator("#messages li").all()
    ]


def _wait_until(page: Page, predicate: t.Callable[[], bool], what: str) -> None:
    """Wait until ``predicate()``, which route handlers make true, holds.

    Playwright runs route handlers only while the test waits on the page.
    """
    deadline = time.monotonic() + WAIT_MS / 1000
    while not predicate():
        assert time.monotonic() < deadline, f"Not in time: {what}."
        page.wait_for_timeout(50)


def _stream_requests(page: Page) -> list[Request]:
    """Record every request the page makes to the event stream, in order."""
    seen: list[Request] = []
    page.on("request", lambda r: seen.append(r) if "/events?" in r.url else None)
    return seen
