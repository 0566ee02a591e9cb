"""Sibling routing: a connection between two guests, relayed by vsproxy.

vsproxy is each guest's peer: device A's core terminates A's credit, device B's core B's,
and a pair of ``SiblingEnd`` peers carries bytes between the two. Each end holds a
bounded inbox of bytes for its own guest; when it is full, the other end's ``send`` takes
nothing, so the sending core keeps the data in its own (credit-bounded) queue and a slow
sibling throttles only this connection. What an inbox holds counts in the sending device's
``buffered`` (its ``max_buffered``) until the receiving guest reads it or its end closes: a
guest cannot park bytes in many siblings' inboxes beyond its own quota. When a guest reads, the other side is told at
once that room was freed (no new kick will come for that data).

Every notification crosses through ``schedule`` (the loop's call_soon), never directly
into the other core, so one core is never re-entered from inside the other.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from vsproxy.endpoints.base import Buffer, PeerBase, scatter
from vsproxy.vsock.connection import Connection

INBOX_MAX = 256 * 1024
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2  # virtio_vsock.h VIRTIO_VSOCK_SHUTDOWN_RCV/SEND


class SiblingHooks(Protocol):
    def readable(self, conn: Connection) -> None: ...
    def writable(self, conn: Connection) -> None: ...
    def connected(self, conn: Connection) -> None: ...
    def failed(self, conn: Connection, reason: str) -> None: ...
    def aborted(self, conn: Connection) -> None: ...
    def held(self, conn: Connection, n: int) -> None: ...


class SiblingEnd(PeerBase):
    def __init__(self, label: str, schedule: Callable[[Callable[[], None]], None], inbox_max: int = INBOX_MAX) -> None:
        self.label = label
        self.schedule = schedule
        self.inbox = bytearray()
        self.inbox_max = inbox_max
        # SEQPACKET: whole messages with their EOR mark; inbox_len counts their bytes
        self.messages: deque[tuple[bytes, bool]] = deque()
        self.inbox_len = 0
        self.eof = False  # the other guest shut down sending; report EOF once the inbox is read
        self.far_rcv = False  # the other guest shut down receiving: this guest's sends must fail
        self.accepted = False  # this end's guest accepted: the dialling side's "connected" is on its way
        self.closed = False
        self.other: SiblingEnd | None = None
        self.hooks: SiblingHooks | None = None
        self.conn: Connection | None = None
        self._reading = False
        self._writing = False

    def attach(self, hooks: SiblingHooks, conn: Connection) -> None:
        self.hooks = hooks
        self.conn = conn

    def describe(self) -> str:
        return self.label

    def _held(self, n: int) -> None:
        """This end's guest sent ``n`` bytes into the other's inbox (negative: they left it).
        A counter in the sending core, not a notification: it runs nothing there."""
        if n and self.hooks is not None and self.conn is not None:
            self.hooks.held(self.conn, n)

    def _notify(self, what: str) -> None:
        hooks, conn = self.hooks, self.conn
        if hooks is None or conn is None or self.closed:
            return
        if what == "readable":
            self.schedule(lambda: hooks.readable(conn))
        elif what == "writable":
            self.schedule(lambda: hooks.writable(conn))
        elif what == "connected":
            self.schedule(lambda: hooks.connected(conn))
        elif what == "failed":
            self.schedule(lambda: hooks.failed(conn, "sibling refused or went away"))
        else:
            self.schedule(lambda: hooks.aborted(conn))

    # -- Peer ------------------------------------------------------------------------
    def send(self, bufs: Sequence[Buffer]) -> int:
        other = self.other
        if other is None or other.closed or self.closed:
            raise BrokenPipeError("sibling connection closed")
        taken = 0
        for b in bufs:
            room = other.inbox_max - len(other.inbox)
            if room <= 0:
                break
            k = min(room, len(b))
            other.inbox += b[:k]
            taken += k
            if k < len(b):
                break
        self._held(taken)
        if taken and other._reading:
            other._notify("readable")
        return taken

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self.inbox:
            return 0 if self.eof else None
        n = scatter(self.inbox, bufs)
        del self.inbox[:n]
        other = self.other
        if other is not None:
            other._held(-n)
        if other is not None and other._writing:
            other._notify("writable")  # room freed: data the other guest already sent moves now
        return n

    def send_message(self, data: bytes, eor: bool) -> bool:
        """SEQPACKET: a whole message or nothing; message bounds and EOR survive."""
        other = self.other
        if other is None or other.closed or self.closed:
            raise BrokenPipeError("sibling connection closed")
        if other.inbox_len and other.inbox_len + len(data) > other.inbox_max:
            return False
        other.messages.append((data, eor))
        other.inbox_len += len(data)
        self._held(len(data))
        if other._reading:
            other._notify("readable")
        return True

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        if not self.messages:
            return (b"", False) if self.eof else None
        data, eor = self.messages.popleft()
        self.inbox_len -= len(data)
        other = self.other
        if other is not None:
            other._held(-len(data))
        if other is not None and other._writing:
            other._notify("writable")
        return data, eor

    def shutdown_write(self) -> None:
        other = self.other
        if other is not None:
            other.eof = True
            if other._reading:
                other._notify("readable")

    def shutdown_read(self) -> None:
        other = self.other
        if other is not None and not other.far_rcv:
            other.far_rcv = True
            other._notify("readable")  # its core relays the RCV shutdown to its guest at once

    def far_closed(self) -> bool:
        return self.eof and self.far_rcv

    def far_shutdown(self) -> int:
        # in stream order: what the other guest shut counts once what it sent before is read
        if self.inbox or self.messages:
            return 0
        return (SHUTDOWN_RCV if self.far_rcv else 0) | (SHUTDOWN_SEND if self.eof else 0)

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        other = self.other
        if other is not None and (self.inbox or self.messages):
            # this guest reads no more: what waited for it is let go, and uncounted
            other._held(-(len(self.inbox) + self.inbox_len))
            self.inbox.clear()
            self.messages.clear()
            self.inbox_len = 0
        if other is None or other.closed:
            return
        if (other.conn is not None and other.conn.state.value in ("connecting", "requested")
                and not self.accepted):
            other._notify("failed")
        elif reset:
            other._notify("aborted")
        else:
            # A clean close: the guest closed both ways (or both were shut already), an EOF
            # after what was already relayed, and nothing more is received.
            other.eof = True
            other.far_rcv = True
            other._notify("readable")

    def watch_read(self, on: bool) -> None:
        self._reading = on
        if on and (self.inbox or self.messages or self.eof):
            self._notify("readable")

    def watch_write(self, on: bool) -> None:
        self._writing = on
        other = self.other
        if on and other is not None and max(len(other.inbox), other.inbox_len) < other.inbox_max:
            self._notify("writable")

    def established(self, local_port: int) -> None:
        # This side's guest accepted: the dialling guest gets its RESPONSE now. A close from here
        # on is a close after the connect (notifications run in order: "connected" first), even
        # when it comes before the dialling side has seen the connect.
        self.accepted = True
        other = self.other
        if other is not None and self.conn is not None and other.conn is not None:
            # A receiver's window bounds what the dialling guest is told it may send.
            other.conn.credit.limit_window(max(self.conn.credit.peer_buf_alloc, 4096))
            other._notify("connected")


def pair(label_a: str, label_b: str, schedule: Callable[[Callable[[], None]], None]) -> tuple[SiblingEnd, SiblingEnd]:
    a = SiblingEnd(label_a, schedule)
    b = SiblingEnd(label_b, schedule)
    a.other, b.other = b, a
    return a, b
