"""The event bus: connection and device events fanned out to subscribers with bounded queues.

Each subscriber has its own bounded queue and drop count: a subscriber that does not read
loses the oldest events, counted, and slows nobody. Thread-safe: subscribers read from other
threads (the control socket, a TUI); publishers are on the loop thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from vsproxy.events import Event, EventKind


class EventQueue:
    """One subscriber's events: at most ``limit``; the oldest go first when it is full."""

    def __init__(self, bus: EventBus, limit: int) -> None:
        self._bus = bus
        self._q: deque[Event] = deque()
        self._limit = limit
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False

    def _put(self, ev: Event) -> None:
        with self._cond:
            if len(self._q) >= self._limit:
                self._q.popleft()
                self.dropped += 1
            self._q.append(ev)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> list[Event]:
        """Every event waiting, after waiting up to ``timeout`` for one; [] if none came."""
        with self._cond:
            if not self._q and not self.closed:
                self._cond.wait(timeout)
            out = list(self._q)
            self._q.clear()
            return out

    def close(self) -> None:
        self._bus._remove(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class EventBus:
    def __init__(self) -> None:
        self._subs: list[EventQueue] = []
        self._lock = threading.Lock()
        self.active = False  # anyone listening: publishers build events only then
        self.published = 0

    def subscribe(self, limit: int = 10000) -> EventQueue:
        q = EventQueue(self, limit)
        with self._lock:
            self._subs = [*self._subs, q]
            self.active = True
        return q

    def _remove(self, q: EventQueue) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s is not q]
            self.active = bool(self._subs)

    def publish(self, kind: EventKind, device: str, conn: tuple[int, int, int, int] | None = None,
                detail: str = "", rule: str = "") -> None:
        if not self.active:
            return
        ev = Event(time.time(), kind, device, conn, detail, rule)
        self.published += 1
        for q in self._subs:  # a copy-on-write list: no lock on the data path's side
            q._put(ev)
