"""SEQPACKET runs the C batch read (VsockCore.guest_seq_run, guest_rw_tail) against the Python
reference (guest_packet, packet by packet), with no C involved: the same messages reach the
peer with the same boundaries and marks, the same counters and credit, the same packets to the
guest; a run the reference would not take whole is refused untouched, so the caller feeds it to
the reference chain by chain."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from test_vsock_core import GPORT, GUEST, FakePeer, Harness, pkt

from vsproxy.verdict import Mark
from vsproxy.vsock import header as H
from vsproxy.vsock import lending
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import VsockCore
from vsproxy.vsock.header import Op

SEQ = H.Type.SEQPACKET
EOM, EOR = H.SEQ_EOM, H.SEQ_EOR


class SeqPeer(FakePeer):
    """A SOCK_SEQPACKET host peer: whole messages, ``room`` of them before it is full."""

    def __init__(self, room: int = 1 << 30) -> None:
        super().__init__()
        self.room = room
        self.messages: list[bytes] = []

    def fast_fd(self) -> int:
        return 7  # a descriptor C could use: the connection may be lent

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        return None  # the host has sent nothing

    def send_message(self, data: bytes, eor: bool) -> bool:
        if self.room == 0:
            return False
        self.room -= 1
        self.messages.append(data)
        return True


def seq_harness(peer: SeqPeer | None = None) -> tuple[Harness, Connection]:
    t = Harness(peer if peer is not None else SeqPeer())
    t.core.seqpacket = True
    t.send(Op.REQUEST, type_=SEQ)
    (conn,) = t.core.conns.values()
    t.core.peer_connected(conn)
    ((h, _),) = t.drain()
    assert h.op == Op.RESPONSE
    return t, conn


def run(core: VsockCore, packets: Sequence[tuple[bytes, int]], *, buf_alloc: int = 262144, fwd_cnt: int = 0,
        captured: bool = False, port: int = GPORT) -> bool:
    return core.guest_seq_run(port, 2, 1234, buf_alloc, fwd_cnt, [memoryview(p) for p, _ in packets],
                              [f for _, f in packets], captured)


def state(t: Harness, conn: Connection) -> tuple[object, ...]:
    c, cr = t.core.counters, conn.credit
    assert isinstance(t.peer, SeqPeer)
    return (t.peer.messages, c.tx_packets, c.tx_bytes, list(conn.stats), cr.rx_cnt, cr.fwd_cnt, cr.adv_fwd_cnt,
            cr.peer_buf_alloc, cr.peer_fwd_cnt, conn.out_bytes, bytes(conn.msg_buf), list(conn.msg_flags),
            [(h.op, h.len, h.flags, h.fwd_cnt) for h, _ in t.drain()])


# packets: (payload, flags); the flags a guest may write, every bit of them included
PACKETS = st.lists(st.tuples(st.binary(min_size=1, max_size=3000),
                             st.sampled_from([EOM, EOM, EOM | EOR, 0, 0xFFFF_FFFF, EOR])), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(packets=PACKETS, room=st.integers(0, 12))
def test_a_seqpacket_run_has_the_effect_of_its_packets_one_by_one(packets: list[tuple[bytes, int]],
                                                                   room: int) -> None:
    (ref, rc), (fast, fc) = seq_harness(SeqPeer(room)), seq_harness(SeqPeer(room))
    for payload, flags in packets:
        ref.core.guest_packet(*pkt(Op.RW, type_=SEQ, flags=flags, payload=payload, buf_alloc=262144, fwd_cnt=0))
    ref.core.flush_host()
    assert run(fast.core, packets)
    fast.core.flush_host()
    assert state(fast, fc) == state(ref, rc)


def test_a_message_in_parts_is_assembled_across_runs_and_with_the_walker() -> None:
    t, _ = seq_harness()
    assert run(t.core, [(b"one ", 0), (b"two ", 0)])
    t.core.guest_packet(*pkt(Op.RW, type_=SEQ, payload=b"three "))  # the walker's packet between runs
    assert run(t.core, [(b"end", EOM | EOR), (b"next", EOM)])
    t.core.flush_host()
    assert isinstance(t.peer, SeqPeer) and t.peer.messages == [b"one two three end", b"next"]
    assert t.core.counters.tx_packets == 1 + 5  # the REQUEST and five RW packets


def test_a_run_past_the_credit_we_gave_is_refused_untouched_for_the_walker_to_reset() -> None:
    t, conn = seq_harness()
    before = state(t, conn)
    assert not run(t.core, [(b"a" * 40000, EOM), (b"b" * 40000, EOM)])  # 80000 > the 64 KiB we gave
    assert state(t, conn) == before and conn.state.name == "ESTABLISHED"


def test_runs_the_reference_must_take_are_refused() -> None:
    t, conn = seq_harness()
    assert not run(t.core, [(b"x", EOM)], port=GPORT + 1)  # no such connection
    conn.mark = Mark.spoofed(9, GUEST)
    assert not run(t.core, [(b"x", EOM)], captured=True)  # its records need a comment C cannot write
    conn.mark = None
    t.core.guest_packet(*pkt(Op.SHUTDOWN, type_=SEQ, flags=H.SHUTDOWN_SEND))
    assert not run(t.core, [(b"x", EOM)])  # the guest said it sends no more: the walker resets
    t.core.seqpacket = False
    assert not run(t.core, [(b"x", EOM)])  # a device that did not negotiate SEQPACKET
    assert isinstance(t.peer, SeqPeer) and t.peer.messages == []


def test_a_tail_of_whole_messages_goes_out_with_its_marks_and_counts_forwarded_once_sent() -> None:
    t, conn = seq_harness(SeqPeer(room=1))
    conn.credit.rx_cnt = 9  # C received and counted them: 9 bytes, none forwarded yet
    t.core.guest_rw_tail(GPORT, 2, 1234, 9, [memoryview(b"abc"), memoryview(b"defghi")], SEQ, [EOM, EOM | EOR | 4])
    assert list(conn.msg_flags) == [EOM, EOM | EOR]
    t.core.flush_host()
    assert isinstance(t.peer, SeqPeer) and t.peer.messages == [b"abc"] and conn.credit.fwd_cnt == 3
    assert t.peer.writing  # the rest waits for the peer to take it
    t.peer.room = 5
    t.core.peer_writable(conn)
    assert t.peer.messages == [b"abc", b"defghi"] and conn.credit.fwd_cnt == 9 and conn.out_bytes == 0


def test_a_tail_for_a_connection_reset_meanwhile_goes_with_it() -> None:
    t, conn = seq_harness()
    t.core.guest_packet(*pkt(Op.RST, type_=SEQ))
    t.core.guest_rw_tail(GPORT, 2, 1234, 3, [memoryview(b"abc")], SEQ, [EOM])
    assert isinstance(t.peer, SeqPeer) and t.peer.messages == [] and not conn.outq


class Pump:
    """The C pump as the core sees it (lending.Owner), lending and giving back with nothing done
    meanwhile: what the core lent is what it takes back."""

    def __init__(self) -> None:
        self.lent: dict[int, tuple[int, int, int, int, tuple[int, int, int, int] | None]] = {}
        self.slots = 0

    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None,
            comment: bytes = b"") -> int:
        slot = self.slots
        self.slots += 1
        self.lent[slot] = (tx_cnt, peer_buf_alloc, peer_fwd_cnt, flags | (lending.OWN_F_TX if tx else 0), tx)
        return slot

    def take_back(self, slot: int) -> lending.OwnedBack:
        tx_cnt, peer_buf_alloc, peer_fwd_cnt, flags, tx = self.lent.pop(slot)
        _, rx_cnt, fwd_cnt, adv_fwd_cnt = tx if tx is not None else (0, 0, 0, 0)
        return lending.OwnedBack(lending.OWN_TAKEN, 0, tx_cnt, peer_buf_alloc, peer_fwd_cnt, flags,
                                 lending.OwnedCounts(), rx_cnt, fwd_cnt, adv_fwd_cnt, 0)

    def fill(self, slot: int) -> lending.OwnedBack | bool:
        return self.take_back(slot)

    def progress(self, slot: int) -> int:
        return 0

    def shut(self, slot: int) -> bool:
        return False

    def counts(self, slot: int) -> lending.OwnedCounts:
        return lending.OwnedCounts()

    def peek(self, slot: int) -> lending.OwnedBack:
        raise AssertionError("not snapshotted here")


def test_a_run_for_a_connection_c_runs_takes_it_back_first() -> None:
    (ref, rc), (fast, fc) = seq_harness(), seq_harness()
    pump = Pump()
    for t, conn in ((ref, rc), (fast, fc)):  # both lent: the reference's packet takes it back too
        t.core.owner = pump
        t.core._lend(conn)
        assert conn.own >= 0
    ref.core.guest_packet(*pkt(Op.RW, type_=SEQ, flags=EOM, payload=b"lent", buf_alloc=262144, fwd_cnt=0))
    ref.core.flush_host()
    assert run(fast.core, [(b"lent", EOM)])
    fast.core.flush_host()
    assert fc.own == rc.own == -1 and not pump.lent
    assert state(fast, fc) == state(ref, rc)


def test_a_tuple_whose_old_connection_the_far_side_closed_is_left_to_the_walker() -> None:
    t, conn = seq_harness()
    t.core._shut_keys[conn.key] = None
    assert not run(t.core, [(b"x", EOM)])
    assert isinstance(t.peer, SeqPeer) and t.peer.messages == []
