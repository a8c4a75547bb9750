"""The fan-out's flushes, whatever the order of publishing, serving and
subscribing: every subscription gets each event of its channels once, in
the order they were published, and nothing stays behind."""

from __future__ import annotations

import typing as t

import pytest
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from flask_eventstream.brokers.base import Message
from flask_eventstream.brokers.fanout import FanOut
from flask_eventstream.event import Event

if t.TYPE_CHECKING:
    from flask_eventstream.socket_writer import Frames

CHANNELS = ("a", "b")


class Recorder:
    """Stands in for a subscription: takes everything it is handed."""

    def __init__(self, channels: tuple[str, ...]) -> None:
        self.channels = channels
        self.got: list[int] = []

    def deliver(self, messages: list[Message], frames: Frames) -> int:
        # The bytes of a batch are those of its events, however often it
        # grew before this subscription was served.
        assert frames.data == b"".join(m.data for m in messages)
        self.got.extend(int(m.event.data) for m in messages)
        return len(messages)


step = st.one_of(
    st.tuples(
        st.just("subscribe"),
        st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=2, unique=True),
    ),
    st.tuples(st.just("publish"), st.sampled_from(CHANNELS)),
    # One slice of a flush: what it does between two pauses.
    st.tuples(st.just("slice"), st.integers(1, 3)),
    st.tuples(st.just("unsubscribe"), st.integers(0, 50)),
)


@given(st.lists(step, max_size=60))
# Two subscriptions share a batch; one is served, then the batch grows.
@example(
    [
        ("subscribe", ["a"]),
        ("subscribe", ["a"]),
        ("publish", "a"),
        ("slice", 1),
        ("publish", "a"),
    ]
)
# A subscription to both channels, due when the other channel publishes.
@example(
    [
        ("subscribe", ["a"]),
        ("subscribe", ["a", "b"]),
        ("publish", "a"),
        ("slice", 1),
        ("publish", "b"),
        ("slice", 1),
        ("publish", "a"),
    ]
)
@settings(max_examples=300)
def test_flushes_deliver_each_event_once_and_in_order(
    steps: list[tuple[str, t.Any]],
) -> None:
    from flask_eventstream.brokers import fanout as module
    from flask_eventstream.concurrency import GeventBackend

    backend = GeventBackend()
    fanout = FanOut()
    # Subscriptions, with how many events had been published when they
    # came and, if they left, when they left.
    subs: list[tuple[Recorder, int, int | None]] = []
    published: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "current_backend", lambda: backend)
        # The flush greenlet never runs; each "slice" step does its work.
        patch.setattr(backend, "call_soon", lambda fn: None)
        with fanout.lock:
            for kind, arg in steps:
                if kind == "subscribe":
                    sub = Recorder(tuple(arg))
                    fanout.add(t.cast("module.Subscription", sub))
                    subs.append((sub, len(published), None))
                elif kind == "publish":
                    n = len(published)
                    published.append(arg)
                    message = Message.of(Event(str(n)), (n, 0))
                    fanout.deliver(arg, message)
                elif kind == "slice":
                    fanout._plan()
                    fanout._serve(arg)
                elif subs:
                    index = arg % len(subs)
                    sub, came, left = subs[index]
                    if left is None:
                        fanout.remove(t.cast("module.Subscription", sub))
                        subs[index] = (sub, came, len(published))
            fanout.finish()
            assert not fanout._due
            assert not fanout._batches
    for sub, came, left in subs:
        assert sub.got == sorted(set(sub.got))
        assert all(published[n] in sub.channels for n in sub.got)
        if left is None:
            # Earlier events may come too, if no flush had planned them
            # before it subscribed: the broker skips those.
            mine = [
                n for n in range(came, len(published)) if published[n] in sub.channels
            ]
            assert [n for n in sub.got if n >= came] == mine
