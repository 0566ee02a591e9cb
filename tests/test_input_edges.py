"""The guest's and the front-end's input, at the edges the other tests leave out (issue 18 item 6).

Plain bytes in, the typed reaction out, no sockets: the virtqueue walker's batch and C-handoff
entry points and its 4 GiB chain limit, the mapping of a front-end's memory table (each way it
can be refused), the vhost-user codec's and session's refusals, the vsock header's description
of an unknown op and the rx payload views. tests/run.sh measures the branch coverage of these
modules from this file and test_virtq.py, test_vhost_user_session.py and test_vsock_core.py.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import cffi
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_virtq import Rig
from test_vsock_core import GPORT, GUEST, FakePeer, Harness

from vsproxy.events import EventKind
from vsproxy.memory import GuestMemory, MemoryError_
from vsproxy.simguest.ring import Buf
from vsproxy.verdict import Mark, Verdict, verdict_of
from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import Message, MessageReader, ProtocolError, Request, VringAddr
from vsproxy.vhost_user.session import (
    BACKEND_PROTOCOL_FEATURES,
    Reply,
    Session,
    SetMemTable,
    StartRing,
    StopRing,
    default_features,
)
from vsproxy.virtq import DESC, DESC_SIZE, VIRTQ_DESC_F_NEXT, Chain, SplitQueue, ring_sizes
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.core import VsockCore
from vsproxy.vsock.header import Op
from vsproxy.vsock.lending import OWN_TAKEN, OwnedBack, OwnedCounts
from vsproxy.vsock.rxbuf import payload_views

U64 = struct.Struct("<Q")


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


# -- the virtqueue walker ---------------------------------------------------------------------


def test_pop_many_returns_good_chains_and_gives_back_bad_ones_with_length_0(rig: Rig) -> None:
    good = rig.buf(b"G" * 44)
    rig.ring.add_chain([Buf(good, 44)])
    bad = rig.ring.free.pop()  # a descriptor of our own, out of the driver's free list
    rig.ring.write_desc(bad, 0xDEAD_0000, 64, 0, 0)  # a buffer outside guest memory
    rig.ring.publish_avail(bad)
    rig.ring.add_chain([Buf(good, 44)])
    chains = rig.q.pop_many(8)
    assert [c.read_len for c in chains] == [44, 44]
    assert rig.q.counters.chains == 2 and rig.q.counters.bad_chains == 1
    assert rig.q.counters.bad_reasons == {"address": 1}
    rig.q.push_many([c.head for c in chains], 0)
    assert rig.q.publish() in (True, False)
    used = {rig.ring.read_used(i) for i in range(3)}
    assert used == {(bad, 0), (chains[0].head, 0), (chains[1].head, 0)}


def test_pop_many_takes_at_most_its_limit(rig: Rig) -> None:
    for _ in range(3):
        rig.ring.add_chain([Buf(rig.buf(b"x" * 44), 44)])
    assert len(rig.q.pop_many(2)) == 2
    assert rig.q.pending() == 1


def test_unpop_hands_the_same_chain_out_again(rig: Rig) -> None:
    rig.ring.add_chain([Buf(rig.buf(b"once" * 11), 44)])
    first = rig.q.pop()
    assert first is not None and rig.q.counters.chains == 1
    rig.q.unpop()
    assert rig.q.counters.chains == 0 and rig.q.pending() == 1
    again = rig.q.pop()
    assert again is not None and again.head == first.head


def test_take_walks_a_head_the_c_path_popped_and_rejects_a_bad_one(rig: Rig) -> None:
    head = rig.ring.add_chain([Buf(rig.buf(b"T" * 44), 44)])
    chain = rig.q.take(head)  # as the C path does: it read the head off the avail ring itself
    assert isinstance(chain, Chain) and chain.read_len == 44 and rig.q.counters.chains == 1
    assert rig.q.take(rig.q.num + 3) is None  # a head outside the table: counted, nothing to return
    assert rig.q.counters.bad_chains == 1 and rig.q.counters.last_bad.startswith("head out of range")
    bad = rig.ring.free.pop()
    rig.ring.write_desc(bad, 0xDEAD_0000, 64, 0, 0)
    assert rig.q.take(bad) is None
    assert rig.q.counters.bad_chains == 2
    rig.q.publish()
    assert rig.ring.read_used(0) == (bad, 0)  # the bad chain went back with used length 0


def test_single_region_is_offered_to_the_c_paths_only_for_one_region() -> None:
    one, two = Rig(), Rig(regions=2)
    try:
        assert one.q.single_region is not None
        start, end, view = one.q.single_region
        assert end - start == len(view)
        assert two.q.single_region is None
    finally:
        one.close()
        two.close()


def test_enable_kicks_without_event_idx_reports_entries_that_arrived() -> None:
    r = Rig(event_idx=False)
    try:
        assert r.q.enable_kicks() is False
        r.ring.add_chain([Buf(r.buf(b"k" * 44), 44)])
        assert r.q.enable_kicks() is True
    finally:
        r.close()


class BigRing:
    """A queue in a 2 GiB + 64 KiB anonymous mapping (pages are only touched where written):
    enough for descriptors whose lengths add up past 4 GiB."""

    NUM = 8
    DESC_AT, AVAIL_AT, USED_AT = 0x0, 0x1000, 0x2000
    DATA_AT = 0x10000

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, self.DATA_AT + (2 << 30))
        self.mem = GuestMemory.from_buffers([(0, 0, memoryview(self.mm))])
        self.q = SplitQueue(self.mem, self.NUM, self.DESC_AT, self.AVAIL_AT, self.USED_AT)

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        DESC.pack_into(self.mm, self.DESC_AT + i * DESC_SIZE, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.mm, self.AVAIL_AT + 4, head)
        struct.pack_into("<H", self.mm, self.AVAIL_AT + 2, 1)

    def close(self) -> None:
        self.mem.close()


def test_chain_past_4_gib_is_a_bad_chain() -> None:
    r = BigRing()
    try:
        assert ring_sizes(r.NUM)[0] <= r.AVAIL_AT
        # three descriptors of 1.5 GiB over the same bytes: 4.5 GiB, past a used length's u32
        size = 3 << 29
        r.desc(0, r.DATA_AT, size, VIRTQ_DESC_F_NEXT, 1)
        r.desc(1, r.DATA_AT, size, VIRTQ_DESC_F_NEXT, 2)
        r.desc(2, r.DATA_AT, size, 0, 0)
        r.publish(0)
        assert r.q.pop() is None
        assert r.q.counters.last_bad == "length: chain exceeds 4 GiB"
    finally:
        r.close()


# -- the front-end's memory table -------------------------------------------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("edge")
    os.ftruncate(fd, size)
    return fd


def test_memory_table_with_a_different_number_of_fds_is_refused() -> None:
    with pytest.raises(MemoryError_, match="2 regions but 1 fds"):
        GuestMemory.map_fds([codec.MemRegion(0, 4096, 0, 0), codec.MemRegion(8192, 4096, 8192, 0)], [5])


def test_memory_table_fd_that_is_not_open_is_refused() -> None:
    fd = memfd(4096)
    os.close(fd)
    with pytest.raises(MemoryError_, match="region 0: fstat failed"):
        GuestMemory.map_fds([codec.MemRegion(0, 4096, 0, 0)], [fd])


def test_memory_region_larger_than_its_fd_is_refused() -> None:
    fd = memfd(4096)
    try:
        with pytest.raises(MemoryError_, match="exceeds its fd"):
            GuestMemory.map_fds([codec.MemRegion(0, 4096, 0, 4096)], [fd])
    finally:
        os.close(fd)


def test_memory_region_that_cannot_be_mapped_is_refused_and_earlier_regions_unmapped(tmp_path: object) -> None:
    good = memfd(8192)
    path = os.path.join(str(tmp_path), "ro")
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    ro = os.open(path, os.O_RDONLY)  # a shared writable mapping of a read-only fd: EACCES
    try:
        with pytest.raises(MemoryError_, match="region 1: mmap failed"):
            GuestMemory.map_fds([codec.MemRegion(0, 4096, 0, 0), codec.MemRegion(8192, 4096, 8192, 0)], [good, ro])
    finally:
        os.close(good)
        os.close(ro)


def test_memory_region_at_an_unaligned_offset_is_mapped_from_its_page() -> None:
    fd = memfd(3 * 4096)
    try:
        os.pwrite(fd, b"here", 4096 + 100)
        mem = GuestMemory.map_fds([codec.MemRegion(0x100000, 4096, 0x7000_0000, 4096 + 100)], [fd])
        view = mem.gpa_view(0x100000, 4)
        assert view is not None and bytes(view) == b"here"
        uva = mem.uva_view(0x7000_0000, 4)
        assert uva is not None and bytes(uva) == b"here"
        assert mem.gpa_view(0x100000 + 4094, 4) is None and mem.uva_view(0x6FFF_FFFF, 4) is None
        del view, uva
        mem.close()
    finally:
        os.close(fd)


def test_closing_memory_while_a_chain_holds_a_view_leaves_the_mapping_to_the_view() -> None:
    fd = memfd(4096)
    try:
        mem = GuestMemory.map_fds([codec.MemRegion(0, 4096, 0, 0)], [fd])
        held = mem.gpa_view(0, 16)
        assert held is not None
        mem.close()  # the view is still exported: no BufferError, the mapping lives on in it
        assert mem.regions == [] and mem.gpa_view(0, 16) is None
        held[0] = 7
        assert os.pread(fd, 1, 0) == b"\x07"
        held.release()
    finally:
        os.close(fd)


def test_closing_memory_while_c_holds_the_region_view_leaves_both_to_c() -> None:
    fd = memfd(4096)
    try:
        mem = GuestMemory.map_fds([codec.MemRegion(0, 4096, 0, 0)], [fd])
        # the C paths hold the region's own view through a buffer export (cffi's from_buffer)
        held = cffi.FFI().from_buffer(mem.regions[0].view)
        mem.close()  # neither the view nor the mapping can go yet: no BufferError, no crash
        held[1] = b"\x09"
        assert os.pread(fd, 2, 0) == b"\x00\x09"
        del held
    finally:
        os.close(fd)


def test_in_process_memory_closes_without_a_mapping() -> None:
    mem = GuestMemory.from_buffers([(0x1000, 0x9000, memoryview(bytearray(64)))])
    assert mem.uva_view(0x9000, 64) is not None
    mem.close()
    assert mem.regions == []


# -- the vhost-user codec ---------------------------------------------------------------------


def message(req: int, payload: bytes = b"", need_reply: bool = False) -> Message:
    got = MessageReader().feed(codec.encode(req, payload, need_reply=need_reply), [])
    assert got is not None
    return got[0]


def test_short_header_is_refused() -> None:
    with pytest.raises(ProtocolError, match="short header: 11 bytes"):
        codec.parse_header(b"\0" * 11)


def test_wrong_payload_size_names_an_unknown_request_by_number() -> None:
    with pytest.raises(ProtocolError, match="request 4242: payload is 3 bytes, expected 8"):
        codec.decode_u64(Message(4242, codec.VERSION, b"abc"))


def test_vring_fd_index_with_reserved_bits_is_refused() -> None:
    with pytest.raises(ProtocolError, match="SET_VRING_CALL: reserved bits set in 0x200"):
        codec.decode_vring_fd_index(message(Request.SET_VRING_CALL, U64.pack(0x200)))
    assert codec.decode_vring_fd_index(message(Request.SET_VRING_CALL, U64.pack(0x101))) == (1, False)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\1\0\0", "payload shorter than its header"),
        (struct.pack("<II", 0, 0), "0 regions"),
        (struct.pack("<II", 2, 0) + codec.MEMORY_REGION.pack(0, 4096, 0, 0), "payload is 40 bytes for 2 regions"),
        (codec.encode_mem_table([codec.MemRegion((1 << 64) - 4096, 8192, 0, 0)]), "region 0 wraps"),
        (codec.encode_mem_table([codec.MemRegion(0, 8192, (1 << 64) - 4096, 0)]), "region 0 wraps"),
        (codec.encode_mem_table([codec.MemRegion(0, 8192, 0, (1 << 64) - 4096)]), "region 0 wraps"),
    ],
)
def test_bad_memory_tables_are_refused(payload: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        codec.decode_mem_table(message(Request.SET_MEM_TABLE, payload))


def test_memory_table_as_qemu_sends_it_with_the_whole_array() -> None:
    regions = [codec.MemRegion(0, 4096, 0x10000, 0), codec.MemRegion(1 << 32, 8192, 0x20000, 4096)]
    full = codec.encode_mem_table(regions) + b"\0" * (codec.MAX_MEM_REGIONS - 2) * codec.MEMORY_REGION.size
    assert codec.decode_mem_table(message(Request.SET_MEM_TABLE, full)) == regions


@given(st.binary(max_size=400))
def test_any_memory_table_payload_decodes_or_is_refused(payload: bytes) -> None:
    try:
        regions = codec.decode_mem_table(Message(Request.SET_MEM_TABLE, codec.VERSION, payload))
    except ProtocolError:
        return
    assert 1 <= len(regions) <= codec.MAX_MEM_REGIONS
    assert all(r.size > 0 and r.guest_addr + r.size <= 1 << 64 for r in regions)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\0" * 11, "payload shorter than the config header"),
        (codec.CONFIG_HEADER.pack(0, 8, 0) + b"\0" * 4, "config size 8 does not match payload 16"),
        (codec.CONFIG_HEADER.pack(0, codec.MAX_CONFIG_SIZE + 1, 0) + b"\0" * (codec.MAX_CONFIG_SIZE + 1),
         "does not match"),
    ],
)
def test_bad_config_payloads_are_refused(payload: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        codec.decode_config(Message(Request.GET_CONFIG, codec.VERSION, payload))


def test_reader_holds_the_fds_of_a_message_still_arriving_and_refuses_too_many() -> None:
    raw = codec.encode(Request.SET_MEM_TABLE, codec.encode_mem_table([codec.MemRegion(0, 4096, 0, 0)]))
    reader = MessageReader()
    assert reader.feed(raw[:12], [40]) is None
    assert reader.pending_fds() == [40]
    with pytest.raises(ProtocolError, match=f"{codec.MAX_FDS + 1} fds with one message"):
        reader.feed(raw[12:20], list(range(41, 41 + codec.MAX_FDS)))


# -- the vhost-user session -------------------------------------------------------------------


def negotiated(*, protocol_features: bool = True) -> Session:
    s = Session(guest_cid=5)
    features = default_features()
    if not protocol_features:
        features &= ~(1 << codec.VHOST_USER_F_PROTOCOL_FEATURES)
    s.handle(message(Request.SET_FEATURES, U64.pack(features)), [])
    if protocol_features:
        s.handle(message(Request.SET_PROTOCOL_FEATURES, U64.pack(BACKEND_PROTOCOL_FEATURES)), [])
    return s


def started(index: int = 0) -> Session:
    s = negotiated()
    s.handle(message(Request.SET_MEM_TABLE, codec.encode_mem_table([codec.MemRegion(0, 1 << 20, 0, 0)])), [30])
    s.handle(message(Request.SET_VRING_NUM, codec.encode_vring_state(index, 128)), [])
    s.handle(message(Request.SET_VRING_ADDR, codec.encode_vring_addr(VringAddr(index, 0, 0x1000, 0x3000, 0x2000, 0))),
             [])
    s.handle(message(Request.SET_VRING_KICK, U64.pack(index)), [31])
    acts = s.handle(message(Request.SET_VRING_ENABLE, codec.encode_vring_state(index, 1)), [])
    assert acts == [StartRing(index)]
    return s


def test_features_without_seqpacket_leave_its_bit_out() -> None:
    assert not default_features(seqpacket=False) & (1 << codec.VIRTIO_VSOCK_F_SEQPACKET)
    assert default_features() & (1 << codec.VIRTIO_VSOCK_F_SEQPACKET)
    s = Session(guest_cid=5, features=default_features(seqpacket=False))
    with pytest.raises(ProtocolError, match="acks features never offered"):
        s.handle(message(Request.SET_FEATURES, U64.pack(default_features())), [])


def test_session_reports_the_features_the_front_end_acked() -> None:
    s = negotiated()
    assert s.has(codec.VIRTIO_RING_F_EVENT_IDX) and s.has(codec.VIRTIO_F_VERSION_1)
    assert not s.has(63)  # never offered


def test_unknown_protocol_features_are_refused() -> None:
    with pytest.raises(ProtocolError, match="acks unknown protocol features"):
        negotiated().handle(message(Request.SET_PROTOCOL_FEATURES, U64.pack(1 << 40)), [])


def test_set_owner_then_reset_stops_running_rings_and_forgets_features() -> None:
    s = started(0)
    assert s.handle(message(Request.SET_OWNER), []) == []
    assert s.owner
    for req in (Request.RESET_OWNER, Request.RESET_DEVICE):
        acts = s.handle(message(req), [])
        assert acts == ([StopRing(0)] if req == Request.RESET_OWNER else [])
        assert s.acked_features == 0 and not any(v.started for v in s.vrings)


def test_set_config_is_refused_the_config_space_is_read_only() -> None:
    with pytest.raises(ProtocolError, match="read-only"):
        negotiated().handle(message(Request.SET_CONFIG, codec.encode_config(0, b"\5\0\0\0\0\0\0\0")), [])


def test_new_memory_table_while_a_ring_runs_is_taken() -> None:
    s = started(0)
    table = [codec.MemRegion(0, 2 << 20, 0, 0)]
    acts = s.handle(message(Request.SET_MEM_TABLE, codec.encode_mem_table(table)), [32])
    assert acts == [SetMemTable(table, [32])]


@pytest.mark.parametrize(
    ("req", "payload"),
    [
        (Request.SET_VRING_NUM, codec.encode_vring_state(0, 256)),
        (Request.SET_VRING_BASE, codec.encode_vring_state(0, 5)),
        (Request.SET_VRING_ADDR, codec.encode_vring_addr(VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))),
    ],
)
def test_a_running_ring_cannot_be_reconfigured(req: int, payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="vring 0 is running"):
        started(0).handle(message(req, payload), [])


def test_kick_without_an_fd_polling_mode_is_refused() -> None:
    with pytest.raises(ProtocolError, match="polling mode"):
        negotiated().handle(message(Request.SET_VRING_KICK, U64.pack(0x100)), [])


def test_vring_enable_checks_its_value_and_needs_protocol_features() -> None:
    with pytest.raises(ProtocolError, match="value 2 is not 0 or 1"):
        negotiated().handle(message(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 2)), [])
    with pytest.raises(ProtocolError, match="without VHOST_USER_F_PROTOCOL_FEATURES"):
        negotiated(protocol_features=False).handle(
            message(Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 1)), [])


def test_vring_disable_stops_a_running_ring_once() -> None:
    s = started(1)
    disable = message(Request.SET_VRING_ENABLE, codec.encode_vring_state(1, 0))
    assert s.handle(disable, []) == [StopRing(1)]
    assert s.handle(disable, []) == []


def test_status_is_taken_and_read_as_zero() -> None:
    s = negotiated()
    assert s.handle(message(Request.SET_STATUS, U64.pack(0xF)), []) == []
    acts = s.handle(message(Request.GET_STATUS), [])
    assert len(acts) == 1 and isinstance(acts[0], Reply)
    assert acts[0].data[codec.HEADER_SIZE:] == U64.pack(0)


# -- the vsock header and the rx payload views ------------------------------------------------


def test_header_describes_an_unknown_op_by_number() -> None:
    h = H.Header(5, 2, 1234, 5000, 0, 1, 99, 0, 262144, 0)
    assert "op99" in h.describe() and "5:1234 -> 2:5000" in h.describe()
    assert H.unpack(h.pack()) == h
    assert "REQUEST" in h._replace(op=H.Op.REQUEST).describe()


def test_payload_views_skip_the_header_across_segments_and_stop_at_want() -> None:
    segs = [memoryview(bytearray(20)), memoryview(bytearray(30)), memoryview(bytearray(100))]
    views = payload_views(segs, 60)
    assert [len(v) for v in views] == [6, 54]  # 44 header bytes: all of the first, 24 of the second
    assert views[0].obj is segs[1].obj
    assert [len(v) for v in payload_views(segs, 500)] == [6, 100]  # less room than wanted: all there is
    assert payload_views([memoryview(bytearray(44))], 10) == []
    assert [len(v) for v in payload_views([memoryview(bytearray(100))], 56)] == [56]


@given(st.lists(st.integers(0, 200), max_size=6), st.integers(0, 1000))
def test_payload_views_cover_exactly_the_room_after_the_header(sizes: list[int], want: int) -> None:
    segs = [memoryview(bytearray(n)) for n in sizes]
    views = payload_views(segs, want)
    assert sum(len(v) for v in views) == min(want, max(0, sum(sizes) - H.HDR_SIZE))


# -- the vsock core: where the guest's headers are read (guest_packet and what it calls) ------


class Events:
    """An event sink that listens: what the core published, as (kind, detail, rule)."""

    active = True

    def __init__(self) -> None:
        self.got: list[tuple[EventKind, str, str]] = []

    def publish(self, kind: EventKind, device: str, conn: tuple[int, int, int, int] | None = None,
                detail: str = "", rule: str = "") -> None:
        self.got.append((kind, detail, rule))


class Owner:
    """C's pump as the core sees it (vsock.lending.Owner), holding connections Python lent it:
    ``take_back`` gives a connection back with the credit state it was lent with."""

    def __init__(self) -> None:
        self.taken: list[int] = []
        self.lent: dict[int, tuple[int, int, int]] = {}

    def lend(self, core: VsockCore, conn: Connection) -> None:
        conn.own = len(self.lent)
        core.owned += 1
        self.lent[conn.own] = conn.credit.tx_state()

    def take_back(self, slot: int) -> OwnedBack:
        self.taken.append(slot)
        return OwnedBack(OWN_TAKEN, 0, *self.lent.pop(slot), 0)

    # the rest of the pump's interface: these tests lend by hand, and nothing else may be asked
    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None,
            comment: bytes = b"") -> int:
        raise AssertionError("own() was not expected")

    def fill(self, slot: int) -> OwnedBack | bool:
        raise AssertionError("fill() was not expected")

    def progress(self, slot: int) -> int:
        raise AssertionError("progress() was not expected")

    def shut(self, slot: int) -> bool:
        raise AssertionError("shut() was not expected")

    def counts(self, slot: int) -> OwnedCounts:
        raise AssertionError("counts() was not expected")

    def peek(self, slot: int) -> OwnedBack:
        raise AssertionError("peek() was not expected")


class ClosingPeer(FakePeer):
    """A far side that closed both ways, as a sibling's kernel close() shows it."""

    def far_shutdown(self) -> int:
        return H.SHUTDOWN_BOTH


def taps(core: VsockCore) -> list[tuple[bool, bytes, str | None]]:
    seen: list[tuple[bool, bytes, str | None]] = []
    core.taps.add(lambda _dev, to_guest, hdr, _payload, mark=None: seen.append((to_guest, bytes(hdr), mark)))
    return seen


def test_spoofed_packet_is_captured_with_its_mark_and_dropped() -> None:
    t = Harness()
    seen = taps(t.core)
    t.send(Op.RW, src_cid=9, payload=b"x")
    ((to_guest, hdr, mark),) = seen
    assert not to_guest and H.unpack(hdr).src_cid == 9
    assert mark is not None and verdict_of(mark) is Verdict.SPOOFED
    assert t.core.counters.spoofed == 1 and t.core.counters.tx_packets == 0 and t.drain() == []


def test_packets_are_captured_with_their_connections_mark_and_a_request_after_its_verdict() -> None:
    t = Harness()
    seen = taps(t.core)
    t.send(Op.REQUEST)
    assert [(g, H.unpack(h).op) for g, h, _ in seen] == [(False, Op.REQUEST)]  # once, by _guest_request
    (conn,) = t.core.conns.values()
    conn.mark = Mark.rewritten_to("remap 3=2", 2, 1234)
    t.send(Op.CREDIT_REQUEST)
    t.send(Op.RW, dst_port=4321, payload=b"?")  # no such connection: captured without a mark
    assert [(H.unpack(h).op, m) for g, h, m in seen[1:] if not g] == [(Op.CREDIT_REQUEST, conn.mark), (Op.RW, None)]


def test_bad_length_without_a_connection_is_dropped_and_counted() -> None:
    t = Harness()
    t.send(Op.RW, payload=b"abc", length=4)  # the header claims more than the chain holds
    t.send(Op.RW, payload=b"", length=H.MAX_PKT_PAYLOAD + 1)
    assert t.core.counters.bad_packets == 2 and t.core.counters.drops == {"bad-len": 2}
    assert t.drain() == [] and not t.core.conns


def test_rst_of_an_unknown_type_gets_nothing_back() -> None:
    t = Harness()
    t.send(Op.RST, type_=9)
    assert t.drain() == [] and t.core.counters.drops == {"bad-type": 1}


def test_tuple_of_a_connection_the_far_side_closed_is_free_at_once_for_a_new_request() -> None:
    t = Harness(ClosingPeer())
    conn = t.open()
    t.peer.eof = True
    t.core.peer_readable(conn)
    assert [(h.op, h.flags) for h, _ in t.drain()] == [(Op.SHUTDOWN, H.SHUTDOWN_BOTH)]
    assert not t.core.conns
    t.send(Op.REQUEST)  # the guest dials again from the same port before its RST
    (new,) = t.core.conns.values()
    assert new is not conn and new.key == conn.key
    t.core.peer_connected(new)
    assert [h.op for h, _ in t.drain()] == [Op.RESPONSE]
    t.core.peer_readable(new)  # the far side closes this one too
    assert [(h.op, h.flags) for h, _ in t.drain()] == [(Op.SHUTDOWN, H.SHUTDOWN_BOTH)]
    t.send(Op.RST)  # the guest's answer to that SHUTDOWN: taken as such, not answered
    assert t.drain() == [] and not t.core.conns and "unknown-connection" not in t.core.counters.drops
    t.send(Op.RW, payload=b"x")  # the tuple is free: after the answer, a packet is for no connection
    assert [h.op for h, _ in t.drain()] == [Op.RST]


def test_packet_for_a_connection_c_runs_takes_it_back_first() -> None:
    t = Harness()
    owner = Owner()
    t.core.owner = owner
    conn = t.open()
    owner.lend(t.core, conn)
    t.send(Op.CREDIT_UPDATE, fwd_cnt=0, buf_alloc=131072)
    assert owner.taken == [0] and conn.own == -1 and t.core.owned == 0
    assert conn.credit.tx_state()[1] == 131072  # the header's buf_alloc, after C's state came back
    owner.lend(t.core, conn)
    assert t.core.guest_credit(H.Type.STREAM, Op.CREDIT_REQUEST, GPORT, 2, 1234, 65536, 0)
    assert owner.taken == [0, 0] and conn.own == -1
    assert [h.op for h, _ in t.drain()] == [Op.CREDIT_UPDATE]


def test_seqpacket_message_goes_to_the_peer_whole_once_its_last_fragment_comes() -> None:
    class SeqPeer(FakePeer):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[tuple[bytes, bool]] = []

        def send_message(self, data: bytes, eor: bool) -> bool:
            self.messages.append((data, eor))
            return True

    peer = SeqPeer()
    t = Harness(peer)
    t.core.seqpacket = True
    t.send(Op.REQUEST, type_=H.Type.SEQPACKET)
    (conn,) = t.core.conns.values()
    t.core.peer_connected(conn)
    t.drain()
    t.send(Op.RW, type_=H.Type.SEQPACKET, payload=b"first ")
    assert peer.messages == []
    t.send(Op.RW, type_=H.Type.SEQPACKET, payload=b"and last", flags=H.SEQ_EOM | H.SEQ_EOR)
    assert peer.messages == [(b"first and last", True)]


def test_empty_rw_packets_change_nothing() -> None:
    t = Harness()
    conn = t.open()
    t.send(Op.RW, payload=b"")
    assert t.core.guest_rw_run(GPORT, 2, 1234, 262144, 0, 0, [memoryview(b"")], 2)  # C's run, not lent
    t.core.flush_host()
    assert conn.out_bytes == 0 and conn.credit.ahead == 0 and not conn.flags & Connection.WAIT_CREDIT
    assert t.peer.sent == b"" and t.drain() == [] and t.core.counters.tx_packets == 4  # REQUEST, RW, run of 2


def test_rw_within_the_window_asks_for_no_credit_work() -> None:
    t = Harness(buf_alloc=1 << 20)
    conn = t.open()
    t.send(Op.RW, payload=b"a" * 100)
    assert not conn.flags & Connection.WAIT_CREDIT and conn.credit.ahead == 0
    assert bytes(t.peer.sent) == b"a" * 100 and t.drain() == []  # nothing due yet: no update


def test_guest_events_reset_response_and_bad_ops_of_known_connections() -> None:
    t = Harness()
    ev = Events()
    t.core.events = ev
    t.open()
    t.send(Op.RST)
    assert ev.got[-1][:2] == (EventKind.RESET, "by the guest") and t.peer.closed is True
    # a host program's connection the guest refuses: REFUSED
    peer = FakePeer()
    conn = t.core.host_connect(peer, 6000)
    assert conn is not None
    t.drain()
    t.core.guest_packet(H.pack(GUEST, 2, 6000, conn.peer_port, 0, 1, Op.RST, 0, 0, 0), [], 0)
    assert ev.got[-1][:2] == (EventKind.REFUSED, "by the guest") and peer.closed is True


def test_guest_response_accepts_a_host_connection_once_and_a_second_one_resets_it() -> None:
    t = Harness()
    peer = FakePeer()
    conn = t.core.host_connect(peer, 6000)
    assert conn is not None
    ((req, _),) = t.drain()
    assert req.op == Op.REQUEST
    response = H.pack(GUEST, 2, 6000, conn.peer_port, 0, 1, Op.RESPONSE, 0, 262144, 0)
    t.core.guest_packet(response, [], 0)
    assert conn.state is State.ESTABLISHED and peer.established_port == conn.peer_port and peer.reading
    t.core.guest_packet(response, [], 0)
    assert t.core.counters.drops == {"unexpected-response": 1}
    assert [h.op for h, _ in t.drain()] == [Op.RST] and peer.closed is True


def test_duplicate_request_is_dropped_and_an_unknown_op_resets() -> None:
    t = Harness()
    t.open()
    t.send(Op.REQUEST)
    assert t.core.counters.drops == {"duplicate-request": 1} and len(t.core.conns) == 1
    t.send(11)
    assert t.core.counters.drops["bad-op"] == 1 and not t.core.conns
    assert [h.op for h, _ in t.drain()] == [Op.RST] and t.peer.closed is True


def test_rw_runs_c_checked_are_taken_for_known_streams_only() -> None:
    t = Harness()
    owner = Owner()
    t.core.owner = owner
    data = [memoryview(b"run of "), memoryview(b"three")]
    assert not t.core.guest_rw_run(GPORT, 2, 1234, 262144, 0, 12, data, 2)  # no such connection
    conn = t.open()
    conn.mark = Mark.rewritten_to(None, 2, 1)
    assert not t.core.guest_rw_run(GPORT, 2, 1234, 262144, 0, 12, data, 2, captured=True)  # C cannot write it
    owner.lend(t.core, conn)
    before = t.core.counters.tx_packets
    assert t.core.guest_rw_run(GPORT, 2, 1234, 262144, 0, 12, data, 2)
    t.core.flush_host()
    assert owner.taken == [0] and bytes(t.peer.sent) == b"run of three"
    assert t.core.counters.tx_packets == before + 2 and conn.stats[:2] == [2, 12]


def test_rw_tail_c_left_is_queued_for_the_peer_of_an_open_connection_only() -> None:
    t = Harness(FakePeer(accept=0))
    t.core.guest_rw_tail(GPORT, 2, 1234, 4, [memoryview(b"lost")])  # no such connection: nothing
    conn = t.open()
    t.core.guest_rw_tail(GPORT, 2, 1234, 4, [memoryview(b"tail")])
    t.core.guest_rw_tail(GPORT, 2, 1234, 2, [memoryview(b"!!")])  # already waiting for the flush: queued once
    assert conn.out_bytes == 6 and list(t.core._flush).count(conn) == 1
    t.peer.accept = 100
    t.core.flush_host()
    assert bytes(t.peer.sent) == b"tail!!"
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    t.core.guest_rw_tail(GPORT, 2, 1234, 4, [memoryview(b"late")])  # closed meanwhile: the data went with it
    assert b"late" not in bytes(t.peer.sent)


def test_request_at_the_limit_is_refused_captured_and_published() -> None:
    t = Harness()
    t.core.max_connections = 0
    ev = Events()
    t.core.events = ev
    seen = taps(t.core)
    t.send(Op.REQUEST)
    ((h, _),) = t.drain()
    assert h.op == Op.RST and t.core.counters.limit_refused == 1
    assert ev.got == [(EventKind.REFUSED, "at its max-connections (0)", "")]
    assert verdict_of(seen[0][2]) is Verdict.REFUSED


def test_request_at_the_pending_limit_is_refused_with_nothing_listening() -> None:
    t = Harness()
    t.core.max_pending = 1
    t.send(Op.REQUEST)
    t.send(Op.REQUEST, dst_port=1235)  # the first still connecting
    assert [h.op for h, _ in t.drain()] == [Op.RST] and t.core.counters.drops == {"too-many-pending": 1}


def test_request_denied_or_served_by_nothing_is_published_as_such() -> None:
    t = Harness()
    ev = Events()
    t.core.events = ev

    def deny(conn: Connection) -> None:
        conn.mark = Mark.denied("allow-out of cid5")
        return None

    t.core.connector = deny
    t.send(Op.REQUEST)
    t.core.connector = lambda conn: None
    t.send(Op.REQUEST, dst_port=1235)
    assert ev.got == [(EventKind.DENIED, "", "allow-out of cid5"), (EventKind.REFUSED, "nothing serves it", "")]
    assert t.core.counters.connections_refused == 2 and [h.op for h, _ in t.drain()] == [Op.RST, Op.RST]


def test_guest_half_closes_are_published_and_a_receive_shutdown_stops_reading() -> None:
    t = Harness()
    ev = Events()
    t.core.events = ev
    t.open()
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_RCV)
    assert ev.got[-1][:2] == (EventKind.HALF_CLOSED, "the guest receives no more") and not t.peer.reading
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
    assert ev.got[-1][:2] == (EventKind.CLOSED, "by the guest")
    assert t.peer.closed is False  # nothing left for the host: a clean close
    assert [h.op for h, _ in t.drain()] == [Op.RST]


def test_guest_send_shutdown_alone_is_published_and_shuts_the_host_write_side() -> None:
    t = Harness()
    ev = Events()
    t.core.events = ev
    t.open()
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
    assert ev.got[-1][:2] == (EventKind.HALF_CLOSED, "the guest sends no more") and t.peer.shut_wr
