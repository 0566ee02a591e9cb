"""The simulated guest's bulk sender and receiver in C (``sg_blast`` and ``sg_drain`` in
vsproxy.simguest._cblast, built from vsproxy/simguest/_c/), when it was built.

A guest kernel spends a few microseconds per packet where the Python driver spends tens, and on
a two-core machine the benchmark's guest shares the cores with vsproxy: in Python it would be
measured as much as vsproxy. The sender keeps the tx ring full within the peer's credit and takes
the connection's CREDIT_UPDATEs off the rx ring; the receiver takes the connection's RW packets,
checks and returns credit as Linux 6.1 does (the CREDIT_UPDATE itself is sent by Python). The
request/response loop (``sg_rtt``, ``CRtt``) sends a request and sleeps until its answer, or
answers each request, or times one connect. All of them hand anything else back to the Python
driver, which stays the reference (``VSPROXY_NO_C=1``, or ``driver.use_c_blast = False``; the
request/response loop has no Python twin: it is the benchmark's guest, and says so when C is
missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vsproxy._ext import load
from vsproxy.vsock import header as vh

from .errors import RingError, RingFull, SimGuestTimeout
from .ring import DESC_SIZE, SplitRing

if TYPE_CHECKING:
    from .driver import Conn, VsockDriver

ffi, lib = load("vsproxy.simguest._cblast")
AVAILABLE = lib is not None

SG_DONE, SG_RX, SG_TIMEOUT, SG_BAD, SG_HEADERS, SG_CREDIT, SG_READ = range(7)  # _c/cblast.h
RTT_PING, RTT_ECHO, RTT_CONNECT = range(3)  # sg_rtt's modes
RTT_CHAINS = 8  # tx chains lent to one sg_rtt call
MAX_HEADERS = 256
CTL_CHAINS = 16  # tx chains lent to one sg_drain call for its credit updates


class _CPath:
    """What the C sender and receiver share: guest memory, the rx buffers' offsets, the buffer
    the consumed headers come back in (for ``received_raw``)."""

    def __init__(self, drv: VsockDriver, state: str, inflight: list[bytearray]) -> None:
        self.drv = drv
        self.s = ffi.new(state)
        self.mem = ffi.from_buffer("uint8_t[]", drv.mem.buf)
        self.rx_off = ffi.new("uint32_t[]", drv.rx_offs)
        self.headers = ffi.new("uint8_t[]", vh.HDR_SIZE * MAX_HEADERS)
        self._inflight = [ffi.from_buffer("uint8_t[]", b) for b in inflight]
        self.handed_back = 0  # rx entries C left to the Python driver

    def close(self) -> None:
        for b in (self.mem, *self._inflight):
            ffi.release(b)

    @staticmethod
    def _load(r: Any, ring: SplitRing, inflight: Any, kick_fd: int, call_fd: int) -> None:
        r.avail_idx_w, r.avail_ring_w, r.used_event_w = ring._avail_idx_w, ring._avail_ring_w, ring._used_event_w
        r.used_idx_w, r.used_ring_d, r.avail_event_w = ring._used_idx_w, ring._used_ring_d, ring._avail_event_w
        r.mask = ring.mask
        r.avail_idx, r.last_used, r.kicked_idx = ring.avail_idx, ring.last_used, ring._kicked_idx
        r.kick_fd, r.call_fd = kick_fd, call_fd
        r.inflight = inflight

    @staticmethod
    def _store(r: Any, ring: SplitRing) -> None:
        ring.avail_idx, ring.last_used, ring._kicked_idx = r.avail_idx, r.last_used, r.kicked_idx

    def _wait_on(self, s: Any) -> None:
        """The call eventfds C waits on: the rings' own and the retired ones (a back-end may
        signal a retired one until it has taken the SET_VRING_CALL that replaced it)."""
        fe = self.drv.fe
        fds = [fd for fd in (*fe.call_fds, *fe.retired_call_fds) if fd >= 0][:16]
        for k, fd in enumerate(fds):
            s.wait_fds[k] = fd
        s.nwait = len(fds)

    def _settle_lent(self, lent: list[tuple[int, int]], busy: Any, lens: Sequence[int]) -> int:
        """The tx chains lent to C, after its call: those it posted and the back-end has not used
        yet (``busy[k]``) go to the Python ring, which reclaims them (their slot holding a packet of
        ``lens[k]`` bytes); the others back to the free lists. How many were still in flight."""
        drv, tx = self.drv, self.drv.tx
        in_flight = 0
        for k, (head, slot) in enumerate(lent):
            if busy[k]:
                tx.posted_by_c(head, slot)
                drv.tx_slot_len[slot] = lens[k]
                in_flight += 1
            else:
                tx.unreserve(head)
                drv.tx_free_slots.append(slot)
        return in_flight

    def _record(self, n: int, with_len: bool) -> None:
        """The ``n`` headers C consumed, into received_raw as the Python driver records them."""
        raw = bytes(ffi.buffer(self.headers, vh.HDR_SIZE * n))
        limit = self.drv.received_raw.maxlen
        for k in range(n if limit is None else max(0, n - limit), n):  # only what the deque keeps
            h = vh.unpack(raw, vh.HDR_SIZE * k)
            self.drv.received_raw.append((h, h.len if with_len else 0))


class CBlast(_CPath):
    """State shared with C across calls; rebuilt from the Python rings before each call."""

    def __init__(self, drv: VsockDriver) -> None:
        super().__init__(drv, "sg_blast_state *", [drv.tx.inflight, drv.rx.inflight])
        self.free = ffi.new("uint16_t[]", drv.tx.size)

    def run(self, conn: Conn, count: int, plen: int, deadline_ms: int) -> None:
        """Send ``count`` packets of ``plen`` bytes on ``conn`` (heads already prepared)."""
        drv, s = self.drv, self.s
        tx, rx, fe = drv.tx, drv.rx, drv.fe
        sent = 0
        while True:
            if conn.state != 2:  # State.ESTABLISHED
                raise BrokenPipeError(f"connection {conn.key} closed during blast after {sent} packets")
            self._load(s.tx, tx, self._inflight[0], fe.kick_fds[tx.index], fe.call_fds[tx.index])
            self._load(s.rx, rx, self._inflight[1], fe.kick_fds[rx.index], fe.call_fds[rx.index])
            s.event_idx = 1 if tx.event_idx else 0
            s.rx_off = self.rx_off
            free = tx.free
            for k, head in enumerate(free):
                self.free[k] = head
            s.free_heads, s.nfree = self.free, len(free)
            s.guest_cid, s.peer_cid = drv.guest_cid, conn.peer_cid
            s.local_port, s.peer_port, s.type = conn.local_port, conn.peer_port, conn.type
            s.buf_alloc, s.tx_cnt = conn.buf_alloc, conn.tx_cnt
            s.peer_buf_alloc, s.peer_fwd_cnt, s.plen = conn.peer_buf_alloc, conn.peer_fwd_cnt, plen
            s.to_send, s.sent = count - sent, 0
            s.tx_done = s.kicks = s.interrupts = 0
            s.headers, s.nheaders, s.max_headers = self.headers, 0, MAX_HEADERS
            s.timeout_ms = deadline_ms
            self._wait_on(s)
            rc = lib.sg_blast(self.mem, s)
            # back into the Python rings and connection, whatever happened
            self._store(s.tx, tx)
            self._store(s.rx, rx)
            tx.free = [self.free[k] for k in range(s.nfree)]
            tx.n_inflight += s.sent - s.tx_done
            sent += s.sent
            conn.tx_cnt = s.tx_cnt
            conn.peer_buf_alloc, conn.peer_fwd_cnt = s.peer_buf_alloc, s.peer_fwd_cnt
            st = drv.stats
            st.tx_packets += s.tx_done
            st.tx_bytes += s.tx_done * plen
            st.kicks += s.kicks
            st.interrupts += s.interrupts
            st.rx_packets += s.nheaders
            self._record(s.nheaders, False)
            if rc == SG_DONE:
                return
            if rc == SG_TIMEOUT:
                raise SimGuestTimeout(f"timed out waiting for credit or tx buffers in blast after {sent} packets")
            if rc == SG_BAD:
                raise RingError(f"queue {tx.index}: a used entry names a descriptor that is not in flight")
            if rc == SG_RX:
                self.handed_back += 1
                drv.poll(0)  # the Python driver takes what C would not, then C goes on


class CDrain(_CPath):
    """The receiver's state shared with C; rebuilt from the Python rings before each call.

    Each call lends C up to ``CTL_CHAINS`` tx chains, written as one 44-byte descriptor each, to
    send the credit updates in, as a guest kernel does without waking the reader; once they ran
    out C returns SG_CREDIT and Python sends the update."""

    def __init__(self, drv: VsockDriver) -> None:
        super().__init__(drv, "sg_drain_state *", [drv.rx.inflight, drv.tx.inflight])
        self.ctl_heads = ffi.new("uint16_t[]", CTL_CHAINS)
        self.ctl_off = ffi.new("uint32_t[]", CTL_CHAINS)

    def _lend_tx(self) -> list[tuple[int, int]]:
        """Reserve tx chains for C's credit updates: (head, slot) each."""
        drv = self.drv
        tx, slots = drv.tx, drv.tx_free_slots
        lent: list[tuple[int, int]] = []
        while len(lent) < CTL_CHAINS and tx.free and slots:
            slot = slots.pop()
            gpa = drv.tx_slot_gpa(slot)
            head = tx.reserve_direct(gpa, vh.HDR_SIZE)
            self.ctl_heads[len(lent)] = head
            self.ctl_off[len(lent)] = drv.mem.offset(gpa, vh.HDR_SIZE)
            lent.append((head, slot))
        return lent

    def _settle_tx(self, lent: list[tuple[int, int]], used: int) -> None:
        drv = self.drv
        for head, slot in lent[:used]:
            drv.tx.posted_by_c(head, slot)
            drv.tx_slot_len[slot] = 0
        for head, slot in reversed(lent[used:]):
            drv.tx.unreserve(head)
            drv.tx_free_slots.append(slot)
        drv.stats.credit_updates_sent += used

    def run(self, conn: Conn, want: int, timeout_ms: int) -> tuple[int, int]:
        """Take up to ``want`` bytes of ``conn``; (return code, bytes taken)."""
        drv, s = self.drv, self.s
        rx, tx, fe = drv.rx, drv.tx, drv.fe
        self._load(s.rx, rx, self._inflight[0], fe.kick_fds[rx.index], fe.call_fds[rx.index])
        self._load(s.tx, tx, self._inflight[1], fe.kick_fds[tx.index], fe.call_fds[tx.index])
        lent = self._lend_tx()
        s.ctl_heads, s.ctl_off, s.nctl, s.ctl_used = self.ctl_heads, self.ctl_off, len(lent), 0
        s.event_idx = 1 if rx.event_idx else 0
        s.rx_off, s.rx_payload = self.rx_off, drv.rx_buf_size - vh.HDR_SIZE
        s.guest_cid, s.peer_cid = drv.guest_cid, conn.peer_cid
        s.local_port, s.peer_port, s.type = conn.local_port, conn.peer_port, conn.type
        s.buf_alloc, s.rx_cnt, s.fwd_cnt, s.last_fwd_cnt = conn.buf_alloc, conn.rx_cnt, conn.fwd_cnt, conn.last_fwd_cnt
        s.want, s.got, s.packets = want, 0, 0
        s.kicks = s.interrupts = 0
        s.headers, s.nheaders, s.max_headers = self.headers, 0, MAX_HEADERS
        s.timeout_ms = timeout_ms
        self._wait_on(s)
        rc = lib.sg_drain(self.mem, s)
        self._store(s.rx, rx)
        self._store(s.tx, tx)
        self._settle_tx(lent, s.ctl_used)
        conn.rx_cnt, conn.fwd_cnt, conn.last_fwd_cnt = s.rx_cnt, s.fwd_cnt, s.last_fwd_cnt
        st = drv.stats
        st.rx_packets += s.packets
        st.rx_bytes += s.got
        st.kicks += s.kicks
        st.interrupts += s.interrupts
        self._record(s.nheaders, True)
        if rc == SG_RX:
            self.handed_back += 1
        return rc, s.got


class CRtt(_CPath):
    """The request/response loop's state shared with C (``sg_rtt``): one connection, one mode,
    kept across calls (the phase, the round and each round's time), the rings and the
    connection reloaded before each call. Each call lends C ``RTT_CHAINS`` tx chains (a header
    and a ``size``-byte payload each, or a header alone for CONNECT); what C left posted goes
    back to the Python ring as in flight, the rest back to the free lists."""

    def __init__(self, drv: VsockDriver, conn: Conn, mode: int, rounds: int, size: int) -> None:
        super().__init__(drv, "sg_rtt_state *", [drv.rx.inflight, drv.tx.inflight])
        self.conn = conn
        self.size = size
        self.times = ffi.new("uint64_t[]", max(rounds, 1))
        self.tx_heads = ffi.new("uint16_t[]", RTT_CHAINS)
        self.tx_off = ffi.new("uint32_t[]", RTT_CHAINS)
        self.tx_busy = ffi.new("uint8_t[]", RTT_CHAINS)
        s = self.s
        s.mode, s.rounds, s.size, s.phase, s.got, s.done = mode, rounds, size, 0, 0, 0

    def _lend_tx(self) -> list[tuple[int, int]]:
        drv = self.drv
        tx, slots = drv.tx, drv.tx_free_slots
        lent: list[tuple[int, int]] = []
        header_only = self.s.mode == RTT_CONNECT
        while len(lent) < RTT_CHAINS and slots and len(tx.free) >= (1 if header_only or tx.indirect else 2):
            slot = slots.pop()
            gpa = drv.tx_slot_gpa(slot)
            head = (tx.reserve_direct(gpa, vh.HDR_SIZE) if header_only
                    else tx.reserve_pair(gpa, gpa + 64, self.size))
            k = len(lent)
            self.tx_heads[k], self.tx_off[k], self.tx_busy[k] = head, drv.mem.offset(gpa, 64 + self.size), 0
            lent.append((head, slot))
        return lent

    def _settle_tx(self, lent: list[tuple[int, int]]) -> None:
        drv = self.drv
        plen = 0 if self.s.mode == RTT_CONNECT else self.size
        returned = int(self.s.posted) - self._settle_lent(lent, self.tx_busy, [plen] * len(lent))
        drv.stats.tx_packets += returned
        drv.stats.tx_bytes += returned * plen

    def run(self, timeout_ms: int) -> int:
        """One sg_rtt call; its return code (the rings and the connection settled)."""
        drv, s, conn = self.drv, self.s, self.conn
        rx, tx, fe = drv.rx, drv.tx, drv.fe
        self._load(s.rx, rx, self._inflight[0], fe.kick_fds[rx.index], fe.call_fds[rx.index])
        self._load(s.tx, tx, self._inflight[1], fe.kick_fds[tx.index], fe.call_fds[tx.index])
        lent = self._lend_tx()
        if not lent:
            raise RingFull("no tx chain to lend the request/response loop")
        s.tx_heads, s.tx_off, s.tx_busy, s.ntx, s.posted = self.tx_heads, self.tx_off, self.tx_busy, len(lent), 0
        s.event_idx = 1 if rx.event_idx else 0
        s.rx_off, s.rx_payload = self.rx_off, drv.rx_buf_size - vh.HDR_SIZE
        s.guest_cid, s.peer_cid = drv.guest_cid, conn.peer_cid
        s.local_port, s.peer_port, s.type = conn.local_port, conn.peer_port, conn.type
        s.buf_alloc, s.tx_cnt, s.rx_cnt = conn.buf_alloc, conn.tx_cnt, conn.rx_cnt
        s.fwd_cnt, s.last_fwd_cnt = conn.fwd_cnt, conn.last_fwd_cnt
        s.peer_buf_alloc, s.peer_fwd_cnt = conn.peer_buf_alloc, conn.peer_fwd_cnt
        s.times = self.times
        s.kicks = s.interrupts = 0
        s.headers, s.nheaders, s.max_headers = self.headers, 0, MAX_HEADERS
        s.timeout_ms = timeout_ms
        self._wait_on(s)
        rx_before = conn.rx_cnt
        rc = int(lib.sg_rtt(self.mem, s))
        self._store(s.rx, rx)
        self._store(s.tx, tx)
        self._settle_tx(lent)
        conn.tx_cnt, conn.rx_cnt, conn.fwd_cnt, conn.last_fwd_cnt = s.tx_cnt, s.rx_cnt, s.fwd_cnt, s.last_fwd_cnt
        conn.peer_buf_alloc, conn.peer_fwd_cnt = s.peer_buf_alloc, s.peer_fwd_cnt
        st = drv.stats
        st.rx_packets += s.nheaders
        st.rx_bytes += (s.rx_cnt - rx_before) & 0xFFFFFFFF
        st.kicks += s.kicks
        st.interrupts += s.interrupts
        self._record(s.nheaders, True)
        if rc == SG_RX:
            self.handed_back += 1
        return rc

    def adopt(self, nbytes: int) -> None:
        """Bytes of the connection the Python driver took meanwhile count as received by C."""
        self.s.got += nbytes

    @property
    def done(self) -> int:
        return int(self.s.done)

    @property
    def last_op(self) -> int:
        return int(self.s.last_op)

    def round_ns(self) -> list[int]:
        """Each finished round's nanoseconds (PING, CONNECT)."""
        return list(ffi.unpack(self.times, int(self.s.done)))


class CSend(_CPath):
    """The sender of recorded payload (``sg_send``): packets whose bytes lie in a file, read by C
    straight into lent tx chains (guest replay of a capture). Each call lends C every free tx
    slot as a header + payload chain; what C left posted goes back to the Python ring as in
    flight (reclaimed there, as the Python sender's), the rest back to the free lists."""

    def __init__(self, drv: VsockDriver) -> None:
        super().__init__(drv, "sg_send_state *", [drv.rx.inflight, drv.tx.inflight])
        n = len(drv.tx_slot_len)  # every tx slot, at most, is lent
        self.tx_heads = ffi.new("uint16_t[]", n)
        self.tx_off = ffi.new("uint32_t[]", n)
        self.len_off = ffi.new("uint32_t[]", n)
        self.tx_busy = ffi.new("uint8_t[]", n)
        self.free_k = ffi.new("uint32_t[]", n)
        self.slot_of = ffi.new("uint32_t[]", drv.tx.size)

    def _lend_tx(self) -> list[tuple[int, int]]:
        from .driver import TX_SLOT_HDR

        drv = self.drv
        tx, slots = drv.tx, drv.tx_free_slots
        lent: list[tuple[int, int]] = []
        while slots and len(lent) < len(self.tx_busy) and len(tx.free) >= (1 if tx.indirect else 2):
            slot = slots.pop()
            gpa = drv.tx_slot_gpa(slot)
            head = tx.reserve_pair(gpa, gpa + TX_SLOT_HDR, vh.MAX_PKT_PAYLOAD)
            # where the payload descriptor's length is: C writes each packet's there
            if tx.indirect:
                len_gpa = tx.indirect_table_gpa(head) + DESC_SIZE + 8
            else:
                len_gpa = tx.desc_gpa + tx._extra[head][0] * DESC_SIZE + 8
            k = len(lent)
            self.tx_heads[k], self.tx_busy[k], self.free_k[k] = head, 0, k
            self.tx_off[k] = drv.mem.offset(gpa, TX_SLOT_HDR + vh.MAX_PKT_PAYLOAD)
            self.len_off[k] = drv.mem.offset(len_gpa, 4)
            self.slot_of[head] = k
            lent.append((head, slot))
        return lent

    def _settle_tx(self, lent: list[tuple[int, int]], lens: list[int]) -> None:
        self._settle_lent(lent, self.tx_busy, lens)

    def run(self, conn: Conn, fd: int, offs: Any, lens: Any, flags: Any, start: int, part: int, npkts: int,
            timeout_ms: int) -> tuple[int, int, int]:
        """Send packets ``start`` .. ``npkts - 1`` of the arrays (cffi ``uint64_t[]`` offsets,
        ``uint32_t[]`` lengths and flags), packet ``start`` from its byte ``part``; (return
        code, the next packet to send, its bytes already sent)."""
        drv, s = self.drv, self.s
        rx, tx, fe = drv.rx, drv.tx, drv.fe
        self._load(s.rx, rx, self._inflight[0], fe.kick_fds[rx.index], fe.call_fds[rx.index])
        self._load(s.tx, tx, self._inflight[1], fe.kick_fds[tx.index], fe.call_fds[tx.index])
        lent = self._lend_tx()
        if not lent:
            raise RingFull("no tx chain to lend the sender")
        s.tx_heads, s.tx_off, s.len_off, s.tx_busy = self.tx_heads, self.tx_off, self.len_off, self.tx_busy
        s.slot_of, s.free_k, s.ntx, s.nfree = self.slot_of, self.free_k, len(lent), len(lent)
        s.event_idx = 1 if tx.event_idx else 0
        s.rx_off = self.rx_off
        s.guest_cid, s.peer_cid = drv.guest_cid, conn.peer_cid
        s.local_port, s.peer_port, s.type = conn.local_port, conn.peer_port, conn.type
        s.buf_alloc, s.tx_cnt, s.fwd_cnt = conn.buf_alloc, conn.tx_cnt, conn.fwd_cnt
        s.peer_buf_alloc, s.peer_fwd_cnt = conn.peer_buf_alloc, conn.peer_fwd_cnt
        s.fd, s.offs, s.lens, s.flags, s.npkts, s.sent, s.part = fd, offs, lens, flags, npkts, start, part
        s.bytes = s.tx_done = s.kicks = s.interrupts = 0
        s.headers, s.nheaders, s.max_headers = self.headers, 0, MAX_HEADERS
        s.err = 0
        s.timeout_ms = timeout_ms
        self._wait_on(s)
        rc = int(lib.sg_send(self.mem, s))
        self._store(s.rx, rx)
        self._store(s.tx, tx)
        # each lent chain's packet length, for the chains C left in flight: read back from the
        # header C wrote (its len field)
        buf = drv.mem.buf
        in_flight = [int.from_bytes(buf[self.tx_off[k] + 24 : self.tx_off[k] + 28], "little") if self.tx_busy[k]
                     else 0 for k in range(len(lent))]
        self._settle_tx(lent, in_flight)
        conn.tx_cnt = s.tx_cnt
        conn.last_fwd_cnt = conn.fwd_cnt  # every header C wrote advertised it
        conn.peer_buf_alloc, conn.peer_fwd_cnt = s.peer_buf_alloc, s.peer_fwd_cnt
        st = drv.stats
        st.tx_packets += s.tx_done
        st.tx_bytes += s.bytes - sum(in_flight)
        st.kicks += s.kicks
        st.interrupts += s.interrupts
        st.rx_packets += s.nheaders
        self._record(s.nheaders, False)
        if rc == SG_RX:
            self.handed_back += 1
        return rc, int(s.sent), int(s.part)

    @property
    def read_errno(self) -> int:
        return int(self.s.err)
