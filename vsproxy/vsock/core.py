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
``max_buffered`` bounds the guest data the device holds for host sides that do not read
(past it the connection holding the most is reset: ``buffer_resets``), and ``max_control``
the control packets waiting for rx buffers (past it the tx ring waits: ``control_full``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vsproxy.endpoints.base import Buffer, Peer
from vsproxy.events import EventKind
from vsproxy.limits import ratelog
from vsproxy.verdict import Mark, Verdict
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.header import HDR, HDR_SIZE, Header, Op
from vsproxy.vsock.lending import Lending
from vsproxy.vsock.rx import RX_FAST_BURST, RX_FAST_BURST_BYTES
from vsproxy.vsock.table import (
    CONNECT_TIMEOUT,
    DEFAULT_BUF_ALLOC,
    HOST_PORT_FIRST,
    MAX_CONNECTIONS,
    MAX_CONTROL_BACKLOG,
    NO_PEER,
    SHUTDOWN_TIMEOUT,
    Connector,
    Counters,
)

log = logging.getLogger("vsproxy.vsock")

__all__ = ["CONNECT_TIMEOUT", "CREDIT_REQUEST_DELAY", "DEFAULT_BUF_ALLOC", "MAX_CONNECTIONS", "MAX_CONTROL_BACKLOG",
           "RX_FAST_BURST", "RX_FAST_BURST_BYTES", "SHUTDOWN_TIMEOUT", "Connector", "Counters", "VsockCore"]

# How long a guest that sends credit updates unasked may keep its window shut before we ask.
CREDIT_REQUEST_DELAY = 0.05


class VsockCore(Lending):
    """One device's vsock connections: the guest's packets in, effects out (see the module
    docstring). The layers below it, each a module with one job: ``table`` (connections,
    states, control queue, limits), ``credit``, ``seqpacket``, ``tohost`` (guest data to the
    peers), ``rx`` (filling the guest's rx ring), ``lending`` (the C pump)."""

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
                          Mark.spoofed(src_cid, self.guest_cid))
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
        key = (type_, src_port, dst_cid, dst_port)
        if self._shut_keys and key in self._shut_keys:
            # The old connection on this tuple, closed both ways by the far side: until the
            # guest's RST answers our SHUTDOWN 3 or a REQUEST starts a new connection, what the
            # guest sent before it saw the SHUTDOWN is ignored, as a closing kernel socket does.
            # A guest that closes with SHUTDOWN instead of the RST Linux answers with is told
            # RST at once, as a kernel peer's close timeout would tell it later. A REQUEST, or
            # anything once a new connection from the far side holds the tuple (its RESPONSE),
            # is the new connection's.
            if op == Op.RST:
                del self._shut_keys[key]
                return
            if op != Op.REQUEST and key not in self.conns:
                if op == Op.SHUTDOWN:
                    del self._shut_keys[key]
                    self._rst_reply(H.unpack(hdr_bytes))
                else:
                    c.drop("after-close")
                return
            del self._shut_keys[key]
        conn = self.conns.get(key)
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
        cr.update_peer(buf_alloc, fwd_cnt)
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
            if self.events.active:
                self._event(EventKind.REFUSED if conn.state is State.REQUESTED else EventKind.RESET, conn,
                            "by the guest")
            self._forget(conn, reset_peer=not (conn.guest_shut & H.SHUTDOWN_SEND and conn.host_eof))
        elif op == Op.RESPONSE:
            if conn.state is State.REQUESTED:
                self._enter(conn, State.ESTABLISHED)
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
        cr.update_peer(buf_alloc, fwd_cnt)
        conn.stats[0] += npackets - 1  # _guest_rw counts the run once
        self._guest_rw(conn, total, segments)
        if conn.flags & Connection.WAIT_CREDIT or cr.ahead:
            self._credit_changed(conn)
        return True

    def guest_seq_run(
        self,
        src_port: int,
        dst_cid: int,
        dst_port: int,
        buf_alloc: int,
        fwd_cnt: int,
        segments: Sequence[memoryview],
        flags: Sequence[int],
        captured: bool = False,
    ) -> bool:
        """Consecutive SEQPACKET RW packets of one connection, checked by the C fast path as it
        checks a stream's (source CID, lengths), each segment one packet's payload with its
        ``flags``. Same effect as guest_packet for each, as long as every one of them is
        admitted; False, with nothing done, if one would not be (the connection not open for
        data, the credit exceeded: guest_packet resets it at that packet), if there is no such
        connection, or its packets need a capture comment C cannot write: the caller then feeds
        the packets one by one."""
        key = (H.Type.SEQPACKET, src_port, dst_cid, dst_port)
        if not self.seqpacket or (self._shut_keys and key in self._shut_keys):
            return False
        conn = self.conns.get(key)
        if conn is None or (captured and conn.mark is not None):
            return False
        if conn.own >= 0:
            self._reclaim(conn)
        total = sum(len(s) for s in segments)
        if (conn.state is not State.ESTABLISHED or conn.guest_shut & H.SHUTDOWN_SEND
                or not conn.credit.fits(total)):
            return False
        self.counters.tx_packets += len(segments)
        conn.credit.update_peer(buf_alloc, fwd_cnt)
        if conn.msg_buf or not all(fl & H.SEQ_EOM for fl in flags):
            for seg, fl in zip(segments, flags, strict=True):
                self._guest_seq_rw(conn, len(seg), (seg,), fl)
            return True
        # Every packet a whole message (the usual run): what _guest_seq_rw does for each, at once
        conn.credit.receive(total)  # (fits: checked above)
        self.counters.tx_bytes += total
        conn.stats[0] += len(segments)
        conn.stats[1] += total
        conn.out_bytes += total
        conn.outq.extend([bytes(seg) for seg in segments])
        conn.msg_flags.extend([fl & (H.SEQ_EOM | H.SEQ_EOR) for fl in flags])
        if not conn.flags & Connection.IN_FLUSH:
            conn.flags |= Connection.IN_FLUSH
            self._flush.append(conn)
        return True

    def guest_rw_tail(self, src_port: int, dst_cid: int, dst_port: int, total: int,
                      segments: Sequence[memoryview], type_: int = H.Type.STREAM,
                      flags: Sequence[int] = ()) -> None:
        """What a host socket did not take of a run C sent (fastpath.Tail): C received and
        counted it, and gave the connection back (OWN_BLOCKED) with these bytes counted ahead;
        they are queued for the peer like the rest of an unsent run. SEQPACKET: whole messages
        (``flags`` theirs), counted forwarded once the peer takes them, as Python counts them."""
        conn = self.conns.get((type_, src_port, dst_cid, dst_port))
        if conn is None or conn.state is not State.ESTABLISHED:
            return  # reset meanwhile: the data goes with the connection
        if type_ == H.Type.SEQPACKET:
            for seg, fl in zip(segments, flags, strict=True):
                conn.outq.append(bytes(seg))
                conn.msg_flags.append(fl & (H.SEQ_EOM | H.SEQ_EOR))
        else:
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
        cr.update_peer(buf_alloc, fwd_cnt)
        if op == Op.CREDIT_REQUEST:
            self._queue_credit_update(conn)
        else:
            self._guest_credit_update(conn)
        self._credit_changed(conn)
        return True

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
            self._event(EventKind.REFUSED, (hdr.type, hdr.src_port, hdr.dst_cid, hdr.dst_port), f"at its {why}")
            if self.taps.active:
                self._tap(False, hdr.pack(), (), Mark.refused(why))
            self._rst_reply(hdr)
            return
        conn = Connection(hdr.type, hdr.src_port, hdr.dst_cid, hdr.dst_port, NO_PEER, self.buf_alloc)
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        peer = self.connector(conn)
        if self.taps.active:
            self._tap(False, hdr.pack(), (), conn.mark)
        if peer is None:
            c.connections_refused += 1
            if self.events.active:
                mark = conn.mark
                if mark is not None and mark.verdict is Verdict.DENIED:
                    self._event(EventKind.DENIED, conn, "", mark.rule)
                else:
                    self._event(EventKind.REFUSED, conn, "nothing serves it")
            ratelog(log, logging.INFO, f"{self.name}: refused", "%s: refused %s:%d -> %d:%d: no endpoint",
                    self.name, hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port)
            self._rst_reply(hdr)
            return
        conn.peer = peer
        conn.deadline = self.now + CONNECT_TIMEOUT
        self._add(conn)
        self._event(EventKind.REQUESTED, conn, f"by the guest, to {peer.describe()}", conn.rule[0] if conn.rule else "")

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.guest_shut |= flags
        if self.events.active:
            if conn.guest_shut == H.SHUTDOWN_BOTH:
                self._event(EventKind.CLOSED, conn, "by the guest")
            else:
                self._event(EventKind.HALF_CLOSED, conn, "the guest " + " and ".join(
                    w for f, w in ((H.SHUTDOWN_SEND, "sends no more"), (H.SHUTDOWN_RCV, "receives no more"))
                    if flags & f))
        if conn.guest_shut == H.SHUTDOWN_BOTH:
            # Linux close(): SHUTDOWN 3, answered with RST; the connection is gone for the guest.
            self._send_rst(conn)
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
            conn.peer.shutdown_read()  # the far side's sends fail from now on, as on a kernel link

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
        self._enter(conn, State.ESTABLISHED)
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
        held = False
        if src_port is not None:
            port = src_port
            old = self.conns.get((type_, guest_port, src_cid, port))
            if old is not None:
                # The dialling guest may reuse its 4-tuple once vsproxy answered its close with
                # RST, while this hop's old connection is still going away (its last bytes and
                # SHUTDOWN on their way to this guest, or its RST not back yet): the new one
                # waits for it to leave the table, within the connect timeout.
                if old.key in self._held or not old.peer.far_closed():
                    return None
                held = True
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
        self._event(EventKind.REQUESTED, conn, f"by {peer.describe()}")
        if held:
            conn.created = self.now
            self._held[conn.key] = conn  # its REQUEST goes when the old one leaves (_forget_vsock)
            return conn
        self._add(conn)
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
        else:  # closed for the guest, still flushing to the host (lingering)
            self._forget(conn, reset_peer=True)

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
                self._drop_out(conn)
                conn.peer.close(reset=True)
        for key, conn in list(self._held.items()):
            if conn.deadline <= now:  # the old connection on its 4-tuple never went: refused
                self.counters.timeouts += 1
                self.counters.connections_refused += 1
                del self._held[key]
                conn.state = State.CLOSED
                conn.peer.close(reset=True)

    def next_deadline(self) -> float | None:
        ds = [c.deadline for c in self.conns.values() if c.state in (State.CONNECTING, State.REQUESTED)]
        ds += [c.deadline for c in self._lingering]
        ds += [c.deadline for c in self._held.values()]
        return min(ds) if ds else None
