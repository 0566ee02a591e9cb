"""The simulated guest's C bulk sender (cblast) against its reference, the Python blast: same
bytes delivered through vsproxy, same guest accounting, rings left as the Python driver expects,
and anything but the connection's CREDIT_UPDATEs handed back to Python mid-blast."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from helpers import VsproxyProcess, unix_server, wait_for

from vsproxy.simguest import GuestSocket, SimGuest, cblast
from vsproxy.vsock import header as H

pytestmark = pytest.mark.c_paths

Start = Callable[..., VsproxyProcess]


def test_the_c_sender_is_built() -> None:
    assert cblast.AVAILABLE, "vsproxy.simguest._cblast was not built: the benchmark's guest would be Python"


@pytest.mark.parametrize("use_c", [True, False])
def test_blast_through_vsproxy_delivers_every_byte_and_leaves_the_rings_usable(
    start_vsproxy: Start, workdir: str, use_c: bool
) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    sink = unix_server(f"{uds}_5000", sink=True)
    payload = bytes(range(256)) * 64  # 16 KiB
    with SimGuest(vp.socket_path, buf_alloc=65536) as g:  # a small window: many credit round trips
        g.driver.use_c_blast = use_c
        s = g.connect(5000)
        g.stats.tx_packets = g.stats.tx_bytes = 0
        s.blast(payload, 400)
        assert (g.stats.tx_packets, g.stats.tx_bytes) == (400, 400 * len(payload))
        assert g.driver.tx.n_inflight == 0 and len(g.driver.tx.free) == g.driver.tx.size
        assert g.stats.protocol_errors == []
        if use_c:  # the credit updates C took are recorded as the Python driver records them
            assert any(h.op == H.Op.CREDIT_UPDATE and h.dst_port == s.local_port for h, _ in g.received_raw)
        s.sendall(b"after")  # the Python path goes on from the state C left
        s.shutdown_write()
        assert s.recv_all(timeout=10) == b""
        s.close()
    wait_for(lambda: len(sink.received) == 1, what="sink to finish")
    assert sink.received[0] == payload * 400 + b"after"
    sink.close()


def test_other_traffic_during_a_c_blast_goes_to_the_python_driver(start_vsproxy: Start, workdir: str) -> None:
    """Host data for a second connection arrives mid-blast: C stops at it, Python delivers it,
    and the blast goes on to the end."""
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    sink = unix_server(f"{uds}_5000", sink=True)
    with SimGuest(vp.socket_path, buf_alloc=65536) as g:
        lst = g.listen(7000)
        got: list[bytes] = []

        def host_side() -> None:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(uds)
            c.sendall(b"CONNECT 7000\n")
            assert c.recv(64).startswith(b"OK ")
            wait_for(lambda: g.stats.tx_packets > 200, what="the blast to be under way")
            for _ in range(50):
                c.sendall(b"m" * 1000)
            c.close()

        s = g.connect(5000)
        t = threading.Thread(target=host_side)
        t.start()
        other = lst.accept(timeout=10)
        assert g.driver._cblast is None or g.driver._cblast.handed_back == 0
        s.blast(b"x" * 4096, 20000)
        assert g.driver._cblast is not None and g.driver._cblast.handed_back > 0  # C stopped at it
        got.append(other.recv_exactly(50_000, timeout=10))
        t.join(10)
        assert got == [b"m" * 50_000]
        assert g.stats.protocol_errors == []
        s.close()
        other.close()
    wait_for(lambda: len(sink.received) == 1, what="sink to finish")
    assert len(sink.received[0]) == 20000 * 4096
    sink.close()


@pytest.fixture
def host_socks() -> Iterator[list[socket.socket]]:
    """Host sockets of a test, closed whatever the test did."""
    socks: list[socket.socket] = []
    yield socks
    for c in socks:
        c.close()


def _hybrid(uds: str, port: int, g: SimGuest, socks: list[socket.socket]) -> tuple[socket.socket, GuestSocket]:
    """A host connection through the hybrid socket into guest port ``port``, accepted."""
    lst = g.listen(port)
    out: list[socket.socket] = []

    def connect() -> None:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(c)
        c.connect(uds)
        c.sendall(b"CONNECT %d\n" % port)
        assert c.recv(64).startswith(b"OK ")
        out.append(c)

    t = threading.Thread(target=connect)
    t.start()
    s = lst.accept(timeout=10)
    t.join(10)
    lst.close()
    return out[0], s


@pytest.mark.parametrize("use_c", [True, False])
def test_drain_through_vsproxy_takes_every_byte_and_returns_credit_as_linux_does(
    start_vsproxy: Start, workdir: str, use_c: bool, host_socks: list[socket.socket]
) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with SimGuest(vp.socket_path, buf_alloc=131072) as g:
        g.driver.use_c_blast = use_c
        host, s = _hybrid(uds, 6000, g, host_socks)
        total = 3 << 20
        t = threading.Thread(target=lambda: host.sendall(b"d" * total))
        t.start()
        before = g.stats.credit_updates_sent
        assert s.drain(total) == total
        # The host stalls without updates: at least one per 128 KiB window had to go out
        assert g.stats.credit_updates_sent - before >= total // 131072 - 1
        t.join(10)
        host.sendall(b"tail")
        assert s.recv_exactly(4, timeout=10) == b"tail"  # the Python path goes on from C's state
        assert g.stats.protocol_errors == [] and g.stats.credit_violations == 0
        if use_c:
            assert any(h.op == H.Op.RW and h.dst_port == 6000 for h, _ in g.received_raw)
        s.close()


def test_other_traffic_during_a_c_drain_goes_to_the_python_driver(
    start_vsproxy: Start, workdir: str, host_socks: list[socket.socket]
) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with SimGuest(vp.socket_path, buf_alloc=131072) as g:
        bulk, s = _hybrid(uds, 6000, g, host_socks)
        other_host, other = _hybrid(uds, 6001, g, host_socks)
        total = 8 << 20

        def feed() -> None:
            bulk.sendall(b"d" * (total // 2))
            other_host.sendall(b"o" * 10_000)  # mid-drain, for the other connection
            bulk.sendall(b"d" * (total // 2))

        t = threading.Thread(target=feed)
        t.start()
        assert s.drain(total) == total
        assert g.driver._cdrain is not None and g.driver._cdrain.handed_back > 0
        assert other.recv_exactly(10_000, timeout=10) == b"o" * 10_000
        t.join(10)
        assert g.stats.protocol_errors == []
        s.close()
        other.close()


@pytest.mark.parametrize("limit", [0, 3])
def test_a_c_drain_logs_only_the_packets_the_guest_keeps(start_vsproxy: Start, workdir: str, limit: int,
                                                         host_socks: list[socket.socket]) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with SimGuest(vp.socket_path, buf_alloc=131072, record_limit=limit) as g:
        host, s = _hybrid(uds, 6001, g, host_socks)
        t = threading.Thread(target=lambda: host.sendall(b"d" * 600_000))  # 161 packets of 3732 bytes
        t.start()
        assert s.drain(600_000) == 600_000
        t.join(10)
        log = list(g.received_raw)
        assert len(log) == limit
        assert all(h.op == H.Op.RW and h.dst_port == 6001 and n == h.len > 0 for h, n in log)
        assert g.stats.rx_bytes >= 600_000
        s.close()
