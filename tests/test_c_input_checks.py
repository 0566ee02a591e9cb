"""The C tx path's checks of what the guest wrote, one chain shape at a time (issue 18 item 6).

Each case writes one hostile or unusual chain after a good packet, as a guest could, and the C
batch must give exactly what the Python walker and header checks make of the same ring
(test_fastpath.reference): the good packet as a run, the odd chain handed to Python. The
hypothesis test in test_fastpath.py draws shapes at random; these name every check of
vsproxy/_c/tx_batch.c's chain and header test, so each of its branches is taken (gcov's figure:
tests/input_coverage.py --c).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_c_seqpacket import SeqRings
from test_fastpath import GUEST, RxRig, add_header_only, add_packet, from_c, reference
from test_virtq import Rig

from vsproxy.fastpath import Run, TxFastPath
from vsproxy.virtq import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vsproxy.vsock import header as H
from vsproxy.vsock import lending, rx

pytestmark = pytest.mark.c_paths

NUM = 16
OUTSIDE = 0xDEAD_0000  # no guest memory there


def header(*, src_cid: int = GUEST, length: int = 8, type_: int = 1, op: int = H.Op.RW) -> bytes:
    return H.pack(src_cid, 2, 300, 5000, length, type_, op, 0, 65536, 0)


def direct(rig: Rig, descs: list[tuple[int, int, int]], nexts: list[int] | None = None) -> None:
    """A chain of direct descriptors (addr, len, flags), linked in order unless ``nexts`` says."""
    slots = [rig.ring.free.pop() for _ in descs]
    for k, (addr, length, flags) in enumerate(descs):
        nxt = nexts[k] if nexts is not None else (slots[k + 1] if k + 1 < len(slots) else 0)
        rig.ring.write_desc(slots[k], addr, length, flags, nxt)
    rig.ring.publish_avail(slots[0])


def indirect(rig: Rig, table: list[tuple[int, int, int, int]], *, table_len: int | None = None,
             table_at: int | None = None) -> None:
    """One INDIRECT descriptor pointing at ``table`` (addr, len, flags, next entries)."""
    raw = b"".join(a.to_bytes(8, "little") + n.to_bytes(4, "little") + f.to_bytes(2, "little")
                   + x.to_bytes(2, "little") for a, n, f, x in table)
    gpa = rig.buf(raw) if table_at is None else table_at
    slot = rig.ring.free.pop()
    rig.ring.write_desc(slot, gpa, len(raw) if table_len is None else table_len, VIRTQ_DESC_F_INDIRECT, 0)
    rig.ring.publish_avail(slot)


def two(rig: Rig, hdr: bytes, payload: bytes = b"payload!") -> tuple[int, int]:
    return rig.buf(hdr), rig.buf(payload)


Case = Callable[[Rig], None]


def head_out_of_range(rig: Rig) -> None:
    rig.ring.set_avail_entry(rig.ring.avail_idx, NUM + 3)
    rig.ring.set_avail_idx(rig.ring.avail_idx + 1)


def head_writable(rig: Rig) -> None:
    direct(rig, [(rig.buf(header(length=0)), H.HDR_SIZE, VIRTQ_DESC_F_WRITE)])


def indirect_table_of_three(rig: Rig) -> None:
    h, p = two(rig, header())
    indirect(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT, 1), (p, 4, VIRTQ_DESC_F_NEXT, 2), (p + 4, 4, 0, 0)])


def indirect_table_outside_memory(rig: Rig) -> None:
    indirect(rig, [(0, 0, 0, 0), (0, 0, 0, 0)], table_at=OUTSIDE)


def indirect_first_without_next(rig: Rig) -> None:
    h, p = two(rig, header())
    indirect(rig, [(h, H.HDR_SIZE, 0, 1), (p, 8, 0, 0)])


def indirect_first_next_elsewhere(rig: Rig) -> None:
    h, p = two(rig, header())
    indirect(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT, 0), (p, 8, 0, 0)])


def indirect_second_with_flags(rig: Rig) -> None:
    h, p = two(rig, header())
    indirect(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT, 1), (p, 8, VIRTQ_DESC_F_WRITE, 0)])


def next_beyond_the_table(rig: Rig) -> None:
    h, p = two(rig, header())
    direct(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (p, 8, 0)], nexts=[NUM + 1, 0])


def next_to_itself(rig: Rig) -> None:
    slot = rig.ring.free.pop()
    rig.ring.write_desc(slot, rig.buf(header()), H.HDR_SIZE, VIRTQ_DESC_F_NEXT, slot)
    rig.ring.publish_avail(slot)


def three_direct(rig: Rig) -> None:
    h, p = two(rig, header())
    direct(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (p, 4, VIRTQ_DESC_F_NEXT), (p + 4, 4, 0)])


def short_header_descriptor(rig: Rig) -> None:
    h, p = two(rig, header())
    direct(rig, [(h, 40, VIRTQ_DESC_F_NEXT), (p, 8, 0)])


def header_outside_memory(rig: Rig) -> None:
    _, p = two(rig, header())
    direct(rig, [(OUTSIDE, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (p, 8, 0)])


def header_only_outside_memory(rig: Rig) -> None:
    direct(rig, [(OUTSIDE, H.HDR_SIZE, 0)])


def empty_payload_descriptor(rig: Rig) -> None:
    h, p = two(rig, header(length=0))
    direct(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (p, 0, 0)])


def payload_outside_memory(rig: Rig) -> None:
    h, _ = two(rig, header())
    direct(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (OUTSIDE, 8, 0)])


def payload_past_the_end_of_memory(rig: Rig) -> None:
    h, _ = two(rig, header())
    size = len(rig.dmem.regions[0].view)
    direct(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (rig.dmem.regions[0].guest_addr + size - 4, 8, 0)])


def credit_spoofed(rig: Rig) -> None:
    add_header_only(rig, 300, H.Op.CREDIT_UPDATE, src_cid=GUEST + 1)


def credit_of_an_unknown_type(rig: Rig) -> None:
    add_header_only(rig, 300, H.Op.CREDIT_UPDATE, type_=3)


def credit_request_seqpacket(rig: Rig) -> None:
    add_header_only(rig, 300, H.Op.CREDIT_REQUEST, type_=2)  # C takes this one too


def header_only_other_op(rig: Rig) -> None:
    add_header_only(rig, 300, H.Op.SHUTDOWN)


def header_only_with_a_length(rig: Rig) -> None:
    add_header_only(rig, 300, H.Op.CREDIT_UPDATE, length=4)


def rw_spoofed(rig: Rig) -> None:
    add_packet(rig, 300, b"spoof", src_cid=GUEST + 1)


def rw_seqpacket(rig: Rig) -> None:
    add_packet(rig, 300, b"message", type_=2, flags=H.SEQ_EOM)


def rw_seqpacket_without_eom(rig: Rig) -> None:
    add_packet(rig, 300, b"part of a message", type_=2)


def rw_seqpacket_with_every_flag(rig: Rig) -> None:
    add_packet(rig, 300, b"flags", type_=2, flags=0xFFFF_FFFF)  # Python keeps EOM and EOR of them


def rw_stream_with_eom(rig: Rig) -> None:
    add_packet(rig, 300, b"stream", flags=H.SEQ_EOM)  # a stream's flags mean nothing: a run


def rw_seqpacket_spoofed(rig: Rig) -> None:
    add_packet(rig, 300, b"spoof", type_=2, flags=H.SEQ_EOM, src_cid=GUEST + 1)


def rw_seqpacket_longer_than_its_buffer(rig: Rig) -> None:
    add_packet(rig, 300, b"short", type_=2, flags=H.SEQ_EOM, length=6)


def rw_seqpacket_of_length_0(rig: Rig) -> None:
    add_packet(rig, 300, b"unused", type_=2, flags=H.SEQ_EOM, length=0)


def rw_other_op_with_payload(rig: Rig) -> None:
    add_packet(rig, 300, b"\0" * 4, op=H.Op.SHUTDOWN)


def rw_of_length_0(rig: Rig) -> None:
    add_packet(rig, 300, b"unused", length=0)


def rw_longer_than_its_buffer(rig: Rig) -> None:
    add_packet(rig, 300, b"short", length=6)


def rw_above_the_largest_packet(rig: Rig) -> None:
    add_packet(rig, 300, b"\0" * (H.MAX_PKT_PAYLOAD + 8), length=H.MAX_PKT_PAYLOAD + 1)


CASES: dict[str, Case] = {f.__name__: f for f in (
    head_out_of_range, head_writable, indirect_table_of_three, indirect_table_outside_memory,
    indirect_first_without_next, indirect_first_next_elsewhere, indirect_second_with_flags, next_beyond_the_table,
    next_to_itself, three_direct, short_header_descriptor, header_outside_memory, header_only_outside_memory,
    empty_payload_descriptor, payload_outside_memory, payload_past_the_end_of_memory, credit_spoofed,
    credit_of_an_unknown_type, credit_request_seqpacket, header_only_other_op, header_only_with_a_length,
    rw_spoofed, rw_seqpacket, rw_seqpacket_without_eom, rw_seqpacket_with_every_flag, rw_stream_with_eom,
    rw_seqpacket_spoofed, rw_seqpacket_longer_than_its_buffer, rw_seqpacket_of_length_0, rw_other_op_with_payload,
    rw_of_length_0, rw_longer_than_its_buffer, rw_above_the_largest_packet)}
# what C takes itself, and the item it makes of it (every other case is Python's: "slow")
TAKEN_BY_C = {"credit_request_seqpacket": "credit", "rw_seqpacket": "seq", "rw_seqpacket_without_eom": "seq",
              "rw_seqpacket_with_every_flag": "seq", "rw_stream_with_eom": "run"}


@pytest.mark.parametrize("indirect_ring", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_each_chain_shape_the_guest_writes_is_judged_as_the_python_walker_judges_it(
        case: str, indirect_ring: bool) -> None:
    rig = Rig(indirect=indirect_ring, num=NUM)
    try:
        add_packet(rig, 100, b"a good packet first")
        CASES[case](rig)
        add_packet(rig, 100, b"and one after")
        n = (rig.q._avail16[1] - rig.q.last_avail_idx) & 0xFFFF
        avail = [rig.q._avail16[2 + (i & (NUM - 1))] for i in range(n)]
        got = from_c(TxFastPath(rig.q, GUEST, NUM).batch())
        heads = [h for e in got for h in e[3]]
        assert heads == avail  # every chain, in ring order
        assert got == reference(rig, heads)
        assert got[0] == ("run", (100, 2, 5000), b"a good packet first", [avail[0]])
        assert got[1][0] == TAKEN_BY_C.get(case, "slow")  # the odd one is Python's
    finally:
        rig.close()


def test_a_ring_without_indirect_descriptors_hands_an_indirect_chain_to_python() -> None:
    rig = Rig(indirect=False, num=NUM)
    try:
        h, p = two(rig, header())
        indirect(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT, 1), (p, 8, 0, 0)])
        items = from_c(TxFastPath(rig.q, GUEST, NUM).batch())
        assert [e[0] for e in items] == ["slow"]
        assert rig.q._walk(items[0][3][0]).reason == "indirect: not negotiated"  # type: ignore[union-attr]
    finally:
        rig.close()


def payload_longer_than_memory(rig: Rig) -> None:
    h, p = two(rig, header())
    direct(rig, [(h, H.HDR_SIZE, VIRTQ_DESC_F_NEXT), (p, 0xFFFF_FFFF, 0)])


def test_a_payload_descriptor_longer_than_guest_memory_goes_to_python() -> None:
    rig = Rig(indirect=True, num=NUM)
    try:
        payload_longer_than_memory(rig)
        items = from_c(TxFastPath(rig.q, GUEST, NUM).batch())
        assert [e[0] for e in items] == ["slow"] and items == reference(rig, items[0][3])
    finally:
        rig.close()


# -- the rx ring: the buffers the guest posts for vsproxy to write into ----------------------

RxCase = Callable[[RxRig], None]


def rx_head_out_of_range(t: RxRig) -> None:
    t.rig.ring.set_avail_entry(t.rig.ring.avail_idx, NUM + 5)
    t.rig.ring.set_avail_idx(t.rig.ring.avail_idx + 1)


def rx_one(t: RxRig, addr: int, length: int, flags: int) -> None:
    slot = t.rig.ring.free.pop()
    t.rig.ring.write_desc(slot, addr, length, flags, 0)
    t.rig.ring.publish_avail(slot)


def rx_chained_to_itself(t: RxRig) -> None:
    slot = t.rig.ring.free.pop()
    t.rig.ring.write_desc(slot, t.rig.gmem.alloc(4096), 4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, slot)
    t.rig.ring.publish_avail(slot)


RX_CASES: dict[str, RxCase] = {
    "head out of range": rx_head_out_of_range,
    "readable, not writable": lambda t: rx_one(t, t.rig.gmem.alloc(4096), 4096, 0),
    "shorter than a header": lambda t: rx_one(t, t.rig.gmem.alloc(64), H.HDR_SIZE - 1, VIRTQ_DESC_F_WRITE),
    "outside guest memory": lambda t: rx_one(t, OUTSIDE, 4096, VIRTQ_DESC_F_WRITE),
    "longer than guest memory": lambda t: rx_one(t, t.rig.gmem.alloc(64), 0xFFFF_FFFF, VIRTQ_DESC_F_WRITE),
    "chained to itself": rx_chained_to_itself,
}


@pytest.mark.parametrize("case", list(RX_CASES))
def test_rx_buffers_of_any_other_shape_are_left_to_python_untouched(case: str) -> None:
    t = RxRig(nbufs=0)
    try:
        RX_CASES[case](t)
        upd = H.pack(2, GUEST, 1 << 30, 5000, 0, 1, H.Op.CREDIT_UPDATE, 0, 65536, 4096)
        assert not t.fast.put(upd)  # a control packet: not written, the chain not taken
        t.host.sendall(b"z" * 5000)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)  # host data: the same
        assert (r.packets, r.bytes, r.status) == (0, 0, rx.RX_SLOW)
        assert t.rig.q.last_avail_idx == 0 and t.rig.q.used_idx == 0
        t.rig.q.pop()  # the Python walker's turn: a bad buffer is counted there, with used length 0
        bad = case != "shorter than a header"  # that one is a chain: Python writes it as a short buffer
        assert t.rig.q.counters.bad_chains == int(bad), t.rig.q.counters.last_bad
    finally:
        t.close()


def test_a_buffer_of_exactly_a_header_takes_a_control_packet_but_no_data() -> None:
    t = RxRig(nbufs=0)
    try:
        gpa = t.rig.gmem.alloc(64)
        rx_one(t, gpa, H.HDR_SIZE, VIRTQ_DESC_F_WRITE)
        t.host.sendall(b"z" * 100)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.status) == (0, rx.RX_SLOW)  # no room for a byte of payload: Python's
        upd = H.pack(2, GUEST, 1 << 30, 5000, 0, 1, H.Op.CREDIT_UPDATE, 0, 65536, 4096)
        assert t.fast.put(upd)
        t.rig.q.publish()
        assert t.rig.ring.read_used(0)[1] == H.HDR_SIZE and t.rig.gmem.read(gpa, H.HDR_SIZE) == upd
    finally:
        t.close()


# -- SEQPACKET: the type and the flags the guest writes ------------------------------------

def test_a_stream_and_a_seqpacket_packet_on_the_same_ports_are_runs_of_their_own() -> None:
    rig = Rig(indirect=True, num=NUM)
    try:
        add_packet(rig, 300, b"stream bytes")
        add_packet(rig, 300, b"a message", type_=2, flags=H.SEQ_EOM)
        add_packet(rig, 300, b"more stream bytes")
        got = from_c(TxFastPath(rig.q, GUEST, NUM).batch())
        assert [e[0] for e in got] == ["run", "seq", "run"]
        assert got == reference(rig, [h for e in got for h in e[3]])
    finally:
        rig.close()


@pytest.mark.parametrize(("flags", "c_sends"), [(H.SEQ_EOM, True), (H.SEQ_EOM | H.SEQ_EOR, True), (0, False),
                                                (H.SEQ_EOR, False), (0xFFFF_FFFE, False), (0xFFFF_FFFF, True)])
def test_a_lent_seqpacket_connection_s_packet_is_c_s_only_if_it_ends_a_message(flags: int, c_sends: bool) -> None:
    """C sends a packet that is a whole message (its EOM bit, whatever the others say); one that
    is part of a longer message gives the connection back to Python, which assembles it."""
    r = SeqRings()
    try:
        r.lend_seq()
        r.send_seq(b"payload", flags)
        items = r.tx.batch()
        if c_sends:
            assert items == [] and r.messages() == [b"payload"] and r.tx.released == []
        else:
            (run,) = items
            assert r.messages() == [] and isinstance(run, Run) and run.flags == (flags,)
            ((_, back),) = r.tx.released
            assert back.why == lending.OWN_GUEST
    finally:
        r.close()
