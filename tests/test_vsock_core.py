"""The vsock core with plain bytes and fake peers: no sockets, no rings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from vsproxy.endpoints.base import Buffer, PeerBase
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import CONNECT_TIMEOUT, MAX_CONTROL_BACKLOG, VsockCore
from vsproxy.vsock.credit import Credit
from vsproxy.vsock.header import Header, Op
from vsproxy.vsock.rx import RX_LIMIT, RxFill

GUEST = 5
GPORT = 40000


class FakePeer(PeerBase):
    def __init__(self, accept: int = 1 << 30, data: bytes = b"") -> None:
        self.accept = accept  # bytes send() takes before reporting full
        self.sent = bytearray()
        self.data = bytearray(data)
        self.eof = False
        self.closed: bool | None = None  # the reset flag once closed
        self.shut_wr = False
        self.reading = False
        self.writing = False
        self.established_port: int | None = None

    def send(self, bufs: Sequence[Buffer]) -> int:
        n = 0
        for b in bufs:
            k = min(len(b), self.accept - n)
            self.sent += bytes(b[:k])
            n += k
            if k < len(b):
                break
        self.accept -= n
        return n

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self.data:
            return 0 if self.eof else None
        n = 0
        for b in bufs:
            k = min(len(b), len(self.data))
            b[:k] = self.data[:k]
            del self.data[:k]
            n += k
        return n

    def shutdown_write(self) -> None:
        self.shut_wr = True

    def close(self, reset: bool) -> None:
        self.closed = reset

    def watch_read(self, on: bool) -> None:
        self.reading = on

    def watch_write(self, on: bool) -> None:
        self.writing = on

    def established(self, local_port: int) -> None:
        self.established_port = local_port

    def describe(self) -> str:
        return "fake"


class RxChain(NamedTuple):
    head: int
    writable: list[memoryview]
    write_len: int


class FakeRx:
    def __init__(self, count: int = 64, size: int = 3776) -> None:
        self.bufs = [bytearray(size) for _ in range(count)]
        self.next = 0
        self.used: list[tuple[int, int]] = []

    def pop(self) -> RxChain | None:
        if self.next >= len(self.bufs):
            return None
        i = self.next
        self.next += 1
        return RxChain(i, [memoryview(self.bufs[i])], len(self.bufs[i]))

    def unpop(self) -> None:
        self.next -= 1

    def push(self, head: int, length: int) -> None:
        self.used.append((head, length))

    def packets(self) -> list[tuple[Header, bytes]]:
        out = []
        for head, length in self.used:
            b = self.bufs[head]
            h = H.unpack(b)
            assert length == H.HDR_SIZE + h.len
            out.append((h, bytes(b[H.HDR_SIZE:length])))
        return out


def pkt(op: int, *, src_cid: int = GUEST, dst_port: int = 1234, flags: int = 0, payload: bytes = b"",
        type_: int = H.Type.STREAM, buf_alloc: int = 262144, fwd_cnt: int = 0, length: int | None = None
        ) -> tuple[bytes, list[memoryview], int]:
    n = len(payload) if length is None else length
    hdr = H.pack(src_cid, 2, GPORT, dst_port, n, type_, op, flags, buf_alloc, fwd_cnt)
    return hdr, [memoryview(bytearray(payload))], len(payload)


class Harness:
    def __init__(self, peer: FakePeer | None = None, buf_alloc: int = 65536) -> None:
        self.peer = peer if peer is not None else FakePeer()
        self.refuse = False
        self.core = VsockCore(GUEST, self._connector, buf_alloc=buf_alloc)
        self.rx = FakeRx()

    def _connector(self, conn: Connection) -> FakePeer | None:
        return None if self.refuse else self.peer

    def send(self, op: int, **kw: object) -> None:
        self.core.guest_packet(*pkt(op, **kw))  # type: ignore[arg-type]
        self.core.flush_host()

    def drain(self) -> list[tuple[Header, bytes]]:
        self.rx = FakeRx()
        self.core.fill_rx(self.rx)
        return self.rx.packets()

    def open(self) -> Connection:
        self.send(Op.REQUEST)
        (conn,) = self.core.conns.values()
        self.core.peer_connected(conn)
        ((h, _),) = self.drain()
        assert h.op == Op.RESPONSE
        return conn


def test_request_is_answered_with_response_once_host_side_connects() -> None:
    t = Harness()
    t.send(Op.REQUEST)
    assert t.drain() == []  # nothing before the host side is up
    (conn,) = t.core.conns.values()
    t.core.peer_connected(conn)
    ((h, payload),) = t.drain()
    assert (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (Op.RESPONSE, 2, GUEST, 1234, GPORT)
    assert h.buf_alloc == 65536 and h.fwd_cnt == 0 and payload == b""
    assert t.peer.reading


def test_refused_connect_gets_rst() -> None:
    t = Harness()
    t.refuse = True
    t.send(Op.REQUEST)
    ((h, _),) = t.drain()
    assert (h.op, h.dst_port, h.src_port) == (Op.RST, GPORT, 1234)
    assert not t.core.conns


def test_spoofed_source_cid_is_dropped_and_counted_without_reply() -> None:
    t = Harness()
    t.send(Op.REQUEST, src_cid=7)
    assert t.drain() == [] and t.core.counters.spoofed == 1 and not t.core.conns


def test_unknown_connection_and_unknown_type_get_rst_but_rst_gets_nothing() -> None:
    t = Harness()
    t.send(Op.RW, payload=b"x")
    t.send(Op.REQUEST, type_=7)
    t.send(Op.RST)
    assert [h.op for h, _ in t.drain()] == [Op.RST, Op.RST]


def test_connect_timeout_resets_both_sides() -> None:
    t = Harness()
    t.send(Op.REQUEST)
    t.core.tick(CONNECT_TIMEOUT + 0.1)
    ((h, _),) = t.drain()
    assert h.op == Op.RST and t.peer.closed is True and t.core.counters.timeouts == 1


def test_guest_data_goes_to_peer_and_the_rest_is_copied_out_of_guest_memory() -> None:
    t = Harness(FakePeer(accept=3))
    conn = t.open()
    hdr, segs, n = pkt(Op.RW, payload=b"hello world")
    t.core.guest_packet(hdr, segs, n)
    t.core.flush_host()
    segs[0][:] = b"X" * 11  # the guest reuses its buffer once the chain is returned
    assert bytes(t.peer.sent) == b"hel" and t.peer.writing
    assert all(isinstance(b, bytes) for b in conn.outq)
    t.peer.accept = 100
    t.core.peer_writable(conn)
    assert bytes(t.peer.sent) == b"hello world" and not t.peer.writing
    assert conn.credit.fwd_cnt == 11


def test_credit_update_is_sent_as_forwarded_data_frees_the_guest_window() -> None:
    t = Harness(buf_alloc=4096)
    t.open()
    for _ in range(3):
        t.send(Op.RW, payload=b"a" * 1000)
    updates = [h for h, _ in t.drain() if h.op == Op.CREDIT_UPDATE]
    assert len(updates) == 1 and updates[0].fwd_cnt == 3000  # guest saw its window below half
    assert bytes(t.peer.sent) == b"a" * 3000


def test_guest_exceeding_advertised_credit_gets_rst_not_buffering() -> None:
    t = Harness(FakePeer(accept=0), buf_alloc=4096)
    conn = t.open()
    t.send(Op.RW, payload=b"a" * 4096)
    assert conn.out_bytes == 4096
    t.send(Op.RW, payload=b"b")
    assert [h.op for h, _ in t.drain()] == [Op.RST]
    assert t.peer.closed is True and t.core.counters.credit_violations == 1


def test_header_len_beyond_chain_is_dropped_and_resets_the_connection() -> None:
    t = Harness()
    t.open()
    t.core.guest_packet(*pkt(Op.RW, payload=b"abc", length=100))
    assert [h.op for h, _ in t.drain()] == [Op.RST]
    assert t.core.counters.bad_packets == 1 and t.peer.sent == b""


def test_host_data_is_split_to_rx_buffers_and_limited_by_guest_credit() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    t = Harness(FakePeer(data=data))
    conn = t.open()
    conn.credit.update_peer(5000, 0)  # the guest's window, as its REQUEST would have said
    t.core.peer_readable(conn)
    pkts = t.drain()
    rw = [(h, p) for h, p in pkts if h.op == Op.RW]
    assert [len(p) for _, p in rw] == [3732, 1268]  # 3776-byte buffers, then credit ran out
    assert b"".join(p for _, p in rw) == data[:5000]
    assert [h.op for h, _ in pkts][-1] == Op.CREDIT_REQUEST  # a guest not yet seen to update unasked
    # the guest consumes and says so: data flows again
    t.send(Op.CREDIT_UPDATE, buf_alloc=5000, fwd_cnt=5000)
    rest = [p for h, p in t.drain() if h.op == Op.RW]
    assert b"".join(rest) == data[5000:10000]


def test_host_eof_becomes_shutdown_send_and_guest_shut_wr_half_closes_host() -> None:
    t = Harness(FakePeer(data=b"bye"))
    conn = t.open()
    t.peer.eof = True
    t.core.peer_readable(conn)
    pkts = t.drain()
    t.core.peer_readable(conn)  # a socket at EOF reports readable again
    pkts += t.drain()
    assert [(h.op, h.flags) for h, _ in pkts] == [(Op.RW, 0), (Op.SHUTDOWN, H.SHUTDOWN_SEND)]
    t.send(Op.RW, payload=b"answer")
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
    assert t.peer.sent == b"answer" and t.peer.shut_wr and t.peer.closed is False


def test_guest_close_gets_rst_and_host_sees_clean_close_after_pending_data() -> None:
    t = Harness(FakePeer(accept=2))
    conn = t.open()
    t.send(Op.RW, payload=b"tail")
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    assert [h.op for h, _ in t.drain()] == [Op.RST]
    assert not t.core.conns and t.peer.closed is None  # still flushing
    t.peer.accept = 10
    t.core.peer_writable(conn)
    assert t.peer.sent == b"tail" and t.peer.closed is False


def test_credit_request_is_answered_with_credit_update() -> None:
    t = Harness()
    t.open()
    t.send(Op.CREDIT_REQUEST)
    ((h, _),) = t.drain()
    assert h.op == Op.CREDIT_UPDATE and h.buf_alloc == 65536


def test_host_initiated_connection_waits_for_response_then_announces_port() -> None:
    t = Harness()
    peer = FakePeer()
    conn = t.core.host_connect(peer, 5000)
    assert conn is not None
    ((h, _),) = t.drain()
    assert (h.op, h.dst_port, h.src_cid) == (Op.REQUEST, 5000, 2) and h.src_port >= 1 << 30
    t.core.guest_packet(H.pack(GUEST, 2, 5000, h.src_port, 0, 1, Op.RESPONSE, 0, 4096, 0), [], 0)
    assert peer.established_port == h.src_port and peer.reading


def test_host_initiated_connection_refused_by_guest_closes_host_side() -> None:
    t = Harness()
    peer = FakePeer()
    conn = t.core.host_connect(peer, 5000)
    assert conn is not None
    t.drain()
    t.core.guest_packet(H.pack(GUEST, 2, 5000, conn.peer_port, 0, 1, Op.RST, 0, 0, 0), [], 0)
    assert peer.closed is not None and not t.core.conns


def test_control_backlog_blocks_tx_when_guest_posts_no_rx_buffers() -> None:
    t = Harness()
    for i in range(MAX_CONTROL_BACKLOG):
        t.core.guest_packet(*pkt(Op.RW, dst_port=i, payload=b"x"))
    assert t.core.tx_blocked()
    t.drain()
    assert not t.core.tx_blocked()


def test_close_all_resets_every_host_peer() -> None:
    t = Harness()
    t.open()
    t.core.close_all()
    assert t.peer.closed is True and not t.core.conns


@given(
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**20)
)
def test_peer_free_never_exceeds_buf_alloc_whatever_the_guest_claims(
    buf_alloc: int, fwd_cnt: int, tx_cnt: int, sent: int
) -> None:
    c = Credit(65536)
    c.tx_cnt = tx_cnt
    c.update_peer(buf_alloc, fwd_cnt)
    free = c.peer_free()
    assert 0 <= free <= buf_alloc
    if free:
        c.sent(min(sent, free))
        assert c.peer_free() == free - min(sent, free)


@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 70000), max_size=30))
def test_receive_accounting_wraps_and_never_admits_more_than_buf_alloc(start: int, sizes: list[int]) -> None:
    c = Credit(65536)
    c.rx_cnt = c.fwd_cnt = c.adv_fwd_cnt = start
    held = 0
    for n in sizes:
        if c.receive(n):
            held += n
        assert held <= 65536
        c.forwarded(held // 2)
        held -= held // 2


def test_front_end_loss_keeps_flushing_what_a_closed_connection_sent() -> None:
    t = Harness(FakePeer(accept=2))
    conn = t.open()
    t.send(Op.RW, payload=b"tail")
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    t.core.close_all()  # QEMU exits right after the guest's close()
    assert t.peer.closed is None
    t.peer.accept = 10
    t.core.peer_writable(conn)
    assert t.peer.sent == b"tail" and t.peer.closed is False


def test_linger_deadline_resets_a_host_that_never_reads() -> None:
    t = Harness(FakePeer(accept=0))
    t.open()
    t.send(Op.RW, payload=b"tail")
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    t.core.tick(10.0)
    assert t.peer.closed is True and t.core.lingering() == 0


def test_credit_update_threshold_follows_the_smaller_window() -> None:
    """A Linux sender caps its credit at its own buf_alloc (CVE-2026-23086): with our 1 MiB
    window and its 256 KiB one, waiting for a quarter of ours would stall it for good."""
    c = Credit(1 << 20)
    c.update_peer(256 * 1024, 0)
    assert c.receive(256 * 1024)
    c.forwarded(256 * 1024)
    assert c.update_due()
    c.adv_fwd_cnt = c.fwd_cnt
    assert not c.update_due()


@given(
    st.integers(0, 2**64 - 1).filter(lambda c: c != GUEST),
    st.sampled_from(list(Op)),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
)
def test_spoofed_packets_never_pass_whatever_they_carry(src_cid: int, op: int, port: int, payload: bytes) -> None:
    t = Harness()
    conn = t.open()
    t.peer.sent.clear()
    hdr = H.pack(src_cid, 2, GPORT, port, len(payload), H.Type.STREAM, op, 0, 65536, 0)
    t.core.guest_packet(hdr, [memoryview(bytearray(payload))], len(payload))
    t.core.flush_host()
    assert t.peer.sent == b"" and t.drain() == []  # nothing forwarded, nothing answered
    assert t.core.counters.spoofed == 1 and t.core.conns == {conn.key: conn}


def test_credit_for_a_batch_reaches_the_guest_before_the_peer_takes_the_bytes() -> None:
    """Bytes of a pass are counted forwarded as they arrive (Credit.forward_ahead): the update
    can go to the guest before our copy to the peer, and the copy does not count them twice."""
    t = Harness(buf_alloc=4096)
    conn = t.open()
    t.core.guest_packet(*pkt(Op.RW, payload=b"a" * 3000))
    assert t.peer.sent == b""
    (update,) = [h for h, _ in t.drain() if h.op == Op.CREDIT_UPDATE]
    assert update.fwd_cnt == 3000 and t.peer.sent == b""
    t.core.flush_host()
    assert bytes(t.peer.sent) == b"a" * 3000
    assert conn.credit.fwd_cnt == 3000 and conn.credit.ahead == 0


def test_bytes_the_peer_refuses_stop_counting_ahead_so_the_queue_stays_within_two_windows() -> None:
    t = Harness(FakePeer(accept=0), buf_alloc=4096)
    conn = t.open()
    t.send(Op.RW, payload=b"a" * 4096)  # counted ahead, then refused by the peer: queued
    (update,) = [h for h, _ in t.drain() if h.op == Op.CREDIT_UPDATE]
    assert update.fwd_cnt == 4096 and conn.out_bytes == 4096
    t.send(Op.RW, payload=b"b" * 4096, fwd_cnt=0)  # within the window the guest was given
    assert conn.out_bytes == 8192 and conn.credit.fwd_cnt == 4096  # not counted ahead again
    assert [h.op for h, _ in t.drain()] == []
    t.send(Op.RW, payload=b"c")
    assert [h.op for h, _ in t.drain()] == [Op.RST]
    assert t.core.counters.credit_violations == 1


def test_counting_ahead_never_counts_a_byte_twice() -> None:
    c = Credit(1 << 20)
    assert c.receive(5000)
    c.forward_ahead(3000)
    c.forwarded(1000)  # part of what was counted ahead
    assert (c.fwd_cnt, c.ahead) == (3000, 2000)
    c.forwarded(4000)  # the rest of it, then 2000 new
    assert (c.fwd_cnt, c.ahead) == (5000, 0)


class FastPeer(FakePeer):
    def fast_fd(self) -> int:
        return 99


def test_host_data_is_published_to_the_guest_burst_by_burst() -> None:
    """A fill of a large window hands the guest each burst (at most 256 KiB) as it is read, so
    the guest consumes while the rest is filled; each burst is within the guest's credit."""
    from vsproxy import fastpath
    from vsproxy.vsock.core import RX_FAST_BURST_BYTES

    t = Harness(FastPeer())
    conn = t.open()
    conn.credit.update_peer(1 << 20, 0)  # the guest's window: 1 MiB
    calls: list[tuple[int, int]] = []
    events: list[str] = []

    def rx_fast(fd: int, credit: int, max_packets: int, hdr: bytes, comment: bytes = b"",
                msg_limit: int = -1) -> fastpath.RxFill:
        assert fd == 99 and msg_limit == -1 and H.unpack(hdr).fwd_cnt == conn.credit.fwd_cnt
        calls.append((credit, max_packets))
        events.append("fill")
        n = min(credit, 4 * 65536)
        return RxFill(n // 65536, n, RX_LIMIT, 0)

    t.core.rx_fill_c = rx_fast
    t.core.rx_progress = lambda: events.append("publish")
    t.core.peer_readable(conn)
    t.core.fill_rx(t.rx)
    assert all(c <= RX_FAST_BURST_BYTES for c, _ in calls)
    assert sum(c for c, _ in calls) == 1 << 20  # the whole window, no more
    assert events == ["fill", "publish"] * 4
    assert conn.credit.peer_free() == 0 and conn.flags & Connection.WAIT_CREDIT


def test_credit_packets_from_the_c_path_have_the_effect_of_the_python_path() -> None:
    """guest_credit (fields the C batch read) against guest_packet (the reference), op by op."""
    for op in (Op.CREDIT_UPDATE, Op.CREDIT_REQUEST):
        ref, fast = Harness(FakePeer(data=b"x" * 5000)), Harness(FakePeer(data=b"x" * 5000))
        conns = [ref.open(), fast.open()]
        for t, conn in zip((ref, fast), conns, strict=True):
            conn.credit.update_peer(0, 0)  # the guest had no room: the host side waits for credit
            t.core.peer_readable(conn)
            t.drain()
        ref.core.guest_packet(*pkt(op, buf_alloc=8192, fwd_cnt=0))
        assert fast.core.guest_credit(H.Type.STREAM, op, GPORT, 2, 1234, 8192, 0)
        for conn in conns:
            assert (conn.credit.peer_buf_alloc, conn.credit.peer_fwd_cnt) == (8192, 0)
        assert ref.core.counters.tx_packets == fast.core.counters.tx_packets
        got_ref, got_fast = ref.drain(), fast.drain()
        assert [(h.op, h.len) for h, _ in got_ref] == [(h.op, h.len) for h, _ in got_fast]
        assert sum(h.len for h, _ in got_fast) == 5000  # the credit let the host data through
        if op == Op.CREDIT_REQUEST:
            assert Op.CREDIT_UPDATE in [h.op for h, _ in got_fast]


def test_credit_packets_the_c_path_cannot_place_go_back_to_the_python_path() -> None:
    t = Harness()
    t.open()
    assert not t.core.guest_credit(H.Type.STREAM, Op.CREDIT_UPDATE, GPORT + 1, 2, 1234, 8192, 0)  # no such conn
    assert not t.core.guest_credit(H.Type.SEQPACKET, Op.CREDIT_UPDATE, GPORT, 2, 1234, 8192, 0)  # not served
    assert t.core.counters.tx_packets == 1  # only the REQUEST that opened the connection


def test_control_packets_go_through_the_c_writer_and_advertise_fwd_cnt_only_once_written() -> None:
    t = Harness(buf_alloc=4096)
    conn = t.open()
    written: list[bytes] = []
    full = [True]

    def rx_put(data: bytes) -> bool:
        if full[0]:
            return False  # not the Linux shape, or no chain: the Python path takes over
        written.append(data)
        return True

    t.core.rx_put = rx_put
    t.core.rx_fill_c = lambda *a: None  # type: ignore[assignment]  # the C paths are there
    t.send(Op.RW, payload=b"a" * 3000)
    assert conn.credit.fwd_cnt == 3000
    full[0] = False
    t.rx = FakeRx()
    assert t.core.fill_rx(t.rx) == 1 and t.rx.used == []  # nothing through the Python path
    (h,) = [H.unpack(d) for d in written]
    assert (h.op, h.fwd_cnt) == (Op.CREDIT_UPDATE, 3000) and conn.credit.adv_fwd_cnt == 3000
    t.send(Op.RW, payload=b"b" * 2000)  # over a quarter of the window: an update is due again
    full[0] = True
    ((h2, _),) = t.drain()  # the C writer declines: the Python path writes it
    assert (h2.op, h2.fwd_cnt) == (Op.CREDIT_UPDATE, 5000) and conn.credit.adv_fwd_cnt == 5000


def test_a_guest_that_updates_credit_unasked_is_asked_only_when_its_window_stays_shut() -> None:
    """Linux sends CREDIT_UPDATE by itself when its free space falls below 64 KiB: asking it at
    every exhausted window would double the control traffic. Once it has updated unasked, the
    request waits for the tick, in case the window stays shut."""
    from vsproxy.vsock.core import CREDIT_REQUEST_DELAY

    data = b"q" * 20000
    t = Harness(FakePeer(data=data))
    conn = t.open()
    t.send(Op.CREDIT_UPDATE, buf_alloc=5000)  # unasked: the guest tells by itself
    assert conn.flags & Connection.SELF_UPDATES
    t.core.peer_readable(conn)
    assert Op.CREDIT_REQUEST not in [h.op for h, _ in t.drain()]
    t.core.tick(t.core.now + CREDIT_REQUEST_DELAY / 2)
    assert t.drain() == []
    t.core.tick(t.core.now + CREDIT_REQUEST_DELAY)
    assert [h.op for h, _ in t.drain()] == [Op.CREDIT_REQUEST]  # shut too long: ask after all
    t.core.tick(t.core.now + 10)
    assert t.drain() == []  # once per shut window
    t.send(Op.CREDIT_UPDATE, buf_alloc=5000, fwd_cnt=5000)
    assert sum(h.len for h, _ in t.drain() if h.op == Op.RW) == 5000
