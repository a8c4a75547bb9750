"""The benchmark suite's command line.

python -m benchmarks run --quick
python -m benchmarks run --servers eventstream,raw-gevent --repeat 3
python -m benchmarks run --servers eventstream,raw-gevent --compare 8473990
python -m benchmarks run --quick --scenarios fanout,capacity
python -m benchmarks plot results/2026-01-01.json
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run every scenario against the servers; write the results"
    )
    run.add_argument(
        "--quick", action="store_true", help="small sizes, one run of each"
    )
    run.add_argument(
        "--servers",
        help="comma-separated names (default: all); eventstream@REV serves the"
        " library of revision REV",
    )
    run.add_argument(
        "--compare",
        metavar="REV",
        help="also run eventstream@REV, next to eventstream: this checkout's app"
        " on the library of revision REV",
    )
    run.add_argument(
        "--scenarios",
        help="comma-separated: idle, fanout, capacity, publish, throughput"
        " (default: all)",
    )
    run.add_argument(
        "--repeat", type=int, help="runs of each scenario (default: 3, quick: 1)"
    )
    run.add_argument(
        "--output", help="results file (default: benchmarks/results/DATE.json)"
    )
    plot = commands.add_parser("plot", help="draw a results file's plots for the docs")
    plot.add_argument("results", help="a results file, e.g. results/DATE.json")
    plot.add_argument(
        "--output", help="folder for the PNGs (default: docs/_static/benchmarks)"
    )
    args = parser.parse_args(argv)
    # Imported only when used: plotting needs no servers, running no matplotlib.
    if args.command == "plot":
        from benchmarks import plots

        return plots.plot(args)
    from benchmarks import run as runner

    return runner.run(args)


if __name__ == "__main__":
    sys.exit(main())
