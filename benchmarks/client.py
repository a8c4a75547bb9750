"""The load client: one scenario against one server, one JSON result.

    python -m benchmarks.client idle --url URL --streams 1000 --hold 20
    python -m benchmarks.client fanout --url URL --subscribers 200 --events 50 --rate 50
    python -m benchmarks.client publish --url URL --events 2000 --subscribers 100
    python -m benchmarks.client throughput --url URL --events 100000 --size 100

It runs in a process of its own and reports its own CPU and wall seconds in
every result: with a CPU share near 1.0 the client may have set the pace,
not the server. Every line it prints on stdout is one JSON object, the last one
``{"phase": "result", ...}``. With ``--handshake`` it stops at each
checkpoint (``warm`` before connecting, ``connected``, ``held``): it prints
``{"phase": NAME, ...}`` and reads one line from stdin, waiting at most
``--wait`` seconds, so that whoever started it can measure the server in
between. Only 127.0.0.1 (or localhost) is accepted as a target.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import socket
import struct
import sys
import time
import typing as t
import urllib.parse

CONNECT_CONCURRENCY = 500
CONNECT_TIMEOUT_SECONDS = 60.0
PUBLISHERS = 8
READ_BYTES = 256 * 1024
# Linux's SO_TIMESTAMPNS (which the socket module does not name): each read
# comes with the time the kernel received its last bytes, a struct timespec.
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")
ANCILLARY_BYTES = socket.CMSG_SPACE(TIMESPEC.size)
LOOPBACK = ("127.0.0.1", "localhost")

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
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._socket is not None
        try:
            data, ancillary, _, _ = self._socket.recvmsg(READ_BYTES, ANCILLARY_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.fail(type(exc).__name__)
            return
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
        self.data_received(data, received)

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
                    if self.on_event is not None:
                        self.on_event(self, b"\n".join(self._data), received)
                        self._data.clear()
            elif line[0] == 58:  # b":", a comment
                self.comments += 1
            elif line[:5] == b"data:":
                self._has_data = True
                if self.on_event is not None:
                    value = line[5:]
                    self._data.append(value[1:] if value[:1] == b" " else value)


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

    async def reach(self, phase: str, **info: t.Any) -> None:
        emit({"phase": phase, **info})
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
        stream.delivered += 1
        self.count += 1
        self.latencies.append(received - sent)
        self.last_received = received

    async def wait(self, expected: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def numbered(seq: int) -> str:
    return json.dumps({"seq": seq, "t": time.time()})


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
    deliveries, streams, connect = await subscribe(target, args, points)
    publisher = Publisher(target)
    accepted = 0
    errors: collections.Counter[str] = collections.Counter()
    post_seconds: list[float] = []
    start = time.monotonic()
    for seq in range(args.events):
        await asyncio.sleep(start + seq / args.rate - time.monotonic())
        sent = time.monotonic()
        error = await publisher.publish(args.channel, numbered(seq))
        post_seconds.append(time.monotonic() - sent)
        if error is None:
            accepted += 1
        else:
            errors[error] += 1
    publish_seconds = time.monotonic() - start
    publisher.close()
    expected = accepted * len(streams)
    await deliveries.wait(expected, args.drain)
    for stream in streams:
        stream.close()
    return {
        **connect,
        "events": args.events,
        "accepted": accepted,
        "publish_errors": dict(errors),
        "rate_achieved": round(args.events / publish_seconds, 2),
        "expected": expected,
        "delivered": deliveries.count,
        "delivered_ratio": round(deliveries.count / expected, 6) if expected else 0,
        "subscribers_complete": sum(1 for s in streams if s.delivered >= accepted),
        "out_of_order": sum(s.out_of_order for s in streams),
        "latency": percentiles(deliveries.latencies),
        "publish_request": percentiles(post_seconds),
    }


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
    return {
        "events": args.events,
        "size": args.size,
        "received": stream.events,
        "complete": stream.complete and stream.events == args.events,
        "stream_error": stream.error,
        "seconds": round(seconds, 3),
        "body_bytes": stream.body_bytes,
        "events_per_second": round(stream.events / seconds, 1),
        "mb_per_second": round(stream.body_bytes / seconds / 1e6, 2),
    }


SCENARIOS = {
    "idle": idle,
    "fanout": fanout,
    "publish": publish,
    "throughput": throughput,
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
    scenarios.choices["publish"].add_argument(
        "--connections", type=int, default=PUBLISHERS
    )
    one = scenarios.add_parser("throughput", parents=[common])
    one.add_argument("--events", type=int, default=1_000_000)
    one.add_argument("--size", type=int, default=100)
    one.add_argument("--timeout", type=float, default=300.0)
    return parser


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
