"""Mailbox and backend selection (threads; gevent runs in the e2e suites)."""

from __future__ import annotations

import threading

from flask_eventstream.concurrency import current_backend
from flask_eventstream.concurrency import Mailbox
from flask_eventstream.concurrency import THREADS


def test_threads_are_chosen_when_gevent_has_not_patched_sockets() -> None:
    """gevent being importable is not enough to switch to greenlets."""
    import gevent  # noqa: F401

    assert current_backend() is THREADS


def test_take_returns_everything_queued_in_order() -> None:
    """One take drains the mailbox, so queued chunks leave in one write."""
    box: Mailbox[bytes] = Mailbox(THREADS, 10)
    for chunk in (b"a", b"b", b"c"):
        assert box.put(chunk)
    assert box.take(0) == [b"a", b"b", b"c"]
    assert box.take(0) == []


def test_offer_refuses_when_full_and_never_blocks() -> None:
    """A full mailbox turns an offer down instead of waiting."""
    box: Mailbox[bytes] = Mailbox(THREADS, 2)
    assert box.offer(b"a")
    assert box.offer(b"b")
    assert not box.offer(b"c")
    assert len(box) == 2


def test_put_waits_for_room_until_a_take() -> None:
    """A producer ahead of its consumer waits; it does not grow the queue."""
    box: Mailbox[bytes] = Mailbox(THREADS, 1)
    box.put(b"a")
    done = threading.Event()

    def produce() -> None:
        box.put(b"b")
        done.set()

    threading.Thread(target=produce).start()
    assert not done.wait(0.1)
    assert box.take(1) == [b"a"]
    assert done.wait(5)
    assert box.take(1) == [b"b"]


def test_close_wakes_a_waiting_take_and_a_waiting_put() -> None:
    """Closing ends both sides; what was queued can still be taken."""
    box: Mailbox[bytes] = Mailbox(THREADS, 1)
    box.put(b"a")
    results: list[bool] = []
    putter = threading.Thread(target=lambda: results.append(box.put(b"b")))
    putter.start()
    box.close()
    putter.join(5)
    assert results == [False]
    assert not box.drained
    assert box.take(None) == [b"a"]
    assert box.drained
    assert box.take(None) == []
    assert not box.offer(b"c")


def test_take_times_out_empty() -> None:
    """A take on an empty open mailbox returns nothing after its timeout."""
    box: Mailbox[bytes] = Mailbox(THREADS, 1)
    assert box.take(0.01) == []
    assert not box.drained
