"""sse-starlette under uvicorn, with an in-process broadcast.

    uvicorn benchmarks.peers.sse_starlette:app --port 8000 --workers 1 \\
        --log-level warning

A dict of channels, an ``asyncio.Queue`` per client, and an async generator
per stream that ``EventSourceResponse`` encodes and sends, pinging every
15 s. Each stream runs as a task group of four tasks (send, ping, disconnect
watch, shutdown watch). uvicorn runs with what plain ``pip install uvicorn``
brings: the asyncio loop and the h11 parser (uvloop and httptools come only
with ``uvicorn[standard]``, which the benchmark environment does not
install).
"""

from __future__ import annotations

import asyncio
import os
import typing as t

from sse_starlette import EventSourceResponse
from sse_starlette import ServerSentEvent
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from starlette.requests import Request

PING_SECONDS = 15
# sse-starlette ends lines with CRLF by default; LF sends the same bytes as
# every other server under test.
SEPARATOR = "\n"

channels: dict[str, set[asyncio.Queue[str]]] = {}


async def events(request: Request) -> EventSourceResponse:
    channel = request.query_params.get("channel", "sse")
    messages: asyncio.Queue[str] = asyncio.Queue()
    # Subscribed before the response starts, so a client that has read the
    # opening comment gets every event published after it.
    subscribers = channels.setdefault(channel, set())
    subscribers.add(messages)

    async def generate() -> cabc.AsyncIterator[ServerSentEvent | dict[str, str]]:
        try:
            yield ServerSentEvent(comment="stream opened", sep=SEPARATOR)
            while True:
                yield {"data": await messages.get()}
        finally:
            subscribers.discard(messages)
            if not subscribers and channels.get(channel) is subscribers:
                del channels[channel]

    return EventSourceResponse(generate(), ping=PING_SECONDS, sep=SEPARATOR)


async def publish(request: Request) -> JSONResponse:
    data = request.query_params["data"]
    subscribers = list(channels.get(request.query_params["channel"], ()))
    for messages in subscribers:
        messages.put_nowait(data)
    return JSONResponse({"subscribers": len(subscribers)})


async def throughput(request: Request) -> EventSourceResponse:
    count = int(request.query_params.get("n", 1000))
    payload = "x" * int(request.query_params.get("size", 100))

    async def generate() -> cabc.AsyncIterator[dict[str, str]]:
        for _ in range(count):
            yield {"data": payload}

    return EventSourceResponse(generate(), ping=PING_SECONDS, sep=SEPARATOR)


async def state(request: Request) -> JSONResponse:
    streams = sum(len(s) for s in channels.values())
    return JSONResponse({"pid": os.getpid(), "streams": streams})


app = Starlette(
    routes=[
        Route("/events", events),
        Route("/publish", publish, methods=["POST"]),
        Route("/throughput", throughput),
        Route("/state", state),
    ]
)
