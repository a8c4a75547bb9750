"""Fuzz the encoder: an event either is refused or parses back unchanged.

python tests/fuzz/encoder.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from flask_eventstream.event import Event
    from flask_eventstream.parser import EventParser


def _maybe(provider: atheris.FuzzedDataProvider, size: int) -> str | None:
    return provider.ConsumeUnicodeNoSurrogates(size) if provider.ConsumeBool() else None


def one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    event_type = _maybe(provider, 20)
    event_id = _maybe(provider, 20)
    retry = provider.ConsumeIntInRange(-2, 10**6) if provider.ConsumeBool() else None
    text = provider.ConsumeUnicodeNoSurrogates(400)
    try:
        event = Event(text, event=event_type, id=event_id, retry=retry)
    except ValueError:
        # Refusing is fine, but only for what the wire cannot carry.
        bad = [v for v in (event_type, event_id) if v and ("\n" in v or "\r" in v)]
        if (
            not bad
            and not (event_id and "\0" in event_id)
            and not (retry is not None and retry < 0)
        ):
            raise
        return
    parsed = EventParser().feed(event.encode())
    expected = Event(
        text.replace("\r\n", "\n").replace("\r", "\n"),
        event=event_type or "message",
        id=event_id or None,
        retry=retry,
    )
    # Exactly one event comes out, with nothing added: no extra field or
    # event can be smuggled in through any of the values.
    if parsed != [expected]:
        raise AssertionError(f"{event!r} parsed as {parsed!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
