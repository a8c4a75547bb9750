"""Mailboxes, signals and backend selection, under threads and gevent."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from flask_eventstream.concurrency import current_backend
from flask_eventstream.concurrency import GeventBackend
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


def test_offer_takes_what_fits_and_never_blocks() -> None:
    """A full mailbox turns an offer down instead of waiting."""
    box: Mailbox[bytes] = Mailbox(THREADS, 3)
    assert box.offer([b"a"]) == 1
    assert box.offer([b"b", b"c", b"d"]) == 2
    assert box.offer([b"e"]) == 0
    assert box.take(0) == [b"a", b"b", b"c"]


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
    assert box.offer([b"c"]) == 0


def test_take_times_out_empty() -> None:
    """A take on an empty open mailbox returns nothing after its timeout."""
    box: Mailbox[bytes] = Mailbox(THREADS, 1)
    assert box.take(0.01) == []
    assert not box.drained


# The gevent backend, without patching: the signals and mailboxes it makes
# wait on the hub, and the tests run their greenlets on it directly.


@pytest.fixture
def gevent_backend() -> GeventBackend:
    return GeventBackend()


def test_gevent_signal_wakes_a_waiting_greenlet(
    gevent_backend: GeventBackend,
) -> None:
    """set() from another greenlet ends a wait with True, well before its timeout."""
    import gevent

    signal = gevent_backend.event()
    waiting = gevent.spawn(signal.wait, 30)
    gevent.sleep(0.01)
    started = time.monotonic()
    signal.set()
    assert waiting.get(timeout=5) is True
    assert time.monotonic() - started < 1
    assert signal.is_set()
    assert signal.wait(0) is True
    signal.clear()
    assert signal.wait(0) is False


def test_gevent_signal_waits_its_whole_timeout_every_time(
    gevent_backend: GeventBackend,
) -> None:
    """A timer reused from one wait to the next starts over each time."""
    import gevent

    signal = gevent_backend.event()
    for _ in range(3):
        started = time.monotonic()
        assert signal.wait(0.2) is False
        assert time.monotonic() - started >= 0.19
        gevent.sleep(0.05)


def test_gevent_signal_set_from_an_os_thread(gevent_backend: GeventBackend) -> None:
    """A publisher in a real thread wakes a greenlet through the hub."""
    import gevent

    signal = gevent_backend.event()
    waiting = gevent.spawn(signal.wait, 30)
    gevent.sleep(0.01)
    setter = threading.Thread(target=signal.set)
    setter.start()
    assert waiting.get(timeout=5) is True
    setter.join(5)


def test_gevent_signal_after_a_wake_that_came_too_late(
    gevent_backend: GeventBackend,
) -> None:
    """A wake-up scheduled after its wait timed out does not break the next."""
    import gevent

    signal = gevent_backend.event()
    assert signal.wait(0.01) is False
    signal.set()
    signal.clear()
    gevent.sleep(0)
    signal.set()
    assert gevent.spawn(signal.wait, 5).get(timeout=5) is True


def test_gevent_mailbox_hands_items_between_greenlets(
    gevent_backend: GeventBackend,
) -> None:
    """A producer greenlet waits for room; the consumer gets all, in order."""
    import gevent

    box: Mailbox[int] = Mailbox(gevent_backend, 4)

    def produce() -> None:
        for n in range(100):
            box.put(n)
        box.close()

    producer = gevent.spawn(produce)
    received: list[int] = []
    while not box.drained:
        received += box.take(5)
    producer.get(timeout=5)
    assert received == list(range(100))


def test_gevent_waits_leave_no_objects_behind_per_event(
    gevent_backend: GeventBackend,
) -> None:
    """A round of events leaves nothing new alive in the waiting streams.

    Objects made per wait live until the next event, long enough to reach
    the oldest generation of the garbage collector; with many subscribers
    that makes its full collections frequent, and they pause every stream.
    """
    import gevent

    boxes: list[Mailbox[bytes]] = [Mailbox(gevent_backend, 10) for _ in range(200)]

    def consume(box: Mailbox[bytes]) -> None:
        while not box.drained:
            box.take(15.0)

    consumers = [gevent.spawn(consume, box) for box in boxes]

    def one_round() -> None:
        for box in boxes:
            box.offer([b"data: x\n\n"])
        while any(len(box) for box in boxes):
            gevent.sleep(0)
        gevent.sleep(0)

    one_round()
    gc.collect()
    gc.disable()
    try:
        gc.freeze()
        one_round()
        left = len(gc.get_objects(generation=0))
    finally:
        gc.unfreeze()
        gc.enable()
        for box in boxes:
            box.close()
        gevent.joinall(consumers, timeout=5)
    assert left < len(boxes) // 4


def test_gevent_mailbox_fed_from_an_os_thread_never_misses_a_wake_up(
    gevent_backend: GeventBackend,
) -> None:
    """Items offered one at a time from a real thread all reach a greenlet.

    The greenlet waits with no timeout, so any lost wake-up hangs it until
    the guard fails the test.
    """
    import queue

    import gevent

    box: Mailbox[int] = Mailbox(gevent_backend, 10)
    acks: queue.SimpleQueue[int] = queue.SimpleQueue()

    def feed() -> None:
        for n in range(2000):
            box.offer([n])
            acks.get(timeout=10)

    feeder = threading.Thread(target=feed)
    feeder.start()
    received: list[int] = []
    with gevent.Timeout(30):
        while len(received) < 2000:
            items = box.take(None)
            received += items
            for item in items:
                acks.put(item)
    feeder.join(10)
    assert received == list(range(2000))
