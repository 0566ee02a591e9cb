"""A small epoll reactor: fd callbacks, timers and end-of-round hooks.

Single-threaded on purpose: the data path touches guest memory and the vsock
cores without locks, and every callback runs to completion.
"""

from __future__ import annotations

import heapq
import itertools
import select
import socket
import time
from collections.abc import Callable

Callback = Callable[[], None]

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_READ_ANY = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_WRITE_ANY = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class Loop:
    def __init__(self) -> None:
        # epoll itself, not the selectors module: one dict lookup per event, and read/write
        # interest toggles (a connection out of credit, a full host socket) are one epoll_ctl.
        self._ep = select.epoll()
        # fd -> [reader, writer]
        self._cbs: dict[int, list[Callback | None]] = {}
        self._events: dict[int, int] = {}  # fd -> the epoll mask registered for it
        self._timers: list[tuple[float, int, Callback]] = []
        self._seq = itertools.count()
        self._soon: list[Callback] = []
        self.stopping = False
        # Lets another thread (demo, tests) wake the loop, e.g. to stop it.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.set_reader(self._wake_r.fileno(), self._drain_wakeup)

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

    def call_later(self, delay: float, cb: Callback) -> None:
        heapq.heappush(self._timers, (self.time() + delay, next(self._seq), cb))

    def call_soon(self, cb: Callback) -> None:
        self._soon.append(cb)

    def run_once(self, max_wait: float = 1.0) -> None:
        timeout = max_wait
        if self._soon:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - self.time()))
        try:
            ready = self._ep.poll(timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            ready = []
        cbs_of = self._cbs
        for fd, mask in ready:
            cbs = cbs_of.get(fd)
            if cbs is None or (cbs[0] is None and cbs[1] is None):
                self._unregister(fd)  # HUP or ERR on an fd nobody watches now
                continue
            # As selectors does: an error or hang-up wakes both sides, which then see it.
            if mask & _READ_ANY and cbs[0] is not None:
                cbs[0]()
                cbs = cbs_of.get(fd)
            if mask & _WRITE_ANY and cbs is not None and cbs[1] is not None:
                cbs[1]()
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, cb = heapq.heappop(self._timers)
            cb()
        # One pass only: work that re-schedules itself waits for the next select.
        soon, self._soon = self._soon, []
        for cb in soon:
            cb()

    def run(self) -> None:
        while not self.stopping:
            self.run_once()

    def close(self) -> None:
        self._ep.close()
        self._wake_r.close()
        self._wake_w.close()
