"""Fuzz the event-stream parser: any bytes, in any chunks, parse the same.

python tests/fuzz/parser.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from flask_eventstream.parser import EventParser


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    cut = provider.ConsumeIntInRange(0, 64)
    stream = provider.ConsumeBytes(sys.maxsize)
    whole = EventParser().feed(stream)
    # The same bytes fed in pieces of ``cut`` bytes (one byte at least)
    # must give the same events: a chunk boundary may fall anywhere, in a
    # UTF-8 sequence or between CR and LF.
    parser = EventParser()
    pieces = []
    step = max(cut, 1)
    for start in range(0, len(stream), step):
        pieces += parser.feed(stream[start : start + step])
    if pieces != whole:
        raise AssertionError(f"{stream!r} in pieces of {step}: {pieces} != {whole}")
    for event in whole:
        if event.id is not None and "\0" in event.id:
            raise AssertionError(f"an id with NUL was kept: {event!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
