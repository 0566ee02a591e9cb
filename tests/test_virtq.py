"""The device-side split virtqueue walker against rings built as a guest driver builds them.

The driver side is the simulated guest's ring (real memfd, UVA != GPA, two regions with a
hole). Each bad-chain class of virtio-vsock.md has a test: the chain comes back with used
length 0, is counted, and nothing raises.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsproxy.memory import GuestMemory as DeviceMemory
from vsproxy.simguest.memory import SECOND_REGION_GPA, GuestMemory
from vsproxy.simguest.ring import Buf, SplitRing
from vsproxy.virtq import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RingSetupError,
    SplitQueue,
)

NUM = 8


class Rig:
    def __init__(self, *, regions: int = 1, indirect: bool = True, event_idx: bool = False,
                 device_writes: bool = False, num: int = NUM) -> None:
        self.gmem = GuestMemory(4 << 20, regions=regions)
        self.ring = SplitRing(self.gmem, 1, num, indirect=indirect, event_idx=event_idx)
        self.dmem = DeviceMemory.map_fds(self.gmem.mem_regions(), [self.gmem.fd] * len(self.gmem.regions))
        self.q = SplitQueue(
            self.dmem, num, self.gmem.uva(self.ring.desc_gpa), self.gmem.uva(self.ring.avail_gpa),
            self.gmem.uva(self.ring.used_gpa), indirect=indirect, event_idx=event_idx, device_writes=device_writes,
        )

    def buf(self, data: bytes) -> int:
        gpa = self.gmem.alloc(len(data))
        self.gmem.write(gpa, data)
        return gpa

    def raw_chain(self, descs: list[tuple[int, int, int, int]], head: int = 0) -> None:
        for i, d in enumerate(descs):
            self.ring.write_desc(head + i if i else head, *d)
        self.ring.publish_avail(head)

    def expect_bad(self, reason: str) -> None:
        assert self.q.pop() is None
        assert self.q.counters.bad_chains == 1
        assert self.q.counters.last_bad.startswith(reason), self.q.counters.last_bad
        self.q.publish()
        assert self.ring.used_idx() == 1
        assert self.ring.read_used(0)[1] == 0  # returned with used length 0

    def close(self) -> None:
        self.dmem.close()
        self.gmem.close()  # the memfd: hypothesis tests make hundreds of rigs


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_indirect_chain_is_gathered_in_order(rig: Rig) -> None:
    a, b = rig.buf(b"H" * 44), rig.buf(b"payload")
    rig.ring.add_chain([Buf(a, 44), Buf(b, 7)])
    chain = rig.q.pop()
    assert chain is not None and chain.read_len == 51 and chain.write_len == 0
    assert b"".join(bytes(s) for s in chain.readable) == b"H" * 44 + b"payload"
    rig.q.push(chain.head, 0)
    assert rig.q.publish()
    assert [u.head for u in rig.ring.reclaim()] == [chain.head]


def test_direct_chain_across_two_regions_translates_each_buffer() -> None:
    rig = Rig(regions=2, indirect=False)
    while rig.gmem.alloc(4096) < SECOND_REGION_GPA:
        pass
    a, b = rig.buf(b"first"), rig.buf(b"second")
    rig.ring.add_chain([Buf(a, 5), Buf(b, 6)])
    chain = rig.q.pop()
    assert chain is not None and b"".join(bytes(s) for s in chain.readable) == b"firstsecond"
    rig.close()


def test_buffer_straddling_the_hole_between_regions_is_rejected() -> None:
    rig = Rig(regions=2)
    end_of_first = rig.gmem.regions[0].gpa + rig.gmem.regions[0].size
    rig.raw_chain([(end_of_first - 8, 16, 0, 0)])
    rig.expect_bad("address")
    rig.close()


def test_address_outside_guest_memory_is_rejected(rig: Rig) -> None:
    rig.raw_chain([(1 << 40, 64, 0, 0)])
    rig.expect_bad("address")


def test_length_that_wraps_past_memory_end_is_rejected(rig: Rig) -> None:
    rig.raw_chain([(0x1000, 0xFFFFFFFF, 0, 0)])
    rig.expect_bad("address")


def test_descriptor_loop_is_rejected(rig: Rig) -> None:
    a = rig.buf(b"x" * 64)
    rig.ring.write_desc(0, a, 64, VIRTQ_DESC_F_NEXT, 1)
    rig.ring.write_desc(1, a, 64, VIRTQ_DESC_F_NEXT, 0)
    rig.ring.publish_avail(0)
    rig.expect_bad("loop")


def test_next_index_out_of_range_is_rejected(rig: Rig) -> None:
    a = rig.buf(b"x" * 64)
    rig.raw_chain([(a, 64, VIRTQ_DESC_F_NEXT, NUM + 3)])
    rig.expect_bad("next")


def test_head_out_of_range_is_counted_and_skipped(rig: Rig) -> None:
    rig.ring.publish_avail(NUM + 1)
    assert rig.q.pop() is None
    assert rig.q.counters.bad_chains == 1 and rig.q.counters.last_bad.startswith("head")


def test_writable_descriptor_on_tx_queue_is_rejected(rig: Rig) -> None:
    a = rig.buf(b"x" * 64)
    rig.raw_chain([(a, 64, VIRTQ_DESC_F_WRITE, 0)])
    rig.expect_bad("direction")


def test_readable_descriptor_on_rx_queue_is_rejected() -> None:
    rig = Rig(device_writes=True)
    a = rig.buf(b"x" * 64)
    rig.raw_chain([(a, 64, 0, 0)])
    rig.expect_bad("direction")
    rig.close()


def test_indirect_without_negotiation_is_rejected() -> None:
    rig = Rig(indirect=False)
    a = rig.buf(b"x" * 64)
    table = rig.ring.write_table([(a, 64, 0, 0)])
    rig.raw_chain([(table, 16, VIRTQ_DESC_F_INDIRECT, 0)])
    rig.expect_bad("indirect")
    rig.close()


@pytest.mark.parametrize(
    ("flags_extra", "table_len", "inner_flags"),
    [
        (VIRTQ_DESC_F_NEXT, 16, 0),  # INDIRECT together with NEXT
        (0, 0, 0),  # empty table
        (0, 24, 0),  # not a multiple of 16
        (0, 16 * (NUM + 1), 0),  # more entries than the queue size
        (0, 16, VIRTQ_DESC_F_INDIRECT),  # nested indirect
    ],
)
def test_bad_indirect_tables_are_rejected(rig: Rig, flags_extra: int, table_len: int, inner_flags: int) -> None:
    a = rig.buf(b"x" * 64)
    entries = [(a, 64, inner_flags, 0)] * max(1, table_len // 16)
    table = rig.ring.write_table(entries)
    rig.raw_chain([(table, table_len, VIRTQ_DESC_F_INDIRECT | flags_extra, 1)])
    rig.expect_bad("indirect")


def test_indirect_table_outside_memory_is_rejected(rig: Rig) -> None:
    rig.raw_chain([(1 << 40, 32, VIRTQ_DESC_F_INDIRECT, 0)])
    rig.expect_bad("address")


def test_indirect_after_a_direct_descriptor_is_rejected(rig: Rig) -> None:
    a = rig.buf(b"x" * 64)
    table = rig.ring.write_table([(a, 64, 0, 0)])
    rig.ring.write_desc(0, a, 64, VIRTQ_DESC_F_NEXT, 1)
    rig.ring.write_desc(1, table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    rig.ring.publish_avail(0)
    rig.expect_bad("indirect")


def test_loop_inside_indirect_table_is_rejected(rig: Rig) -> None:
    a = rig.buf(b"x" * 64)
    table = rig.ring.write_table([(a, 64, VIRTQ_DESC_F_NEXT, 1), (a, 64, VIRTQ_DESC_F_NEXT, 0)])
    rig.raw_chain([(table, 32, VIRTQ_DESC_F_INDIRECT, 0)])
    rig.expect_bad("loop")


def test_avail_index_jump_beyond_queue_size_breaks_the_queue(rig: Rig) -> None:
    rig.ring.set_avail_idx(NUM + 1)
    assert rig.q.pop() is None and rig.q.broken
    assert rig.q.pending() == 0  # stays stopped: no walk over garbage


def test_bad_chain_does_not_stop_good_chains_after_it(rig: Rig) -> None:
    rig.raw_chain([(1 << 40, 64, 0, 0)], head=0)
    a = rig.buf(b"good")
    rig.ring.write_desc(1, a, 4, 0, 0)
    rig.ring.publish_avail(1)
    chain = rig.q.pop()
    assert chain is not None and bytes(chain.readable[0]) == b"good"
    assert rig.q.counters.bad_chains == 1


def test_event_idx_interrupt_only_when_driver_asked() -> None:
    rig = Rig(event_idx=True)
    a = rig.buf(b"x")
    for _ in range(3):
        rig.ring.add_chain([Buf(a, 1)])
    rig.ring.set_used_event(2)  # interrupt when used idx passes 2
    for _ in range(2):
        c = rig.q.pop()
        assert c is not None
        rig.q.push(c.head, 0)
    assert not rig.q.publish()  # used idx 2: event 2 not yet passed
    c = rig.q.pop()
    assert c is not None
    rig.q.push(c.head, 0)
    assert rig.q.publish()
    assert not rig.q.enable_kicks()
    assert rig.ring.avail_event() == 3
    rig.close()


def test_no_interrupt_flag_suppresses_calls_without_event_idx(rig: Rig) -> None:
    a = rig.buf(b"x")
    rig.ring.add_chain([Buf(a, 1)])
    rig.ring.set_avail_flags(1)
    c = rig.q.pop()
    assert c is not None
    rig.q.push(c.head, 0)
    assert not rig.q.publish()
    assert rig.ring.used_idx() == 1


@pytest.mark.parametrize(
    ("num", "desc_off", "why"),
    [(3, 0, "power"), (8, 8, "misaligned"), (8, 1 << 30, "outside")],
)
def test_bad_ring_setup_is_refused(num: int, desc_off: int, why: str) -> None:
    rig = Rig()
    with pytest.raises(RingSetupError, match=why):
        SplitQueue(rig.dmem, num, rig.gmem.uva(rig.ring.desc_gpa) + desc_off, rig.gmem.uva(rig.ring.avail_gpa),
                   rig.gmem.uva(rig.ring.used_gpa))
    rig.close()


descriptor = st.tuples(
    st.one_of(st.integers(0, 1 << 64 - 1), st.integers(0, 5 << 20)),
    st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0, 8192)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(descriptor, min_size=NUM, max_size=NUM),
    tables=st.lists(st.lists(descriptor, min_size=1, max_size=12), max_size=3),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=NUM),
    avail_idx=st.integers(0, 0xFFFF),
    indirect=st.booleans(),
    device_writes=st.booleans(),
)
def test_random_rings_never_raise_and_never_escape_guest_memory(
    descs: list[tuple[int, int, int, int]],
    tables: list[list[tuple[int, int, int, int]]],
    heads: list[int],
    avail_idx: int,
    indirect: bool,
    device_writes: bool,
) -> None:
    rig = Rig(regions=2, indirect=indirect, device_writes=device_writes)
    try:
        table_gpas = [rig.ring.write_table(t) for t in tables]
        for i, (addr, length, flags, nxt) in enumerate(descs):
            if table_gpas and flags & VIRTQ_DESC_F_INDIRECT and i % 2:
                addr = table_gpas[i % len(table_gpas)]  # point some at real tables
            rig.ring.write_desc(i, addr, length, flags, nxt)
        for slot, h in enumerate(heads):
            rig.ring.set_avail_entry(slot, h)
        rig.ring.set_avail_idx(avail_idx)
        limit = sum(r.size for r in rig.gmem.regions)
        popped = 0
        while (chain := rig.q.pop()) is not None:
            popped += 1
            segs = chain.writable if device_writes else chain.readable
            assert (chain.readable if device_writes else chain.writable) == []
            for s in segs:
                assert s.obj is not None and 0 < len(s) <= limit
            assert chain.read_len + chain.write_len <= limit * NUM
            rig.q.push(chain.head, 0)
            assert popped <= NUM
        rig.q.publish()
        c = rig.q.counters
        assert c.chains + c.bad_chains <= NUM + 1
    finally:
        rig.close()


def _shape(result: object) -> object:
    if hasattr(result, "readable"):
        return ("chain", [bytes(s) for s in result.readable], [bytes(s) for s in result.writable])  # type: ignore[attr-defined]
    return ("bad", result.reason.split(":")[0])  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(
    entries=st.lists(
        st.tuples(st.integers(0, 5 << 20), st.integers(0, 70000), st.sampled_from([0, 1, 2, 3, 4, 5]),
                  st.integers(0, 3)),
        min_size=2, max_size=2,
    ),
    top=st.tuples(st.sampled_from([VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_WRITE, 0, 5]), st.sampled_from([16, 32, 48])),
    device_writes=st.booleans(),
)
def test_fast_paths_agree_with_the_general_walk(
    entries: list[tuple[int, int, int, int]], top: tuple[int, int], device_writes: bool
) -> None:
    """The Linux-shape fast paths must accept and reject exactly what the general walk does."""
    rig = Rig(device_writes=device_writes)
    try:
        table = rig.ring.write_table(entries)
        flags, length = top
        rig.ring.write_desc(0, table if flags & VIRTQ_DESC_F_INDIRECT else entries[0][0], length, flags, 1)
        fast = rig.q._walk(0)
        rig.q._single = None  # forces the general walk
        general = rig.q._walk(0)
        assert _shape(fast) == _shape(general)
    finally:
        rig.close()
