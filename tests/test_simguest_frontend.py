"""SimGuest against the in-package fake backend: vhost-user sequence, fds, memory, rings, vsock behaviour."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vsproxy.simguest import (
    BackendClosed,
    ReplyTimeout,
    SimGuest,
    SimGuestTimeout,
)
from vsproxy.simguest.fake_backend import EchoHost, FakeBackend, start_pair
from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import Request as R
from vsproxy.vsock import header as vh
from vsproxy.vsock.header import Op

Make = Callable[..., tuple[SimGuest, FakeBackend]]

REALIZE = ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_OWNER",
           "GET_FEATURES", "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR", "GET_CONFIG"]
DRIVER_START = ["SET_VRING_CALL", "SET_VRING_CALL", "SET_FEATURES", "SET_MEM_TABLE",
                "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                "SET_VRING_ENABLE", "SET_VRING_ENABLE", "SET_VRING_CALL", "SET_VRING_CALL"]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[tuple[SimGuest, FakeBackend, threading.Thread, str]] = []

    def _make(backend: dict[str, Any] | None = None, start: bool = True, **guest: Any) -> tuple[SimGuest, FakeBackend]:
        path, be, t, tmp = start_pair(**(backend or {}))
        guest.setdefault("timeout", 2.0)
        guest.setdefault("mem_size", 8 << 20)
        g = SimGuest(path, **guest)
        made.append((g, be, t, tmp))
        if start:
            g.start()
        return g, be

    yield _make
    for g, be, t, tmp in made:
        g.close()
        be.stop()
        t.join(5)
        shutil.rmtree(tmp)
        assert be.error is None


def eventually(pred: Callable[[], bool], what: str = "condition") -> None:
    """The fake backend runs in a thread: give it up to 2 s to catch up."""
    for _ in range(200):
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} never became true")


def names(be: FakeBackend) -> list[str]:
    return [R(m.request).name for m, _ in be.log]


def test_message_sequence_fds_and_reply_flags(make: Make) -> None:
    g, be = make()
    g.connect(5000).close()
    eventually(lambda: len(be.log) >= len(REALIZE + DRIVER_START))
    assert names(be) == REALIZE + DRIVER_START
    assert g.guest_cid == 3
    for m, nfds in be.log:
        fd_msg = m.request in (R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_KICK, R.SET_MEM_TABLE)
        assert nfds == (1 if fd_msg else 0), R(m.request).name
        assert m.need_reply == (m.request == R.SET_MEM_TABLE), R(m.request).name  # QEMU 7.2
    acked = next(codec.decode_u64(m) for m, _ in be.log if m.request == R.SET_FEATURES)
    assert acked >> 30 & 1 and acked >> 32 & 1 and acked >> 29 & 1 and acked >> 28 & 1
    assert g.sent_messages[0].name == "GET_FEATURES"


def test_qemu10_reply_ack_on_enable(make: Make) -> None:
    g, be = make(qemu10=True)
    g.connect(5000).close()
    eventually(lambda: len(be.log) >= len(REALIZE + DRIVER_START))
    enables = [m for m, _ in be.log if m.request == R.SET_VRING_ENABLE]
    assert len(enables) == 2 and all(m.flags == 0x9 for m in enables)
    g.stop_rings()  # waits for every ack
    assert [m.flags for m, _ in be.log if m.request == R.SET_VRING_ENABLE][2:] == [0x9, 0x9]


def test_qemu10_without_reply_ack_uses_get_features_barrier(make: Make) -> None:
    g, be = make(qemu10=True, reply_ack=False)
    g.connect(5000).close()
    eventually(lambda: len(be.log) >= len(REALIZE + DRIVER_START) + 2)
    seq = names(be)
    i = seq.index("SET_VRING_ENABLE")
    assert seq[i : i + 4] == ["SET_VRING_ENABLE", "GET_FEATURES", "SET_VRING_ENABLE", "GET_FEATURES"]
    assert not any(m.need_reply for m, _ in be.log)


def test_legacy_mmio_two_regions_1024_ring(make: Make) -> None:
    g, be = make(version_1=False, regions=2, ring_size=1024)
    s = g.connect(5000)
    s.sendall(b"ping")
    assert s.recv_exactly(4) == b"ping"
    acked = next(codec.decode_u64(m) for m, _ in be.log if m.request == R.SET_FEATURES)
    assert not acked >> 32 & 1 and acked >> 30 & 1
    regions = [r for m, n in be.log if m.request == R.SET_MEM_TABLE for r in codec.decode_mem_table(m)]
    assert [r.mmap_offset for r in regions] == [0, 0x100000]
    assert [n for m, n in be.log if m.request == R.SET_MEM_TABLE] == [2]
    # The backend's view of guest memory (through its own mmap of the passed fds) is the guest's.
    rx = g.rings[0]
    assert bytes(be.gpa(rx.desc_gpa, 64)) == g.mem.read(rx.desc_gpa, 64)
    addr = be.queues[1].addr
    assert addr is not None and addr.desc == g.mem.uva(g.rings[1].desc_gpa) != g.rings[1].desc_gpa
    assert {g.mem.offset(a) >= 0x100000 for a in g.driver.rx_gpas} == {False, True}  # rx buffers in both regions


def test_rx_buffers_posted_one_writable_descriptor_each(make: Make) -> None:
    g, be = make(backend={"host": EchoHost(echo=False)}, ring_size=128, rx_buf_size=3776)
    g.connect(5000)  # the backend has the rings now; the RESPONSE buffer was reposted
    be.queues[0].enabled = False  # keep the backend thread's hands off while the test pops
    chains = []
    while (c := be.pop(0)) is not None:
        chains.append(c)
    assert len(chains) == 128
    assert all(len(b) == 1 and b[0][1] == 3776 and b[0][2] == 2 for _, b in chains)  # VRING_DESC_F_WRITE
    assert len({b[0][0] for _, b in chains}) == 128


def test_tx_chains_are_indirect_header_plus_payload(make: Make) -> None:
    seen: list[tuple[int, int, int]] = []
    g, be = make(backend={"host": EchoHost(echo=False)})
    s = g.connect(5000)
    be.queues[1].enabled = False  # the test plays the device for a moment
    s.sendall(b"x" * 100)
    head, bufs = _pop_wait(be, 1)
    seen = bufs
    assert [(n, f) for _, n, f in seen] == [(44, 1), (100, 0)]
    _dq, view, od, _, _ = be._ring(1)
    flags = int.from_bytes(view[od + 16 * head + 12 : od + 16 * head + 14], "little")
    assert flags == 4  # INDIRECT
    be.push_used(1, head, 0)
    be.queues[1].enabled = True
    be.notify(1)


def _pop_wait(be: FakeBackend, q: int) -> tuple[int, list[tuple[int, int, int]]]:
    for _ in range(100):
        c = be.pop(q)
        if c is not None:
            return c
        threading.Event().wait(0.01)
    raise AssertionError("nothing on the ring")


def test_echo_connect_refuse_close(make: Make) -> None:
    host = EchoHost(refuse=frozenset({6000}))
    g, _be = make(backend={"host": host})
    with pytest.raises(ConnectionResetError):
        g.connect(6000)
    s = g.connect(5000)
    assert s.local_port > 1023
    data = bytes(range(256)) * 400  # > 64 KiB: split into several RW packets
    s.sendall(data)
    assert s.recv_exactly(len(data)) == data
    assert s.close() is True
    ops = [(h.op, h.flags) for h in host.packets if h.src_port == s.local_port]
    assert ops[0] == (Op.REQUEST, 0) and ops[-1] == (Op.SHUTDOWN, 3)
    assert max(h.len for h in host.packets) == 65536
    assert g.stats.protocol_errors == [] and g.stats.credit_violations == 0
    assert g.stats.tx_bytes == len(data) and g.stats.rx_bytes == len(data)


def test_listen_accept_and_rst_for_unknown(make: Make) -> None:
    g, be = make()
    lst = g.listen(1234)
    be.to_guest(vh.pack(2, 3, 4000, 1234, 0, 1, Op.REQUEST, 0, 262144, 0))
    c = lst.accept()
    assert c.peer == (2, 4000)
    be.to_guest(vh.pack(2, 3, 4000, 1234, 5, 1, Op.RW, 0, 262144, 0), b"hello")
    assert c.recv() == b"hello"
    be.to_guest(vh.pack(2, 3, 4001, 4321, 0, 1, Op.REQUEST, 0, 262144, 0))  # nobody listens
    be.to_guest(vh.pack(2, 3, 4002, 1234, 3, 1, Op.RW, 0, 262144, 0), b"abc")  # unknown connection
    be.to_guest(vh.pack(2, 3, 4000, 1234, 0, 1, Op.CREDIT_REQUEST, 0, 262144, 0))
    be.to_guest(vh.pack(2, 3, 4000, 1234, 0, 1, Op.SHUTDOWN, 2, 262144, 0))
    assert c.recv() == b""  # EOF after SHUTDOWN SEND
    assert g.stats.rst_sent == 2 and g.stats.credit_updates_sent == 1
    want = {(4001, Op.RST), (4002, Op.RST), (4000, Op.RESPONSE), (4000, Op.CREDIT_UPDATE)}
    eventually(lambda: want <= {(h.dst_port, h.op) for h in be.host.packets})  # type: ignore[attr-defined]


def test_sender_respects_small_peer_credit(make: Make) -> None:
    host = EchoHost(echo=False, keep=True, buf_alloc=4096)
    g, be = make(backend={"host": host})
    be.on_idle = host.credit_all
    s = g.connect(5000)
    data = bytes(range(256)) * 100
    s.sendall(data)
    g.driver.deadline_wait(lambda: g.rings[1].n_inflight == 0, None, "tx drain")
    be.stop()  # no more packets while we look
    assert bytes(next(iter(host.conns.values())).received) == data
    assert max(h.len for h in host.packets) <= 4096


def test_credit_stall_times_out_and_can_request(make: Make) -> None:
    requests: list[int] = []

    def stingy(be: FakeBackend, h: vh.Header, _payload: memoryview) -> None:
        """buf_alloc 1000 and never consumes: the guest must stop at 1000 bytes in flight."""
        op = {Op.REQUEST: Op.RESPONSE, Op.CREDIT_REQUEST: Op.CREDIT_UPDATE}.get(Op(h.op))
        if h.op == Op.CREDIT_REQUEST:
            requests.append(h.src_port)
        if op is not None:
            be.to_guest(vh.pack(2, h.src_cid, h.dst_port, h.src_port, 0, 1, op, 0, 1000, 0))

    g, _be = make(backend={"host": stingy}, credit_request=True, timeout=0.3)
    s = g.connect(5000)
    with pytest.raises(SimGuestTimeout, match="credit"):
        s.sendall(b"y" * 5000)
    assert g.stats.credit_requests_sent == 1 and requests == [s.local_port]
    assert s.conn.tx_cnt == 1000 and s.conn.peer_free() == 0


def test_drain_host_to_guest_with_credit_updates(make: Make) -> None:
    host = EchoHost(echo=False)
    g, be = make(backend={"host": host})
    be.on_idle = host.pump
    s = g.connect(5000)
    next(iter(host.conns.values())).to_send = 2_000_000
    check = bytearray()
    n = s.drain(2_000_000, lambda v: check.extend(v[:1]) if len(check) < 1 else None)
    assert n == 2_000_000 and check == b"\x00"
    assert g.stats.credit_updates_sent >= 2_000_000 // 262144 - 1
    assert g.stats.credit_violations == 0 and g.stats.protocol_errors == []


def test_blast_counts_used_packets(make: Make) -> None:
    g, be = make(backend={"host": EchoHost(echo=False, buf_alloc=vh.U32)})
    s = g.connect(5000)
    s.blast(b"z" * 64, 1000)
    assert be.tx_packets == 1001 and g.stats.tx_packets == 1001 and g.stats.tx_bytes == 64000


def test_credit_violation_by_peer_is_detected(make: Make) -> None:
    g, _be = make(buf_alloc=4096)
    s = g.connect(5000)
    s.sendall(b"a" * 4000)  # echoed back: fits
    s.sendall(b"b" * 4000)  # echoed without waiting for the guest to read: exceeds 4096
    g.driver.deadline_wait(lambda: g.stats.credit_violations > 0, 1.0, "violation")
    assert "exceeded guest credit" in g.stats.protocol_errors[0]


def test_stop_rings_and_restart(make: Make) -> None:
    g, be = make()
    g.connect(5000).close()
    avail_tx = g.rings[1].avail_idx
    rx_desc = g.rings[0].desc_gpa
    bases = g.stop_rings()
    assert bases == [g.rings[0].last_used, avail_tx]  # rx: buffers the backend filled; tx: all consumed
    g.restart()
    assert g.rings[0].desc_gpa != rx_desc
    s = g.connect(5001)
    s.sendall(b"again")
    assert s.recv_exactly(5) == b"again"
    eventually(lambda: len(be.log) >= 2 * len(REALIZE + DRIVER_START) - len(REALIZE) + 6)
    tail = names(be)[len(REALIZE + DRIVER_START) :]
    assert tail[:4] == ["SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE", "GET_VRING_BASE"]
    assert tail[6:] == DRIVER_START


def test_send_raw_spoofed_packet_reaches_backend(make: Make) -> None:
    host = EchoHost()
    g, _be = make(backend={"host": host})
    g.send_raw(vh.pack(99, 2, 1, 2, 0, 1, Op.REQUEST, 0, 0, 0))
    g.driver.deadline_wait(lambda: any(h.src_cid == 99 for h in host.packets), None, "raw packet")
    g.driver.deadline_wait(lambda: bool(g.received_raw), None, "RESPONSE")
    assert g.received_raw[0][0].op == Op.RESPONSE


def test_reply_timeout_is_typed(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    g = SimGuest(path, timeout=0.2, mem_size=4 << 20)
    try:
        with pytest.raises(ReplyTimeout, match="GET_FEATURES"):
            g.start()
    finally:
        g.close()
        srv.close()


def test_backend_gone_is_typed(make: Make) -> None:
    g, be = make()
    be.stop()
    eventually(lambda: be.sock.fileno() == -1, "backend exit")
    with pytest.raises(BackendClosed):
        g.connect(5000)
    tmp = tempfile.mkdtemp()
    try:
        with pytest.raises(BackendClosed):
            SimGuest(tmp + "/nothing", mem_size=4 << 20).start()
    finally:
        shutil.rmtree(tmp)


def test_selfbench_measures_both_directions_against_the_null_backend(capsys: pytest.CaptureFixture[str]) -> None:
    """The null backend never returns credit: the guest's own window must cover the transfer, or
    the blast stalls (it did, once guests capped credit at their own buf_alloc)."""
    from vsproxy.simguest import selfbench

    selfbench.main(["--count", "20000", "--rx-mib", "4"])
    out = capsys.readouterr().out
    assert "guest->host blast: 20000 x 64 B" in out
    assert "host->guest drain: 4194304 B" in out
