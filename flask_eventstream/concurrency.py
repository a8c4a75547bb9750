"""Greenlet and thread primitives, chosen at run time.

A stream needs three things from its server's concurrency model: a way to
run a producer beside the response, an event to wait on with a timeout, and
a way to watch many sockets at once. Under a gevent server (sockets
monkey-patched, as ``gunicorn -k gevent`` does) those are greenlets and the
gevent hub; anywhere else they are threads.
"""

from __future__ import annotations

import abc
import functools
import select
import sys
import threading
import typing as t

if t.TYPE_CHECKING:
    import collections.abc as cabc


class Waitable(t.Protocol):
    """The part of :class:`threading.Event` that streams use."""

    def set(self) -> None: ...
    def clear(self) -> None: ...
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class Task(t.Protocol):
    """A producer running beside a response."""

    def stop(self, timeout: float) -> None:
        """End the task, running its cleanup, waiting at most ``timeout``."""


class Backend(t.Protocol):
    """What a stream needs from the server's concurrency model."""

    name: str

    def event(self) -> Waitable: ...
    def lock(self) -> t.ContextManager[t.Any]: ...
    def spawn(self, fn: cabc.Callable[[], None]) -> Task: ...
    def poller(self) -> select.epoll: ...
    def wait_readable(self, fd: int, timeout: float) -> None: ...


class _Thread:
    def __init__(self, fn: cabc.Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=fn, name="eventstream-producer", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        # A thread cannot be interrupted: it sees that its mailbox is closed
        # and ends at the generator's next yield. Waiting for that here would
        # hold the server's thread hostage to a silent generator.
        pass


class ThreadBackend:
    """Threads, for the Werkzeug dev server and ``gunicorn -k gthread``."""

    name = "threads"

    def event(self) -> Waitable:
        return threading.Event()

    def lock(self) -> t.ContextManager[t.Any]:
        return threading.Lock()

    def spawn(self, fn: cabc.Callable[[], None]) -> Task:
        return _Thread(fn)

    def poller(self) -> select.epoll:
        return select.epoll()

    def wait_readable(self, fd: int, timeout: float) -> None:
        select.select([fd], [], [], timeout)


class GeventBackend:
    """Greenlets, for ``gunicorn -k gevent`` and other gevent servers."""

    name = "gevent"

    def __init__(self) -> None:
        import gevent
        import gevent.hub
        import gevent.monkey
        import gevent.select

        self._gevent = gevent
        self._get_hub = gevent.get_hub
        #: The OS thread's id, which patching hides behind the greenlet's.
        self.thread_ident: cabc.Callable[[], int]
        self.thread_ident = gevent.monkey.get_original("_thread", "get_ident")
        #: What a :class:`_Signal` parks a waiting greenlet in.
        self.waiter = gevent.hub.Waiter
        self._allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
        self._select = gevent.select.select
        # gevent removes epoll from a patched select module, because waiting
        # on it would block the hub; the watcher only polls it with a zero
        # timeout after the hub has said its descriptor is readable.
        self._epoll: type[select.epoll] = gevent.monkey.get_original("select", "epoll")

    def event(self) -> Waitable:
        return _Signal(self, self._get_hub())

    def lock(self) -> t.ContextManager[t.Any]:
        # The OS lock that gevent's patching replaced. The sections it guards
        # never wait, so no greenlet can switch out while holding it, and it
        # still keeps a publisher in a real thread (a thread pool, say) safe.
        # It costs a fraction of gevent's greenlet-aware lock, and mailboxes
        # take it on every event.
        return t.cast(t.ContextManager[t.Any], self._allocate_lock())

    def spawn(self, fn: cabc.Callable[[], None]) -> Task:
        return _Greenlet(self._gevent.spawn(fn))

    def poller(self) -> select.epoll:
        return self._epoll()

    def wait_readable(self, fd: int, timeout: float) -> None:
        self._select([fd], [], [], timeout)


class _Signal:
    """An event for one greenlet at a time, woken by a bare hub callback.

    :class:`gevent.event.Event` makes a :class:`gevent.Timeout` for every
    timed wait and runs its generic link machinery on every ``set``. A
    stream waits once per event it sends, so with a thousand subscribers
    that was most of a fan-out's cost, and the objects each wait left alive
    until the next event kept the cyclic garbage collector busy. A signal
    keeps one :class:`gevent.hub.Waiter` and reuses its timer while the
    timeout stays the same, as a stream's keep-alive interval does. ``set``
    may be called from another OS thread.
    """

    __slots__ = (
        "_after",
        "_backend",
        "_expire",
        "_flag",
        "_hub",
        "_scheduled",
        "_timer",
        "_waiter",
        "_wake",
    )

    def __init__(self, backend: GeventBackend, hub: t.Any) -> None:
        self._flag = False
        self._backend = backend
        self._hub = hub
        # The waiter, its two callbacks and the timer are made on the first
        # wait and kept: made per wait, they lived until the next event and
        # were promoted to the oldest generation, where a thousand per event
        # made the worker's full garbage collections frequent.
        self._waiter: t.Any = None
        self._wake: cabc.Callable[[], None] | None = None
        self._expire: cabc.Callable[[], None] | None = None
        self._timer: t.Any = None
        self._after = 0.0
        self._scheduled = False

    def is_set(self) -> bool:
        return self._flag

    def clear(self) -> None:
        self._flag = False

    def set(self) -> None:
        self._flag = True
        if self._backend.thread_ident() != self._hub.thread_ident:
            # Another thread could look while a greenlet is between seeing
            # the flag down and parking, and miss it; in the hub's thread
            # those two steps never interleave with this check.
            self._hub.loop.run_callback_threadsafe(self.set)
            return
        if self._scheduled or self._waiter is None or self._waiter.greenlet is None:
            return
        self._scheduled = True
        self._hub.loop.run_callback(self._wake)

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if timeout is not None and timeout <= 0:
            return False
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._backend.waiter(self._hub)
            self._wake = functools.partial(waiter.switch, True)
            self._expire = functools.partial(waiter.switch, False)
        timer = None
        if timeout is not None:
            timer = self._timer
            if timer is None or self._after != timeout:
                if timer is not None:
                    timer.close()
                # Repeating, because again() re-arms a stopped timer from its
                # interval; a plain start() would resume the time left.
                timer = self._timer = self._hub.loop.timer(timeout, timeout)
                self._after = timeout
            timer.again(self._expire)
        try:
            # Raises ConcurrentObjectUseError if another greenlet waits. A
            # wake-up scheduled for an earlier wait that timed out may still
            # arrive; waiters treat a wait that returns True as a hint.
            return bool(waiter.get())
        finally:
            if timer is not None:
                timer.stop()
            waiter.clear()
            self._scheduled = False


class _Greenlet:
    def __init__(self, greenlet: t.Any) -> None:
        self._greenlet = greenlet

    def stop(self, timeout: float) -> None:
        # GreenletExit is raised wherever the producer is waiting, inside the
        # user's generator or on a full mailbox, so its finally runs now.
        self._greenlet.kill(block=True, timeout=timeout)


THREADS = ThreadBackend()
_gevent_backend: GeventBackend | None = None


def current_backend() -> Backend:
    """Return the backend that fits the running server.

    gevent is chosen only when it has patched :mod:`socket`, which is what a
    gevent server does before it accepts a connection; gevent being merely
    installed changes nothing.
    """
    global _gevent_backend
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return THREADS
    if _gevent_backend is None:
        _gevent_backend = GeventBackend()
    return _gevent_backend


class StreamSource(abc.ABC):
    """Where an event stream response gets its bytes from.

    A source is started when the client reads the first byte, and closed
    exactly once, when the response is closed.
    """

    @abc.abstractmethod
    def start(self, backend: Backend) -> None:
        """Begin producing; ``backend`` fits the running server."""

    @abc.abstractmethod
    def take(self, timeout: float | None) -> list[bytes]:
        """Return the chunks ready to send, waiting up to ``timeout``."""

    @property
    @abc.abstractmethod
    def drained(self) -> bool:
        """True when nothing more will come."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Wake ``take`` and make the source drain; safe from any thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop producing and release everything the source holds."""


_T = t.TypeVar("_T")


class Mailbox(t.Generic[_T]):
    """A bounded queue between a producer and one response.

    The response takes everything that is queued in one call, so events that
    pile up while it writes leave in a single write. ``put`` blocks while the
    mailbox is full (a slow client slows its producer); ``offer`` never
    blocks and reports whether there was room, for publishers that must not
    wait on one subscriber.

    :param backend: where blocking calls wait.
    :param maxsize: how many chunks may wait before ``put`` blocks.
    """

    def __init__(self, backend: Backend, maxsize: int) -> None:
        self.maxsize = maxsize
        self.closed = False
        # A list, not a deque: items only ever leave all at once, and an
        # empty list is a tenth of an empty deque, per subscriber.
        self._items: list[_T] = []
        self._lock = backend.lock()
        self._new_event = backend.event
        self._ready = backend.event()
        # Made on the first put that has to wait; subscribers never do.
        self._space: Waitable | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, chunk: _T) -> bool:
        """Queue ``chunk`` if there is room; never block."""
        with self._lock:
            if self.closed or len(self._items) >= self.maxsize:
                return False
            self._items.append(chunk)
            self._ready.set()
            return True

    def put(self, chunk: _T) -> bool:
        """Queue ``chunk``, waiting for room; return False once closed."""
        while True:
            with self._lock:
                if self.closed:
                    return False
                if len(self._items) < self.maxsize:
                    self._items.append(chunk)
                    self._ready.set()
                    return True
                if self._space is None:
                    self._space = self._new_event()
                space = self._space
                space.clear()
            space.wait()

    def take(self, timeout: float | None) -> list[_T]:
        """Return every queued item, waiting up to ``timeout`` for one.

        An empty list means the timeout passed or the mailbox is closed and
        drained.
        """
        if not self._ready.wait(timeout):
            return []
        with self._lock:
            # A copy, so that the mailbox keeps one list for its lifetime:
            # a new one per take would outlive the next garbage collection.
            items = self._items.copy()
            self._items.clear()
            if not self.closed:
                self._ready.clear()
            if self._space is not None:
                self._space.set()
        return items

    @property
    def drained(self) -> bool:
        """True when the mailbox is closed and nothing is left to take."""
        return self.closed and not self._items

    def close(self) -> None:
        """Refuse further chunks and wake both sides; queued chunks stay."""
        with self._lock:
            self.closed = True
            self._ready.set()
            if self._space is not None:
                self._space.set()
