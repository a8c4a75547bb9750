"""What the library's direct-write path adds to the write itself.

A flush under gunicorn's gevent worker hands each idle subscriber's events
to its mailbox, which writes them to the socket with one non-blocking
``os.write``. This times that path (``Mailbox.offer`` and
``SocketWriter.write_now``) for many loopback TCP connections, next to the
bare ``os.write`` of the same framed bytes to the same sockets, with no
server around either::

    python -m benchmarks.write_path --connections 1000 --events 1,10,50

Each round writes one batch of ``--events`` events of 100 bytes to every
connection, then the client side is read out, untimed, so that no write
ever meets a full buffer. The medians of ``--rounds`` rounds are printed
per connection.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from flask_eventstream.concurrency import Mailbox
from flask_eventstream.concurrency import ThreadBackend
from flask_eventstream.socket_writer import Frames
from flask_eventstream.socket_writer import SocketWriter

EVENT = b"data: " + b"x" * 92 + b"\n\n"


def connect(count: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """``count`` loopback connections: the server ends and the client ends."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    ours, theirs = [], []
    with listener:
        for _ in range(count):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            server.setblocking(False)
            client.setblocking(False)
            ours.append(server)
            theirs.append(client)
    return ours, theirs


def read_out(sockets: list[socket.socket], buffer: bytearray) -> None:
    for sock in sockets:
        try:
            while sock.recv_into(buffer) == len(buffer):
                pass
        except BlockingIOError:
            pass


def idle_mailbox(sock: socket.socket) -> Mailbox[object]:
    """A mailbox whose taker waits idle, so that offers write at once."""
    mailbox: Mailbox[object] = Mailbox(ThreadBackend(), 1 << 16)
    mailbox.write_through(SocketWriter(sock, chunked=True))
    # As take(idle=True) leaves it while its taker waits; no thread is
    # needed to time the writes.
    mailbox._taker_idle = True
    return mailbox


def measure(
    events: int, rounds: int, ours: list[socket.socket], theirs: list[socket.socket]
) -> tuple[float, float]:
    """Median seconds per connection: through the mailbox, and bare."""
    mailboxes = [idle_mailbox(sock) for sock in ours]
    descriptors = [sock.fileno() for sock in ours]
    buffer = bytearray(1 << 20)
    items: list[object] = [None] * events
    through: list[float] = []
    bare: list[float] = []

    def time_through(frames: Frames) -> float:
        start = time.perf_counter()
        for mailbox in mailboxes:
            mailbox.offer(items, frames)
        return time.perf_counter() - start

    def time_bare(frames: Frames) -> float:
        out = frames.framed(chunked=True)
        start = time.perf_counter()
        for fd in descriptors:
            os.write(fd, out)
        return time.perf_counter() - start

    for round_ in range(rounds):
        frames = Frames.join([EVENT] * events, time.monotonic())
        turns = [(time_through, through), (time_bare, bare)]
        # In turns, so that neither always finds the caches warmed by the other.
        if round_ % 2:
            turns.reverse()
        for timed, results in turns:
            results.append(timed(frames))
            read_out(theirs, buffer)
    if any(mailbox.writer and mailbox.writer.rest for mailbox in mailboxes):
        raise SystemExit("A write was partial: the figures would not compare.")
    count = len(ours)
    return statistics.median(through) / count, statistics.median(bare) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument(
        "--events", default="1,10,50", help="comma-separated events per write"
    )
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    ours, theirs = connect(args.connections)
    try:
        print("events/write  through the mailbox  bare os.write  added")
        for events in (int(n) for n in args.events.split(",")):
            through, bare = measure(events, args.rounds, ours, theirs)
            print(
                f"{events:12d}  {through * 1e6:16.2f} µs  {bare * 1e6:10.2f} µs"
                f"  {(through - bare) * 1e6:5.2f} µs"
            )
    finally:
        for sock in ours + theirs:
            sock.close()


if __name__ == "__main__":
    main()
