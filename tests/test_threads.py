"""Publishing from native OS threads under gevent, in a patched subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import typing as t
import uuid

import pytest

from .redis_server import redis_server
from .servers import ROOT

#: Events per publisher: two native threads and two greenlets publish.
COUNT = 2000
#: Hard limit on the script; it gives up by itself after 50 seconds.
TIMEOUT = 60


def publish_from_native_threads(url: str) -> dict[str, t.Any]:
    """Run tests/apps/native_publish.py on ``url``; return its summary."""
    command = [sys.executable, "-m", "tests.apps.native_publish"]
    command += [url, f"t{uuid.uuid4().hex}", str(COUNT)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    try:
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        # subprocess.run has killed it.
        pytest.fail(
            f"The publishers hung for {TIMEOUT} seconds:\n"
            f"{(e.stdout or b'').decode(errors='replace')}\n"
            f"{(e.stderr or b'').decode(errors='replace')}"
        )
    output = result.stdout.decode(errors="replace")
    errors = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"{output}\n{errors}"
    lines = output.strip().splitlines()
    assert lines, f"No summary printed:\n{errors}"
    return t.cast(dict[str, t.Any], json.loads(lines[-1]))


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_native_threads_and_greenlets_publish_at_once_under_gevent(
    broker: str,
) -> None:
    """Publishers in OS threads and greenlets all finish; every event arrives once."""
    with contextlib.ExitStack() as stack:
        url = "memory://"
        if broker == "redis":
            url = stack.enter_context(redis_server()).url
        summary = publish_from_native_threads(url)
    publishers = summary["publishers"]
    everything = dict.fromkeys(publishers, COUNT)
    seen = (
        f"published {summary['published']} in {summary['seconds']} s;"
        f" errors: {summary['errors']}"
    )
    assert summary["errors"] == [], seen
    assert summary["finished"] == sorted(publishers), seen
    assert summary["published"] == everything
    received: dict[str, list[int]] = summary["received"]
    assert {name: len(numbers) for name, numbers in received.items()} == everything
    # Each publisher's events arrive once each, in the order it published them.
    for name in publishers:
        assert received[name] == list(range(COUNT)), name
