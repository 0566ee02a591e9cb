"""The C paths over guest memory of more than one region, against the Python walker.

QEMU's microvm and nitro-enclave machines hand the back-end two regions of one memfd, the
second at a non-zero mmap_offset, with a hole of guest-physical addresses between them;
vhost-user allows up to 8 regions. The C paths translate every guest address through their
memory table (ring.h ``gpa_ptr``): a buffer is good only if it lies entirely inside one region,
as ``GuestMemory.gpa_view`` says. Descriptors here are aimed at the regions' edges, across
them, into the holes and past the top of the address space; the C must take the same chains
as the Python walker, read and write the same bytes, and leave everything else to it, which
rejects and counts it. Bytes are also checked through the simulated guest's own mapping (by
memfd offset), so a translation that used the wrong region or ignored mmap_offset fails."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ringkit import BUF_ALLOC, GUEST, HOST_PORT, PORT, Rings
from test_fastpath import from_c, reference
from test_virtq import Rig

from vsproxy import fastpath
from vsproxy.fastpath import Run, RxFastPath, Slow, TxFastPath
from vsproxy.memory import GuestMemory as DeviceMemory
from vsproxy.simguest.memory import ALLOC_START, UVA_BASE, GuestMemory, Region
from vsproxy.simguest.ring import Buf, SplitRing
from vsproxy.vhost_user import codec
from vsproxy.virtq import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, BadChain, Chain, SplitQueue
from vsproxy.vsock import header as H
from vsproxy.vsock import rx

pytestmark = pytest.mark.c_paths

TOP = (1 << 64) - 1


class Places:
    """Guest addresses for a two-region rig: interior ones (bump-allocated well away from every
    edge, in either region) and ones aimed at an edge: the end of region 0, the hole, the start
    and end of region 1, the top of the address space."""

    def __init__(self, gmem: GuestMemory) -> None:
        r0, r1 = gmem.regions
        self.edges = [r0.gpa + r0.size, (r0.gpa + r0.size + r1.gpa) // 2, r1.gpa, r1.gpa + r1.size, TOP - 32]
        self._next = [r0.gpa + 0x80000, r1.gpa + 0x40000]
        self.gmem = gmem

    def interior(self, region: int, size: int) -> int:
        gpa = self._next[region]
        self._next[region] = (gpa + size + 15) & ~15
        return gpa

    def at(self, place: tuple[int, int], size: int) -> int:
        """``(-1 or -2, _)``: interior of region 0 or 1; ``(k, delta)``: edge k plus delta."""
        where, delta = place
        if where < 0:
            return self.interior(-1 - where, size)
        return max(0, min(TOP, self.edges[where] + delta))

    def put(self, gpa: int, data: bytes) -> None:
        """Write where the guest can (a range inside one region); elsewhere the descriptor points
        at nothing, as a hostile guest's would."""
        try:
            self.gmem.write(gpa, data)
        except ValueError:
            pass


# where a buffer goes: interior of a region, or an edge plus a delta that lands it just inside,
# across or just outside
PLACE = st.one_of(
    st.tuples(st.sampled_from([-1, -2]), st.just(0)),
    st.tuples(st.integers(0, 4), st.integers(-160, 160)),
)


def bad_reasons(q: SplitQueue, heads: list[int]) -> Counter[str]:
    """The reasons the walker rejects these heads for, as it counts them."""
    out: Counter[str] = Counter()
    for head in heads:
        result = q._walk(head)
        if isinstance(result, BadChain):
            out[result.reason.split(":")[0]] += 1
    return out


# -- the tx batch -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    indirect=st.booleans(),
    packets=st.lists(
        st.tuples(
            PLACE,  # header
            PLACE,  # payload
            st.binary(min_size=1, max_size=1500),
            st.sampled_from([None, None, None, 0, 3, 70000]),  # the header's len field
            st.sampled_from([None, None, (-1, 0), (-2, 0), (0, -16), (0, -40), (2, -8), (3, -32), (1, 0)]),  # table
            st.booleans(),  # header only (a control packet)
        ),
        max_size=12,
    ),
)
def test_c_batch_over_two_regions_matches_the_python_walker(
    indirect: bool,
    packets: list[tuple[tuple[int, int], tuple[int, int], bytes, int | None, tuple[int, int] | None, bool]],
) -> None:
    rig = Rig(regions=2, indirect=indirect, num=32)
    try:
        places = Places(rig.gmem)
        for hplace, pplace, payload, length, table, header_only in packets:
            op = H.Op.CREDIT_UPDATE if header_only else H.Op.RW
            n = 0 if header_only else len(payload) if length is None else length
            hdr = H.pack(GUEST, 2, 100 + len(payload) % 2, 5000, n, 1, op, 0, 65536, 7)
            h = places.at(hplace, H.HDR_SIZE)
            places.put(h, hdr)
            if header_only:
                rig.ring.add_chain([Buf(h, H.HDR_SIZE)])
                continue
            p = places.at(pplace, len(payload))
            places.put(p, payload)
            if table is None or not indirect:
                rig.ring.add_chain([Buf(h, H.HDR_SIZE), Buf(p, len(payload))])
                continue
            # the indirect table itself at an edge (or in a region's interior)
            t = places.at(table, 32)
            try:
                rig.ring.write_table([(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT, 1), (p, len(payload), 0, 0)], t)
            except ValueError:
                pass  # a table across a region's end or in the hole: the descriptor points at nothing
            head = rig.ring.free.pop()
            rig.ring.write_desc(head, t, 32, VIRTQ_DESC_F_INDIRECT, 0)
            rig.ring.publish_avail(head)
        avail = [rig.q._avail16[2 + i] for i in range(len(packets))]
        expected_bad = bad_reasons(rig.q, avail)
        fast = TxFastPath(rig.q, GUEST, 32)
        try:
            items = fast.batch()
            got = from_c(items)
            assert [h for e in got for h in e[3]] == avail  # the same chains, in ring order
            assert got == reference(rig, avail)
            event(f"runs: {min(3, sum(e[0] == 'run' for e in got))}, bad: {min(3, sum(expected_bad.values()))}")
            for it in items:  # what C left goes to the walker, as the data path hands it over
                if isinstance(it, Slow):
                    rig.q.take(it.head)
            assert rig.q.counters.bad_chains == sum(expected_bad.values())
            assert Counter(rig.q.counters.bad_reasons) == expected_bad
        finally:
            fast.close()
    finally:
        rig.close()


def test_chains_across_regions_are_taken_and_bad_addresses_left_to_the_walker() -> None:
    """Header in region 0 and payload in region 1 (each buffer inside its region) is a good
    packet; a payload crossing region 0's end, in the hole, or wrapping the address space is
    not, and the walker rejects and counts each."""
    rig = Rig(regions=2, indirect=True, num=16)
    try:
        places = Places(rig.gmem)
        r0, r1 = rig.gmem.regions
        payloads = [bytes([0x30 + i]) * 2000 for i in range(6)]
        where = [
            places.interior(1, 2000),  # region 1, behind a non-zero mmap_offset
            r1.gpa + r1.size - 2000,  # ending exactly at region 1's end
            r1.gpa,  # starting exactly at region 1's start
            r0.gpa + r0.size - 1000,  # crossing region 0's end
            r0.gpa + r0.size + 0x1000,  # in the hole
            TOP - 999,  # wrapping
        ]
        for k, (gpa, data) in enumerate(zip(where, payloads, strict=True)):
            places.put(gpa, data)
            h = places.interior(0, H.HDR_SIZE)
            places.put(h, H.pack(GUEST, 2, 100 + k, 5000, len(data), 1, H.Op.RW, 0, 65536, 0))
            rig.ring.add_chain([Buf(h, H.HDR_SIZE), Buf(gpa, len(data))])
        fast = TxFastPath(rig.q, GUEST, 16)
        try:
            items = fast.batch()
            runs = [it for it in items if isinstance(it, Run)]
            slows = [it for it in items if isinstance(it, Slow)]
            assert [b"".join(bytes(s) for s in r.segments) for r in runs] == payloads[:3]
            assert len(slows) == 3
            for it in slows:
                assert rig.q.take(it.head) is None
            assert rig.q.counters.bad_reasons == {"address": 3}
        finally:
            fast.close()
    finally:
        rig.close()


# -- the rx fill ------------------------------------------------------------------------------


class RxRig2:
    """Two-region rx ring: Linux-shaped chains and others, aimed at the edges; a socketpair as
    the host side."""

    def __init__(self) -> None:
        self.rig = Rig(regions=2, device_writes=True, num=32)
        self.places = Places(self.rig.gmem)
        self.host, self.peer = socket.socketpair()
        self.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.peer.setblocking(False)
        self.fast = RxFastPath(self.rig.q)
        self.hdr = H.pack(2, GUEST, 1 << 30, 5000, 0, 1, H.Op.RW, 0, 65536, 123)
        self.taken: list[tuple[int, int]] = []  # guest ranges the chains use (kept disjoint)

    def free(self, gpa: int, size: int) -> bool:
        return all(gpa + size <= a or b <= gpa for a, b in self.taken)

    def close(self) -> None:
        self.fast.close()
        self.host.close()
        self.peer.close()
        self.rig.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chains=st.lists(
        st.tuples(st.one_of(st.tuples(st.sampled_from([-1, -2]), st.just(0)), PLACE),
                  st.sampled_from([44, 45, 60, 1000, 3776, 3776, 20000]), st.sampled_from([1] * 8 + [2, 3])),
        min_size=1, max_size=12,
    ),
)
def test_c_rx_fill_over_two_regions_matches_the_python_walker(chains: list[tuple[tuple[int, int], int, int]]) -> None:
    """C fills the chains the walker would take as the Linux shape (one writable descriptor
    inside one region, more than a header), in order, and stops at the first other one; the
    bytes land where the walker's view of the chain is, which is where the guest sees them."""
    t = RxRig2()
    try:
        rig = t.rig
        gpas: list[int] = []
        for place, size, shape in chains:
            gpa = t.places.at(place, size)
            if not t.free(gpa, size):
                continue
            t.taken.append((gpa, gpa + size))
            if shape == 1:
                bufs = [Buf(gpa, size, writable=True)]
            elif shape == 2:  # two writable descriptors: a good chain, not the Linux shape
                half = size // 2
                bufs = [Buf(gpa, half, writable=True), Buf(min(TOP, gpa + half), size - half, writable=True)]
            else:  # a readable descriptor on the rx queue: bad
                bufs = [Buf(gpa, size)]
            rig.ring.add_chain(bufs)
            gpas.append(gpa)
        heads = [rig.q._avail16[2 + i] for i in range(len(gpas))]
        walks = [rig.q._walk(h) for h in heads]

        def linux(w: Chain | BadChain, head: int) -> bool:
            flags = rig.ring.read_desc(head)[2]
            return (isinstance(w, Chain) and flags == VIRTQ_DESC_F_WRITE and len(w.writable) == 1
                    and w.write_len > H.HDR_SIZE)

        prefix = 0
        while prefix < len(heads) and linux(walks[prefix], heads[prefix]):
            prefix += 1
        rooms = [min(len(w.writable[0]) - H.HDR_SIZE, 65536) for w in walks[:prefix] if isinstance(w, Chain)]
        data = bytes((i * 7 + 3) & 0xFF for i in range(sum(rooms) + 500))
        t.host.sendall(data)
        r = t.fast.fill(t.peer.fileno(), 1 << 22, 64, t.hdr)
        assert r.packets == prefix and r.bytes == sum(rooms)
        event(f"filled: {min(3, prefix)}, left: {min(3, len(heads) - prefix)}")
        if prefix < len(heads):
            assert r.status == rx.RX_SLOW
        rig.q.publish()
        off = 0
        for k in range(prefix):
            w = walks[k]
            assert isinstance(w, Chain)
            head, used = rig.ring.read_used(k)
            assert head == heads[k] and used == H.HDR_SIZE + rooms[k]
            want = data[off : off + rooms[k]]
            off += rooms[k]
            # through the device's view of the chain, and through the guest's own mapping
            assert bytes(w.writable[0][H.HDR_SIZE : H.HDR_SIZE + rooms[k]]) == want
            assert rig.gmem.read(gpas[k] + H.HDR_SIZE, rooms[k]) == want
            got = H.unpack(rig.gmem.read(gpas[k], H.HDR_SIZE))
            assert got.len == rooms[k] and got._replace(len=0).pack() == t.hdr
        # the rest is the walker's: it rejects and counts exactly the bad chains
        expected_bad = bad_reasons(rig.q, heads[prefix:])
        while rig.q.pop() is not None:
            pass
        assert Counter(rig.q.counters.bad_reasons) == expected_bad
    finally:
        t.close()


def test_rx_put_checks_the_whole_buffer_not_only_the_header() -> None:
    """A control packet needs only a header's room, but a buffer that crosses a region's end is
    a bad buffer whatever is written into it (the walker says so): C leaves it to the walker."""
    t = RxRig2()
    try:
        rig = t.rig
        r0, r1 = rig.gmem.regions
        crossing = r0.gpa + r0.size - 100  # header inside region 0, the buffer's end past it
        rig.ring.add_chain([Buf(crossing, 3776, writable=True)])
        inside = r1.gpa + r1.size - 3776  # inside region 1, up to its last byte
        rig.ring.add_chain([Buf(inside, 3776, writable=True)])
        hdr = H.pack(2, GUEST, 1, 5000, 0, 1, H.Op.CREDIT_UPDATE, 0, 65536, 9)
        assert not t.fast.put(hdr)
        assert rig.gmem.read(crossing, 44) == bytes(44)  # nothing written
        chain = rig.q.pop()  # the walker rejects the crossing buffer, counts it, and takes the next
        assert chain is not None and chain.write_len == 3776 and rig.q.counters.bad_reasons == {"address": 1}
        rig.q.unpop()
        assert t.fast.put(hdr)
        assert rig.gmem.read(inside, 44) == hdr  # through region 1's mapping at its mmap_offset
    finally:
        t.close()


# -- eight regions ----------------------------------------------------------------------------


def eight_regions() -> GuestMemory:
    """A memfd of 8 MiB shown as vhost-user's maximum of 8 regions, listed out of guest-address
    order: some adjacent in guest addresses (a buffer across their boundary is still bad, though
    its bytes happen to be contiguous in the memfd too), some far apart, each at its own
    mmap_offset. The allocator starts in the region holding guest address 0."""
    gmem = GuestMemory(8 << 20)
    mib = 1 << 20
    gpas = [0x7_0000_0000, 0, 0x4010_0000, 0xFFFF_0000_0000, mib, 0x4000_0000, 0x2_0000_0000, 0x1234_5000_0000]
    gmem.regions = [Region(gpa, mib - 0x1000 * (k % 3 == 2), UVA_BASE + k * mib, k * mib)
                    for k, gpa in enumerate(gpas)]
    gmem._region_index = 1
    gmem._next = ALLOC_START
    return gmem


class WalkerOf(Rig):
    """What ``reference`` reads of a rig: its queue."""

    def __init__(self, q: SplitQueue) -> None:  # no rig of its own: nothing to build
        self.q = q


@settings(max_examples=150, deadline=None)
@given(
    packets=st.lists(
        st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(-64, 64), st.binary(min_size=1, max_size=900),
                  st.booleans()),
        min_size=1, max_size=24,
    ),
)
def test_c_batch_over_eight_regions_matches_the_python_walker(packets: list[tuple[int, int, int, bytes, bool]]) -> None:
    """Headers and payloads hopping between the 8 regions (C's last-hit region changes at every
    lookup), near each region's end, across adjacent regions' boundary."""
    gmem = eight_regions()
    ring = SplitRing(gmem, 1, 32, indirect=True)
    dmem = DeviceMemory.map_fds(gmem.mem_regions(), [gmem.fd] * len(gmem.regions))
    q = SplitQueue(dmem, 32, gmem.uva(ring.desc_gpa), gmem.uva(ring.avail_gpa), gmem.uva(ring.used_gpa),
                   indirect=True)
    fast = TxFastPath(q, GUEST, 32)
    try:
        wanted = b""
        for k, (hr, pr, delta, payload, at_end) in enumerate(packets):
            h_region, p_region = gmem.regions[hr], gmem.regions[pr]
            h = h_region.gpa + h_region.size - 0x20000 + 0x40 * k
            p = p_region.gpa + (p_region.size + delta - len(payload) if at_end else 0x10000 + 0x400 * k)
            gmem.write(h, H.pack(GUEST, 2, 300, 5000, len(payload), 1, H.Op.RW, 0, 65536, 0))
            try:
                gmem.write(p, payload)
            except ValueError:
                pass  # across a region's end (into the next region, or into nothing)
            ring.add_chain([Buf(h, H.HDR_SIZE), Buf(p, len(payload))])
        for k, (_hr, pr, delta, payload, at_end) in enumerate(packets):
            p_region = gmem.regions[pr]
            p = p_region.gpa + (p_region.size + delta - len(payload) if at_end else 0x10000 + 0x400 * k)
            try:  # inside one region (maybe the next one): read through the guest's own mapping
                wanted += gmem.read(p, len(payload))
            except ValueError:
                pass
        avail = [q._avail16[2 + i] for i in range(len(packets))]
        items = fast.batch()
        got = from_c(items)
        assert [h for e in got for h in e[3]] == avail
        assert got == reference(WalkerOf(q), avail)
        assert b"".join(e[2] for e in got if e[0] == "run") == wanted
        event(f"slow: {min(3, sum(e[0] == 'slow' for e in got))}")
    finally:
        fast.close()
        dmem.close()
        gmem.close()


# -- which memory tables the C takes ------------------------------------------------------------


def test_the_c_table_holds_as_many_regions_as_set_mem_table_accepts() -> None:
    assert fastpath.MAX_REGIONS == codec.MAX_MEM_REGIONS == len(fastpath.ffi.new("vq_mem *").r)


def test_memory_tables_the_c_paths_take() -> None:
    def mem(*ranges: tuple[int, int]) -> DeviceMemory:
        return DeviceMemory.from_buffers([(gpa, 0, memoryview(bytearray(size))) for gpa, size in ranges])

    assert fastpath.memory_ok(mem((0, 4096)))
    assert fastpath.memory_ok(mem((0x1_0000_0000, 4096), (0, 4096)))  # two, out of order
    assert fastpath.memory_ok(mem((0, 4096), (4096, 4096)))  # adjacent
    assert fastpath.memory_ok(mem(*((k << 20, 4096) for k in range(8))))
    assert not fastpath.memory_ok(mem(*((k << 20, 4096) for k in range(9))))  # more than vhost-user's 8
    assert not fastpath.memory_ok(mem((0, 8192), (4096, 4096)))  # overlapping: which would C read?
    assert not fastpath.memory_ok(mem())


# -- connections lent to C, their rx chains and tx data in region 1 -----------------------------


@pytest.fixture
def rings2() -> Iterator[Rings]:
    r = Rings(regions=2)
    yield r
    r.close()


def test_two_region_rings_put_their_buffers_behind_the_mmap_offset(rings2: Rings) -> None:
    r0, r1 = rings2.gmem.regions
    assert r1.offset and all(r1.gpa <= gpa < r1.gpa + r1.size for gpa in rings2.rx_gpa)
    assert rings2.rx_ring.desc_gpa < r0.gpa + r0.size


def test_a_lent_connection_sends_region_one_data_and_fills_region_one_buffers(rings2: Rings) -> None:
    rings2.lend()
    payloads = [bytes([0x41 + i]) * 3000 for i in range(4)]
    for p in payloads:
        rings2.send_rw(p)
    assert rings2.tx.batch() == [] and len(rings2.tx.consumed) == 4
    assert rings2.host_got() == b"".join(payloads)
    # the host answers: C reads it into the rx chains (region 1) as the guest's credit allows
    data = bytes(range(256)) * 40
    rings2.peer.sendall(data)
    rings2.send_update(fwd_cnt=0)
    rings2.tx.batch()
    got = rings2.to_guest()
    assert b"".join(p for h, p in got if h.op == H.Op.RW) == data
    back = rings2.tx.take_back(rings2.slot)
    assert back.counts.tx_bytes == 12000 and back.counts.bytes == len(data)


def test_read_ahead_holds_region_one_chains_and_delivers_them_on_the_update(rings2: Rings) -> None:
    """The guest's window is shut: C reads the host's bytes ahead into held rx chains (region
    1); its update opens the window and they go out, byte for byte."""
    rings2.lend(tx_cnt=BUF_ALLOC, flags=0)  # the guest's window is shut
    data = bytes((i * 13) & 0xFF for i in range(10000))
    rings2.peer.sendall(data)
    rings2.send_update(fwd_cnt=0)  # still shut: C reads ahead
    rings2.tx.batch()
    assert rings2.to_guest() == []
    rings2.send_update(fwd_cnt=BUF_ALLOC)  # open
    rings2.tx.batch()
    got = rings2.to_guest()
    assert b"".join(p for _, p in got) == data
    assert all(h.src_port == HOST_PORT and h.dst_port == PORT for h, _ in got)
