"""The C tx fast path against the Python walker, its reference.

For any ring (Linux-shaped packets mixed with hostile chains) the C batch must take the same
heads in the same order, hand back as a run exactly the RW packets the Python path would
accept as such (same payload bytes), and leave everything else to Python."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_virtq import Rig

from vsproxy import fastpath
from vsproxy.capture import format as fmt
from vsproxy.capture import reader
from vsproxy.endpoints.base import Buffer
from vsproxy.fastpath import CreditItem, Run, Slow, Tail, TxFastPath
from vsproxy.simguest.ring import Buf
from vsproxy.taps import CAP_PCAP, CAP_PCAPNG, CAP_SPARE, RecordChunk, Taps
from vsproxy.virtq import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, Chain
from vsproxy.vsock import header as H
from vsproxy.vsock import rx

pytestmark = pytest.mark.c_paths

GUEST = 5


def test_c_fast_path_is_built() -> None:
    # CI builds it (tests/run.sh installs gcc and the Python headers); a missing build fails here.
    assert fastpath.AVAILABLE, "vsproxy._fastpath was not built: pip install -e . with a C compiler"


Expected = list[tuple[str, tuple[int, int, int] | None, bytes, list[int]]]


def _direct_single(rig: Rig, head: int) -> bool:
    """The head descriptor stands alone: neither NEXT nor INDIRECT."""
    flags = int.from_bytes(bytes(rig.q._desc[16 * head + 12 : 16 * head + 14]), "little")
    return flags == 0


def reference(rig: Rig, heads: list[int]) -> Expected:
    """What the Python walker makes of these heads, grouped as the C path groups them."""
    out: Expected = []
    for head in heads:
        result = rig.q._walk(head)
        fast = False
        if (isinstance(result, Chain) and len(result.readable) == 1 and len(result.readable[0]) == H.HDR_SIZE
                and result.read_len == H.HDR_SIZE and _direct_single(rig, head)):
            h = H.unpack(result.readable[0])
            if (h.src_cid == GUEST and h.type in (1, 2) and h.op in (H.Op.CREDIT_UPDATE, H.Op.CREDIT_REQUEST)
                    and h.len == 0):
                out.append(("credit", (h.src_port, h.dst_cid, h.dst_port),
                            bytes([h.op, h.type]) + H.pack(*h)[36:44], [head]))
                continue
        if isinstance(result, Chain) and len(result.readable) == 2 and len(result.readable[0]) == H.HDR_SIZE:
            h = H.unpack(result.readable[0])
            payload = result.readable[1]
            fast = (h.src_cid == GUEST and h.type in (1, 2) and h.op == H.Op.RW and 0 < h.len <= len(payload)
                    and h.len <= H.MAX_PKT_PAYLOAD)
        if not fast:
            out.append(("slow", None, b"", [head]))
            continue
        key = (h.src_port, h.dst_cid, h.dst_port)
        data = bytes(payload[: h.len])
        kind = "run" if h.type == 1 else "seq"
        if kind == "seq":  # each packet's boundary and flags kept (seq_framed)
            data = seq_framed(data, h.flags)
        if out and out[-1][0] == kind and out[-1][1] == key:
            kind, k, prev, hs = out[-1]
            out[-1] = (kind, k, prev + data, [*hs, head])
        else:
            out.append((kind, key, data, [head]))
    return out


def seq_framed(data: bytes, flags: int) -> bytes:
    """A SEQPACKET packet in an expectation: its flags and length before its bytes, so that a
    run compares equal only with the same packets, boundaries and flags."""
    return flags.to_bytes(4, "little") + len(data).to_bytes(4, "little") + data


def from_c(items: Sequence[Run | Slow | CreditItem | Tail]) -> Expected:
    out: Expected = []
    for it in items:
        if isinstance(it, Slow):
            out.append(("slow", None, b"", [it.head]))
        elif isinstance(it, CreditItem):
            fields = it.buf_alloc.to_bytes(4, "little") + it.fwd_cnt.to_bytes(4, "little")
            out.append(("credit", (it.src_port, it.dst_cid, it.dst_port), bytes([it.op, it.type]) + fields,
                        [it.head]))
        elif it.type == fastpath.SEQPACKET:
            assert len(it.flags) == len(it.segments)
            out.append(("seqtail" if isinstance(it, Tail) else "seq", (it.src_port, it.dst_cid, it.dst_port),
                        b"".join(seq_framed(bytes(s), f) for s, f in zip(it.segments, it.flags, strict=True)),
                        it.heads))
        else:
            out.append(("tail" if isinstance(it, Tail) else "run", (it.src_port, it.dst_cid, it.dst_port),
                        b"".join(bytes(s) for s in it.segments), it.heads))
    return out


def add_packet(rig: Rig, src_port: int, payload: bytes, *, op: int = H.Op.RW, src_cid: int = GUEST,
               length: int | None = None, type_: int = 1, flags: int = 0) -> None:
    n = len(payload) if length is None else length
    hdr = H.pack(src_cid, 2, src_port, 5000, n, type_, op, flags, 65536, 0)
    rig.ring.add_chain([Buf(rig.buf(hdr), H.HDR_SIZE), Buf(rig.buf(payload), len(payload))])


def add_header_only(rig: Rig, src_port: int, op: int, *, src_cid: int = GUEST, length: int = 0, type_: int = 1,
                    fwd_cnt: int = 77) -> None:
    """A control packet as Linux sends it: the header alone, in one descriptor."""
    hdr = H.pack(src_cid, 2, src_port, 5000, length, type_, op, 0, 131072, fwd_cnt)
    rig.ring.add_chain([Buf(rig.buf(hdr), H.HDR_SIZE)])


@pytest.mark.parametrize("indirect", [True, False])
def test_runs_group_consecutive_packets_of_one_stream(indirect: bool) -> None:
    rig = Rig(indirect=indirect, num=64)
    try:
        for i in range(5):
            add_packet(rig, 100, bytes([i]) * 10)
        add_packet(rig, 200, b"big" * 1000)  # above the copy threshold: zero-copy segment
        add_packet(rig, 100, b"z", src_cid=9)  # spoofed: Python handles it
        add_packet(rig, 100, b"\0", op=H.Op.SHUTDOWN, length=0)
        add_packet(rig, 100, b"abc", length=10)  # len beyond the buffer
        fast = TxFastPath(rig.q, GUEST, 64)
        items = fast.batch()
        heads = [h for e in from_c(items) for h in e[3]]
        assert from_c(items) == reference(rig, heads)
        kinds = [e[0] for e in from_c(items)]
        assert kinds == ["run", "run", "slow", "slow", "slow"]
        assert rig.q.pending() == 0
    finally:
        rig.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    packets=st.lists(
        st.tuples(
            st.sampled_from([100, 200]),
            st.binary(min_size=1, max_size=1500),
            st.sampled_from([H.Op.RW, H.Op.RW, H.Op.RW, H.Op.CREDIT_UPDATE]),
            st.sampled_from([GUEST, GUEST, GUEST, 7]),
            st.sampled_from([None, None, 0, 70000, 3]),
            # (type, flags): STREAM (whose flags mean nothing), SEQPACKET with EOM, EOR, none,
            # and every bit set
            st.sampled_from([(1, 0), (1, 0), (1, H.SEQ_EOM), (2, H.SEQ_EOM), (2, 0), (2, H.SEQ_EOM | H.SEQ_EOR),
                             (2, 0xFFFF_FFFF)]),
        ),
        max_size=12,
    ),
    garbage=st.lists(
        st.tuples(st.integers(0, 15), st.integers(0, 5 << 20), st.integers(0, 70000),
                  st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT, 2, 7]), st.integers(0, 20)),
        max_size=4,
    ),
)
def test_c_batch_matches_the_python_walker(
    packets: list[tuple[int, bytes, int, int, int | None, tuple[int, int]]],
    garbage: list[tuple[int, int, int, int, int]],
) -> None:
    rig = Rig(indirect=True, num=16)
    try:
        for port, payload, op, cid, length, (type_, flags) in packets:
            if len(payload) == 1 and payload[0] < 0x40:  # now and then a header-only packet
                add_header_only(rig, port, op if payload[0] & 1 else H.Op.CREDIT_REQUEST, src_cid=cid,
                                length=length or 0, type_=1 + (payload[0] >> 5 & 1))
            else:
                add_packet(rig, port, payload, op=op, src_cid=cid, length=length, type_=type_, flags=flags)
        for slot, addr, length, dflags, nxt in garbage:  # hostile descriptors and avail entries
            rig.ring.write_desc(slot, addr, length, dflags, nxt)
        rig.ring.set_avail_idx(len(packets) + len(garbage))
        for k, (slot, *_rest) in enumerate(garbage):
            rig.ring.set_avail_entry(len(packets) + k, slot)
        n = len(packets) + len(garbage)
        avail = [rig.q._avail16[2 + (i & 15)] for i in range(n)]
        fast = TxFastPath(rig.q, GUEST, 16)
        items = fast.batch()
        got = from_c(items)
        heads = [h for e in got for h in e[3]]
        assert heads == avail  # the same chains, in ring order
        assert got == reference(rig, heads)
    finally:
        rig.close()


class RxRig:
    """An rx ring of Linux-shaped buffers and a socketpair as the host side."""

    def __init__(self, nbufs: int = 8, size: int = 3776) -> None:
        import socket

        self.rig = Rig(device_writes=True, num=16)
        self.size = size
        self.bufs = [self.rig.gmem.alloc(size) for _ in range(nbufs)]
        for gpa in self.bufs:
            self.rig.ring.add_chain([Buf(gpa, size, writable=True)])
        self.host, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        self.fast = fastpath.RxFastPath(self.rig.q)
        self.hdr = H.pack(2, GUEST, 1 << 30, 5000, 0, 1, H.Op.RW, 0, 65536, 123)

    def used(self) -> list[tuple[int, bytes, bytes]]:
        self.rig.q.publish()
        out = []
        for i in range(self.rig.ring.used_idx()):
            head, length = self.rig.ring.read_used(i)
            gpa = self.bufs[head] if head < len(self.bufs) else 0
            raw = self.rig.gmem.read(gpa, length)
            out.append((length, raw[: H.HDR_SIZE], raw[H.HDR_SIZE:]))
        return out

    def close(self) -> None:
        self.host.close()
        self.peer.close()
        self.rig.close()


def test_rx_fill_splits_host_data_into_buffers_with_patched_headers() -> None:
    t = RxRig()
    try:
        data = bytes(range(256)) * 40  # 10240 bytes: 3732 + 3732 + 2776
        t.host.sendall(data)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.bytes, r.status) == (3, 10240, rx.RX_SHORT)
        used = t.used()
        assert b"".join(p for _, _, p in used) == data
        for length, hdr, payload in used:
            h = H.unpack(hdr)
            assert h.len == len(payload) == length - H.HDR_SIZE
            assert h._replace(len=0).pack() == t.hdr
        assert t.rig.q.last_avail_idx == 3
    finally:
        t.close()


def test_rx_fill_stops_at_credit_burst_eof_and_empty_socket() -> None:
    t = RxRig()
    try:
        t.host.sendall(b"x" * 5000)
        r = t.fast.fill(t.peer.fileno(), 1000, 16, t.hdr)  # credit
        assert (r.packets, r.bytes, r.status) == (1, 1000, rx.RX_LIMIT)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 1, t.hdr)  # burst of one
        assert (r.packets, r.bytes, r.status) == (1, 3732, rx.RX_LIMIT)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.bytes, r.status) == (1, 268, rx.RX_SHORT)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.status) == (0, rx.RX_AGAIN)
        t.host.shutdown(1)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.status) == (0, rx.RX_EOF)
    finally:
        t.close()


def test_rx_fill_leaves_other_chain_shapes_to_python() -> None:
    t = RxRig(nbufs=1)
    try:
        rig = t.rig
        a = rig.gmem.alloc(100)
        rig.ring.add_chain([Buf(a, 50, writable=True), Buf(a + 50, 50, writable=True)])  # two descriptors
        rig.ring.add_chain([Buf(1 << 40, 100, writable=True)])  # outside memory
        t.host.sendall(b"y" * 8000)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.status) == (1, rx.RX_SLOW)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert (r.packets, r.status) == (0, rx.RX_SLOW)
        chain = rig.q.pop()  # the Python walker takes the two-descriptor chain
        assert chain is not None and chain.write_len == 100
        assert rig.q.pop() is None and rig.q.counters.bad_chains == 1  # and rejects the bad one
    finally:
        t.close()


class Chunk:
    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
        self.size = size
        self.used = 0
        self.records = 0
        self.native: object = None


class RecordingSink:
    """A capture sink lending one chunk to the C paths (reserve/release), as the writer does."""

    def __init__(self, mode: int, size: int = 8 << 20) -> None:
        self.record_mode = mode
        self.chunk = Chunk(size)
        self.lent = False
        self.dropped = 0
        self.full = False  # every chunk waits for the file: nothing to lend
        self.snaplen = 0

    def interface(self, device: str) -> int:
        return 3

    def __call__(self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer],
                 mark: str | None = None) -> None:
        raise AssertionError("the C path formats its own records")

    def reserve(self) -> Chunk | None:
        assert not self.lent
        if self.full:
            return None
        self.lent = True
        return self.chunk

    def release(self, chunk: RecordChunk, used: int, records: int) -> None:
        assert self.lent and chunk is self.chunk
        self.lent = False
        chunk.used = used
        chunk.records += records

    def drop(self, count: int) -> None:
        self.dropped += count

    @property
    def committed(self) -> bytes:
        return bytes(self.chunk.view[: self.chunk.used])


def read_back(mode: int, records: bytes) -> list[tuple[bytes, bool | None, str]]:
    head = fmt.pcap_header() if mode == CAP_PCAP else fmt.pcapng_shb() + b"".join(
        fmt.pcapng_idb(f"if{i}") for i in range(4))
    return [(r.frame, r.inbound, r.interface) for r in reader.records(io.BytesIO(head + records))]


@pytest.mark.parametrize("mode", [CAP_PCAP, CAP_PCAPNG])
def test_c_capture_records_read_back_as_the_python_writer_frames(mode: int) -> None:
    rig = Rig(indirect=True, num=64)
    try:
        payloads = [bytes([i]) * (1 + 37 * i) for i in range(6)] + [b"big" * 1000]
        for p in payloads:
            add_packet(rig, 100, p)
        taps = Taps()
        sink = RecordingSink(mode)
        taps.set_sink(sink)
        fast = TxFastPath(rig.q, GUEST, 64, taps, "dev")
        items = fast.batch()
        assert len(items) == 1 and isinstance(items[0], Run) and items[0].cap_off == 0
        assert sink.lent  # the records stand in the lent chunk until the caller keeps them
        fast.capture.finish()
        got = read_back(mode, sink.committed)
        want = [fmt.vsockmon_frame(H.pack(GUEST, 2, 100, 5000, len(p), 1, H.Op.RW, 0, 65536, 0), p)
                for p in payloads]
        assert [g[0] for g in got] == want and sink.chunk.records == len(payloads)
        if mode == CAP_PCAPNG:
            assert {(g[1], g[2]) for g in got} == {(True, "if3")}  # from the guest, the device's interface
    finally:
        rig.close()


def test_a_full_chunk_ends_the_batch_and_leaves_the_rest_on_the_ring() -> None:
    rig = Rig(indirect=True, num=64)
    try:
        for _ in range(8):
            add_packet(rig, 100, b"q" * 60000)
        taps = Taps()
        sink = RecordingSink(CAP_PCAPNG, size=3 * 61000 + CAP_SPARE)  # room for three records, and the spare
        taps.set_sink(sink)
        fast = TxFastPath(rig.q, GUEST, 64, taps, "dev")
        items = fast.batch()
        assert isinstance(items[0], Run) and len(items[0].heads) == 3
        assert rig.q.pending() == 5
        fast.capture.finish()
        assert len(read_back(CAP_PCAPNG, sink.committed)) == 3
    finally:
        rig.close()


def test_capturing_a_batch_is_fast_chains_then_at_most_one_slow_chain() -> None:
    """So the records C writes during the call and those Python writes after it for the slow
    chains come out in ring order."""
    rig = Rig(indirect=True, num=64)
    try:
        add_packet(rig, 100, b"a")
        add_packet(rig, 100, b"b")
        add_packet(rig, 100, b"\0", op=H.Op.SHUTDOWN, length=0)  # slow
        add_packet(rig, 100, b"c")
        add_packet(rig, 100, b"\0", op=H.Op.CREDIT_UPDATE, length=0)  # slow
        add_packet(rig, 100, b"d")
        taps = Taps()
        taps.set_sink(RecordingSink(CAP_PCAPNG))
        fast = TxFastPath(rig.q, GUEST, 64, taps, "dev")
        kinds = []
        while rig.q.pending():
            batch = fast.batch()
            fast.capture.finish()
            kinds.append(["run" if isinstance(i, Run) else "slow" for i in batch])
        assert kinds == [["run", "slow"], ["run", "slow"], ["run"]]
        for _ in range(6):  # without capture, one batch takes everything
            add_packet(rig, 100, b"e", op=H.Op.RW if _ % 2 else H.Op.SHUTDOWN, length=None if _ % 2 else 0)
        taps.set_sink(None)
        assert len(fast.batch()) == 6 and rig.q.pending() == 0
    finally:
        rig.close()


@pytest.mark.parametrize("mode", [CAP_PCAP, CAP_PCAPNG])
def test_rx_fill_writes_one_record_per_packet_into_the_sinks_chunk(mode: int) -> None:
    t = RxRig()
    try:
        sink = RecordingSink(mode)
        t.fast.taps.set_sink(sink)
        data = bytes(range(256)) * 40
        t.host.sendall(data)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert r.packets == 3 and sink.chunk.records == 3 and not sink.lent and sink.dropped == 0
        got = read_back(mode, sink.committed)
        assert [g[0] for g in got] == [fmt.vsockmon_frame(hdr, payload) for _, hdr, payload in t.used()]
        if mode == CAP_PCAPNG:
            assert {g[1] for g in got} == {False}  # to the guest
    finally:
        t.close()


@pytest.mark.parametrize("comment", ["r", "rw", "rew", "rewr", "rewritten to CID 42 by --remap 3=42 (rule: vm-a)"])
def test_c_records_carry_a_connections_comment_byte_for_byte_as_the_python_writer(comment: str) -> None:
    t = RxRig()
    try:
        sink = RecordingSink(CAP_PCAPNG)
        t.fast.taps.set_sink(sink)
        t.host.sendall(b"q" * 5000)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr, comment.encode())
        assert r.packets == 2
        data = sink.committed
        off = 0
        for _, hdr, payload in t.used():  # each record: the Python writer's, at the same timestamp
            size = int.from_bytes(data[off + 4 : off + 8], "little")
            ts_us = int.from_bytes(data[off + 12 : off + 16], "little") << 32 | int.from_bytes(
                data[off + 16 : off + 20], "little")
            want = fmt.pcapng_epb(3, ts_us / 1e6, fmt.vsockmon_frame(hdr, payload), inbound=False, comment=comment)
            assert data[off : off + size] == want
            off += size
        assert off == len(data)
        assert [g.comment for g in reader.records(io.BytesIO(fmt.pcapng_shb() + b"".join(
            fmt.pcapng_idb(f"if{i}") for i in range(4)) + data))] == [comment, comment]
    finally:
        t.close()


def test_a_comment_too_long_for_c_keeps_the_connection_on_the_python_path() -> None:
    taps = Taps()
    assert taps.c_comment("x" * 600) == b""  # nothing captures: no comment to write at all
    taps.set_sink(RecordingSink(CAP_PCAPNG))
    assert taps.c_comment(None) == b"" and taps.c_comment("rewritten") == b"rewritten"
    assert taps.c_comment("x" * 600) is None


def test_with_no_room_in_the_sink_the_c_paths_run_on_and_count_their_packets_dropped() -> None:
    t = RxRig()
    rig = Rig(indirect=True, num=64)
    try:
        sink = RecordingSink(CAP_PCAPNG)
        sink.full = True
        t.fast.taps.set_sink(sink)
        t.host.sendall(b"z" * 5000)
        r = t.fast.fill(t.peer.fileno(), 1 << 20, 16, t.hdr)
        assert r.packets == 2 and sink.dropped == 2 and sink.chunk.used == 0
        for _ in range(3):
            add_packet(rig, 100, b"y" * 100)
        fast = TxFastPath(rig.q, GUEST, 64, t.fast.taps, "dev")
        (run,) = fast.batch()
        assert isinstance(run, Run) and len(run.heads) == 3  # the fast path, records or not
        fast.capture.dropped(3)  # the caller counts what it handled (datapath._process_tx_fast)
        fast.capture.finish()
        assert sink.dropped == 5 and sink.chunk.used == 0
    finally:
        rig.close()
        t.close()


def test_header_only_credit_packets_come_back_as_their_fields_between_runs() -> None:
    rig = Rig(indirect=True, num=64)
    try:
        add_packet(rig, 100, b"a" * 10)
        add_header_only(rig, 100, H.Op.CREDIT_UPDATE, fwd_cnt=4096)
        add_packet(rig, 100, b"b" * 10)
        add_header_only(rig, 300, H.Op.CREDIT_REQUEST, type_=2)
        add_header_only(rig, 100, H.Op.SHUTDOWN)  # other ops: Python
        add_header_only(rig, 100, H.Op.CREDIT_UPDATE, length=5)  # a len with no payload: Python
        add_header_only(rig, 100, H.Op.CREDIT_UPDATE, src_cid=9)  # spoofed: Python
        add_header_only(rig, 100, H.Op.CREDIT_UPDATE, type_=3)  # unknown type: Python (RST)
        items = TxFastPath(rig.q, GUEST, 64).batch()
        kinds = [type(i).__name__ for i in items]
        assert kinds == ["Run", "CreditItem", "Run", "CreditItem", "Slow", "Slow", "Slow", "Slow"]
        upd, req = items[1], items[3]
        assert isinstance(upd, CreditItem) and isinstance(req, CreditItem)
        assert (upd.op, upd.type, upd.src_port, upd.dst_cid, upd.dst_port, upd.buf_alloc, upd.fwd_cnt) == (
            H.Op.CREDIT_UPDATE, 1, 100, 2, 5000, 131072, 4096)
        assert (req.op, req.type, req.src_port) == (H.Op.CREDIT_REQUEST, 2, 300)
        heads = [h for e in from_c(items) for h in e[3]]
        assert from_c(items) == reference(rig, heads)
    finally:
        rig.close()


@pytest.mark.parametrize("mode", [CAP_PCAP, CAP_PCAPNG])
def test_c_capture_record_of_a_credit_packet_is_the_python_writer_frame(mode: int) -> None:
    rig = Rig(indirect=True, num=64)
    try:
        add_header_only(rig, 100, H.Op.CREDIT_UPDATE, fwd_cnt=4096)
        taps = Taps()
        sink = RecordingSink(mode)
        taps.set_sink(sink)
        fast = TxFastPath(rig.q, GUEST, 64, taps, "dev")
        (item,) = fast.batch()
        assert isinstance(item, CreditItem) and item.cap_off == 0
        fast.capture.finish()
        (got,) = read_back(mode, sink.committed)
        assert got[0] == fmt.vsockmon_frame(H.pack(GUEST, 2, 100, 5000, 0, 1, H.Op.CREDIT_UPDATE, 0, 131072, 4096), b"")
    finally:
        rig.close()


def test_rx_put_writes_a_control_packet_into_a_linux_shaped_chain_only() -> None:
    t = RxRig(nbufs=1)
    try:
        rig = t.rig
        a = rig.gmem.alloc(100)
        rig.ring.add_chain([Buf(a, 50, writable=True), Buf(a + 50, 50, writable=True)])  # two descriptors
        upd = H.pack(2, GUEST, 1 << 30, 5000, 0, 1, H.Op.CREDIT_UPDATE, 0, 65536, 4096)
        assert t.fast.put(upd)
        ((length, hdr, _),) = t.used()
        assert (length, hdr) == (H.HDR_SIZE, upd)
        assert not t.fast.put(upd)  # the next chain has two descriptors: nothing written or taken
        chain = rig.q.pop()
        assert chain is not None and chain.write_len == 100
        assert not t.fast.put(upd)  # and none is left
    finally:
        t.close()


@pytest.mark.parametrize("mode", [CAP_PCAP, CAP_PCAPNG])
def test_rx_put_records_carry_the_vsockmon_op_of_each_control_packet(mode: int) -> None:
    t = RxRig(nbufs=4)
    try:
        sink = RecordingSink(mode)
        t.fast.taps.set_sink(sink)
        hdrs = [H.pack(2, GUEST, 1 << 30, 5000, 0, 1, op, flags, 65536, 4096)
                for op, flags in ((H.Op.RESPONSE, 0), (H.Op.CREDIT_REQUEST, 0), (H.Op.SHUTDOWN, 3), (H.Op.RST, 0))]
        for h in hdrs:
            assert t.fast.put(h)
        got = read_back(mode, sink.committed)
        assert [g[0] for g in got] == [fmt.vsockmon_frame(h, b"") for h in hdrs]  # CONNECT, CONTROL, DISCONNECT x2
        assert sink.chunk.records == 4 and not sink.lent
    finally:
        t.close()
