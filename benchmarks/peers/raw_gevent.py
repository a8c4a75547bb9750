"""The stack's limit: server-sent events written by hand on gevent sockets.

    python -m benchmarks.peers.raw_gevent --port 8000

No framework and no WSGI: a gevent ``StreamServer`` reads each request head
itself, and every stream is one greenlet that waits on its own queue and
writes chunks to its socket. What Flask-EventStream costs on top of this is
the price of gunicorn, WSGI, Flask and the library together.

It speaks just enough HTTP/1.1 for the load tools: a request line, headers,
a ``Content-Length`` body (read and dropped), persistent connections, and
chunked responses.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import typing as t  # noqa: E402
import urllib.parse  # noqa: E402

from gevent.queue import Empty  # noqa: E402
from gevent.queue import Queue  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

if t.TYPE_CHECKING:
    import socket

KEEPALIVE_SECONDS = 15.0
MAX_HEAD_BYTES = 65536
LISTEN_BACKLOG = 2048
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
LAST_CHUNK = b"0\r\n\r\n"
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def chunk(data: bytes) -> bytes:
    """Frame ``data`` as one chunk of a chunked response."""
    return b"%x\r\n%s\r\n" % (len(data), data)


OPENING = chunk(b": stream opened\n")
KEEPALIVE = chunk(b": keep-alive\n")

#: Subscriber queues by channel. Each holds framed chunks, ready to send.
channels: dict[str, set[Queue]] = {}


class Request(t.NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    close: bool


def read_request(sock: socket.socket, buffer: bytearray) -> Request | None:
    """Read the next request from ``sock``; ``None`` when the client left.

    ``buffer`` keeps what was read past this request, for the next one.
    """
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            return None
        data = sock.recv(65536)
        if not data:
            return None
        buffer += data
    lines = buffer[:end].decode("latin-1").split("\r\n")
    del buffer[: end + 4]
    method, target, version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        data = sock.recv(65536)
        if not data:
            return None
        buffer += data
    del buffer[:length]
    url = urllib.parse.urlsplit(target)
    return Request(
        method=method,
        path=url.path,
        query=dict(urllib.parse.parse_qsl(url.query)),
        close=version != "HTTP/1.1" or headers.get("connection", "").lower() == "close",
    )


def send_json(sock: socket.socket, body: object, status: str = "200 OK") -> None:
    data = json.dumps(body).encode()
    sock.sendall(
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status.encode(), len(data), data)
    )


def publish(channel: str, data: str) -> int:
    """Encode the event once and queue the same bytes for every subscriber."""
    lines = LINE_BREAK.split(data)
    framed = chunk("".join(f"data: {line}\n" for line in lines).encode() + b"\n")
    subscribers = list(channels.get(channel, ()))
    for queue in subscribers:
        queue.put(framed)
    return len(subscribers)


def stream(sock: socket.socket, channel: str) -> None:
    """Send a channel's events until the client goes away."""
    queue: Queue = Queue()
    subscribers = channels.setdefault(channel, set())
    subscribers.add(queue)
    try:
        sock.sendall(STREAM_HEAD + OPENING)
        while True:
            try:
                data = queue.get(timeout=KEEPALIVE_SECONDS)
            except Empty:
                # A write is also how a dead client is found.
                sock.sendall(KEEPALIVE)
                continue
            if queue.qsize():
                # Whatever else is waiting goes out in the same write.
                parts = [data]
                while queue.qsize():
                    parts.append(queue.get_nowait())
                data = b"".join(parts)
            sock.sendall(data)
    finally:
        subscribers.discard(queue)
        if not subscribers and channels.get(channel) is subscribers:
            del channels[channel]


def throughput(sock: socket.socket, count: int, size: int) -> None:
    """Send ``count`` events of ``size`` bytes of data, one write each."""
    event = chunk(b"data: " + b"x" * size + b"\n\n")
    sock.sendall(STREAM_HEAD)
    for _ in range(count):
        sock.sendall(event)
    sock.sendall(LAST_CHUNK)


def respond(sock: socket.socket, request: Request) -> bool:
    """Answer one request; return whether the connection may be reused."""
    route = (request.method, request.path)
    query = request.query
    if route == ("GET", "/events"):
        stream(sock, query.get("channel", "sse"))
        return False
    if route == ("POST", "/publish"):
        if "channel" not in query or "data" not in query:
            send_json(
                sock, {"error": "channel and data are required"}, "400 Bad Request"
            )
        else:
            send_json(sock, {"subscribers": publish(query["channel"], query["data"])})
    elif route == ("GET", "/throughput"):
        throughput(sock, int(query.get("n", 1000)), int(query.get("size", 100)))
    elif route == ("GET", "/state"):
        streams = sum(len(s) for s in channels.values())
        send_json(sock, {"pid": os.getpid(), "streams": streams})
    else:
        send_json(sock, {"error": "not found"}, "404 Not Found")
    return not request.close


def handle(sock: socket.socket, address: object) -> None:
    """Serve one connection: its requests in turn, or one stream."""
    buffer = bytearray()
    try:
        while (request := read_request(sock, buffer)) is not None:
            if not respond(sock, request):
                break
    except (OSError, ValueError):
        # A client that left, or a request this small parser refuses.
        pass
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.raw_gevent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = StreamServer((args.host, args.port), handle, backlog=LISTEN_BACKLOG)
    server.serve_forever()


if __name__ == "__main__":
    main()
