"""Simulated guest memory and driver-side split ring: layout, chains, reclaim, notification rules, credit."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsproxy.simguest import Buf, GuestMemory, RingError, RingFull, SplitRing, peer_free
from vsproxy.simguest.memory import SECOND_REGION_GPA, SECOND_REGION_OFFSET, UVA_BASE
from vsproxy.simguest.ring import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    vring_need_event,
)

MIB = 1 << 20


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(4 * MIB, regions=2)
    yield m
    m.close()


def test_two_regions_share_one_memfd_with_distinct_gpa_uva_offset(mem: GuestMemory) -> None:
    r0, r1 = mem.mem_regions()
    assert (r0.guest_addr, r0.mmap_offset, r0.user_addr) == (0, 0, UVA_BASE)
    assert r1.mmap_offset == SECOND_REGION_OFFSET and r1.guest_addr == SECOND_REGION_GPA
    assert r1.user_addr == UVA_BASE + SECOND_REGION_OFFSET
    assert r1.guest_addr != r1.mmap_offset and r0.guest_addr + r0.size < r1.guest_addr  # a GPA hole
    assert mem.offset(SECOND_REGION_GPA + 5) == SECOND_REGION_OFFSET + 5
    with pytest.raises(ValueError):
        mem.offset(r0.size)  # in the hole
    with pytest.raises(ValueError):
        mem.offset(r0.size - 4, 8)  # straddles the end of region 0


def test_allocator_stays_inside_one_region_and_spills(mem: GuestMemory) -> None:
    first = mem.alloc(0x80000, 4096)
    assert first < mem.regions[0].size
    second = mem.alloc(0x80000, 4096)  # does not fit in the rest of region 0
    assert second == SECOND_REGION_GPA
    mem.write(second, b"abc")
    assert bytes(mem.buf[SECOND_REGION_OFFSET : SECOND_REGION_OFFSET + 3]) == b"abc"
    with pytest.raises(MemoryError):
        mem.alloc(8 * MIB)


@pytest.mark.parametrize("legacy", [False, True])
def test_ring_layout_aligned_and_indices_where_virtio_puts_them(mem: GuestMemory, legacy: bool) -> None:
    r = SplitRing(mem, 1, 256, event_idx=True, legacy_layout=legacy)
    assert r.desc_gpa % 16 == 0 and r.avail_gpa % 2 == 0 and r.used_gpa % 4 == 0
    if legacy:
        assert r.avail_gpa == r.desc_gpa + 16 * 256 and r.used_gpa % 4096 == 0
    for gpa, n in ((r.desc_gpa, 16 * 256), (r.avail_gpa, 6 + 2 * 256), (r.used_gpa, 6 + 8 * 256)):
        mem.offset(gpa, n)  # inside one region
        assert mem.uva(gpa) - mem.regions[0].uva == mem.offset(gpa) - mem.regions[0].offset
    r.set_avail_idx(0x1234)
    r.set_used_event(0x4321)
    assert struct.unpack_from("<H", mem.buf, mem.offset(r.avail_gpa + 2))[0] == 0x1234
    assert struct.unpack_from("<H", mem.buf, mem.offset(r.avail_gpa + 4 + 2 * 256))[0] == 0x4321
    struct.pack_into("<HH", mem.buf, mem.offset(r.used_gpa), VRING_USED_F_NO_NOTIFY, 7)
    struct.pack_into("<H", mem.buf, mem.offset(r.used_gpa + 4 + 8 * 256), 99)
    assert (r.used_flags(), r.used_idx(), r.avail_event()) == (VRING_USED_F_NO_NOTIFY, 7, 99)


def test_queue_size_must_be_power_of_two(mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        SplitRing(mem, 0, 100)


def _device_use(mem: GuestMemory, r: SplitRing, entries: list[tuple[int, int]], start: int = 0) -> None:
    """Play the device: write used elements, then used->idx."""
    for k, (head, length) in enumerate(entries):
        struct.pack_into("<II", mem.buf, mem.offset(r.used_gpa + 4 + 8 * ((start + k) % r.size)), head, length)
    mem.store16(r.used_gpa + 2, start + len(entries))


def test_direct_chain_links_descriptors_and_reclaim_frees_them(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8)
    head = r.add_chain([Buf(0x2000, 44), Buf(0x3000, 100), Buf(0x4000, 50, True)], token=7)
    a, n, f, nxt = r.read_desc(head)
    assert (a, n, f) == (0x2000, 44, VRING_DESC_F_NEXT)
    a, n, f, nxt = r.read_desc(nxt)
    assert (a, n, f) == (0x3000, 100, VRING_DESC_F_NEXT)
    a, n, f, _ = r.read_desc(nxt)
    assert (a, n, f) == (0x4000, 50, VRING_DESC_F_WRITE)
    assert mem.load16(r.avail_gpa + 2) == 1 and mem.load16(r.avail_gpa + 4) == head
    assert len(r.free) == 5
    _device_use(mem, r, [(head, 50)])
    assert r.reclaim() == [(head, 50, 7)]
    assert len(r.free) == 8 and r.n_inflight == 0


def test_indirect_chain_uses_one_descriptor_and_a_table(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8, indirect=True)
    head = r.add_chain([Buf(0x2000, 44), Buf(0x3000, 64)])
    addr, length, flags, _ = r.read_desc(head)
    assert flags == VRING_DESC_F_INDIRECT and length == 32 and addr % 16 == 0
    t = mem.view(addr, 32)
    assert DESC.unpack_from(t, 0) == (0x2000, 44, VRING_DESC_F_NEXT, 1)
    assert DESC.unpack_from(t, 16) == (0x3000, 64, 0, 0)
    single = r.add_chain([Buf(0x5000, 44)])  # one buffer: direct, as in Linux
    assert r.read_desc(single)[2] == 0
    long = r.add_chain([Buf(0x6000 + i, 1) for i in range(6)])  # longer than the per-head table
    assert r.read_desc(long)[1] == 6 * 16
    assert len(r.free) == 5


def test_uniform_indirect_batch_publishes_once(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8, indirect=True)
    table = DESC.pack(0x2000, 44, VRING_DESC_F_NEXT, 1) + DESC.pack(0x3000, 64, 0, 0)
    r.add_uniform_indirect(8, table, -1)
    assert mem.load16(r.avail_gpa + 2) == 8 and not r.free
    heads = [mem.load16(r.avail_gpa + 4 + 2 * i) for i in range(8)]
    assert sorted(heads) == list(range(8))
    for h in heads:
        addr, length, flags, _ = r.read_desc(h)
        assert flags == VRING_DESC_F_INDIRECT and mem.read(addr, length) == table
    with pytest.raises(RingFull):
        r.add_uniform_indirect(1, table, -1)
    _device_use(mem, r, [(h, 0) for h in heads])
    assert len(r.reclaim()) == 8 and len(r.free) == 8


def test_reclaim_rejects_unknown_ids_and_index_jumps(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8)
    head = r.add_chain([Buf(0x2000, 44)])
    _device_use(mem, r, [(head + 1, 0)])
    with pytest.raises(RingError, match="not in flight"):
        r.reclaim()
    r2 = SplitRing(mem, 0, 8)
    r2.add_chain([Buf(0x2000, 44)])
    mem.store16(r2.used_gpa + 2, 5)
    with pytest.raises(RingError, match="in flight"):
        r2.reclaim()


def test_ring_full(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 4)
    r.add_chain([Buf(0x2000, 1)] * 3)
    with pytest.raises(RingFull):
        r.add_chain([Buf(0x2000, 1)] * 2)


def test_event_idx_kick_suppression(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8, event_idx=True)
    mem.store16(r.used_gpa + 4 + 8 * 8, 0)  # avail_event 0: kick when idx passes 0
    r.add_chain([Buf(0x2000, 1)])
    assert r.kick_prepare()
    r.add_chain([Buf(0x2000, 1)])
    assert not r.kick_prepare()  # device asked for a kick at 0 only, already given
    mem.store16(r.used_gpa + 4 + 8 * 8, 2)
    r.add_chain([Buf(0x2000, 1)])
    r.add_chain([Buf(0x2000, 1)])
    assert r.kick_prepare()  # 2 lies in (2, 4]? event 2 -> needs new idx > 2
    assert not r.kick_prepare()  # nothing new


def test_no_notify_flag_without_event_idx(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8)
    r.add_chain([Buf(0x2000, 1)])
    assert r.kick_prepare()
    mem.store16(r.used_gpa, VRING_USED_F_NO_NOTIFY)
    r.add_chain([Buf(0x2000, 1)])
    assert not r.kick_prepare()


def test_reclaim_rearms_used_event(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8, event_idx=True)
    heads = [r.add_chain([Buf(0x2000, 1)]) for _ in range(3)]
    _device_use(mem, r, [(h, 0) for h in heads])
    r.reclaim()
    assert mem.load16(r.avail_gpa + 4 + 2 * 8) == 3


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_matches_spec_formula(event: int, new: int, old: int) -> None:
    expect = (new - event - 1) % 65536 < (new - old) % 65536
    assert vring_need_event(event, new, old) == expect


def test_ring_builder_places_raw_descriptors(mem: GuestMemory) -> None:
    r = SplitRing(mem, 1, 8)
    r.write_desc(0, 0xDEAD_BEEF_0000, 44, VRING_DESC_F_NEXT, 0)  # bad address, loop to itself
    table = r.write_table([(0x2000, 44, VRING_DESC_F_INDIRECT, 0)])  # nested indirect
    r.write_desc(1, table, 16, VRING_DESC_F_INDIRECT, 0)
    r.publish_avail(0)
    r.publish_avail(1)
    assert mem.load16(r.avail_gpa + 2) == 2
    r.set_avail_idx(2 + 100)  # jump past the queue size
    assert mem.load16(r.avail_gpa + 2) == 102
    assert r.read_desc(0) == (0xDEAD_BEEF_0000, 44, VRING_DESC_F_NEXT, 0)
    assert DESC.unpack_from(mem.view(table, 16)) == (0x2000, 44, VRING_DESC_F_INDIRECT, 0)


def test_peer_free_wraps_u32() -> None:
    assert peer_free(262144, 0, 0) == 262144
    assert peer_free(262144, 10, 0xFFFF_FFF0) == 262144 - 26  # tx_cnt wrapped past 2^32
    assert peer_free(262144, 262144, 0) == 0
    assert peer_free(1000, 0, 5000) == 0  # hostile fwd_cnt ahead of tx_cnt: no credit, not 4 GiB
    assert peer_free(100, 300, 0) == 0  # shrunken buf_alloc


@given(st.integers(0, 0xFFFF_FFFF), st.integers(0, 0x7FFF_FFFF), st.integers(0, 0xFFFF_FFFF))
def test_peer_free_is_offset_invariant(base: int, in_flight: int, buf_alloc: int) -> None:
    tx = (base + in_flight) & 0xFFFF_FFFF
    assert peer_free(buf_alloc, tx, base) == max(0, buf_alloc - in_flight)
