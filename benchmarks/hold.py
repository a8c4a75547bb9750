"""Hold many idle subscriber streams on one gunicorn gevent worker.

    python -m benchmarks.hold --streams 10000

Starts the demo app under ``gunicorn -k gevent -w 1`` on a free port,
opens the streams from this process (asyncio, raw sockets), publishes one
event and counts who got it, then reports the worker's memory per stream.
Everything runs on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPENING = b": stream opened\n"


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"No VmRSS for pid {pid}.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit(wanted: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as rv:
        return json.loads(rv.read())  # type: ignore[no-any-return]


async def open_stream(
    port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await reader.readuntil(OPENING)
    return reader, writer


async def hold(port: int, streams: int, concurrency: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with gate:
            try:
                return await asyncio.wait_for(
                    open_stream(port, "/events?channel=hold"), 30
                )
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                return None

    start = time.monotonic()
    opened = [c for c in await asyncio.gather(*(one() for _ in range(streams))) if c]
    connect_seconds = time.monotonic() - start
    state = get_json(f"http://127.0.0.1:{port}/state")
    worker_rss = rss_kib(int(state["pid"]))  # type: ignore[call-overload]

    publish_at = time.monotonic()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/publish?channel=hold&data=hello", method="POST"
    )
    with urllib.request.urlopen(request, timeout=10):
        pass

    async def received(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.readuntil(b"data: hello\n"), 30)
            return True
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            return False

    got = sum(await asyncio.gather(*(received(r) for r, _ in opened)))
    deliver_seconds = time.monotonic() - publish_at
    for _, writer in opened:
        writer.close()
    return {
        "opened": len(opened),
        "received": got,
        "connect_seconds": round(connect_seconds, 2),
        "deliver_all_seconds": round(deliver_seconds, 3),
        "worker_rss_kib": worker_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hold")
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=500)
    args = parser.parse_args()
    raise_fd_limit(args.streams + 1000)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    server = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1",
            "--worker-connections", str(args.streams + 100),
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
            "benchmarks.app:create_app()",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: raise_fd_limit(args.streams + 1000),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                idle = get_json(f"http://127.0.0.1:{port}/state")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        base_rss = rss_kib(int(idle["pid"]))  # type: ignore[call-overload]
        result = asyncio.run(hold(port, args.streams, args.concurrency))
        result["worker_rss_idle_kib"] = base_rss
        result["kib_per_stream"] = round(
            (result["worker_rss_kib"] - base_rss) / max(result["opened"], 1), 2
        )
        print(json.dumps({"streams": args.streams, **result}, indent=2))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


if __name__ == "__main__":
    main()
