"""Run the suite: every scenario against every server, and keep the numbers.

    python -m benchmarks run --quick
    python -m benchmarks run --servers eventstream,raw-gevent --repeat 3
    python -m benchmarks run --servers eventstream,raw-gevent --compare 8473990

Each run of a scenario gets a fresh server from :mod:`benchmarks.servers`
and a load client in a process of its own (:mod:`benchmarks.client`). The
runner measures the server from outside (memory of its process tree and of
its redis-server, its outbound TCP connections, its workers' CPU time) at
the client's checkpoints, writes every raw and median number to
``benchmarks/results/<date>[-quick].json`` after each run, and prints our
server against each peer. Each case runs on every server before the next
case starts, the servers' order turning about from one repeat to the next.
``--compare REV`` adds ``eventstream@REV``: this checkout's app on the
library of that revision.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import queue
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import typing as t
from importlib import metadata

from benchmarks import revisions
from benchmarks import servers
from benchmarks.client import BOUND_SHARE
from benchmarks.client import CAPACITY_OVERRUN

if t.TYPE_CHECKING:
    from benchmarks.servers import Running

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: How long the server may settle after a checkpoint before it is measured.
SETTLE_SECONDS = 1.0
#: Distributions whose versions go into the results.
DISTRIBUTIONS = (
    "flask-eventstream",
    "flask",
    "werkzeug",
    "gevent",
    "greenlet",
    "gunicorn",
    "redis",
    "flask-sse",
    "sse-starlette",
    "starlette",
    "uvicorn",
)

Record = dict[str, t.Any]
#: The scenarios, in the order a run takes them.
SCENARIOS = ("idle", "fanout", "capacity", "publish", "throughput")
#: Seconds a step of capacity may take beyond its publishing: the client's
#: wait for late events, and the checkpoints.
CAPACITY_STEP_SLACK = 12.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One scenario with its sizes; ``key`` names it in the results."""

    key: str
    scenario: str
    params: dict[str, float | str]
    timeout_seconds: float

    def command(self, url: str) -> list[str]:
        options = [
            f"--{name.replace('_', '-')}={value}" for name, value in self.params.items()
        ]
        client = [sys.executable, "-m", "benchmarks.client", self.scenario]
        return [*client, "--url", url, "--handshake", *options]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one mode of the suite."""

    mode: str
    idle_streams: dict[str, tuple[int, ...]]
    hold_seconds: float
    fanout: tuple[int, int, float]
    #: Subscribers, the events/s of each step, and the seconds of a step.
    capacity: tuple[int, tuple[float, ...], float]
    publish_events: int
    publish_subscribers: tuple[int, ...]
    throughput: tuple[int, int]
    repeat: int

    @property
    def base_streams(self) -> int:
        """The number of idle streams that every server is measured at."""
        return self.idle_streams["*"][0]

    def cases(self, server: str) -> list[Case]:
        hold = self.hold_seconds
        subscribers, events, rate = self.fanout
        count, size = self.throughput
        idle = [
            Case(f"idle-{n}", "idle", {"streams": n, "hold": hold}, 150 + hold)
            for n in self.idle_streams.get(server, self.idle_streams["*"])
        ]
        fanout = Case(
            f"fanout-{subscribers}x{events}",
            "fanout",
            {"subscribers": subscribers, "events": events, "rate": rate},
            180 + events / rate,
        )
        publish = [
            Case(
                f"publish-{self.publish_events}-to-{k}",
                "publish",
                {"events": self.publish_events, "subscribers": k},
                300,
            )
            for k in self.publish_subscribers
        ]
        stream = Case(
            f"throughput-{count}x{size}",
            "throughput",
            {"events": count, "size": size},
            360,
        )
        return [*idle, fanout, self.capacity_case(), *publish, stream]

    def capacity_case(self) -> Case:
        subscribers, rates, seconds = self.capacity
        params: dict[str, float | str] = {
            "subscribers": subscribers,
            "rates": ",".join(f"{rate:g}" for rate in rates),
            "step_seconds": seconds,
        }
        step = seconds * CAPACITY_OVERRUN + CAPACITY_STEP_SLACK
        timeout = 180 + len(rates) * step
        return Case(f"capacity-{subscribers}", "capacity", params, timeout)


QUICK = Plan(
    mode="quick",
    idle_streams={"*": (1000,)},
    hold_seconds=18.0,
    fanout=(200, 50, 50.0),
    capacity=(200, (50, 100, 200, 400, 800, 1200, 1600), 2.0),
    publish_events=2000,
    publish_subscribers=(1, 100),
    throughput=(100_000, 100),
    repeat=1,
)
FULL = Plan(
    mode="full",
    idle_streams={"eventstream": (10_000, 15_000), "*": (10_000,)},
    hold_seconds=30.0,
    fanout=(1000, 200, 50.0),
    capacity=(
        1000,
        (50, 75, 100, 150, 200, 300, 400, 600, 800, *range(1000, 2001, 200), 2400),
        4.0,
    ),
    publish_events=10_000,
    publish_subscribers=(1, 100),
    throughput=(1_000_000, 100),
    repeat=3,
)


class ClientError(Exception):
    """The load client failed, hung or said something unexpected."""


class Client:
    """A load client subprocess, read one JSON line at a time."""

    def __init__(self, command: list[str], errors: t.IO[bytes]) -> None:
        self._errors = errors
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, deadline: float) -> Record:
        """The client's next JSON line, waiting no later than ``deadline``."""
        try:
            line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            raise ClientError("The client gave no answer in time.") from None
        if line is None:
            code = self.process.wait(10)
            raise ClientError(f"The client exited with {code}: {self.stderr()}")
        try:
            return t.cast(Record, json.loads(line))
        except ValueError:
            raise ClientError(f"The client printed {line!r}.") from None

    def go(self) -> None:
        """Let the client go on past its checkpoint."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass

    def stderr(self) -> str:
        self._errors.seek(0)
        return self._errors.read()[-2000:].decode("utf-8", "replace").strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def outbound_tcp(running: Running) -> int:
    """Established TCP connections of a process tree not on its own port.

    For the servers under test these are their connections to redis-server.
    """
    inodes = set()
    for member in servers.process_tree(running.process.pid):
        with_fds = pathlib.Path(f"/proc/{member}/fd")
        try:
            names = os.listdir(with_fds)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(with_fds / name)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local_port = int(fields[1].rpartition(":")[2], 16)
                # State 01 is ESTABLISHED.
                if (
                    fields[3] == "01"
                    and local_port != running.port
                    and fields[9] in inodes
                ):
                    count += 1
    return count


def measure(running: Running) -> Record:
    return {
        "rss_kib": running.process_tree_rss_kib(),
        "redis_rss_kib": running.redis_rss_kib(),
        "outbound_tcp": outbound_tcp(running),
    }


def machine_seconds() -> tuple[float, float]:
    """CPU time that all the machine's cores spent busy so far, whatever
    ran, ours or not; and the time the hypervisor took from them (steal),
    from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user, nice, system, idle, iowait, irq, softirq, steal; guest time is
    # already in user time.
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq
    return busy / servers.TICKS_PER_SECOND, steal / servers.TICKS_PER_SECOND


def worker_cpu(running: Running) -> Record:
    """The CPU time of each of the server's workers now, as ``[pid, seconds]``
    pairs (seconds None for a worker that is gone), the machine's, and when
    they were read."""
    pids = running.worker_pids()
    busy, steal = machine_seconds()
    return {
        "at": round(time.monotonic(), 6),
        "machine_cpu": busy,
        "steal": steal,
        "worker_cpu": [[pid, servers.cpu_seconds(pid)] for pid in pids],
    }


def run_case(running: Running, case: Case) -> Record:
    """Run one client against a running server; its result and measurements."""
    # Other work on the machine shows here, and skews what is measured.
    record: Record = {"checkpoints": {}, "load_average": os.getloadavg()[0]}
    if running.imported is not None:
        record["imported"] = {str(pid): f for pid, f in running.imported.items()}
    deadline = time.monotonic() + case.timeout_seconds
    with tempfile.TemporaryFile() as errors:
        client = Client(case.command(running.url), errors)
        try:
            while True:
                line = client.next(deadline)
                phase = line.pop("phase")
                if phase == "result":
                    record.update(line)
                    break
                if line.pop("instant", False):
                    # One end of a span whose CPU is measured: settling here
                    # would add idle time to it.
                    record["checkpoints"][phase] = {**line, **worker_cpu(running)}
                else:
                    time.sleep(SETTLE_SECONDS)
                    record["checkpoints"][phase] = {**line, **measure(running)}
                client.go()
            record["checkpoints"]["after"] = measure(running)
            # The servers log warnings and errors only: any line is news.
            if log := running.log().strip():
                record["server_log"] = log[-3000:]
        finally:
            client.stop()
    derive(case.scenario, record)
    return record


def derive(scenario: str, record: Record) -> None:
    """Add the numbers that come from the checkpoints to ``record``."""
    if scenario == "idle":
        record.update(per_stream(record))
    elif scenario == "fanout":
        record.update(
            cpu_per_event(record, "publishing", "delivered", record["delivered"])
        )
    elif scenario == "capacity":
        for rate, step in record["steps"].items():
            span = (f"step-{rate}", f"step-{rate}-end")
            step.update(cpu_per_event(record, *span, step["delivered"]))
            shares = [step.get(k) for k in ("machine_cpu_share", "worker_cpu_share")]
            if None not in shares:
                # What neither the server nor the client used: other work here.
                other = shares[0] - shares[1] - step["client_cpu_share"]
                step["other_cpu_share"] = round(other, 3)
                step["server_bound"] = shares[1] >= BOUND_SHARE
        if record["stopped_by"]:
            last = list(record["steps"].values())[-1]
            record["server_bound_at_stop"] = bool(last.get("server_bound"))
        # The server may do more than its rate says: every step passed, or
        # the client ran out of CPU before the worker did.
        record["capacity_lower_bound"] = record["capped"] or (
            record["client_bound_at_stop"] and not record.get("server_bound_at_stop")
        )


def cpu_per_event(record: Record, start: str, end: str, delivered: int) -> Record:
    """The workers' CPU time from checkpoint ``start`` to ``end``, per event
    delivered to a subscriber and as a share of one core (None if a worker
    was replaced meanwhile, whose time is lost with it), and the cores that
    the whole machine kept busy meanwhile."""
    points = record["checkpoints"]
    if start not in points or end not in points:
        return {}
    seconds = points[end]["at"] - points[start]["at"]
    if seconds <= 0:
        return {}
    busy = points[end]["machine_cpu"] - points[start]["machine_cpu"]
    steal = points[end]["steal"] - points[start]["steal"]
    derived: Record = {
        "span_seconds": round(seconds, 3),
        "machine_cpu_share": round(busy / seconds, 3),
        "steal_cpu_share": round(steal / seconds, 3),
        "worker_cpu_seconds": None,
        "worker_cpu_share": None,
        "worker_cpu_us_per_event": None,
        "workers_replaced": True,
    }
    before = dict(points[start]["worker_cpu"])
    after = dict(points[end]["worker_cpu"])
    if before.keys() != after.keys() or None in [*before.values(), *after.values()]:
        return derived
    spent = sum(after[pid] - before[pid] for pid in before)
    return derived | {
        "worker_cpu_seconds": round(spent, 3),
        "worker_cpu_share": round(spent / seconds, 3),
        "worker_cpu_us_per_event": (
            round(spent / delivered * 1e6, 3) if delivered else None
        ),
        "workers_replaced": False,
    }


def per_stream(record: Record) -> Record:
    """Memory per idle stream: the growth from before connecting, per stream."""
    connected = max(record["connected"], 1)
    derived = {}
    for phase in ("connected", "held"):
        for key in ("rss_kib", "redis_rss_kib"):
            points = record["checkpoints"]
            before, after = points["warm"][key], points[phase][key]
            if before is not None and after is not None:
                name = f"{key.replace('rss_kib', 'kib_per_stream')}_{phase}"
                derived[name] = round((after - before) / connected, 3)
    derived["kib_per_stream"] = derived["kib_per_stream_connected"]
    return derived


def flatten(record: Record, prefix: str = "") -> Record:
    flat: Record = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def medians(runs: list[Record]) -> Record:
    """The median of every number that all good runs have; bools must all hold."""
    good = [flatten(run) for run in runs if "error" not in run]
    if not good:
        return {}
    result: Record = {}
    for key in good[0]:
        values = [run.get(key) for run in good]
        if all(isinstance(v, bool) for v in values):
            result[key] = all(values)
        elif all(isinstance(v, int | float) for v in values):
            result[key] = statistics.median(t.cast(list[float], values))
    return result


def machine() -> Record:
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    meminfo = pathlib.Path("/proc/meminfo").read_text().split()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_kib": int(meminfo[meminfo.index("MemTotal:") + 1]),
        "cpu_model": models[0] if models else platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "load_average_at_start": os.getloadavg()[0],
    }


def versions() -> Record:
    found: Record = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        found["redis-server"] = next(
            (w[2:] for w in out.split() if w.startswith("v=")), out.strip()
        )
    except OSError:
        found["redis-server"] = None
    found["git"] = git_revision()
    return found


def git_revision() -> str | None:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        return None
    return f"{revision}{'+changes' if dirty else ''}" if revision else None


def save(path: pathlib.Path, results: Record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def failure(running: Running, exc: ClientError) -> Record:
    """What is known of a run whose client failed, the server's side too."""
    return {
        "error": str(exc),
        "server_exit_code": running.process.poll(),
        "server_log": running.log()[-3000:],
    }


def schedule(
    names: list[str], plan: Plan, scenarios: t.Collection[str]
) -> list[tuple[str, dict[str, Case]]]:
    """Each case to run, in the order of :data:`SCENARIOS` and then of the
    plan, with the servers that run it (in ``names``' order)."""
    found: dict[str, dict[str, Case]] = {}
    order: dict[str, tuple[int, int]] = {}
    for name in names:
        # eventstream@REV is measured at the sizes of eventstream.
        base, _ = servers.split_name(name)
        for position, case in enumerate(plan.cases(base)):
            if case.scenario in scenarios:
                found.setdefault(case.key, {})[name] = case
                order.setdefault(case.key, (SCENARIOS.index(case.scenario), position))
    return sorted(found.items(), key=lambda item: order[item[0]])


def turn(names: list[str], attempt: int) -> list[str]:
    """The servers' order in the ``attempt``-th repeat (from 1): as given,
    then reversed, and so on, so that no server always runs first after the
    machine was idle, or always right after one and the same other server."""
    return names if attempt % 2 else names[::-1]


def run_all(
    names: list[str],
    plan: Plan,
    repeat: int,
    scenarios: t.Collection[str],
    results: Record,
    path: pathlib.Path,
) -> None:
    """Every case on every server, ``repeat`` times each; a case runs on all
    the servers before the next one starts."""
    # A server that cannot start won't start for the next case.
    broken: set[str] = set()
    for _, cases in schedule(names, plan, scenarios):
        for attempt in range(1, repeat + 1):
            for name in turn(list(cases), attempt):
                if name not in broken:
                    run_once(name, cases[name], attempt, repeat, results, broken)
                    save(path, results)


def run_once(
    name: str,
    case: Case,
    attempt: int,
    repeat: int,
    results: Record,
    broken: set[str],
) -> None:
    """One run of one case against a fresh server, kept in ``results``."""
    entry = results["servers"][name]
    found = entry["cases"].setdefault(
        case.key,
        {"scenario": case.scenario, "params": case.params, "runs": [], "median": {}},
    )
    runs: list[Record] = found["runs"]
    say(f"{name}: {case.key} ({attempt}/{repeat})")
    started = False
    try:
        with servers.start(name) as running:
            started = True
            if running.library is not None:
                entry.setdefault("library", running.library)
            try:
                runs.append(run_case(running, case))
            except ClientError as exc:
                runs.append(failure(running, exc))
    except Exception as exc:
        if not started:
            entry["errors"].append(f"{case.key}: could not start: {exc!r}")
            say(f"{name}: could not start: {exc!r}")
            broken.add(name)
            return
        if len(runs) < attempt:
            runs.append({"error": repr(exc)})
        else:
            entry["errors"].append(f"{case.key}: {exc!r}")
    if "error" in runs[-1]:
        say(f"{name}: {case.key}: {runs[-1]['error']}")
    found["median"] = medians(runs)


def interrupt(number: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(number).name)


def server_names(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The servers to run, in order, and the one ``--compare`` adds (None
    without it); ValueError for a name or revision that does not exist."""
    names = args.servers.split(",") if args.servers else list(servers.NAMES)
    for name in names:
        servers.split_name(name)
    if not args.compare:
        return names, None
    # The commit, not the name given: a branch may move while the run goes on.
    compared = f"eventstream@{revisions.resolve(args.compare)}"
    if compared not in names:
        # Next to this checkout's, so that the two run one after the other.
        at = names.index("eventstream") + 1 if "eventstream" in names else len(names)
        names.insert(at, compared)
    return names, compared


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    repeat = args.repeat or plan.repeat
    try:
        names, compared = server_names(args)
    except ValueError as exc:
        say(str(exc))
        return 2
    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    if unknown := sorted(set(scenarios) - set(SCENARIOS)):
        say(f"Unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}.")
        return 2
    today = datetime.date.today().isoformat()
    default = RESULTS / f"{today}{'-quick' if args.quick else ''}.json"
    path = pathlib.Path(args.output) if args.output else default
    results: Record = {
        "path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
        "mode": plan.mode,
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "plan": {**dataclasses.asdict(plan), "repeat": repeat},
        "order": "each case on every server in turn; servers as listed,"
        " reversed on every second repeat",
        "servers": {name: {"cases": {}, "errors": []} for name in names},
    }
    results["plan"]["base_streams"] = plan.base_streams
    results["plan"]["scenarios"] = scenarios
    if compared is not None:
        results["compare"] = {"server": compared, "asked": args.compare}
    load = results["machine"]["load_average_at_start"]
    if load > 0.5:
        say(f"The load average is {load:.2f}: other work here skews the numbers.")
    code = 0
    # Stopped by a signal, clean up as on Ctrl-C: servers run in sessions of
    # their own, and only the launcher's finally stops them.
    for number in (signal.SIGTERM, signal.SIGHUP):
        # A signal that is ignored (nohup) stays ignored.
        if signal.getsignal(number) == signal.SIG_DFL:
            signal.signal(number, interrupt)
    try:
        run_all(names, plan, repeat, scenarios, results, path)
    except KeyboardInterrupt:
        results["interrupted"] = True
        say("Interrupted; the results so far are kept.")
        code = 130
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["targets"] = targets(results)
    save(path, results)
    print(render(results))
    say(f"Results: {path}")
    return code


#: In a column, or a target, the server that --compare added.
PREVIOUS = "@previous"
# The columns of each scenario's table: header, field of the medians, and
# the server that the value is divided by (None: the value itself; a column
# divided by PREVIOUS is shown only when there is one).
COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "idle": [
        ("connected", "connected", None),
        ("KiB/stream", "kib_per_stream", None),
        ("x raw-gevent", "kib_per_stream", "raw-gevent"),
        ("held KiB/stream", "kib_per_stream_held", None),
        ("redis KiB/stream", "redis_kib_per_stream_connected", None),
        ("redis conns", "checkpoints.connected.outbound_tcp", None),
        ("headers p99 ms", "headers.p99_ms", None),
        ("keep-alives", "keepalive_comments", None),
    ],
    "fanout": [
        ("published/s", "rate_achieved", None),
        ("delivered", "delivered_ratio", None),
        ("out of order", "out_of_order", None),
        ("p50 ms", "latency.p50_ms", None),
        ("p90 ms", "latency.p90_ms", None),
        ("p99 ms", "latency.p99_ms", None),
        ("max ms", "latency.max_ms", None),
        ("p99 x raw-gevent", "latency.p99_ms", "raw-gevent"),
        ("p99 x eventstream", "latency.p99_ms", "eventstream"),
        ("p99 x previous", "latency.p99_ms", PREVIOUS),
        ("worker us/event", "worker_cpu_us_per_event", None),
        ("x raw-gevent", "worker_cpu_us_per_event", "raw-gevent"),
        ("x previous", "worker_cpu_us_per_event", PREVIOUS),
        ("worker CPU", "worker_cpu_share", None),
        ("machine CPU", "machine_cpu_share", None),
        ("steal", "steal_cpu_share", None),
        ("client CPU", "client_cpu_share", None),
    ],
    "capacity": [
        ("subscribers", "connected", None),
        ("timed", "sampled_streams", None),
        ("capacity events/s", "capacity_rate", None),
        ("x raw-gevent", "capacity_rate", "raw-gevent"),
        ("x previous", "capacity_rate", PREVIOUS),
        ("capped", "capped", None),
        ("server-bound at stop", "server_bound_at_stop", None),
        ("client-bound at stop", "client_bound_at_stop", None),
        ("lower bound", "capacity_lower_bound", None),
    ],
    "publish": [
        ("published/s", "published_per_second", None),
        ("x flask-plain", "published_per_second", "flask-plain"),
        ("delivered/s", "delivered_per_second", None),
        ("delivered", "delivered_ratio", None),
        ("client CPU", "client_cpu_share", None),
    ],
    "throughput": [
        ("events/s", "events_per_second", None),
        ("MB/s", "mb_per_second", None),
        ("x flask-plain", "events_per_second", "flask-plain"),
        ("complete", "complete", None),
        ("client CPU", "client_cpu_share", None),
    ],
}
TITLES = {
    "idle": "Idle streams: {streams:,} held {hold:g} s",
    "fanout": "Fan-out: {subscribers:,} subscribers x {events:,} events at {rate:g}/s",
    "capacity": "Fan-out capacity: {subscribers:,} subscribers, {step_seconds:g} s"
    " at each of {rates} events/s, while p99 < 100 ms, the rate within 5%"
    " and every event delivered",
    "publish": "Publish: {events:,} events to {subscribers:,} subscriber(s)",
    "throughput": "Stream throughput: {events:,} events of {size:,} bytes",
}
# The cost model's targets: what, scenario, field, ours, reference, limit,
# and whether the ratio must be at most (True) or at least (False) the limit.
# Those of eventstream are also given for the server that --compare added.
TARGETS = [
    ("idle memory per stream <= 1.3x raw-gevent", "idle", "kib_per_stream",
     "eventstream", "raw-gevent", 1.3, True),
    ("fan-out p99 <= raw-gevent's", "fanout", "latency.p99_ms",
     "eventstream", "raw-gevent", 1.0, True),
    ("fan-out p99 with Redis <= 1.5x the memory broker's", "fanout",
     "latency.p99_ms", "eventstream-redis", "eventstream", 1.5, True),
    ("worker CPU per delivered event <= 0.7x raw-gevent", "fanout",
     "worker_cpu_us_per_event", "eventstream", "raw-gevent", 0.7, True),
    ("fan-out capacity >= 1.5x raw-gevent", "capacity", "capacity_rate",
     "eventstream", "raw-gevent", 1.5, False),
    ("stream throughput >= the plain Flask generator", "throughput",
     "events_per_second", "eventstream", "flask-plain", 1.0, False),
    ("publish >= 2x plain Flask", "publish", "published_per_second",
     "eventstream", "flask-plain", 2.0, False),
]  # fmt: skip
#: The columns of the table of each capacity step: header, field of the step.
STEP_COLUMNS = [
    ("published/s", "rate_achieved"),
    ("delivered", "delivered_ratio"),
    ("p50 ms", "latency.p50_ms"),
    ("p99 ms", "latency.p99_ms"),
    ("POST p99 ms", "publish_request.p99_ms"),
    ("worker CPU", "worker_cpu_share"),
    ("worker us/event", "worker_cpu_us_per_event"),
    ("client CPU", "client_cpu_share"),
    ("other CPU", "other_cpu_share"),
    ("steal", "steal_cpu_share"),
    ("passed", "passed"),
]


def cases_of(results: Record, scenario: str) -> list[tuple[str, Record]]:
    """The keys and sizes of one scenario's cases, across all servers."""
    found: dict[str, Record] = {}
    for entry in results["servers"].values():
        for key, case in entry["cases"].items():
            if case["scenario"] == scenario:
                found.setdefault(key, case["params"])
    return list(found.items())


def median_of(results: Record, server: str, key: str, field: str) -> t.Any:
    case = results["servers"].get(server, {}).get("cases", {}).get(key)
    return None if case is None else case["median"].get(field)


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return float(value / reference)


def previous(results: Record) -> str | None:
    """The server that --compare added, if any."""
    return t.cast(str | None, results.get("compare", {}).get("server"))


def targets(results: Record) -> list[Record]:
    """The cost model's targets, each with what was measured and whether met."""
    found = []
    for goal, scenario, field, ours, theirs, limit, at_most in TARGETS:
        names = [ours]
        if ours == "eventstream" and (compared := previous(results)):
            names.append(compared)
        for key, params in cases_of(results, scenario):
            if (
                scenario == "idle"
                and params["streams"] != results["plan"]["base_streams"]
            ):
                continue
            for name in names:
                target = (goal, scenario, field, name, theirs, limit, at_most)
                found.append(judge(results, target, key))
    found.append(redis_connections(results))
    return found


def judge(
    results: Record, target: tuple[str, str, str, str, str, float, bool], key: str
) -> Record:
    """One target in one case: the ratio of ours to the reference, and
    whether it is met (None: not measured, or not known)."""
    goal, scenario, field, ours, theirs, limit, at_most = target
    value = median_of(results, ours, key, field)
    reference = median_of(results, theirs, key, field)
    measured = ratio(value, reference)
    met = None
    if measured is not None:
        met = measured <= limit if at_most else measured >= limit
    record: Record = {
        "target": goal,
        "case": key,
        "field": field,
        "ours": [ours, value],
        "reference": [theirs, reference],
        "ratio": None if measured is None else round(measured, 3),
        "met": met,
    }
    if scenario == "fanout":
        # Latency at a lower publishing rate is latency under less load, and
        # CPU per event spread over fewer events a second is another cost: a
        # server that could not keep the reference's rate has not met it.
        rates = [
            median_of(results, name, key, "rate_achieved") for name in (ours, theirs)
        ]
        record["rates"] = rates
        if met and None not in rates and rates[0] < 0.95 * rates[1]:
            record["met"] = False
    if scenario == "capacity":
        # A rate that is only a lower bound (every step passed, or the client
        # set the pace) may decide the target or not.
        lower = [
            median_of(results, name, key, "capacity_lower_bound")
            for name in (ours, theirs)
        ]
        record["lower_bound"] = lower
        if (lower[0] and not met) or (lower[1] and met):
            record["met"] = None
    return record


def redis_connections(results: Record) -> Record:
    """The most Redis connections the worker had at any checkpoint."""
    redis = results["servers"].get("eventstream-redis", {}).get("cases", {})
    counts = [
        value
        for case in redis.values()
        for field, value in case["median"].items()
        if field.endswith("outbound_tcp")
    ]
    most = max(counts, default=None)
    return {
        "target": "Redis connections <= 2 per worker (1 worker)",
        "case": "all",
        "field": "outbound_tcp",
        "ours": ["eventstream-redis", most],
        "reference": None,
        "ratio": most,
        "met": None if most is None else most <= 2,
    }


def table(title: str, headers: list[str], rows: list[list[t.Any]]) -> str:
    def cell(value: t.Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    cells = [headers, *([cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [title]
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)


def render(results: Record) -> str:
    """Tables of the medians: ours against each peer, with ratios."""
    out = []
    for scenario in COLUMNS:
        out += [
            scenario_table(results, scenario, key, params)
            for key, params in cases_of(results, scenario)
        ]
        if scenario == "capacity":
            out += [steps_table(results, key) for key, _ in cases_of(results, scenario)]
    rows = [
        [goal["target"], goal["ours"][0], goal["case"], goal["ratio"], verdict(goal)]
        for goal in results.get("targets", [])
    ]
    out.append(table("Targets", ["target", "ours", "case", "ratio", "verdict"], rows))
    failures = [
        f"{name}: {error}"
        for name, entry in results["servers"].items()
        for error in entry["errors"]
    ]
    failures += [
        f"{name}: {key}: {run['error']}"
        for name, entry in results["servers"].items()
        for key, case in entry["cases"].items()
        for run in case["runs"]
        if "error" in run
    ]
    if failures:
        out.append("Failures\n" + "\n".join(failures))
    return "\n\n".join(out)


def verdict(goal: Record) -> str:
    if goal["met"] is not None:
        return "met" if goal["met"] else "NOT MET"
    if goal["ratio"] is None:
        return "not measured"
    return "unknown: a capacity is only a lower bound"


def scenario_table(results: Record, scenario: str, key: str, params: Record) -> str:
    """One case's table: a row per server, the columns of :data:`COLUMNS`."""
    compared = previous(results)
    columns = [
        (header, field, compared if reference == PREVIOUS else reference)
        for header, field, reference in COLUMNS[scenario]
        if reference != PREVIOUS or compared
    ]
    rows = []
    for name, entry in results["servers"].items():
        if key not in entry["cases"]:
            continue
        row: list[t.Any] = [name]
        for _, field, reference in columns:
            value = median_of(results, name, key, field)
            if reference is not None:
                value = ratio(value, median_of(results, reference, key, field))
            row.append(value)
        rows.append(row)
    headers = ["server", *(header for header, _, _ in columns)]
    return table(TITLES[scenario].format(**params), headers, rows)


def steps_table(results: Record, key: str) -> str:
    """Every step of a capacity case that every run of a server reached."""
    rows = []
    for name, entry in results["servers"].items():
        case = entry["cases"].get(key)
        if case is None:
            continue
        for rate in str(case["params"]["rates"]).split(","):
            fields = [f"steps.{rate}.{field}" for _, field in STEP_COLUMNS]
            values = [median_of(results, name, key, field) for field in fields]
            if values[0] is not None:
                rows.append([name, float(rate), *values])
    headers = ["server", "events/s", *(header for header, _ in STEP_COLUMNS)]
    return table(f"Capacity steps of {key} (medians)", headers, rows)
