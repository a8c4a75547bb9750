"""Memory that quiet channels hold in the in-memory broker, and after the TTL.

An app with a channel per user publishes one event on each of many channels
that nobody listens to. This measures, with tracemalloc, what the broker
holds once they are published and again once ``EVENTSTREAM_HISTORY_TTL``
has passed without another event on them::

    python -m benchmarks.quiet_channels --channels 100000 --ttl 20
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from flask_eventstream import Event
from flask_eventstream.brokers import MemoryBroker


def held_mib() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=100_000)
    parser.add_argument(
        "--ttl",
        type=float,
        default=20.0,
        help="EVENTSTREAM_HISTORY_TTL in seconds; longer than publishing takes",
    )
    args = parser.parse_args()
    tracemalloc.start()
    broker = MemoryBroker(history=1000, history_ttl=args.ttl)
    start = held_mib()
    began = time.monotonic()
    for n in range(args.channels):
        broker.publish(f"user.{n}", Event('{"n": 1}'))
    published = held_mib() - start
    took = time.monotonic() - began
    if took >= args.ttl:
        raise SystemExit(f"Publishing took {took:.1f} s, longer than --ttl; raise it.")
    # Until the last channel published has been quiet for the TTL.
    time.sleep(args.ttl + 0.2)
    broker.publish("other", Event("x"))
    after = held_mib() - start
    print(
        f"{args.channels:,} quiet channels: {published:.1f} MiB held once"
        f" published, {after:.2f} MiB after EVENTSTREAM_HISTORY_TTL={args.ttl:g} s"
    )


if __name__ == "__main__":
    main()
