"""Churn: many short-lived streams against one gevent worker leave nothing behind.

python -m pytest tests/test_churn.py -s            # 2,000 cycles
python -m pytest -m long tests/test_churn.py -s    # 20,000 cycles
"""

from __future__ import annotations

import collections
import concurrent.futures
import socket
import struct
import time
import typing as t

import pytest

from tests.servers import open_stream
from tests.servers import read_until
from tests.servers import serve
from tests.servers import Server
from tests.servers import wait_for

pytestmark = pytest.mark.e2e

PATHS = ["/events?channel=churn", "/quiet"]
KINDS = ["clean", "reset", "half-open", "early"]
OPENED = b": stream opened\n"
WARM_UP = 400


def cycle(port: int, n: int) -> str:
    """Open one stream and leave in one of four ways; return the way.

    clean: read the opening, then close. reset: read the opening, then
    close with SO_LINGER 0, so the kernel sends RST. half-open: read the
    opening, shut down the sending side and wait for the server to end the
    stream, then close. early: close before the response is read at all.
    """
    kind = KINDS[n % len(KINDS)]
    sock = open_stream(port, PATHS[(n // len(KINDS)) % len(PATHS)])
    try:
        if kind == "early":
            return kind
        read_until(sock, OPENED)
        if kind == "reset":
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        elif kind == "half-open":
            sock.shutdown(socket.SHUT_WR)
            # The server notices the hang-up and ends the stream with the
            # last chunk, then closes its side.
            sock.settimeout(10)
            while sock.recv(65536):
                pass
        return kind
    finally:
        sock.close()


def run_cycles(server: Server, count: int, start: int = 0) -> collections.Counter[str]:
    done: collections.Counter[str] = collections.Counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        for kind in pool.map(
            lambda n: cycle(server.port, n), range(start, start + count)
        ):
            done[kind] += 1
    return done


def settled(server: Server, baseline: dict[str, t.Any]) -> dict[str, t.Any]:
    """Wait until every stream has ended; return the worker's state then."""
    state: dict[str, t.Any] = {}

    def quiet() -> bool:
        state.update(server.state())
        return bool(
            state["streams"] == baseline["streams"]
            and state["subscriptions"] == baseline["subscriptions"]
            and state["watched"] == baseline["watched"]
            and not state["watching"]
            and state["started"] == state["finished"]
        )

    wait_for(quiet, 30, "every stream of the churn ended", poll=0.2)
    return state


def churn(cycles: int) -> None:
    with serve("gevent") as server:
        # Warm up: the first requests import and cache things once.
        run_cycles(server, WARM_UP)
        before = settled(
            server, server.state() | {"streams": 0, "subscriptions": 0, "watched": 0}
        )
        started = time.monotonic()
        done = run_cycles(server, cycles, start=WARM_UP)
        seconds = time.monotonic() - started
        after = settled(server, before)
        print(
            f"\n{sum(done.values())} cycles in {seconds:.1f} s: {dict(done)};"
            f" generators started {after['started'] - before['started']}"
        )
        for key in ("greenlets", "fds", "subscriptions", "streams", "rss_kib"):
            print(f"  {key}: {before[key]} before, {after[key]} after")
        assert sum(done.values()) == cycles
        assert after["greenlets"] == before["greenlets"]
        assert after["fds"] == before["fds"]
        assert after["subscriptions"] == before["subscriptions"] == 0
        assert after["rss_kib"] <= before["rss_kib"] * 1.1


def test_churn_leaves_nothing_behind() -> None:
    """20,000 mixed connect/disconnect cycles; greenlets, descriptors,
    subscriptions back to baseline, memory within 10%."""
    churn(20_000)


@pytest.mark.long
@pytest.mark.timeout(600)
def test_churn_leaves_nothing_behind_long() -> None:
    """The same for 200,000 cycles."""
    churn(200_000)
