"""The guest's virtio-vsock driver (Linux 6.1 behaviour) on top of the simulated rings.

Why mimic Linux closely: the backend is tested against this instead of a real guest, so the
rules it must cope with (credit both ways, CREDIT_UPDATE timing, RST for unknown connections,
SHUTDOWN then RST on close, u32 ports above 2^31) have to be the real ones.
"""

from __future__ import annotations

import os
import random
import select
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from vsproxy.vsock import header as vh
from vsproxy.vsock.header import Header, Op

from . import cblast
from .errors import SimGuestError, SimGuestTimeout
from .frontend import VsockFrontend, drain_eventfd
from .memory import GuestMemory
from .ring import DESC, VRING_DESC_F_NEXT, Buf, SplitRing

U32 = vh.U32
HDR_SIZE = vh.HDR_SIZE
MAX_PAYLOAD = vh.MAX_PKT_PAYLOAD
RX_QUEUE, TX_QUEUE = 0, 1
TX_SLOT_HDR = 64  # header at the slot start, payload 64 bytes in (separate descriptors, like Linux)
TX_SLOT_SIZE = TX_SLOT_HDR + MAX_PAYLOAD
TX_SLOTS = 32
BLAST_TOKEN = -1
LAST_RESERVED_PORT = 1023


def peer_free(peer_buf_alloc: int, tx_cnt: int, peer_fwd_cnt: int) -> int:
    """Bytes the peer still accepts: buf_alloc - (tx_cnt - fwd_cnt) in u32 arithmetic, never negative.

    Hostile values (fwd_cnt ahead of tx_cnt, a shrunken buf_alloc) give 0 rather than a huge wrap.
    """
    in_flight = (tx_cnt - peer_fwd_cnt) & U32
    return max(0, (peer_buf_alloc & U32) - in_flight)


class State(IntEnum):
    CONNECTING = 1
    ESTABLISHED = 2
    CLOSING = 3  # we sent SHUTDOWN(3) and wait for RST
    CLOSED = 4


class Sink(Protocol):
    def __call__(self, data: memoryview, /) -> None: ...


@dataclass(slots=True, eq=False)
class Conn:
    """One guest-side connection, keyed by (local_port, peer_cid, peer_port, type)."""

    local_port: int
    peer_cid: int
    peer_port: int
    type: int
    buf_alloc: int
    state: State = State.CONNECTING
    rx: deque[bytes] = field(default_factory=deque)
    rx_bytes: int = 0
    fwd_cnt: int = 0  # bytes the application consumed (u32)
    last_fwd_cnt: int = 0  # fwd_cnt as last advertised to the peer
    tx_cnt: int = 0  # payload bytes sent (u32)
    rx_cnt: int = 0  # payload bytes accepted from the peer (u32)
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    peer_shutdown: int = 0
    local_shutdown: int = 0
    reset: bool = False  # the peer sent RST
    sink: Sink | None = None
    # SEQPACKET: fragments of the message being received, and complete (data, flags) messages
    partial: bytearray = field(default_factory=bytearray)
    msgs: deque[tuple[bytes, int]] = field(default_factory=deque)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.local_port, self.peer_cid, self.peer_port, self.type)

    def peer_free(self) -> int:
        # Linux since "vsock/virtio: cap TX credit to local buffer size" (CVE-2026-23086): a
        # sender never has more than its own buf_alloc outstanding, whatever the peer offers.
        return peer_free(min(self.peer_buf_alloc, self.buf_alloc), self.tx_cnt, self.peer_fwd_cnt)


@dataclass(slots=True)
class Stats:
    """What the guest saw; tx counts when the backend returns a buffer, rx when a filled buffer comes back."""

    tx_packets: int = 0
    tx_bytes: int = 0  # payload bytes
    rx_packets: int = 0
    rx_bytes: int = 0  # payload bytes
    kicks: int = 0
    interrupts: int = 0
    err_signals: int = 0
    credit_updates_sent: int = 0
    credit_requests_sent: int = 0
    rst_sent: int = 0
    credit_violations: int = 0
    close_timeouts: int = 0
    dropped: int = 0
    protocol_errors: list[str] = field(default_factory=list)


class Listener:
    def __init__(self, port: int, type: int, backlog: int) -> None:
        self.port, self.type, self.backlog = port, type, backlog
        self.queue: deque[Conn] = deque()


class VsockDriver:
    """rx/tx queues, the connection table and the single-threaded event loop (``poll``)."""

    def __init__(
        self,
        frontend: VsockFrontend,
        mem: GuestMemory,
        rx: SplitRing,
        tx: SplitRing,
        *,
        rx_buf_size: int,
        buf_alloc: int,
        timeout: float,
        credit_request: bool,
        record_limit: int,
    ) -> None:
        if rx_buf_size < HDR_SIZE:
            raise ValueError(f"rx_buf_size {rx_buf_size} cannot hold a {HDR_SIZE}-byte header")
        self.fe, self.mem, self.rx, self.tx = frontend, mem, rx, tx
        self.guest_cid = frontend.guest_cid
        self.rx_buf_size = rx_buf_size
        self.buf_alloc = buf_alloc
        self.timeout = timeout
        self.credit_request = credit_request
        self.stats = Stats()
        self.received_raw: deque[tuple[Header, int]] = deque(maxlen=record_limit)
        self.on_packet: Callable[[Header, memoryview], None] | None = None
        self.use_c_blast = True  # blast through the C sender when it was built (cblast.py)
        self._cblast: cblast.CBlast | None = None
        self._cdrain: cblast.CDrain | None = None
        self._csend: cblast.CSend | None = None
        self.conns: dict[tuple[int, int, int, int], Conn] = {}
        self.listeners: dict[tuple[int, int], Listener] = {}
        self._next_port = LAST_RESERVED_PORT + 1 + random.randrange(U32 - LAST_RESERVED_PORT)
        # One rx buffer per descriptor (Linux: one writable descriptor each).
        self.rx_gpas = [mem.alloc(rx_buf_size, 8) for _ in range(rx.size)]
        self.rx_offs = [mem.offset(g, rx_buf_size) for g in self.rx_gpas]
        self.rx_paused = False
        self._rx_held: list[int] = []
        nslots = min(tx.size, TX_SLOTS)
        self.tx_base = mem.alloc(nslots * TX_SLOT_SIZE, 64)
        self.tx_free_slots = list(range(nslots))
        self.tx_slot_len = [0] * nslots
        self.blast_gpa = mem.alloc(TX_SLOT_SIZE, 64)
        self._blast_plen = 0
        self._poller: select.poll | None = None
        self._in_rx = False
        self._poll_fds: tuple[int, ...] = ()
        for i in range(rx.size):
            rx.add_chain([Buf(self.rx_gpas[i], rx_buf_size, True)], token=i, publish=False)
            rx.queue_avail(i)
        rx.flush_avail()
        rx.make_fixed()
        self._kick(rx)

    # -- plumbing ----------------------------------------------------------------------------------

    def _kick(self, ring: SplitRing) -> None:
        if ring.kick_prepare():
            self.fe.kick(ring.index)
            self.stats.kicks += 1

    def error(self, msg: str) -> None:
        """Record something the backend did wrong; tests assert ``stats.protocol_errors`` stays empty."""
        self.stats.protocol_errors.append(msg)

    def alloc_port(self) -> int:
        while True:
            port = self._next_port
            self._next_port = self._next_port + 1 if self._next_port < U32 - 1 else LAST_RESERVED_PORT + 1
            if not any(c.local_port == port for c in self.conns.values()):
                return port

    def deadline_wait(self, done: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Run the event loop until ``done()``; raise SimGuestTimeout naming ``what`` otherwise."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimGuestTimeout(f"timed out after {limit}s {what}")
            self.poll(left)

    # -- event loop --------------------------------------------------------------------------------

    def poll(self, timeout: float | None = 0) -> int:
        """Process returned buffers; if none, wait up to ``timeout`` s for a call eventfd, then again."""
        n = self._process()
        if n or timeout == 0:
            return n
        fds = (*self.fe.call_fds, *self.fe.retired_call_fds, *self.fe.err_fds, self.fe.client.sock.fileno())
        if self._poller is None or fds != self._poll_fds:
            self._poller = select.poll()
            for fd in fds:
                self._poller.register(fd, select.POLLIN)
            self._poll_fds = fds
        ms = None if timeout is None else max(0, int(timeout * 1000) + 1)
        events = self._poller.poll(ms)
        for fd, _ev in events:
            if fd == fds[-1]:
                self.fe.client.check_idle()
            elif fd in self.fe.err_fds:
                if drain_eventfd(fd):
                    self.stats.err_signals += 1
                    self.error(f"backend signalled the error eventfd of queue {self.fe.err_fds.index(fd)}")
            elif drain_eventfd(fd):  # a call fd: an interrupt. Only a signalled one is read, as
                self.stats.interrupts += 1  # a driver's handler runs only when it fires
        return self._process()

    def _process(self) -> int:
        # The rings say what is done; the call eventfds are read by poll() when they fire.
        n = self._reclaim_tx()
        if not self._in_rx:  # a send from inside rx handling waits for tx only: rx order must hold
            self._in_rx = True
            try:
                n += self._process_rx()
            finally:
                self._in_rx = False
        return n

    def _reclaim_tx(self) -> int:
        used = self.tx.reclaim()
        st, free_slots, slot_len = self.stats, self.tx_free_slots, self.tx_slot_len
        for u in used:
            if u.token == BLAST_TOKEN:
                st.tx_bytes += self._blast_plen
            else:
                free_slots.append(u.token)
                st.tx_bytes += slot_len[u.token]
        st.tx_packets += len(used)
        return len(used)

    def _process_rx(self) -> int:
        rx = self.rx
        used = rx.reclaim()
        if not used:
            return 0
        buf, limit = self.mem.buf, self.rx_buf_size - HDR_SIZE
        for u in used:
            off = self.rx_offs[u.token]
            if u.len < HDR_SIZE:
                self.error(f"rx buffer returned with used len {u.len} < {HDR_SIZE}")
            else:
                h = vh.unpack(buf, off)
                if h.len > u.len - HDR_SIZE or h.len > limit:
                    self.error(f"rx packet len {h.len} exceeds used len {u.len} / buffer {self.rx_buf_size}")
                else:
                    self._on_packet(h, buf[off + HDR_SIZE : off + HDR_SIZE + h.len])
            if self.rx_paused:
                self._rx_held.append(u.head)
            else:
                rx.requeue(u.head)
        rx.flush_avail()
        self._kick(rx)
        return len(used)

    def pause_rx(self) -> None:
        """Stop re-posting rx buffers, like a guest that has run out of memory for them."""
        self.rx_paused = True

    def resume_rx(self) -> None:
        self.rx_paused = False
        for head in self._rx_held:
            self.rx.requeue(head)
        self._rx_held.clear()
        self.rx.flush_avail()
        self._kick(self.rx)

    # -- receive side ------------------------------------------------------------------------------

    def _on_packet(self, h: Header, payload: memoryview) -> None:
        st = self.stats
        st.rx_packets += 1
        st.rx_bytes += h.len
        self.received_raw.append((h, h.len))
        if self.on_packet is not None:
            self.on_packet(h, payload)
        if h.dst_cid != self.guest_cid:
            self.error(f"packet for CID {h.dst_cid}, guest is {self.guest_cid}: {h.describe()}")
            st.dropped += 1
            return
        if h.type not in (vh.Type.STREAM, vh.Type.SEQPACKET):
            self._reply_rst(h)
            return
        conn = self.conns.get((h.dst_port, h.src_cid, h.src_port, h.type))
        if conn is None:
            self._no_conn(h)
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
        op = h.op
        if conn.state == State.CONNECTING:
            if op == Op.RESPONSE:
                conn.state = State.ESTABLISHED
            elif op == Op.RST:
                self._drop(conn, reset=True)
            else:
                self.error(f"unexpected packet while connecting: {h.describe()}")
                self._send(conn, Op.RST)
                self._drop(conn, reset=True)
            return
        if op == Op.RW:
            # Stricter than Linux's rx_bytes check: no peer can have seen a fwd_cnt newer than the last one sent.
            if ((conn.rx_cnt + h.len - conn.last_fwd_cnt) & U32) > conn.buf_alloc:
                st.credit_violations += 1
                st.dropped += 1
                self.error(f"peer exceeded guest credit (rx_cnt {conn.rx_cnt} + {h.len}, advertised fwd_cnt "
                           f"{conn.last_fwd_cnt}, buf_alloc {conn.buf_alloc}): {h.describe()}")
                return
            conn.rx_cnt = (conn.rx_cnt + h.len) & U32
            if conn.type == vh.Type.SEQPACKET:
                conn.partial += payload
                if h.flags & vh.SEQ_EOM:
                    conn.msgs.append((bytes(conn.partial), h.flags & (vh.SEQ_EOM | vh.SEQ_EOR)))
                    conn.partial.clear()
                    conn.rx_bytes += 0
                return
            if conn.sink is not None:
                conn.sink(payload)
                self._consumed(conn, h.len)
            elif h.len:
                conn.rx.append(bytes(payload))
                conn.rx_bytes += h.len
        elif op == Op.CREDIT_REQUEST:
            self._send(conn, Op.CREDIT_UPDATE)
        elif op == Op.CREDIT_UPDATE:
            pass
        elif op == Op.SHUTDOWN:
            conn.peer_shutdown |= h.flags & vh.SHUTDOWN_BOTH
            if conn.peer_shutdown == vh.SHUTDOWN_BOTH and not conn.rx_bytes:
                self._send(conn, Op.RST)  # Linux resets a fully shut down, drained connection
                self._drop(conn, reset=False)
        elif op == Op.RST:
            self._drop(conn, reset=True)
        else:
            self.error(f"unexpected packet on an open connection: {h.describe()}")

    def _no_conn(self, h: Header) -> None:
        if h.op == Op.REQUEST:
            lst = self.listeners.get((h.dst_port, h.type))
            if lst is not None and len(lst.queue) < lst.backlog:
                conn = Conn(h.dst_port, h.src_cid, h.src_port, h.type, self.buf_alloc, State.ESTABLISHED)
                conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt
                self.conns[conn.key] = conn
                self._send(conn, Op.RESPONSE)
                lst.queue.append(conn)
                return
        if h.op != Op.RST:
            self._reply_rst(h)

    def _drop(self, conn: Conn, *, reset: bool) -> None:
        conn.reset = conn.reset or reset
        conn.peer_shutdown = vh.SHUTDOWN_BOTH
        conn.state = State.CLOSED
        self.conns.pop(conn.key, None)

    def _consumed(self, conn: Conn, n: int) -> None:
        """The application read ``n`` bytes: advance fwd_cnt; CREDIT_UPDATE when Linux 6.1 would.

        Linux 6.1 virtio_transport_stream_do_dequeue: free_space = buf_alloc - (fwd_cnt - last_fwd_cnt),
        update if free_space < 64 KiB (the peer, having used all it knew of, may be running low).
        """
        conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        if conn.sink is None:
            conn.rx_bytes -= n
        unadvertised = (conn.fwd_cnt - conn.last_fwd_cnt) & U32
        if conn.state == State.ESTABLISHED and conn.buf_alloc - unadvertised < MAX_PAYLOAD:
            self._send(conn, Op.CREDIT_UPDATE)

    # -- send side ---------------------------------------------------------------------------------

    def _reply_rst(self, h: Header) -> None:
        fields = (self.guest_cid, h.src_cid, h.dst_port, h.src_port, 0, h.type, Op.RST, 0, 0, 0)
        self.send_raw(vh.pack(*fields))
        self.stats.rst_sent += 1

    def _take_slot(self) -> int:
        if not (self.tx_free_slots and self.tx.free):
            self.deadline_wait(lambda: bool(self.tx_free_slots and self.tx.free), None,
                               "waiting for the backend to return tx buffers (tx ring full)")
        return self.tx_free_slots.pop()

    def tx_slot_gpa(self, slot: int) -> int:
        return self.tx_base + slot * TX_SLOT_SIZE

    def send_raw(self, header: bytes, payload: bytes | bytearray | memoryview = b"") -> None:
        """Put any header bytes (normally 44) and payload on the tx queue as the header + payload chain."""
        if len(header) > TX_SLOT_HDR or len(payload) > MAX_PAYLOAD:
            raise ValueError(f"raw packet too large: header {len(header)}, payload {len(payload)}")
        slot = self._take_slot()
        gpa = self.tx_slot_gpa(slot)
        self.mem.write(gpa, header)
        bufs = [Buf(gpa, len(header))]
        if payload:
            self.mem.write(gpa + TX_SLOT_HDR, payload)
            bufs.append(Buf(gpa + TX_SLOT_HDR, len(payload)))
        self.tx_slot_len[slot] = len(payload)
        self.tx.add_chain(bufs, token=slot)
        self._kick(self.tx)

    def _send(self, conn: Conn, op: int, flags: int = 0, payload: bytes | memoryview = b"") -> None:
        conn.last_fwd_cnt = conn.fwd_cnt
        hdr = vh.pack(self.guest_cid, conn.peer_cid, conn.local_port, conn.peer_port, len(payload), conn.type, op,
                      flags, conn.buf_alloc, conn.fwd_cnt)
        self.send_raw(hdr, payload)
        if op == Op.RW:
            conn.tx_cnt = (conn.tx_cnt + len(payload)) & U32
        elif op == Op.CREDIT_UPDATE:
            self.stats.credit_updates_sent += 1
        elif op == Op.CREDIT_REQUEST:
            self.stats.credit_requests_sent += 1
        elif op == Op.RST:
            self.stats.rst_sent += 1

    def send_message(self, conn: Conn, data: bytes, eor: bool = False) -> None:
        """One SEQPACKET message: RW fragments of at most 64 KiB, EOM (and EOR) on the last.
        Like Linux, a message larger than the peer's buf_alloc cannot be sent."""
        if conn.type != vh.Type.SEQPACKET:
            raise SimGuestError("send_message needs a SEQPACKET connection")
        if len(data) > min(conn.peer_buf_alloc, conn.buf_alloc):
            raise OSError(90, f"message of {len(data)} bytes exceeds the window (EMSGSIZE)")
        view = memoryview(data)
        while True:
            if conn.state != State.ESTABLISHED:
                raise BrokenPipeError(f"connection {conn.key} is not open for sending")
            credit = conn.peer_free() or self._wait_credit(conn, f"({len(view)} bytes of a message left)")
            n = min(len(view), credit, MAX_PAYLOAD)
            last = n == len(view)
            flags = (vh.SEQ_EOM | (vh.SEQ_EOR if eor else 0)) if last else 0
            self._send(conn, Op.RW, flags, view[:n])
            view = view[n:]
            if last:
                return

    def recv_message(self, conn: Conn, timeout: float | None) -> tuple[bytes, int]:
        """The next complete SEQPACKET message and its flags; (b"", 0) once the peer is done."""
        self.deadline_wait(lambda: bool(conn.msgs) or conn.peer_shutdown & vh.SHUTDOWN_SEND != 0
                           or conn.state == State.CLOSED, timeout, f"receiving a message on {conn.key}")
        if not conn.msgs:
            return b"", 0
        data, flags = conn.msgs.popleft()
        self._consumed(conn, len(data))
        return data, flags

    def _wait_credit(self, conn: Conn, what: str) -> int:
        """Wait until the peer grants credit (optionally asking with CREDIT_REQUEST); return it."""
        if conn.peer_free() == 0 and self.credit_request and conn.state == State.ESTABLISHED:
            self._send(conn, Op.CREDIT_REQUEST)
        self.deadline_wait(lambda: conn.peer_free() > 0 or conn.state != State.ESTABLISHED, None,
                           f"waiting for credit from the peer {what}")
        if conn.state != State.ESTABLISHED:
            raise BrokenPipeError(f"connection {conn.key} closed by the peer while sending")
        return conn.peer_free()

    def sendall(self, conn: Conn, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if conn.state != State.ESTABLISHED or conn.local_shutdown & vh.SHUTDOWN_SEND:
                raise BrokenPipeError(f"connection {conn.key} is not open for sending")
            credit = conn.peer_free() or self._wait_credit(conn, f"({len(view)} bytes left to send)")
            n = min(len(view), credit, MAX_PAYLOAD)
            self._send(conn, Op.RW, 0, view[:n])
            view = view[n:]

    def blast(self, conn: Conn, payload: bytes, count: int) -> float:
        """Send ``count`` identical RW packets as fast as possible; return seconds taken.

        Keeps the tx ring full with chains that reuse prebuilt indirect tables (or plain two-descriptor
        chains without INDIRECT_DESC), publishes avail->idx once per batch, respects peer credit, and
        returns once the backend has given every buffer back.
        """
        plen = len(payload)
        if not 0 < plen <= MAX_PAYLOAD:
            raise ValueError(f"blast payload must be 1..{MAX_PAYLOAD} bytes")
        tx = self.tx
        self.deadline_wait(lambda: tx.n_inflight == 0, None, "waiting for tx to drain before a blast")
        self._blast_plen = plen
        conn.last_fwd_cnt = conn.fwd_cnt
        # on a SEQPACKET connection every packet is a message of its own: EOM on each
        flags = vh.SEQ_EOM if conn.type == vh.Type.SEQPACKET else 0
        hdr = vh.pack(self.guest_cid, conn.peer_cid, conn.local_port, conn.peer_port, plen, conn.type, Op.RW, flags,
                      conn.buf_alloc, conn.fwd_cnt)
        self.mem.write(self.blast_gpa, hdr)
        pay_gpa = self.blast_gpa + TX_SLOT_HDR
        self.mem.write(pay_gpa, payload)
        table = DESC.pack(self.blast_gpa, HDR_SIZE, VRING_DESC_F_NEXT, 1) + DESC.pack(pay_gpa, plen, 0, 0)
        bufs = [Buf(self.blast_gpa, HDR_SIZE), Buf(pay_gpa, plen)]
        per = 1 if tx.indirect else 2
        start = time.monotonic()
        if per == 1 and not self.credit_request and self._c_ready():
            if self._cblast is None:
                self._cblast = cblast.CBlast(self)
            tx.prepare_uniform(table, BLAST_TOKEN)
            self._cblast.run(conn, count, plen, int(self.timeout * 1000))
        else:
            self._blast_py(conn, count, plen, per, table, bufs)
        self.deadline_wait(lambda: tx.n_inflight == 0, None, f"waiting for the backend to consume {count} packets")
        return time.monotonic() - start

    def _blast_py(self, conn: Conn, count: int, plen: int, per: int, table: bytes, bufs: list[Buf]) -> None:
        """The reference bulk sender (and the one without INDIRECT_DESC)."""
        tx = self.tx
        sent = 0
        while sent < count:
            if conn.state != State.ESTABLISHED:
                raise BrokenPipeError(f"connection {conn.key} closed during blast after {sent} packets")
            self._process()
            n = min(len(tx.free) // per, count - sent, conn.peer_free() // plen)
            if n <= 0:
                if conn.peer_free() < plen:
                    self._blast_wait_credit(conn, plen, sent)
                else:
                    self.deadline_wait(lambda: len(tx.free) >= per, None, f"waiting for tx buffers in blast ({sent})")
                continue
            if per == 1:
                tx.add_uniform_indirect(n, table, BLAST_TOKEN)
            else:
                for _ in range(n):
                    tx.queue_avail(tx.add_chain(bufs, BLAST_TOKEN, publish=False))
                tx.flush_avail()
            conn.tx_cnt = (conn.tx_cnt + n * plen) & U32
            sent += n
            self._kick(tx)

    def release(self) -> None:
        """Let go of guest memory before it is unmapped."""
        if self._cblast is not None:
            self._cblast.close()
            self._cblast = None
        if self._cdrain is not None:
            self._cdrain.close()
            self._cdrain = None
        if self._csend is not None:
            self._csend.close()
            self._csend = None

    def _blast_wait_credit(self, conn: Conn, plen: int, sent: int) -> None:
        if self.credit_request:
            self._send(conn, Op.CREDIT_REQUEST)
        self.deadline_wait(lambda: conn.peer_free() >= plen or conn.state != State.ESTABLISHED, None,
                           f"waiting for credit in blast after {sent} packets")

    def drain(self, conn: Conn, nbytes: int, sink: Sink | None = None) -> int:
        """Receive ``nbytes`` host->guest bytes without queueing them (optionally passing them to ``sink``)."""
        got = 0
        while conn.rx and got < nbytes:  # already queued data first
            chunk = conn.rx.popleft()
            if got + len(chunk) > nbytes:
                conn.rx.appendleft(chunk[nbytes - got :])
                chunk = chunk[: nbytes - got]
            if sink is not None:
                sink(memoryview(chunk))
            got += len(chunk)
            self._consumed(conn, len(chunk))
        counter = [got]

        def take(data: memoryview) -> None:
            counter[0] += len(data)
            if sink is not None:
                sink(data)

        conn.sink = take
        try:
            if sink is None and conn.type == vh.Type.STREAM and self._c_ready():
                self._drain_c(conn, nbytes, counter)
            else:
                self.deadline_wait(lambda: counter[0] >= nbytes or conn.peer_shutdown & vh.SHUTDOWN_SEND != 0,
                                   None, f"draining {nbytes} bytes")
        except SimGuestTimeout as e:
            raise SimGuestTimeout(f"{e} (got {counter[0]})") from None
        finally:
            conn.sink = None
        return counter[0]

    def _c_ready(self) -> bool:
        """The C bulk paths may run: built, wanted, and nothing the Python driver must see."""
        return self.use_c_blast and cblast.AVAILABLE and not self.rx_paused and self.on_packet is None

    def _drain_c(self, conn: Conn, nbytes: int, counter: list[int]) -> None:
        if self._cdrain is None:
            self._cdrain = cblast.CDrain(self)
        deadline = time.monotonic() + self.timeout
        while counter[0] < nbytes and not conn.peer_shutdown & vh.SHUTDOWN_SEND:
            left = deadline - time.monotonic()
            rc, got = (cblast.SG_TIMEOUT, 0) if left <= 0 else self._cdrain.run(conn, nbytes - counter[0],
                                                                                 max(1, int(left * 1000)))
            counter[0] += got
            if rc == cblast.SG_TIMEOUT:
                raise SimGuestTimeout(f"timed out after {self.timeout}s draining {nbytes} bytes")
            if rc == cblast.SG_CREDIT:
                self._send(conn, Op.CREDIT_UPDATE)
            elif rc == cblast.SG_RX:
                self.poll(0)  # the Python driver takes the entry C would not (conn.sink counts RW)
            self._reclaim_tx()

    # -- recorded payload from a file (cblast.CSend) ---------------------------------------------------

    def can_send_stored(self, conn: Conn, largest: int) -> bool:
        """``send_stored`` may run for packets of at most ``largest`` bytes: the C sender is
        there, and nothing it does not do is asked of it (CREDIT_REQUESTs)."""
        return (self._c_ready() and 0 < largest <= MAX_PAYLOAD and conn.state == State.ESTABLISHED
                and not self.credit_request)

    def send_stored(self, conn: Conn, fd: int, offs: object, lens: object, flags: object, npkts: int) -> None:
        """Send ``npkts`` RW packets whose payloads C reads from ``fd`` (cffi arrays: offsets,
        lengths, RW flags), each as one packet (cut, as Linux does, when the peer's credit does
        not hold it), in order (see ``can_send_stored``). Raises ``BrokenPipeError`` when the connection closes first,
        ``OSError`` when the file cannot be read, ``SimGuestTimeout`` without progress."""
        if self._csend is None:
            self._csend = cblast.CSend(self)
        c = self._csend
        sent = part = 0
        deadline = time.monotonic() + self.timeout
        while sent < npkts:
            if conn.state != State.ESTABLISHED or conn.local_shutdown & vh.SHUTDOWN_SEND:
                raise BrokenPipeError(f"connection {conn.key} is not open for sending")
            # C takes back only the chains it lent in this call: Python's in flight go first
            if self.tx.n_inflight and self.tx.event_idx:
                self.tx.set_used_event(self.tx.last_used)
            self.deadline_wait(lambda: self.tx.n_inflight == 0, None, "waiting for tx to drain before sending")
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimGuestTimeout(f"timed out after {self.timeout}s sending after {sent} of {npkts} packets")
            rc, now, now_part = c.run(conn, fd, offs, lens, flags, sent, part, npkts, max(1, int(left * 1000)))
            if (now, now_part) != (sent, part):
                deadline = time.monotonic() + self.timeout  # progress: a fresh timeout
            sent, part = now, now_part
            if rc == cblast.SG_DONE:
                return
            if rc == cblast.SG_TIMEOUT:
                raise SimGuestTimeout(f"timed out after {self.timeout}s waiting for credit or tx buffers "
                                      f"after {sent} of {npkts} packets")
            if rc == cblast.SG_BAD:
                raise SimGuestError(f"queue {self.tx.index}: a used entry names a chain C did not post")
            if rc == cblast.SG_READ:
                err = c.read_errno
                raise OSError(err, os.strerror(err) if err else f"the file ended inside packet {sent}")
            if rc == cblast.SG_RX:
                self.poll(0)  # the Python driver takes the entry C would not, then C goes on

    # -- request/response in C (cblast.CRtt) ---------------------------------------------------------

    def _rtt(self, c: cblast.CRtt, what: str) -> None:
        """Run ``c`` to its end: what C hands back is the Python driver's, then C goes on."""
        conn = c.conn
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                # C reclaims only the chains it posted: Python's own (a credit update) go first,
                # and the ones C left in flight, whose interrupt C did not ask for: asked for now
                if self.tx.n_inflight and self.tx.event_idx:
                    self.tx.set_used_event(self.tx.last_used)
                self.deadline_wait(lambda: self.tx.n_inflight == 0, None, f"waiting for tx to drain ({what})")
                self._rtt_adopt(c)
                if c.s.mode == cblast.RTT_CONNECT:
                    if conn.state != State.CONNECTING:
                        return  # Python took the answer
                elif conn.state != State.ESTABLISHED:
                    raise BrokenPipeError(f"connection {conn.key} closed during {what} after {c.done} rounds")
                left = deadline - time.monotonic()
                rc = cblast.SG_TIMEOUT if left <= 0 else c.run(max(1, int(left * 1000)))
                if rc == cblast.SG_DONE:
                    return
                if rc == cblast.SG_TIMEOUT:
                    raise SimGuestTimeout(f"timed out after {self.timeout}s in {what} after {c.done} rounds")
                if rc == cblast.SG_BAD:
                    raise SimGuestError(f"queue {self.tx.index}: a used entry names a chain C did not post")
                if rc == cblast.SG_CREDIT:
                    self._send(conn, Op.CREDIT_UPDATE)
                elif rc == cblast.SG_RX:
                    self.poll(0)  # the Python driver takes the entry C would not
                deadline = time.monotonic() + self.timeout  # progress: a fresh timeout
        finally:
            c.close()

    def _rtt_adopt(self, c: cblast.CRtt) -> None:
        """Data of the connection the Python driver queued counts as C's (the program reads it)."""
        conn = c.conn
        n = sum(len(b) for b in conn.rx)
        if n:
            conn.rx.clear()
            self._consumed(conn, n)
            c.adopt(n)

    def request_response(self, conn: Conn, rounds: int, size: int, echo: bool) -> list[int]:
        """``rounds`` request/response turns of ``size`` bytes each way, in C (``sg_rtt``):
        send and wait for the answer (the nanoseconds of each round come back), or with
        ``echo`` wait for each request and answer it."""
        if not cblast.AVAILABLE:
            raise SimGuestError("the C request/response loop was not built (vsproxy.simguest._cblast)")
        if not 0 < size <= min(MAX_PAYLOAD, TX_SLOT_SIZE - TX_SLOT_HDR, self.rx_buf_size - HDR_SIZE):
            raise ValueError(f"request size must be 1..{self.rx_buf_size - HDR_SIZE} bytes")
        c = cblast.CRtt(self, conn, cblast.RTT_ECHO if echo else cblast.RTT_PING, rounds, size)
        self._rtt(c, "an echo loop" if echo else "a request/response loop")
        return c.round_ns()

    def connect_timed(self, cid: int, port: int, type: int) -> tuple[Conn, int]:
        """A connect whose REQUEST goes out and whose answer is taken in C: the connection
        (ConnectionResetError if refused) and the nanoseconds from REQUEST to RESPONSE."""
        if not cblast.AVAILABLE:
            raise SimGuestError("the C request/response loop was not built (vsproxy.simguest._cblast)")
        conn = Conn(self.alloc_port(), cid, port, type, self.buf_alloc)
        self.conns[conn.key] = conn
        c = cblast.CRtt(self, conn, cblast.RTT_CONNECT, 1, 0)
        try:
            self._rtt(c, f"connecting to {cid}:{port}")
        except BaseException:
            self.conns.pop(conn.key, None)
            raise
        if c.done:  # C took the answer
            if c.last_op == Op.RESPONSE:
                conn.state = State.ESTABLISHED
            else:
                self._drop(conn, reset=True)
        if conn.state != State.ESTABLISHED:
            raise ConnectionResetError(f"connection to {cid}:{port} refused (RST)")
        ns = c.round_ns()
        return conn, ns[0] if ns else 0

    # -- connection control ------------------------------------------------------------------------

    def connect(self, cid: int, port: int, type: int, local_port: int | None, timeout: float | None) -> Conn:
        conn = Conn(self.alloc_port() if local_port is None else local_port, cid, port, type, self.buf_alloc)
        if conn.key in self.conns:
            raise SimGuestError(f"connection {conn.key} already exists")
        self.conns[conn.key] = conn
        self._send(conn, Op.REQUEST)
        try:
            self.deadline_wait(lambda: conn.state != State.CONNECTING, timeout, f"connecting to {cid}:{port}")
        except SimGuestTimeout:
            self.conns.pop(conn.key, None)
            raise
        if conn.state != State.ESTABLISHED:
            raise ConnectionResetError(f"connection to {cid}:{port} refused (RST)")
        return conn

    def recv(self, conn: Conn, max_bytes: int, timeout: float | None) -> bytes:
        self.deadline_wait(lambda: bool(conn.rx) or conn.peer_shutdown & vh.SHUTDOWN_SEND != 0, timeout,
                           f"receiving on {conn.key}")
        if not conn.rx:
            return b""
        chunk = conn.rx.popleft()
        if len(chunk) > max_bytes:
            conn.rx.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._consumed(conn, len(chunk))
        return chunk

    def shutdown_write(self, conn: Conn) -> None:
        if conn.state == State.ESTABLISHED and not conn.local_shutdown & vh.SHUTDOWN_SEND:
            conn.local_shutdown |= vh.SHUTDOWN_SEND
            self._send(conn, Op.SHUTDOWN, vh.SHUTDOWN_SEND)

    def close(self, conn: Conn, timeout: float | None) -> bool:
        """SHUTDOWN(3), then wait for RST; on timeout send RST (Linux's close timeout). True if RST came."""
        if conn.state == State.CLOSED:
            return conn.reset or conn.peer_shutdown == vh.SHUTDOWN_BOTH
        if conn.state == State.CONNECTING:
            self.conns.pop(conn.key, None)
            conn.state = State.CLOSED
            return False
        conn.local_shutdown = vh.SHUTDOWN_BOTH
        conn.state = State.CLOSING
        self._send(conn, Op.SHUTDOWN, vh.SHUTDOWN_BOTH)
        try:
            self.deadline_wait(lambda: conn.state == State.CLOSED, timeout, "waiting for RST after SHUTDOWN")
        except SimGuestTimeout:
            self.stats.close_timeouts += 1
            self._send(conn, Op.RST)
            self._drop(conn, reset=False)
            return False
        return True
