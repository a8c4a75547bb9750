"""Warnings about a gunicorn worker that cannot stream well.

The first stream of a worker process looks at the gunicorn worker serving
it and logs, once, each setting that holds streams back. ``flask
eventstream doctor`` judges a gunicorn command line by the same rules.
"""

from __future__ import annotations

import logging
import os
import typing as t

from .concurrency import os_lock
from .watcher import _gunicorn_worker

if t.TYPE_CHECKING:
    import collections.abc as cabc

logger = logging.getLogger(__name__)

#: How many streams a gthread worker is expected to hold at once when
#: ``EVENTSTREAM_MAX_CONNECTIONS`` does not say; it needs more threads.
EXPECTED_STREAMS = 32

# gunicorn's worker classes by name, as ``-k`` takes them and as defined.
_KINDS = {
    "SyncWorker": "sync",
    "ThreadWorker": "gthread",
    "GeventWorker": "gevent",
    "GeventPyWSGIWorker": "gevent",
    "EventletWorker": "eventlet",
}


class WorkerSettings(t.NamedTuple):
    """What a gunicorn worker's settings mean for streams."""

    #: ``sync``, ``gthread``, ``gevent``, ``eventlet``, or another class.
    kind: str
    threads: int = 1
    #: Whether the worker serves HTTP/2 to its clients.
    http2: bool = False


class Problem(t.NamedTuple):
    """A setting that holds streams back; ``fail`` when they cannot work."""

    verdict: t.Literal["warn", "fail"]
    message: str
    fix: str


def worker_kind(name: str) -> str:
    """The kind of worker that a ``-k`` value or a class name stands for."""
    # -k takes "gevent", "egg:gunicorn#gevent" or a dotted class path.
    name = name.rpartition("#")[2].rpartition(".")[2]
    return _KINDS.get(name, name)


def settings_of(worker: t.Any) -> WorkerSettings:
    """The settings of a running gunicorn ``worker``, from its ``cfg``."""
    kind = next(
        (
            _KINDS[cls.__name__]
            for cls in type(worker).__mro__
            if cls.__name__ in _KINDS and cls.__module__.startswith("gunicorn.")
        ),
        type(worker).__name__,
    )
    cfg = worker.cfg
    # gunicorn serves HTTP/2 from version 25 on, with h2 in http_protocols,
    # over TLS or, from 26.2 on, cleartext; older versions have neither
    # setting, and gunicorn's config raises AttributeError for those.
    http2 = "h2" in getattr(cfg, "http_protocols", ()) and (
        bool(getattr(cfg, "is_ssl", False))
        or getattr(cfg, "http2_cleartext", "off") != "off"
    )
    return WorkerSettings(kind, int(getattr(cfg, "threads", 1)), http2)


# The options that say how a gunicorn serves streams, by their flags.
_OPTIONS = {
    "-k": "worker_class",
    "--worker-class": "worker_class",
    "--threads": "threads",
    "-b": "bind",
    "--bind": "bind",
    "-c": "config",
    "--config": "config",
    "--http-protocols": "http_protocols",
    "--http2-cleartext": "http2_cleartext",
    "--certfile": "tls",
    "--keyfile": "tls",
}


def command_line_options(args: cabc.Iterable[str]) -> dict[str, list[str]]:
    """The options of a gunicorn command line that matter to streams, each
    with its values in order: ``worker_class``, ``threads``, ``bind``,
    ``config``, ``http_protocols``, ``http2_cleartext`` and ``tls``."""
    options: dict[str, list[str]] = {}
    rest = iter(args)
    for arg in rest:
        flag, equals, value = arg.partition("=")
        if flag[:2] in ("-k", "-b", "-c") and len(flag) > 2 and flag[1] != "-":
            flag, equals, value = arg[:2], "=", arg[2:]
        if flag in _OPTIONS:
            value = value if equals else next(rest, "")
            options.setdefault(_OPTIONS[flag], []).append(value)
    return options


def command_line_settings(options: dict[str, list[str]]) -> WorkerSettings:
    """The settings that :func:`command_line_options` found; gunicorn's
    defaults for the others."""

    def last(name: str, default: str = "") -> str:
        return options.get(name, [default])[-1]

    threads = int(last("threads")) if last("threads").isdigit() else 1
    http2 = "h2" in last("http_protocols").replace(" ", "").split(",") and (
        bool(last("tls")) or last("http2_cleartext", "off") != "off"
    )
    return WorkerSettings(worker_kind(last("worker_class", "sync")), threads, http2)


def problems(settings: WorkerSettings, max_connections: int | None) -> list[Problem]:
    """What keeps a worker with ``settings`` from serving streams well.

    :param max_connections: ``EVENTSTREAM_MAX_CONNECTIONS``, the streams a
        worker may hold at once; ``None`` expects :data:`EXPECTED_STREAMS`.
    """
    found = []
    kind = settings.kind
    if kind == "sync" and settings.threads > 1:
        # gunicorn runs its gthread worker for -k sync with --threads.
        kind = "gthread"
    if kind == "sync":
        found.append(
            Problem(
                "fail",
                "gunicorn's sync worker serves one request at a time: each"
                " event stream holds a whole worker until it ends, and the"
                " worker is killed after --timeout.",
                "serve streams with the gevent worker, gunicorn -k gevent.",
            )
        )
    expected = max_connections or EXPECTED_STREAMS
    if kind == "gthread" and settings.threads <= expected:
        limit = (
            f"EVENTSTREAM_MAX_CONNECTIONS ({max_connections})"
            if max_connections
            else f"the {EXPECTED_STREAMS} streams expected when"
            " EVENTSTREAM_MAX_CONNECTIONS is not set"
        )
        found.append(
            Problem(
                "warn",
                f"gunicorn's gthread worker has {settings.threads} threads, so"
                f" it holds at most {settings.threads} streams at once, and"
                " while they stream it answers no other request.",
                "serve streams with gunicorn -k gevent, or give the worker"
                f" more --threads than {limit}, or set EVENTSTREAM_MAX_CONNECTIONS"
                " below its threads.",
            )
        )
    # The sync worker serves HTTP/1.1 whatever it is told, and says so.
    if settings.http2 and kind != "sync":
        found.append(
            Problem(
                "fail",
                "gunicorn serves HTTP/2 (h2 in --http-protocols) and handles"
                " the requests of one HTTP/2 connection one after another, so"
                " an open event stream holds up every other request of that"
                " browser.",
                "terminate HTTP/2 at a proxy such as nginx and serve gunicorn"
                " HTTP/1.1: drop h2 from --http-protocols.",
            )
        )
    return found


_lock = os_lock()
# The process that has been checked; a fork (gunicorn's --preload) starts
# its own workers, each to be checked once.
_checked_pid: int | None = None


def warn_about_worker(config: cabc.Mapping[str, t.Any]) -> None:
    """Log, once per process, what the gunicorn worker serving streams
    cannot do well; do nothing outside gunicorn.

    :param config: the config of the app whose stream starts.
    """
    global _checked_pid
    with _lock:
        if _checked_pid == os.getpid():
            return
        _checked_pid = os.getpid()
    worker = _gunicorn_worker()
    if worker is None:
        return
    max_connections = config.get("EVENTSTREAM_MAX_CONNECTIONS")
    if not isinstance(max_connections, int):
        max_connections = None
    for problem in problems(settings_of(worker), max_connections):
        logger.warning("%s To fix it, %s", problem.message, problem.fix)
