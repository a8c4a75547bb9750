"""Greenlet and thread primitives, chosen at run time.

A stream needs three things from its server's concurrency model: a way to
run a producer beside the response, an event to wait on with a timeout, and
a way to watch many sockets at once. Under a gevent server (sockets
monkey-patched, as ``gunicorn -k gevent`` does) those are greenlets and the
gevent hub; anywhere else they are threads.
"""

from __future__ import annotations

import abc
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
        import gevent.event
        import gevent.monkey
        import gevent.select

        self._gevent = gevent
        self._event = gevent.event.Event
        self._select = gevent.select.select
        # gevent removes epoll from a patched select module, because waiting
        # on it would block the hub; the watcher only polls it with a zero
        # timeout after the hub has said its descriptor is readable.
        self._epoll: type[select.epoll] = gevent.monkey.get_original("select", "epoll")

    def event(self) -> Waitable:
        return t.cast(Waitable, self._event())

    def spawn(self, fn: cabc.Callable[[], None]) -> Task:
        return _Greenlet(self._gevent.spawn(fn))

    def poller(self) -> select.epoll:
        return self._epoll()

    def wait_readable(self, fd: int, timeout: float) -> None:
        self._select([fd], [], [], timeout)


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
        self._lock = threading.Lock()
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
            items, self._items = self._items, []
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
