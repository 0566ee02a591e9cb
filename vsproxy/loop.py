"""A small epoll reactor: fd callbacks, cancellable timers and end-of-round hooks.

Single-threaded on purpose: the data path touches guest memory and the vsock
cores without locks, and every callback runs to completion.

After a pass that served fds, the loop may poll them without sleeping for a short while
(``--busy-poll``) before it blocks in epoll: a request/response peer's next packet usually
comes within tens of microseconds, and catching it awake saves the wake-up (the sleeping
process scheduled again) on the way in and makes the sender's system call cheaper. The window
adapts (``BusyPoll``); a loop that served no fd never polls, so an idle process sleeps. What
polling costs is counted (``BusyPoll.spent_ns``).

The loop is the last line of defence: an unexpected exception in a callback never ends the
process serving every guest. It is counted and logged (rate-limited), and handed to the
callback's owner, the object a bound method belongs to, if that owner has ``on_fault``: a
connection's peer resets that connection, a front-end session ends that session. A fd
callback without such an owner is taken off the loop, so a handler that fails every time
cannot spin.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from vsproxy.limits import Health, ratelog

log = logging.getLogger("vsproxy.loop")

Callback = Callable[[], None]
# Cancelled timers are dropped from the heap once they are this many and half of it.
_COMPACT_MIN = 256

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_READ_ANY = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_WRITE_ANY = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class TimerHandle:
    """What ``call_later`` returns: ``cancel()`` drops the callback (and what it holds) now."""

    __slots__ = ("_loop", "cancelled", "cb", "when")

    def __init__(self, loop: Loop, when: float, cb: Callback) -> None:
        self._loop: Loop | None = loop
        self.when = when
        self.cb: Callback | None = cb
        self.cancelled = False

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.cb = None
        loop, self._loop = self._loop, None
        if loop is not None:
            loop._timer_cancelled()


def _unwrap(cb: object) -> object:
    """The function under a partial."""
    return cb.func if isinstance(cb, functools.partial) else cb


def _owner(cb: object) -> object | None:
    """The object a bound method (or a partial of one) belongs to."""
    return getattr(_unwrap(cb), "__self__", None)


def _name(cb: object) -> str:
    fn = _unwrap(cb)
    return getattr(fn, "__qualname__", None) or repr(fn)


# The default of --busy-poll (µs): benchmarks/bench_latency.py measures it (README).
BUSY_POLL_US = 100


class BusyPoll:
    """The adaptive polling window and what it cost (sans-I/O: times are arguments).

    ``window_ns`` starts at ``max_ns``; a poll that found an fd doubles it (up to ``max_ns``),
    one that ended without halves it (below two microseconds it is 0: no polling). Once closed,
    every ``PROBE``-th pass that served fds polls the full window once (``served``; a miss closes
    it again): traffic that is not request/response (a stream, sparse events) costs one window
    in ``PROBE`` passes, and a loop that serves no fd never polls."""

    PROBE = 64
    __slots__ = ("hits", "max_ns", "misses", "passes", "probing", "spent_ns", "window_ns")

    def __init__(self, max_ns: int) -> None:
        self.max_ns = max(0, max_ns)
        self.window_ns = self.max_ns
        self.passes = 0  # passes that served fds since the window closed
        self.probing = False  # the window is open for one probe: a miss closes it again
        self.hits = 0  # polls that found an fd ready (a sleep and a wake-up saved)
        self.misses = 0  # polls that ended with nothing (the loop then slept)
        self.spent_ns = 0  # time spent polling, hits and misses

    def served(self) -> int:
        """A pass served fds: the window for the next wait (0: sleep at once)."""
        if not self.window_ns and self.max_ns:
            self.passes += 1
            if self.passes >= self.PROBE:
                self.passes = 0
                self.window_ns = self.max_ns
                self.probing = True
        return self.window_ns

    def polled(self, spent_ns: int, found: bool) -> None:
        self.spent_ns += spent_ns
        if found:
            self.hits += 1
            self.window_ns = min(self.max_ns, self.window_ns * 2)
        else:
            self.misses += 1
            self.window_ns = self.window_ns // 2 if self.window_ns >= 4000 and not self.probing else 0
        self.probing = False

    def add(self, spent_ns: int, hits: int, misses: int) -> None:
        """What the C data path's polling (vq_tx_kick) cost and caught."""
        self.spent_ns += spent_ns
        self.hits += hits
        self.misses += misses


class Loop:
    def __init__(self, busy_poll_us: int = 0) -> None:
        # epoll itself, not the selectors module: one dict lookup per event, and read/write
        # interest toggles (a connection out of credit, a full host socket) are one epoll_ctl.
        self._ep = select.epoll()
        # fd -> [reader, writer]
        self._cbs: dict[int, list[Callback | None]] = {}
        self._events: dict[int, int] = {}  # fd -> the epoll mask registered for it
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0  # cancelled handles still in _timers
        self._seq = itertools.count()
        self.health = Health()
        self._soon: list[Callback] = []
        self._from_threads: deque[Callback] = deque()  # call_soon_threadsafe (deque.append is atomic)
        self.thread_id: int | None = None  # the thread running the loop
        self.stopping = False
        # Lets another thread (demo, tests) wake the loop, e.g. to stop it.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.set_reader(self._wake_r.fileno(), self._drain_wakeup)
        self.busy = BusyPoll(busy_poll_us * 1000)
        self._served = False  # the last pass ran an fd callback: the next may poll first

    def _drain_wakeup(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    def wakeup(self) -> None:
        """Thread-safe: make a blocked select return."""
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    @staticmethod
    def time() -> float:
        return time.monotonic()

    def _update(self, fd: int) -> None:
        cbs = self._cbs.get(fd)
        events = 0
        if cbs is not None:
            if cbs[0] is not None:
                events |= _READ
            if cbs[1] is not None:
                events |= _WRITE
        old = self._events.get(fd)
        if events == old:
            return
        if events == 0 and old is None:
            self._cbs.pop(fd, None)
        elif events == 0:
            # Interest switched off for a while (no credit, nothing to send): a zero mask is
            # one epoll_ctl, where unregistering and registering again are two. epoll still
            # reports HUP and ERR for it; run_once unregisters it then.
            try:
                self._ep.modify(fd, 0)
                self._events[fd] = 0
            except OSError:  # closed without forget(): the kernel dropped it already
                self._unregister(fd)
        else:
            # An fd closed and reused while still listed here: the kernel dropped the old one.
            try:
                if old is None:
                    self._ep.register(fd, events)
                else:
                    self._ep.modify(fd, events)
            except FileExistsError:
                self._ep.modify(fd, events)
            except FileNotFoundError:
                self._ep.register(fd, events)
            self._events[fd] = events

    def set_reader(self, fd: int, cb: Callback | None) -> None:
        self._cbs.setdefault(fd, [None, None])[0] = cb
        self._update(fd)

    def set_writer(self, fd: int, cb: Callback | None) -> None:
        self._cbs.setdefault(fd, [None, None])[1] = cb
        self._update(fd)

    def forget(self, fd: int) -> None:
        """The fd is about to be closed: no callbacks, out of the epoll set."""
        self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        self._cbs.pop(fd, None)
        if self._events.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it from the set

    def call_later(self, delay: float, cb: Callback) -> TimerHandle:
        h = TimerHandle(self, self.time() + delay, cb)
        heapq.heappush(self._timers, (h.when, next(self._seq), h))
        return h

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if self._cancelled >= _COMPACT_MIN and self._cancelled * 2 >= len(self._timers):
            # A flood of short-lived timers (hybrid handshakes) must not keep its entries.
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def pending_timers(self) -> int:
        return len(self._timers) - self._cancelled

    def _fault(self, cb: object, exc: Exception, fd: int | None = None) -> None:
        """An unexpected exception in ``cb``: counted, logged, handed to its owner."""
        self.health.faults += 1
        ratelog(log, logging.ERROR, "unexpected error", "unexpected error in %s: %r", _name(cb), exc, exc_info=exc)
        on_fault = getattr(_owner(cb), "on_fault", None)
        if on_fault is not None:
            try:
                on_fault(exc)
                return
            except Exception as e:  # the recovery failed too: fall back to isolating the fd
                self.health.faults += 1
                ratelog(log, logging.ERROR, "unexpected error", "recovering from it in %s failed: %r",
                        _name(on_fault), e, exc_info=e)
        if fd is not None and self._cbs.get(fd) is not None:
            self._unregister(fd)  # nobody to recover it: it must not spin the loop

    def call_soon(self, cb: Callback) -> None:
        self._soon.append(cb)

    def call_soon_threadsafe(self, cb: Callback) -> None:
        """From any thread: run ``cb`` on the loop's thread, soon."""
        self._from_threads.append(cb)
        self.wakeup()

    def run_once(self, max_wait: float = 1.0) -> None:
        while self._from_threads:
            self._soon.append(self._from_threads.popleft())
        timeout = max_wait
        if self._soon:
            timeout = 0.0
        elif self._timers:
            # a cancelled head only makes this pass wake early, once
            timeout = max(0.0, min(timeout, self._timers[0][0] - self.time()))
        try:
            if timeout > 0 and self._served and self.busy.served():
                ready = self._poll_busy(timeout)
            else:
                ready = self._ep.poll(timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            ready = []
        self._served = bool(ready)
        cbs_of = self._cbs
        for fd, mask in ready:
            cbs = cbs_of.get(fd)
            if cbs is None or (cbs[0] is None and cbs[1] is None):
                self._unregister(fd)  # HUP or ERR on an fd nobody watches now
                continue
            # As selectors does: an error or hang-up wakes both sides, which then see it.
            cb = cbs[0]
            try:
                if mask & _READ_ANY and cb is not None:
                    cb()
                    cbs = cbs_of.get(fd)
                if mask & _WRITE_ANY and cbs is not None and cbs[1] is not None:
                    cb = cbs[1]
                    cb()
            except Exception as e:
                self._fault(cb, e, fd)
        now = self.time()
        timers = self._timers
        while timers and timers[0][0] <= now:
            h = heapq.heappop(timers)[2]
            tcb = h.cb
            if tcb is None:  # cancelled
                self._cancelled -= 1
                continue
            h.cb = None
            h._loop = None
            try:
                tcb()
            except Exception as e:
                self._fault(tcb, e)
            timers = self._timers  # a compaction may have replaced the list
        # One pass only: work that re-schedules itself waits for the next select.
        soon, self._soon = self._soon, []
        for scb in soon:
            try:
                scb()
            except Exception as e:
                self._fault(scb, e)

    def _poll_busy(self, timeout: float) -> list[tuple[int, int]]:
        """Poll the fds without sleeping for up to the window, then sleep for the rest of
        ``timeout``."""
        busy, poll, clock = self.busy, self._ep.poll, time.monotonic_ns
        t0 = clock()
        end = t0 + busy.window_ns
        while True:
            ready = poll(0)
            now = clock()
            if ready:
                busy.polled(now - t0, True)
                return ready
            if now >= end or self._from_threads:
                break
        busy.polled(now - t0, False)
        left = timeout - (now - t0) / 1e9
        if left <= 0 or self._from_threads:
            return poll(0)
        return poll(left)

    def run(self) -> None:
        self.thread_id = threading.get_ident()
        while not self.stopping:
            self.run_once()

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def close(self) -> None:
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()
