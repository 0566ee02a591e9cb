"""vsproxy as a real process, driven by the simulated guest over its vhost-user socket,
with real unix and TCP sockets on the host side."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
from helpers import VsproxyProcess, echo_many, hybrid_connect, tcp_server, unix_server, wait_for

from vsproxy.simguest import SimGuest
from vsproxy.vhost_user import codec
from vsproxy.vsock import header as H

Start = Callable[..., VsproxyProcess]
MiB = 1 << 20


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_guest_to_host_unix_1mib_hash_checked(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    sink = unix_server(f"{uds}_5000", sink=True)
    data = os.urandom(MiB)
    with SimGuest(vp.socket_path) as g:
        s = g.connect(5000)
        s.sendall(data)
        s.shutdown_write()
        assert s.recv_all(timeout=10) == b""  # the sink closes after EOF: SHUTDOWN SEND reaches us
        s.close()
    wait_for(lambda: len(sink.received) == 1, what="sink to finish")
    assert sha(sink.received[0]) == sha(data)
    sink.close()


def test_host_to_guest_via_hybrid_connect_1mib_hash_checked(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    data = os.urandom(MiB)
    with SimGuest(vp.socket_path) as g:
        lst = g.listen(6000)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.connect(uds)
        # data pipelined right behind the CONNECT line must not be lost
        host.sendall(b"CONNECT 6000\n" + data[:100])
        gs = lst.accept(timeout=10)
        line = host.recv(64)
        assert line.startswith(b"OK ") and line.endswith(b"\n") and int(line[3:]) >= 1 << 30
        def send_rest() -> None:
            host.sendall(data[100:])
            host.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_rest)
        sender.start()
        got = gs.recv_all(timeout=20)
        sender.join()
        assert sha(got) == sha(data)
        gs.sendall(b"thanks")
        gs.close()
        assert host.recv(64) == b"thanks"
        host.close()


def test_hybrid_connect_to_port_without_guest_listener_closes_socket(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with SimGuest(vp.socket_path) as g, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.settimeout(10)
        host.connect(uds)
        host.sendall(b"CONNECT 4444\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            g.poll(0.05)
            host.settimeout(0.05)
            try:
                assert host.recv(64) == b""  # closed, no OK line
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("hybrid socket not closed")


@pytest.mark.parametrize("line", [b"CONNECT x\n", b"HELLO 5\n", b"CONNECT 99999999999\n", b"A" * 100])
def test_bad_hybrid_handshake_is_closed_and_proxy_keeps_serving(start_vsproxy: Start, workdir: str,
                                                                  line: bytes) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
        host.settimeout(10)
        host.connect(uds)
        host.sendall(line)
        assert host.recv(64) == b""
    assert vp.proc.poll() is None


def test_fifty_concurrent_connections_each_echo_1mib(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    echo = unix_server(f"{uds}_5000")
    payloads = [os.urandom(MiB) for _ in range(50)]
    with SimGuest(vp.socket_path, timeout=30) as g:
        socks = [g.connect(5000) for _ in range(50)]
        got = echo_many(g, socks, payloads, timeout=120)
        for s in socks:
            s.close()
    assert [sha(x) for x in got] == [sha(p) for p in payloads]
    assert echo.errors == []
    echo.close()


def test_half_close_guest_shut_wr_then_host_answers(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{uds}_5000")
    srv.listen()
    answers: list[bytes] = []

    def serve() -> None:
        c, _ = srv.accept()
        c.settimeout(10)
        req = bytearray()
        while chunk := c.recv(4096):  # reads to EOF: only a half-close gets us past this
            req += chunk
        answers.append(bytes(req))
        c.sendall(b"answer:" + bytes(req))
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    with SimGuest(vp.socket_path) as g:
        s = g.connect(5000)
        s.sendall(b"question")
        s.shutdown_write()
        assert s.recv_all(timeout=10) == b"answer:question"
        s.close()
    t.join(10)
    srv.close()
    assert answers == [b"question"]


def test_refused_connect_gives_rst(start_vsproxy: Start, workdir: str) -> None:
    vp = start_vsproxy("--uds-path", os.path.join(workdir, "v.sock"))
    with SimGuest(vp.socket_path) as g:
        with pytest.raises(ConnectionResetError):
            g.connect(7777)  # no PATH_7777
        with pytest.raises(ConnectionResetError):
            g.connect(80, cid=9)  # no route to CID 9


def test_stalled_host_reader_does_not_block_other_connections(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    stall = threading.Event()
    stall.set()
    stalled = unix_server(f"{uds}_5000", sink=True, stall=stall)
    echo = unix_server(f"{uds}_5001")
    with SimGuest(vp.socket_path) as g:
        slow = g.connect(5000)
        # Fill the stalled connection's window: the host socket buffer fills, then vsproxy's
        # buffer, and the guest runs out of credit on this connection only.
        blob = os.urandom(8 * MiB)
        sent = 0
        deadline = time.monotonic() + 30
        while sent < len(blob) and time.monotonic() < deadline:
            n = min(slow.conn.peer_free(), 65536, len(blob) - sent)
            if n:
                slow.sendall(blob[sent : sent + n])
                sent += n
            else:
                g.poll(0.05)
                if not slow.conn.peer_free():
                    break
        assert slow.conn.peer_free() == 0
        fast = g.connect(5001)
        payload = os.urandom(MiB)
        assert echo_many(g, [fast], [payload]) == [payload]
        report = vp.report()
        assert "conns=2" in report
        # Let the stalled reader go: everything sent arrives intact.
        stall.clear()
        while sent < len(blob):
            n = min(len(blob) - sent, 65536)
            slow.sendall(blob[sent : sent + n])
            sent += n
        slow.shutdown_write()
        slow.close()
    wait_for(lambda: len(stalled.received) == 1, what="stalled sink")
    got = stalled.received[0]
    first_diff = next((i for i in range(min(len(got), len(blob))) if got[i] != blob[i]), None)
    assert (len(got), first_diff) == (len(blob), None)
    assert sha(got) == sha(blob)
    stalled.close()
    echo.close()


def test_tcp_forward_and_tcp_listen(start_vsproxy: Start) -> None:
    echo = tcp_server()
    port = echo.sock.getsockname()[1]
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    listen_port = lsock.getsockname()[1]
    lsock.close()
    vp = start_vsproxy("--forward", f"5000=tcp:127.0.0.1:{port}", "--listen", f"tcp:127.0.0.1:{listen_port}=6000")
    data = os.urandom(MiB)
    with SimGuest(vp.socket_path) as g:
        s = g.connect(5000)
        assert echo_many(g, [s], [data]) == [data]
        s.close()
        with pytest.raises(ConnectionResetError):
            g.connect(5001)  # no forward, no uds path
        lst = g.listen(6000)
        host = socket.create_connection(("127.0.0.1", listen_port), timeout=10)
        gs = lst.accept(timeout=10)
        host.sendall(b"over tcp")
        assert gs.recv_exactly(8, timeout=10) == b"over tcp"
        gs.sendall(b"back")
        assert host.recv(16) == b"back"
        host.close()
        assert gs.recv_all(timeout=10) == b""
        gs.close()
    echo.close()


def test_tcp_forward_to_closed_port_gives_rst(start_vsproxy: Start) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    vp = start_vsproxy("--forward", f"5000=tcp:127.0.0.1:{port}")
    with SimGuest(vp.socket_path) as g, pytest.raises(ConnectionResetError):
        g.connect(5000)


def test_front_end_disconnect_resets_tcp_peers_and_next_front_end_works(start_vsproxy: Start) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    vp = start_vsproxy("--forward", f"5000=tcp:127.0.0.1:{port}")
    g = SimGuest(vp.socket_path)
    g.start()
    s = g.connect(5000)
    s.sendall(b"partial stream")
    peer, _ = srv.accept()
    peer.settimeout(10)
    assert peer.recv(64) == b"partial stream"
    g.close()  # QEMU exits
    with pytest.raises(ConnectionResetError):
        while peer.recv(64):
            pass
    peer.close()
    # A restarted VM attaches to the same vsproxy.
    with SimGuest(vp.socket_path) as g2:
        s2 = g2.connect(5000)
        peer2, _ = srv.accept()
        s2.sendall(b"again")
        peer2.settimeout(10)
        assert peer2.recv(64) == b"again"
        peer2.close()
    srv.close()


@pytest.mark.parametrize(
    "options",
    [
        {"ring_size": 1024, "regions": 2},  # microvm / nitro-enclave layout
        {"version_1": False, "ring_size": 1024, "regions": 2},  # legacy virtio-mmio
        {"qemu10": True},  # need_reply on SET_VRING_ENABLE
        {"event_idx": False, "indirect": False},
        {"rx_buf_size": 64 * 1024 + 44},
    ],
    ids=["mmio-2-regions", "legacy", "qemu10-need-reply", "no-event-idx-no-indirect", "big-rx-buffers"],
)
def test_transport_variants_carry_1mib_echo(start_vsproxy: Start, workdir: str, options: dict[str, object]) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    echo = unix_server(f"{uds}_5000")
    data = os.urandom(MiB)
    with SimGuest(vp.socket_path, **options) as g:  # type: ignore[arg-type]
        s = g.connect(5000)
        assert echo_many(g, [s], [data]) == [data]
        s.close()
    echo.close()


def test_guest_reboot_restarts_rings_on_same_front_end(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    echo = unix_server(f"{uds}_5000")
    with SimGuest(vp.socket_path) as g:
        s = g.connect(5000)
        assert echo_many(g, [s], [b"before reboot"]) == [b"before reboot"]
        g.restart()  # GET_VRING_BASE, new rings, same vhost-user connection
        s = g.connect(5000)
        assert echo_many(g, [s], [b"after reboot"]) == [b"after reboot"]
    echo.close()


def test_spoofed_packets_are_dropped_and_counted(start_vsproxy: Start, workdir: str) -> None:
    vp = start_vsproxy("--uds-path", os.path.join(workdir, "v.sock"))
    with SimGuest(vp.socket_path) as g:
        hdr = H.pack(9, 2, 1234, 5000, 0, H.Type.STREAM, H.Op.REQUEST, 0, 65536, 0)
        g.send_raw(hdr)
        for _ in range(20):
            g.poll(0.01)
        assert not [h for h, _ in g.received_raw if h.dst_port == 1234]
        assert "spoofed=1" in vp.report()


def test_guest_sending_beyond_credit_gets_rst(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds, "--tx-buffer-size", "8192")
    stall = threading.Event()
    stall.set()
    sink = unix_server(f"{uds}_5000", sink=True, stall=stall)
    with SimGuest(vp.socket_path) as g:
        s = g.connect(5000)
        port = s.local_port
        # Use up the window honestly: the host reader is stalled, so its socket buffer fills
        # and then vsproxy's 8 KiB; the guest ends with no credit.
        deadline = time.monotonic() + 30
        quiet_since = None
        while time.monotonic() < deadline:
            free = s.conn.peer_free()
            if free:
                s.sendall(b"y" * min(free, 65536))
                quiet_since = None
                continue
            g.poll(0.05)
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 0.5:
                break  # no credit for half a second: vsproxy's buffer is full too
        assert s.conn.peer_free() == 0
        hdr = H.pack(g.guest_cid, 2, port, 5000, 4096, 1, H.Op.RW, 0, 262144, s.conn.fwd_cnt)
        for _ in range(4):  # 16 KiB past an 8 KiB window, whatever update may be in flight
            g.send_raw(hdr, b"x" * 4096)
        for _ in range(100):
            g.poll(0.02)
            if any(h.op == H.Op.RST and h.dst_port == port for h, _ in g.received_raw):
                break
        else:
            seen = [(H.Op(h.op).name, h.flags) for h, _ in g.received_raw if h.dst_port == port][-10:]
            pytest.fail(f"no RST for a credit violation: guest saw {seen}; {vp.report()}")
        assert "credit_violations=1" in vp.report()
    stall.clear()
    sink.close()


def _ended(s: socket.socket) -> bool:
    """The session was ended by vsproxy: EOF, or a reset if it closed with our junk unread."""
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def _raw_front_end(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


@pytest.mark.parametrize(
    "bad",
    [
        codec.encode(codec.Request.SET_FEATURES, b"\x01\x02"),  # wrong size
        codec.encode(codec.Request.SET_VRING_NUM, codec.encode_vring_state(0, 100)),  # not a power of two
        codec.encode(codec.Request.SET_OWNER) + b"junk" * 10,  # garbage after a message
        struct.pack("<III", 1, 0x5, 0),  # version bits wrong
        codec.encode(codec.Request.SET_VRING_KICK, struct.pack("<Q", 0)),  # kick with no fd
    ],
)
def test_bad_front_end_ends_session_and_vsproxy_keeps_serving(start_vsproxy: Start, bad: bytes) -> None:
    vp = start_vsproxy()
    with _raw_front_end(vp.socket_path) as s:
        s.sendall(bad)
        assert _ended(s)
    with SimGuest(vp.socket_path) as g:
        assert g.guest_cid == 5
    assert vp.proc.poll() is None
    assert "protocol error" in vp.log() or "front-end session ended" in vp.log()


def test_memory_region_larger_than_its_fd_ends_session(start_vsproxy: Start) -> None:
    vp = start_vsproxy()
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    table = codec.encode_mem_table([codec.MemRegion(0, 1 << 20, 0x7F0000000000, 0)])
    with _raw_front_end(vp.socket_path) as s:
        socket.send_fds(s, [codec.encode(codec.Request.SET_MEM_TABLE, table)], [fd])
        os.close(fd)
        assert s.recv(64) == b""
    assert "exceeds its fd" in vp.log()


def test_ring_outside_guest_memory_ends_session(start_vsproxy: Start) -> None:
    vp = start_vsproxy()
    with _raw_front_end(vp.socket_path) as s:
        _send_ring_outside_memory(s)
        assert s.recv(64) == b""
    assert "outside guest memory" in vp.log()


def _send_ring_outside_memory(s: socket.socket) -> None:
    fd = os.memfd_create("ram")
    os.ftruncate(fd, 1 << 20)
    U64 = struct.Struct("<Q")
    s.sendall(codec.encode(codec.Request.SET_FEATURES, U64.pack(1 << 30)))
    s.sendall(codec.encode(codec.Request.SET_PROTOCOL_FEATURES, U64.pack(0)))
    table = codec.encode_mem_table([codec.MemRegion(0, 1 << 20, 0x7F0000000000, 0)])
    socket.send_fds(s, [codec.encode(codec.Request.SET_MEM_TABLE, table)], [fd])
    s.sendall(codec.encode(codec.Request.SET_VRING_NUM, codec.encode_vring_state(0, 128)))
    addr = codec.VringAddr(0, 0, 0x7F0000000000, 0x7F0000000000 + (2 << 20), 0x7F0000000000 + 4096, 0)
    s.sendall(codec.encode(codec.Request.SET_VRING_ADDR, codec.encode_vring_addr(addr)))
    efd = os.eventfd(0)
    socket.send_fds(s, [codec.encode(codec.Request.SET_VRING_KICK, U64.pack(0))], [efd])
    s.sendall(codec.encode(codec.Request.SET_VRING_ENABLE, codec.encode_vring_state(0, 1)))
    os.close(efd)
    os.close(fd)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_guest_posting_no_rx_buffers_pauses_host_reads_without_spinning(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    data = os.urandom(4 * MiB)
    # A guest window larger than its posted buffers (128 x 3776 bytes): the ring runs dry first.
    with SimGuest(vp.socket_path, buf_alloc=2 * MiB) as g:
        host, gs = hybrid_connect(uds, g, 6000)
        g.driver.pause_rx()
        host.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sent < len(data):  # until every buffer is full
            try:
                sent += host.send(data[sent : sent + 65536])
            except BlockingIOError:
                g.poll(0.05)
        # The rx ring is empty and the host keeps data waiting: vsproxy must sleep, not spin.
        before = _cpu_seconds(vp.proc.pid)
        time.sleep(1.0)
        spent = _cpu_seconds(vp.proc.pid) - before
        assert spent < 0.2, f"vsproxy used {spent:.2f} s of CPU in 1 s while the guest posted no buffers"
        g.driver.resume_rx()
        got = bytearray()
        host.setblocking(True)
        sender = threading.Thread(target=lambda: host.sendall(data[sent:]))
        sender.start()
        while len(got) < len(data):
            got += gs.recv(1 << 20, timeout=10)
        sender.join()
        assert sha(bytes(got)) == sha(data)
        host.close()
