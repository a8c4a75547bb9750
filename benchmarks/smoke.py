"""Check that every server under test answers the shared interface.

    python -m benchmarks.smoke [NAME ...]

For each server: start it, open three streams, publish two events and read
them back on all three, read a ``/throughput`` stream of 1000 events, and
check that its memory can be read. Prints one line per server, and exits
non-zero if any failed. Every read has a deadline, so no server can hang it.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
import traceback
import urllib.parse

from flask_eventstream.event import Event
from flask_eventstream.parser import EventParser

from .servers import NAMES
from .servers import process_tree
from .servers import Running
from .servers import split_name
from .servers import start

STREAMS = 3
PUBLISHED = ["first event", "second: 2 \u00e9"]
THROUGHPUT_EVENTS = 1000
THROUGHPUT_SIZE = 100
TIMEOUT_SECONDS = 10.0


class Stream:
    """One ``GET`` response of a server, read as an event stream.

    :param port: the server's port on 127.0.0.1.
    :param path: the path and query to request.
    """

    def __init__(self, port: int, path: str) -> None:
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=TIMEOUT_SECONDS
        )
        self.connection.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.connection.getresponse()
        if self.response.status != 200:
            raise AssertionError(f"GET {path} answered {self.response.status}.")
        self.body = b""
        self.ended = False
        self.parser = EventParser()
        self.events: list[Event] = []

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        assert self.connection.sock is not None
        self.connection.sock.settimeout(remaining)
        chunk = self.response.read1(65536)
        if not chunk:
            self.ended = True
        self.body += chunk
        self.events.extend(self.parser.feed(chunk))

    def read_until_opened(self) -> None:
        """Read until the stream's first bytes (its opening comment) are in."""
        deadline = time.monotonic() + TIMEOUT_SECONDS
        try:
            while not self.body and not self.ended:
                self._read(deadline)
        except TimeoutError:
            raise AssertionError("No opening bytes within 10 s.") from None
        if self.ended:
            raise AssertionError("The stream ended before it opened.")

    def read_events(self, count: int, timeout: float = TIMEOUT_SECONDS) -> list[Event]:
        """Read until ``count`` events are in, or the stream ends."""
        deadline = time.monotonic() + timeout
        try:
            while len(self.events) < count and not self.ended:
                self._read(deadline)
        except TimeoutError:
            raise AssertionError(
                f"{len(self.events)} of {count} events within {timeout:.0f} s;"
                f" the stream so far ends with {self.body[-200:]!r}."
            ) from None
        return self.events

    def read_to_end(self, timeout: float) -> list[Event]:
        """Read until the server ends the response."""
        return self.read_events(sys.maxsize, timeout)

    def close(self) -> None:
        self.connection.close()


def publish(port: int, channel: str, data: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_SECONDS)
    try:
        query = urllib.parse.urlencode({"channel": channel, "data": data})
        connection.request("POST", f"/publish?{query}")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise AssertionError(f"POST /publish answered {response.status}.")
    finally:
        connection.close()


def check(server: Running) -> str:
    """Run the checks on one server; return what it measured."""
    streams = [Stream(server.port, "/events?channel=smoke") for _ in range(STREAMS)]
    try:
        for stream in streams:
            stream.read_until_opened()
        for data in PUBLISHED:
            publish(server.port, "smoke", data)
        for number, stream in enumerate(streams, 1):
            got = [e.data for e in stream.read_events(len(PUBLISHED))]
            if got != PUBLISHED:
                raise AssertionError(f"Stream {number} got {got!r}.")
    finally:
        for stream in streams:
            stream.close()

    query = f"n={THROUGHPUT_EVENTS}&size={THROUGHPUT_SIZE}"
    started = time.monotonic()
    stream = Stream(server.port, f"/throughput?{query}")
    try:
        events = stream.read_to_end(30.0)
    finally:
        stream.close()
    seconds = time.monotonic() - started
    expected = "x" * THROUGHPUT_SIZE
    # Ours ends a finished stream with an eventstream.end event; peers don't.
    events = [e for e in events if e.event != "eventstream.end"]
    count = sum(e.data == expected for e in events)
    if count != THROUGHPUT_EVENTS or len(events) != THROUGHPUT_EVENTS:
        raise AssertionError(
            f"/throughput?{query} gave {count} events of the size asked for"
            f" and {len(events) - count} others."
        )

    if server.pid not in process_tree(server.process.pid):
        raise AssertionError(f"The worker {server.pid} is not in the process tree.")
    rss = server.process_tree_rss_kib()
    if rss <= 0:
        raise AssertionError("The process tree's memory reads as 0.")
    redis_rss = server.redis_rss_kib()
    if (server.redis is not None) != (redis_rss > 0):
        raise AssertionError(f"redis-server's memory reads as {redis_rss}.")
    return (
        f"{STREAMS} streams got {len(PUBLISHED)} events;"
        f" {THROUGHPUT_EVENTS} events in {seconds:.3f} s;"
        f" rss {rss} KiB, redis {redis_rss} KiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smoke")
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(NAMES))
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = parser.parse_args()
    for name in args.names:
        try:
            split_name(name)
        except ValueError as exc:
            parser.error(str(exc))
    failed = False
    for name in args.names or NAMES:
        try:
            with start(name, max_streams=100) as server:
                result = check(server)
            print(f"{name:<18} ok: {result}", flush=True)
        except Exception as e:
            failed = True
            print(f"{name:<18} FAILED: {type(e).__name__}: {e}", flush=True)
            if args.verbose:
                traceback.print_exc()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
