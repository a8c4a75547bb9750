"""Debian's nginx in front of test servers, configured as the docs say.

:func:`documented_location` reads the ``location`` block that
``docs/deploying.rst`` tells readers to use, and :func:`run_nginx` serves
it, word for word, from an nginx of its own: a free port on 127.0.0.1, a
prefix directory in a temporary directory for its configuration, logs,
pid file and temporary files, and the whole process group stopped when
the block ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import typing as t

import pytest

from .servers import free_port
from .servers import ROOT
from .servers import stop_group

DEPLOYING = ROOT / "docs" / "deploying.rst"
#: Debian installs nginx here, outside a non-root user's ``PATH``.
DEBIAN_NGINX = "/usr/sbin/nginx"

_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. code-block:: nginx[ \t]*$")
_LOCATION = re.compile(r"^[ \t]*location\b[^{;]*\{", re.MULTILINE)
_PROXY_PASS = re.compile(r"^\s*proxy_pass\s+http://(?P<target>[^\s;/]+)/?;", re.M)
_UPSTREAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class DocsChanged(AssertionError):
    """The nginx example in the docs no longer has the shape tests rely on."""


@dataclasses.dataclass(frozen=True)
class Location:
    """A ``location`` block as the docs give it."""

    #: The block, from ``location`` to its closing brace.
    text: str
    #: The ``upstream`` its ``proxy_pass`` names.
    upstream: str


def nginx_blocks(rst: str) -> list[str]:
    """The contents of every ``.. code-block:: nginx`` directive, dedented."""
    lines = rst.splitlines()
    blocks = []
    for number, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        indent = len(match["indent"].expandtabs())
        body: list[str] = []
        rest = iter(lines[number + 1 :])
        # Options such as ``:caption:`` come first, then the literal text:
        # every line indented deeper than the directive, blank lines included.
        for following in rest:
            stripped = following.strip()
            if stripped.startswith(":") and not body:
                continue
            if stripped and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return blocks


def _closing_brace(text: str, start: int) -> int:
    """Where the brace opened at ``text[start]`` closes, skipping comments."""
    depth, quote, comment = 0, "", False
    for index in range(start, len(text)):
        char = text[index]
        if comment:
            comment = char != "\n"
        elif quote:
            if char == quote and text[index - 1] != "\\":
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            comment = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
    raise DocsChanged("An nginx block in docs/deploying.rst has no closing brace.")


def documented_location(path: pathlib.Path = DEPLOYING) -> Location:
    """Read the one nginx ``location`` block that ``path`` documents.

    :raises DocsChanged: when the page has no such block, or several, or
        when its ``proxy_pass`` does not name an ``upstream`` the page
        defines: the tests are then no longer checking what readers do.
    """
    blocks = nginx_blocks(path.read_text("utf-8"))
    found: list[tuple[str, str]] = []
    for block in blocks:
        for match in _LOCATION.finditer(block):
            end = _closing_brace(block, match.end() - 1)
            start = block.rfind("\n", 0, match.start()) + 1
            found.append((textwrap.dedent(block[start : end + 1]), block))
    if len(found) != 1:
        raise DocsChanged(
            f"{path.name} should show exactly one nginx 'location' block in a"
            f" '.. code-block:: nginx' directive; found {len(found)} in"
            f" {len(blocks)} nginx code blocks."
        )
    text, block = found[0]
    proxy_pass = _PROXY_PASS.search(text)
    if proxy_pass is None or not _UPSTREAM_NAME.fullmatch(proxy_pass["target"]):
        raise DocsChanged(
            "The documented location should pass requests on with"
            " 'proxy_pass http://<upstream name>;', so that tests can point"
            " that upstream at their own server."
        )
    upstream = proxy_pass["target"]
    if not re.search(rf"^\s*upstream\s+{re.escape(upstream)}\s*\{{", block, re.M):
        raise DocsChanged(
            f"The nginx example should define 'upstream {upstream}', which its"
            " location passes requests to."
        )
    return Location(text=text, upstream=upstream)


def nginx_executable() -> str:
    """The nginx to run; without one, the test fails, saying what to install."""
    executable = shutil.which("nginx")
    if executable is None and os.access(DEBIAN_NGINX, os.X_OK):
        executable = DEBIAN_NGINX
    if executable is None:
        message = (
            "These tests need nginx; install Debian's 'nginx' package"
            " (./scripts/test does)."
        )
        pytest.fail(message)
    return executable


@dataclasses.dataclass
class Nginx:
    """A running nginx."""

    port: int
    directory: pathlib.Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        log = self.directory / "error.log"
        return log.read_text("utf-8", "replace") if log.exists() else ""


def config(port: int, upstreams: dict[str, int], locations: list[str]) -> str:
    """An nginx.conf that serves ``locations`` on 127.0.0.1:``port``.

    :param upstreams: upstream names, each with the 127.0.0.1 port it
        passes requests to.
    """
    servers = "\n".join(
        f"upstream {name} {{\n    server 127.0.0.1:{upstream_port};\n}}"
        for name, upstream_port in upstreams.items()
    )
    server = textwrap.indent("\n\n".join(locations), "    ")
    return f"""\
worker_processes 1;
pid nginx.pid;
error_log error.log info;

events {{
    worker_connections 512;
}}

http {{
    access_log access.log;
    client_body_temp_path client_body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;

{textwrap.indent(servers, "    ")}

    server {{
        listen 127.0.0.1:{port};

{textwrap.indent(server, "    ")}
    }}
}}
"""


@contextlib.contextmanager
def run_nginx(upstreams: dict[str, int], locations: list[str]) -> t.Iterator[Nginx]:
    """Run nginx with ``locations`` in its server block until the block ends.

    :param upstreams: upstream names, each with the 127.0.0.1 port it
        passes requests to.
    :param locations: the ``location`` blocks, as nginx configuration text.
    """
    executable = nginx_executable()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nginx-") as name:
        directory = pathlib.Path(name)
        # Started by root, nginx runs its workers as 'nobody', which must be
        # able to reach the temporary files' directories inside this one.
        directory.chmod(0o755)
        (directory / "nginx.conf").write_text(config(port, upstreams, locations))
        with (directory / "output.log").open("wb") as output:
            process = subprocess.Popen(
                [
                    executable,
                    "-p", f"{directory}/",
                    "-c", str(directory / "nginx.conf"),
                    # The log nginx writes to before it has read its
                    # configuration; the default is outside the prefix.
                    "-e", str(directory / "error.log"),
                    "-g", "daemon off;",
                ],
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            server = Nginx(port, directory, process)
            try:
                _wait_until_listening(server)
                yield server
            finally:
                stop_group(process)


def _wait_until_listening(server: Nginx, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.process.poll() is None:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        time.sleep(0.05)
    output = (server.directory / "output.log").read_text("utf-8", "replace")
    raise RuntimeError(f"nginx did not start:\n{output}\n{server.error_log()}")
