"""Connection limits under a real server: refusals under load, and recovery."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import requests

from tests.servers import EventClient
from tests.servers import serve
from tests.servers import Server
from tests.servers import wait_for

pytestmark = pytest.mark.e2e

LIMIT = 150
OVER = 60
PATH = "/events?channel=limits"
#: Clients that are not browsers, which are refused with a status; an
#: EventSource is told to retry instead (see test_clients).
SCRIPT = "*/*"


def open_many(server: Server, count: int) -> list[EventClient]:
    """Open ``count`` streams at once from 16 threads."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(
            pool.map(
                lambda _: EventClient(server.port, PATH, accept=SCRIPT), range(count)
            )
        )


def publishing(server: Server, stop: threading.Event) -> threading.Thread:
    """Publish to the channel until ``stop``, so that refusals happen under load."""

    def run() -> None:
        n = 0
        with requests.Session() as session:
            while not stop.is_set():
                session.post(
                    f"{server.url}/publish",
                    data={"channel": "limits", "data": str(n)},
                    timeout=10,
                ).raise_for_status()
                n += 1

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_max_connections_under_load_gives_503_and_recovers() -> None:
    """Over EVENTSTREAM_MAX_CONNECTIONS, 503 with Retry-After; freed slots are reused.

    While the worker is full, it still answers ordinary requests, and the
    streams it holds still receive events.
    """
    env = {"FLASK_EVENTSTREAM_MAX_CONNECTIONS": str(LIMIT)}
    stop = threading.Event()
    clients: list[EventClient] = []
    with serve("gevent", env=env) as server:
        publisher = publishing(server, stop)
        try:
            clients = open_many(server, LIMIT + OVER)
            accepted = [c for c in clients if c.status == 200]
            refused = [c for c in clients if c.status != 200]
            assert len(accepted) == LIMIT
            assert len(refused) == OVER
            for client in refused:
                assert client.status == 503
                assert client.headers["retry-after"] == "5"
                assert client.headers["content-type"].startswith("text/plain")
                assert b"Too many open streams" in client.body
            # Full of streams, the worker still serves other requests, and
            # its streams still get what is published.
            assert server.state()["subscriptions"] == LIMIT
            for client in accepted[:: LIMIT // 10]:
                assert client.read(1, timeout=10)

            # The load drops: a third of the streams end.
            gone = accepted[: LIMIT // 3]
            for client in gone:
                client.close()
            wait_for(
                lambda: server.state()["subscriptions"] == LIMIT - len(gone),
                10,
                "the closed streams gave back their slots",
            )
            again = open_many(server, len(gone) + 1)
            statuses = sorted(c.status for c in again)
            assert statuses == [200] * len(gone) + [503]
            clients += again
        finally:
            stop.set()
            publisher.join(10)
            for client in clients:
                client.close()
        wait_for(
            lambda: server.state()["subscriptions"] == 0,
            10,
            "every slot was given back",
        )


def test_max_connections_per_client_applies_per_address() -> None:
    """A client over EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT gets 429, others don't.

    All test clients come from 127.0.0.1, so the process-wide count shows
    that refused streams hold no slot.
    """
    env = {"FLASK_EVENTSTREAM_MAX_CONNECTIONS_PER_CLIENT": "3"}
    with serve("gevent", env=env) as server:
        clients = [EventClient(server.port, PATH, accept=SCRIPT) for _ in range(3)]
        try:
            assert [c.status for c in clients] == [200, 200, 200]
            extra = [EventClient(server.port, PATH, accept=SCRIPT) for _ in range(5)]
            clients += extra
            for client in extra:
                assert client.status == 429
                assert client.headers["retry-after"] == "5"
            assert server.state()["subscriptions"] == 3
            clients[0].close()
            wait_for(
                lambda: server.state()["subscriptions"] == 2,
                10,
                "the closed stream gave back its slot",
            )
            clients.append(EventClient(server.port, PATH, accept=SCRIPT))
            assert clients[-1].status == 200
        finally:
            for client in clients:
                client.close()
