"""The C pump: connections C runs while the guest's window is shut (VsockCore._lend,
fastpath.TxFastPath.own). The core's side with plain bytes and a fake owner; then the real
thing through vsproxy and the simulated guest, hash-checked."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Sequence

import pytest
from helpers import VsproxyProcess, hybrid_connect, send_then_shut, unix_server
from test_vsock_core import FakePeer, Harness, pkt

from vsproxy.endpoints.base import scatter
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H
from vsproxy.vsock import lending
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import CREDIT_REQUEST_DELAY
from vsproxy.vsock.header import Op
from vsproxy.vsock.lending import OwnedBack, OwnedCounts

pytestmark = pytest.mark.c_paths

Start = Callable[..., VsproxyProcess]
MiB = 1 << 20


class FastPeer(FakePeer):
    """A peer C may read directly, with SocketPeer's prebuf: bytes that go before the socket's."""

    prebuf = b""

    def fast_fd(self) -> int:
        return -1 if self.prebuf else 99

    def unread(self, data: bytes) -> None:
        self.prebuf = data + self.prebuf

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self.prebuf:
            return super().recv_into(bufs)
        n = scatter(self.prebuf, bufs)
        self.prebuf = self.prebuf[n:]
        return n


class FakeOwner:
    """Stands in for TxFastPath: remembers what was lent and gives back what a test sets."""

    def __init__(self) -> None:
        self.lent: dict[str, object] = {}
        self.back: OwnedBack | None = None
        self.taken = 0
        self.steps = 0
        self.pending = OwnedCounts()
        self.fills: list[OwnedBack | bool] = []  # what fill answers, in turn
        self.filled = 0
        self.window_shut = True

    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None,
            comment: bytes = b"") -> int:
        self.lent = {"token": token, "key": key, "fd": fd, "tx_cnt": tx_cnt, "peer_buf_alloc": peer_buf_alloc,
                     "peer_fwd_cnt": peer_fwd_cnt, "hdr": H.unpack(hdr), "flags": flags, "tx": tx,
                     "comment": comment}
        return 0

    def take_back(self, slot: int) -> OwnedBack:
        self.taken += 1
        if self.back is not None:
            return self.back
        lent = self.lent
        return OwnedBack(lending.OWN_TAKEN, 0, int(lent["tx_cnt"]), int(lent["peer_buf_alloc"]),  # type: ignore[call-overload]
                         int(lent["peer_fwd_cnt"]), int(lent["flags"]))  # type: ignore[call-overload]

    def fill(self, slot: int) -> OwnedBack | bool:
        self.filled += 1
        return self.fills.pop(0)

    def progress(self, slot: int) -> int:
        return self.steps

    def shut(self, slot: int) -> bool:
        return self.window_shut

    def counts(self, slot: int) -> OwnedCounts:
        got, self.pending = self.pending, OwnedCounts()
        return got

    def peek(self, slot: int) -> OwnedBack:
        lent = self.lent
        return OwnedBack(0, 0, int(lent["tx_cnt"]), int(lent["peer_buf_alloc"]),  # type: ignore[call-overload]
                         int(lent["peer_fwd_cnt"]), int(lent["flags"]), self.pending)  # type: ignore[call-overload]


def shut_window(data: bytes = b"x" * 10000, window: int = 3000) -> tuple[Harness, FakeOwner, Connection]:
    """A connection whose guest window (``window`` bytes) the host data has filled."""
    t = Harness(peer=FastPeer(data=data))
    owner = FakeOwner()
    t.core.owner = owner
    t.send(Op.REQUEST, buf_alloc=window)
    (conn,) = t.core.conns.values()
    t.core.peer_connected(conn)
    t.core.peer_readable(conn)
    t.drain()
    return t, owner, conn


def test_window_shut_lends_the_stream_with_its_credit_and_header() -> None:
    t, owner, conn = shut_window()
    assert conn.own == 0 and t.core.owned == 1
    assert owner.lent["key"] == conn.key and owner.lent["fd"] == 99
    assert owner.lent["tx_cnt"] == 3000 and owner.lent["peer_buf_alloc"] == 3000
    hdr = owner.lent["hdr"]
    assert isinstance(hdr, H.Header)
    assert (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.dst_port, hdr.buf_alloc, hdr.fwd_cnt) == (
        Op.RW, 2, 5, conn.guest_port, conn.credit.buf_alloc, conn.credit.fwd_cnt)
    # a guest not yet seen to update unasked was asked: the C pump knows, so its answer is not "unasked"
    assert owner.lent["flags"] == lending.OWN_F_REQUESTED


def test_capture_or_data_owed_to_the_peer_keeps_the_connection_in_python() -> None:
    t = Harness(peer=FastPeer(data=b"x" * 10000))
    t.core.owner = FakeOwner()
    t.core.taps.add(lambda *a: None)  # a tap: C writes no records, so it runs nothing
    t.send(Op.REQUEST, buf_alloc=3000)
    (conn,) = t.core.conns.values()
    t.core.peer_connected(conn)
    t.core.peer_readable(conn)
    t.drain()
    assert conn.flags & Connection.WAIT_CREDIT and conn.own == -1

    t2 = Harness(peer=FastPeer(data=b"x" * 10000))
    t2.core.owner = FakeOwner()
    t2.peer.accept = 0  # the host takes nothing: guest data stays queued
    t2.send(Op.REQUEST, buf_alloc=3000)
    (conn2,) = t2.core.conns.values()
    t2.core.peer_connected(conn2)
    t2.drain()
    t2.send(Op.RW, payload=b"abc", buf_alloc=3000)
    t2.core.peer_readable(conn2)
    t2.drain()
    assert conn2.out_bytes == 3 and conn2.own == -1


def test_given_back_with_credit_left_the_connection_is_served_again_and_counted() -> None:
    t, owner, conn = shut_window(data=b"y" * 20000)
    # C took two updates and wrote 2 packets (2000 bytes); the guest's window is open by 1000 more
    owner.back = OwnedBack(lending.OWN_LIMIT, 0, 5000, 3000, 3000, lending.OWN_F_SELF, OwnedCounts(2, 2, 2000))
    rx_before = t.core.counters.rx_packets
    t.send(Op.CREDIT_UPDATE, buf_alloc=3000, fwd_cnt=3000)  # Python sees a packet: takes it back first
    assert owner.taken == 1 and conn.own == -1 and t.core.owned == 0
    # Python wrote one 3000-byte packet before lending; C wrote two more (2000 bytes)
    assert t.core.counters.rx_packets == rx_before + 2 and conn.stats[2:] == [3, 5000]
    assert t.core.counters.pump_updates == 2
    assert conn.flags & Connection.SELF_UPDATES
    # the update Python then read says fwd_cnt 3000: 2000 of tx_cnt 5000 in flight, 1000 free
    pkts = t.drain()
    rw = [h for h, _ in pkts if h.op == Op.RW]
    assert sum(h.len for h in rw) == 1000 and conn.credit.tx_cnt == 6000


def test_bytes_c_read_ahead_go_to_the_guest_before_the_socket_s_when_python_takes_over() -> None:
    t, owner, conn = shut_window(data=b"s" * 5000)
    t.drain()
    # C held 1500 bytes read ahead when it gave the connection back with the window open
    owner.back = OwnedBack(lending.OWN_LIMIT, 0, 3000, 3000, 2000, lending.OWN_F_SELF, OwnedCounts(read_ahead=1500),
                           prebuf=b"r" * 1500)
    t.core.owned_back(conn, owner.take_back(0))
    assert t.core.counters.pump_read_ahead == 1500
    assert b"".join(p for h, p in t.drain() if h.op == Op.RW) == b"r" * 1500  # the held bytes first
    assert t.peer.reading  # then the socket's, when it is readable
    t.core.peer_readable(conn)
    assert b"".join(p for h, p in t.drain() if h.op == Op.RW) == b"s" * 500  # the rest of the 2000 of credit


@pytest.mark.parametrize("why", [lending.OWN_EOF, lending.OWN_ERROR])
def test_what_stopped_the_c_pump_is_dealt_with_as_python_would(why: int) -> None:
    t, owner, conn = shut_window()
    owner.back = OwnedBack(why, 104, 4000, 3000, 2000, 0, OwnedCounts(1, 1, 1000))
    t.peer.reading = False
    t.core.owned_back(conn, owner.take_back(0))
    ops = [h.op for h, _ in t.drain()]
    if why == lending.OWN_EOF:
        assert conn.host_eof and Op.SHUTDOWN in ops
    else:
        assert ops == [Op.RST] and t.peer.closed is True and not t.core.conns
    assert conn.credit.tx_cnt == 4000 and t.core.counters.rx_bytes == 3000 + 1000


def test_a_dry_socket_c_keeps_is_watched_by_python_and_its_wakeups_go_to_c() -> None:
    t, owner, conn = shut_window()
    t.drain()
    t.peer.reading = False
    t.core.owned_waiting(conn)  # C found the socket dry with credit left
    assert t.peer.reading and conn.own == 0
    owner.fills = [True, False]
    assert t.core.peer_readable(conn) is False  # C read it and waits for more: no pump turn
    assert conn.own == 0 and t.peer.reading and not t.core.ready
    assert t.core.peer_readable(conn) is False  # the window shut again: C waits for the guest
    assert conn.own == 0 and not t.peer.reading and owner.filled == 2
    assert t.core.counters.pump_reads == 2 and t.drain() == []


def test_a_wakeup_that_makes_c_give_back_is_dealt_with_by_python() -> None:
    t, owner, conn = shut_window()
    t.drain()
    owner.fills = [OwnedBack(lending.OWN_EOF, 0, 4000, 3000, 2000, lending.OWN_F_WAIT, OwnedCounts(0, 1, 1000))]
    assert t.core.peer_readable(conn) is True
    assert conn.own == -1 and t.core.owned == 0 and conn.host_eof and conn.credit.tx_cnt == 4000
    assert Op.SHUTDOWN in [h.op for h, _ in t.drain()]


def test_tick_asks_for_credit_only_when_the_c_pump_saw_no_update() -> None:
    t, owner, conn = shut_window()
    t.drain()
    owner.lent["flags"] = lending.OWN_F_SELF  # C saw the guest update unasked: it is not asked at once
    now = t.core.now + CREDIT_REQUEST_DELAY * 2
    owner.steps = 3  # C took updates meanwhile: the window was not shut all along
    t.core.tick(now)
    assert conn.own == 0 and Op.CREDIT_REQUEST not in [h.op for h, _ in t.drain()]
    t.core.tick(now + CREDIT_REQUEST_DELAY * 2)  # nothing since: taken back and asked
    assert conn.own == -1 and [h.op for h, _ in t.drain()] == [Op.CREDIT_REQUEST]


def test_guest_reset_of_a_lent_connection_folds_its_counts_and_closes() -> None:
    t, owner, conn = shut_window()
    owner.back = OwnedBack(lending.OWN_TAKEN, 0, 7000, 3000, 3000, 0, OwnedCounts(2, 4, 4000))
    t.send(Op.RST)
    assert not t.core.conns and t.peer.closed is True and t.core.owned == 0
    assert t.core.counters.pump_updates == 2 and conn.stats[3] == 3000 + 4000


def test_counters_follow_the_c_pump_while_it_keeps_the_connection() -> None:
    t, owner, conn = shut_window()
    owner.pending = OwnedCounts(5, 10, 10000)
    before = t.core.counters.rx_bytes
    t.core.sync_owned()
    assert conn.own == 0 and t.core.counters.rx_bytes == before + 10000 and t.core.counters.pump_updates == 5
    t.core.sync_owned()
    assert t.core.counters.rx_bytes == before + 10000  # folded once


def open_sender(accept: int = 1 << 30) -> tuple[Harness, FakeOwner, Connection]:
    """An open connection whose guest sent 5000 bytes, of which the host takes ``accept``."""
    t = Harness(peer=FastPeer())
    owner = FakeOwner()
    t.core.owner = owner
    conn = t.open()
    t.peer.reading = False
    t.peer.accept = accept
    # as the device runs a batch: the packet, the credit update it made due, then the flush
    t.core.guest_packet(*pkt(Op.RW, payload=b"a" * 5000, buf_alloc=3000))
    assert [h.op for h, _ in t.drain()] == [Op.CREDIT_UPDATE]
    t.core.flush_host()
    return t, owner, conn


def test_a_flush_that_leaves_nothing_queued_lends_the_sender_with_its_credit_both_ways() -> None:
    t, owner, conn = open_sender()
    assert bytes(t.peer.sent) == b"a" * 5000
    cr = conn.credit
    assert conn.own == 0 and t.core.owned == 1
    assert owner.lent["tx"] == (cr.buf_alloc, 5000, cr.fwd_cnt, cr.adv_fwd_cnt)
    assert cr.fwd_cnt == cr.adv_fwd_cnt == 5000  # forwarded, and the guest was told
    # the guest's window is open: C waits for the host socket, which Python watches for it
    assert owner.lent["flags"] == lending.OWN_F_WAIT and t.peer.reading


def test_a_host_that_does_not_take_everything_keeps_the_sender_in_python() -> None:
    t, _owner, conn = open_sender(accept=1000)
    assert conn.out_bytes == 4000 and conn.own == -1 and t.core.owned == 0 and t.peer.writing


def test_given_back_with_guest_data_counted_python_takes_c_s_credit_and_counts() -> None:
    t, owner, conn = open_sender()
    cr = conn.credit
    tx_packets, tx_bytes = t.core.counters.tx_packets, t.core.counters.tx_bytes
    # C took 3 packets (150000 bytes), sent 2 credit updates, and the socket left 20000 unsent
    owner.back = OwnedBack(lending.OWN_BLOCKED, 0, cr.tx_cnt, 3000, 0, lending.OWN_F_TX | lending.OWN_F_WAIT,
                           OwnedCounts(tx_packets=3, tx_bytes=150000, updates_sent=2, sends=1), rx_cnt=155000,
                           fwd_cnt=155000, adv_fwd_cnt=150000, ahead=20000)
    t.core.owned_back(conn, owner.take_back(0))
    assert conn.own == -1 and t.core.owned == 0
    assert (cr.rx_cnt, cr.fwd_cnt, cr.adv_fwd_cnt, cr.ahead) == (155000, 155000, 150000, 20000)
    c = t.core.counters
    assert (c.tx_packets - tx_packets, c.tx_bytes - tx_bytes) == (3, 150000)
    assert c.pump_sends == 1 and c.pump_blocked == 1 and conn.stats[:2] == [1 + 3, 5000 + 150000]
    # the tail C could not send is queued; the host takes 8000 now: the rest waits for POLLOUT
    t.peer.accept = 8000
    t.core.guest_rw_tail(conn.guest_port, conn.peer_cid, conn.peer_port, 20000, [memoryview(b"t" * 20000)])
    t.core.flush_host()
    assert bytes(t.peer.sent[5000:]) == b"t" * 8000 and conn.out_bytes == 12000 and t.peer.writing
    assert cr.ahead == 12000 and cr.fwd_cnt == 155000  # counted once, ahead: not again
    t.peer.accept = 1 << 30
    t.core.peer_writable(conn)
    assert conn.out_bytes == 0 and cr.ahead == 0 and cr.fwd_cnt == 155000 and not t.peer.writing


@pytest.mark.parametrize("window_open", [True, False])
def test_a_sender_given_back_is_served_or_waits_by_the_window_c_left(window_open: bool) -> None:
    """C took the connection with the guest's window open; whatever it did to the window
    meanwhile, Python's view comes from the credit C gives back, not from its flags at lending."""
    t, owner, conn = open_sender()
    t.peer.data += b"h" * 10000  # host data waiting
    # C wrote 3000 bytes to the guest; the guest has consumed them (window open) or not (shut)
    owner.back = OwnedBack(lending.OWN_GUEST, 0, 3000, 3000, 3000 if window_open else 0,
                           lending.OWN_F_TX | lending.OWN_F_SELF, OwnedCounts(0, 1, 3000), rx_cnt=5000,
                           fwd_cnt=5000, adv_fwd_cnt=5000)
    t.core.owned_back(conn, owner.take_back(0))
    assert bool(conn.flags & Connection.WAIT_CREDIT) is not window_open
    rw = [h for h, _ in t.drain() if h.op == Op.RW]
    assert sum(h.len for h in rw) == (3000 if window_open else 0)
    if not window_open:  # lent again, waiting for the guest; asked when it stays shut
        assert conn.own == 0
        owner.steps, owner.window_shut = 0, True
        t.core.tick(t.core.now + CREDIT_REQUEST_DELAY * 2)
        t.core.tick(t.core.now + CREDIT_REQUEST_DELAY * 4)
        assert conn.own == -1 and [h.op for h, _ in t.drain()] == [Op.CREDIT_REQUEST]


def test_tick_leaves_c_a_connection_whose_window_is_open() -> None:
    t, owner, conn = open_sender()
    owner.window_shut = False
    for k in range(1, 5):
        t.core.tick(t.core.now + CREDIT_REQUEST_DELAY * 2 * k)
    assert conn.own == 0 and owner.taken == 0


def test_a_tail_for_a_connection_reset_meanwhile_is_dropped() -> None:
    t, owner, conn = open_sender()
    owner.back = OwnedBack(lending.OWN_ERROR, 32, 0, 3000, 0, lending.OWN_F_TX,
                           OwnedCounts(tx_packets=1, tx_bytes=4000), rx_cnt=9000, fwd_cnt=9000, adv_fwd_cnt=5000)
    t.core.owned_back(conn, owner.take_back(0))  # EPIPE from C's send: reset, as Python's send would
    assert not t.core.conns and t.peer.closed is True
    t.core.guest_rw_tail(conn.guest_port, conn.peer_cid, conn.peer_port, 100, [memoryview(b"x" * 100)])
    t.core.flush_host()
    assert conn.out_bytes == 0 and [h.op for h, _ in t.drain()] == [Op.RST]


# -- the real C pump ---------------------------------------------------------------------------

def _pump_updates(vp: VsproxyProcess, name: str = "c_pump_updates") -> int:
    report = vp.report()
    return int(report.split(f"{name}=")[1].split()[0])


def test_c_pump_carries_host_data_hash_checked_and_python_sees_every_byte(start_vsproxy: Start,
                                                                           workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    data = os.urandom(8 * MiB)
    with SimGuest(vp.socket_path, buf_alloc=256 * 1024, rx_buf_size=64 * 1024 + 44) as g:
        host, gs = hybrid_connect(uds, g, 6100)
        sender = send_then_shut(host, data)
        got = bytearray()
        gs.drain(len(data), sink=lambda b: got.extend(b))
        sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert _pump_updates(vp) > 0
        assert _pump_updates(vp, "c_pump_kicks") > 0  # kicks C took to the end, no Python pump turn
        assert f"rx_bytes={len(data)}" in vp.report()  # what C wrote is in Python's counters
        gs.close()
        host.close()


def test_c_pump_keeps_a_connection_whose_host_sender_trickles_and_serves_its_wakeups(
        start_vsproxy: Start, workdir: str) -> None:
    """A host sender that writes in bursts with pauses: each burst shuts the guest's window (C
    takes the connection), then the socket runs dry with the window open. C keeps the connection
    and is handed each wake-up; every byte arrives."""
    import time

    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    chunks = [os.urandom(384 * 1024) for _ in range(24)]
    with SimGuest(vp.socket_path, buf_alloc=128 * 1024, rx_buf_size=64 * 1024 + 44) as g:
        host, gs = hybrid_connect(uds, g, 6101)

        def send() -> None:
            for c in chunks:
                host.sendall(c)
                time.sleep(0.005)
            host.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        total = sum(len(c) for c in chunks)
        gs.drain(total, sink=lambda b: got.extend(b))
        sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(b"".join(chunks)).digest()
        # after the first window shut, C ran the connection and Python only passed wake-ups on
        assert _pump_updates(vp, "c_pump_reads") > 10
        assert f"rx_bytes={total}" in vp.report()
        gs.close()
        host.close()


def test_c_pump_with_guest_data_on_the_same_connection_echoes_hash_checked(start_vsproxy: Start,
                                                                            workdir: str) -> None:
    from helpers import echo_many

    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    echo = unix_server(f"{uds}_5000")
    payloads = [os.urandom(4 * MiB) for _ in range(3)]
    with SimGuest(vp.socket_path, timeout=30, buf_alloc=64 * 1024) as g:
        socks = [g.connect(5000) for _ in range(3)]
        got = echo_many(g, socks, payloads, timeout=120)
        assert _pump_updates(vp) > 0
        for s in socks:
            s.close()
    assert [hashlib.sha256(x).digest() for x in got] == [hashlib.sha256(p).digest() for p in payloads]
    echo.close()


def test_an_avail_index_jump_while_c_runs_a_connection_breaks_only_that_queue(start_vsproxy: Start,
                                                                              workdir: str) -> None:
    """A hostile guest kicks with a tx avail index past the queue size while C runs one of its
    connections (vq_tx_kick): C hands the ring to Python's check, which counts it; vsproxy lives."""
    import time

    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with SimGuest(vp.socket_path, buf_alloc=64 * 1024, rx_buf_size=64 * 1024 + 44) as g:
        host, _gs = hybrid_connect(uds, g, 6102)
        host.sendall(os.urandom(160 * 1024))  # more than the guest's window, which it does not read
        time.sleep(0.3)  # vsproxy fills the window and lends the connection to C
        assert "bad_chains=0" in vp.report()
        tx = g.rings[1]
        tx.set_avail_idx(tx.avail_idx + 1000)
        assert g.frontend is not None
        g.frontend.kick(1)
        deadline = time.monotonic() + 10
        while "bad_chains=0" in vp.report() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "bad_chains=1" in vp.report()
        assert vp.proc.poll() is None
        host.close()


class HostReader(threading.Thread):
    """A host program on the hybrid socket ``path``: takes one connection and reads it to EOF
    (``pause`` seconds after each read), or hangs up after ``close_after`` bytes."""

    def __init__(self, path: str, chunk: int = 1 << 20, pause: float = 0.0, close_after: int = 0) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.srv.settimeout(30)
        self.chunk, self.pause, self.close_after = chunk, pause, close_after
        self.digest = hashlib.sha256()
        self.n = 0
        self.start()

    def run(self) -> None:
        import time

        conn, _ = self.srv.accept()
        conn.settimeout(60)
        with conn:
            while True:
                b = conn.recv(self.chunk)
                if not b:
                    break
                self.digest.update(b)
                self.n += len(b)
                if self.close_after and self.n >= self.close_after:
                    break
                if self.pause:
                    time.sleep(self.pause)
        self.srv.close()


def _guest_sends(g: SimGuest, port: int, data: bytes) -> None:
    s = g.connect(port)
    s.sendall(data)
    s.shutdown_write()


def test_c_sends_guest_data_to_the_host_hash_checked_and_python_counts_every_byte(start_vsproxy: Start,
                                                                                   workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    data = os.urandom(8 * MiB)
    reader = HostReader(f"{uds}_6200")
    with SimGuest(vp.socket_path, timeout=60) as g:
        _guest_sends(g, 6200, data)
        reader.join(60)
        assert not reader.is_alive() and reader.n == len(data)
        assert reader.digest.digest() == hashlib.sha256(data).digest()
        assert _pump_updates(vp, "c_pump_sends") > 0  # runs C sent itself, with no Python turn
        report = vp.report()
        assert f"tx_bytes={len(data)}" in report and "credit_violations=0" in report
        assert g.stats.credit_violations == 0 and g.stats.protocol_errors == []


def test_a_host_reader_slower_than_the_guest_gets_every_byte_as_c_and_python_hand_over(start_vsproxy: Start,
                                                                                     workdir: str) -> None:
    """The host socket fills up under C's sends: C gives the connection back with the unsent
    tail (at whatever byte the socket stopped), Python queues it and waits for POLLOUT, and
    lends the connection again once its queue is empty."""
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    data = os.urandom(6 * MiB)
    reader = HostReader(f"{uds}_6201", chunk=48 * 1024 + 7, pause=0.001)
    with SimGuest(vp.socket_path, timeout=60) as g:
        _guest_sends(g, 6201, data)
        reader.join(60)
        assert not reader.is_alive() and reader.n == len(data)
        assert reader.digest.digest() == hashlib.sha256(data).digest()
        assert _pump_updates(vp, "c_pump_blocked") > 0 and _pump_updates(vp, "c_pump_sends") > 0
        assert f"tx_bytes={len(data)}" in vp.report()
        assert g.stats.credit_violations == 0 and g.stats.protocol_errors == []


def test_a_guest_past_its_credit_on_a_connection_c_runs_is_reset(start_vsproxy: Start, workdir: str) -> None:
    import time

    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds, "--tx-buffer-size", "16384")
    reader = HostReader(f"{uds}_6202")
    with SimGuest(vp.socket_path, timeout=30) as g:
        s = g.connect(6202)
        s.sendall(os.urandom(8192))
        deadline = time.monotonic() + 10
        while _pump_updates(vp, "c_pump_sends") == 0:  # C runs it after Python's first flush
            s.sendall(os.urandom(1024))
            g.poll(0.05)
            assert time.monotonic() < deadline, vp.report()
        port = s.local_port
        hdr = H.pack(g.guest_cid, 2, port, 6202, 32768, 1, Op.RW, 0, 262144, s.conn.fwd_cnt)
        update = H.pack(g.guest_cid, 2, port, 6202, 0, 1, Op.CREDIT_UPDATE, 0, 262144, s.conn.fwd_cnt)
        # Twice the 16 KiB window in one packet, and a credit update after it in the same
        # batch: C gives the connection back for the first; the second is Python's then.
        time.sleep(0.05)
        kick, g.driver._kick = g.driver._kick, lambda ring: None  # type: ignore[method-assign]
        g.send_raw(hdr, b"x" * 32768)
        g.send_raw(update)
        g.driver._kick = kick  # type: ignore[method-assign]
        kick(g.driver.tx)
        for _ in range(100):
            g.poll(0.02)
            if any(h.op == Op.RST and h.dst_port == port for h, _ in g.received_raw):
                break
        else:
            pytest.fail(f"no RST for a credit violation: {vp.report()}")
        assert "credit_violations=1" in vp.report()
        # vsproxy goes on: the C pump's bookkeeping held
        data = os.urandom(MiB)
        reader2 = HostReader(f"{uds}_6205")
        _guest_sends(g, 6205, data)
        reader2.join(30)
        assert reader2.digest.digest() == hashlib.sha256(data).digest()
    reader.join(10)
    assert reader.n < 8192 + 16384  # the packet past the window never reached the host


def test_a_host_reader_hanging_up_while_c_sends_resets_only_that_connection(start_vsproxy: Start,
                                                                          workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    gone = HostReader(f"{uds}_6203", close_after=256 * 1024)
    with SimGuest(vp.socket_path, timeout=30) as g:
        with pytest.raises(BrokenPipeError):
            _guest_sends(g, 6203, os.urandom(8 * MiB))  # more than one window: the error shows
        gone.join(10)
        # a write failing first: RST; the hang-up read first: SHUTDOWN 3, as a kernel peer's close().
        # Packets the guest had already queued for the connection may each get an RST after it
        # (a packet for no connection, as a kernel answers it), never anything else.
        ends = [(h.op, h.flags) for h, _ in g.received_raw if h.src_port == 6203 and h.op in (Op.RST, Op.SHUTDOWN)]
        assert ends and ends[0] in ((Op.RST, 0), (Op.SHUTDOWN, H.SHUTDOWN_BOTH)), ends
        assert all(e == (Op.RST, 0) for e in ends[1:]), ends
        assert _pump_updates(vp, "rst") >= 1 or ends[0] == (Op.SHUTDOWN, H.SHUTDOWN_BOTH)
        # vsproxy and the device go on: a new connection is served, hash-checked
        data = os.urandom(2 * MiB)
        reader = HostReader(f"{uds}_6204")
        _guest_sends(g, 6204, data)
        reader.join(30)
        assert reader.digest.digest() == hashlib.sha256(data).digest()
