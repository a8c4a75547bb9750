"""Ticks and job progress, ported from sse-starlette on FastAPI.

``/ticks`` streams, without end, a generator that yields events as
sse-starlette's dicts. ``POST /jobs`` starts a job, and
``/jobs/<id>/progress`` follows it until it is done. The jobs live in the
process, as they did in the FastAPI app, so serve it with one worker::

    gunicorn -k gevent --workers 1 'examples.from_sse_starlette.app:create_app()'
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import typing as t
import uuid

from flask import abort
from flask import Flask
from flask import request
from flask import Response

from flask_eventstream import Event
from flask_eventstream import stream_events

if t.TYPE_CHECKING:
    import collections.abc as cabc

#: Sent on a job's stream after a silence, in place of the keep-alive
#: comment, so that its page can tell a slow step from a lost connection.
PING = Event("", event="ping")


def as_event(item: cabc.Mapping[str, t.Any]) -> Event:
    """Make an :class:`Event` of a dict of event fields, as sse-starlette
    takes them: ``{"event": "tick", "id": "1", "data": "..."}``."""
    return Event(
        item.get("data"),
        event=item.get("event"),
        id=item.get("id"),
        retry=item.get("retry"),
        comment=item.get("comment"),
    )


def ticks() -> cabc.Iterator[dict[str, str]]:
    for n in itertools.count(1):
        yield {"event": "tick", "id": str(n), "data": json.dumps({"n": n})}
        time.sleep(1)


class Job:
    """A job that runs in the background, one step after another."""

    def __init__(self, steps: int, delay: float) -> None:
        self.id = uuid.uuid4().hex
        self.steps = steps
        self.delay = delay
        self.done = 0
        self._progress = threading.Condition()

    def run(self) -> None:
        for _ in range(self.steps):
            time.sleep(self.delay)  # The work of one step.
            with self._progress:
                self.done += 1
                self._progress.notify_all()

    def follow(self) -> cabc.Iterator[int]:
        """Yield how many steps are done, now and each time that grows."""
        seen = 0
        while seen < self.steps:
            with self._progress:
                while self.done == seen:
                    self._progress.wait()
                seen = self.done
            yield seen


def create_app() -> Flask:
    app = Flask(__name__)
    # The ping=5 that every EventSourceResponse of the app was given.
    app.config["EVENTSTREAM_KEEPALIVE"] = 5
    app.config.from_prefixed_env()
    jobs: dict[str, Job] = {}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "healthy"}

    @app.get("/ticks")
    @stream_events(send_timeout=30)
    def tick_stream() -> cabc.Iterator[Event]:
        return map(as_event, ticks())

    @app.post("/jobs")
    def start_job() -> tuple[dict[str, str], int]:
        steps = request.args.get("steps", 10, type=int)
        delay = request.args.get("delay", 1.0, type=float)
        if not 1 <= steps <= 100 or not 0 < delay <= 10:
            abort(400, "A job has 1 to 100 steps of at most 10 seconds each.")
        job = Job(steps, delay)
        jobs[job.id] = job
        threading.Thread(target=job.run, daemon=True).start()
        return {"id": job.id}, 201

    @app.get("/jobs/<job_id>/progress")
    @stream_events(heartbeat=PING)
    def job_progress(job_id: str) -> Response | cabc.Iterator[Event]:
        job = jobs.get(job_id)
        if job is None:
            abort(404)
        if job.done == job.steps:
            # Stops EventSource for good: a stream would send it all again
            # after each of its reconnects.
            return Response(status=204)

        def progress() -> cabc.Iterator[Event]:
            for done in job.follow():
                yield Event({"done": done, "total": job.steps}, event="progress")
            yield Event({"steps": job.steps}, event="done")
            # Returning ends the stream with eventstream.end.

        return progress()

    return app
