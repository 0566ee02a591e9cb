"""SEQPACKET on the C paths (issue 19 item 5).

Guest to host: C sends a lent SEQPACKET connection's one-packet messages (EOM on the packet)
to its SOCK_SEQPACKET host socket, one message each, with the credit and the update they make
due as Python counts them (forwarded once the socket took them); a packet of a longer message,
a run past the credit, a full or failed socket go back to Python as the Python path would take
them. Host to guest: vq_rx_fill_seq reads whole host messages into rx chains, EOM on the last
packet of each, and leaves on the socket what Python must deal with. Then the whole thing
through a real vsproxy, with and without C (``VSPROXY_NO_C=1``): the same messages, boundaries
and marks both ways, the same capture records, and C's counters rising only with C."""

from __future__ import annotations

import errno
import os
import re
import socket
import threading
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from helpers import VsproxyProcess
from ringkit import BUF_ALLOC, GUEST, HOST_PORT, PORT, Rings
from test_fastpath import RxRig

from vsproxy.capture import reader
from vsproxy.fastpath import SEQPACKET, Run, Tail
from vsproxy.simguest import SEQPACKET as SIM_SEQPACKET
from vsproxy.simguest import SimGuest
from vsproxy.simguest.ring import Buf
from vsproxy.vsock import header as H
from vsproxy.vsock import lending
from vsproxy.vsock import rx as R

pytestmark = pytest.mark.c_paths

EOM, EOR = H.SEQ_EOM, H.SEQ_EOR
SEQ_KEY = (SEQPACKET, PORT, 2, HOST_PORT)


class SeqRings(Rings):
    """ringkit's rings with a SOCK_SEQPACKET socketpair as the lent connection's host socket."""

    def __init__(self, rx_bufs: int = 8) -> None:
        super().__init__(rx_bufs=rx_bufs)
        self.host.close()
        self.peer.close()
        self.host, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.host.setblocking(False)
        self.peer.setblocking(False)

    def lend_seq(self, *, rx_cnt: int = 0, fwd_cnt: int = 0, adv_fwd_cnt: int = 0,
                 flags: int = lending.OWN_F_WAIT) -> None:
        hdr = H.pack(2, GUEST, HOST_PORT, PORT, 0, SEQPACKET, H.Op.RW, 0, BUF_ALLOC, fwd_cnt)
        self.slot = self.tx.own("conn", SEQ_KEY, self.host.fileno(), 0, BUF_ALLOC, 0, hdr, flags,
                                (BUF_ALLOC, rx_cnt, fwd_cnt, adv_fwd_cnt))
        assert self.slot >= 0

    def send_seq(self, payload: bytes, flags: int = EOM) -> None:
        hdr = H.pack(GUEST, 2, PORT, HOST_PORT, len(payload), SEQPACKET, H.Op.RW, flags, BUF_ALLOC, 0)
        self.tx_ring.add_chain([Buf(self._buf(hdr), H.HDR_SIZE), Buf(self._buf(payload), len(payload))])

    def messages(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 20))
            except BlockingIOError:
                return out


@pytest.fixture
def rings() -> Iterator[SeqRings]:
    r = SeqRings()
    yield r
    r.close()


def test_one_packet_messages_of_a_lent_connection_go_out_whole_one_message_each(rings: SeqRings) -> None:
    rings.lend_seq()
    # small ones (copied into scratch) and larger ones (sent from guest memory), EOR or not
    msgs = [(b"a", EOM), (b"b" * 100, EOM | EOR), (b"c" * 1024, EOM), (b"d" * 1025, EOM | EOR), (b"e" * 20000, EOM)]
    for m, f in msgs:
        rings.send_seq(m, f)
    assert rings.tx.batch() == [] and len(rings.tx.consumed) == 5 and rings.tx.released == []
    assert rings.messages() == [m for m, _ in msgs]  # each its own message, none merged
    total = sum(len(m) for m, _ in msgs)
    back = rings.tx.take_back(rings.slot)
    assert (back.rx_cnt, back.fwd_cnt, back.ahead, back.counts.tx_packets, back.counts.tx_bytes) == (
        total, total, 0, 5, total)


def test_the_update_the_messages_make_due_reaches_the_guest_with_what_the_socket_took(rings: SeqRings) -> None:
    rings.lend_seq(rx_cnt=100, fwd_cnt=100, adv_fwd_cnt=100)
    rings.send_seq(b"m" * 20000)  # past a quarter of the 64 KiB window
    rings.tx.batch()
    ((hdr, payload),) = rings.to_guest()
    assert (hdr.op, hdr.type, hdr.src_port, hdr.dst_port, hdr.len, hdr.fwd_cnt, payload) == (
        H.Op.CREDIT_UPDATE, SEQPACKET, HOST_PORT, PORT, 0, 20100, b"")


def test_a_packet_of_a_longer_message_gives_the_connection_back_and_stays_python_s(rings: SeqRings) -> None:
    rings.lend_seq()
    rings.send_seq(b"whole", EOM)
    rings.send_seq(b"first part, ", 0)  # no EOM: Python assembles the message
    rings.send_seq(b"last part", EOM | EOR)
    items = rings.tx.batch()
    assert rings.messages() == []  # nothing sent by C
    ((_, back),) = rings.tx.released
    assert back.why == lending.OWN_GUEST and back.counts.tx_packets == 0
    runs = [i for i in items if isinstance(i, Run)]
    assert [(r.type, [bytes(s) for s in r.segments], r.flags) for r in runs] == [
        (SEQPACKET, [b"whole"], (EOM,)), (SEQPACKET, [b"first part, ", b"last part"], (0, EOM | EOR))]


def test_messages_past_the_credit_we_gave_go_to_python_untouched(rings: SeqRings) -> None:
    rings.lend_seq(rx_cnt=60000, fwd_cnt=60000, adv_fwd_cnt=0)
    rings.send_seq(b"x" * 8000)
    (run,) = rings.tx.batch()
    assert isinstance(run, Run) and run.type == SEQPACKET and run.total == 8000 and rings.messages() == []
    ((_, back),) = rings.tx.released
    assert back.why == lending.OWN_GUEST and back.rx_cnt == 60000 and back.counts.tx_bytes == 0


def test_a_full_socket_gives_back_the_messages_it_did_not_take_whole(rings: SeqRings) -> None:
    rings.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rings.lend_seq()
    msgs = [bytes([65 + i]) * 3000 for i in range(6)]
    for i, m in enumerate(msgs):
        rings.send_seq(m, EOM | (EOR if i % 2 else 0))
    (tail,) = rings.tx.batch()
    got = rings.messages()
    assert isinstance(tail, Tail) and tail.type == SEQPACKET
    assert 0 < len(got) < len(msgs) and got == msgs[: len(got)]
    assert [bytes(s) for s in tail.segments] == msgs[len(got):]
    assert tail.flags == tuple(EOM | (EOR if i % 2 else 0) for i in range(len(got), len(msgs)))
    assert tail.total == 3000 * (len(msgs) - len(got)) and len(tail.heads) == 6
    ((_, back),) = rings.tx.released
    # received and counted, forwarded only as far as the socket took them: no bytes counted ahead
    assert back.why == lending.OWN_BLOCKED and back.ahead == 0
    assert (back.rx_cnt, back.fwd_cnt) == (18000, 3000 * len(got))


def test_a_socket_error_drops_the_messages_with_the_connection(rings: SeqRings) -> None:
    rings.lend_seq()
    rings.peer.close()
    rings.send_seq(b"x" * 100)
    assert rings.tx.batch() == [] and len(rings.tx.consumed) == 1
    ((_, back),) = rings.tx.released
    assert back.why == lending.OWN_ERROR and back.err != 0


def test_messages_that_open_the_guest_s_window_bring_the_host_s_messages_whole(rings: SeqRings) -> None:
    rings.lend_seq(flags=0)  # not waiting for the socket: C reads it once the guest's data went
    rings.peer.send(b"answer")
    rings.peer.send(b"y" * 5000)  # two 4096-byte rx buffers
    rings.send_seq(b"question")
    assert rings.tx.batch() == [] and rings.messages() == [b"question"]
    got = [(h.op, h.type, h.len, h.flags, p) for h, p in rings.to_guest()]
    room = rings.rx_size - H.HDR_SIZE
    assert got == [(H.Op.RW, SEQPACKET, 6, EOM, b"answer"), (H.Op.RW, SEQPACKET, room, 0, b"y" * room),
                   (H.Op.RW, SEQPACKET, 5000 - room, EOM, b"y" * (5000 - room))]
    back = rings.tx.take_back(rings.slot)
    assert (back.tx_cnt, back.counts.packets, back.counts.bytes) == (5006, 3, 5006)


def test_an_update_due_with_no_rx_buffer_for_it_gives_the_connection_back_after_the_send() -> None:
    r = SeqRings(rx_bufs=0)
    try:
        r.lend_seq(rx_cnt=100, fwd_cnt=100, adv_fwd_cnt=100)
        r.send_seq(b"m" * 20000)
        assert r.tx.batch() == [] and r.messages() == [b"m" * 20000]
        ((_, back),) = r.tx.released
        assert back.why == lending.OWN_SLOW and (back.fwd_cnt, back.adv_fwd_cnt) == (20100, 100)  # Python's to send
    finally:
        r.close()


# -- host to guest: vq_rx_fill_seq ------------------------------------------------------------

class SeqRx(RxRig):
    """test_fastpath's rx rig (3776-byte Linux buffers) with a SOCK_SEQPACKET host socket."""

    def __init__(self, nbufs: int = 8) -> None:
        super().__init__(nbufs)
        self.host.close()
        self.peer.close()
        self.host, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.setblocking(False)
        self.hdr = H.pack(2, GUEST, 1 << 30, 5000, 0, SEQPACKET, H.Op.RW, 0, 65536, 123)

    def fill(self, credit: int = 1 << 20, limit: int = 65536, max_packets: int = 16) -> R.RxFill:
        return self.fast.fill(self.peer.fileno(), credit, max_packets, self.hdr, msg_limit=limit)


@pytest.fixture
def seqrx() -> Iterator[SeqRx]:
    t = SeqRx()
    yield t
    t.close()


def test_host_messages_become_packets_with_eom_on_the_last_of_each(seqrx: SeqRx) -> None:
    room = 3776 - H.HDR_SIZE
    msgs = [b"a", os.urandom(9000), os.urandom(room)]
    for m in msgs:
        seqrx.host.send(m)
    r = seqrx.fill()
    assert (r.packets, r.bytes, r.status) == (5, 9001 + room, R.RX_AGAIN)
    got = seqrx.used()
    assert [(h[24:28], h[32:36]) for _, h, _ in got] == [
        (n.to_bytes(4, "little"), f.to_bytes(4, "little"))
        for n, f in ((1, EOM), (room, 0), (room, 0), (9000 - 2 * room, EOM), (room, EOM))]
    assert all(h[:24] + h[28:32] + h[36:] == seqrx.hdr[:24] + seqrx.hdr[28:32] + seqrx.hdr[36:] for _, h, _ in got)
    assert [p for _, _, p in got] == [msgs[0], msgs[1][:room], msgs[1][room : 2 * room], msgs[1][2 * room :], msgs[2]]


@pytest.mark.parametrize(("size", "why"), [(70000, "longer than the guest's buf_alloc"), (20000, "beyond the credit"),
                                            (8 * 3732 + 1, "more chains than posted")])
def test_a_message_c_cannot_deliver_whole_stays_on_the_socket_for_python(seqrx: SeqRx, size: int, why: str) -> None:
    m = os.urandom(size)
    seqrx.host.send(m)
    r = seqrx.fill(credit=10000 if "credit" in why else 1 << 20)
    assert (r.packets, r.status) == (0, R.RX_SLOW), why
    assert seqrx.rig.q.last_avail_idx == 0 and seqrx.rig.q.used_idx == 0
    assert seqrx.peer.recv(1 << 20) == m  # untouched: the Python walker reads it


def test_messages_up_to_one_that_does_not_fit_are_delivered_then_python_s_turn(seqrx: SeqRx) -> None:
    seqrx.host.send(b"fits")
    seqrx.host.send(b"z" * 30000)  # needs 9 chains, 7 are left
    r = seqrx.fill()
    assert (r.packets, r.bytes, r.status) == (1, 4, R.RX_SLOW)
    assert seqrx.peer.recv(1 << 20) == b"z" * 30000


def test_an_empty_message_or_a_closed_socket_read_as_the_end(seqrx: SeqRx) -> None:
    seqrx.host.send(b"")
    assert seqrx.fill().status == R.RX_EOF
    seqrx.peer.recv(16)
    seqrx.host.close()
    assert (seqrx.fill().packets, seqrx.fill().status) == (0, R.RX_EOF)


def test_the_credit_used_up_exactly_stops_at_the_limit(seqrx: SeqRx) -> None:
    seqrx.host.send(b"a" * 100)
    seqrx.host.send(b"b" * 50)
    r = seqrx.fill(credit=100)
    assert (r.packets, r.bytes, r.status) == (1, 100, R.RX_LIMIT)
    assert seqrx.peer.recv(64) == b"b" * 50  # the next message waits for credit


def test_a_descriptor_that_is_no_socket_is_an_error(seqrx: SeqRx) -> None:
    rfd, wfd = os.pipe()
    try:
        r = seqrx.fast.fill(rfd, 1 << 20, 16, seqrx.hdr, msg_limit=65536)
        assert (r.packets, r.status, r.err) == (0, R.RX_ERROR, errno.ENOTSOCK)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_a_burst_limit_stops_before_a_message_in_the_middle(seqrx: SeqRx) -> None:
    seqrx.host.send(b"x" * 9000)  # three packets
    r = seqrx.fill(max_packets=2)
    assert (r.packets, r.status) == (0, R.RX_SLOW) and seqrx.peer.recv(1 << 20) == b"x" * 9000


# -- through a real vsproxy, with C and without --------------------------------------------

MESSAGES = [os.urandom(n) for n in (1, 64, 700, 1024, 1025, 3732, 3733, 9000, 100_000, 5, 20000, 64)]
BLAST, BLAST_SIZE = 3000, 1000
C_COUNTERS = ("c_pump_sends", "c_pump_kicks")


def counters(report: str) -> dict[str, int]:
    names = (*C_COUNTERS, "tx_bytes", "rx_bytes", "bad_pkts", "credit_violations", "rst")
    return {name: int(m.group(1)) for name in names if (m := re.search(rf"\b{name}=(\d+)", report))}


# a captured RW packet: inbound, src_cid, dst_cid, host port, type, len, flags, payload, comment
Rec = tuple[bool | None, int, int, int, int, int, int, bytes, str | None]


class Outcome(NamedTuple):
    host_got: list[bytes]  # the messages the host read (the blast's as b"" when they were right)
    echoed: list[tuple[bytes, int]]  # the guest's messages back, with their flags
    end: tuple[bytes, int]  # what the guest read once the host closed
    counts: dict[str, int]
    records: list[Rec]


def rw_records(path: str) -> list[Rec]:
    """The capture's RW packets: direction, CIDs, host port, type, length, flags, payload, comment
    (the credit fields, timing and the guest's port differ from run to run)."""
    out: list[Rec] = []
    with open(path, "rb") as f:
        for rec in reader.records(f):
            p = reader.dissect(rec)
            if p.hdr is not None and p.hdr.op == H.Op.RW:
                h = p.hdr
                host_port = h.dst_port if rec.inbound else h.src_port  # (the guest's port is its own pick)
                out.append((rec.inbound, h.src_cid, h.dst_cid, host_port, h.type, h.len, h.flags, p.payload,
                            rec.comment))
    return out


def transfer(workdir: str, name: str, no_c: bool, remap: bool, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    """The guest's messages to a SOCK_SEQPACKET host echo and back, then a blast of one-packet
    messages; ``remap``: to CID 3, rewritten to the host (--remap 3=2), every packet's capture
    record carrying that mark as its comment."""
    d = os.path.join(workdir, name)
    os.mkdir(d)
    uds, sock, pcap = os.path.join(d, "h"), os.path.join(d, "v.sock"), os.path.join(d, "c.pcapng")
    with monkeypatch.context() as env:
        if no_c:
            env.setenv("VSPROXY_NO_C", "1")
        else:
            env.delenv("VSPROXY_NO_C", raising=False)
        vp = VsproxyProcess(["--socket", sock, "--guest-cid", "5", "--uds-path", uds, "--pcap", pcap,
                             *(("--remap", "3=2") if remap else ())], sock, os.path.join(d, "log"))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(f"{uds}_5000")
    srv.listen()
    host_got: list[bytes] = []

    def host() -> None:  # echoes the messages, then takes the blast
        c, _ = srv.accept()
        c.settimeout(60)
        for _ in MESSAGES:
            msg = c.recv(1 << 20)
            host_got.append(msg)
            c.send(msg)
        for _ in range(BLAST):
            msg = c.recv(1 << 20)
            host_got.append(b"" if msg == b"\xa5" * BLAST_SIZE else msg)
        c.close()

    t = threading.Thread(target=host, daemon=True)
    t.start()
    try:
        with SimGuest(sock, timeout=60) as g:
            s = g.connect(5000, cid=3 if remap else 2, type=SIM_SEQPACKET)
            for i, m in enumerate(MESSAGES):
                s.send_message(m, eor=bool(i % 3 == 1))
            echoed = [s.recv_message(timeout=60) for _ in MESSAGES]
            s.blast(b"\xa5" * BLAST_SIZE, BLAST)  # one message per packet, EOM on each
            t.join(60)
            end = s.recv_message(timeout=60)  # the host closed
            s.close()
            c = counters(vp.report())
    finally:
        srv.close()
        vp.stop()
    return Outcome(host_got, echoed, end, c, rw_records(pcap))


@pytest.mark.parametrize("remap", [False, True], ids=["plain", "remapped"])
def test_seqpacket_through_vsproxy_is_the_same_with_c_and_without(workdir: str, remap: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    got_c = transfer(workdir, "c", False, remap, monkeypatch)
    got_py = transfer(workdir, "py", True, remap, monkeypatch)
    host_c, echoed_c, end_c, counts_c, recs_c = got_c
    host_py, echoed_py, end_py, counts_py, recs_py = got_py  # (the same fields of the Python run)
    assert host_c == host_py == [*MESSAGES, *([b""] * BLAST)]  # every message whole, in order, both ways
    assert echoed_c == echoed_py == [(m, EOM) for m in MESSAGES]  # a unix socket carries no record mark
    assert end_c == end_py == (b"", 0)
    # the same RW packets captured each way (the two directions interleave as timing has it):
    # boundaries, flags (EOR from the guest), bytes, comments
    for inbound in (True, False):
        assert [r for r in recs_c if r[0] is inbound] == [r for r in recs_py if r[0] is inbound]
    assert sum(1 for r in recs_c if r[6] & EOR) == sum(1 for i in range(len(MESSAGES)) if i % 3 == 1)
    assert len(recs_c) >= 2 * len(MESSAGES) + BLAST
    comments = {r[8] for r in recs_c}
    assert comments == ({"rewritten (remap 3=2): real peer 2:5000"} if remap else {None}), comments
    assert counts_c["tx_bytes"] == sum(map(len, MESSAGES)) + BLAST * BLAST_SIZE
    assert counts_c["rx_bytes"] == sum(map(len, MESSAGES))
    for name in ("tx_bytes", "rx_bytes", "bad_pkts", "credit_violations", "rst"):
        assert counts_c[name] == counts_py[name], (name, counts_c, counts_py)
    assert counts_c["c_pump_sends"] > 0, counts_c  # C sent the guest's messages itself
    assert all(counts_py[n] == 0 for n in C_COUNTERS), counts_py  # and without C nothing ran there
