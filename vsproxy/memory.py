"""Guest memory as the backend sees it: the regions SET_MEM_TABLE hands over.

Descriptor addresses are guest-physical (GPA); vring addresses from
SET_VRING_ADDR are the front-end's user virtual addresses (UVA). Every lookup
returns a view lying entirely inside one region, or None: a buffer that
straddles two regions or leaves them is a bad buffer (virtio-vsock.md).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from vsproxy.vhost_user.codec import MemRegion


class MemoryError_(Exception):
    """A memory table that cannot be mapped (the front-end session must end)."""


@dataclass(slots=True)
class MappedRegion:
    guest_addr: int
    size: int
    user_addr: int
    mm: mmap.mmap | None
    view: memoryview

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """Regions addressable by GPA or UVA; views are bounds-checked slices."""

    def __init__(self, regions: list[MappedRegion]) -> None:
        self.regions = regions
        # Hot path: a flat tuple list avoids attribute lookups per descriptor.
        self._by_gpa = [(r.guest_addr, r.guest_end, r.view) for r in regions]

    @classmethod
    def from_buffers(cls, spec: list[tuple[int, int, memoryview]]) -> GuestMemory:
        """Build from in-process buffers (tests): (guest_addr, user_addr, view)."""
        return cls([MappedRegion(ga, len(v), ua, None, v) for ga, ua, v in spec])

    @classmethod
    def map_fds(cls, regions: list[MemRegion], fds: list[int]) -> GuestMemory:
        if len(regions) != len(fds):
            raise MemoryError_(f"{len(regions)} regions but {len(fds)} fds")
        mapped: list[MappedRegion] = []
        try:
            for i, (r, fd) in enumerate(zip(regions, fds, strict=True)):
                try:
                    st_size = os.fstat(fd).st_size
                except OSError as e:
                    raise MemoryError_(f"region {i}: fstat failed: {e}") from None
                if r.mmap_offset + r.size > st_size:
                    raise MemoryError_(
                        f"region {i}: offset {r.mmap_offset:#x} + size {r.size:#x} exceeds its fd ({st_size:#x} bytes)"
                    )
                page = mmap.ALLOCATIONGRANULARITY
                base = r.mmap_offset - r.mmap_offset % page
                lead = r.mmap_offset - base
                try:
                    mm = mmap.mmap(fd, r.size + lead, flags=mmap.MAP_SHARED, offset=base)
                except (OSError, ValueError, OverflowError) as e:
                    raise MemoryError_(f"region {i}: mmap failed: {e}") from None
                view = memoryview(mm)[lead : lead + r.size]
                mapped.append(MappedRegion(r.guest_addr, r.size, r.user_addr, mm, view))
        except BaseException:
            for m in mapped:
                _unmap(m)
            raise
        return cls(mapped)

    def gpa_view(self, addr: int, length: int) -> memoryview | None:
        end = addr + length
        for start, stop, view in self._by_gpa:
            if start <= addr and end <= stop:
                return view[addr - start : end - start]
        return None

    def uva_view(self, addr: int, length: int) -> memoryview | None:
        end = addr + length
        for r in self.regions:
            if r.user_addr <= addr and end <= r.user_addr + r.size:
                return r.view[addr - r.user_addr : end - r.user_addr]
        return None

    def close(self) -> None:
        for r in self.regions:
            _unmap(r)
        self.regions = []
        self._by_gpa = []


def _unmap(r: MappedRegion) -> None:
    try:
        r.view.release()
    except BufferError:
        pass
    if r.mm is not None:
        try:
            r.mm.close()
        except BufferError:
            # A view still exported (a chain in flight): the mapping goes when it is dropped.
            pass
