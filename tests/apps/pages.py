"""An app for browser tests of ``eventstream.js``: one page, a few streams.

Serve it with ``tests.servers.serve("gevent", app=APP, ready="/page")``.
Settings come from ``FLASK_*`` environment variables (``FLASK_EVENTSTREAM_MAX_AGE=2``
makes every ``/events`` stream end after two seconds).

``GET /page`` loads the module from the blueprint and defines
``watch(url, options)`` in the page. It calls ``connect(url, ...)`` and
records everything the client reports in ``logs[i]``, where ``i`` is what
``watch`` returns; ``streams[i]`` is the handle that ``connect`` returned.
``options`` is plain JSON: ``json``, ``lastEventId``, ``minDelay`` and
``maxDelay`` are passed on; ``events`` lists the event types to record
(``message`` is always recorded). A log holds::

    received  [{type, data, id}] for each event handed to a handler
    states    [[state, delay or null]] for each onState call
    restarts  [id of the last event received, or null] each time onState
              gives a delay, i.e. the module will start a new EventSource
    opens     how many times a stream opened
    resets    [data] of each eventstream.reset (the id that was lost)
    errors    [{status, message}] for each onError call
    ends      how many times onEnd was called

Wait for ``window.watch`` before calling it: the module loads after the page.

Stream URLs besides the blueprint's ``/events``:

``/finite?count=N``
    N events (ids ``1`` to ``N``, JSON data ``{"n": i}``), then the view
    returns, which ends the stream with ``eventstream.end``.
``/failing?status=S``
    one event (id ``1``, data ``RESUME``), then ``abort(S)`` inside the
    generator: ``eventstream.error``.
``/cut``
    one event (data ``RESUME``; its id counts on from the id the request
    names), then the stream ends without a word, as a proxy that cuts it
    would, so EventSource reconnects by itself.
``/refused?status=S``
    no stream at all: ``204 No Content`` if S is 204, else ``abort(S)``,
    to ``HEAD`` as to ``GET``, as a view that refuses before its first
    event does.

``RESUME`` is JSON that says how the request named the last id it saw:
``{"header": Last-Event-ID or null, "query": ?lastEventId or null}``.

The streams tell the browser to retry after ``RETRY_MS``. These four URLs
ignore other query arguments, so a test can tell apart requests of the
same kind by them.
``POST /publish`` with form fields ``channel``, ``data`` and optionally
``event`` publishes on the blueprint and answers ``{"id": ...}``.
"""

from __future__ import annotations

import typing as t

from flask import abort
from flask import Flask
from flask import render_template_string
from flask import request
from flask import Response

from flask_eventstream import Event
from flask_eventstream import EventStream
from flask_eventstream import stream_events

APP = "tests.apps.pages:create_app()"
#: How long the browser waits before it reconnects to the app's own streams.
RETRY_MS = 250

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>eventstream.js</title></head>
<body>
<script type="module">
  import {connect} from {{ url_for("eventstream.script")|tojson }};

  window.logs = [];
  window.streams = [];
  window.watch = (url, options = {}) => {
    const log = {
      received: [], states: [], restarts: [], opens: 0, resets: [], errors: [], ends: 0,
    };
    const record = (data, event) => {
      log.received.push({type: event.type, data, id: event.lastEventId});
    };
    const passed = ["json", "lastEventId", "minDelay", "maxDelay"]
      .filter((key) => key in options)
      .map((key) => [key, options[key]]);
    const stream = connect(url, {
      ...Object.fromEntries(passed),
      events: Object.fromEntries((options.events || []).map((type) => [type, record])),
      onMessage: record,
      onOpen: () => { log.opens += 1; },
      onState: (state, delay) => {
        log.states.push([state, delay ?? null]);
        if (delay !== undefined) log.restarts.push(log.received.at(-1)?.id ?? null);
      },
      onReset: (event) => { log.resets.push(event.data); },
      onError: ({status, message}) => { log.errors.push({status, message}); },
      onEnd: () => { log.ends += 1; },
    });
    logs.push(log);
    streams.push(stream);
    return logs.length - 1;
  };
</script>
</body>
</html>
"""


def create_app() -> Flask:
    """Create the app, with the blueprint at ``/events``."""
    app = Flask(__name__)
    app.config.from_prefixed_env()
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")

    @app.get("/page")
    def page() -> str:
        return render_template_string(PAGE)

    @app.post("/publish")
    def publish() -> dict[str, str]:
        form = request.form
        event_id = sse.publish(
            form["data"], event=form.get("event"), channel=form["channel"]
        )
        return {"id": event_id}

    @app.get("/finite")
    @stream_events(retry=RETRY_MS)
    def finite() -> t.Iterator[Event]:
        for n in range(1, request.args.get("count", 1, type=int) + 1):
            yield Event({"n": n}, id=str(n))

    @app.get("/failing")
    @stream_events(retry=RETRY_MS)
    def failing() -> t.Iterator[Event]:
        yield Event(_resume(), id="1")
        abort(request.args.get("status", 500, type=int))

    @app.get("/refused")
    @stream_events(retry=RETRY_MS)
    def refused() -> Response:
        status = request.args.get("status", 204, type=int)
        if status == 204:
            return Response(status=204)
        abort(status)

    @app.get("/cut")
    def cut() -> Response:
        resume = _resume()
        last = resume["header"] or resume["query"]
        n = int(last) + 1 if last and last.isdigit() else 1
        body = Event(resume, id=str(n), retry=RETRY_MS).encode()
        return Response(body, mimetype="text/event-stream")

    return app


def _resume() -> dict[str, str | None]:
    return {
        "header": request.headers.get("Last-Event-ID"),
        "query": request.args.get("lastEventId"),
    }
