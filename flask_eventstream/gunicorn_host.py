"""The gunicorn servers running on this host, as ``/proc`` shows them.

``flask eventstream doctor`` uses them to judge the worker that serves a
URL, when it runs on the server's own host.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shlex
import socket
import typing as t

from .startup import command_line_options
from .startup import command_line_settings

if t.TYPE_CHECKING:
    from .startup import WorkerSettings


def is_local(host: str) -> bool:
    """Whether ``host`` is this machine: only its own addresses can be bound."""
    with contextlib.suppress(OSError):
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        for family, kind, _, _, address in addresses:
            with contextlib.suppress(OSError), socket.socket(family, kind) as sock:
                sock.bind((address[0], 0))
                return True
    return False


class Gunicorn(t.NamedTuple):
    """One gunicorn master: the ports it binds and its worker settings."""

    ports: frozenset[int]
    #: None when the command line does not tell; ``unknown`` says why.
    settings: WorkerSettings | None
    unknown: str = ""


class Host:
    """The gunicorn servers running on this host, from ``/proc``."""

    def __init__(self) -> None:
        commands: dict[int, tuple[int, list[str] | None, pathlib.Path]] = {}
        for proc in pathlib.Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                argv = (proc / "cmdline").read_bytes().decode("utf-8", "replace")
                args = gunicorn_args(argv.split("\0")[:-1])
                if args != []:
                    stat = (proc / "stat").read_text().rpartition(")")[2]
                    commands[int(proc.name)] = (int(stat.split()[1]), args, proc)
        # A worker is a child of its master.
        self.servers = [
            gunicorn_of(args, proc)
            for parent, args, proc in commands.values()
            if parent not in commands
        ]

    def connections(self, port: int) -> set[tuple[str, str]]:
        """The established TCP connections to a gunicorn's port from the
        process listening on ``port``: a proxy's connections to its upstream.
        """
        rows = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in pathlib.Path(table).read_text().splitlines()[1:]:
                    local, remote, state, *_, inode = line.split()[1:10]
                    rows.append((local, remote, state, inode))
        ports = {p for server in self.servers for p in server.ports}
        # State 0A is LISTEN, 01 ESTABLISHED.
        listening = {i for a, _, st, i in rows if st == "0A" and tcp_port(a) == port}
        inodes = {(a, b): i for a, b, _, i in rows}
        # Each connection to a gunicorn, with the inode of its other end.
        upstream = {
            (a, b): inodes.get((b, a), "")
            for a, b, st, _ in rows
            if st == "01" and tcp_port(a) in ports
        }
        owners: dict[str, set[str]] = {}
        wanted = {f"socket:[{i}]": i for i in {*listening, *upstream.values()}}
        for fd in pathlib.Path("/proc").glob("[0-9]*/fd/*"):
            with contextlib.suppress(OSError):
                if (owned := wanted.get(os.readlink(fd))) is not None:
                    owners.setdefault(owned, set()).add(fd.parts[2])
        proxy = {pid for i in listening for pid in owners.get(i, ())}
        return {
            key for key, peer in upstream.items() if owners.get(peer, set()) & proxy
        }


def gunicorn_args(argv: list[str]) -> list[str] | None:
    """The arguments of a gunicorn command line; ``[]`` if it is not one,
    None if a process title hides them."""
    if argv and argv[0].startswith("gunicorn: "):
        return None
    # gunicorn, python .../bin/gunicorn, or python -m gunicorn
    for index, arg in enumerate(argv[:3]):
        if pathlib.PurePath(arg).name == "gunicorn":
            return argv[index + 1 :] or ["--"]
    return []


def gunicorn_of(args: list[str] | None, proc: pathlib.Path) -> Gunicorn:
    """How the gunicorn master ``proc`` was told to serve."""
    if args is None:
        return Gunicorn(frozenset(), None, "its process title hides its options")
    try:
        raw: str | None = (proc / "environ").read_bytes().decode("utf-8", "replace")
    except OSError:
        raw = None
    environ = dict(entry.partition("=")[::2] for entry in (raw or "").split("\0"))
    try:
        from_environ = shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
    except ValueError:
        from_environ = []
    # The command line wins over GUNICORN_CMD_ARGS, which wins over a file.
    options = command_line_options([*from_environ, *args])
    # gunicorn binds to $PORT when it is set and no --bind is given.
    default = f"0.0.0.0:{environ['PORT']}" if "PORT" in environ else "127.0.0.1:8000"
    binds = [_port(bind) for bind in options.get("bind", [default])]
    ports = frozenset(port for port in binds if port is not None)
    if "worker_class" not in options:
        config = options.get("config", ["./gunicorn.conf.py"])[-1]
        config = config.removeprefix("file:")
        try:
            in_file = (proc / "cwd" / config).exists() or config.startswith("python:")
        except OSError:
            in_file = True
        if raw is None:
            why = "it may be set in GUNICORN_CMD_ARGS, which only its user can read"
            return Gunicorn(ports, None, why)
        if in_file:
            return Gunicorn(ports, None, f"its worker may be set in {config}")
    return Gunicorn(ports, command_line_settings(options))


def tcp_port(address: str) -> int:
    """The port of an address as /proc/net/tcp writes it, in hexadecimal."""
    return int(address.rpartition(":")[2], 16)


def _port(bind: str) -> int | None:
    if bind.startswith(("unix:", "fd://")):
        return None
    # An IPv6 host is in brackets; gunicorn's default port is 8000.
    _, colon, port = bind.rpartition("]")[2].rpartition(":")
    return int(port) if port.isdigit() else None if colon else 8000
