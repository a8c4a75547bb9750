"""The end-to-end tests' own stream client, against a real server."""

from __future__ import annotations

import pytest
import requests

from tests.servers import EventClient
from tests.servers import serve

pytestmark = pytest.mark.e2e


def test_event_client_reads_on_after_a_read_timed_out() -> None:
    """Clients that poll with short timeouts must not lose the stream.

    A reconnecting client in the fault tests reads with a half-second
    timeout; if a timed-out read spoiled the connection, a stream that was
    silent that long would never deliver another event.
    """
    with serve("gevent") as server:
        client = EventClient(server.port, "/events?channel=quiet")
        try:
            with pytest.raises(TimeoutError):
                client.read(1, timeout=0.3)
            for n in range(3):
                requests.post(
                    f"{server.url}/publish",
                    data={"channel": "quiet", "data": f"after {n}"},
                    timeout=10,
                ).raise_for_status()
                events = client.read(n + 1, timeout=10)
                with pytest.raises(TimeoutError):
                    client.read(n + 2, timeout=0.2)
            assert [e.data for e in events] == ["after 0", "after 1", "after 2"]
            assert not client.ended
        finally:
            client.close()


def test_event_client_reads_an_error_response() -> None:
    with serve("gevent") as server:
        client = EventClient(server.port, "/events?channel=bad%20name")
        try:
            assert client.status == 400
            assert client.ended
            assert client.headers["content-type"].startswith("text/plain")
            assert b"Channel names are" in client.body
        finally:
            client.close()
