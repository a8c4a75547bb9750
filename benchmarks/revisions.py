"""Copies of the library at other revisions, for servers that import them.

    library = checkout("old", "8473990", directory)
    environ["PYTHONPATH"] = library.pythonpath

A revision's ``flask_eventstream`` is extracted with ``git archive`` into a
directory of its own, which goes first on the ``PYTHONPATH`` of the
processes that must import it; the app and the clients stay this
checkout's. :func:`benchmarks.servers.start` serves ``eventstream@REV``
this way, and :mod:`benchmarks.notifications` compares two copies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import tarfile
import typing as t

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: This checkout's own package, which servers without a revision import.
PACKAGE = ROOT / "flask_eventstream"


@dataclasses.dataclass(frozen=True)
class Library:
    """A copy of the library: ``path`` holds its ``flask_eventstream``."""

    name: str
    revision: str
    path: pathlib.Path

    @property
    def package(self) -> pathlib.Path:
        return (self.path / "flask_eventstream").resolve()

    @property
    def pythonpath(self) -> str:
        """A ``PYTHONPATH`` that finds this copy first, then this checkout."""
        return os.pathsep.join([str(self.path), str(ROOT)])

    def describe(self) -> dict[str, t.Any]:
        """The revision, where the copy is, and a SHA-256 of its Python files."""
        digest = hashlib.sha256()
        for file in sorted(self.package.rglob("*.py")):
            digest.update(file.relative_to(self.package).as_posix().encode())
            digest.update(file.read_bytes())
        return {
            "revision": self.revision,
            "path": str(self.path),
            "sha256": digest.hexdigest(),
        }


def git(*args: str) -> bytes:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, check=True
    ).stdout


def resolve(revision: str) -> str:
    """The short hash of a commit, so that a branch that moves while a run
    goes on does not change what the run measures; ValueError if unknown."""
    try:
        found = git("rev-parse", "--verify", "--short", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError:
        raise ValueError(f"{revision!r} is no revision of this repository.") from None
    return found.decode().strip()


def checkout(name: str, revision: str, directory: pathlib.Path) -> Library:
    """A copy of the library at ``revision`` in ``directory``; with no
    revision, of this working tree's, so that edits made while it runs do
    not reach it."""
    target = directory / name
    if not revision:
        head = git("rev-parse", "--short", "HEAD").decode().strip()
        if git("status", "--porcelain", "--", "flask_eventstream").strip():
            head += " and the working tree's changes"
        shutil.copytree(
            PACKAGE,
            target / "flask_eventstream",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        return Library(name, head, target)
    archive = git("archive", "--format=tar", revision, "flask_eventstream")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return Library(name, resolve(revision), target)
