"""Serve the demo under gunicorn's gevent worker: ``python -m example_app``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and replace this process with gunicorn."""
    parser = argparse.ArgumentParser(
        prog="python -m example_app", description="Run the Flask-EventStream demo."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    args = parser.parse_args(argv)
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gevent",
        "--workers",
        "1",
        "--worker-connections",
        "10000",
        "--bind",
        f"{args.host}:{args.port}",
        "--access-logfile",
        "-",
        "example_app:create_app()",
    ]
    print(f"Serving the demo on http://{args.host}:{args.port}/", flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
