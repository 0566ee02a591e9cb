"""Guest replay's other half: the simulated guest listens on the ports the capture shows the host
(or a sibling) connecting to, and answers each such connection as the guest did, from a
``ReplayBook`` of those connections (vsproxy/replay/server.py: the guest is the accepting side).

The simulated guest is single-threaded, so serving is a ``pump`` called while the outgoing
connections wait for answers, between them, and afterwards until the recorded inbound
connections have all come (``serve``, bounded by a deadline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vsproxy.replay.client import Mismatch
from vsproxy.replay.server import Action, EndStream, Forward, ReplayBook, ResetConn, Send, ServerSession
from vsproxy.simguest import GuestListener, GuestSocket, SimGuest, SimGuestError, SimGuestTimeout
from vsproxy.simguest.driver import State
from vsproxy.vsock import header as H


@dataclass
class Served:
    sock: GuestSocket
    session: ServerSession
    seqpacket: bool
    shut: bool = False  # the connecting side's half-close was passed on
    closed: bool = False  # we closed (our recorded SHUTDOWN of both, or a reset)
    failure: str | None = None

    def mismatch(self) -> Mismatch | None:
        if self.failure is not None:
            return Mismatch(self.failure)
        return None


@dataclass
class InboundServer:
    guest: SimGuest
    book: ReplayBook
    expected: int  # recorded inbound connections
    timeout: float
    listeners: list[tuple[GuestListener, int]] = field(default_factory=list)  # (listener, type)
    live: list[Served] = field(default_factory=list)
    finished: list[Served] = field(default_factory=list)

    def listen(self) -> None:
        for port, kind in sorted({(s.port, s.sock_type) for s in self.book.scripts}):
            self.listeners.append((self.guest.listen(port, type=kind), kind))

    def pump(self) -> None:
        """Accept what came, feed what the connecting sides sent, play the answers."""
        self.guest.poll(0)
        for lst, kind in self.listeners:
            while True:
                try:
                    sock = lst.accept(timeout=0)
                except SimGuestTimeout:
                    break
                sv = Served(sock, self.book.session(lst.port, kind), kind == int(H.Type.SEQPACKET))
                self.live.append(sv)
                self._apply(sv, sv.session.opened())
        for sv in list(self.live):
            self._feed(sv)
            c = sv.sock.conn
            if sv.closed or c.state == State.CLOSED or c.reset:
                self.live.remove(sv)
                self.finished.append(sv)

    def serve(self, deadline: float) -> None:
        """Pump until every recorded inbound connection has come and ended, or the deadline."""
        while time.monotonic() < deadline and (len(self.finished) < self.expected or self.live):
            self.pump()
            try:
                self.guest.poll(0.02)
            except SimGuestError:
                return

    def _feed(self, sv: Served) -> None:
        c = sv.sock.conn
        try:
            if sv.seqpacket:
                while c.msgs and not sv.closed:
                    data, flags = sv.sock.recv_message(0)
                    self._apply(sv, sv.session.received(data, bool(flags & H.SEQ_EOR)))
            else:
                while c.rx and not sv.closed:
                    self._apply(sv, sv.session.received(sv.sock.recv(1 << 20, 0)))
            if c.peer_shutdown & H.SHUTDOWN_SEND and not sv.shut and not sv.closed:
                sv.shut = True
                self._apply(sv, sv.session.shut())
        except (OSError, SimGuestError) as e:
            sv.failure = sv.failure or f"serving it failed: {e}"
            sv.closed = True

    def _apply(self, sv: Served, actions: list[Action]) -> None:
        for a in actions:
            if sv.closed:
                return
            if isinstance(a, Send):
                if sv.seqpacket:
                    sv.sock.send_message(a.data, a.eor)
                else:
                    sv.sock.sendall(a.data)
            elif isinstance(a, EndStream):
                if a.flags & H.SHUTDOWN_BOTH == H.SHUTDOWN_BOTH:
                    sv.closed = True
                    sv.sock.close(self.timeout)
                else:
                    sv.sock.shutdown_write()
            elif isinstance(a, ResetConn | Forward):
                sv.failure = a.reason
                sv.closed = True
                c = sv.sock.conn
                self.guest.send_raw(H.pack(self.guest.guest_cid, c.peer_cid, c.local_port, c.peer_port, 0, c.type,
                                           H.Op.RST, 0, c.buf_alloc, c.fwd_cnt))
