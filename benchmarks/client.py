"""The load client: one scenario against one server, one JSON result.

    python -m benchmarks.client idle --url URL --streams 1000 --hold 20
    python -m benchmarks.client fanout --url URL --subscribers 200 --events 50 --rate 50
    python -m benchmarks.client publish --url URL --events 2000 --subscribers 100
    python -m benchmarks.client throughput --url URL --events 100000 --size 100
    python -m benchmarks.client capacity --url URL --subscribers 1000 --rates 50,100

It runs in a process of its own and reports its own CPU and wall seconds in
every result: with a CPU share near 1.0 the client may have set the pace,
not the server. Every line it prints on stdout is one JSON object, the last one
``{"phase": "result", ...}``. With ``--handshake`` it stops at each
checkpoint (``warm`` before connecting, ``connected``, ``held``): it prints
``{"phase": NAME, ...}`` and reads one line from stdin, waiting at most
``--wait`` seconds, so that whoever started it can measure the server in
between. A checkpoint that bounds a span whose cost is measured (``publishing``
just before the first publish, ``delivered`` once the last event arrived,
and the start and end of each step of ``capacity``) says ``"instant": true``:
read the server's CPU time at once, and answer without settling first. Only
127.0.0.1 (or localhost) is accepted as a target.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import pathlib
import resource
import select
import socket
import struct
import sys
import threading
import time
import typing as t
import urllib.parse

CONNECT_CONCURRENCY = 500
CONNECT_TIMEOUT_SECONDS = 60.0
PUBLISHERS = 8
#: POSTs in flight at once in each step of ``capacity``, as many as in
#: ``publish``: one at a time caps the rate at one over the request's round
#: trip, which for a server that writes to every subscriber before it
#: answers is its whole fan-out time, not what it can sustain.
CAPACITY_CONNECTIONS = PUBLISHERS
#: A step of ``capacity`` passes with a p99 under this, every event
#: delivered, and a rate achieved within CAPACITY_RATE_SLACK of its target.
CAPACITY_P99_MS = 100.0
CAPACITY_RATE_SLACK = 0.95
#: A step publishes for at most this many times its length: a publisher
#: that far behind has failed the step already, and would only make it long.
CAPACITY_OVERRUN = 1.25
#: A process busy this share of a core or more may have set the pace: the
#: client, or (as the runner reads it) the server's worker.
BOUND_SHARE = 0.9
#: In ``capacity``, the streams whose every event is parsed, decoded and
#: timed; the others are only counted (see :class:`TickReader`).
CAPACITY_SAMPLE = 100
#: A capacity connection unused for this long is opened anew before its
#: next POST: gunicorn closes one that waits 2 s for its next request.
IDLE_SECONDS = 1.0
READ_BYTES = 256 * 1024
#: Every read of a parsed stream goes here first (one event loop, one read
#: at a time).
READ_BUFFER = bytearray(READ_BYTES)
READ_VIEW = memoryview(READ_BUFFER)
#: In ``capacity``, how often the sampled streams are read (see
#: :class:`TickReader`), and how often each counted stream is.
TICK_SECONDS = 0.001
SWEEP_SECONDS = 0.2
#: What a counted stream counts, in the raw bytes: the start of an event's
#: data line. Not the blank line that ends an event, since some servers end
#: a comment with one too (sse-starlette's pings). Every event of these
#: scenarios is one line of JSON, and a line starts after an LF, its own
#: line's or a chunk-size line's, so the chunk framing hides none; only a
#: chunk that ended within the five bytes of ``data:`` would, which the
#: sample, parsed and counted both, would show (``sample_miscounted``).
DATA_LINE = b"\ndata:"
#: Bytes kept from the end of one read to find a data line split across two.
TAIL_BYTES = len(DATA_LINE) - 1
# Linux's SO_TIMESTAMPNS (which the socket module does not name): each read
# comes with the time the kernel received its last bytes, a struct timespec.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")
ANCILLARY_BYTES = socket.CMSG_SPACE(TIMESPEC.size)
LOOPBACK = ("127.0.0.1", "localhost")
#: Where ``python -m benchmarks.client`` runs from, whatever the cwd.
PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent

Result = dict[str, t.Any]


class Target(t.NamedTuple):
    host: str
    port: int


def parse_target(url: str) -> Target:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in LOOPBACK or parts.port is None:
        raise SystemExit(f"Give a URL on this machine with a port (got {url!r}).")
    return Target("127.0.0.1", parts.port)


class Stream:
    """One GET of an event stream: response head, chunked body, SSE lines.

    A socket of its own, read by a callback of the event loop whenever it is
    readable: a read costs one call, not the wake-up of a task per stream.
    The time stamped on an event is when the kernel received its bytes
    (``SO_TIMESTAMPNS``), so a client busy with 1,000 other sockets does not
    add its own delay to the latency it reports.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_event: t.Callable[[Stream, bytes, float], None] | None = None,
    ) -> None:
        self.on_event = on_event
        # True once the first body bytes arrived, False if they never will.
        self.opened: asyncio.Future[bool] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.started = time.monotonic()
        self.headers_seconds: float | None = None
        self.error: str | None = None
        self.complete = False
        self.events = 0
        self.comments = 0
        self.body_bytes = 0
        self.delivered = 0
        self.last_seq = -1
        self.out_of_order = 0
        #: Events counted by their data lines in the raw bytes, headers and
        #: chunk framing included, however the stream is read.
        self.counted = 0
        #: The kernel's time of the first body bytes: when the server had
        #: subscribed this stream, nearly.
        self.opened_at: float | None = None
        #: The numbers of the events received, if asked for (not None).
        self.seqs: list[int] | None = None
        #: Read by :meth:`sweep` only, which counts and parses nothing.
        self.counting = False
        self._tail = b""
        self._loop = loop
        self._socket: socket.socket | None = None
        self._head: bytes | None = b""
        self._chunked = False
        self._length: int | None = None
        self._raw = b""
        # Bytes left in the current chunk; -1 while its closing CRLF is due.
        self._left = 0
        self._partial = b""
        self._data: list[bytes] = []
        self._has_data = False
        self._type = b""
        #: The type of the last event dispatched (empty for ``message``).
        self.last_type = b""

    @property
    def is_open(self) -> bool:
        opened = self.opened.done() and not self.opened.cancelled()
        return opened and self.opened.result() and not self.ended.done()

    async def request(self, target: Target, path: str) -> None:
        """Connect, send the request and start reading; opened tells the rest."""
        self._socket = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        await self._loop.sock_connect(sock, (target.host, target.port))
        await self._loop.sock_sendall(
            sock,
            f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode(),
        )
        self._loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        """Read what waits on the socket, and parse it."""
        if self._socket is None:
            return
        try:
            size, ancillary, _, _ = self._socket.recvmsg_into(
                [READ_BUFFER], ANCILLARY_BYTES
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(type(exc).__name__)
            return
        # Into a buffer kept for good: recvmsg's own, of READ_BYTES, is
        # allocated and shrunk at every read, which cost more than 20 us a
        # read here, more than the parsing.
        data = bytes(READ_VIEW[:size])
        if not data:
            if self._head is None and not self._chunked and self._length is None:
                # A body that ends with the connection ends here, complete.
                self.complete = True
            if self.complete:
                self.close()
            else:
                self.fail("closed by server")
            return
        received = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack_from(value)
                received = seconds + nanoseconds / 1e9
        # Counted on every stream, so that on a parsed one the count can be
        # checked against the parser's.
        self._count(data, len(data))
        self.data_received(data, received)

    def _count(self, data: bytes | bytearray, size: int) -> None:
        """Count the data lines in the first ``size`` bytes of ``data``, the
        stream's next bytes, without copying them."""
        # A data line split across two reads is found in the bytes around
        # the boundary; one of 6 bytes cannot lie within the 5 kept.
        boundary = self._tail + bytes(data[: min(size, TAIL_BYTES)])
        self.counted += data.count(DATA_LINE, 0, size) + boundary.count(DATA_LINE)
        if size < TAIL_BYTES:
            self._tail = boundary[-TAIL_BYTES:]
        else:
            self._tail = bytes(data[size - TAIL_BYTES : size])

    def detach(self) -> int | None:
        """Stop reading on readiness: someone else will, by :meth:`readable`
        or :meth:`sweep`. The socket's descriptor, if it is open."""
        if self._socket is None:
            return None
        self._loop.remove_reader(self._socket.fileno())
        return self._socket.fileno()

    def sweep(self, buffer: bytearray) -> int:
        """Read all that waits on the socket into ``buffer`` and count its
        data lines; the most bytes that one read took (-1 if the stream ended)."""
        largest = 0
        while self._socket is not None:
            try:
                size = self._socket.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.fail(type(exc).__name__)
                return -1
            if not size:
                self.fail("closed by server")
                return -1
            largest = max(largest, size)
            self._count(buffer, size)
            if size < len(buffer):
                # Drained: what comes meanwhile waits for the next turn.
                break
        return largest

    def fail(self, error: str) -> None:
        self._end(error)
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        self._end(None)

    def _end(self, error: str | None) -> None:
        if not self.ended.done():
            self.error = error
            self.ended.set_result(None)
        if not self.opened.done():
            self.error = self.error or error or "closed before the first bytes"
            self.opened.set_result(False)

    def data_received(self, data: bytes, received: float) -> None:
        """Parse the next bytes of the response, received at ``received``."""
        if self.ended.done():
            return
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 65536:
                    self.fail("response head too large")
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = None
            self._read_head(head.decode("latin-1"))
            if self.ended.done() or not data:
                return
        if self._chunked:
            self._dechunk(data, received)
        elif self._length is not None:
            data = data[: self._length]
            self._length -= len(data)
            self._lines(data, received)
            if self._length == 0:
                self.complete = True
                self.close()
        else:
            self._lines(data, received)

    def _read_head(self, head: str) -> None:
        self.headers_seconds = time.monotonic() - self.started
        status_line, *lines = head.split("\r\n")
        parts = status_line.split()
        if len(parts) < 2 or parts[1] != "200":
            self.fail(f"status {parts[1] if len(parts) > 1 else '?'}")
            return
        for line in lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "transfer-encoding" and "chunked" in value.lower():
                self._chunked = True
            elif name == "content-length":
                self._length = int(value)

    def _dechunk(self, data: bytes, received: float) -> None:
        buf = self._raw + data if self._raw else data
        end = len(buf)
        pos = 0
        body = []
        while pos < end:
            if self._left > 0:
                take = min(self._left, end - pos)
                body.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = -1
            elif self._left < 0:
                if end - pos < 2:
                    break
                pos += 2
                self._left = 0
            else:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(buf[pos:line_end].split(b";", 1)[0], 16)
                pos = line_end + 2
                if size == 0:
                    self._lines(b"".join(body), received)
                    self.complete = True
                    self.close()
                    return
                self._left = size
        self._raw = buf[pos:]
        if body:
            self._lines(b"".join(body), received)

    def _lines(self, data: bytes, received: float) -> None:
        if not data:
            return
        self.body_bytes += len(data)
        if not self.opened.done():
            self.opened_at = received
            self.opened.set_result(True)
        text = self._partial + data if self._partial else data
        carry = b""
        if b"\r" in text:
            # A CR at the end may be the first half of a CRLF: keep it back.
            if text[-1:] == b"\r":
                text, carry = text[:-1], b"\r"
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = text.split(b"\n")
        self._partial = lines.pop() + carry
        for line in lines:
            if not line:
                if self._has_data:
                    self._has_data = False
                    self.events += 1
                    self.last_type = self._type
                    if self.on_event is not None:
                        self.on_event(self, b"\n".join(self._data), received)
                        self._data.clear()
                self._type = b""
            elif line[0] == 58:  # b":", a comment
                self.comments += 1
            elif line[:5] == b"data:":
                self._has_data = True
                if self.on_event is not None:
                    value = line[5:]
                    self._data.append(value[1:] if value[:1] == b" " else value)
            elif line[:6] == b"event:":
                value = line[6:]
                self._type = value[1:] if value[:1] == b" " else value


def emit(record: Result) -> None:
    print(json.dumps(record), flush=True)


def percentiles(seconds: list[float]) -> Result:
    """p50, p90, p99 and max of some durations, in milliseconds."""
    if not seconds:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(seconds)

    def rank(p: float) -> float:
        # Nearest rank: the smallest value with at least p% of values at or below.
        index = max(0, -(-len(ordered) * p // 100) - 1)
        return round(ordered[int(index)] * 1000, 3)

    return {
        "p50_ms": rank(50),
        "p90_ms": rank(90),
        "p99_ms": rank(99),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


class Checkpoints:
    """Stop at named points and wait for a line on stdin, if asked to."""

    def __init__(self, enabled: bool, wait_seconds: float) -> None:
        self.enabled = enabled
        self.wait_seconds = wait_seconds
        self.missed: list[str] = []
        self._reader: asyncio.StreamReader | None = None

    async def reach(self, phase: str, *, instant: bool = False, **info: t.Any) -> None:
        """Say ``phase`` and wait for the go; ``instant`` asks for no settling."""
        emit({"phase": phase, **info, **({"instant": True} if instant else {})})
        if not self.enabled:
            return
        if self._reader is None:
            self._reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(self._reader)
            await asyncio.get_running_loop().connect_read_pipe(
                lambda: protocol, sys.stdin
            )
        try:
            line = await asyncio.wait_for(self._reader.readline(), self.wait_seconds)
        except TimeoutError:
            self.missed.append(phase)
            return
        if not line:
            # Nobody is answering any more; do not wait at later checkpoints.
            self.enabled = False


async def open_stream(
    target: Target,
    path: str,
    gate: asyncio.Semaphore,
    on_event: t.Callable[[Stream, bytes, float], None] | None = None,
) -> Stream:
    """Open one stream and wait for its first body bytes, at most a minute."""
    loop = asyncio.get_running_loop()
    stream = Stream(loop, on_event)
    async with gate:
        stream.started = time.monotonic()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await stream.request(target, path)
                await asyncio.shield(stream.opened)
        except (OSError, TimeoutError) as exc:
            stream.fail(type(exc).__name__)
    return stream


async def open_streams(
    target: Target,
    path: str,
    count: int,
    on_event: t.Callable[[Stream, bytes, float], None] | None = None,
) -> tuple[list[Stream], Result]:
    """Open streams with at most CONNECT_CONCURRENCY connects in flight."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    start = time.monotonic()
    streams = await asyncio.gather(
        *(open_stream(target, path, gate, on_event) for _ in range(count))
    )
    errors = collections.Counter(s.error for s in streams if not s.is_open)
    opened = [s for s in streams if s.is_open]
    headers = [s.headers_seconds for s in opened if s.headers_seconds is not None]
    summary = {
        "requested": count,
        "connected": len(opened),
        "connect_seconds": round(time.monotonic() - start, 3),
        "connect_errors": dict(errors),
        "headers": percentiles(headers),
    }
    return opened, summary


class Publisher:
    """One keep-alive HTTP/1.1 connection that POSTs to /publish."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def publish(self, channel: str, data: str) -> str | None:
        """Publish one event; None if it was accepted, else what went wrong."""
        query = urllib.parse.urlencode({"channel": channel, "data": data})
        try:
            async with asyncio.timeout(30):
                return await self._post(f"/publish?{query}")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            self.close()
            return type(e).__name__

    async def _post(self, path: str) -> str | None:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.target.host, self.target.port
            )
        assert self._reader is not None
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.target.host}:{self.target.port}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split()[1])
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        if "chunked" in fields.get("transfer-encoding", ""):
            while size := int((await self._reader.readline()).split(b";")[0], 16):
                await self._reader.readexactly(size + 2)
            await self._reader.readuntil(b"\r\n")
        else:
            await self._reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection") == "close":
            self.close()
        return None if status == 200 else f"status {status}"

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class Deliveries:
    """What subscribers received of numbered events ``{"seq": N, "t": T}``."""

    def __init__(self) -> None:
        self.count = 0
        self.latencies: list[float] = []
        self.last_received = 0.0
        # Every subscriber gets the same data, so decode each event once.
        self._decoded: dict[bytes, tuple[int, float]] = {}

    def receive(self, stream: Stream, data: bytes, received: float) -> None:
        decoded = self._decoded.get(data)
        if decoded is None:
            try:
                fields = json.loads(data)
                decoded = (int(fields["seq"]), float(fields["t"]))
            except (ValueError, KeyError, TypeError):
                return
            self._decoded[data] = decoded
        seq, sent = decoded
        if seq <= stream.last_seq:
            stream.out_of_order += 1
        stream.last_seq = seq
        if stream.seqs is not None:
            stream.seqs.append(seq)
        stream.delivered += 1
        self.count += 1
        self.latencies.append(received - sent)
        self.last_received = received

    async def wait(self, expected: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def take_latencies(self) -> list[float]:
        """The latencies so far, which the next ones no longer include."""
        taken, self.latencies = self.latencies, []
        return taken


class Ticker:
    """Calls its callbacks every TICK_SECONDS, one after the other.

    ``capacity`` reads its streams and publishes at these ticks rather than
    whenever a socket is ready or an event is due: on a virtual machine
    every wake-up of the client costs tens of microseconds (more than 100
    after a sleep of a millisecond), before any Python runs, and on
    readiness there would be one for each write of the server to a sampled
    stream, for each event due and for each answer to a POST. A loop busy
    with one tick's work finds the next one due at once, and does not
    sleep.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.callbacks: list[t.Callable[[], None]] = []
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        # First, so that a callback that raises (the event loop reports it)
        # does not stop the ticks.
        self._handle = self._loop.call_later(TICK_SECONDS, self._tick)
        for callback in list(self.callbacks):
            callback()

    def stop(self) -> None:
        self._handle.cancel()


class TickReader:
    """Reads the streams of ``capacity`` at the ticks of a :class:`Ticker`.

    At each tick the sampled streams that are readable are read and
    parsed. An event that arrives less than a tick after an earlier one on
    the same socket is read with it, and so takes its kernel time, up to a
    tick late.

    The counted streams are read in turn, each every SWEEP_SECONDS, and
    only counted. A counted socket then holds little between two reads
    (12.8 KB at most at 800 events/s, in a trial), far below its receive
    buffer (128 KiB to start with, on Linux), so the server never waits for
    the client; the most bytes that one read took is in :meth:`take`.
    """

    def __init__(
        self, ticker: Ticker, sample: list[Stream], counted: list[Stream]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._sampled: dict[int, Stream] = {}
        for stream in sample:
            fd = stream.detach()
            if fd is not None:
                self._epoll.register(fd, select.EPOLLIN)
                self._sampled[fd] = stream
        for stream in counted:
            stream.detach()
            stream.counting = True
        self._counted = counted
        self._buffer = bytearray(READ_BYTES)
        self._start = self._loop.time()
        # Counted streams read so far, from the first, in turn.
        self._swept = 0
        self.reads = 0
        self.largest = 0
        self._ticker = ticker
        ticker.callbacks.append(self._tick)

    def _tick(self) -> None:
        for fd, _ in self._epoll.poll(0):
            stream = self._sampled.get(fd)
            if stream is not None:
                stream.readable()
        # Due by the clock, not by ticks, which come late when the loop is busy.
        count = len(self._counted)
        due = int((self._loop.time() - self._start) / SWEEP_SECONDS * count)
        # A loop that was held up reads each stream once, not several times.
        first = max(self._swept, due - count)
        if first < due:
            self.read([self._counted[n % count] for n in range(first, due)])
        self._swept = due

    def read(self, streams: list[Stream]) -> None:
        """Read these counted streams now, whatever their turn."""
        buffer = self._buffer
        largest = self.largest
        for stream in streams:
            largest = max(largest, stream.sweep(buffer))
        self.reads += len(streams)
        self.largest = largest

    def take(self) -> Result:
        """Reads of counted streams, and the most bytes one of them took,
        since the last take."""
        taken = {"sweep_reads": self.reads, "largest_read_bytes": self.largest}
        self.reads = self.largest = 0
        return taken

    def stop(self) -> None:
        self._ticker.callbacks.remove(self._tick)
        self._epoll.close()


def numbered(seq: int) -> str:
    return json.dumps({"seq": seq, "t": time.time()})


@dataclasses.dataclass
class Paced:
    """What :func:`publish_paced` did: events sent, accepted, and how fast."""

    events: int = 0
    accepted: int = 0
    errors: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    post_seconds: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    #: The connection that each event went out on, by number.
    connection_of: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def rate_achieved(self) -> float:
        return round(self.events / self.seconds, 2) if self.seconds else 0.0

    def summary(self) -> Result:
        return {
            "events": self.events,
            "accepted": self.accepted,
            "publish_errors": dict(self.errors),
            "rate_achieved": self.rate_achieved,
            "publish_request": percentiles(self.post_seconds),
        }


async def publish_paced(
    target: Target,
    channel: str,
    seqs: range,
    rate: float,
    connections: int = 1,
    longest: float | None = None,
) -> Paced:
    """Publish the events numbered ``seqs`` to ``channel`` at ``rate`` a second.

    Each event has its time on a schedule, ``rate`` a second from the
    first; it goes out then on one of ``connections`` keep-alive
    connections, each of which waits for one POST's answer before it sends
    the next. A server that answers slower than the schedule makes every
    later event go out late, and the rate achieved lower. After ``longest``
    seconds, if given, no more events go out; ``events`` counts those sent.
    """
    paced = Paced()
    numbers = iter(seqs)
    start = time.monotonic()
    end = math.inf if longest is None else start + longest

    async def work(publisher: Publisher, connection: int) -> None:
        # The iterator is shared: each connection takes the next number.
        for seq in numbers:
            await asyncio.sleep(start + (seq - seqs.start) / rate - time.monotonic())
            if time.monotonic() > end:
                break
            paced.events += 1
            paced.connection_of[seq] = connection
            sent = time.monotonic()
            error = await publisher.publish(channel, numbered(seq))
            paced.post_seconds.append(time.monotonic() - sent)
            if error is None:
                paced.accepted += 1
            else:
                paced.errors[error] += 1
        publisher.close()

    await asyncio.gather(*(work(Publisher(target), n) for n in range(connections)))
    paced.seconds = time.monotonic() - start
    return paced


class Poster:
    """One keep-alive HTTP/1.1 connection that POSTs to /publish, sending
    and reading only when told to (at the ticks of a :class:`Ticker`), never
    waiting on the socket."""

    def __init__(self, target: Target, number: int) -> None:
        self.target = target
        self.number = number
        self._socket: socket.socket | None = None
        self._out = b""
        self._in = b""
        #: The event in flight and when its POST went out, or None if idle.
        self.seq: int | None = None
        self.sent = 0.0
        # When the last answer came: gunicorn closes a keep-alive connection
        # that waits 2 s (its --keep-alive) for the next request, and a POST
        # sent as it does so is lost.
        self._answered = 0.0

    @property
    def idle(self) -> bool:
        return self.seq is None

    def send(self, channel: str, seq: int) -> str | None:
        """Send the POST of event ``seq``; None, or what went wrong."""
        self.seq, self.sent = seq, time.monotonic()
        query = urllib.parse.urlencode({"channel": channel, "data": numbered(seq)})
        self._out = (
            f"POST /publish?{query} HTTP/1.1\r\nHost: {self.target.host}:"
            f"{self.target.port}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        self._in = b""
        if self._socket is not None and self.sent - self._answered > IDLE_SECONDS:
            self.close()
        try:
            if self._socket is None:
                # Loopback: the handshake is done within the call.
                self._socket = socket.create_connection(self.target, timeout=5)
                self._socket.setblocking(False)
            self._write()
        except OSError as exc:
            return self._fail(type(exc).__name__)
        return None

    def _write(self) -> None:
        assert self._socket is not None
        if self._out:
            sent = self._socket.send(self._out)
            self._out = self._out[sent:]

    def poll(self) -> str | None:
        """Read the answer if it came: "" once it came and was a 200, else
        what went wrong, or None while it has not come."""
        if self._socket is None or self.seq is None:
            return None
        try:
            self._write()
            while True:
                data = self._socket.recv(65536)
                if not data:
                    return self._fail("IncompleteReadError")
                self._in += data
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            return self._fail(type(exc).__name__)
        try:
            answer = self._answer()
        except ValueError:
            return self._fail("ValueError")
        if answer is None:
            if time.monotonic() - self.sent > 30:
                return self._fail("TimeoutError")
            return None
        status, close = answer
        self.seq = None
        self._answered = time.monotonic()
        if close:
            self.close()
        return "" if status == 200 else f"status {status}"

    def _answer(self) -> tuple[int, bool] | None:
        """The status of a whole answer in ``_in``, and whether the server
        closes the connection after it; None while it is incomplete."""
        end = self._in.find(b"\r\n\r\n")
        if end < 0:
            return None
        status_line, *lines = self._in[:end].decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip().lower()
        body = end + 4
        if "chunked" in fields.get("transfer-encoding", ""):
            while True:
                line_end = self._in.find(b"\r\n", body)
                if line_end < 0:
                    return None
                size = int(self._in[body:line_end].split(b";")[0], 16)
                body = line_end + 2 + size + 2
                if len(self._in) < body:
                    return None
                if size == 0:
                    break
        elif len(self._in) < body + int(fields.get("content-length", "0")):
            return None
        return status, fields.get("connection") == "close"

    def _fail(self, error: str) -> str:
        self.seq = None
        self.close()
        return error

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def publish_ticked(
    ticker: Ticker,
    target: Target,
    channel: str,
    seqs: range,
    rate: float,
    connections: int,
    longest: float,
) -> Paced:
    """Publish as :func:`publish_paced` does, at the ticks of ``ticker``.

    At each tick, the answers that came are read, and every event whose
    time has come goes out on a free connection: up to a tick after its
    time, and an answer is seen up to a tick after it came, which is in
    the POST's time (``publish_request``), and keeps its connection busy
    that much longer. No event goes out more than ``longest`` seconds after
    the first.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    paced = Paced()
    posters = [Poster(target, n) for n in range(connections)]
    start = time.monotonic()
    numbers = iter(seqs)
    following = next(numbers, None)

    def tick() -> None:
        nonlocal following
        now = time.monotonic()
        for poster in posters:
            if poster.idle:
                continue
            sent = poster.sent
            error = poster.poll()
            if error is None:
                continue
            paced.post_seconds.append(now - sent)
            if error:
                paced.errors[error] += 1
            else:
                paced.accepted += 1
        if now > start + longest:
            following = None
        while following is not None and now >= start + (following - seqs.start) / rate:
            free = next((p for p in posters if p.idle), None)
            if free is None:
                break
            paced.events += 1
            paced.connection_of[following] = free.number
            if error := free.send(channel, following):
                paced.post_seconds.append(time.monotonic() - free.sent)
                paced.errors[error] += 1
            following = next(numbers, None)
        if following is None and all(p.idle for p in posters):
            ticker.callbacks.remove(guarded)
            paced.seconds = time.monotonic() - start
            done.set_result(None)

    def guarded() -> None:
        try:
            tick()
        except Exception as exc:
            ticker.callbacks.remove(guarded)
            done.set_exception(exc)

    ticker.callbacks.append(guarded)
    try:
        await done
    finally:
        if guarded in ticker.callbacks:
            ticker.callbacks.remove(guarded)
        for poster in posters:
            poster.close()
    return paced


async def idle(target: Target, args: argparse.Namespace, points: Checkpoints) -> Result:
    path = f"/events?channel={args.channel}"
    # A few streams first, so one-time costs of the first requests are paid
    # before the runner takes its "before" measurement.
    warm, _ = await open_streams(target, path, 10)
    for stream in warm:
        stream.close()
    await asyncio.sleep(1.0)
    await points.reach("warm")
    streams, connect = await open_streams(target, path, args.streams)
    await points.reach("connected", connected=len(streams))
    comments = sum(s.comments for s in streams)
    events = sum(s.events for s in streams)
    await asyncio.sleep(args.hold)
    alive = sum(1 for s in streams if s.is_open)
    await points.reach("held", alive=alive)
    for stream in streams:
        stream.close()
    return {
        **connect,
        "hold_seconds": args.hold,
        "alive_after_hold": alive,
        "keepalive_comments": sum(s.comments for s in streams) - comments,
        "events_during_hold": sum(s.events for s in streams) - events,
    }


async def subscribe(
    target: Target, args: argparse.Namespace, points: Checkpoints
) -> tuple[Deliveries, list[Stream], Result]:
    """Open the subscribers of ``args.channel`` and let them settle."""
    deliveries = Deliveries()
    streams, connect = await open_streams(
        target, f"/events?channel={args.channel}", args.subscribers, deliveries.receive
    )
    await points.reach("connected", connected=len(streams))
    await asyncio.sleep(args.settle)
    return deliveries, streams, connect


async def fanout(
    target: Target, args: argparse.Namespace, points: Checkpoints
) -> Result:
    """Publish at ``args.rate`` from a process of its own to the subscribers
    that this one reads and parses.

    With the publisher on this event loop, a server that wrote an event to
    1,000 sockets within a few milliseconds kept the loop reading them just
    when the POST's answer came, so the next POST went out late and the
    server's rate achieved was the client's. A thread would not do: the
    readers hold the GIL while they parse, and a thread waits for it.
    """
    # Started first, so that its interpreter's start overlaps the connects.
    publisher = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.client",
        "fanout-publisher",
        "--url",
        f"http://{target.host}:{target.port}",
        "--channel",
        args.channel,
        "--events",
        str(args.events),
        "--rate",
        str(args.rate),
        cwd=PACKAGE_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        deliveries, streams, connect = await subscribe(target, args, points)
        await publisher_line(publisher)
        # The span whose server CPU is measured: from here to "delivered".
        await points.reach("publishing", instant=True)
        assert publisher.stdin is not None
        publisher.stdin.write(b"go\n")
        await publisher.stdin.drain()
        paced = await publisher_line(publisher)
        expected = paced["accepted"] * len(streams)
        await deliveries.wait(expected, args.drain)
        await points.reach("delivered", instant=True, delivered=deliveries.count)
    finally:
        if publisher.returncode is None:
            publisher.kill()
        await publisher.wait()
    for stream in streams:
        stream.close()
    return {
        **connect,
        **paced,
        "expected": expected,
        "delivered": deliveries.count,
        "delivered_ratio": round(deliveries.count / expected, 6) if expected else 0,
        "subscribers_complete": sum(
            1 for s in streams if s.delivered >= paced["accepted"]
        ),
        "out_of_order": sum(s.out_of_order for s in streams),
        "latency": percentiles(deliveries.latencies),
    }


async def publisher_line(publisher: asyncio.subprocess.Process) -> Result:
    """The fan-out publisher's next JSON line."""
    assert publisher.stdout is not None
    line = await publisher.stdout.readline()
    if not line:
        code = await publisher.wait()
        raise RuntimeError(f"The fan-out publisher exited with {code}.")
    return t.cast(Result, json.loads(line))


def fanout_publisher(args: argparse.Namespace) -> None:
    """The publisher of ``fanout``, in a process of its own: say it is ready,
    publish on "go" from stdin, and print what it did."""
    target = parse_target(args.url)
    emit({"ready": True})
    # Straight from the descriptor, never through sys.stdin: a daemon thread
    # blocked in sys.stdin's buffer at exit can abort the interpreter.
    if not os.read(0, 64):
        return
    # A client that was killed (the runner terminates it) runs no cleanup:
    # its end closes this pipe, and this process must not outlive it.
    threading.Thread(target=exit_on_eof, daemon=True).start()
    cpu = -cpu_seconds()
    paced = asyncio.run(
        publish_paced(target, args.channel, range(args.events), args.rate)
    )
    cpu += cpu_seconds()
    emit(
        {
            **paced.summary(),
            "publish_seconds": round(paced.seconds, 3),
            "publisher_cpu_seconds": round(cpu, 3),
        }
    )


def exit_on_eof() -> None:
    while os.read(0, 64):
        pass
    os._exit(1)


async def capacity(
    target: Target, args: argparse.Namespace, points: Checkpoints
) -> Result:
    """Step the publishing rate up until a step fails; the last that passed.

    Every stream is read and its events counted, but only ``args.sample``
    of them are parsed and timed, and the client reads and publishes at the
    ticks of a :class:`Ticker`: parsing every event of 1,000 streams, each
    read as soon as it was ready, took the client a core at 75 events/s,
    before the servers did.
    """
    deliveries, streams, connect = await subscribe(target, args, points)
    sample, counted = spread_sample(streams, args.sample)
    for stream in sample:
        stream.seqs = []
    ticker = Ticker()
    reader = TickReader(ticker, sample, counted)
    steps: dict[str, Result] = {}
    passed: list[float] = []
    first = 0
    try:
        for rate in args.rates:
            step = await capacity_step(
                target,
                args,
                points,
                deliveries,
                streams,
                sample,
                ticker,
                reader,
                rate,
                first,
            )
            steps[f"{rate:g}"] = step
            # Numbers of events scheduled but not sent are not used again.
            first += step["scheduled"]
            if not step["passed"]:
                break
            passed.append(rate)
    finally:
        reader.stop()
        ticker.stop()
    for stream in streams:
        stream.close()
    last = list(steps.values())[-1]
    return {
        **connect,
        "rates": args.rates,
        "step_seconds": args.step_seconds,
        "connections": args.connections,
        "sampled_streams": len(sample),
        "counted_streams": len(counted),
        "tick_seconds": TICK_SECONDS,
        "sweep_seconds": SWEEP_SECONDS,
        "capacity_rate": max(passed, default=0.0),
        # Every step passed: the server could do more than the ladder asked.
        "capped": len(passed) == len(args.rates),
        "stopped_by": last["stopped_by"],
        "client_bound_at_stop": bool(last["stopped_by"]) and last["client_bound"],
        "steps": steps,
    }


def spread_sample(
    streams: list[Stream], size: int
) -> tuple[list[Stream], list[Stream]]:
    """``size`` of the streams, spread evenly over the order in which they
    opened, and the others.

    A server may write each event to its subscribers in the order they
    subscribed: a sample of the first to open would see every event first.
    """
    ordered = sorted(streams, key=lambda s: s.opened_at or 0.0)
    size = min(size, len(ordered))
    # The middle of each of ``size`` equal runs of the order.
    chosen = {(2 * k + 1) * len(ordered) // (2 * size) for k in range(size)}
    sample = [s for i, s in enumerate(ordered) if i in chosen]
    return sample, [s for i, s in enumerate(ordered) if i not in chosen]


async def wait_counted(
    streams: list[Stream], need: list[int], timeout: float, reader: TickReader
) -> None:
    """Wait until each stream counted as many events as ``need`` says,
    ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    waiting = list(zip(streams, need, strict=True))
    pause = 0.02
    while True:
        waiting = [(s, n) for s, n in waiting if s.counted < n and not s.ended.done()]
        if not waiting or time.monotonic() >= deadline:
            return
        await asyncio.sleep(pause)
        # Not at the sweep's next turn: the step would end up to a sweep
        # late, and its span take in idle time. Less and less often, so that
        # a step whose events never come does not read 1,000 sockets 50
        # times a second for its whole wait.
        reader.read([s for s, _ in waiting if s.counting])
        pause = min(2 * pause, SWEEP_SECONDS)


def sample_order(sample: list[Stream], paced: Paced) -> Result:
    """What the sampled streams received of one step's events, beyond their
    number: duplicates, events not published in the step, and events
    received before one published earlier on the same connection."""
    duplicates = unexpected = out_of_order = 0
    for stream in sample:
        seqs = stream.seqs or []
        duplicates += len(seqs) - len(set(seqs))
        # Events of different connections may be accepted in either order;
        # those of one connection were published one after the other, each
        # once the last was accepted, so every subscriber gets them in order.
        last: dict[int, int] = {}
        for seq in seqs:
            connection = paced.connection_of.get(seq)
            if connection is None:
                unexpected += 1
                continue
            if seq < last.get(connection, -1):
                out_of_order += 1
            last[connection] = seq
    return {
        "sample_duplicates": duplicates,
        "sample_unexpected": unexpected,
        "sample_out_of_order": out_of_order,
    }


async def capacity_step(
    target: Target,
    args: argparse.Namespace,
    points: Checkpoints,
    deliveries: Deliveries,
    streams: list[Stream],
    sample: list[Stream],
    ticker: Ticker,
    reader: TickReader,
    rate: float,
    first: int,
) -> Result:
    """Publish at ``rate`` for ``args.step_seconds`` and wait for every event;
    what arrived, how late, and whether the step passed."""
    name = f"step-{rate:g}"
    before = [s.counted for s in streams]
    deliveries.take_latencies()
    for stream in sample:
        stream.seqs = []
    reader.take()
    zero_windows = -zero_window_adverts()
    # The runner reads the server's CPU time at both ends of the step.
    await points.reach(name, instant=True)
    cpu = -cpu_seconds()
    start = time.monotonic()
    count = max(1, round(rate * args.step_seconds))
    seqs = range(first, first + count)
    longest = args.step_seconds * CAPACITY_OVERRUN
    paced = await publish_ticked(
        ticker, target, args.channel, seqs, rate, args.connections, longest
    )
    # The next step starts from no backlog: one step's late events do not
    # count against the next.
    need = [n + paced.accepted for n in before]
    await wait_counted(streams, need, args.drain, reader)
    seconds = time.monotonic() - start
    cpu += cpu_seconds()
    await points.reach(f"{name}-end", instant=True)
    zero_windows += zero_window_adverts()
    received = [s.counted - n for s, n in zip(streams, before, strict=True)]
    expected = paced.accepted * len(streams)
    delivered = sum(received)
    latencies = deliveries.take_latencies()
    latency = percentiles(latencies)
    order = sample_order(sample, paced)
    # The parser and the count disagree: the count cannot be trusted for
    # the streams that only have it.
    miscounted = sum(1 for s in sample if s.counted != s.events)
    client_share = round(cpu / seconds, 3)
    stopped_by = []
    if latency["p99_ms"] is None or latency["p99_ms"] >= CAPACITY_P99_MS:
        stopped_by.append("p99")
    if paced.rate_achieved < CAPACITY_RATE_SLACK * rate:
        stopped_by.append("rate")
    short = sum(1 for n in received if n < paced.accepted)
    if paced.accepted < paced.events or short:
        stopped_by.append("lost")
    over = sum(1 for n in received if n > paced.accepted)
    if over or order["sample_duplicates"] or order["sample_unexpected"]:
        stopped_by.append("extra")
    if order["sample_out_of_order"]:
        stopped_by.append("order")
    if miscounted:
        stopped_by.append("count")
    return {
        "rate": rate,
        "scheduled": count,
        **paced.summary(),
        "expected": expected,
        "delivered": delivered,
        "delivered_ratio": round(delivered / expected, 6) if expected else 0,
        "streams_short": short,
        "streams_over": over,
        "streams_cut": sum(1 for s in streams if s.ended.done()),
        **order,
        "sample_miscounted": miscounted,
        "latency": latency,
        "latency_samples": len(latencies),
        **reader.take(),
        "zero_window_adverts": zero_windows,
        "seconds": round(seconds, 3),
        "client_cpu_share": client_share,
        "client_bound": client_share >= BOUND_SHARE,
        "passed": not stopped_by,
        "stopped_by": stopped_by,
    }


def zero_window_adverts() -> int:
    """How many times this machine's TCP wanted to advertise a zero window
    so far, a reader that let its receive buffer fill (any process's)."""
    try:
        with open("/proc/net/netstat") as netstat:
            lines = netstat.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        fields = dict(zip(names.split(), values.split(), strict=False))
        if "TCPWantZeroWindowAdv" in fields:
            return int(fields["TCPWantZeroWindowAdv"])
    return 0


async def publish(
    target: Target, args: argparse.Namespace, points: Checkpoints
) -> Result:
    deliveries, streams, connect = await subscribe(target, args, points)
    publishers = [Publisher(target) for _ in range(args.connections)]
    numbers = iter(range(args.events))
    errors: collections.Counter[str] = collections.Counter()

    async def work(publisher: Publisher) -> int:
        accepted = 0
        # The iterator is shared: each connection takes the next number.
        for seq in numbers:
            error = await publisher.publish(args.channel, numbered(seq))
            if error is None:
                accepted += 1
            else:
                errors[error] += 1
        publisher.close()
        return accepted

    start_wall = time.time()
    start = time.monotonic()
    accepted = sum(await asyncio.gather(*(work(p) for p in publishers)))
    publish_seconds = time.monotonic() - start
    expected = accepted * len(streams)
    await deliveries.wait(expected, args.drain)
    deliver_seconds = max(deliveries.last_received - start_wall, publish_seconds)
    for stream in streams:
        stream.close()
    per_subscriber = deliveries.count / len(streams) if streams else 0
    return {
        **connect,
        "events": args.events,
        "connections": args.connections,
        "accepted": accepted,
        "publish_errors": dict(errors),
        "publish_seconds": round(publish_seconds, 3),
        "published_per_second": round(accepted / publish_seconds, 1),
        "expected": expected,
        "delivered": deliveries.count,
        "delivered_ratio": round(deliveries.count / expected, 6) if expected else 0,
        "deliver_seconds": round(deliver_seconds, 3),
        "delivered_per_second": round(per_subscriber / deliver_seconds, 1),
        "latency": percentiles(deliveries.latencies),
    }


async def throughput(
    target: Target, args: argparse.Namespace, points: Checkpoints
) -> Result:
    gate = asyncio.Semaphore(1)
    start = time.monotonic()
    stream = await open_stream(
        target, f"/throughput?n={args.events}&size={args.size}", gate
    )
    try:
        async with asyncio.timeout(args.timeout):
            await asyncio.shield(stream.ended)
    except TimeoutError:
        stream.fail("TimeoutError")
    seconds = time.monotonic() - start
    stream.close()
    # Flask-EventStream ends a stream whose generator returned with an event
    # of its own, which is not one of those asked for.
    received = stream.events - (stream.last_type == b"eventstream.end")
    return {
        "events": args.events,
        "size": args.size,
        "received": received,
        "complete": stream.complete and received == args.events,
        "stream_error": stream.error,
        "seconds": round(seconds, 3),
        "body_bytes": stream.body_bytes,
        "events_per_second": round(received / seconds, 1),
        "mb_per_second": round(stream.body_bytes / seconds / 1e6, 2),
    }


SCENARIOS = {
    "idle": idle,
    "fanout": fanout,
    "publish": publish,
    "throughput": throughput,
    "capacity": capacity,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    common.add_argument("--handshake", action="store_true")
    common.add_argument("--wait", type=float, default=120.0)
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    one = scenarios.add_parser("idle", parents=[common])
    one.add_argument("--streams", type=int, default=1000)
    one.add_argument("--hold", type=float, default=20.0)
    one.add_argument("--channel", default="idle")
    for name, events in (("fanout", 200), ("publish", 10_000)):
        one = scenarios.add_parser(name, parents=[common])
        one.add_argument("--events", type=int, default=events)
        one.add_argument("--subscribers", type=int, default=1000)
        one.add_argument("--channel", default=name)
        one.add_argument("--settle", type=float, default=1.0)
        one.add_argument("--drain", type=float, default=30.0)
    scenarios.choices["fanout"].add_argument("--rate", type=float, default=50.0)
    # Started by ``fanout`` itself, not by the runner.
    one = scenarios.add_parser("fanout-publisher")
    one.add_argument("--url", required=True)
    one.add_argument("--channel", required=True)
    one.add_argument("--events", type=int, required=True)
    one.add_argument("--rate", type=float, required=True)
    scenarios.choices["publish"].add_argument(
        "--connections", type=int, default=PUBLISHERS
    )
    one = scenarios.add_parser("capacity", parents=[common])
    one.add_argument("--subscribers", type=int, default=1000)
    one.add_argument("--channel", default="capacity")
    one.add_argument("--settle", type=float, default=1.0)
    one.add_argument(
        "--rates",
        type=lambda v: [float(r) for r in v.split(",")],
        default=[50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 400.0, 600.0, 800.0],
        help="events/s of each step, rising",
    )
    one.add_argument("--step-seconds", type=float, default=4.0)
    one.add_argument("--drain", type=float, default=10.0, help="seconds a step waits")
    one.add_argument("--connections", type=int, default=CAPACITY_CONNECTIONS)
    one.add_argument(
        "--sample",
        type=positive,
        default=CAPACITY_SAMPLE,
        help="streams whose events are parsed and timed; the others are counted",
    )
    one = scenarios.add_parser("throughput", parents=[common])
    one.add_argument("--events", type=int, default=1_000_000)
    one.add_argument("--size", type=int, default=100)
    one.add_argument("--timeout", type=float, default=300.0)
    return parser


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"at least 1 (got {number})")
    return number


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.scenario == "fanout-publisher":
        fanout_publisher(args)
        return
    target = parse_target(args.url)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    points = Checkpoints(args.handshake, args.wait)
    # The scenario's own CPU time, without starting the interpreter.
    cpu = -cpu_seconds()
    start = time.monotonic()
    result = asyncio.run(SCENARIOS[args.scenario](target, args, points))
    wall = time.monotonic() - start
    cpu += cpu_seconds()
    emit(
        {
            "phase": "result",
            "scenario": args.scenario,
            **result,
            "checkpoints_missed": points.missed,
            "client_cpu_seconds": round(cpu, 3),
            "client_wall_seconds": round(wall, 3),
            "client_cpu_share": round(cpu / wall, 3),
        }
    )


if __name__ == "__main__":
    main()
