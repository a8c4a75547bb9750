"""Notifications, one channel per user, on the Redis broker of two revisions.

    python -m benchmarks.notifications --old e9dffb1
    python -m benchmarks.notifications --old e9dffb1 --quick

Every stream listens to a channel of its own, ``user.<n>``, as in an app
that sends each user their notifications. For each number of gunicorn
gevent workers, the same load runs against the Redis broker of two copies of
the library, one after the other, each with a redis-server of its own: a
client process holds the streams, and a publisher process publishes events
to random users at a fixed rate, straight into Redis through the library's
``RedisBroker``. Measured: the CPU time of all the workers and of
redis-server per 1,000 events, the latency from just before each publish to
when the kernel received the event on its user's stream, and whether every
event reached its user's stream exactly once. The suite's fan-out scenario
then runs against both copies.

A revision's ``flask_eventstream`` is extracted with ``git archive`` into a
temporary directory put first on the ``PYTHONPATH`` of the servers and the
publisher; the app and the clients are this checkout's. Each worker writes
down, from gunicorn's ``post_worker_init`` hook, which copy it imported, and
a server whose workers imported another one is not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import random
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import typing as t

import redis

from benchmarks import client
from benchmarks import run
from benchmarks import servers
from benchmarks.revisions import checkout
from benchmarks.revisions import Library

if t.TYPE_CHECKING:
    import collections.abc as cabc

MODULE = "benchmarks.notifications"
PREFIX = "notifications"
CONNECT_TIMEOUT_SECONDS = 300.0
#: How long the client waits, after the publisher is done, for what is late.
DRAIN_SECONDS = 30.0
#: How long it listens on once all arrived, for duplicates.
GRACE_SECONDS = 1.0
Record = dict[str, t.Any]
#: What ends one run, which is then recorded as failed, and the next begins.
FAILURES = (
    run.ClientError,
    RuntimeError,
    OSError,
    ValueError,
    subprocess.SubprocessError,
)


@contextlib.contextmanager
def serve(
    library: Library, workers: int, max_streams: int, directory: pathlib.Path
) -> cabc.Iterator[tuple[servers.Running, dict[int, str]]]:
    """``benchmarks.app`` on ``library``'s Redis broker under gunicorn with
    ``workers`` gevent workers, and a fresh redis-server; the server as
    :func:`benchmarks.servers.start` gives it, and the file of the broker
    that each worker (by pid) imported."""
    with servers.redis_server(directory) as (redis_url, redis_process):
        settings = {
            "FLASK_EVENTSTREAM_BROKER_URL": redis_url,
            "FLASK_EVENTSTREAM_KEY_PREFIX": PREFIX,
        }
        with servers.serve_app(
            "eventstream-redis",
            directory,
            library=library,
            workers=workers,
            max_streams=max_streams,
            settings=settings,
            redis=redis_process,
            redis_url=redis_url,
            module="flask_eventstream.brokers.redis",
        ) as running:
            assert running.imported is not None
            yield running, running.imported


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The CPU time of the workers and of redis-server at one moment."""

    at: float
    workers: list[float | None]
    redis: float
    commands: dict[str, int]

    @classmethod
    def take(cls, pids: list[int], redis_url: str) -> Snapshot:
        connection = redis.Redis.from_url(redis_url)
        try:
            cpu = connection.info("cpu")
            stats = connection.info("commandstats")
        finally:
            connection.close()
        return cls(
            time.monotonic(),
            [servers.cpu_seconds(pid) for pid in pids],
            float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
        )

    def since(self, before: Snapshot) -> Record:
        """What was spent from ``before`` to this one; the workers' CPU time
        is None if one of them is gone, whose time is lost with it."""
        workers = [
            None if a is None or b is None else round(b - a, 2)
            for a, b in zip(before.workers, self.workers, strict=True)
        ]
        total = None if None in workers else round(sum(t.cast(list[float], workers)), 3)
        return {
            "seconds": round(self.at - before.at, 3),
            "worker_cpu_seconds": total,
            "worker_cpu_seconds_each": workers,
            "redis_cpu_seconds": round(self.redis - before.redis, 3),
            "redis_calls": {
                name: calls - before.commands.get(name, 0)
                for name, calls in sorted(self.commands.items())
                if calls > before.commands.get(name, 0)
            },
        }


def notify(
    library: Library, workers: int, args: argparse.Namespace, seed: int
) -> Record:
    """One run of the notifications scenario against ``library``; a run
    that fails keeps what it measured, its error and the server's log."""
    record: Record = {"load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as name:
        directory = pathlib.Path(name)
        try:
            with serve(library, workers, args.streams, directory) as (running, found):
                record["imported"] = {str(pid): file for pid, file in found.items()}
                try:
                    measure(running, sorted(found), library, args, seed, record)
                finally:
                    # The server logs warnings and errors only: any line is news.
                    if log := running.log().strip():
                        record["server_log"] = log[-3000:]
        except FAILURES as exc:
            record["error"] = repr(exc)
            return record
    return record | costs(record)


def measure(
    running: servers.Running,
    pids: list[int],
    library: Library,
    args: argparse.Namespace,
    seed: int,
    record: Record,
) -> None:
    """Hold the streams, publish, and put what was measured in ``record``."""
    assert running.redis_url is not None
    published = running.log_path.parent / "published.json"
    wait = args.idle + args.seconds + CONNECT_TIMEOUT_SECONDS
    with contextlib.ExitStack() as stack:
        errors = stack.enter_context(tempfile.TemporaryFile())
        listener = run.Client(
            [
                sys.executable, "-m", MODULE, "subscribe",
                "--url", running.url,
                "--streams", str(args.streams),
                "--published", str(published),
                "--wait", str(wait),
            ],
            errors,
        )  # fmt: skip
        stack.callback(listener.stop)
        record.update(phase(listener, "connected", CONNECT_TIMEOUT_SECONDS))
        # What holding the streams costs with no events: keep-alives, and the
        # readers waiting on Redis.
        time.sleep(1.0)
        quiet = Snapshot.take(pids, running.redis_url)
        time.sleep(args.idle)
        record["idle"] = Snapshot.take(pids, running.redis_url).since(quiet)
        sender = subprocess.Popen(
            [
                sys.executable, "-m", MODULE, "publish",
                "--redis", running.redis_url,
                "--streams", str(args.streams),
                "--rate", str(args.rate),
                "--seconds", str(args.seconds),
                "--seed", str(seed),
                "--out", str(published),
            ],
            cwd=published.parent,
            env=servers.environment(library),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        stack.callback(sender.kill)
        assert sender.stdin is not None and sender.stdout is not None
        if json.loads(sender.stdout.readline() or "{}").get("phase") != "ready":
            raise RuntimeError("The publisher did not start.")
        before = Snapshot.take(pids, running.redis_url)
        sender.stdin.write("go\n")
        sender.stdin.flush()
        out, _ = sender.communicate(timeout=args.seconds * 2 + 60)
        record["publisher"] = json.loads(out.splitlines()[-1])
        del record["publisher"]["phase"]
        listener.go()
        record.update(phase(listener, "drained", DRAIN_SECONDS + 30))
        record["load"] = Snapshot.take(pids, running.redis_url).since(before)
        listener.go()
        record.update(phase(listener, "result", 60))


def phase(listener: run.Client, name: str, seconds: float) -> Record:
    line = listener.next(time.monotonic() + seconds)
    if line.pop("phase") != name:
        raise run.ClientError(f"The client said {line} instead of {name!r}.")
    return line


def costs(record: Record) -> Record:
    """CPU per 1,000 events, and whether each arrived exactly once."""
    load, idle = record["load"], record["idle"]
    events = max(int(record["publisher"]["published"]), 1)

    def per_1k(key: str) -> float | None:
        spent = load[key]
        return None if spent is None else round(float(spent) / events * 1000, 4)

    def idle_per_second(key: str) -> float | None:
        spent = idle[key]
        return None if spent is None else round(float(spent) / idle["seconds"], 4)

    return {
        "worker_cpu_per_1k": per_1k("worker_cpu_seconds"),
        "redis_cpu_per_1k": per_1k("redis_cpu_seconds"),
        "worker_cpu_idle_per_second": idle_per_second("worker_cpu_seconds"),
        "redis_cpu_idle_per_second": idle_per_second("redis_cpu_seconds"),
        "workers_lost": load["worker_cpu_seconds_each"].count(None),
        "streams_cut": record["connected"] - record["alive"],
        "exactly_once": (
            record["connected"] == record["requested"]
            and record["alive"] == record["connected"]
            and record["publisher"]["errors"] == {}
            and record["missing"] == record["duplicates"] == 0
            and record["misrouted"] == record["unexpected"] == 0
        ),
    }


async def subscribe(args: argparse.Namespace) -> Record:
    """Hold a stream per user, then count what each received."""
    target = client.parse_target(args.url)
    points = client.Checkpoints(True, args.wait)
    gate = asyncio.Semaphore(client.CONNECT_CONCURRENCY)
    counts: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    wrong = collections.Counter[str]()

    def receiver(user: int) -> cabc.Callable[[client.Stream, bytes, float], None]:
        def receive(stream: client.Stream, data: bytes, received: float) -> None:
            try:
                fields = json.loads(data)
                seq, to, sent = int(fields["n"]), int(fields["u"]), float(fields["t"])
            except (ValueError, KeyError, TypeError):
                wrong["unreadable"] += 1
                return
            if to != user:
                wrong["misrouted"] += 1
            counts[seq] += 1
            latencies.append(received - sent)

        return receive

    start = time.monotonic()
    streams = await asyncio.gather(
        *(
            client.open_stream(target, f"/events?channel=user.{n}", gate, receiver(n))
            for n in range(args.streams)
        )
    )
    opened = {n for n, stream in enumerate(streams) if stream.is_open}
    await points.reach(
        "connected",
        requested=args.streams,
        connected=len(opened),
        connect_seconds=round(time.monotonic() - start, 3),
        connect_errors=dict(collections.Counter(s.error for s in streams if s.error)),
    )
    users: list[int | None] = json.loads(pathlib.Path(args.published).read_text())
    # An event for a user whose stream did not open has nobody to reach.
    expected = {seq: u for seq, u in enumerate(users) if u is not None and u in opened}
    deadline = time.monotonic() + DRAIN_SECONDS
    while sum(counts.values()) < len(expected) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await points.reach("drained")
    await asyncio.sleep(GRACE_SECONDS)
    alive = sum(1 for n in opened if streams[n].is_open)
    for stream in streams:
        stream.close()
    return {
        "alive": alive,
        "expected": len(expected),
        "received": sum(counts.values()),
        "missing": sum(1 for seq in expected if not counts[seq]),
        "duplicates": sum(c - 1 for seq, c in counts.items() if seq in expected),
        "unexpected": sum(c for seq, c in counts.items() if seq not in expected),
        "misrouted": wrong["misrouted"],
        "unreadable": wrong["unreadable"],
        "latency": client.percentiles(latencies),
    }


def publish(args: argparse.Namespace) -> Record:
    """Publish ``rate`` events a second to random users, through the broker."""
    from flask_eventstream import BrokerError
    from flask_eventstream import Event
    from flask_eventstream.brokers.redis import RedisBroker

    broker = RedisBroker(args.redis, prefix=PREFIX)
    # Connected, and the broker's script loaded, before the clock starts.
    broker.publish("warm-up", Event("warm-up"))
    client.emit({"phase": "ready"})
    sys.stdin.readline()
    users = random.Random(args.seed)
    sent: list[int | None] = []
    errors: collections.Counter[str] = collections.Counter()
    cpu = -client.cpu_seconds()
    start = time.monotonic()
    for seq in range(int(args.rate * args.seconds)):
        # On a schedule: a publish that is late does not delay the next.
        delay = start + seq / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        user = users.randrange(args.streams)
        data = json.dumps({"n": seq, "u": user, "t": time.time()})
        try:
            broker.publish(f"user.{user}", Event(data))
            sent.append(user)
        except BrokerError as e:
            errors[str(e)[:200]] += 1
            sent.append(None)
    seconds = time.monotonic() - start
    cpu += client.cpu_seconds()
    broker.close()
    pathlib.Path(args.out).write_text(json.dumps(sent))
    return {
        "published": len(sent) - sum(errors.values()),
        "errors": dict(errors),
        "seconds": round(seconds, 3),
        "rate_achieved": round(len(sent) / seconds, 1),
        "cpu_seconds": round(cpu, 3),
    }


def fanout(library: Library, case: run.Case) -> Record:
    """The suite's fan-out case against ``library``, measured as the suite does."""
    with (
        tempfile.TemporaryDirectory() as directory,
        serve(library, 1, 20_000, pathlib.Path(directory)) as (running, found),
    ):
        try:
            record = run.run_case(running, case)
        except run.ClientError as exc:
            record = run.failure(running, exc)
    return record | {"imported": list(found.values())}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one mode; options given on the command line win."""

    workers: tuple[int, ...]
    streams: int
    rate: float
    seconds: float
    idle: float
    repeat: int


FULL = Sizes(workers=(1, 2, 4), streams=8000, rate=1000, seconds=30, idle=5, repeat=3)
QUICK = Sizes(workers=(1, 2), streams=1000, rate=200, seconds=5, idle=2, repeat=1)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare(args: argparse.Namespace) -> int:
    """Both copies of the library, side by side; write and print the results."""
    sizes = QUICK if args.quick else FULL
    for name in ("workers", "streams", "rate", "seconds", "idle", "repeat"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(sizes, name))
    today = datetime.date.today().isoformat()
    default = f"{today}-notifications{'-quick' if args.quick else ''}.json"
    path = pathlib.Path(args.output) if args.output else run.RESULTS / default
    results: Record = {
        "command": shlex.join(["python", "-m", MODULE, *sys.argv[1:]]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": run.machine(),
        "versions": run.versions(),
        "sizes": {n: getattr(args, n) for n in dataclasses.asdict(sizes)},
        "brokers": {},
        "notifications": {},
        "fanout": {},
    }
    # Stopped by a signal, clean up as on Ctrl-C: the servers run in
    # sessions of their own, and only the launcher's finally stops them.
    for number in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(number) == signal.SIG_DFL:
            signal.signal(number, run.interrupt)
    code = 0
    with tempfile.TemporaryDirectory() as directory:
        libraries = [
            checkout("old", args.old, pathlib.Path(directory)),
            checkout("new", args.new, pathlib.Path(directory)),
        ]
        results["brokers"] = {lib.name: lib.describe() for lib in libraries}
        try:
            if "notifications" in args.scenarios:
                compare_notifications(args, libraries, results, path)
            if "fanout" in args.scenarios:
                compare_fanout(args, libraries, results, path)
        except KeyboardInterrupt:
            results["interrupted"] = True
            say("Interrupted; the results so far are kept.")
            code = 130
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    run.save(path, results)
    print(render(results))
    say(f"Results: {path}")
    return code


def sides(libraries: list[Library], attempt: int) -> list[Library]:
    # Turn about, so that neither copy always runs on a machine just warmed
    # up or just slowed down by the other's run.
    return libraries if attempt % 2 == 0 else libraries[::-1]


def compare_notifications(
    args: argparse.Namespace,
    libraries: list[Library],
    results: Record,
    path: pathlib.Path,
) -> None:
    for workers in args.workers:
        entry: dict[str, Record] = {lib.name: {"runs": []} for lib in libraries}
        results["notifications"][str(workers)] = entry
        for attempt in range(args.repeat):
            for library in sides(libraries, attempt):
                say(f"notifications, {workers} worker(s), {library.name}"
                    f" ({attempt + 1}/{args.repeat})")  # fmt: skip
                # The same users in the same order for both copies.
                record = notify(library, workers, args, seed=attempt)
                if "error" in record:
                    say(f"  failed: {record['error']}")
                runs = entry[library.name]["runs"]
                runs.append(record)
                entry[library.name]["median"] = run.medians(runs)
                run.save(path, results)


def compare_fanout(
    args: argparse.Namespace,
    libraries: list[Library],
    results: Record,
    path: pathlib.Path,
) -> None:
    plan = run.QUICK if args.quick else run.FULL
    case = next(c for c in plan.cases("eventstream-redis") if c.scenario == "fanout")
    entry: Record = {"case": case.key, "params": case.params}
    entry |= {lib.name: {"runs": []} for lib in libraries}
    results["fanout"] = entry
    for attempt in range(args.repeat):
        for library in sides(libraries, attempt):
            say(f"fan-out {case.key}, {library.name} ({attempt + 1}/{args.repeat})")
            runs = entry[library.name]["runs"]
            try:
                runs.append(fanout(library, case))
            except FAILURES as exc:
                runs.append({"error": repr(exc)})
            if "error" in runs[-1]:
                say(f"  failed: {runs[-1]['error']}")
            entry[library.name]["median"] = run.medians(runs)
            run.save(path, results)
    old, new = (entry[n]["median"].get("latency.p99_ms") for n in ("old", "new"))
    entry["p99_new_over_old"] = None if not old or new is None else round(new / old, 3)
    # As in the suite's targets: latency at a lower publishing rate is
    # latency under less load, and does not count.
    rates = [entry[n]["median"].get("rate_achieved") for n in ("old", "new")]
    entry["rates"] = rates
    entry["p99_within_10_percent"] = (
        None
        if entry["p99_new_over_old"] is None or None in rates
        else entry["p99_new_over_old"] <= 1.1 and rates[1] >= 0.95 * rates[0]
    )


def render(results: Record) -> str:
    rows = []
    for workers, entry in results["notifications"].items():
        for name, found in entry.items():
            median, runs = found.get("median", {}), found["runs"]
            rows.append([
                workers, name,
                median.get("worker_cpu_per_1k"),
                median.get("redis_cpu_per_1k"),
                median.get("latency.p50_ms"),
                median.get("latency.p99_ms"),
                sum(r.get("missing", 0) for r in runs),
                sum(r.get("duplicates", 0) for r in runs),
                median.get("exactly_once"),
                sum(r.get("workers_lost", 0) for r in runs),
                sum(1 for r in runs if "error" in r),
            ])  # fmt: skip
    out = [
        run.table(
            "Notifications (medians; missing and duplicates summed over the runs)",
            ["W", "broker", "worker CPU s/1k", "Redis CPU s/1k", "p50 ms",
             "p99 ms", "missing", "duplicates", "exactly once", "workers lost",
             "failed"],
            rows,
        )
    ]  # fmt: skip
    fan = results.get("fanout") or {}
    rows = [
        [
            name,
            fan[name]["median"].get("rate_achieved"),
            fan[name]["median"].get("delivered_ratio"),
            fan[name]["median"].get("latency.p50_ms"),
            fan[name]["median"].get("latency.p99_ms"),
        ]
        for name in ("old", "new")
        if name in fan
    ]
    if rows:
        ratio, met = fan.get("p99_new_over_old"), fan.get("p99_within_10_percent")
        title = (
            f"Fan-out {fan['case']} (medians); p99 new/old {ratio}, within 10%: {met}"
        )
        out.append(
            run.table(
                title, ["broker", "published/s", "delivered", "p50 ms", "p99 ms"], rows
            )
        )
    return "\n\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument(
        "--old",
        default="e9dffb1",
        help="revision of the first copy (default: e9dffb1, the last whose Redis"
        " broker read one stream of all events)",
    )
    parser.add_argument(
        "--new", default="", help="revision of the second (default: this working tree)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one run")
    parser.add_argument(
        "--workers", type=lambda v: tuple(map(int, v.split(","))), help="e.g. 1,2,4"
    )
    parser.add_argument("--streams", type=int, help="streams, one user each")
    parser.add_argument("--rate", type=float, help="events published a second")
    parser.add_argument("--seconds", type=float, help="how long to publish")
    parser.add_argument("--idle", type=float, help="seconds measured with no events")
    parser.add_argument("--repeat", type=int, help="runs of each case")
    parser.add_argument(
        "--scenarios",
        type=lambda v: v.split(","),
        default=["notifications", "fanout"],
        help="notifications, fanout or both (the default)",
    )
    parser.add_argument("--output", help="results file")
    roles = parser.add_subparsers(dest="role")
    one = roles.add_parser("subscribe", help="(the load client)")
    one.add_argument("--url", required=True)
    one.add_argument("--streams", type=int, required=True)
    one.add_argument("--published", required=True)
    one.add_argument("--wait", type=float, default=600.0)
    one = roles.add_parser("publish", help="(the publisher)")
    one.add_argument("--redis", required=True)
    one.add_argument("--streams", type=int, required=True)
    one.add_argument("--rate", type=float, required=True)
    one.add_argument("--seconds", type=float, required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role is None:
        return compare(args)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpu = -client.cpu_seconds()
    start = time.monotonic()
    result = asyncio.run(subscribe(args)) if args.role == "subscribe" else publish(args)
    wall = time.monotonic() - start
    cpu += client.cpu_seconds()
    client.emit(
        {
            "phase": "result",
            **result,
            "client_cpu_seconds": round(cpu, 3),
            "client_cpu_share": round(cpu / wall, 3),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
