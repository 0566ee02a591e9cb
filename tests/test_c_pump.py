"""The C pump: connections C runs while the guest's window is shut (VsockCore._lend,
fastpath.TxFastPath.own). The core's side with plain bytes and a fake owner; then the real
thing through vsproxy and the simulated guest, hash-checked."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable

import pytest
from helpers import VsproxyProcess, hybrid_connect, unix_server
from test_vsock_core import FakePeer, Harness

from vsproxy import fastpath
from vsproxy.fastpath import OwnedBack
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import CREDIT_REQUEST_DELAY
from vsproxy.vsock.header import Op

Start = Callable[..., VsproxyProcess]
MiB = 1 << 20


class FastPeer(FakePeer):
    def fast_fd(self) -> int:
        return 99


class FakeOwner:
    """Stands in for TxFastPath: remembers what was lent and gives back what a test sets."""

    def __init__(self) -> None:
        self.lent: dict[str, object] = {}
        self.back: OwnedBack | None = None
        self.taken = 0
        self.steps = 0
        self.pending = (0, 0, 0)
        self.fills: list[OwnedBack | bool] = []  # what fill answers, in turn
        self.filled = 0

    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None) -> int:
        self.lent = {"token": token, "key": key, "fd": fd, "tx_cnt": tx_cnt, "peer_buf_alloc": peer_buf_alloc,
                     "peer_fwd_cnt": peer_fwd_cnt, "hdr": H.unpack(hdr), "flags": flags, "tx": tx}
        return 0

    def take_back(self, slot: int) -> OwnedBack:
        self.taken += 1
        if self.back is not None:
            return self.back
        lent = self.lent
        return OwnedBack(fastpath.OWN_TAKEN, 0, int(lent["tx_cnt"]), int(lent["peer_buf_alloc"]),  # type: ignore[call-overload]
                         int(lent["peer_fwd_cnt"]), int(lent["flags"]), 0, 0, 0)  # type: ignore[call-overload]

    def fill(self, slot: int) -> OwnedBack | bool:
        self.filled += 1
        return self.fills.pop(0)

    def progress(self, slot: int) -> int:
        return self.steps

    def counts(self, slot: int) -> tuple[int, ...]:
        got, self.pending = self.pending, (0, 0, 0)
        return got


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
    assert owner.lent["flags"] == fastpath.OWN_F_REQUESTED


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
    owner.back = OwnedBack(fastpath.OWN_LIMIT, 0, 5000, 3000, 3000, fastpath.OWN_F_SELF, 2, 2, 2000)
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


@pytest.mark.parametrize("why", [fastpath.OWN_EOF, fastpath.OWN_ERROR])
def test_what_stopped_the_c_pump_is_dealt_with_as_python_would(why: int) -> None:
    t, owner, conn = shut_window()
    owner.back = OwnedBack(why, 104, 4000, 3000, 2000, 0, 1, 1, 1000)
    t.peer.reading = False
    t.core.owned_back(conn, owner.take_back(0))
    ops = [h.op for h, _ in t.drain()]
    if why == fastpath.OWN_EOF:
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
    owner.fills = [OwnedBack(fastpath.OWN_EOF, 0, 4000, 3000, 2000, fastpath.OWN_F_WAIT, 0, 1, 1000)]
    assert t.core.peer_readable(conn) is True
    assert conn.own == -1 and t.core.owned == 0 and conn.host_eof and conn.credit.tx_cnt == 4000
    assert Op.SHUTDOWN in [h.op for h, _ in t.drain()]


def test_tick_asks_for_credit_only_when_the_c_pump_saw_no_update() -> None:
    t, owner, conn = shut_window()
    t.drain()
    owner.lent["flags"] = fastpath.OWN_F_SELF  # C saw the guest update unasked: it is not asked at once
    now = t.core.now + CREDIT_REQUEST_DELAY * 2
    owner.steps = 3  # C took updates meanwhile: the window was not shut all along
    t.core.tick(now)
    assert conn.own == 0 and Op.CREDIT_REQUEST not in [h.op for h, _ in t.drain()]
    t.core.tick(now + CREDIT_REQUEST_DELAY * 2)  # nothing since: taken back and asked
    assert conn.own == -1 and [h.op for h, _ in t.drain()] == [Op.CREDIT_REQUEST]


def test_guest_reset_of_a_lent_connection_folds_its_counts_and_closes() -> None:
    t, owner, conn = shut_window()
    owner.back = OwnedBack(fastpath.OWN_TAKEN, 0, 7000, 3000, 3000, 0, 2, 4, 4000)
    t.send(Op.RST)
    assert not t.core.conns and t.peer.closed is True and t.core.owned == 0
    assert t.core.counters.pump_updates == 2 and conn.stats[3] == 3000 + 4000


def test_counters_follow_the_c_pump_while_it_keeps_the_connection() -> None:
    t, owner, conn = shut_window()
    owner.pending = (5, 10, 10000)
    before = t.core.counters.rx_bytes
    t.core.sync_owned()
    assert conn.own == 0 and t.core.counters.rx_bytes == before + 10000 and t.core.counters.pump_updates == 5
    t.core.sync_owned()
    assert t.core.counters.rx_bytes == before + 10000  # folded once


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
        def send() -> None:
            host.sendall(data)
            host.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
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
