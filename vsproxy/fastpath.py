"""The tx hot loop in C (``vsproxy._fastpath``), when it was built.

``TxFastPath.batch`` takes up to ``limit`` chains off a tx queue. Linux-shaped RW packets
of established-looking streams come back grouped in runs (one per connection and batch,
small payloads already copied together), header-only credit packets as their fields; every
other chain comes back as "slow", for the Python walker, which stays the reference. Set
``VSPROXY_NO_C=1`` to run without it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from vsproxy._ext import load
from vsproxy.memory import GuestMemory
from vsproxy.taps import CAP_COMMENT_MAX, CAP_NONE, CaptureSink, RecordChunk, Taps
from vsproxy.virtq import SplitQueue
from vsproxy.vsock.lending import (  # the records and flags C shares with the core, defined sans-I/O
    OWN_F_TX,
    OWN_F_WAIT,
    OWN_TAKEN,
    OwnedBack,
    OwnedCounts,
)
from vsproxy.vsock.rx import RX_SLOW, RxFill

ffi, lib = load("vsproxy._fastpath")
AVAILABLE = lib is not None

__all__ = ["AVAILABLE", "CREDIT", "MAX_REGIONS", "SEG_SCRATCH", "SEQPACKET", "SLOW", "STREAM", "TAIL", "CaptureCall",
           "CreditItem", "Run", "RxFastPath", "RxFill", "Slow", "Tail", "TxFastPath", "ffi", "lib", "memory_ok"]

SCRATCH = 256 * 1024
MAX_ITEMS = 512
SLOW = 1
CREDIT = 2
TAIL = 3
# vq_item.type of a run (virtio_vsock.h VIRTIO_VSOCK_TYPE_*)
STREAM = 1
SEQPACKET = 2
# A run's segment in the scratch buffer (vq_tx_ctx.seg_kind); one in guest memory has its region's index.
SEG_SCRATCH = 255
# The regions C's memory table (vq_mem) holds: vhost-user's VHOST_MEMORY_BASELINE_NREGIONS, as many as
# SET_MEM_TABLE takes (vhost_user/codec.py MAX_MEM_REGIONS).
MAX_REGIONS = 8
# Connections C may run at once between credit updates; more wait for a free slot in Python.
OWN_SLOTS = 64
# How long vq_tx_kick watches the tx avail ring for the guest's next credit update before it
# re-enables kicks and returns to the loop: the kick and wake-up it saves cost more than this
# (the host->guest rows of benchmarks/bench_throughput.py show it). Only while a connection C
# runs waits for the guest's credit; other fds wait at most this long. A guest sending data is
# not watched for: left alone it fills the ring for one big batch, which small payloads gain
# more from than from the watch, and the CPU the watch takes is its.
TX_SPIN_NS = 30_000
# What vq_own_fill left: C waits for the host socket, for the guest's credit, or gave it back.
FILL_WAIT_HOST, FILL_WAIT_GUEST, FILL_BACK = 1, 0, -1
# What vq_tx_kick left: nothing (kicks on again), its last batch's items, the pump's turn.
KICK_DONE, KICK_ITEMS, KICK_PUMP = 0, 1, 2


class Run(NamedTuple):
    src_port: int
    dst_cid: int
    dst_port: int
    buf_alloc: int
    fwd_cnt: int
    total: int
    segments: list[memoryview]
    heads: list[int]
    cap_off: int  # where the run's capture records start in the lent chunk (one per chain)
    cap_rec: int  # the records before them in the chunk
    marked: bool  # its records carry the connection's capture comment (C ran it)
    type: int = STREAM
    # SEQPACKET: each packet's flags (SEQ_EOM, SEQ_EOR); each segment is one packet's payload
    flags: tuple[int, ...] = ()


class Tail(NamedTuple):
    """What the host socket did not take of a run C sent for a connection it ran: received
    and counted already (the connection is Python's again), to be queued for the peer."""

    src_port: int
    dst_cid: int
    dst_port: int
    total: int
    segments: list[memoryview]
    heads: list[int]
    type: int = STREAM
    flags: tuple[int, ...] = ()  # SEQPACKET: each segment a whole message, these its flags


def _no_fd() -> int:
    return -1


def _counts(e: Any) -> OwnedCounts:
    """The counts of a vq_own entry."""
    return OwnedCounts(int(e.credit_items), int(e.packets), int(e.bytes), int(e.tx_packets), int(e.tx_bytes),
                       int(e.updates_sent), int(e.sends), int(e.ra_bytes))


class CaptureCall:
    """A vq_cap for C calls: records straight into a chunk the capture sink lends, or none.

    ``open`` while the chunk is lent (``arm``); ``finish`` gives it back with every record C
    wrote, ``cut`` gives it back without the records of an item Python takes through its own
    path (and of the items after it: Python captures them again). Every C call of a device
    writes into the one vq_cap, so the records of a batch, of what C did for the connections it
    runs, and of connections it gave back on the way, stand in ring order."""

    def __init__(self) -> None:
        self.cap = ffi.new("vq_cap *")
        self.cap.mode = CAP_NONE
        self.sink: CaptureSink | None = None
        self.chunk: RecordChunk | None = None
        self.was_cut = False  # records from some item on were cut: later items go through Python
        self.no_room = False  # capturing, but the sink had no chunk to lend
        # where the last batch's records ended: records past it (connections Python took back
        # from C while the chunk was lent) stand even when an item of the batch is cut
        self._batch_used = 0
        self._batch_records = 0

    def arm(self, sink: CaptureSink | None, device: str) -> Any:
        cap = self.cap
        cap.records = 0
        cap.dropped = 0
        self.sink = sink
        self.chunk = chunk = sink.reserve() if sink is not None else None
        self.was_cut = False
        self.no_room = sink is not None and chunk is None
        if sink is None or chunk is None:
            cap.mode = CAP_NONE
            return cap
        if chunk.native is None:
            chunk.native = ffi.from_buffer("uint8_t[]", chunk.view)
        cap.buf = chunk.native
        cap.size = chunk.size
        cap.used = self._batch_used = chunk.used
        self._batch_records = 0
        cap.mode = sink.record_mode
        cap.snaplen = sink.snaplen
        cap.iface = sink.interface(device)
        cap.ts_us = int(time.time() * 1_000_000)
        return cap

    def arm_unless_open(self, sink: CaptureSink | None, device: str) -> bool:
        """Arm for one C call outside a batch, unless the chunk is lent already (then C appends
        to it). True: the caller finishes after the call."""
        if self.chunk is not None:
            return False
        self.arm(sink, device)
        return True

    def batch_done(self) -> None:
        """The batch's C call returned: what C writes from now on is not the batch's."""
        self._batch_used = int(self.cap.used)
        self._batch_records = int(self.cap.records)

    @property
    def open(self) -> bool:
        return self.chunk is not None

    def dropped(self, packets: int) -> None:
        """Packets the C path handled: with no room in the sink they count as dropped."""
        if self.no_room and self.sink is not None and packets:
            self.sink.drop(packets)

    def cut(self, offset: int, records: int) -> None:
        """Give the chunk back with the records before ``offset`` (``records`` of them, the
        first item's Python takes), and those C wrote after the batch."""
        sink, chunk, cap = self.sink, self.chunk, self.cap
        if sink is None or chunk is None:
            return
        used, total = int(cap.used), int(cap.records)
        after = used - self._batch_used
        if after > 0:  # rare: a connection taken back from C while the chunk was lent
            chunk.view[offset : offset + after] = bytes(chunk.view[self._batch_used : used])
        self._give_back(offset + max(after, 0), records + total - self._batch_records)
        self.was_cut = True

    def finish(self) -> None:
        if self.chunk is not None:
            self._give_back(int(self.cap.used), int(self.cap.records))

    def _give_back(self, used: int, records: int) -> None:
        sink, chunk, cap = self.sink, self.chunk, self.cap
        assert sink is not None and chunk is not None
        self.chunk = None
        cap.mode = CAP_NONE  # no C call writes into a chunk given back
        sink.release(chunk, used, records)
        if cap.dropped:
            sink.drop(int(cap.dropped))
            cap.dropped = 0


class Slow(NamedTuple):
    head: int


class CreditItem(NamedTuple):
    """A header-only CREDIT_UPDATE or CREDIT_REQUEST (one descriptor, as Linux sends them)."""

    type: int
    op: int
    src_port: int
    dst_cid: int
    dst_port: int
    buf_alloc: int
    fwd_cnt: int
    head: int
    cap_off: int
    cap_rec: int


def memory_ok(mem: GuestMemory) -> bool:
    """The C paths can take this guest memory: 1..MAX_REGIONS regions, their guest ranges
    disjoint (SET_MEM_TABLE refuses overlaps; a table built in a test might not), so that a
    guest buffer lies in at most one region whichever C looks at first."""
    ranges = sorted((r.guest_addr, r.guest_end) for r in mem.regions)
    return 1 <= len(ranges) <= MAX_REGIONS and all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


class _RingPath:
    """What both C paths hold of one queue: the guest memory's regions (the memory table C
    translates guest addresses through), the descriptor table and the avail ring as cffi
    buffers, and the capture taps of the device."""

    def __init__(self, q: SplitQueue, taps: Taps | None, device: str) -> None:
        assert AVAILABLE and memory_ok(q.mem)
        self.q = q
        self.taps = taps if taps is not None else Taps()
        self.device = device
        self.capture = CaptureCall()
        regions = q.mem.regions
        # the regions' views, in table order: a run's segment in guest memory names its region
        self._views = [r.view for r in regions]
        self._keep: list[Any] = [*self._views, q._desc, q._avail16]
        bases = [ffi.from_buffer("uint8_t[]", v) for v in self._views]
        mem = self._mem = ffi.new("vq_mem *")
        for k, (r, base) in enumerate(zip(regions, bases, strict=True)):
            mem.r[k].base, mem.r[k].gpa, mem.r[k].size = base, r.guest_addr, r.size
        mem.n, mem.last = len(regions), 0
        self._desc = ffi.from_buffer("uint8_t[]", q._desc)
        self._avail_buf = ffi.from_buffer("uint8_t[]", q._avail16.cast("B"))
        self._avail = ffi.cast("uint16_t *", self._avail_buf)
        self._release: list[Any] = [*bases, self._desc, self._avail_buf]

    def close(self) -> None:
        """Give the guest-memory buffers back now, so the mapping can be unmapped cleanly (a
        cffi buffer left to the garbage collector can outlive its mmap at interpreter exit)."""
        for cdata in self._release:
            ffi.release(cdata)
        self._release.clear()
        self._keep.clear()


class TxFastPath(_RingPath):
    def __init__(self, q: SplitQueue, guest_cid: int, limit: int, taps: Taps | None = None, device: str = "") -> None:
        super().__init__(q, taps, device)
        self.limit = limit
        self.guest_cid = guest_cid
        self._heads = ffi.new("uint16_t[]", limit)
        self._items = ffi.new("vq_item[]", MAX_ITEMS)
        self._scratch_buf = bytearray(SCRATCH)
        self._scratch = ffi.from_buffer("uint8_t[]", self._scratch_buf)
        self._scratch_view = memoryview(self._scratch_buf)
        self._seg_kind = ffi.new("uint8_t[]", limit)
        self._seg_off = ffi.new("uint64_t[]", limit)
        self._seg_len = ffi.new("uint32_t[]", limit)
        self._seg_flags = ffi.new("uint32_t[]", limit)
        self._release.append(self._scratch)
        c = self._ctx = ffi.new("vq_tx_ctx *")
        c.mem = self._mem
        c.desc, c.avail, c.num = self._desc, self._avail, q.num
        c.indirect_ok, c.guest_cid = 1 if q.indirect else 0, guest_cid
        c.heads, c.items, c.max_items = self._heads, self._items, MAX_ITEMS
        c.scratch, c.scratch_size = self._scratch, SCRATCH
        c.seg_kind, c.seg_off, c.seg_len, c.max_segs = self._seg_kind, self._seg_off, self._seg_len, limit
        c.seg_flags = self._seg_flags
        self._own = ffi.new("vq_own[]", OWN_SLOTS)
        self._consumed = ffi.new("uint16_t[]", limit)
        c.own, c.nown, c.owned, c.consumed = self._own, OWN_SLOTS, 0, self._consumed
        c.cap = self.capture.cap  # every C call of this path writes its records there (armed or not)
        self._comments: list[Any] = [None] * OWN_SLOTS  # each slot's capture comment, kept alive for C
        # the used side, for kick()
        self._keep.append(q._used16)
        used = self._used_buf = ffi.from_buffer("uint8_t[]", q._used16.cast("B"))
        self._release.append(used)
        c.tx_used, c.tx_used_idx_p = ffi.cast("uint32_t *", used) + 1, ffi.cast("uint16_t *", used) + 1
        c.tx_avail_event_p = ffi.cast("uint16_t *", used) + 2 + 4 * q.num
        c.tx_event_idx, c.limit = 1 if q.event_idx else 0, limit
        c.spin_ns = TX_SPIN_NS
        self._tokens: list[object | None] = [None] * OWN_SLOTS
        self._free_slots = list(range(OWN_SLOTS - 1, -1, -1))
        self._rx: RxFastPath | None = None
        self._call_fd: Callable[[], int] = _no_fd
        self.consumed: list[int] = []  # heads of the last batch's chains C handled entirely
        self.released: list[tuple[object, OwnedBack]] = []  # what the last batch gave back
        self.waiting: list[object] = []  # owned connections whose host socket the last call found dry

    def close(self) -> None:
        for k in range(OWN_SLOTS):
            lib.vq_own_free_ra(self._own + k)  # a slot's read-ahead buffer is C's malloc
        super().close()

    def set_poll(self, ns: int) -> None:
        """--busy-poll: how long vq_tx_kick polls for the next turn of the connections C runs
        before it re-enables kicks and returns (0: never)."""
        self._ctx.poll_ns = self._ctx.poll_cur = ns

    def poll_counts(self) -> tuple[int, int, int]:
        """What vq_tx_kick's polling cost and caught since the last call: ns, hits, misses."""
        c = self._ctx
        got = (int(c.poll_spent_ns), int(c.poll_hits), int(c.poll_misses))
        c.poll_spent_ns = c.poll_hits = c.poll_misses = 0
        return got

    # -- owned connections: C takes their credit updates and refills the rx ring itself ------------
    def attach_rx(self, rx: RxFastPath, call_fd: Callable[[], int], burst: int, max_packets: int) -> bool:
        """Let batches fill ``rx`` for owned connections (both queues in the one guest memory)."""
        if rx.q.mem is not self.q.mem:
            return False
        c = self._ctx
        c.rx_desc, c.rx_avail, c.rx_used = rx._desc, rx._avail, rx._used
        c.rx_used_idx_p = ffi.cast("uint16_t *", rx._used_buf) + 1
        c.rx_num, c.rx_event_idx = rx.q.num, 1 if rx.q.event_idx else 0
        c.rx_burst, c.rx_max_packets = burst, max_packets
        self._rx, self._call_fd = rx, call_fd
        return True

    def detach_rx(self) -> None:
        """The rx queue goes away: every slot is freed (VsockCore.detach_owner took the
        connections back first)."""
        for k in range(OWN_SLOTS):
            if self._tokens[k] is not None:
                self._back(k, OWN_TAKEN)
        self._rx = None

    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None,
            comment: bytes = b"") -> int:
        """Lend C a connection; its slot, or -1 (no room, no rx, a comment too long for C).
        ``tx``: C takes the guest's data too, with this guest -> host credit (buf_alloc, rx_cnt,
        fwd_cnt, adv_fwd_cnt). ``comment``: the capture comment of its packets (its mark)."""
        text = comment
        if self._rx is None or not self._free_slots or len(text) > CAP_COMMENT_MAX:
            return -1
        k = self._free_slots.pop()
        e = self._own[k]
        if text:
            self._comments[k] = buf = ffi.new("uint8_t[]", text)
            e.comment, e.comment_len = buf, len(text)
        else:
            self._comments[k] = None
            e.comment, e.comment_len = ffi.NULL, 0
        e.type, e.guest_port, e.peer_cid, e.peer_port = key
        e.fd, e.tx_cnt, e.peer_buf_alloc, e.peer_fwd_cnt = fd, tx_cnt, peer_buf_alloc, peer_fwd_cnt
        ffi.memmove(e.hdr, hdr, 44)
        if tx is not None:
            flags |= OWN_F_TX
            e.buf_alloc, e.rx_cnt, e.fwd_cnt, e.adv_fwd_cnt = tx
        else:
            flags &= ~OWN_F_TX
            e.fwd_cnt = e.adv_fwd_cnt = int.from_bytes(hdr[40:44], "little")  # as the header says
        e.flags, e.release, e.err, e.ahead = flags, 0, 0, 0
        e.updates = e.credit_items = e.packets = e.bytes = 0
        e.tx_packets = e.tx_bytes = e.updates_sent = e.sends = e.ra_bytes = 0
        e.active = 1
        self._ctx.owned += 1
        self._tokens[k] = token
        return k

    def progress(self, slot: int) -> int:
        """Changes with every credit update C took for the slot."""
        return int(self._own[slot].updates)

    def shut(self, slot: int) -> bool:
        """True while the guest's window of the slot's connection is shut."""
        e = self._own[slot]
        return bool((e.tx_cnt - e.peer_fwd_cnt) & 0xFFFFFFFF >= e.peer_buf_alloc)

    def counts(self, slot: int) -> OwnedCounts:
        """What C did since the last call, for Python's counters while C keeps the connection."""
        e = self._own[slot]
        got = _counts(e)
        e.credit_items = e.packets = e.bytes = 0
        e.tx_packets = e.tx_bytes = e.updates_sent = e.sends = e.ra_bytes = 0
        return got

    def peek(self, slot: int) -> OwnedBack:
        """The slot's credit state and what C did since Python last looked, changing nothing
        (snapshots read this; ``counts`` hands the counts over)."""
        e = self._own[slot]
        return OwnedBack(0, e.err, e.tx_cnt, e.peer_buf_alloc, e.peer_fwd_cnt, e.flags, _counts(e), e.rx_cnt,
                         e.fwd_cnt, e.adv_fwd_cnt, e.ahead, b"")

    def take_back(self, slot: int) -> OwnedBack:
        """Python needs the connection: C lets go of it, and of the rx chains it holds for
        it (their bytes come back as ``prebuf``)."""
        rx = self._rx
        if rx is not None and self._own[slot].rs_n:
            self._load_rx(rx.q)
            capture = self.capture
            armed = capture.arm_unless_open(self.taps.sink, self.device)
            lib.vq_own_take(self._ctx, slot)
            if armed:
                capture.finish()
                capture.dropped(self._ctx.rx_chains)
            self._store_ring(rx.q)
        return self._back(slot, OWN_TAKEN)

    def _back(self, k: int, why: int) -> OwnedBack:
        e = self._own[k]
        if e.active:
            e.active = 0
            self._ctx.owned -= 1
        else:
            why = e.release
        self._tokens[k] = None
        self._comments[k] = None
        e.comment, e.comment_len = ffi.NULL, 0
        self._free_slots.append(k)
        prebuf = b""
        if e.ra != ffi.NULL:
            if e.ra_len:
                prebuf = ffi.buffer(e.ra, e.ra_len)[:]
            lib.vq_own_free_ra(self._own + k)
        e.rs_first = e.rs_n = 0  # chains still held here go with the ring (detach_rx)
        return OwnedBack(why, e.err, e.tx_cnt, e.peer_buf_alloc, e.peer_fwd_cnt, e.flags, _counts(e), e.rx_cnt,
                         e.fwd_cnt, e.adv_fwd_cnt, e.ahead, prebuf)

    def fill(self, slot: int) -> OwnedBack | bool:
        """The host socket of a connection C waits for (``waiting``) is readable: C reads it into
        the rx ring. True: C still waits for the socket; False: it keeps the connection but
        waits for the guest's credit (stop watching the socket); else it gave it back: why."""
        rx = self._rx
        if rx is None:
            return self.take_back(slot)
        self._load_rx(rx.q)
        capture = self.capture
        armed = capture.arm_unless_open(self.taps.sink, self.device)
        r = int(lib.vq_own_fill(self._ctx, slot))
        if armed:
            capture.finish()
            capture.dropped(self._ctx.rx_chains)
        self._store_rx(rx.q)
        if r == FILL_BACK:
            released, self.released = self.released, []
            return released[0][1] if released else self.take_back(slot)
        return r == FILL_WAIT_HOST

    def _load_rx(self, rx: SplitQueue) -> None:
        ctx = self._ctx
        ctx.rx_last_avail, ctx.rx_used_idx, ctx.rx_signalled = rx.last_avail_idx, rx.used_idx, rx._signalled_used
        ctx.rx_call_fd = self._call_fd()

    def _store_ring(self, rx: SplitQueue) -> None:
        ctx = self._ctx
        # last_avail moves without a used chain too: C reads ahead into chains it holds
        rx.last_avail_idx = ctx.rx_last_avail
        if ctx.rx_chains:
            rx.used_idx = ctx.rx_used_idx
            rx._signalled_used = ctx.rx_signalled
            rx.counters.chains += ctx.rx_chains
            rx.counters.notifications += ctx.rx_notifications

    def _store_rx(self, rx: SplitQueue) -> None:
        """What C did to the rx queue and the owned connections, in Python's shadows."""
        self._store_ring(rx)
        ctx = self._ctx
        own, tokens = self._own, self._tokens
        self.released = ([(tokens[k], self._back(k, 0)) for k in range(OWN_SLOTS)
                          if tokens[k] is not None and not own[k].active] if ctx.released else [])
        self.waiting = ([tokens[k] for k in range(OWN_SLOTS) if tokens[k] is not None and own[k].active
                         and own[k].flags & OWN_F_WAIT] if ctx.waits else [])

    def batch(self) -> list[Run | Slow | CreditItem | Tail]:
        """Take the next chains. The scratch buffer is reused by the next call: whatever the
        caller keeps of a run's segments must be copied or sent before then. Capturing, the
        runs' records are already in the chunk ``self.capture`` holds: the caller keeps or
        cuts them (``cut``/``finish``) before anything else is captured."""
        q = self.q
        n = min(q.pending(), self.limit)
        if n == 0:
            return []
        ctx = self._ctx
        rx = self._rx.q if ctx.owned and self._rx is not None else None
        if rx is not None:
            self._load_rx(rx)
            ctx.own_ok = 0 if self.taps.per_packet else 1
        capture = self.capture
        count = lib.vq_tx_batch(ctx, q.last_avail_idx, n, capture.arm(self.taps.sink, self.device))
        if count < 0:  # pragma: no cover - MAX_ITEMS >= limit, so items cannot run out
            raise RuntimeError("vq_tx_batch: item array too small")
        capture.batch_done()
        if capture.no_room:  # what C did alone for the connections it runs went uncaptured
            capture.dropped(ctx.nconsumed + (ctx.rx_chains if rx is not None else 0))
        if rx is not None:
            self._store_rx(rx)
            self.consumed = ffi.unpack(self._consumed, ctx.nconsumed) if ctx.nconsumed else []
        else:
            self.consumed, self.released, self.waiting = [], [], []
        q.last_avail_idx = (q.last_avail_idx + ctx.taken) & 0xFFFF
        return self._records(count)

    def kick(self, kick_fd: int, call_fd: int) -> list[Run | Slow | CreditItem | Tail] | None:
        """The guest kicked the tx queue while C runs connections and nothing is captured or
        tapped: C reads the kick and handles what it can alone (vq_tx_kick). None: every chain
        was handled and returned, kicks are on again (``waiting`` still to be watched).
        Otherwise the caller goes on as after ``batch``, with these items (maybe none) and
        ``consumed``/``released``/``waiting``, then runs the pump."""
        q, ctx = self.q, self._ctx
        rx = self._rx.q if self._rx is not None else None
        if rx is not None:
            self._load_rx(rx)
        ctx.own_ok = 1
        capture = self.capture
        capture.arm(self.taps.sink, self.device)  # the caller checked: no per-packet tap
        ctx.kick_fd, ctx.tx_call_fd = kick_fd, call_fd
        ctx.tx_last_avail, ctx.tx_used_idx, ctx.tx_signalled = q.last_avail_idx, q.used_idx, q._signalled_used
        status = lib.vq_tx_kick(ctx)
        capture.batch_done()
        if capture.no_room:  # the chains C handled alone, and what it wrote to the guest
            capture.dropped(ctx.tx_chains + ctx.rx_chains + ctx.nconsumed)
        q.last_avail_idx, q.used_idx, q._signalled_used = ctx.tx_last_avail, ctx.tx_used_idx, ctx.tx_signalled
        q.counters.chains += ctx.tx_chains
        q.counters.notifications += ctx.tx_notifications
        if rx is not None:
            self._store_rx(rx)
        if status == KICK_DONE:
            capture.finish()
            return None
        if status == KICK_PUMP:
            self.consumed = []
            return []  # the caller finishes the capture
        self.consumed = ffi.unpack(self._consumed, ctx.nconsumed) if ctx.nconsumed else []
        return self._records(ctx.kick_items)

    def _records(self, count: int) -> list[Run | Slow | CreditItem | Tail]:
        """The last vq_tx_batch call's items, as records."""
        heads = ffi.unpack(self._heads, self._ctx.taken)
        out: list[Run | Slow | CreditItem | Tail] = []
        views, scratch = self._views, self._scratch_view
        kinds, offs, lens = self._seg_kind, self._seg_off, self._seg_len
        for it in self._items[0:count]:
            kind = it.kind
            if kind == SLOW:
                out.append(Slow(heads[it.chain]))
                continue
            if kind == CREDIT:
                out.append(CreditItem(it.type, it.op, it.src_port, it.dst_cid, it.dst_port, it.buf_alloc,
                                      it.fwd_cnt, heads[it.chain], it.cap_off, it.cap_rec))
                continue
            segs = []
            for k in range(it.seg_first, it.seg_first + it.nseg):
                o, ln = offs[k], lens[k]
                where = kinds[k]
                segs.append(scratch[o : o + ln] if where == SEG_SCRATCH else views[where][o : o + ln])
            type_ = int(it.type)
            flags = tuple(ffi.unpack(self._seg_flags + it.seg_first, it.nseg)) if type_ == SEQPACKET else ()
            if kind == TAIL:
                out.append(Tail(it.src_port, it.dst_cid, it.dst_port, it.total, segs,
                                heads[it.chain : it.chain + it.nchains], type_, flags))
                continue
            out.append(
                Run(
                    it.src_port,
                    it.dst_cid,
                    it.dst_port,
                    it.buf_alloc,
                    it.fwd_cnt,
                    it.total,
                    segs,
                    heads[it.chain : it.chain + it.nchains],
                    it.cap_off,
                    it.cap_rec,
                    bool(it.marked),
                    type_,
                    flags,
                )
            )
        return out


class RxFastPath(_RingPath):
    """Host socket data straight into rx chains of the Linux shape, in C."""

    def __init__(self, q: SplitQueue, taps: Taps | None = None, device: str = "") -> None:
        super().__init__(q, taps, device)
        self._keep.append(q._used32)
        self._used_buf = ffi.from_buffer("uint8_t[]", q._used32.cast("B"))
        self._used = ffi.cast("uint32_t *", self._used_buf) + 1
        self._release.append(self._used_buf)
        self._res = ffi.new("vq_rx_result *")

    def fill(self, fd: int, credit: int, max_packets: int, hdr: bytes, comment: bytes = b"",
             msg_limit: int = -1) -> RxFill:
        """Read from ``fd`` into up to ``max_packets`` chains within ``credit`` bytes; each
        packet gets ``hdr`` with its len patched in, and ``comment`` as its capture comment.
        ``msg_limit`` >= 0: a SEQPACKET socket, whole messages of at most that many bytes
        (vq_rx_fill_seq), EOM on the last packet of each. Used elements are added (publish
        later)."""
        q = self.q
        n = q.pending()
        if n == 0:
            return RxFill(0, 0, RX_SLOW, 0)
        r = self._res
        capture = self.capture
        cap = capture.arm(self.taps.sink, self.device)
        if msg_limit >= 0:
            lib.vq_rx_fill_seq(self._mem, self._desc, self._avail, q.num, q.last_avail_idx, n, self._used,
                               q.used_idx, fd, credit, max_packets, msg_limit, hdr, r, cap, comment, len(comment))
        else:
            lib.vq_rx_fill(self._mem, self._desc, self._avail, q.num, q.last_avail_idx, n, self._used, q.used_idx,
                           fd, credit, max_packets, hdr, r, cap, comment, len(comment))
        capture.finish()
        capture.dropped(r.packets)
        if r.packets:
            q.last_avail_idx = (q.last_avail_idx + r.packets) & 0xFFFF
            q.used_idx = (q.used_idx + r.packets) & 0xFFFF
            q.counters.chains += r.packets
        return RxFill(r.packets, r.bytes, r.status, r.err)

    def put(self, hdr: bytes) -> bool:
        """A header-only packet into the next rx chain if it has the Linux shape (then it is
        added to the used ring, to publish later); False, and nothing written, otherwise."""
        q = self.q
        n = q.pending()
        if n == 0:
            return False
        capture = self.capture
        cap = capture.arm(self.taps.sink, self.device)
        ok = lib.vq_rx_put(self._mem, self._desc, self._avail, q.num, q.last_avail_idx, n,
                           self._used, q.used_idx, hdr, cap)
        capture.finish()
        if not ok:
            return False
        capture.dropped(1)
        q.last_avail_idx = (q.last_avail_idx + 1) & 0xFFFF
        q.used_idx = (q.used_idx + 1) & 0xFFFF
        q.counters.chains += 1
        return True
