"""Start the servers under test, each with one worker, on free ports.

.. code-block:: python

    with start("flask-sse") as server:
        ...  # drive server.url, then read server.process_tree_rss_kib()

Every server runs as a subprocess in a session of its own, with the
open-file limit raised to the hard limit and no inherited ``FLASK_*``
settings. The servers backed by Redis get a redis-server of their own. All
of it is stopped when the block ends, however it ends.

``eventstream@REV`` (or ``eventstream-redis@REV``) serves this checkout's
app on the library of another revision (:mod:`benchmarks.revisions`). Every
worker of ours writes down, from gunicorn's ``post_worker_init`` hook, the
files of the library it imported, and a server whose workers imported
another copy than the one asked for does not start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.request

from benchmarks import revisions

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from benchmarks.revisions import Library

ROOT = pathlib.Path(__file__).resolve().parent.parent
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
#: The app that ``eventstream`` and ``eventstream-redis`` serve.
APP = "benchmarks.app:create_app()"

#: The servers under test, as results name them (see README.md).
NAMES = [
    "eventstream",
    "eventstream-redis",
    "raw-gevent",
    "flask-plain",
    "flask-sse",
    "sse-starlette",
]
#: The servers that need a redis-server.
REDIS_NAMES = frozenset({"eventstream-redis", "flask-sse"})
#: The servers that serve ``benchmarks.app``, and so may take ``@REV``.
APP_NAMES = ("eventstream", "eventstream-redis")
#: Flask-SSE holds one Redis connection per open stream.
REDIS_MAX_CLIENTS = 20_000
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# The kernel caps listen queues at net.core.somaxconn; this is gunicorn's and
# uvicorn's default, given to redis-server too.
LISTEN_BACKLOG = 2048


@dataclasses.dataclass
class Running:
    """A server that answers, and what is known about its processes."""

    #: One of :data:`NAMES`.
    name: str
    port: int
    #: The process that serves requests (gunicorn's worker, not its master).
    pid: int
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path
    redis: subprocess.Popen[bytes] | None = None
    redis_url: str | None = None
    #: For ours: the file of the library's module that each worker (by
    #: pid) imported, and which copy of the library it was meant to be.
    imported: dict[int, str] | None = None
    library: dict[str, t.Any] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: gunicorn's workers, not its
        master; a server with no child processes serves them itself."""
        return sorted(children(self.process.pid)) or [self.process.pid]

    def process_tree_rss_kib(self) -> int:
        """Resident memory of the server's processes together: the process
        started and everything below it; never the redis-server.
        """
        skip = {self.redis.pid} if self.redis is not None else set()
        return sum(rss_kib(pid) for pid in process_tree(self.process.pid) - skip)

    def redis_rss_kib(self) -> int:
        """Resident memory of this server's redis-server; 0 if it has none."""
        return 0 if self.redis is None else rss_kib(self.redis.pid)

    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return self.log_path.read_text("utf-8", "replace")


def rss_kib(pid: int) -> int:
    """Resident memory of one process from ``/proc``; 0 once it is gone."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of a process so far (all its threads), from
    ``/proc``, in steps of a clock tick (10 ms); None once it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    # The name in parentheses may hold spaces; utime and stime are the 12th
    # and 13th fields after it.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def parents() -> dict[int, list[int]]:
    """The children of every process, by its pid, from ``/proc``."""
    found: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = pathlib.Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The name in parentheses may hold spaces; the fields after it don't.
        parent = int(stat.rpartition(")")[2].split()[1])
        found.setdefault(parent, []).append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    """The processes that ``pid`` started and that still run."""
    return parents().get(pid, [])


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it, from ``/proc``."""
    below = parents()
    tree = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(below.get(pid, ()))
    return tree


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_file_limit() -> int:
    """The open-file limit the servers get: the hard limit, or the kernel's
    ceiling when there is no hard limit.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return int(pathlib.Path("/proc/sys/fs/nr_open").read_text())
    return hard


def _raise_open_file_limit() -> None:
    # Runs in the child between fork and exec.
    limit = open_file_limit()
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def _gunicorn_version() -> tuple[int, ...]:
    version = importlib.metadata.version("gunicorn")
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def gunicorn(port: int, app: str, max_streams: int, *, workers: int = 1) -> list[str]:
    """The command line of ``gunicorn -k gevent`` serving ``app`` on ``port``."""
    command = [
        sys.executable, "-m", "gunicorn",
        "-k", "gevent",
        "--workers", str(workers),
        "--worker-connections", str(max_streams + 100),
        "--bind", f"127.0.0.1:{port}",
        "--log-level", "warning",
    ]  # fmt: skip
    if _gunicorn_version() >= (26,):
        # Servers side by side would otherwise share one control socket path.
        command.append("--no-control-socket")
    return [*command, app]


def split_name(name: str) -> tuple[str, str]:
    """A server's name and the revision of the library it imports ("" for
    this checkout's): ``eventstream@8473990`` is ``eventstream`` on the
    library of 8473990. ValueError for a server that does not exist."""
    base, _, revision = name.partition("@")
    if base not in NAMES:
        raise ValueError(
            f"Unknown server {name!r}; the servers are {', '.join(NAMES)}"
            f" ({' and '.join(APP_NAMES)} also as NAME@REVISION)."
        )
    if "@" in name and (base not in APP_NAMES or not revision):
        raise ValueError(
            f"Only {' and '.join(APP_NAMES)} take a revision, as NAME@REVISION;"
            f" got {name!r}."
        )
    return base, revision


def command(name: str, port: int, max_streams: int) -> list[str]:
    """The command line that serves ``name`` on ``port``."""
    if name in APP_NAMES:
        return gunicorn(port, APP, max_streams)
    if name == "flask-plain":
        return gunicorn(port, "benchmarks.peers.flask_plain:create_app()", max_streams)
    if name == "flask-sse":
        return gunicorn(port, "benchmarks.peers.flask_sse:create_app()", max_streams)
    if name == "raw-gevent":
        module = "benchmarks.peers.raw_gevent"
        return [sys.executable, "-m", module, "--port", str(port)]
    if name == "sse-starlette":
        return [
            sys.executable, "-m", "uvicorn", "benchmarks.peers.sse_starlette:app",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",
            "--log-level", "warning",
        ]  # fmt: skip
    raise ValueError(f"Unknown server {name!r}; the servers are {', '.join(NAMES)}.")


def environment(library: Library | None = None) -> dict[str, str]:
    """The environment of a process under test: the launcher's, without
    its ``FLASK_*`` settings, and with ``library`` first on the path."""
    # The apps read FLASK_* settings; only the launcher's own may reach them.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    environ["PYTHONUNBUFFERED"] = "1"
    if library is not None:
        environ["PYTHONPATH"] = library.pythonpath
    return environ


def _settings(name: str, redis_url: str | None) -> dict[str, str]:
    if name == "eventstream-redis" and redis_url is not None:
        return {"FLASK_EVENTSTREAM_BROKER_URL": redis_url}
    if name == "flask-sse" and redis_url is not None:
        return {"FLASK_REDIS_URL": redis_url}
    return {}


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group; SIGKILL if it is not gone in 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_SECONDS)


def spawn(
    args: list[str],
    log_path: pathlib.Path,
    environ: dict[str, str] | None = None,
    cwd: pathlib.Path = ROOT,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a session of its own with the raised open-file
    limit, its output going to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            args,
            cwd=cwd,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_raise_open_file_limit,
        )


@contextlib.contextmanager
def redis_server(
    directory: pathlib.Path,
) -> cabc.Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run a redis-server of its own, on a free port, with ``directory`` for
    its files; yields its URL and process, and stops it when the block ends.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed; install Debian's.")
    port = free_port()
    log_path = directory / "redis.log"
    # Redis keeps 32 descriptors for itself; asking for more clients than
    # the limit allows would only make it lower maxclients with a warning.
    max_clients = min(REDIS_MAX_CLIENTS, open_file_limit() - 32)
    process = spawn(
        [
            executable,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--maxclients", str(max_clients),
            "--tcp-backlog", str(LISTEN_BACKLOG),
            "--daemonize", "no",
        ],
        log_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not _redis_answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = log_path.read_text("utf-8", "replace")
                raise RuntimeError(f"redis-server did not start on {port}:\n{log}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        stop(process)


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _state(url: str) -> dict[str, t.Any]:
    with urllib.request.urlopen(f"{url}/state", timeout=5) as rv:
        return t.cast(dict[str, t.Any], json.loads(rv.read()))


# Which copy of the library a worker imported, written once it has loaded
# the app: the file of one module, and of every module of the package.
WORKER_HOOK = """\
import json
import os
import sys


def post_worker_init(worker):
    module = sys.modules.get({module!r})
    found = None if module is None else os.path.realpath(module.__file__)
    files = {{
        name: os.path.realpath(loaded.__file__)
        for name, loaded in list(sys.modules.items())
        if name.partition(".")[0] == "flask_eventstream"
        and getattr(loaded, "__file__", None)
    }}
    record = {{"pid": os.getpid(), "file": found, "modules": files}}
    with open({path!r}, "a") as out:
        out.write(json.dumps(record) + "\\n")
"""


@contextlib.contextmanager
def serve_app(
    name: str,
    directory: pathlib.Path,
    *,
    library: Library | None = None,
    workers: int = 1,
    max_streams: int = 20_000,
    settings: dict[str, str] | None = None,
    redis: subprocess.Popen[bytes] | None = None,
    redis_url: str | None = None,
    module: str = "flask_eventstream",
) -> cabc.Iterator[Running]:
    """``benchmarks.app`` under ``gunicorn -k gevent`` until the block ends.

    :param name: the name the server goes by in results.
    :param directory: for the server's log, config and reports.
    :param library: the copy of the library its workers must import;
        None for this checkout's.
    :param settings: environment variables for the app (``FLASK_*``).
    :param redis: the process of a redis-server it uses, at ``redis_url``.
    :param module: the module whose file :attr:`Running.imported` gives.
    """
    reports = directory / "workers.jsonl"
    config = directory / "gunicorn.conf.py"
    config.write_text(WORKER_HOOK.format(path=str(reports), module=module))
    port = free_port()
    command = gunicorn(port, APP, max_streams, workers=workers)
    environ = environment(library) | (settings or {})
    log_path = directory / "server.log"
    # A copy's server runs elsewhere than this checkout's root: the first
    # entry of sys.path is the working directory, and the copy must come
    # from PYTHONPATH.
    cwd = ROOT if library is None else directory
    process = spawn([*command, "--config", str(config)], log_path, environ, cwd)
    try:
        running = Running(name, port, 0, process, log_path, redis, redis_url)
        package = revisions.PACKAGE if library is None else library.package
        running.imported = wait_for_workers(running, reports, workers, package)
        running.pid = min(running.imported)
        if library is not None:
            running.library = library.describe()
        yield running
    finally:
        stop(process)


def wait_for_workers(
    running: Running, reports: pathlib.Path, count: int, package: pathlib.Path
) -> dict[int, str]:
    """The file of the module each worker imported, once ``count`` workers
    are up and the server answers; RuntimeError if one imported any module
    of the library from elsewhere than ``package``."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        lines = reports.read_text().splitlines() if reports.exists() else []
        # A worker that died and was replaced has a line but no process.
        tree = process_tree(running.process.pid)
        found = {r["pid"]: r for r in map(json.loads, lines) if r["pid"] in tree}
        if len(found) >= count:
            break
        if running.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers did not start:\n{running.log()}")
        time.sleep(0.1)
    package = package.resolve()
    wrong = {
        pid: [
            file
            for file in [report["file"], *report["modules"].values()]
            if file is None or not pathlib.Path(file).is_relative_to(package)
        ]
        for pid, report in found.items()
    }
    if any(wrong.values()):
        raise RuntimeError(f"Workers imported another library than {package}: {wrong}")
    while True:
        try:
            _state(running.url)
            return {pid: report["file"] for pid, report in found.items()}
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def start(name: str, *, max_streams: int = 20_000) -> cabc.Iterator[Running]:
    """Run the server ``name`` until the block ends, then stop it and its
    redis-server.

    :param name: one of :data:`NAMES`, or one of :data:`APP_NAMES` followed
        by ``@`` and a revision of the library.
    :param max_streams: how many streams the server must be able to hold;
        gunicorn's ``--worker-connections`` is set a little above it.
    """
    base, revision = split_name(name)
    with contextlib.ExitStack() as stack:
        directory = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis_url: str | None = None
        redis: subprocess.Popen[bytes] | None = None
        if base in REDIS_NAMES:
            redis_url, redis = stack.enter_context(redis_server(directory))
        settings = _settings(base, redis_url)
        if base in APP_NAMES:
            library = None
            if revision:
                library = revisions.checkout("library", revision, directory)
            served = serve_app(
                name,
                directory,
                library=library,
                max_streams=max_streams,
                settings=settings,
                redis=redis,
                redis_url=redis_url,
            )
            running = stack.enter_context(served)
        else:
            port = free_port()
            log_path = directory / "server.log"
            environ = environment() | settings
            process = spawn(command(name, port, max_streams), log_path, environ)
            stack.callback(stop, process)
            running = Running(name, port, 0, process, log_path, redis, redis_url)
            running.pid = _wait_for_pid(running)
        yield running


def _wait_for_pid(running: Running) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline and running.process.poll() is None:
        try:
            return int(_state(running.url)["pid"])
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(
        f"The {running.name} server did not answer {running.url}/state within"
        f" {READY_TIMEOUT_SECONDS:.0f} s:\n{running.log()}"
    )
