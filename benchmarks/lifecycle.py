"""How fast streams end: client gone, client stalled, worker stopped.

    python -m benchmarks.lifecycle

Serves the end-to-end test app under ``gunicorn -k gevent -w 1`` with a
send timeout of 1 s, and measures from outside: how long after a client
closes its socket the silent generator's ``finally`` has run (20 times), how
long a client that stops reading keeps its stream, and how long 100 open
streams take to end after SIGTERM to the worker.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
import typing as t

from tests.servers import open_stream
from tests.servers import read_until
from tests.servers import serve
from tests.servers import Server
from tests.servers import wait_for


def disconnects(server: Server, runs: int = 20) -> list[float]:
    seconds = []
    for _ in range(runs):
        before = server.state()["finished"]
        sock = open_stream(server.port, "/silent")
        read_until(sock, b": stream opened\n")
        start = time.monotonic()
        sock.close()
        wait_for(_finished(server, before + 1), 10, "the generator's finally")
        seconds.append(time.monotonic() - start)
    return seconds


def _finished(server: Server, count: int) -> t.Callable[[], bool]:
    return lambda: bool(server.state()["finished"] == count)


def stalled(server: Server) -> float:
    before = server.state()["finished"]
    sock = open_stream(server.port, "/large", rcvbuf=4096)
    start = time.monotonic()
    try:
        wait_for(lambda: server.state()["finished"] == before + 1, 30, "dropped")
    finally:
        sock.close()
    return time.monotonic() - start


def sigterm(server: Server, streams: int = 100) -> list[float]:
    pid = server.state()["pid"]
    socks = [open_stream(server.port, "/silent") for _ in range(streams)]
    ended = []
    try:
        for sock in socks:
            read_until(sock, b": stream opened\n")
        start = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        for sock in socks:
            sock.settimeout(10)
            while True:
                data = sock.recv(65536)
                if not data or data.endswith(b"0\r\n\r\n"):
                    break
            ended.append(time.monotonic() - start)
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: _replaced(server, pid), 15, "a new worker")
    return ended


def _replaced(server: Server, pid: int) -> bool:
    try:
        return bool(server.state()["pid"] != pid)
    except OSError:
        return False


def main() -> None:
    with serve("gevent", env={"SEND_TIMEOUT": "1"}) as server:
        closed = disconnects(server)
        drop = stalled(server)
        ended = sigterm(server)
    print(
        json.dumps(
            {
                "disconnect_to_finally_seconds": {
                    "median": round(statistics.median(closed), 4),
                    "max": round(max(closed), 4),
                    "runs": len(closed),
                },
                "stalled_client_dropped_after_seconds": round(drop, 2),
                "send_timeout_seconds": 1,
                "sigterm_100_streams_ended_within_seconds": round(max(ended), 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
