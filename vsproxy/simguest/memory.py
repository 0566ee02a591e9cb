"""Guest RAM for the simulated guest: one memfd, shown to the backend as one or two regions.

Why a memfd: the backend must mmap exactly what QEMU passes with ``memory-backend-memfd,share=on``.
Why three address spaces: QEMU sends vring addresses as its own user virtual addresses (UVA) and
descriptor addresses as guest-physical ones (GPA), and on microvm / nitro-enclave one memfd backs two
regions, the second at a non-zero mmap_offset. Here UVA, GPA and memfd offset all differ (the second
region's GPA is far from its memfd offset, with a hole between the regions), so a backend that mixes
them up reads the wrong bytes or fails instead of passing by accident.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from vsproxy.vhost_user.codec import MemRegion

DEFAULT_SIZE = 64 << 20
# What a QEMU process's RAM mapping might look like; never a valid GPA here.
UVA_BASE = 0x7F00_0000_0000
# Two-region layout, as on nitro-enclave: a first region shorter than the split (the firmware hole),
# the second region starting at memfd offset 1 MiB, mapped at a GPA unlike its offset.
FIRST_REGION_SIZE = 0xF0000
SECOND_REGION_OFFSET = 0x100000
SECOND_REGION_GPA = 0x1_0000_0000
# Allocation starts past page 0 so a zeroed descriptor (addr 0) never points at a live buffer.
ALLOC_START = 0x1000


@dataclass(frozen=True, slots=True)
class Region:
    """One guest-physical range backed by the memfd at ``offset``, seen by "QEMU" at ``uva``."""

    gpa: int
    size: int
    uva: int
    offset: int

    def to_mem_region(self) -> MemRegion:
        return MemRegion(guest_addr=self.gpa, size=self.size, user_addr=self.uva, mmap_offset=self.offset)


class GuestMemory:
    """The memfd, its mapping, the region table and a bump allocator by GPA."""

    def __init__(self, size: int = DEFAULT_SIZE, regions: int = 1) -> None:
        if size % mmap.PAGESIZE or size <= SECOND_REGION_OFFSET:
            raise ValueError(f"memory size {size:#x} must be a page multiple above {SECOND_REGION_OFFSET:#x}")
        if regions == 1:
            self.regions = [Region(0, size, UVA_BASE, 0)]
        elif regions == 2:
            self.regions = [
                Region(0, FIRST_REGION_SIZE, UVA_BASE, 0),
                Region(SECOND_REGION_GPA, size - SECOND_REGION_OFFSET, UVA_BASE + SECOND_REGION_OFFSET,
                       SECOND_REGION_OFFSET),
            ]
        else:
            raise ValueError(f"regions must be 1 or 2, not {regions}")
        self.size = size
        self.fd = os.memfd_create("simguest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._mm = mmap.mmap(self.fd, size)
        self.buf = memoryview(self._mm)
        # Whole-mapping views for single aligned 16/32-bit accesses to ring indices (see module ring).
        self.u16 = self.buf.cast("H")
        self.u32 = self.buf.cast("I")
        self._region_index = 0
        self._next = ALLOC_START

    # -- translation -------------------------------------------------------------------------------

    def offset(self, gpa: int, length: int = 1) -> int:
        """memfd offset of ``gpa``; the whole ``length`` must lie inside one region."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.offset + gpa - r.gpa
        raise ValueError(f"GPA range {gpa:#x}+{length:#x} is not inside one memory region")

    def uva(self, gpa: int) -> int:
        """The address QEMU would put in SET_VRING_ADDR for ``gpa``."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uva + gpa - r.gpa
        raise ValueError(f"GPA {gpa:#x} is not inside a memory region")

    def mem_regions(self) -> list[MemRegion]:
        return [r.to_mem_region() for r in self.regions]

    # -- access ------------------------------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        off = self.offset(gpa, length)
        return self.buf[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self.offset(gpa, len(data))
        self.buf[off : off + len(data)] = data

    def load16(self, gpa: int) -> int:
        off = self.offset(gpa, 2)
        if off & 1:
            raise ValueError(f"unaligned 16-bit access at GPA {gpa:#x}")
        return int(self.u16[off >> 1])

    def store16(self, gpa: int, value: int) -> None:
        off = self.offset(gpa, 2)
        if off & 1:
            raise ValueError(f"unaligned 16-bit access at GPA {gpa:#x}")
        self.u16[off >> 1] = value & 0xFFFF

    def load32(self, gpa: int) -> int:
        off = self.offset(gpa, 4)
        if off & 3:
            raise ValueError(f"unaligned 32-bit access at GPA {gpa:#x}")
        return int(self.u32[off >> 2])

    # -- allocation --------------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate ``size`` bytes inside one region; spills into the next region when full."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size {size} / alignment {align}")
        while self._region_index < len(self.regions):
            r = self.regions[self._region_index]
            start = (self._next + align - 1) & ~(align - 1)
            if start + size <= r.gpa + r.size:
                self._next = start + size
                return start
            self._region_index += 1
            if self._region_index < len(self.regions):
                self._next = self.regions[self._region_index].gpa
        raise MemoryError(f"guest memory exhausted allocating {size} bytes")

    def reset(self, skew: int = 0) -> None:
        """Forget all allocations and zero RAM, as a guest reboot does; ``skew`` moves new rings elsewhere."""
        self.buf[:] = bytes(self.size)
        self._region_index = 0
        self._next = ALLOC_START + skew

    def close(self) -> None:
        for v in (self.u16, self.u32, self.buf):
            v.release()
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass
        os.close(self.fd)
