"""Greenlet and thread primitives, chosen once per process, and one lock.

Under a gevent server (sockets patched, as ``gunicorn -k gevent`` does) a
stream's producer is a greenlet and it waits on the gevent hub; anywhere
else these are threads.
"""

from __future__ import annotations

import _thread
import abc
import contextvars
import os
import select
import sys
import threading
import typing as t

if t.TYPE_CHECKING:
    import collections.abc as cabc

    from .metrics import CloseReason
    from .socket_writer import Frames
    from .socket_writer import SocketWriter


_R = t.TypeVar("_R")


def _original(module: str, name: str) -> t.Any:
    # What gevent's patching replaces. Without gevent.monkey nothing is
    # patched yet, and a later patch_all() does not change what is bound.
    monkey = sys.modules.get("gevent.monkey")
    return (
        monkey.get_original(module, name)
        if monkey
        else getattr(sys.modules[module], name)
    )


#: The one lock of the package, for sections that never wait: an OS lock
#: under every backend, even where gevent has patched :mod:`threading`.
#: gevent's own lock would deadlock publishers in native threads (a thread
#: pool, a client library's callback thread), and no greenlet can switch out
#: while it holds a lock around code that never waits.
os_lock: cabc.Callable[[], _thread.LockType] = _original("_thread", "allocate_lock")
#: gevent removes epoll from a patched select module, because waiting on it
#: would block the hub; the watcher polls it with a zero timeout only after
#: the backend has said its descriptor is readable.
epoll: type[select.epoll] = _original("select", "epoll")


#: What a stream waits on: the part of :class:`threading.Event` it uses.
Waitable: t.TypeAlias = "threading.Event | _Signal"


#: Ends a task, running its cleanup, waiting at most that many seconds.
Stop = t.Callable[[float], None]


class Backend(t.Protocol):
    """What a stream needs from the server's concurrency model."""

    name: str

    def event(self) -> Waitable: ...
    def spawn(self, fn: cabc.Callable[[], None], name: str) -> Stop: ...
    def call(self, fn: cabc.Callable[[], _R]) -> _R: ...
    def wait_readable(self, fd: int, timeout: float) -> None: ...


class ThreadBackend:
    """Threads, for the Werkzeug dev server and ``gunicorn -k gthread``."""

    name = "threads"

    def event(self) -> Waitable:
        return threading.Event()

    def spawn(self, fn: cabc.Callable[[], None], name: str) -> Stop:
        threading.Thread(target=fn, name=name, daemon=True).start()
        # A thread cannot be interrupted: it sees that its mailbox is closed
        # and ends at the generator's next yield. Waiting for that would
        # hold the server's thread hostage to a silent generator.
        return lambda timeout: None

    def call(self, fn: cabc.Callable[[], _R]) -> _R:
        return fn()

    #: poll, not select, which refuses descriptors of 1024 and above.
    _poll = staticmethod(select.poll)

    def wait_readable(self, fd: int, timeout: float) -> None:
        poller = self._poll()
        poller.register(fd, select.POLLIN)
        poller.poll(timeout * 1000)


class GeventBackend(ThreadBackend):
    """Greenlets, for ``gunicorn -k gevent`` and other gevent servers."""

    name = "gevent"

    def __init__(self) -> None:
        import gevent
        import gevent.hub
        import gevent.select

        self._gevent = gevent
        #: The OS thread's id, which patching hides behind the greenlet's.
        self.thread_ident: cabc.Callable[[], int] = _original("_thread", "get_ident")
        #: What a :class:`_Signal` parks a waiting greenlet in.
        self.waiter = gevent.hub.Waiter
        # Sockets belong to the hub they were made in: this one, since the
        # backend is made on the first stream or publish of the process.
        self._hub = gevent.get_hub()
        # gevent's, whose select() would try the OS select() first.
        self._poll = gevent.select.poll

    def event(self) -> Waitable:
        return _Signal(self, self._gevent.get_hub())

    def call_soon(self, fn: cabc.Callable[[], None]) -> None:
        """Call ``fn`` in the hub's thread once its loop next runs, that is
        once the running greenlet waits; from any thread."""
        if self.thread_ident() == self._hub.thread_ident:
            self._hub.loop.run_callback(fn)
        else:
            self._hub.loop.run_callback_threadsafe(fn)

    def let_others_run(self) -> None:
        """Let the hub run every other greenlet that is ready, and look for
        I/O, before the caller goes on."""
        # Not sleep(0): the hub would run the caller again before it looks
        # for I/O, for up to gevent's switch interval.
        self._gevent.idle()

    def spawn(self, fn: cabc.Callable[[], None], name: str) -> Stop:
        greenlet = self._gevent.spawn(fn)
        greenlet.name = name
        # GreenletExit is raised wherever the task waits, inside the user's
        # generator or on a full mailbox, so its finally runs now.
        return lambda timeout: greenlet.kill(block=True, timeout=timeout)

    def call(self, fn: cabc.Callable[[], _R]) -> _R:
        """Run ``fn`` in the hub's thread: a native thread (a thread pool, a
        library's callback) cannot use the hub's sockets, so it waits here."""
        if self.thread_ident() == self._hub.thread_ident:
            return fn()
        done, outcome = os_lock(), list[tuple[t.Any, BaseException | None]]()
        done.acquire()

        def run() -> None:
            try:
                outcome.append((fn(), None))
            except BaseException as e:
                outcome.append((None, e))
            done.release()

        self._hub.loop.run_callback_threadsafe(self._gevent.spawn, run)
        done.acquire()
        if outcome[0][1] is not None:
            raise outcome[0][1]
        return t.cast(_R, outcome[0][0])


# An event for one greenlet at a time, woken by a bare hub callback; ``set``
# may be called from another OS thread. gevent.event.Event makes a Timeout for
# every timed wait and runs its generic link machinery on every set(). A
# stream waits once per event it sends, so with a thousand subscribers that
# was most of a fan-out's cost, and the objects each wait left alive kept the
# cyclic garbage collector busy (the fanout scenario of benchmarks/, see
# docs/performance.rst). A signal keeps one Waiter and reuses its timer while
# the timeout stays the same, as a stream's keep-alive interval does.
class _Signal:
    __slots__ = (
        "_after",
        "_backend",
        "_flag",
        "_hub",
        "_scheduled",
        "_switch",
        "_timer",
        "_waiter",
    )

    def __init__(self, backend: GeventBackend, hub: t.Any) -> None:
        self._flag = False
        self._backend = backend
        self._hub = hub
        # The waiter, its callback and the timer are made on the first
        # wait and kept: made per wait, they lived until the next event and
        # were promoted to the oldest generation, where a thousand per event
        # made the worker's full garbage collections frequent.
        self._waiter: t.Any = None
        # The waiter's switch_args, bound once: what both the wake-up and
        # the timer call. The wait tells them apart by the flag.
        self._switch: cabc.Callable[[], None] | None = None
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
        self._hub.loop.run_callback(self._switch)

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if timeout is not None and timeout <= 0:
            return False
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._backend.waiter(self._hub)
            self._switch = waiter.switch_args
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
            timer.again(self._switch)
        try:
            # Raises ConcurrentObjectUseError if another greenlet waits. A
            # wake-up scheduled for an earlier wait that timed out may still
            # arrive; waiters treat a wait that returns True as a hint.
            waiter.get()
            return self._flag
        finally:
            if timer is not None:
                timer.stop()
            waiter.clear()
            self._scheduled = False


THREADS = ThreadBackend()
_chosen: tuple[int, Backend] | None = None


def current_backend() -> Backend:
    """Return the backend that fits the running server, chosen once a process.

    gevent is chosen only when it has patched :mod:`socket`, as a gevent
    server does, if need be after loading the app in its parent process.
    """
    global _chosen
    if _chosen is None or _chosen[0] != os.getpid():
        monkey = sys.modules.get("gevent.monkey")
        patched = monkey is not None and monkey.is_module_patched("socket")
        _chosen = (os.getpid(), GeventBackend() if patched else THREADS)
    return _chosen[1]


class StreamSource(abc.ABC):
    """Where an event stream response gets its bytes from.

    A source is started when the client reads the first byte, and closed
    exactly once, when the response is closed.
    """

    #: Why the source ended by itself (``end``, ``error``, ``slow_consumer``),
    #: if it did before it was interrupted; None otherwise.
    ended_by: CloseReason | None = None

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

    def write_through(self, writer: SocketWriter) -> bool:
        """Let chunks that come while the response waits with nothing
        queued go to the client through ``writer`` at once; False if the
        source does not, as by default: the response then writes through
        the server, which gains nothing for a source that is not fanned out
        to (a generator's stream is written fastest in the server's big
        writes)."""
        return False


#: Set by a stream view's producer while the view's iterable runs. A source
#: that the iterable reads from (a subscription) calls it when it is cut
#: short, by the broker or for falling behind, so that the stream ends as cut
#: (the client reconnects) and not as finished.
on_cut_short: contextvars.ContextVar[cabc.Callable[[], None]] = contextvars.ContextVar(
    "eventstream_on_cut_short", default=lambda: None
)

_T = t.TypeVar("_T")


class Mailbox(t.Generic[_T]):
    """A bounded queue between a producer and one response, which takes
    everything queued at once, so events that pile up leave in one write.

    ``put`` blocks while it is full (a slow client slows its producer);
    ``offer`` never blocks, for publishers that must not wait on one client.
    """

    # One per stream: slots keep an idle stream small.
    __slots__ = (
        "_backend",
        "_items",
        "_lock",
        "_ready",
        "_space",
        "_taker_idle",
        "closed",
        "maxsize",
        "writer",
    )

    def __init__(self, backend: Backend, maxsize: int) -> None:
        self.maxsize = maxsize
        self.closed = False
        # A list, not a deque: items only ever leave all at once, and an
        # empty list is a tenth of an empty deque, per subscriber.
        self._items: list[_T] = []
        self._lock = os_lock()
        # The backend, not its bound ``event``: a bound method is an object
        # per mailbox.
        self._backend = backend
        self._ready = backend.event()
        # Made on the first put that has to wait; subscribers never do.
        self._space: Waitable | None = None
        #: Writes for the taker while it waits idle (see ``take``), if set.
        self.writer: SocketWriter | None = None
        self._taker_idle = False

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, chunks: list[_T], frames: Frames | None = None) -> int:
        """Queue as many of ``chunks`` as there is room for, never blocking;
        return how many.

        :param frames: the chunks' bytes, which :attr:`writer` writes for
            the taker at once instead, if it waits idle (see :meth:`take`).
        """
        with self._lock:
            if self.closed:
                return 0
            if self._taker_idle and frames is not None and len(chunks) <= self.maxsize:
                assert self.writer is not None
                if not self.writer.write_now(frames):
                    # The taker sends the rest before anything queued after.
                    self._taker_idle = False
                    self._ready.set()
                return len(chunks)
            taken = chunks[: self.maxsize - len(self._items)]
            if taken:
                self._items.extend(taken)
                self._ready.set()
            return len(taken)

    def write_through(self, writer: SocketWriter) -> None:
        """Let ``writer`` write for the taker while it waits idle."""
        self.writer = writer

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
                    self._space = self._backend.event()
                space = self._space
                space.clear()
            space.wait()

    def take(self, timeout: float | None, idle: bool = False) -> list[_T]:
        """Return every queued item, waiting up to ``timeout`` for one.

        An empty list means the timeout passed or the mailbox is closed and
        drained.

        :param idle: the taker writes nothing while it waits, so that
            :attr:`writer`, if set, may write for it what comes meanwhile;
            what the socket did not take is the writer's ``rest``, for the
            taker to send first.
        """
        if idle and self.writer is not None:
            with self._lock:
                self._taker_idle = not self._items and not self.closed
            try:
                ready = self._ready.wait(timeout)
            finally:
                with self._lock:
                    self._taker_idle = False
        else:
            ready = self._ready.wait(timeout)
        if not ready:
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
