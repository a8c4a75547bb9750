"""Publish from native threads and greenlets at once, under gevent.

    python -m tests.apps.native_publish BROKER_URL KEY_PREFIX COUNT

Patches the process with gevent, so it runs apart from the tests. Two
publishers in native OS threads (a gevent thread pool) and two in greenlets
each publish COUNT events on channel ``a`` through ``sse.publish``, while a
greenlet iterates ``sse.listen("a")``. It prints one line of JSON: which
publishers finished, how many events each published, the numbers of each
one's events in the order the subscriber received them, and any errors. It
gives up after DEADLINE seconds, so a publisher stuck for ever is reported,
not waited for.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import typing as t  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.threadpool import ThreadPool  # noqa: E402

import flask_eventstream  # noqa: E402
from flask_eventstream import EventStream  # noqa: E402

#: Seconds to wait for the publishers and the subscriber, in all.
DEADLINE = 40.0
#: Seconds the subscriber may lag behind once every publisher has ended.
GRACE = 10.0
THREADS = ["thread 0", "thread 1"]
GREENLETS = ["greenlet 0", "greenlet 1"]


def main(url: str, prefix: str, count: int) -> dict[str, t.Any]:
    app = Flask(__name__)
    app.config.update(
        EVENTSTREAM_BROKER_URL=url,
        EVENTSTREAM_KEY_PREFIX=prefix,
        # Room for every event: a subscriber that falls behind here is
        # not what is tested.
        EVENTSTREAM_QUEUE_SIZE=10 * count,
    )
    sse = EventStream()
    app.register_blueprint(sse, url_prefix="/events")
    publishers = THREADS + GREENLETS
    total = count * len(publishers)
    published = dict.fromkeys(publishers, 0)
    received: dict[str, list[int]] = {name: [] for name in publishers}
    ended: list[str] = []
    finished: list[str] = []
    errors: list[str] = []
    subscribed = gevent.event.Event()
    done = gevent.event.Event()

    def publish(name: str) -> None:
        try:
            with app.app_context():
                for n in range(count):
                    sse.publish(f"{name}:{n}", channel="a")
                    published[name] += 1
                    if name in GREENLETS and n % 50 == 0:
                        # Let the other greenlets in, so all publish at once.
                        gevent.sleep(0)
            finished.append(name)
        except Exception as e:
            errors.append(f"{name}, after {published[name]} events: {e!r}")
        finally:
            ended.append(name)

    def subscribe() -> None:
        try:
            with app.app_context():
                events = sse.listen("a", last_event_id="")
                subscribed.set()
                for got, event in enumerate(events, 1):
                    name, _, n = str(event.data).rpartition(":")
                    received.setdefault(name, []).append(int(n))
                    if got == total:
                        break
        except Exception as e:
            errors.append(f"subscriber: {e!r}")
        finally:
            subscribed.set()
            done.set()

    start = time.monotonic()
    subscriber = gevent.spawn(subscribe)
    subscribed.wait(10)
    pool = ThreadPool(len(THREADS))
    for name in THREADS:
        pool.spawn(publish, name)
    for name in GREENLETS:
        gevent.spawn(publish, name)
    deadline = start + DEADLINE
    while time.monotonic() < deadline and len(ended) < len(publishers):
        gevent.sleep(0.05)
    done.wait(max(0.0, min(GRACE, deadline - time.monotonic())))
    return {
        "package": flask_eventstream.__file__,
        "seconds": round(time.monotonic() - start, 2),
        "publishers": publishers,
        "finished": sorted(finished),
        "published": published,
        "subscriber_ended": subscriber.dead,
        "received": received,
        "errors": errors,
    }


if __name__ == "__main__":
    summary = main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    # A publisher stuck in a native thread would keep the process alive.
    os._exit(0)
