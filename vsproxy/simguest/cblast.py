"""The simulated guest's bulk sender and receiver in C (``sg_blast`` and ``sg_drain`` in
vsproxy.simguest._cblast, built from vsproxy/simguest/_c/), when it was built.

A guest kernel spends a few microseconds per packet where the Python driver spends tens, and on
a two-core machine the benchmark's guest shares the cores with vsproxy: in Python it would be
measured as much as vsproxy. The sender keeps the tx ring full within the peer's credit and takes
the connection's CREDIT_UPDATEs off the rx ring; the receiver takes the connection's RW packets,
checks and returns credit as Linux 6.1 does (the CREDIT_UPDATE itself is sent by Python). Both
hand anything else back to the Python driver, which stays the reference (``VSPROXY_NO_C=1``, or
``driver.use_c_blast = False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vsproxy._ext import load
from vsproxy.vsock import header as vh

from .errors import RingError, SimGuestTimeout
from .ring import SplitRing

if TYPE_CHECKING:
    from .driver import Conn, VsockDriver

ffi, lib = load("vsproxy.simguest._cblast")
AVAILABLE = lib is not None

SG_DONE, SG_RX, SG_TIMEOUT, SG_BAD, SG_HEADERS, SG_CREDIT = range(6)  # _c/cblast.h
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
