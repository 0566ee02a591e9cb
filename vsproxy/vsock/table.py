"""The connection table of one device: connections by their 4-tuple, their states, the
control packets queued for the guest, and the limits. Every state change goes through
``_enter``, which checks it against ``TRANSITIONS`` (as h11 keeps one table per role) and
keeps the count of connections still connecting; every RST to the guest goes through
``_send_rst``. Sans-I/O: host sides are reached only through their ``Peer``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vsproxy.endpoints.base import Buffer, Peer, PeerBase
from vsproxy.events import EventKind, EventSink, NoEvents
from vsproxy.limits import MAX_BUFFERED, MAX_CONTROL, ratelog
from vsproxy.taps import Taps
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.header import HDR, Header, Op
from vsproxy.vsock.rxbuf import RxQueue

log = logging.getLogger("vsproxy.vsock")

CONNECT_TIMEOUT = 2.0  # Linux and Firecracker
SHUTDOWN_TIMEOUT = 2.0
DEFAULT_BUF_ALLOC = 1024 * 1024
MAX_CONNECTIONS = 65536
# Control packets queued for the guest while it posts no rx buffers (limits.MAX_CONTROL).
MAX_CONTROL_BACKLOG = MAX_CONTROL
HOST_PORT_FIRST = 1 << 30  # Firecracker assigns host ports from 2^30 up

# Which state may follow which. A connection starts CONNECTING (the guest's REQUEST) or
# REQUESTED (a host-initiated one); it is ESTABLISHED by the host side's connect or the
# guest's RESPONSE; any state may close. Half-closes are the SHUTDOWN flags on the connection
# (guest_shut, host_eof, host_shut_wr), not states: each direction closes on its own.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.CONNECTING: frozenset({State.ESTABLISHED, State.CLOSED}),
    State.REQUESTED: frozenset({State.ESTABLISHED, State.CLOSED}),
    State.ESTABLISHED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
PENDING = frozenset({State.CONNECTING, State.REQUESTED})


class StateError(Exception):
    """A state change the table does not allow: a bug in the core, never the guest's doing."""


@dataclass(slots=True)
class Counters:
    tx_packets: int = 0
    tx_bytes: int = 0  # payload bytes from the guest
    rx_packets: int = 0
    rx_bytes: int = 0  # payload bytes to the guest
    spoofed: int = 0
    bad_packets: int = 0
    rst_sent: int = 0
    credit_violations: int = 0
    connections_opened: int = 0
    connections_refused: int = 0
    limit_refused: int = 0  # refused at max_connections or max_pending
    buffer_resets: int = 0  # connections reset because the device held max_buffered bytes for its hosts
    control_full: int = 0  # times the tx ring was paused: max_control replies waited for rx buffers
    faults: int = 0  # connections reset after an unexpected error in their handling
    timeouts: int = 0
    short_rx_buffers: int = 0
    pump_updates: int = 0  # CREDIT_UPDATEs the C pump took (and refilled from) without Python
    pump_reads: int = 0  # host socket wake-ups the C pump served, Python only passing them on
    pump_kicks: int = 0  # tx kicks C took to the end (vq_tx_kick), with no Python pump turn
    pump_sends: int = 0  # runs of guest data C sent to the host socket itself (OWN_F_TX)
    pump_blocked: int = 0  # connections C gave back because their host socket was full
    pump_read_ahead: int = 0  # host bytes C read ahead while the guest's window was shut
    drops: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


@dataclass(slots=True)
class Traffic:
    """Packets and payload bytes each way, summed over connections (per routing rule)."""

    to_peer_packets: int = 0
    to_peer_bytes: int = 0
    to_guest_packets: int = 0
    to_guest_bytes: int = 0

    def add(self, stats: Sequence[int] | Traffic) -> None:
        """Add a connection's ``stats`` ([packets, bytes] to the peer, then to the guest: a list,
        because the data path counts into it per packet) or another total."""
        if isinstance(stats, Traffic):
            stats = (stats.to_peer_packets, stats.to_peer_bytes, stats.to_guest_packets, stats.to_guest_bytes)
        self.to_peer_packets += stats[0]
        self.to_peer_bytes += stats[1]
        self.to_guest_packets += stats[2]
        self.to_guest_bytes += stats[3]

    @property
    def packets(self) -> int:
        return self.to_peer_packets + self.to_guest_packets

    @property
    def bytes(self) -> int:
        return self.to_peer_bytes + self.to_guest_bytes


# A connector opens the host side of a guest-initiated connection. It returns a
# Peer that is connecting (the shell later calls peer_connected/peer_failed), or
# None when nothing can serve the destination (the guest gets RST).
Connector = Callable[[Connection], Peer | None]


class ConnTable:
    def __init__(
        self,
        guest_cid: int,
        connector: Connector,
        *,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        name: str = "vm",
        max_connections: int = MAX_CONNECTIONS,
        max_pending: int = MAX_CONNECTIONS,
        max_buffered: int = MAX_BUFFERED,
        max_control: int = MAX_CONTROL_BACKLOG,
    ) -> None:
        self.guest_cid = guest_cid
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_buffered = max_buffered
        self.max_control = max_control
        self.buffered = 0  # guest data held for the host sides: the connections' ``held`` and ``sib_held``
        # connections reset by _check_buffered whose sibling bytes are not let go yet (that comes
        # when the other end closes): not reset again for the same bytes meanwhile
        self._releasing: dict[Connection, None] = {}
        self._control_full = False  # the tx ring is paused for the control backlog (counted once)
        self.pending = 0  # connections CONNECTING or REQUESTED
        self.connector = connector
        self.buf_alloc = buf_alloc
        self.name = name
        self.conns: dict[tuple[int, int, int, int], Connection] = {}
        # (connection or None, op, flags, raw header for connection-less RSTs)
        self.control: deque[tuple[Connection | None, int, int, bytes]] = deque()
        self.ready: deque[Connection] = deque()
        self._flush: list[Connection] = []
        self._lingering: set[Connection] = set()
        # Host-initiated connections on a 4-tuple whose old connection is still going away
        # (its guest was told SHUTDOWN 3 and has not answered RST yet): each gets its REQUEST
        # once the old one leaves the table, or fails at its connect deadline.
        self._held: dict[tuple[int, int, int, int], Connection] = {}
        # 4-tuples whose connection ended with our SHUTDOWN 3 (the far side closed): the guest's
        # kernel may answer it with one RST, which is the old connection's, not a new one's.
        self._shut_keys: dict[tuple[int, int, int, int], None] = {}
        self._next_host_port = HOST_PORT_FIRST
        self.counters = Counters()
        self.now = 0.0
        self.seqpacket = False
        self.taps = Taps()
        # closed connections' traffic per rule; the shell may share one dict across sessions
        self.rule_totals: dict[str, Traffic] = {}
        self.owned = 0  # connections the C pump runs (lending.Lending)
        # Where connection events go (eventbus.EventBus, injected by the shell); built only if heard.
        self.events: EventSink = NoEvents()

    def _event(self, kind: EventKind, conn: Connection | tuple[int, int, int, int], detail: str = "",
               rule: str = "") -> None:
        if self.events.active:
            key = conn if isinstance(conn, tuple) else conn.key
            self.events.publish(kind, self.name, key, detail, rule)

    # -- hooks the layers above fill in ------------------------------------------------------
    def _reclaim_if_lent(self, conn: Connection) -> None:
        """Take ``conn`` back from the C pump if it runs it (lending.Lending)."""

    def sync_owned(self) -> None:
        """Fold what the C pump did for the connections it runs into the counters (lending)."""

    # -- states ----------------------------------------------------------------------------------
    def _add(self, conn: Connection) -> None:
        """A new connection, CONNECTING or REQUESTED, into the table."""
        if conn.state not in PENDING:
            raise StateError(f"a new connection cannot start {conn.state.value}")
        conn.created = self.now
        self.conns[conn.key] = conn
        self.pending += 1

    def _enter(self, conn: Connection, state: State) -> None:
        old = conn.state
        if state not in TRANSITIONS[old]:
            raise StateError(f"{conn.describe()}: {old.value} -> {state.value}")
        if old in PENDING:
            self.pending -= 1
        conn.state = state
        if state is State.ESTABLISHED and self.events.active:
            self._event(EventKind.ESTABLISHED, conn)

    def at_limit(self) -> str | None:
        """Why a new connection must be refused now, or None."""
        if len(self.conns) + len(self._lingering) >= self.max_connections:
            return f"max-connections ({self.max_connections})"
        if self.pending >= self.max_pending:
            return f"max-pending ({self.max_pending})"
        return None

    def _tap(self, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None) -> None:
        self.taps(self.name, to_guest, hdr, payload, mark)

    def tx_blocked(self) -> bool:
        """True while control replies pile up for a guest that posts no rx buffers: its tx
        ring waits (counted and logged once each time it fills)."""
        if len(self.control) < self.max_control:
            self._control_full = False
            return False
        if not self._control_full:
            self._control_full = True
            self.counters.control_full += 1
            ratelog(log, logging.WARNING, f"{self.name}: control backlog",
                    "%s: %d control packets wait for the guest's rx buffers (max-control): its tx ring "
                    "waits until it takes them", self.name, len(self.control))
        return True

    def _hold(self, conn: Connection) -> None:
        """Count what ``conn`` holds for its host side into the device's ``buffered``."""
        d = conn.out_bytes - conn.held
        if d:
            self.buffered += d
            conn.held = conn.out_bytes

    def sibling_held(self, conn: Connection, n: int) -> None:
        """``n`` bytes ``conn``'s guest sent wait in (or, negative, left) a sibling's inbox."""
        conn.sib_held += n
        self.buffered += n
        if conn.sib_held <= 0 and self._releasing:
            self._releasing.pop(conn, None)

    def _drop_out(self, conn: Connection) -> None:
        """What ``conn`` held for its host side is not going anywhere: let it go."""
        conn.outq.clear()
        conn.out_bytes = 0
        self._hold(conn)

    def _check_buffered(self) -> None:
        """Past ``max_buffered``: reset the connections that hold the most, until under it.
        Credit bounds each connection; this bounds a guest with many hosts that do not read."""
        excess = self.buffered - self.max_buffered - sum(c.sib_held for c in self._releasing)
        while excess > 0:
            held = [c for c in self.conns.values() if c.held or c.sib_held] + [
                c for c in self._lingering if c.held or c.sib_held]
            if not held:  # the rest is on its way out (sibling ends closing)
                return
            conn = max(held, key=lambda c: c.held + c.sib_held)
            excess -= conn.held + conn.sib_held
            if conn.sib_held > 0:
                self._releasing[conn] = None
            self.counters.buffer_resets += 1
            ratelog(log, logging.WARNING, f"{self.name}: buffer limit",
                    "%s: reset %s: the device holds %d bytes for host sides that do not read (max-buffered "
                    "%d), %d of them for this one", self.name, conn.describe(), self.buffered, self.max_buffered,
                    conn.held + conn.sib_held)
            if conn in self._lingering:
                self._lingering.discard(conn)
                self._drop_out(conn)
                conn.peer.close(reset=True)
            else:
                self._reset(conn, "max-buffered")

    def lingering(self) -> int:
        return len(self._lingering)

    def drop_lingering(self) -> None:
        """vsproxy itself is exiting: no more waiting for slow host readers."""
        for conn in list(self._lingering):
            self._drop_out(conn)
            conn.peer.close(reset=True)
        self._lingering.clear()

    def _queue(self, conn: Connection, op: int, flags: int = 0) -> None:
        self.control.append((conn, op, flags, b""))

    def _queue_raw(self, hdr: bytes, op: int, flags: int = 0) -> None:
        """A packet of a connection already gone from the table, its header packed now."""
        self.control.append((None, op, flags, hdr))

    def _send_rst(self, conn: Connection | None, hdr: Header | None = None) -> None:
        """RST to the guest, the one way every RST goes out (and is counted): on ``conn``, or
        in answer to ``hdr`` when there is no connection for it."""
        self.counters.rst_sent += 1
        if conn is not None:
            self._queue(conn, Op.RST)
        elif hdr is not None:
            raw = H.pack(hdr.dst_cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, Op.RST, 0, 0, 0)
            self.control.append((None, Op.RST, 0, raw))

    def _rst_reply(self, hdr: Header) -> None:
        self._send_rst(None, hdr)

    def _make_ready(self, conn: Connection, front: bool = False) -> None:
        if not conn.flags & Connection.IN_READY:
            conn.flags |= Connection.IN_READY
            if front:
                self.ready.appendleft(conn)
            else:
                self.ready.append(conn)

    def _reset(self, conn: Connection, reason: str) -> None:
        self._event(EventKind.RESET, conn, reason)
        """RST to the guest and a reset of the host side."""
        log.debug("%s: reset %s: %s", self.name, conn.describe(), reason)
        self._send_rst(conn)
        self._forget(conn, reset_peer=True)

    def _forget_vsock(self, conn: Connection) -> None:
        self._reclaim_if_lent(conn)
        if conn.state is not State.CLOSED:
            self._enter(conn, State.CLOSED)
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            self._account(conn)
            held = self._held.pop(conn.key, None)
            if held is not None:  # the 4-tuple is free: the connection that waited for it goes
                self._add(held)
                self._queue(held, Op.REQUEST)

    def _account(self, conn: Connection) -> None:
        for rule in conn.rule:
            self.rule_totals.setdefault(rule, Traffic()).add(conn.stats)

    def _forget(self, conn: Connection, reset_peer: bool) -> None:
        self._forget_vsock(conn)
        self._lingering.discard(conn)
        self._drop_out(conn)
        conn.peer.close(reset=reset_peer)

    def _fields(self, conn: Connection, op: int, flags: int, length: int) -> tuple[int, ...]:
        """The header of a packet to the guest on ``conn``, as HDR fields."""
        cr = conn.credit
        return (conn.peer_cid, self.guest_cid, conn.peer_port, conn.guest_port, length, conn.type, op, flags,
                cr.buf_alloc, cr.fwd_cnt)

    def _header(self, conn: Connection, op: int, flags: int, length: int) -> bytes:
        """Packed header; the guest will see our fwd_cnt in it."""
        conn.credit.advertised()
        return HDR.pack(*self._fields(conn, op, flags, length))

    def _peer_error(self, conn: Connection, e: OSError) -> None:
        if conn in self._lingering:
            self._lingering.discard(conn)
            self._drop_out(conn)
            conn.peer.close(reset=True)
            return
        ratelog(log, logging.INFO, f"{self.name}: host side error", "%s: host side of %s: %s", self.name,
                conn.describe(), e.strerror or e)
        self._reset(conn, "host peer error")

    def _chain_unused(self, rxq: RxQueue, conn: Connection, why: OSError | bool) -> bool:
        """The rx chain popped for ``conn`` stays the guest's, because the host side had nothing
        (False: watch it), ended (True: EOF) or failed. Always False: no chain used."""
        rxq.unpop()
        if isinstance(why, OSError):
            self._peer_error(conn, why)
        elif why:
            self._host_eof(conn)
        else:
            conn.peer.watch_read(True)
        return False

    def _host_eof(self, conn: Connection) -> None:
        """The far side sends no more: SHUTDOWN SEND to the guest, with RCV too when the far side
        receives no more either (a sibling guest or a unix socket's peer that closed): as a
        kernel peer's close() says."""
        self._event(EventKind.HALF_CLOSED, conn, "the host side sends no more")
        conn.host_eof = True
        conn.peer.watch_read(False)
        flags = H.SHUTDOWN_SEND
        if not conn.flags & Connection.RCV_RELAYED and (conn.peer.far_shutdown() & H.SHUTDOWN_RCV
                                                          or conn.peer.hung_up()):
            flags |= H.SHUTDOWN_RCV
            conn.flags |= Connection.RCV_RELAYED
        if flags == H.SHUTDOWN_BOTH or conn.flags & Connection.RCV_RELAYED:
            # The far side closed both ways, as a kernel peer's close(): the connection is over
            # for this hop once its SHUTDOWN is queued, and its 4-tuple is free at once, as
            # Linux frees it on a peer's SHUTDOWN 3 (vsock_remove_sock) even while the local
            # socket stays open: the far guest may connect again from the same port.
            self._queue_raw(self._header(conn, Op.SHUTDOWN, flags, 0), Op.SHUTDOWN, flags)
            self._shut_keys[conn.key] = None
            if len(self._shut_keys) > MAX_CONTROL_BACKLOG:
                del self._shut_keys[next(iter(self._shut_keys))]
            self._event(EventKind.CLOSED, conn, "by the far side")
            self._forget(conn, reset_peer=False)
            return
        self._queue(conn, Op.SHUTDOWN, flags)
        if conn.host_shut_wr:
            conn.peer.close(reset=False)

    def _far_shutdown(self, conn: Connection) -> bool:
        """Relay what the far side shut that the guest was not told yet; True when it sends no
        more (nothing left to read)."""
        far = conn.peer.far_shutdown()
        if far & H.SHUTDOWN_SEND and not conn.host_eof:
            self._host_eof(conn)
            return True
        if far & H.SHUTDOWN_RCV and not conn.flags & Connection.RCV_RELAYED:
            conn.flags |= Connection.RCV_RELAYED
            self._event(EventKind.HALF_CLOSED, conn, "the host side receives no more")
            self._queue(conn, Op.SHUTDOWN, H.SHUTDOWN_RCV)
        return False


    def close_all(self) -> None:
        """The front-end is gone: every host peer of an open connection sees a reset, not a
        clean EOF. Connections the guest already closed cleanly keep flushing what it sent
        (the guest was given credit for it) until done or their linger deadline."""
        for conn in list(self.conns.values()):
            self._event(EventKind.RESET, conn, "the front-end went away")
            self._reclaim_if_lent(conn)
            if conn.state is not State.CLOSED:
                self._enter(conn, State.CLOSED)
            self._account(conn)
            self._lingering.discard(conn)
            self._drop_out(conn)
            conn.peer.close(reset=True)
        self.conns.clear()
        for held in self._held.values():
            held.peer.close(reset=True)
        self._held.clear()
        self.control.clear()
        self.ready.clear()
        self._flush = []


class _NoPeer(PeerBase):
    """Placeholder peer while a connector runs."""

    def send(self, bufs: Sequence[Buffer]) -> int:
        return 0

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        return None

    def shutdown_write(self) -> None:
        pass

    def close(self, reset: bool) -> None:
        pass

    def watch_read(self, on: bool) -> None:
        pass

    def watch_write(self, on: bool) -> None:
        pass

    def established(self, local_port: int) -> None:
        pass

    def describe(self) -> str:
        return "-"


NO_PEER = _NoPeer()
