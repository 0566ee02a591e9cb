"""``vsproxy replay guest``: a capture's guest side played through a running vsproxy by the simulated
guest. A session through a vsproxy with a remap (3 -> the host) and a denial (an outbound
allowlist) is recorded, played again through a fresh vsproxy with the same rules, and the two
captures are the same as transcripts (``vsproxy diff``), the denial included; through a vsproxy
without the denial the replay and the diff both say what changed. The committed HTTP capture
replayed through vsproxy to a live server gives the fixture back."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import VsproxyProcess, unix_server
from replay_servers import http_server, keys_handler, seqpacket_server

from vsproxy.replay.transcript import Outcome, load_transcript
from vsproxy.simguest import SEQPACKET, SimGuest

REPO = Path(__file__).resolve().parents[1]
HTTP = REPO / "captures" / "http-over-vsock.pcapng"


def vsproxy_args(d: str, pcap: str, *, deny: bool = True) -> list[str]:
    allow = ",allow-out=2:9000+2:5005" if deny else ""
    return ["--vm", f"name=app,guest-cid=5,socket={d}/v.sock,uds-path={d}/u,remap=3=2{allow}", "--pcap", pcap,
            "--flush"]


@contextmanager
def services(d: str) -> Iterator[None]:
    echo = unix_server(f"{d}/u_9000")
    try:
        with seqpacket_server(f"{d}/u_5005"):
            yield
    finally:
        echo.close()


def record(d: str, pcap: str) -> None:
    """The original session: what a guest program did through vsproxy."""
    vp = VsproxyProcess(vsproxy_args(d, pcap), f"{d}/v.sock", f"{d}/record.log")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(9000, cid=3)  # the enclave's parent, remapped to the host
            s.sendall(b"ping through the remap\n")
            s.shutdown_write()
            assert s.recv_all(timeout=10) == b"ping through the remap\n"
            s.close(timeout=5)
            try:
                g.connect(7000, cid=2)  # not in the allowlist: vsproxy answers RST
                raise AssertionError("the denied connection was accepted")
            except ConnectionResetError:
                pass
            q = g.connect(5005, cid=2, type=SEQPACKET)
            for m in (b"HELLO", b"GET region", b"BYE"):
                q.send_message(m, eor=True)
                q.recv_message(timeout=10)
            q.close(timeout=5)
    finally:
        vp.stop()


def replay_guest(socket_path: str, capture: str, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "replay", "guest", capture, "--socket", socket_path,
                           *more], capture_output=True, text=True, cwd=REPO, timeout=120)


def diff(a: str, b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "diff", a, b], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_replay_through_remap_and_denial_captures_the_same_session(workdir: str) -> None:
    d = workdir
    original, again = f"{d}/original.pcapng", f"{d}/again.pcapng"
    with services(d):
        record(d, original)
        t = load_transcript(original)
        assert [c.outcome for c in t.conversations] == [Outcome.ESTABLISHED, Outcome.DENIED, Outcome.ESTABLISHED]
        assert t.conversations[0].real_peer == (2, 9000)
        vp = VsproxyProcess(vsproxy_args(d, again), f"{d}/v.sock", f"{d}/replay.log")
        try:
            proc = replay_guest(vp.socket_path, original)
        finally:
            vp.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"3 connections replayed through {d}/v.sock: 3 same, 0 different, 0 failed"
    same = diff(original, again)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout == "same: 3 connections\n"


def test_replay_through_a_vsproxy_without_the_denial_shows_the_change(workdir: str) -> None:
    d = workdir
    original, again = f"{d}/original.pcapng", f"{d}/again.pcapng"
    with services(d):
        record(d, original)
        extra = unix_server(f"{d}/u_7000")  # now something answers at 2:7000, and nothing denies it
        vp = VsproxyProcess(vsproxy_args(d, again, deny=False), f"{d}/v.sock", f"{d}/replay.log")
        try:
            proc = replay_guest(vp.socket_path, original)
        finally:
            vp.stop()
            extra.close()
    assert proc.returncode == 1
    assert "> 2:7000 STREAM [denied]: different: accepted; the capture shows it denied" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("2 same, 1 different, 0 failed")
    changed = diff(original, again)
    assert changed.returncode == 1
    assert changed.stdout.splitlines()[1:4] == [
        changed.stdout.splitlines()[1], "  outcome differs", "    A: denied"]
    assert "> 2:7000 STREAM [denied]" in changed.stdout.splitlines()[1]


def test_http_capture_replayed_through_vsproxy_to_a_live_server_gives_the_fixture_back(workdir: str) -> None:
    again = f"{workdir}/again.pcapng"
    with http_server(keys_handler()) as where:
        port = where.rsplit(":", 1)[1]
        sock = f"{workdir}/v.sock"
        vp = VsproxyProcess(["--vm", f"name=app,guest-cid=5,socket={sock},forward=8080=tcp:127.0.0.1:{port}",
                             "--pcap", again], sock, f"{workdir}/v.log")
        try:
            proc = replay_guest(sock, str(HTTP))
        finally:
            vp.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#1 app 5:2157979543 > 2:8080 STREAM http: same (194 bytes back)" in proc.stdout
    assert diff(str(HTTP), again).returncode == 0


def test_guest_replay_errors(workdir: str, tmp_path: Path) -> None:
    proc = replay_guest(f"{workdir}/nothing.sock", str(HTTP))
    assert proc.returncode == 1 and "cannot attach to" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.pcapng"
    bad.write_bytes(b"junk")
    proc = replay_guest(f"{workdir}/nothing.sock", str(bad))
    assert proc.returncode == 2 and "not a pcap or pcapng file" in proc.stderr


def host_program(uds: str, port: int, send: bytes) -> bytes:
    """A host program connecting into the guest through the hybrid socket: CONNECT, send,
    half-close, read the answer to the end. Tried until the guest listens (up to 15 s)."""
    import socket
    import time

    deadline = time.monotonic() + 15
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(uds)
            s.sendall(b"CONNECT %d\n" % port)
            line = b""
            while not line.endswith(b"\n"):
                got = s.recv(1)
                if not got:
                    raise ConnectionError("closed before OK")
                line += got
            if not line.startswith(b"OK "):
                raise ConnectionError(line.decode())
            s.sendall(send)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        except (ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            s.close()


def test_inbound_connections_answered_as_the_guest_did(workdir: str) -> None:
    import threading

    from helpers import hybrid_connect

    d = workdir
    original, again = f"{d}/original.pcapng", f"{d}/again.pcapng"
    args = ["--vm", f"name=app,guest-cid=5,socket={d}/v.sock,uds-path={d}/u"]
    vp = VsproxyProcess([*args, "--pcap", original, "--flush"], f"{d}/v.sock", f"{d}/record.log")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            host, gs = hybrid_connect(f"{d}/u", g, 7000)  # a host program connects into the guest
            host.sendall(b"status?\n")
            host.shutdown(1)
            assert gs.recv_all(timeout=10) == b"status?\n"
            gs.sendall(b"guest is fine\n")
            gs.close(timeout=5)
            assert host.recv(100) == b"guest is fine\n"
            host.close()
    finally:
        vp.stop()
    t = load_transcript(original)
    (conv,) = t.conversations
    assert conv.guest_is_client is False and conv.server == (5, 7000)
    vp = VsproxyProcess([*args, "--pcap", again, "--flush"], f"{d}/v.sock", f"{d}/replay.log")
    answers: list[bytes] = []
    try:
        proc_box: list[subprocess.CompletedProcess[str]] = []
        th = threading.Thread(target=lambda: proc_box.append(replay_guest(vp.socket_path, original,
                                                                          "--serve-inbound", "15")))
        th.start()
        answers.append(host_program(f"{d}/u", 7000, b"status?\n"))
        th.join(60)
    finally:
        vp.stop()
    (proc,) = proc_box
    assert answers == [b"guest is fine\n"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"{conv.title()}: same (answered as recorded on guest port 7000)",
        f"1 connection replayed through {d}/v.sock: 1 same, 0 different, 0 failed"]
    same = diff(original, again)
    assert same.returncode == 0, same.stdout + same.stderr


def test_inbound_connections_not_served_without_the_option_and_missing_ones_fail(workdir: str) -> None:
    from helpers import hybrid_connect

    d = workdir
    original = f"{d}/original.pcapng"
    args = ["--vm", f"name=app,guest-cid=5,socket={d}/v.sock,uds-path={d}/u"]
    vp = VsproxyProcess([*args, "--pcap", original, "--flush"], f"{d}/v.sock", f"{d}/record.log")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            host, gs = hybrid_connect(f"{d}/u", g, 7000)
            host.close()
            gs.close(timeout=5)
    finally:
        vp.stop()
    vp = VsproxyProcess(args, f"{d}/v.sock", f"{d}/replay.log")
    try:
        plain = replay_guest(vp.socket_path, original)
        waited = replay_guest(vp.socket_path, original, "--serve-inbound", "0.5")
    finally:
        vp.stop()
    assert plain.returncode == 2 and "(--serve-inbound S answers them)" in plain.stderr
    assert waited.returncode == 1 and "error: the peer did not make this connection" in waited.stdout


def test_connections_that_overlapped_overlap_in_the_replay(workdir: str) -> None:
    d = workdir
    original, again = f"{d}/original.pcapng", f"{d}/again.pcapng"
    args = ["--vm", f"name=app,guest-cid=5,socket={d}/v.sock,uds-path={d}/u"]
    one, two = unix_server(f"{d}/u_7001"), unix_server(f"{d}/u_7002")
    try:
        vp = VsproxyProcess([*args, "--pcap", original, "--flush"], f"{d}/v.sock", f"{d}/record.log")
        try:
            with SimGuest(vp.socket_path, timeout=10) as g:
                a = g.connect(7001)
                a.sendall(b"first, long\n")
                b = g.connect(7002)  # while the first is still open
                b.sendall(b"second\n")
                for s, m in ((a, b"first, long\n"), (b, b"second\n")):
                    s.shutdown_write()
                    assert s.recv_all(timeout=10) == m
                a.close(timeout=5)
                b.close(timeout=5)
        finally:
            vp.stop()
        first, second = load_transcript(original).conversations
        assert second.start < first.end  # they overlapped
        vp = VsproxyProcess([*args, "--pcap", again, "--flush"], f"{d}/v.sock", f"{d}/replay.log")
        try:
            proc = replay_guest(vp.socket_path, original)
        finally:
            vp.stop()
    finally:
        one.close()
        two.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = load_transcript(again).conversations
    assert second.start < first.end, "played one after the other"
    assert diff(original, again).returncode == 0


def test_vsproxy_going_away_mid_replay_is_one_line_and_exit_1(workdir: str) -> None:
    import time

    d = workdir
    seq = str(REPO / "captures" / "seqpacket.pcapng")
    with services(d):
        vp = VsproxyProcess(["--vm", f"name=app,guest-cid=5,socket={d}/v.sock,uds-path={d}/u"], f"{d}/v.sock",
                            f"{d}/v.log")
        try:
            # the capture's 20 ms gaps made 2 s long: vsproxy is stopped in the middle
            proc = subprocess.Popen([sys.executable, "-m", "vsproxy", "replay", "guest", seq, "--socket",
                                     f"{d}/v.sock", "--speed", "0.01"], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
        finally:
            vp.stop()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (out, err)
    assert err == f"vsproxy replay guest: {d}/v.sock: backend closed the vhost-user socket\n"
