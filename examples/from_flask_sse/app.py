"""A news page, ported from Flask-SSE: greetings, headlines and a staff channel.

Every page gets the greetings (channel ``sse``) and the headlines (channel
``news``); signed-in staff may also follow who posted what (channel
``staff``). It needs Redis at ``REDIS_URL``, like the Flask-SSE app did::

    gunicorn -k gevent 'examples.from_flask_sse.app:create_app()'
"""

from __future__ import annotations

import os
import secrets

from flask import Flask
from flask import render_template
from flask import request
from flask import session

from flask_eventstream import BrokerError
from flask_eventstream import EventStream

sse = EventStream()


@sse.authorize
def may_subscribe(channel: str) -> bool:
    # Asked about every channel a request names. A before_request hook that
    # read request.args.get("channel") saw only the first of them.
    return channel != "staff" or bool(session.get("staff"))


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["EVENTSTREAM_BROKER_URL"] = os.environ.get(
        "REDIS_URL", "redis://localhost:6379/0"
    )
    app.config.from_prefixed_env()
    app.register_blueprint(sse, url_prefix="/stream")

    @app.errorhandler(BrokerError)
    def broker_unreachable(e: BrokerError) -> tuple[str, int]:
        # Publishing fails while Redis is down; the streams stay open.
        return "Events cannot be sent right now; try again shortly.", 503

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.post("/hello")
    def publish_hello() -> str:
        sse.publish({"message": "Hello!"}, event="greeting")
        return "Message sent!"

    @app.post("/news")
    def publish_news() -> str:
        headline = request.form["headline"]
        sse.publish(headline, event="headline", channel="news")
        sse.publish(
            {"headline": headline, "from": request.remote_addr},
            event="posted",
            channel="staff",
        )
        return "Headline sent!"

    @app.post("/login")
    def login() -> tuple[str, int]:
        # A stand-in for the app's own sign-in.
        password = request.form.get("password", "").encode()
        session["staff"] = secrets.compare_digest(
            password, app.config["STAFF_PASSWORD"].encode()
        )
        return "", 204

    return app
