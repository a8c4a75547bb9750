"""Where a server's worker spends its time during one benchmark scenario.

    python -m benchmarks.profile eventstream fanout
    python -m benchmarks.profile eventstream@8473990 fanout
    python -m benchmarks.profile eventstream publish-10000-to-1 --seconds 20

Starts the server as ``python -m benchmarks run`` does, samples its worker
with py-spy while the load client runs the scenario at its full size, and
prints the functions that were running (self) and on the stack (inclusive)
in the largest share of samples. The raw samples are kept in ``--output``
for a flame graph (``flamegraph.pl`` or speedscope read them). A server
named ``eventstream@REV`` runs this checkout's app on the library of
revision REV, as in ``python -m benchmarks run --compare REV``.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import shutil
import subprocess
import sys

from benchmarks.run import FULL
from benchmarks.run import run_case
from benchmarks.servers import split_name
from benchmarks.servers import start


def summarize(raw: pathlib.Path, top: int) -> str:
    """The ``top`` functions by self and by inclusive share of samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        # A recursive function counts once per sample.
        for frame in set(frames):
            inclusive[frame] += int(count)
    if not total:
        return "No samples: did the worker run any Python code?"
    lines = [f"{total} samples"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"\n{title}:")
        lines += [
            f"{100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)
        ]
    return "\n".join(lines)


def py_spy() -> str | None:
    """py-spy on the PATH, or else beside this Python (a venv not activated)."""
    found = shutil.which("py-spy")
    beside = pathlib.Path(sys.executable).parent / "py-spy"
    if found is None and beside.exists():
        found = str(beside)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument(
        "server", help="e.g. eventstream, raw-gevent, eventstream@8473990"
    )
    parser.add_argument(
        "case", help="a full-size case, or the start of its key: fanout, publish"
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="sampling time")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--output", default="profile.txt", help="raw samples (default: profile.txt)"
    )
    args = parser.parse_args(argv)
    spy = py_spy()
    if spy is None:
        parser.error(
            "py-spy is not installed: pip install -r benchmarks/requirements.txt"
        )
    try:
        base, _ = split_name(args.server)
    except ValueError as exc:
        parser.error(str(exc))
    # eventstream@REV runs the cases of eventstream.
    cases = [c for c in FULL.cases(base) if c.key.startswith(args.case)]
    if not cases:
        keys = ", ".join(c.key for c in FULL.cases(base))
        parser.error(f"No case starts with {args.case!r}; the cases are {keys}.")
    output = pathlib.Path(args.output)
    with start(args.server) as running:
        sampler = subprocess.Popen(
            [
                spy, "record", "--pid", str(running.pid),
                "--rate", str(args.rate), "--duration", str(round(args.seconds)),
                "--format", "raw", "--nonblocking", "--output", str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            result = run_case(running, cases[0])
        finally:
            _, errors = sampler.communicate(timeout=args.seconds + 60)
    if sampler.returncode != 0 or not output.exists():
        print(errors.decode(errors="replace"), file=sys.stderr)
        return 1
    # py-spy's sampling costs the worker CPU time too: these are no benchmark.
    wanted = ("rate_achieved", "latency", "worker_cpu_us_per_event", "capacity_rate")
    shown = {k: v for k, v in result.items() if k in wanted}
    shown |= {k: v for k, v in result.items() if k.endswith("per_second")}
    print(f"{args.server} {cases[0].key}: {shown}")
    print(summarize(output, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
