"""Device side of a split virtqueue (virtio spec 2.7) over guest memory.

Everything the guest writes is hostile: each descriptor is read once into
locals, checked, and turned into a memoryview that lies inside one memory
region. A bad chain is returned on the used ring with length 0 and counted
(virtio-vsock.md, "What the device must check"); nothing raises out of
``pop``. Ring indices are touched only through ``cast('H')`` views, which are
single aligned 16-bit accesses (struct.pack_into/unpack_from tear them).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

from vsproxy.memory import GuestMemory

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC2 = struct.Struct("<QIHHQIHH")  # two descriptors at once (the Linux tx indirect table)
DESC_SIZE = 16
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
# A chain's total length must fit the used element's u32 len.
MAX_CHAIN_BYTES = 0xFFFFFFFF

# Taking an uncontended lock is a locked instruction: a full memory barrier.
# It orders our avail_event store before the avail->idx re-read (EVENT_IDX race).
_fence_lock = threading.Lock()


def memory_fence() -> None:
    _fence_lock.acquire()
    _fence_lock.release()


class RingSetupError(Exception):
    """Ring addresses or size the device cannot accept (ends the front-end session)."""


class QueueBrokenError(Exception):
    """The driver broke the ring as a whole (avail index jumped); the queue stops."""


class BadChain(NamedTuple):
    head: int
    reason: str


class Chain(NamedTuple):
    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    read_len: int
    write_len: int


@dataclass(slots=True)
class QueueCounters:
    chains: int = 0
    bad_chains: int = 0
    notifications: int = 0
    last_bad: str = ""
    bad_reasons: dict[str, int] = field(default_factory=dict)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Spec 2.7.7.2 / Linux vring_need_event, in u16 arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, avail ring, used ring) incl. event fields."""
    return DESC_SIZE * num, 4 + 2 * num + 2, 4 + 8 * num + 2


class SplitQueue:
    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        *,
        last_avail_idx: int = 0,
        event_idx: bool = False,
        indirect: bool = False,
        device_writes: bool = False,
        name: str = "vq",
    ) -> None:
        if num == 0 or num & (num - 1) or num > MAX_QUEUE_SIZE:
            raise RingSetupError(f"{name}: queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        # Spec 2.7: descriptor table 16-aligned, avail 2-aligned, used 4-aligned.
        if desc_uva % 16 or avail_uva % 2 or used_uva % 4:
            raise RingSetupError(f"{name}: misaligned ring addresses")
        dsize, asize, usize = ring_sizes(num)
        desc = mem.uva_view(desc_uva, dsize)
        avail = mem.uva_view(avail_uva, asize)
        used = mem.uva_view(used_uva, usize)
        if desc is None or avail is None or used is None:
            raise RingSetupError(f"{name}: ring addresses lie outside guest memory")
        self.name = name
        self.mem = mem
        regions = mem.regions
        self._single: tuple[int, int, memoryview] | None = (
            (regions[0].guest_addr, regions[0].guest_end, regions[0].view) if len(regions) == 1 else None
        )
        self.num = num
        self._desc = desc
        self._avail16 = avail.cast("H")
        self._used16 = used.cast("H")
        self._used32 = used[: 4 + 8 * num].cast("I")
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # used->idx is device-owned; resume from what the ring holds.
        self.used_idx = self._used16[1]
        self._signalled_used = self.used_idx
        self.event_idx = event_idx
        self.indirect = indirect
        # rx (device writes) chains must be write-only, tx chains read-only.
        self.device_writes = device_writes
        self.counters = QueueCounters()
        self.broken = ""

    @property
    def single_region(self) -> tuple[int, int, memoryview] | None:
        """(start, end, view) of guest memory when it is one region, else None."""
        return self._single

    def take(self, head: int) -> Chain | None:
        """Walk a chain whose head was already taken off the avail ring (by the C fast path);
        a bad chain is returned with length 0 and counted, as in pop()."""
        result = self._walk(head)
        if isinstance(result, Chain):
            self.counters.chains += 1
            return result
        self._reject(result)
        return None

    # -- avail side --------------------------------------------------------
    def pending(self) -> int:
        """Entries the driver has made available that we have not popped."""
        if self.broken:
            return 0
        n = (self._avail16[1] - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            self._break(f"avail index jumped {n} entries ahead (queue size {self.num})")
            return 0
        return n

    def _break(self, reason: str) -> None:
        self.broken = reason
        self.counters.bad_chains += 1
        self.counters.last_bad = reason

    def pop(self) -> Chain | None:
        """Next good chain, or None; bad chains are returned with len 0 on the way."""
        while True:
            if not self.pending():
                return None
            head = self._avail16[2 + (self.last_avail_idx & (self.num - 1))]
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            result = self._walk(head)
            if isinstance(result, Chain):
                self.counters.chains += 1
                return result
            self._reject(result)

    def pop_many(self, limit: int) -> list[Chain]:
        """Up to ``limit`` good chains, reading avail->idx once (the tx hot path)."""
        out: list[Chain] = []
        n = min(self.pending(), limit)
        avail16 = self._avail16
        mask = self.num - 1
        walk = self._walk
        for _ in range(n):
            head = avail16[2 + (self.last_avail_idx & mask)]
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            result = walk(head)
            if isinstance(result, Chain):
                out.append(result)
            else:
                self._reject(result)
        self.counters.chains += len(out)
        return out

    def unpop(self) -> None:
        """Give back the chain just popped, unused (it will be popped again)."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        self.counters.chains -= 1

    def _reject(self, bad: BadChain) -> None:
        c = self.counters
        c.bad_chains += 1
        c.last_bad = bad.reason
        key = bad.reason.split(":")[0]
        c.bad_reasons[key] = c.bad_reasons.get(key, 0) + 1
        if bad.head < self.num:
            self.push(bad.head, 0)
        # A head outside the table has no descriptor to return; it is only counted.

    def _walk(self, head: int) -> Chain | BadChain:
        num = self.num
        if head >= num:
            return BadChain(head, f"head out of range: {head} >= {num}")
        gpa_view = self.mem.gpa_view
        # One region (pc machines) is the common case: bounds-check inline.
        single = self._single
        r_start, r_end, r_view = single if single is not None else (0, 0, self._desc)
        if single is not None:
            # Fast paths for the shapes Linux posts, checked exactly as the general walk
            # would; anything else falls through to it.
            addr, length, flags, nxt = DESC.unpack_from(self._desc, head * DESC_SIZE)
            if self.device_writes:
                if flags == VIRTQ_DESC_F_WRITE and length and r_start <= addr and addr + length <= r_end:
                    o = addr - r_start
                    return Chain(head, [], [r_view[o : o + length]], 0, length)
            elif (
                flags == VIRTQ_DESC_F_INDIRECT
                and length == 2 * DESC_SIZE
                and self.indirect
                and r_start <= addr
                and addr + length <= r_end
            ):
                a0, l0, f0, n0, a1, l1, f1, _ = DESC2.unpack_from(r_view, addr - r_start)
                if (
                    f0 == VIRTQ_DESC_F_NEXT
                    and n0 == 1
                    and f1 == 0
                    and l0
                    and l1
                    and r_start <= a0
                    and a0 + l0 <= r_end
                    and r_start <= a1
                    and a1 + l1 <= r_end
                ):
                    o0 = a0 - r_start
                    o1 = a1 - r_start
                    return Chain(head, [r_view[o0 : o0 + l0], r_view[o1 : o1 + l1]], [], l0 + l1, 0)
        table = self._desc
        table_num = num
        i = head
        count = 0
        indirect = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = 0
        wlen = 0
        want_write = self.device_writes
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, i * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    return BadChain(head, "indirect: not negotiated")
                if indirect:
                    return BadChain(head, "indirect: nested table")
                if flags & VIRTQ_DESC_F_NEXT:
                    return BadChain(head, "indirect: combined with NEXT")
                if count:
                    # Spec 2.7.5.3.1: an indirect descriptor is the chain's only direct one.
                    return BadChain(head, "indirect: not the first descriptor")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > num:
                    return BadChain(head, f"indirect: bad table length {length}")
                view = gpa_view(addr, length)
                if view is None:
                    return BadChain(head, f"address: indirect table {addr:#x}+{length} outside guest memory")
                table = view
                table_num = length // DESC_SIZE
                indirect = True
                i = 0
                continue
            count += 1
            if count > table_num:
                return BadChain(head, f"loop: chain longer than {table_num} descriptors")
            if length:
                if single is not None:
                    if r_start <= addr and addr + length <= r_end:
                        view = r_view[addr - r_start : addr - r_start + length]
                    else:
                        view = None
                else:
                    view = gpa_view(addr, length)
                if view is None:
                    return BadChain(head, f"address: buffer {addr:#x}+{length} outside guest memory")
                if flags & VIRTQ_DESC_F_WRITE:
                    if not want_write:
                        return BadChain(head, "direction: writable descriptor on a device-readable queue")
                    writable.append(view)
                    wlen += length
                else:
                    if want_write:
                        return BadChain(head, "direction: readable descriptor on a device-writable queue")
                    readable.append(view)
                    rlen += length
                if rlen + wlen > MAX_CHAIN_BYTES:
                    return BadChain(head, "length: chain exceeds 4 GiB")
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_num:
                return BadChain(head, f"next: index {nxt} >= {table_num}")
            i = nxt
        return Chain(head, readable, writable, rlen, wlen)

    # -- used side ---------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Add a used element; it becomes visible at the next ``publish``."""
        slot = self.used_idx & (self.num - 1)
        used32 = self._used32
        used32[1 + 2 * slot] = head
        used32[2 + 2 * slot] = length
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def push_many(self, heads: list[int], length: int) -> None:
        """``push`` for several chains of the same used length (tx chains: 0)."""
        used32, mask, idx = self._used32, self.num - 1, self.used_idx
        for head in heads:
            slot = idx & mask
            used32[1 + 2 * slot] = head
            used32[2 + 2 * slot] = length
            idx += 1
        self.used_idx = idx & 0xFFFF

    def publish(self) -> bool:
        """Publish used->idx; return True if the driver wants an interrupt."""
        new = self.used_idx
        old = self._signalled_used
        if new == old:
            return False
        # Elements were written before this store (program order, x86 TSO).
        self._used16[1] = new
        memory_fence()
        # As vhost_notify: compare against the index at the previous check.
        self._signalled_used = new
        if self.event_idx:
            need = vring_need_event(self._avail16[2 + self.num], new, old)
        else:
            need = not self._avail16[0] & VRING_AVAIL_F_NO_INTERRUPT
        if need:
            self.counters.notifications += 1
        return need

    def enable_kicks(self) -> bool:
        """Ask for a kick at the next new entry; return True if entries arrived meanwhile."""
        if self.event_idx:
            self._used16[2 + 4 * self.num] = self.last_avail_idx
        memory_fence()
        return self.pending() > 0
