"""Faults injected into a running vsproxy (issue 18 item 4), each against a real process on
real unix sockets: the front-end killed mid-transfer, a host peer that resets, a host reader
that stops reading, a guest that posts no rx buffers, the hybrid socket file removed or
replaced, descriptors running out under a host client, a capture file that fails, SIGTERM
under heavy traffic. Each checks that only the faulty party is affected, that nothing else
loses a byte, and what vsproxy says about it.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import VsproxyProcess, hybrid_connect, wait_for
from test_exhaustion import NOFILE, Rig, close_all, flood_guest_connections, hold_listener, host_sink, stream_to_sink

from vsproxy.simguest import GuestSocket, SimGuest

MiB = 1 << 20


@pytest.fixture
def rigs(workdir: str) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(*extra: str, **kw: object) -> Rig:
        r = Rig(workdir, *extra, **kw)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        r.vp.stop()


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes where every 8-byte word is its own offset: a lost or moved byte shows."""
    words = (n + 7) // 8
    return b"".join((seed * (1 << 40) + i * 8).to_bytes(8, "little") for i in range(words))[:n]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closed_within(sock: socket.socket, seconds: float) -> str:
    """Read ``sock`` until vsproxy closes it: "eof" or "reset"; fails after ``seconds``."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        pass
    raise AssertionError(f"host socket still open after {seconds} s")


class Acceptor(threading.Thread):
    """A host unix listener that accepts one connection and hands it over."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        self.srv.settimeout(20)
        self.conn: socket.socket | None = None
        self.start()

    def run(self) -> None:
        self.conn, _ = self.srv.accept()

    def get(self) -> socket.socket:
        self.join(20)
        assert self.conn is not None, "no connection came"
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.srv.close()


# -- the front-end killed mid-transfer ------------------------------------------------------------
FRONTEND = """
import sys
from vsproxy.simguest import SimGuest
g = SimGuest(sys.argv[1], timeout=30, record_limit=0)
g.start()
lst = g.listen(7100)
out = g.connect(7000)   # streams to the host
idle = g.connect(7001)  # open, quiet
print("listening", flush=True)
inbound = lst.accept(timeout=30)  # a host program connected in through the hybrid socket
print("streaming", flush=True)
while True:
    out.blast(b"\\x5a" * 65536, 16)
"""


def test_a_frontend_killed_mid_transfer_closes_every_host_socket_and_the_next_frontend_works(
        rigs: Callable[..., Rig]) -> None:
    rig = rigs(nofile=None)
    streamed, quiet = Acceptor(f"{rig.ha}_7000"), Acceptor(f"{rig.ha}_7001")
    fe = subprocess.Popen([sys.executable, "-c", FRONTEND, rig.a_sock], stdout=subprocess.PIPE, text=True)
    inbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert fe.stdout is not None and fe.stdout.readline().strip() == "listening"
        inbound.settimeout(20)
        inbound.connect(rig.ha)
        inbound.sendall(b"CONNECT 7100\n")
        assert inbound.recv(64).startswith(b"OK ")
        assert fe.stdout.readline().strip() == "streaming"
        host = streamed.get()
        got = 0
        while got < 8 * MiB:  # mid-stream
            got += len(host.recv(1 << 20))
        os.kill(fe.pid, signal.SIGKILL)
        fe.wait(10)
        # every host socket of the device goes: the streaming one, the quiet one, the inbound one
        assert closed_within(host, 10) in ("eof", "reset")  # unix sockets have no RST: a reset reads as EOF
        assert closed_within(quiet.get(), 10) in ("eof", "reset")
        assert closed_within(inbound, 10) in ("eof", "reset")
        wait_for(lambda: "front-end session ended" in rig.vp.log(), what="the session's end logged")
        rig.alive()
        with SimGuest(rig.a_sock, timeout=15) as ga, host_sink(f"{rig.ha}_7002") as received:
            stream_to_sink(ga.connect(7002), os.urandom(4 * MiB), received)  # the next front-end works
        assert "Traceback" not in rig.vp.log()
    finally:
        if fe.poll() is None:
            fe.kill()
            fe.wait()
        if fe.stdout is not None:
            fe.stdout.close()
        inbound.close()
        streamed.close()
        quiet.close()


# -- a host peer that resets ----------------------------------------------------------------------
def test_a_host_peer_that_resets_mid_stream_resets_only_its_connection(rigs: Callable[..., Rig]) -> None:
    rig = rigs(nofile=None)
    resetting, steady = Acceptor(f"{rig.ha}_7200"), Acceptor(f"{rig.ha}_7201")
    try:
        with SimGuest(rig.a_sock, timeout=15) as ga:
            doomed = ga.connect(7200)
            other = ga.connect(7201)
            host, host2 = resetting.get(), steady.get()

            def read_then_reset() -> None:
                got = 0
                while got < MiB:
                    got += len(host.recv(65536))
                # A unix socket closed with bytes it never read resets its peer (vsproxy's reads
                # fail with ECONNRESET); closed with nothing unread it is an orderly close (the
                # guest gets SHUTDOWN 3, as from a kernel peer's close()). So: unread bytes first.
                select.select([host], [], [], 10)
                host.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                host.close()

            t = threading.Thread(target=read_then_reset)
            t.start()
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                doomed.sendall(os.urandom(16 * MiB))
            t.join(10)
            assert doomed.conn.reset  # the guest saw RST for it
            # the other connection of the same guest goes on, byte-exact
            data = pattern(4 * MiB, seed=1)
            reader = threading.Thread(target=lambda: got2.append(read_exactly(host2, len(data))))
            got2: list[bytes] = []
            reader.start()
            other.sendall(data)
            reader.join(20)
            assert got2 and got2[0] == data
            other.close(timeout=10)
        rig.alive()
    finally:
        resetting.close()
        steady.close()


def read_exactly(s: socket.socket, n: int) -> bytes:
    s.settimeout(20)
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(1 << 20, n - len(buf)))
        if not b:
            break
        buf += b
    return bytes(buf)


# -- a host reader that stops reading -------------------------------------------------------------
def fill_until_stalled(g: SimGuest, s: GuestSocket, data: bytes, quiet: float = 1.0) -> int:
    """Send ``data`` on ``s`` as far as credit lets it, until nothing moved for ``quiet`` s."""
    sent = 0
    last = time.monotonic()
    while sent < len(data) and time.monotonic() - last < quiet:
        g.poll(0.02)
        free = s.conn.peer_free()
        if free:
            n = min(free, 65536, len(data) - sent)
            s.sendall(data[sent:sent + n])
            sent += n
            last = time.monotonic()
    return sent


def test_a_host_reader_that_stops_reading_stalls_only_its_connection_with_memory_bounded(
        rigs: Callable[..., Rig]) -> None:
    rig = rigs(nofile=None)
    stalled = Acceptor(f"{rig.ha}_7300")
    try:
        with SimGuest(rig.a_sock, timeout=15) as ga:
            s = ga.connect(7300)
            host = stalled.get()  # accepted, never read
            rss0 = rig.vp.rss_kib()
            data = pattern(64 * MiB, seed=3)
            sent = fill_until_stalled(ga, s, data)
            rss1 = rig.vp.rss_kib()
            print(f"stalled after {sent / MiB:.1f} MiB (the host socket's buffer and one window); vsproxy RSS "
                  f"{rss0} -> {rss1} KiB (+{(rss1 - rss0) / 1024:.1f} MiB)")
            assert sent < 16 * MiB  # credit stopped the guest: nothing piles up without bound
            assert rss1 - rss0 < 24 * 1024
            with host_sink(f"{rig.ha}_7301") as received:  # another connection goes on meanwhile
                stream_to_sink(ga.connect(7301), os.urandom(8 * MiB), received)
            # the reader comes back: every byte sent so far arrives, in order, and the rest follows
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(read_exactly(host, 24 * MiB)))
            reader.start()
            s.sendall(data[sent:24 * MiB])
            reader.join(30)
            assert got and got[0] == data[:24 * MiB]
            s.close(timeout=10)
        rig.alive()
    finally:
        stalled.close()


# -- a guest that posts no rx buffers -------------------------------------------------------------
NORX_SECONDS = float(os.environ.get("VSPROXY_NORX_SECONDS", "3"))


def test_a_guest_that_posts_no_rx_buffers_pauses_host_reads_without_spinning(rigs: Callable[..., Rig]) -> None:
    rig = rigs(nofile=None)
    # a window far larger than the rx ring holds: what stops vsproxy is the ring, not credit
    with SimGuest(rig.a_sock, timeout=30, buf_alloc=64 * MiB) as ga:
        host, s = hybrid_connect(rig.ha, ga, 7400)
        ga.driver.pause_rx()  # from now on no buffer the guest gets back is posted again
        data = pattern(16 * MiB, seed=4)
        sender = threading.Thread(target=host.sendall, args=(data,))
        sender.start()
        for _ in range(50):
            ga.poll(0.02)  # the posted buffers fill and are not given back
        time.sleep(0.5)
        pid = rig.vp.proc.pid
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(NORX_SECONDS)
        used, wall = cpu_seconds(pid) - c0, time.monotonic() - t0
        print(f"vsproxy used {used:.3f} s of CPU in {wall:.1f} s with the guest's rx ring empty "
              f"({used / wall:.2%} of one CPU)")
        assert used <= 0.01 * wall + 0.05
        assert sender.is_alive()  # the host is held back (its socket buffer full), not dropped
        ga.driver.resume_rx()
        got = s.recv_exactly(len(data), timeout=60)
        sender.join(10)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        host.close()
    rig.alive()


# -- the hybrid (and vhost-user) socket file removed or replaced ---------------------------------------------------
def test_a_socket_file_removed_is_made_again_and_one_replaced_is_left_alone(
        rigs: Callable[..., Rig], workdir: str) -> None:
    rig = rigs(nofile=None)
    with SimGuest(rig.a_sock, timeout=15) as ga:
        os.unlink(rig.ha)  # a cleanup script removes it
        wait_for(lambda: os.path.exists(rig.ha), timeout=5, what="the hybrid socket file made again")
        assert "removed under vsproxy: listening there again" in rig.vp.log()
        host, s = hybrid_connect(rig.ha, ga, 7500)  # host programs reach the guest again
        host.sendall(b"after the removal")
        assert s.recv_exactly(17, timeout=10) == b"after the removal"
        # another program puts its own socket there (atomically, as listen_unix does)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = os.path.join(workdir, "other.tmp")
        other.bind(tmp)
        other.listen(1)
        os.rename(tmp, rig.ha)
        ident = os.stat(rig.ha).st_ino
        wait_for(lambda: "was replaced by another one" in rig.vp.log(), timeout=5, what="the replacement logged")
        time.sleep(1.5)
        assert rig.vp.log().count("was replaced by another one") == 1  # said once, not every second
        assert os.stat(rig.ha).st_ino == ident  # vsproxy left the other file alone
        host.sendall(b"the old connection")  # connections already made go on
        assert s.recv_exactly(18, timeout=10) == b"the old connection"
        host.close()
    os.unlink(rig.b_sock)  # the vhost-user socket too: the next QEMU finds it again
    wait_for(lambda: os.path.exists(rig.b_sock), timeout=5, what="the vhost-user socket made again")
    assert "B: vhost-user socket: the socket file was removed under vsproxy: listening there again" in rig.vp.log()
    with SimGuest(rig.b_sock, timeout=15) as gb, host_sink(f"{rig.hb}_7501") as received:
        stream_to_sink(gb.connect(7501), os.urandom(MiB), received)
    assert rig.vp.stop() == 0
    assert os.path.exists(rig.ha) and os.stat(rig.ha).st_ino == ident  # not removed at exit either
    assert "Traceback" not in rig.vp.log()
    other.close()


# -- descriptors running out under a host client --------------------------------------------------
def test_a_host_client_arriving_while_descriptors_are_out_waits_in_the_backlog_and_gets_through(
        rigs: Callable[..., Rig]) -> None:
    """test_exhaustion pins guest connects refused at EMFILE; this is the other way in: a host
    program connecting to B's hybrid socket while A has used every descriptor."""
    rig = rigs("--max-connections", "1000", "--max-pending", "1000")
    srv = hold_listener(f"{rig.ha}_5000")
    with SimGuest(rig.a_sock, timeout=15) as ga, SimGuest(rig.b_sock, timeout=15) as gb:
        gb.listen(7600)
        held = flood_guest_connections(ga, 5000)  # until EMFILE refuses one
        assert 100 < len(held) < NOFILE
        pauses0 = rig.counter("process", "accept_pauses")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(20)
        client.connect(rig.hb)  # the kernel takes it into the backlog; vsproxy cannot accept it yet
        client.sendall(b"CONNECT 7600\n")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            gb.poll(0.05)
        assert rig.counter("process", "accept_pauses") > pauses0  # accept failed, counted, paused
        rig.alive()
        close_all(ga, held)  # descriptors come back
        accepted: list[GuestSocket] = []
        lst = gb.driver.listeners[(7600, 1)]

        def got_it() -> bool:
            gb.poll(0.02)
            return bool(lst.queue)

        wait_for(got_it, timeout=10, what="the waiting client to reach guest B")
        accepted.append(GuestSocket(gb.driver, lst.queue.popleft()))
        assert client.recv(64).startswith(b"OK ")
        client.sendall(b"through")
        assert accepted[0].recv_exactly(7, timeout=10) == b"through"
        client.close()
    assert rig.counter("process", "fd_exhausted") >= 1
    srv.close()


def test_a_frontend_attaching_while_descriptors_are_out_waits_or_ends_with_a_clear_error_and_the_next_works(
        rigs: Callable[..., Rig]) -> None:
    """QEMU attaching to device B while A has used every descriptor: with none left it waits
    in the backlog; with one left, its socket is accepted but the fds its messages carry
    (memory, eventfds) cannot be, and the session ends with a clear error (QEMU cannot
    reconnect: that QEMU's device is gone, see "Restarting vsproxy"); once descriptors free up,
    the next front-end attaches and works."""
    rig = rigs("--max-connections", "1000", "--max-pending", "1000")
    srv = hold_listener(f"{rig.ha}_5000")
    outcome: dict[str, object] = {}

    def attach() -> None:
        try:
            g = SimGuest(rig.b_sock, timeout=20)
            g.start()
            outcome["guest"] = g
        except Exception as e:
            outcome["error"] = e

    with SimGuest(rig.a_sock, timeout=15) as ga:
        held = flood_guest_connections(ga, 5000)  # until EMFILE refuses one
        pauses0 = rig.counter("process", "accept_pauses")
        t = threading.Thread(target=attach)
        t.start()
        time.sleep(1.5)
        assert not outcome  # waiting in the backlog: accept failed, counted, paused
        assert rig.counter("process", "accept_pauses") > pauses0
        held.pop().close(timeout=10)  # one descriptor comes back: the accept takes it
        t.join(25)
        assert isinstance(outcome.get("error"), Exception), outcome
        wait_for(lambda: "front-end's fds were cut" in rig.vp.log(), what="the cut fds logged")
        rig.alive()
        close_all(ga, held)
    with SimGuest(rig.b_sock, timeout=15) as gb, host_sink(f"{rig.hb}_7650") as received:
        stream_to_sink(gb.connect(7650), os.urandom(2 * MiB), received)
    assert "Traceback" not in rig.vp.log()
    srv.close()


# -- a capture file that fails --------------------------------------------------------------------
def test_a_capture_on_a_full_device_is_refused_at_start_with_one_line(workdir: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vsproxy", "--socket", os.path.join(workdir, "a.sock"),
                           "--guest-cid", "5", "--pcap", "/dev/full"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "vsproxy: error: --pcap /dev/full: No space left on device"
    assert "Traceback" not in proc.stderr


def small_disk(limit: int) -> Callable[[], None]:
    """In the child: files may grow to ``limit`` bytes, then writes fail (EFBIG) as on a full
    disk; SIGXFSZ ignored, so the write fails instead of the process being killed."""

    def pre() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def tshark_count(path: str) -> tuple[int, str]:
    proc = subprocess.run(["tshark", "-r", path, "-T", "fields", "-e", "frame.number"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return len(proc.stdout.split()), proc.stderr


def test_a_capture_file_that_fills_stops_with_one_message_and_traffic_goes_on(workdir: str) -> None:
    sock, uds, cap = (os.path.join(workdir, n) for n in ("a.sock", "h", "cap.pcapng"))
    log = open(os.path.join(workdir, "vsproxy.log"), "wb")
    vp = subprocess.Popen([sys.executable, "-m", "vsproxy", "--socket", sock, "--guest-cid", "5", "--uds-path", uds,
                           "--pcap", cap], stderr=log, preexec_fn=small_disk(300_000))
    try:
        wait_for(lambda: os.path.exists(sock), what="vsproxy to start")
        data = os.urandom(16 * MiB)
        with SimGuest(sock, timeout=15) as g, host_sink(f"{uds}_7700") as received:
            stream_to_sink(g.connect(7700), data, received)  # every byte, the capture failing meanwhile
            with host_sink(f"{uds}_7701") as again:
                stream_to_sink(g.connect(7701), data, again)  # and after
        vp.send_signal(signal.SIGTERM)
        assert vp.wait(20) == 1  # the capture asked for did not finish: the status says so
    finally:
        if vp.poll() is None:
            vp.kill()
            vp.wait()
        log.close()
    with open(os.path.join(workdir, "vsproxy.log")) as f:
        text = f.read()
    stopped = [ln for ln in text.splitlines() if "capture stopped:" in ln]
    assert len(stopped) == 1 and f"{cap}: File too large; traffic goes on without it" in stopped[0]
    m = re.findall(r"^capture: packets=(\d+) bytes=\d+ dropped=(\d+) files=1 failed=(\d+)$", text, re.M)
    assert m and int(m[-1][2]) > 0 and m[-1][1] >= m[-1][2]
    assert "then the file failed" in text and "Traceback" not in text
    count, err = tshark_count(cap)  # what was written ends at a whole record: readable, not cut short
    assert count == int(m[-1][0]) > 0 and "cut short" not in err
    assert os.path.getsize(cap) <= 300_000


# -- SIGTERM during heavy traffic -----------------------------------------------------------------
BLASTER = """
import sys
from vsproxy.simguest import SimGuest
g = SimGuest(sys.argv[1], timeout=30, record_limit=0)
g.start()
s = g.connect(7800)
print("streaming", flush=True)
while True:
    s.blast(b"\\xa5" * 65536, 64)
"""


def test_sigterm_during_heavy_traffic_exits_cleanly_with_a_complete_capture(workdir: str) -> None:
    sock, uds, cap = (os.path.join(workdir, n) for n in ("a.sock", "h", "cap.pcapng"))
    vp = VsproxyProcess(["--socket", sock, "--guest-cid", "5", "--uds-path", uds, "--pcap", cap], sock,
                        os.path.join(workdir, "vsproxy.log"))
    sink = Acceptor(f"{uds}_7800")
    fe = subprocess.Popen([sys.executable, "-c", BLASTER, sock], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
    try:
        assert fe.stdout is not None and fe.stdout.readline().strip() == "streaming"
        host = sink.get()
        got = 0
        while got < 64 * MiB:  # heavy traffic under way
            got += len(host.recv(1 << 20))
        vp.proc.send_signal(signal.SIGTERM)
        t = threading.Thread(target=lambda: [None for _ in iter(lambda: host.recv(1 << 20), b"")], daemon=True)
        t.start()  # keep reading, as a host program would, so the exit is not waiting on it
        assert vp.proc.wait(20) == 0
    finally:
        fe.kill()
        fe.wait()
        if fe.stdout is not None:
            fe.stdout.close()
        sink.close()
        vp.stop()
    text = vp.log()
    assert "Traceback" not in text and "signal 15: shutting down" in text
    m = re.findall(r"^capture: packets=(\d+) bytes=\d+ dropped=(\d+) files=1$", text, re.M)
    assert m, text[-2000:]
    count, err = tshark_count(cap)
    assert "cut short" not in err and count == int(m[-1][0]) > 1000
