"""Faults under load, with the Redis broker and two gunicorn gevent workers.

    python -m pytest tests/test_faults.py -s            # one fault of each kind
    python -m pytest -m long tests/test_faults.py -s    # three in a row, more clients

Clients behave like a browser's EventSource: when a stream ends or breaks
they reconnect with the id of the last event they received. While a
publisher in the test process publishes a numbered burst, Redis is killed
and restarted, or a worker is killed or told to stop. Afterwards every
client must hold exactly the accepted events, in order.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import threading
import time

import pytest
import requests

from flask_eventstream import BrokerError
from flask_eventstream.brokers.redis import RedisBroker
from flask_eventstream.event import Event

from .redis_server import redis_server
from .redis_server import RedisServer
from .servers import EventClient
from .servers import serve
from .servers import Server
from .servers import wait_for
from .test_e2e_redis import settings

pytestmark = pytest.mark.e2e

CHANNEL = "faults"
#: CPU a worker may use while nothing happens, in seconds per second.
IDLE_CPU_SHARE = 0.2


class Client(threading.Thread):
    """An EventSource-like client: reconnects with Last-Event-ID, forever."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.data: list[str] = []
        self.resets: list[str] = []
        self.last: str | None = None
        self.connections = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                client = EventClient(
                    self.server.port, f"/events?channel={CHANNEL}", self.last
                )
            except OSError:
                # The worker that took the connection died, or none was
                # accepting yet; a browser waits its retry delay.
                self.stop.wait(0.2)
                continue
            try:
                if client.status != 200:
                    self.stop.wait(0.2)
                    continue
                self.connections += 1
                while not client.ended and not self.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        client.read(len(client.events) + 1, timeout=0.5)
                    for event in client.events:
                        if event.event == "eventstream.reset":
                            self.resets.append(event.data)
                        else:
                            self.data.append(event.data)
                        self.last = event.id
                    client.events.clear()
            finally:
                client.close()


class Publisher(threading.Thread):
    """Publishes numbered events every few milliseconds, noting each outcome."""

    def __init__(self, store: RedisServer, prefix: str) -> None:
        super().__init__(daemon=True)
        self.broker = RedisBroker(store.url, prefix=prefix)
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            data = f"event {n}"
            try:
                self.broker.publish(CHANNEL, Event(data))
                self.accepted.append(data)
            except BrokerError:
                self.refused.append(data)
            n += 1
            self.stop.wait(0.004)


def workers(server: Server) -> list[int]:
    """The pids of the gunicorn master's worker processes."""
    master = server.process.pid
    children = pathlib.Path(f"/proc/{master}/task/{master}/children").read_text()
    return sorted(int(pid) for pid in children.split())


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def subscriptions_by_worker(server: Server, expected: int) -> dict[int, int]:
    """Ask /state until both workers have answered with ``expected`` in all.

    Each request goes to whichever worker accepts it, so asking often
    enough hears from both.
    """
    seen: dict[int, int] = {}

    def heard() -> bool:
        with requests.get(
            f"{server.url}/state", headers={"Connection": "close"}, timeout=5
        ) as rv:
            state = rv.json()
        seen[state["pid"]] = state["subscriptions"]
        live = set(workers(server))
        return live <= set(seen) and sum(seen[p] for p in live) == expected

    wait_for(heard, 30, f"both workers report {expected} subscriptions in all")
    return {pid: seen[pid] for pid in workers(server)}


def inject(
    fault: str, server: Server, store: RedisServer, pub: Publisher, clients: int
) -> str:
    """Cause ``fault`` and wait until the app is whole again; describe it."""
    if fault == "redis":
        refused = len(pub.refused)
        store.kill()
        wait_for(
            lambda: len(pub.refused) > refused + 10,
            10,
            "publishes refused while Redis is down",
        )
        store.start()
        return f"Redis killed; {len(pub.refused) - refused} publishes refused"
    # The worker with the most clients, so the fault hits some.
    spread = subscriptions_by_worker(server, clients)
    victim = max(spread, key=spread.__getitem__)
    os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGTERM)
    wait_for(
        lambda: victim not in workers(server) and len(workers(server)) == 2,
        30,
        "the master replaced the worker",
    )
    name = "SIGKILL" if fault == "kill" else "SIGTERM"
    return f"{name} to the worker with {spread[victim]} of {clients} clients"


def run_faults(fault: str, clients_count: int, rounds: int) -> None:
    with redis_server() as store:
        env = settings(store)
        with serve("gevent", env=env, workers=2) as server:
            clients = [Client(server) for _ in range(clients_count)]
            for client in clients:
                client.start()
            spread = subscriptions_by_worker(server, clients_count)
            publisher = Publisher(store, env["FLASK_EVENTSTREAM_KEY_PREFIX"])
            publisher.start()
            notes = []
            started = time.monotonic()
            try:
                for _ in range(rounds):
                    count = len(publisher.accepted)
                    wait_for(
                        lambda c=count: len(publisher.accepted) > c + 150,  # type: ignore[misc]
                        20,
                        "publishing",
                    )
                    notes.append(inject(fault, server, store, publisher, clients_count))
                count = len(publisher.accepted)
                wait_for(
                    lambda: len(publisher.accepted) > count + 150,
                    30,
                    "publishing after the fault",
                )
            finally:
                publisher.stop.set()
                publisher.join(10)
            accepted, refused = publisher.accepted, publisher.refused
            try:
                for client in clients:
                    try:
                        wait_for(
                            lambda c=client: len(c.data) >= len(accepted),  # type: ignore[misc]
                            30,
                            "every accepted event delivered",
                        )
                    except AssertionError:
                        got = set(client.data)
                        missing = [d for d in accepted if d not in got]
                        raise AssertionError(
                            f"A client got {len(client.data)} of {len(accepted)}"
                            f" accepted events over {client.connections}"
                            f" connections; missing {missing[:5]}..{missing[-3:]}"
                            f" ({len(missing)}); per client"
                            f" {[len(c.data) for c in clients]}; refused"
                            f" {refused[:3]}; server output:\n{server.output()}"
                        ) from None
                recovered = time.monotonic() - started
                # Nothing happens now: a worker that spins shows it here.
                pids = workers(server)
                used = [cpu_seconds(pid) for pid in pids]
                time.sleep(2.0)
                shares = [
                    (cpu_seconds(p) - u) / 2.0 for p, u in zip(pids, used, strict=True)
                ]
            finally:
                for client in clients:
                    client.stop.set()
                for client in clients:
                    client.join(10)
                publisher.broker.close()
            print(
                f"\n{fault}: {'; '.join(notes)}. Subscriptions per worker at the"
                f" start {spread}. {len(accepted)} publishes accepted,"
                f" {len(refused)} refused; clients got"
                f" {sorted({len(c.data) for c in clients})} events over"
                f" {sorted(c.connections for c in clients)} connections;"
                f" all delivered {recovered:.1f} s after the burst began; idle"
                f" CPU of the workers {[round(s, 3) for s in shares]}"
            )
            for client in clients:
                assert client.resets == []
                assert len(set(client.data)) == len(client.data)
                # A publish cut off by the crash after Redis stored the event
                # raised BrokerError: that event may arrive as well, once.
                assert [d for d in client.data if d not in refused] == accepted
                assert set(client.data) - set(accepted) <= set(refused)
            if fault != "redis":
                # Every client of the stopped worker had to reconnect.
                assert sum(c.connections > 1 for c in clients) > 0
            assert server.process.poll() is None
            assert len(workers(server)) == 2
            assert max(shares) < IDLE_CPU_SHARE
            assert "Traceback" not in server.output()


@pytest.mark.parametrize("fault", ["redis", "kill", "term"])
def test_fault_loses_and_repeats_no_accepted_event(fault: str) -> None:
    """Redis restart, worker SIGKILL, worker SIGTERM: each client ends with
    exactly the accepted events, in order; the workers neither crash nor spin.
    """
    run_faults(fault, clients_count=8, rounds=1)


@pytest.mark.long
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", ["redis", "kill", "term"])
def test_fault_loses_and_repeats_no_accepted_event_long(fault: str) -> None:
    """The same, three faults in a row, with 40 clients."""
    run_faults(fault, clients_count=40, rounds=3)
