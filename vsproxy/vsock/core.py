"""The virtio-vsock device logic for one guest, sans-I/O.

Packets from the guest's tx ring come in through ``guest_packet``; effects go
out through the connections' ``Peer`` objects (never sockets directly) and
through packets written into rx chains by ``fill_rx``. Time is passed in as
``now``; nothing here reads a clock, opens a socket or blocks.

Flow control: vsproxy terminates credit per connection. Guest data is handed to
the peer at once (zero copy from guest memory); what the peer does not take is
copied into the connection's queue, which the credit we advertised
(``buf_alloc``) bounds. A pass counts its bytes forwarded as they arrive, so the
credit update goes out before the copy to the peer (``Credit.forward_ahead``);
bytes the peer then refuses stop that until they drain, which keeps the queue
within one window beyond ``buf_alloc``. Host data is read straight into the
guest's rx buffers only while the guest has credit and has posted buffers, so a
host sender is throttled by its own connection's window and never by the shared
rings.

Limits: ``max_connections`` bounds the connections that hold a host resource (open,
connecting, or still handing the host what the guest sent before it closed) and
``max_pending`` those still connecting; past either, a guest REQUEST gets RST and a host
connection is refused. Both are counted (``limit_refused``) and logged at a bounded rate.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vsproxy import fastpath
from vsproxy.endpoints.base import Buffer, Peer
from vsproxy.limits import ratelog
from vsproxy.taps import Taps
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.header import HDR, HDR_SIZE, U32, Header, Op

log = logging.getLogger("vsproxy.vsock")

CONNECT_TIMEOUT = 2.0  # Linux and Firecracker
SHUTDOWN_TIMEOUT = 2.0
DEFAULT_BUF_ALLOC = 1024 * 1024
MAX_CONNECTIONS = 65536
# Control packets queued for the guest while it posts no rx buffers. Past this
# the tx ring is left alone (resources ran out), which bounds memory.
MAX_CONTROL_BACKLOG = 4096
HOST_PORT_FIRST = 1 << 30  # Firecracker assigns host ports from 2^30 up
SENDMSG_MAX_IOV = 512


class RxQueue(Protocol):
    """The slice of SplitQueue that fill_rx needs."""

    def pop(self) -> _RxChain | None: ...
    def unpop(self) -> None: ...
    def push(self, head: int, length: int) -> None: ...


class _RxChain(Protocol):
    @property
    def head(self) -> int: ...
    @property
    def writable(self) -> list[memoryview]: ...
    @property
    def write_len(self) -> int: ...


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


class Owner(Protocol):
    """The C pump (fastpath.TxFastPath) that runs connections between Python's turns."""

    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None) -> int: ...
    def take_back(self, slot: int) -> fastpath.OwnedBack: ...
    def fill(self, slot: int) -> fastpath.OwnedBack | bool: ...
    def progress(self, slot: int) -> int: ...
    def shut(self, slot: int) -> bool: ...
    def counts(self, slot: int) -> fastpath.OwnedCounts: ...


class RxFastFill(Protocol):
    def __call__(self, fd: int, credit: int, max_packets: int, hdr: bytes) -> fastpath.RxFill: ...


def _no_fd() -> int:
    return -1


# What one connection may fill before the next ready one gets a turn, and before the filled
# buffers are handed to the guest (published; an interrupt only if the guest's used_event asks):
# 256 KiB, or 128 chains (a Linux guest's 256 KiB window is 70 of its 3776-byte rx buffers: a
# lower count would hand the connection back to Python several times a window).
RX_FAST_BURST = 128
RX_FAST_BURST_BYTES = 256 * 1024
# How long a guest that sends credit updates unasked may keep its window shut before we ask.
CREDIT_REQUEST_DELAY = 0.05

# A connector opens the host side of a guest-initiated connection. It returns a
# Peer that is connecting (the shell later calls peer_connected/peer_failed), or
# None when nothing can serve the destination (the guest gets RST).
Connector = Callable[["Connection"], Peer | None]


class VsockCore:
    def __init__(
        self,
        guest_cid: int,
        connector: Connector,
        *,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        name: str = "vm",
        max_connections: int = MAX_CONNECTIONS,
        max_pending: int = MAX_CONNECTIONS,
    ) -> None:
        self.guest_cid = guest_cid
        self.max_connections = max_connections
        self.max_pending = max_pending
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
        self._next_host_port = HOST_PORT_FIRST
        self.counters = Counters()
        self.now = 0.0
        self.seqpacket = False
        self.taps = Taps()
        # closed connections' traffic per rule; the shell may share one dict across sessions
        self.rule_totals: dict[str, list[int]] = {}
        # Injected by the shell when the C rx path can serve this device's rx ring.
        self.rx_fast: RxFastFill | None = None
        # The shell's "publish the rx buffers filled so far" (and interrupt if the guest asks).
        self.rx_progress: Callable[[], None] | None = None
        # The C writer of header-only packets into Linux-shaped rx chains (RxFastPath.put).
        self.rx_put: Callable[[bytes], bool] | None = None
        self.rx_pending: Callable[[], int] = lambda: 0
        # Injected by the shell when C can run connections between Python's turns (_lend): take
        # the guest's CREDIT_UPDATEs, read the host socket into the rx ring, send the guest's data.
        self.owner: Owner | None = None
        self.owned = 0

    def _tap(self, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None) -> None:
        self.taps(self.name, to_guest, hdr, payload, mark)

    # ------------------------------------------------------------------
    # guest -> device
    def tx_blocked(self) -> bool:
        """True while control replies pile up for a guest that posts no rx buffers."""
        return len(self.control) >= MAX_CONTROL_BACKLOG

    def guest_packet(self, hdr_bytes: Buffer, payload: Sequence[memoryview], payload_len: int) -> None:
        """One tx chain: 44 header bytes (at the start of ``hdr_bytes``) and the rest of the
        chain (``payload_len`` bytes in ``payload``)."""
        c = self.counters
        (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt) = HDR.unpack_from(
            hdr_bytes
        )
        if src_cid != self.guest_cid:
            # Anti-spoofing: a guest may only speak as itself.
            c.spoofed += 1
            ratelog(log, logging.WARNING, f"{self.name}: spoofed", "%s: dropped spoofed packet %s", self.name,
                    H.unpack(hdr_bytes).describe())
            if self.taps.active:
                self._tap(False, bytes(hdr_bytes[:HDR_SIZE]), payload,
                          f"spoofed: src_cid {src_cid} is not the guest's CID {self.guest_cid}; dropped")
            return
        c.tx_packets += 1
        if self.taps.active:
            known = self.conns.get((type_, src_port, dst_cid, dst_port))
            if known is not None or op != Op.REQUEST:  # a new REQUEST is tapped after its verdict
                self._tap(False, bytes(hdr_bytes[:HDR_SIZE]), payload, known.mark if known is not None else None)
        if length > payload_len or length > H.MAX_PKT_PAYLOAD:
            c.bad_packets += 1
            c.drop("bad-len")
            ratelog(log, logging.WARNING, f"{self.name}: bad length", "%s: bad packet length %d (chain holds %d): %s",
                    self.name, length, payload_len, H.unpack(hdr_bytes).describe())
            conn = self.conns.get((type_, src_port, dst_cid, dst_port))
            if conn is not None:
                self._reset(conn, "bad packet length")
            return
        if type_ != H.Type.STREAM and not (self.seqpacket and type_ == H.Type.SEQPACKET):
            # virtio spec: a packet of unknown type MUST be answered with RST.
            c.bad_packets += 1
            c.drop("bad-type")
            if op != Op.RST:
                self._rst_reply(H.unpack(hdr_bytes))
            return
        conn = self.conns.get((type_, src_port, dst_cid, dst_port))
        if conn is None:
            hdr = H.unpack(hdr_bytes)
            if op == Op.REQUEST:
                self._guest_request(hdr)
            elif op != Op.RST:
                c.drop("unknown-connection")
                self._rst_reply(hdr)
            return
        if conn.own >= 0:
            self._reclaim(conn)
        cr = conn.credit
        cr.peer_buf_alloc = buf_alloc
        cr.peer_fwd_cnt = fwd_cnt
        if op == Op.RW:
            if type_ == H.Type.SEQPACKET:
                self._guest_seq_rw(conn, length, payload, flags)
                return
            # The hot path: credit effects are settled once per batch in flush_host, or now
            # for bytes counted ahead, so the update reaches the guest before our copy.
            self._guest_rw(conn, length, payload)
            if conn.flags & Connection.WAIT_CREDIT or cr.ahead:
                self._credit_changed(conn)
            return
        if op == Op.CREDIT_UPDATE:
            self._guest_credit_update(conn)
        elif op == Op.CREDIT_REQUEST:
            self._queue_credit_update(conn)
        elif op == Op.SHUTDOWN:
            self._guest_shutdown(conn, flags & H.SHUTDOWN_BOTH)
        elif op == Op.RST:
            self._forget(conn, reset_peer=not (conn.guest_shut & H.SHUTDOWN_SEND and conn.host_eof))
        elif op == Op.RESPONSE:
            if conn.state is State.REQUESTED:
                conn.state = State.ESTABLISHED
                self.pending -= 1
                conn.peer.established(conn.peer_port)
                conn.peer.watch_read(True)
            else:
                c.drop("unexpected-response")
                self._reset(conn, "unexpected RESPONSE")
        elif op == Op.REQUEST:
            c.drop("duplicate-request")
        else:
            c.drop("bad-op")
            self._reset(conn, f"unknown op {op}")
            return
        self._credit_changed(conn)

    def guest_rw_run(
        self,
        src_port: int,
        dst_cid: int,
        dst_port: int,
        buf_alloc: int,
        fwd_cnt: int,
        total: int,
        segments: Sequence[memoryview],
        npackets: int,
        captured: bool = False,
    ) -> bool:
        """Consecutive RW packets of one stream, already checked by the C fast path (source CID,
        type, lengths), and ``captured`` by it when capturing. Same effect as guest_packet for
        each; False if there is no such connection or its packets need a capture comment
        (which C cannot write), and the caller then feeds the packets one by one."""
        conn = self.conns.get((H.Type.STREAM, src_port, dst_cid, dst_port))
        if conn is None or (captured and conn.mark is not None):
            return False
        if conn.own >= 0:
            self._reclaim(conn)
        self.counters.tx_packets += npackets
        cr = conn.credit
        cr.peer_buf_alloc = buf_alloc
        cr.peer_fwd_cnt = fwd_cnt
        conn.stats[0] += npackets - 1  # _guest_rw counts the run once
        self._guest_rw(conn, total, segments)
        if conn.flags & Connection.WAIT_CREDIT or cr.ahead:
            self._credit_changed(conn)
        return True

    def guest_rw_tail(self, src_port: int, dst_cid: int, dst_port: int, total: int,
                      segments: Sequence[memoryview]) -> None:
        """What a host socket did not take of a run C sent (fastpath.Tail): C received and
        counted it, and gave the connection back (OWN_BLOCKED) with these bytes counted ahead;
        they are queued for the peer like the rest of an unsent run."""
        conn = self.conns.get((H.Type.STREAM, src_port, dst_cid, dst_port))
        if conn is None or conn.state is not State.ESTABLISHED:
            return  # reset meanwhile: the data goes with the connection
        conn.outq.extend(segments)
        conn.out_bytes += total
        if not conn.flags & Connection.IN_FLUSH:
            conn.flags |= Connection.IN_FLUSH
            self._flush.append(conn)

    def guest_credit(
        self,
        type_: int,
        op: int,
        src_port: int,
        dst_cid: int,
        dst_port: int,
        buf_alloc: int,
        fwd_cnt: int,
        captured: bool = False,
    ) -> bool:
        """A header-only CREDIT_UPDATE or CREDIT_REQUEST the C path checked (source CID, len 0),
        with the same effect as guest_packet; False when guest_packet must take it (no such
        connection, a type this device does not serve, a capture comment C cannot write)."""
        if type_ != H.Type.STREAM and not (self.seqpacket and type_ == H.Type.SEQPACKET):
            return False
        conn = self.conns.get((type_, src_port, dst_cid, dst_port))
        if conn is None or (captured and conn.mark is not None):
            return False
        if conn.own >= 0:
            self._reclaim(conn)
        self.counters.tx_packets += 1
        cr = conn.credit
        cr.peer_buf_alloc = buf_alloc
        cr.peer_fwd_cnt = fwd_cnt
        if op == Op.CREDIT_REQUEST:
            self._queue_credit_update(conn)
        else:
            self._guest_credit_update(conn)
        self._credit_changed(conn)
        return True

    def at_limit(self) -> str | None:
        """Why a new connection must be refused now, or None."""
        if len(self.conns) + len(self._lingering) >= self.max_connections:
            return f"max-connections ({self.max_connections})"
        if self.pending >= self.max_pending:
            return f"max-pending ({self.max_pending})"
        return None

    def _refuse_at_limit(self, why: str, what: str) -> None:
        c = self.counters
        c.connections_refused += 1
        c.limit_refused += 1
        c.drop("too-many-pending" if why.startswith("max-pending") else "too-many-connections")
        ratelog(log, logging.WARNING, f"{self.name}: connection limit",
                "%s: %s refused: the device is at its %s", self.name, what, why)

    def _guest_request(self, hdr: Header) -> None:
        c = self.counters
        why = self.at_limit()
        if why is not None:
            self._refuse_at_limit(why, f"{hdr.src_cid}:{hdr.src_port} -> {hdr.dst_cid}:{hdr.dst_port}")
            if self.taps.active:
                self._tap(False, hdr.pack(), (), f"refused: the device is at its {why}; vsproxy answers RST")
            self._rst_reply(hdr)
            return
        conn = Connection(hdr.type, hdr.src_port, hdr.dst_cid, hdr.dst_port, _NO_PEER, self.buf_alloc)
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        peer = self.connector(conn)
        if self.taps.active:
            self._tap(False, hdr.pack(), (), conn.mark)
        if peer is None:
            c.connections_refused += 1
            ratelog(log, logging.INFO, f"{self.name}: refused", "%s: refused %s:%d -> %d:%d: no endpoint",
                    self.name, hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port)
            self._rst_reply(hdr)
            return
        conn.peer = peer
        conn.deadline = self.now + CONNECT_TIMEOUT
        self.conns[conn.key] = conn
        self.pending += 1

    def _rw_admitted(self, conn: Connection, n: int) -> bool:
        """What every RW of ``n`` payload bytes passes first, STREAM or SEQPACKET; counted."""
        if conn.state is not State.ESTABLISHED or conn.guest_shut & H.SHUTDOWN_SEND:
            self.counters.drop("rw-not-established")
            self._reset(conn, "data on a connection that is not open for it")
            return False
        if not conn.credit.receive(n):
            # The guest ignored the credit we advertised: RST, never unbounded buffering.
            self.counters.credit_violations += 1
            self._reset(conn, "guest exceeded advertised credit")
            return False
        return True

    def _guest_rw(self, conn: Connection, n: int, payload: Sequence[memoryview]) -> None:
        if not self._rw_admitted(conn, n) or n == 0:
            return
        cr = conn.credit
        queued = conn.out_bytes
        if queued == cr.ahead and (queued == 0 or conn.flags & Connection.IN_FLUSH):
            # Nothing of an earlier pass is waiting for the peer, so these bytes go to it
            # before this pass ends: count them forwarded already (Credit.forward_ahead).
            # Data the peer then refuses stays queued and stops this until it drains, so the
            # queue never holds more than one window beyond buf_alloc.
            cr.forward_ahead(n)
        self.counters.tx_bytes += n
        st = conn.stats
        st[0] += 1
        st[1] += n
        outq = conn.outq
        first = payload[0]
        if len(first) >= n:
            # One payload buffer (the Linux layout): no loop.
            outq.append(first if len(first) == n else first[:n])
        else:
            left = n
            for seg in payload:
                if len(seg) >= left:
                    outq.append(seg[:left] if len(seg) > left else seg)
                    break
                outq.append(seg)
                left -= len(seg)
        conn.out_bytes += n
        if not conn.flags & Connection.IN_FLUSH:
            conn.flags |= Connection.IN_FLUSH
            self._flush.append(conn)

    def _guest_seq_rw(self, conn: Connection, n: int, payload: Sequence[memoryview], flags: int) -> None:
        """SEQPACKET data: fragments are assembled (bounded by the credit we gave) and each
        whole message goes to the peer as one message, EOR kept where the peer can carry it."""
        if not self._rw_admitted(conn, n):
            return
        self.counters.tx_bytes += n
        conn.stats[0] += 1
        conn.stats[1] += n
        left = n
        for seg in payload:
            if left <= 0:
                break
            conn.msg_buf += seg[:left]
            left -= len(seg)
        conn.out_bytes += n
        if flags & H.SEQ_EOM:
            conn.outq.append(bytes(conn.msg_buf))
            conn.msg_flags.append(flags & (H.SEQ_EOM | H.SEQ_EOR))
            conn.msg_buf.clear()
            if not conn.flags & Connection.IN_FLUSH:
                conn.flags |= Connection.IN_FLUSH
                self._flush.append(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.guest_shut |= flags
        if conn.guest_shut == H.SHUTDOWN_BOTH:
            # Linux close(): SHUTDOWN 3, answered with RST; the connection is gone for the guest.
            self._queue(conn, Op.RST)
            self._forget_vsock(conn)
            if conn.out_bytes:
                # Hand the host what the guest sent before closing; bounded by buf_alloc and a timeout.
                conn.deadline = self.now + SHUTDOWN_TIMEOUT
                self._lingering.add(conn)
                conn.peer.watch_read(False)
                self._flush_conn(conn)
            else:
                conn.peer.close(reset=False)
            return
        if flags & H.SHUTDOWN_SEND:
            self._flush_conn(conn)  # shuts the host write side once the queue is empty
        if flags & H.SHUTDOWN_RCV:
            conn.peer.watch_read(False)

    # ------------------------------------------------------------------
    # device -> host peers
    def flush_host(self) -> None:
        """Hand queued guest data to the peers. Must run before tx chains go back to the guest:
        afterwards nothing may point into their buffers."""
        pending = self._flush
        self._flush = []
        for conn in pending:
            conn.flags &= ~Connection.IN_FLUSH
            if conn.state is not State.CLOSED or conn in self._lingering:
                self._flush_conn(conn)
            self._own_outq(conn)
            if conn.own < 0 and self.owner is not None and not conn.out_bytes:
                self._lend_sender(conn)

    def _own_outq(self, conn: Connection) -> None:
        # Copy what is left out of guest memory: the chain is about to be returned.
        outq = conn.outq
        for i in range(len(outq)):
            b = outq[i]
            if isinstance(b, memoryview):
                outq[i] = bytes(b)

    def _flush_conn(self, conn: Connection) -> None:
        outq = conn.outq
        total = 0
        try:
            while outq and conn.type == H.Type.SEQPACKET:
                msg = outq[0]
                if not conn.peer.send_message(msg, bool(conn.msg_flags[0] & H.SEQ_EOR)):  # type: ignore[attr-defined]
                    break
                outq.popleft()
                conn.msg_flags.popleft()
                total += len(msg)
            while outq and conn.type != H.Type.SEQPACKET:
                whole = len(outq) <= SENDMSG_MAX_IOV
                bufs = list(outq) if whole else [outq[i] for i in range(SENDMSG_MAX_IOV)]
                left = conn.out_bytes - total  # what outq holds
                sent = conn.peer.send(bufs)
                if sent <= 0:
                    break
                total += sent
                if whole and sent == left:
                    outq.clear()  # the peer took it all: the common case, no walk
                    break
                while sent:
                    b = outq[0]
                    if len(b) <= sent:
                        sent -= len(b)
                        outq.popleft()
                    else:
                        outq[0] = b[sent:]
                        sent = 0
        except OSError as e:
            conn.out_bytes -= total
            self._peer_error(conn, e)
            return
        conn.out_bytes -= total
        if total:
            conn.credit.forwarded(total)
        if outq:
            if not conn.flags & Connection.WATCH_WRITE:
                conn.flags |= Connection.WATCH_WRITE
                conn.peer.watch_write(True)
            return
        if conn.flags & Connection.WATCH_WRITE:
            conn.flags &= ~Connection.WATCH_WRITE
            conn.peer.watch_write(False)
        if conn in self._lingering:
            self._lingering.discard(conn)
            conn.peer.close(reset=False)
            return
        if conn.guest_shut & H.SHUTDOWN_SEND and not conn.host_shut_wr:
            conn.host_shut_wr = True
            conn.peer.shutdown_write()
            if conn.host_eof:
                # Both directions are finished; the vsock side waits for the guest's close.
                conn.peer.close(reset=False)
        self._credit_changed(conn)

    def _credit_changed(self, conn: Connection) -> None:
        if conn.state is State.CLOSED:
            return
        if conn.credit.update_due():
            self._queue_credit_update(conn)
        if conn.flags & Connection.WAIT_CREDIT and conn.credit.peer_free() > 0:
            conn.flags &= ~(Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED)
            self._make_ready(conn)

    def _request_credit(self, conn: Connection) -> None:
        conn.flags |= Connection.CREDIT_REQUESTED
        self._queue(conn, Op.CREDIT_REQUEST)

    def _guest_credit_update(self, conn: Connection) -> None:
        if not conn.flags & Connection.CREDIT_REQUESTED:
            conn.flags |= Connection.SELF_UPDATES

    def _queue_credit_update(self, conn: Connection) -> None:
        if not conn.flags & Connection.UPDATE_QUEUED:
            conn.flags |= Connection.UPDATE_QUEUED
            self._queue(conn, Op.CREDIT_UPDATE)

    # ------------------------------------------------------------------
    # events from the I/O shell
    def peer_readable(self, conn: Connection) -> bool:
        """The host socket has data (or EOF). False when C served it: nothing for the pump."""
        if conn.own >= 0 and self.owner is not None:
            # C runs it and waited for this socket (owned_waiting): C reads it, without Python
            got = self.owner.fill(conn.own)
            self.counters.pump_reads += 1
            if got is True:
                return False
            if got is False:  # the guest's window shut again: C waits for its credit update
                conn.peer.watch_read(False)
                return False
            self.owned_back(conn, got)
        self._make_ready(conn)
        return True

    def peer_writable(self, conn: Connection) -> None:
        if conn.own >= 0:
            self._reclaim(conn)
        self._flush_conn(conn)

    def peer_connected(self, conn: Connection) -> None:
        if conn.state is not State.CONNECTING:
            return
        conn.state = State.ESTABLISHED
        self.pending -= 1
        self.counters.connections_opened += 1
        self._queue(conn, Op.RESPONSE)
        conn.peer.watch_read(True)

    def peer_failed(self, conn: Connection, reason: str) -> None:
        if conn.state is State.CLOSED:
            return
        self.counters.connections_refused += 1
        ratelog(log, logging.INFO, f"{self.name}: host side failed", "%s: host side of %s failed: %s", self.name,
                conn.describe(), reason)
        self._reset(conn, reason)

    def _peer_error(self, conn: Connection, e: OSError) -> None:
        if conn in self._lingering:
            self._lingering.discard(conn)
            conn.peer.close(reset=True)
            return
        ratelog(log, logging.INFO, f"{self.name}: host side error", "%s: host side of %s: %s", self.name,
                conn.describe(), e.strerror or e)
        self._reset(conn, "host peer error")

    def host_connect(
        self,
        peer: Peer,
        guest_port: int,
        type_: int = H.Type.STREAM,
        src_cid: int = H.VMADDR_CID_HOST,
        src_port: int | None = None,
        buf_alloc: int | None = None,
    ) -> Connection | None:
        """Something outside the guest asks for a connection into it: a host program (hybrid
        CONNECT, TCP listener) or a sibling. ``src_cid``/``src_port`` are what the guest sees."""
        why = self.at_limit()
        if why is not None:
            self._refuse_at_limit(why, f"host connection into port {guest_port}")
            return None
        if src_port is not None:
            port = src_port
            if (type_, guest_port, src_cid, port) in self.conns:
                return None
        else:
            for _ in range(1 << 16):
                port = self._next_host_port
                self._next_host_port = port + 1 if port < H.U32 - 1 else HOST_PORT_FIRST
                if (type_, guest_port, src_cid, port) not in self.conns:
                    break
            else:
                return None
        conn = Connection(type_, guest_port, src_cid, port, peer, buf_alloc or self.buf_alloc)
        conn.state = State.REQUESTED
        conn.host_initiated = True
        conn.deadline = self.now + CONNECT_TIMEOUT
        self.conns[conn.key] = conn
        self.pending += 1
        self._queue(conn, Op.REQUEST)
        return conn

    def host_abort(self, conn: Connection) -> None:
        """The host side went away before or during the connection (e.g. hybrid client hung up)."""
        if conn.state is not State.CLOSED:
            self._reset(conn, "host side closed")

    def abandon(self, conn: Connection) -> None:
        """The last resort after an unexpected error while handling ``conn``: RST to the guest
        if it still has the connection, a reset for the host side either way."""
        self.counters.faults += 1
        if conn.state is not State.CLOSED:
            self._reset(conn, "internal error")
        else:
            self._lingering.discard(conn)
            conn.outq.clear()
            conn.out_bytes = 0
            conn.peer.close(reset=True)

    def tick(self, now: float) -> None:
        """Expire connect and linger deadlines; ask for credit a window shut too long."""
        self.now = now
        wait = Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED
        for conn in list(self.conns.values()):
            if conn.state in (State.CONNECTING, State.REQUESTED) and conn.deadline <= now:
                self.counters.timeouts += 1
                ratelog(log, logging.INFO, f"{self.name}: connect timeout", "%s: connect timed out: %s", self.name,
                        conn.describe())
                self._reset(conn, "connect timeout")
            elif conn.own >= 0 and self.owner is not None:
                # Python's flags are C's to change while it runs the connection
                seen = self.owner.progress(conn.own)
                if seen != conn.own_seen or not self.owner.shut(conn.own):
                    conn.own_seen = seen  # C took credit updates meanwhile, or the window is open
                    conn.credit_wait = now
                elif now - conn.credit_wait >= CREDIT_REQUEST_DELAY:
                    self._reclaim(conn)  # shut all along: Python asks, if the guest must be asked
                    if conn.flags & wait == Connection.WAIT_CREDIT:
                        self._request_credit(conn)
            elif conn.flags & Connection.WAIT_CREDIT and now - conn.credit_wait >= CREDIT_REQUEST_DELAY:
                if conn.flags & wait == Connection.WAIT_CREDIT:
                    self._request_credit(conn)
        for conn in list(self._lingering):
            if conn.deadline <= now:
                self.counters.timeouts += 1
                self._lingering.discard(conn)
                conn.peer.close(reset=True)

    def next_deadline(self) -> float | None:
        ds = [c.deadline for c in self.conns.values() if c.state in (State.CONNECTING, State.REQUESTED)]
        ds += [c.deadline for c in self._lingering]
        return min(ds) if ds else None

    def close_all(self) -> None:
        """The front-end is gone: every host peer of an open connection sees a reset, not a
        clean EOF. Connections the guest already closed cleanly keep flushing what it sent
        (the guest was given credit for it) until done or their linger deadline."""
        for conn in list(self.conns.values()):
            if conn.own >= 0:
                self._reclaim(conn, act=False)
            conn.state = State.CLOSED
            self._account(conn)
            self._lingering.discard(conn)
            conn.outq.clear()
            conn.out_bytes = 0
            conn.peer.close(reset=True)
        self.conns.clear()
        self.pending = 0
        self.control.clear()
        self.ready.clear()
        self._flush = []

    def lingering(self) -> int:
        return len(self._lingering)

    def drop_lingering(self) -> None:
        """vsproxy itself is exiting: no more waiting for slow host readers."""
        for conn in list(self._lingering):
            conn.peer.close(reset=True)
        self._lingering.clear()

    # ------------------------------------------------------------------
    # device -> guest
    def _queue(self, conn: Connection, op: int, flags: int = 0) -> None:
        self.control.append((conn, op, flags, b""))

    def _rst_reply(self, hdr: Header) -> None:
        self.counters.rst_sent += 1
        raw = H.pack(hdr.dst_cid, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, Op.RST, 0, 0, 0)
        self.control.append((None, Op.RST, 0, raw))

    def _make_ready(self, conn: Connection, front: bool = False) -> None:
        if not conn.flags & Connection.IN_READY:
            conn.flags |= Connection.IN_READY
            if front:
                self.ready.appendleft(conn)
            else:
                self.ready.append(conn)

    def _reset(self, conn: Connection, reason: str) -> None:
        """RST to the guest and a reset of the host side."""
        log.debug("%s: reset %s: %s", self.name, conn.describe(), reason)
        self.counters.rst_sent += 1
        self._queue(conn, Op.RST)
        self._forget(conn, reset_peer=True)

    def _forget_vsock(self, conn: Connection) -> None:
        if conn.own >= 0:
            self._reclaim(conn, act=False)
        if conn.state is State.CONNECTING or conn.state is State.REQUESTED:
            self.pending -= 1
        conn.state = State.CLOSED
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
            self._account(conn)

    def _account(self, conn: Connection) -> None:
        for rule in conn.rule:
            totals = self.rule_totals.setdefault(rule, [0, 0, 0, 0])
            for i, v in enumerate(conn.stats):
                totals[i] += v

    def live_rule_stats(self) -> dict[str, list[int]]:
        """Traffic per routing rule of the connections still open (closed ones are in rule_totals)."""
        self.sync_owned()
        out: dict[str, list[int]] = {}
        for conn in self.conns.values():
            for rule in conn.rule:
                totals = out.setdefault(rule, [0, 0, 0, 0])
                for i, v in enumerate(conn.stats):
                    totals[i] += v
        return out

    def _forget(self, conn: Connection, reset_peer: bool) -> None:
        self._forget_vsock(conn)
        self._lingering.discard(conn)
        conn.outq.clear()
        conn.out_bytes = 0
        conn.peer.close(reset=reset_peer)

    def _fields(self, conn: Connection, op: int, flags: int, length: int) -> tuple[int, ...]:
        """The header of a packet to the guest on ``conn``, as HDR fields."""
        cr = conn.credit
        return (conn.peer_cid, self.guest_cid, conn.peer_port, conn.guest_port, length, conn.type, op, flags,
                cr.buf_alloc, cr.fwd_cnt)

    def _header(self, conn: Connection, op: int, flags: int, length: int) -> bytes:
        """Packed header; the guest will see our fwd_cnt in it."""
        conn.credit.adv_fwd_cnt = conn.credit.fwd_cnt
        return HDR.pack(*self._fields(conn, op, flags, length))

    def fill_rx(self, rxq: RxQueue) -> int:
        """Fill posted rx buffers: control packets first, then host data round-robin.
        Returns the number of chains used.

        A ready connection keeps its read interest while it is served; it is switched off
        only while the connection cannot be served (no rx buffers, no guest credit), so a
        guest that posts nothing pauses host reads without a busy loop."""
        used = 0
        control = self.control
        ready = self.ready
        c = self.counters
        taps = self.taps.active
        rx_fast = self.rx_fast if not self.taps.per_packet else None
        rx_put = self.rx_put if rx_fast is not None else None
        while control or ready:
            if not control:
                conn = ready.popleft()
                conn.flags &= ~Connection.IN_READY
                if conn.state is not State.ESTABLISHED or conn.guest_shut & H.SHUTDOWN_RCV or conn.host_eof:
                    continue
                credit = conn.credit.peer_free()
                if credit == 0:
                    if not conn.flags & Connection.WAIT_CREDIT:
                        conn.flags |= Connection.WAIT_CREDIT
                        conn.credit_wait = self.now
                    conn.peer.watch_read(False)
                    if not conn.flags & (Connection.CREDIT_REQUESTED | Connection.SELF_UPDATES):
                        # A guest that has not shown it sends updates unasked is asked at once;
                        # one that has (Linux: when its free space falls below 64 KiB) is asked
                        # only if its window stays shut (tick), not once a window.
                        self._request_credit(conn)
                    if self.owner is not None and conn.own < 0:
                        self._lend(conn)
                    continue
                if rx_fast is not None and conn.type == H.Type.STREAM and (conn.mark is None or not taps):
                    fd = getattr(conn.peer, "fast_fd", _no_fd)()
                    if fd >= 0:
                        done, more = self._rx_fast(rx_fast, conn, fd, credit)
                        used += done
                        if more is None:
                            continue
                        if not more:
                            # no rx buffers of any shape: wait for the guest to post some
                            self._make_ready(conn, front=True)
                            for r in ready:
                                r.peer.watch_read(False)
                            break
                chain = rxq.pop()
                if chain is None:
                    self._make_ready(conn, front=True)
                    for r in ready:
                        r.peer.watch_read(False)
                    break
                used += 1
                if chain.write_len < HDR_SIZE:
                    # Cannot hold even a header: give it back empty, count it, try the next.
                    c.short_rx_buffers += 1
                    rxq.push(chain.head, 0)
                    self._make_ready(conn, front=True)
                    continue
                rx_one = self._rx_seq_chain if conn.type == H.Type.SEQPACKET else self._rx_chain
                if not rx_one(rxq, chain, conn, credit):
                    used -= 1
                continue
            conn_or_none, op, flags, raw = control[0]
            if conn_or_none is not None and conn_or_none.state is State.CLOSED and op != Op.RST:
                control.popleft()  # nothing more goes out for a closed connection
                if op == Op.CREDIT_UPDATE:
                    conn_or_none.flags &= ~Connection.UPDATE_QUEUED
                continue
            data = raw if conn_or_none is None else HDR.pack(*self._fields(conn_or_none, op, flags, 0))
            # C writes it, and its capture record, into a Linux-shaped chain; else the walker.
            if rx_put is None or not rx_put(data):
                chain = rxq.pop()
                if chain is None:
                    for r in ready:
                        r.peer.watch_read(False)
                    break
                if chain.write_len < HDR_SIZE:
                    c.short_rx_buffers += 1
                    rxq.push(chain.head, 0)
                    used += 1
                    continue
                _scatter(chain.writable, data)
                if taps:
                    self._tap(True, data, ())
                rxq.push(chain.head, HDR_SIZE)
            control.popleft()
            if conn_or_none is not None:
                if op == Op.CREDIT_UPDATE:
                    conn_or_none.flags &= ~Connection.UPDATE_QUEUED
                conn_or_none.credit.adv_fwd_cnt = conn_or_none.credit.fwd_cnt  # the guest sees it now
            c.rx_packets += 1
            used += 1
        return used

    # ------------------------------------------------------------------
    # the C pump: connections it runs between Python's turns
    def _lend(self, conn: Connection) -> None:
        """Let C take this connection's next CREDIT_UPDATEs and refill the rx ring from its host
        socket without coming back here, for as long as nothing else happens on it; and, while
        both directions are open, send the guest's data to the host socket and the credit
        updates that makes due (OWN_F_TX). Only a plain stream qualifies: nothing queued for
        the peer, no control packet of its own queued, nothing captured (C writes no capture
        records for it)."""
        assert self.owner is not None
        cr = conn.credit
        if conn.type != H.Type.STREAM or self.taps.active or conn.out_bytes or conn.flags & Connection.UPDATE_QUEUED:
            return
        tx: tuple[int, int, int, int] | None = None
        if conn.state is State.ESTABLISHED and not conn.guest_shut and not conn.host_shut_wr and not cr.ahead:
            tx = (cr.buf_alloc, cr.rx_cnt, cr.fwd_cnt, cr.adv_fwd_cnt)
        elif cr.fwd_cnt != cr.adv_fwd_cnt:
            return  # an update may be due, and C would not send it
        fd = getattr(conn.peer, "fast_fd", _no_fd)()
        if fd < 0:
            return
        flags = (fastpath.OWN_F_REQUESTED if conn.flags & Connection.CREDIT_REQUESTED else 0) | (
            fastpath.OWN_F_SELF if conn.flags & Connection.SELF_UPDATES else 0)
        if not conn.flags & Connection.WAIT_CREDIT:
            flags |= fastpath.OWN_F_WAIT  # the guest's window is open: C waits for the host socket
        hdr = HDR.pack(*self._fields(conn, Op.RW, 0, 0))
        conn.own = self.owner.own(conn, conn.key, fd, cr.tx_cnt, cr.peer_buf_alloc, cr.peer_fwd_cnt, hdr, flags, tx)
        if conn.own >= 0:
            self.owned += 1
            conn.own_seen = 0
            if flags & fastpath.OWN_F_WAIT:
                conn.peer.watch_read(True)  # Python watches the socket for C (peer_readable)

    def _lend_sender(self, conn: Connection) -> None:
        """After a flush that left nothing queued for the peer: a connection with nothing else
        going on (its guest window open, not waiting for rx buffers, its host socket watched)
        goes to C, which then sends the guest's next data itself, with no turn through here."""
        if (conn.state is State.ESTABLISHED and not conn.host_eof
                and not conn.flags & (Connection.IN_READY | Connection.WAIT_CREDIT | Connection.WATCH_WRITE)):
            self._lend(conn)

    def _reclaim(self, conn: Connection, act: bool = True) -> fastpath.OwnedBack:
        """Python needs the connection: take it back from C first. Returns what C gave back."""
        assert self.owner is not None
        back = self.owner.take_back(conn.own)
        self.owned_back(conn, back, act)
        return back

    def owned_back(self, conn: Connection, back: fastpath.OwnedBack, act: bool = True) -> None:
        """C gave the connection back (or Python took it): its credit state and counts become
        Python's again, and what made C stop is dealt with as the Python path would."""
        conn.own = -1
        self.owned -= 1
        cr = conn.credit
        cr.tx_cnt, cr.peer_buf_alloc, cr.peer_fwd_cnt = back.tx_cnt, back.peer_buf_alloc, back.peer_fwd_cnt
        flags = conn.flags & ~(Connection.CREDIT_REQUESTED | Connection.SELF_UPDATES)
        if back.flags & fastpath.OWN_F_REQUESTED:
            flags |= Connection.CREDIT_REQUESTED
        if back.flags & fastpath.OWN_F_SELF:
            flags |= Connection.SELF_UPDATES
        conn.flags = flags
        if back.flags & fastpath.OWN_F_TX:
            cr.rx_cnt, cr.fwd_cnt, cr.adv_fwd_cnt, cr.ahead = back.rx_cnt, back.fwd_cnt, back.adv_fwd_cnt, back.ahead
        elif back.counts.packets:
            cr.adv_fwd_cnt = cr.fwd_cnt  # what C's headers carried
        self._fold(conn, back.counts)
        if back.prebuf:
            # what C read ahead goes to the guest first: fast_fd is -1 until the Python path sent it
            conn.peer.prebuf = back.prebuf + conn.peer.prebuf  # type: ignore[attr-defined]
        if not act or conn.state is not State.ESTABLISHED:
            return
        why = back.why
        if why == fastpath.OWN_BLOCKED:
            self.counters.pump_blocked += 1
        if why == fastpath.OWN_EOF:
            conn.flags &= ~(Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED)
            self._host_eof(conn)
        elif why == fastpath.OWN_ERROR:
            self._peer_error(conn, OSError(back.err, os.strerror(back.err)))
        else:
            # Python's WAIT_CREDIT is from when C took the connection; the guest's window may have
            # opened or shut since. The pump finds out: it serves the connection, or finds the
            # window shut and waits (asking if it must) and lends it again.
            if cr.peer_free():
                conn.flags &= ~(Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED)
            elif not conn.flags & Connection.WAIT_CREDIT:
                conn.flags |= Connection.WAIT_CREDIT
                conn.credit_wait = self.now
            self._credit_changed(conn)
            self._make_ready(conn)

    def owned_waiting(self, conn: Connection) -> None:
        """C keeps the connection with credit left and its host socket dry: Python watches the
        socket for C (peer_readable)."""
        conn.peer.watch_read(True)

    def _fold(self, conn: Connection, n: fastpath.OwnedCounts) -> None:
        c = self.counters
        c.tx_packets += n.credit_items + n.tx_packets
        c.tx_bytes += n.tx_bytes
        c.pump_updates += n.credit_items
        c.pump_sends += n.sends
        c.pump_read_ahead += n.read_ahead
        c.rx_packets += n.packets + n.updates_sent
        c.rx_bytes += n.bytes
        st = conn.stats
        st[0] += n.tx_packets
        st[1] += n.tx_bytes
        st[2] += n.packets
        st[3] += n.bytes

    def sync_owned(self) -> None:
        """Fold what C did for the connections it still runs into the counters."""
        if self.owned and self.owner is not None:
            for conn in self.conns.values():
                if conn.own >= 0:
                    self._fold(conn, self.owner.counts(conn.own))

    def detach_owner(self) -> None:
        """The C pump goes away (a ring stops): every connection it runs comes back."""
        if self.owner is not None and self.owned:
            held = 0
            for conn in list(self.conns.values()):
                if conn.own >= 0:
                    held += len(self._reclaim(conn).prebuf)
            if held:
                log.info("C pump detached: %d bytes it had read ahead go to the guest from Python", held)
        self.owner = None

    def _rx_fast(self, rx_fast: RxFastFill, conn: Connection, fd: int, credit: int) -> tuple[int, bool | None]:
        """Serve ``conn`` through the C path. Returns (chains used, more): more is None when
        the connection was fully dealt with, True when the Python path should take the next
        chain (an unusual shape), False when the ring has no buffers at all."""
        cr = conn.credit
        hdr = HDR.pack(*self._fields(conn, Op.RW, 0, 0))  # C patches len per packet
        r = rx_fast(fd, min(credit, RX_FAST_BURST_BYTES), RX_FAST_BURST, hdr)
        if r.packets and self.rx_progress is not None:
            # The guest may start on these while we read the next burst.
            self.rx_progress()
        if r.packets:
            cr.tx_cnt = (cr.tx_cnt + r.bytes) & U32
            cr.adv_fwd_cnt = cr.fwd_cnt
            self.counters.rx_packets += r.packets
            self.counters.rx_bytes += r.bytes
            conn.stats[2] += r.packets
            conn.stats[3] += r.bytes
        status = r.status
        if status == fastpath.RX_LIMIT:
            self._make_ready(conn)  # credit or burst used up: back of the line
        elif status in (fastpath.RX_SHORT, fastpath.RX_AGAIN):
            conn.peer.watch_read(True)
        elif status == fastpath.RX_EOF:
            self._host_eof(conn)
        elif status == fastpath.RX_ERROR:
            self._peer_error(conn, OSError(r.err, os.strerror(r.err)))
        else:  # RX_SLOW: the next chain is not the Linux shape, or there is none
            if r.packets:
                self._make_ready(conn, front=True)
                return r.packets, None
            return 0, self.rx_pending() > 0
        return r.packets, None

    def _rx_chain(self, rxq: RxQueue, chain: _RxChain, conn: Connection, credit: int) -> bool:
        """One host read into one rx chain (the Python path). False if the chain went unused."""
        writable = chain.writable
        first = writable[0]
        room = chain.write_len - HDR_SIZE
        want = credit if credit < room else room
        if want > H.MAX_PKT_PAYLOAD:
            want = H.MAX_PKT_PAYLOAD
        if len(first) >= HDR_SIZE + want:
            bufs = [first[HDR_SIZE : HDR_SIZE + want]]
        else:
            bufs = _payload_views(writable, want)
        try:
            n = conn.peer.recv_into(bufs)
        except OSError as e:
            rxq.unpop()
            self._peer_error(conn, e)
            return False
        if n is None:
            rxq.unpop()
            conn.peer.watch_read(True)
            return False
        if n == 0:
            rxq.unpop()
            self._host_eof(conn)
            return False
        cr = conn.credit
        cr.tx_cnt = (cr.tx_cnt + n) & U32
        cr.adv_fwd_cnt = cr.fwd_cnt
        if len(first) >= HDR_SIZE:
            HDR.pack_into(first, 0, *self._fields(conn, Op.RW, 0, n))
            if self.taps.active:
                self._tap(True, bytes(first[:HDR_SIZE]), bufs, conn.mark)
        else:
            data = self._header(conn, Op.RW, 0, n)
            _scatter(writable, data)
            if self.taps.active:
                self._tap(True, data, bufs, conn.mark)
        rxq.push(chain.head, HDR_SIZE + n)
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n
        conn.stats[2] += 1
        conn.stats[3] += n
        if n == want:
            self._make_ready(conn)  # more may be waiting: back of the line, for fairness
        else:
            conn.peer.watch_read(True)
        return True

    def _rx_seq_chain(self, rxq: RxQueue, chain: _RxChain, conn: Connection, credit: int) -> bool:
        """SEQPACKET to the guest: one host message at a time, in fragments sized to the rx
        buffers and the credit, EOM (and EOR) on the last one only."""
        if conn.rx_msg is None:
            limit = conn.credit.peer_buf_alloc
            try:
                got = conn.peer.recv_message(limit)  # type: ignore[attr-defined]
            except OSError as e:
                rxq.unpop()
                self._peer_error(conn, e)
                return False
            if got is None:
                rxq.unpop()
                conn.peer.watch_read(True)
                return False
            data, eor = got
            if not data:
                rxq.unpop()
                self._host_eof(conn)
                return False
            if len(data) > limit:
                # The guest could never take it whole (Linux: EMSGSIZE): the stream of messages is broken.
                rxq.unpop()
                self.counters.drop("message-too-large")
                self._reset(conn, f"host message of {len(data)} bytes exceeds the guest's buf_alloc {limit}")
                return False
            conn.rx_msg, conn.rx_msg_off, conn.rx_msg_eor = data, 0, eor
        msg = conn.rx_msg
        off = conn.rx_msg_off
        n = min(len(msg) - off, chain.write_len - HDR_SIZE, credit, H.MAX_PKT_PAYLOAD)
        last = off + n == len(msg)
        flags = (H.SEQ_EOM | (H.SEQ_EOR if conn.rx_msg_eor else 0)) if last else 0
        cr = conn.credit
        cr.tx_cnt = (cr.tx_cnt + n) & U32
        data_hdr = self._header(conn, Op.RW, flags, n)
        _scatter(chain.writable, data_hdr + msg[off : off + n])
        if self.taps.active:
            self._tap(True, data_hdr, [memoryview(msg)[off : off + n]], conn.mark)
        rxq.push(chain.head, HDR_SIZE + n)
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n
        conn.stats[2] += 1
        conn.stats[3] += n
        if last:
            conn.rx_msg = None
        else:
            conn.rx_msg_off = off + n
        self._make_ready(conn)  # the rest of this message, or the next one
        return True

    def _host_eof(self, conn: Connection) -> None:
        conn.host_eof = True
        conn.peer.watch_read(False)
        self._queue(conn, Op.SHUTDOWN, H.SHUTDOWN_SEND)
        if conn.host_shut_wr:
            conn.peer.close(reset=False)


def _scatter(segs: list[memoryview], data: bytes) -> None:
    first = segs[0]
    if len(first) >= len(data):
        first[: len(data)] = data
        return
    off = 0
    for seg in segs:
        k = min(len(seg), len(data) - off)
        seg[:k] = data[off : off + k]
        off += k
        if off == len(data):
            return


def _payload_views(segs: list[memoryview], want: int) -> list[memoryview]:
    """The writable bytes after the header, ``want`` of them, as views."""
    skip = HDR_SIZE
    out: list[memoryview] = []
    for seg in segs:
        if skip >= len(seg):
            skip -= len(seg)
            continue
        v = seg[skip:] if skip else seg
        skip = 0
        if len(v) >= want:
            out.append(v[:want])
            return out
        out.append(v)
        want -= len(v)
    return out


class _NoPeer:
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


_NO_PEER = _NoPeer()
