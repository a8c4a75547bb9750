"""Draw a results file as the PNGs that docs/performance.rst shows.

    python -m benchmarks plot results/2026-01-01.json

Writes ``memory.png`` (idle memory per stream), ``latency.png`` (fan-out
latency percentiles), ``throughput.png`` (stream and publish throughput)
and, when streams were held at several sizes, ``memory-by-streams.png``
into ``docs/_static/benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import typing as t

import matplotlib
from matplotlib.figure import Figure

from benchmarks.run import cases_of
from benchmarks.run import median_of

if t.TYPE_CHECKING:
    from matplotlib.axes import Axes

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "_static" / "benchmarks"
OURS = ("eventstream", "eventstream-redis")

Results = dict[str, t.Any]


def bars(
    ax: Axes,
    servers: list[str],
    groups: list[tuple[str, list[float | None]]],
    unit: str,
) -> None:
    """Grouped bars: one group per server, one bar per named series."""
    width = 0.8 / max(len(groups), 1)
    for index, (label, values) in enumerate(groups):
        xs = [i + (index - (len(groups) - 1) / 2) * width for i in range(len(servers))]
        heights = [v if v is not None else 0.0 for v in values]
        drawn = ax.bar(xs, heights, width, label=label)
        ax.bar_label(
            drawn,
            labels=["n/a" if v is None else number(v) for v in values],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(servers)), servers, rotation=20, ha="right")
    for tick in ax.get_xticklabels():
        if tick.get_text() in OURS:
            tick.set_fontweight("bold")
    ax.set_ylabel(unit)
    ax.yaxis.set_major_formatter(
        lambda value, _: f"{value:,.0f}" if value >= 10 else f"{value:g}"
    )
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8)


def number(value: float) -> str:
    """A bar's label: whole numbers with separators, small ones to 3 digits."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def servers_with(results: Results, scenario: str) -> list[str]:
    return [
        name
        for name, entry in results["servers"].items()
        if any(case["scenario"] == scenario for case in entry["cases"].values())
    ]


def memory(results: Results, figure: Figure) -> None:
    """Bars at the number of streams every server was measured at."""
    ax = figure.subplots()
    base = results["plan"]["base_streams"]
    key = f"idle-{base}"
    servers = servers_with(results, "idle")
    values = [median_of(results, s, key, "kib_per_stream") for s in servers]
    bars(ax, servers, [(f"{base:,} streams", values)], "KiB per idle stream")
    reference = median_of(results, "raw-gevent", key, "kib_per_stream")
    if reference:
        ax.axhline(
            1.3 * reference,
            color="grey",
            linestyle="--",
            linewidth=1,
            label="target: 1.3x raw-gevent",
        )
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(
        f"Server memory per idle stream, {base:,} streams (lower is better)",
        fontsize=10,
    )


def memory_by_streams(results: Results, figure: Figure) -> None:
    """One line per server: memory per stream against the number of streams."""
    ax = figure.subplots()
    cases = sorted(cases_of(results, "idle"), key=lambda case: case[1]["streams"])
    for server in servers_with(results, "idle"):
        points = [
            (params["streams"], median_of(results, server, key, "kib_per_stream"))
            for key, params in cases
        ]
        drawn = [(n, kib) for n, kib in points if kib is not None]
        if drawn:
            ax.plot(*zip(*drawn, strict=True), marker="o", label=server)
    ax.set_xlabel("open streams")
    ax.set_ylabel("KiB per idle stream")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Memory per idle stream by number of streams", fontsize=10)


def latency(results: Results, figure: Figure) -> None:
    cases = cases_of(results, "fanout")
    axes = figure.subplots(1, max(len(cases), 1), squeeze=False)[0]
    servers = servers_with(results, "fanout")
    for ax, (key, params) in zip(axes, cases, strict=False):
        groups = [
            (name, [median_of(results, s, key, f"latency.{name}_ms") for s in servers])
            for name in ("p50", "p90", "p99")
        ]
        bars(ax, servers, groups, "milliseconds")
        ax.set_title(
            f"Fan-out latency, {params['subscribers']:,} subscribers"
            f" at {params['rate']:g} events/s (lower is better)",
            fontsize=10,
        )


def throughput(results: Results, figure: Figure) -> None:
    stream_ax, publish_ax = figure.subplots(1, 2)
    servers = servers_with(results, "throughput")
    groups = [
        (
            f"{params['events']:,} events of {params['size']} bytes",
            [median_of(results, s, key, "events_per_second") for s in servers],
        )
        for key, params in cases_of(results, "throughput")
    ]
    bars(stream_ax, servers, groups, "events per second")
    stream_ax.set_title("One stream, as fast as it goes", fontsize=10)
    servers = servers_with(results, "publish")
    groups = [
        (
            "to 1 subscriber"
            if params["subscribers"] == 1
            else f"to {params['subscribers']:,} subscribers",
            [median_of(results, s, key, "published_per_second") for s in servers],
        )
        for key, params in cases_of(results, "publish")
    ]
    bars(publish_ax, servers, groups, "events published per second")
    publish_ax.set_title("POST /publish, 8 connections", fontsize=10)
    figure.suptitle("Throughput (higher is better)")


PLOTS: dict[str, tuple[t.Callable[[Results, Figure], None], tuple[float, float]]] = {
    "memory.png": (memory, (8, 4.5)),
    "latency.png": (latency, (9, 4.5)),
    "throughput.png": (throughput, (12, 4.5)),
}


def plot(args: argparse.Namespace) -> int:
    path = pathlib.Path(args.results)
    if not path.exists() and (ROOT / "benchmarks" / path).exists():
        path = ROOT / "benchmarks" / path
    results = json.loads(path.read_text())
    # Files only, never a window, whatever the environment asks for.
    matplotlib.use("Agg")
    output = pathlib.Path(args.output) if args.output else OUTPUT
    output.mkdir(parents=True, exist_ok=True)
    machine = results["machine"]
    note = (
        f"{results['mode']} run of {results['started'][:10]}; {machine['nproc']} CPUs"
        f" ({machine['cpu_model']}), Python {machine['python']}; medians of"
        f" {results['plan']['repeat']}"
    )
    plots = dict(PLOTS)
    if len(cases_of(results, "idle")) > 1:
        plots["memory-by-streams.png"] = (memory_by_streams, (8, 4.5))
    for name, (draw, size) in plots.items():
        figure = Figure(figsize=size, layout="constrained")
        draw(results, figure)
        figure.supxlabel(note, fontsize=7, color="grey")
        figure.savefig(output / name, dpi=110)
        print(output / name)
    return 0
