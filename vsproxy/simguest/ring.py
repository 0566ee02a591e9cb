"""Driver side of a split virtqueue, in simulated guest RAM.

Two uses: the simulated guest's data path (add chains, kick only when the device wants it,
reclaim used entries), and a ring builder for backend unit tests, which need to place raw,
possibly malicious descriptors (bad addresses, loops, nested indirect, avail index jumps).

Ring indices are shared with the backend, which runs concurrently: each is read or written with one
aligned 16-bit access through ``GuestMemory.u16`` (``struct.pack_into`` tears them, see
virtio-vsock.md), and ring entries are written before the index that publishes them.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from .errors import RingError, RingFull
from .memory import GuestMemory

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
LEGACY_ALIGN = 4096
# Entries in each head's preallocated indirect table; longer chains get a fresh table.
INDIRECT_SLOTS = 4
HDR_LEN = 44  # a virtio-vsock header (reserve_pair)


class Buf(NamedTuple):
    """One buffer of a chain: guest-physical address, length, device-writable or not."""

    addr: int
    len: int
    writable: bool = False


class Used(NamedTuple):
    head: int
    len: int
    token: int


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Linux/virtio vring_need_event: did the other side ask to be notified within (old, new]?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class SplitRing:
    """A split virtqueue owned by the driver: descriptor table, avail ring (driver writes), used ring."""

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        legacy_layout: bool = False,
    ) -> None:
        if size <= 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.mem = mem
        self.index = index
        self.size = size
        self.mask = size - 1
        self.event_idx = event_idx
        self.indirect = indirect
        avail_bytes = 6 + 2 * size
        used_bytes = 6 + 8 * size
        if legacy_layout:
            # Legacy (virtio 0.9.5) contiguous layout: used ring on the next 4 KiB boundary.
            used_off = (DESC_SIZE * size + avail_bytes + LEGACY_ALIGN - 1) & ~(LEGACY_ALIGN - 1)
            base = mem.alloc(used_off + used_bytes, LEGACY_ALIGN)
            self.desc_gpa, self.avail_gpa, self.used_gpa = base, base + DESC_SIZE * size, base + used_off
        else:
            # Virtio 1.x minimum alignments (16/2/4), deliberately not page aligned.
            self.desc_gpa = mem.alloc(DESC_SIZE * size, 16)
            self.avail_gpa = mem.alloc(avail_bytes, 2)
            self.used_gpa = mem.alloc(used_bytes, 4)
        self.indirect_gpa = mem.alloc(DESC_SIZE * INDIRECT_SLOTS * size, 16) if indirect else 0
        # Word indices into mem.u16 / mem.u32 for the hot paths.
        self._desc_off = mem.offset(self.desc_gpa, DESC_SIZE * size)
        avail_off = mem.offset(self.avail_gpa, avail_bytes)
        used_off_m = mem.offset(self.used_gpa, used_bytes)
        self._avail_flags_w = avail_off >> 1
        self._avail_idx_w = (avail_off >> 1) + 1
        self._avail_ring_w = (avail_off >> 1) + 2
        self._used_event_w = (avail_off >> 1) + 2 + size
        self._used_flags_w = used_off_m >> 1
        self._used_idx_w = (used_off_m >> 1) + 1
        self._used_ring_d = (used_off_m >> 2) + 1
        self._avail_event_w = (used_off_m >> 1) + 2 + 4 * size
        self.reset_state()

    def reset_state(self) -> None:
        """Driver-side bookkeeping back to a fresh ring (all descriptors free, indices 0)."""
        self.avail_idx = 0  # shadow of avail->idx, the driver's own copy
        self.last_used = 0
        self._kicked_idx = 0
        self.free: list[int] = list(range(self.size - 1, -1, -1))
        self._extra: list[tuple[int, ...]] = [()] * self.size
        self.tokens: list[int] = [0] * self.size
        self.inflight = bytearray(self.size)
        self.n_inflight = 0
        self._prepared: list[int] = [-1] * self.size
        self._uniform_table = b""
        self._uniform_gen = 0
        self.fixed = False

    def make_fixed(self) -> None:
        """Chains stay written after use, like Linux rx buffers: reclaim keeps them off the free list."""
        self.fixed = True

    def requeue(self, head: int) -> None:
        """Offer an already-written chain again (fixed rings); publish with flush_avail."""
        self.inflight[head] = 1
        self.n_inflight += 1
        self.mem.u16[self._avail_ring_w + (self.avail_idx & self.mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    # -- low-level access (also the ring builder for backend tests) ---------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor {i} outside a table of {self.size}")
        DESC.pack_into(self.mem.buf, self._desc_off + DESC_SIZE * i, addr, length, flags, next)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        a, n, f, x = DESC.unpack_from(self.mem.buf, self._desc_off + DESC_SIZE * i)
        return int(a), int(n), int(f), int(x)

    def write_table(self, entries: Sequence[tuple[int, int, int, int]], gpa: int | None = None) -> int:
        """Write raw (addr, len, flags, next) entries as an indirect table; returns its GPA."""
        if gpa is None:
            gpa = self.mem.alloc(max(1, len(entries)) * DESC_SIZE, 16)
        off = self.mem.offset(gpa, max(1, len(entries)) * DESC_SIZE)
        for k, e in enumerate(entries):
            DESC.pack_into(self.mem.buf, off + DESC_SIZE * k, *e)
        return gpa

    def set_avail_entry(self, slot: int, head: int) -> None:
        self.mem.u16[self._avail_ring_w + (slot & self.mask)] = head & 0xFFFF

    def queue_avail(self, head: int) -> None:
        """Write ``head`` into the next avail slot without publishing it yet (see flush_avail)."""
        self.mem.u16[self._avail_ring_w + (self.avail_idx & self.mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def flush_avail(self) -> int:
        """Publish every queued avail entry with one aligned store of avail->idx."""
        self.mem.u16[self._avail_idx_w] = self.avail_idx
        return self.avail_idx

    def publish_avail(self, head: int) -> int:
        """Put ``head`` in the next avail slot, then publish it; returns the new avail index."""
        self.queue_avail(head)
        return self.flush_avail()

    def set_avail_idx(self, n: int) -> None:
        """Store any avail index (e.g. a jump past the queue size, to test the backend's check)."""
        self.avail_idx = n & 0xFFFF
        self.mem.u16[self._avail_idx_w] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self.mem.u16[self._avail_flags_w] = flags

    def set_used_event(self, n: int) -> None:
        self.mem.u16[self._used_event_w] = n & 0xFFFF

    def used_idx(self) -> int:
        return int(self.mem.u16[self._used_idx_w])

    def used_flags(self) -> int:
        return int(self.mem.u16[self._used_flags_w])

    def avail_event(self) -> int:
        return int(self.mem.u16[self._avail_event_w])

    def read_used(self, slot: int) -> tuple[int, int]:
        d = self._used_ring_d + 2 * (slot & self.mask)
        return int(self.mem.u32[d]), int(self.mem.u32[d + 1])

    def indirect_table_gpa(self, head: int) -> int:
        return self.indirect_gpa + head * INDIRECT_SLOTS * DESC_SIZE

    # -- driver operations --------------------------------------------------------------------------

    def add_chain(self, bufs: Sequence[Buf], token: int = 0, *, publish: bool = True) -> int:
        """Add a chain like Linux's virtqueue_add_split: multi-buffer chains go indirect when negotiated."""
        n = len(bufs)
        if n == 0:
            raise ValueError("empty chain")
        if self.indirect and n > 1:
            if not self.free:
                raise RingFull(f"queue {self.index}: no free descriptor")
            head = self.free.pop()
            table = self.indirect_table_gpa(head) if n <= INDIRECT_SLOTS else self.mem.alloc(n * DESC_SIZE, 16)
            off = self.mem.offset(table, n * DESC_SIZE)
            for k, b in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if b.writable else 0) | (VRING_DESC_F_NEXT if k + 1 < n else 0)
                DESC.pack_into(self.mem.buf, off + DESC_SIZE * k, b.addr, b.len, flags, k + 1 if k + 1 < n else 0)
            self.write_desc(head, table, n * DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            self._extra[head] = ()
        else:
            if len(self.free) < n:
                raise RingFull(f"queue {self.index}: {len(self.free)} free descriptors, chain needs {n}")
            ids = [self.free.pop() for _ in range(n)]
            for k, b in enumerate(bufs):
                last = k + 1 == n
                flags = (VRING_DESC_F_WRITE if b.writable else 0) | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(ids[k], b.addr, b.len, flags, 0 if last else ids[k + 1])
            head = ids[0]
            self._extra[head] = tuple(ids[1:])
        self.tokens[head] = token
        self.inflight[head] = 1
        self.n_inflight += 1
        self._prepared[head] = -1
        if publish:
            self.publish_avail(head)
        return head

    def reserve_direct(self, addr: int, length: int) -> int:
        """A free head written as one device-readable descriptor but not posted: the C receiver
        posts it (a credit update). ``posted_by_c`` or ``unreserve`` settles it afterwards."""
        if not self.free:
            raise RingFull(f"queue {self.index}: no free descriptor")
        head = self.free.pop()
        self.write_desc(head, addr, length, 0, 0)
        self._extra[head] = ()
        self._prepared[head] = -1
        return head

    def posted_by_c(self, head: int, token: int) -> None:
        """C posted reserved ``head`` (its avail entry and inflight mark are written)."""
        self.tokens[head] = token
        self.n_inflight += 1

    def reserve_pair(self, hdr_gpa: int, pay_gpa: int, plen: int) -> int:
        """A free head written as a header descriptor and a ``plen``-byte payload descriptor
        (an indirect table when negotiated, as Linux sends data) but not posted: the C
        request/response loop posts it. ``posted_by_c`` or ``unreserve`` settles it."""
        if self.indirect:
            if not self.free:
                raise RingFull(f"queue {self.index}: no free descriptor")
            head = self.free.pop()
            table = self.indirect_table_gpa(head)
            self.write_table_bytes(table, DESC.pack(hdr_gpa, HDR_LEN, VRING_DESC_F_NEXT, 1)
                                   + DESC.pack(pay_gpa, plen, 0, 0))
            self.write_desc(head, table, 2 * DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            self._extra[head] = ()
        else:
            if len(self.free) < 2:
                raise RingFull(f"queue {self.index}: {len(self.free)} free descriptors, a pair needs 2")
            head, nxt = self.free.pop(), self.free.pop()
            self.write_desc(head, hdr_gpa, HDR_LEN, VRING_DESC_F_NEXT, nxt)
            self.write_desc(nxt, pay_gpa, plen, 0, 0)
            self._extra[head] = (nxt,)
        self._prepared[head] = -1
        return head

    def unreserve(self, head: int) -> None:
        self.free.append(head)
        self.free.extend(self._extra[head])
        self._extra[head] = ()

    def prepare_uniform(self, table: bytes, token: int) -> None:
        """Give every free head ``table`` as its indirect table and ``token``, ready to be posted
        as they are (the C bulk sender posts heads without writing descriptors)."""
        gen = self._uniform(table, "prepare_uniform")
        for head in self.free:
            self._give_table(head, table, gen)
            self.tokens[head] = token

    def _uniform(self, table: bytes, what: str) -> int:
        """The generation of ``table`` among the uniform tables (a new one when it changed)."""
        if not self.indirect:
            raise ValueError(f"{what} needs INDIRECT_DESC")
        if table != self._uniform_table:
            self._uniform_table = table
            self._uniform_gen += 1
        return self._uniform_gen

    def _give_table(self, head: int, table: bytes, gen: int) -> None:
        """``head`` carries ``table`` in its own indirect table, written only if it changed."""
        if self._prepared[head] != gen:
            gpa = self.indirect_table_gpa(head)
            self.write_table_bytes(gpa, table)
            self.write_desc(head, gpa, len(table), VRING_DESC_F_INDIRECT, 0)
            self._extra[head] = ()
            self._prepared[head] = gen

    def add_uniform_indirect(self, n: int, table: bytes, token: int) -> None:
        """Queue ``n`` chains sharing one indirect table's content: the benchmark path.

        Each head keeps its own table, rewritten only when ``table`` changed since that head last
        carried it, so steady state costs one avail entry per packet and one index store per batch.
        """
        gen = self._uniform(table, "add_uniform_indirect")
        if n > len(self.free):
            raise RingFull(f"queue {self.index}: {len(self.free)} free descriptors, batch needs {n}")
        prepared, free, tokens, inflight = self._prepared, self.free, self.tokens, self.inflight
        u16, w, mask, a = self.mem.u16, self._avail_ring_w, self.mask, self.avail_idx
        for k in range(n):
            head = free.pop()
            if prepared[head] != gen:
                self._give_table(head, table, gen)
            tokens[head] = token
            inflight[head] = 1
            u16[w + ((a + k) & mask)] = head
        self.n_inflight += n
        self.avail_idx = (a + n) & 0xFFFF
        self.mem.u16[self._avail_idx_w] = self.avail_idx

    def write_table_bytes(self, gpa: int, table: bytes) -> None:
        self.mem.write(gpa, table)

    def kick_prepare(self) -> bool:
        """Whether the device wants a kick for what was published since the last call (virtqueue_kick_prepare)."""
        new, old = self.avail_idx, self._kicked_idx
        self._kicked_idx = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(self.avail_event(), new, old)
        return not self.used_flags() & VRING_USED_F_NO_NOTIFY

    def has_used(self) -> bool:
        return self.used_idx() != self.last_used

    def reclaim(self) -> list[Used]:
        """Take every new used entry, free its descriptors, and re-arm the interrupt (used_event)."""
        used_idx = self.used_idx()
        count = (used_idx - self.last_used) & 0xFFFF
        if count == 0:
            return []
        if count > self.n_inflight:
            raise RingError(
                f"queue {self.index}: used->idx moved {self.last_used} -> {used_idx} ({count} entries) "
                f"with only {self.n_inflight} chains in flight"
            )
        out: list[Used] = []
        u32 = self.mem.u32
        base, mask, free, extra = self._used_ring_d, self.mask, self.free, self._extra
        for i in range(self.last_used, self.last_used + count):
            d = base + 2 * (i & mask)
            head, length = int(u32[d]), int(u32[d + 1])
            if head >= self.size or not self.inflight[head]:
                raise RingError(f"queue {self.index}: used entry {i & 0xFFFF} names descriptor {head}, not in flight")
            self.inflight[head] = 0
            if not self.fixed:
                free.append(head)
                if extra[head]:
                    free.extend(extra[head])
            out.append(Used(head, length, self.tokens[head]))
        self.n_inflight -= count
        self.last_used = used_idx
        if self.event_idx:
            self.set_used_event(used_idx)
        return out
