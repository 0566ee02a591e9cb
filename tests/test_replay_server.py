"""Server replay through a real vsproxy process: the simulated guest talks over the vhost-user
socket to ``--replay-server FILE`` / ``--service CID:PORT=replay:FILE`` rules, with no host
service behind them. The HTTP fixture answered byte for byte (and the session captured again
matches the original as a transcript), the Nitro heartbeat served from its capture, SEQPACKET
boundaries, and an unmatched request reset and counted in the SIGUSR1 report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import VsproxyProcess, wait_for

from vsproxy.replay.transcript import load_transcript
from vsproxy.simguest import SEQPACKET, SimGuest
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "captures"
HTTP = CAPTURES / "http-over-vsock.pcapng"
NITRO = CAPTURES / "nitro-heartbeat.pcapng"
SEQ = CAPTURES / "seqpacket.pcapng"
REQUEST = load_transcript(str(HTTP)).conversations[0].sent(True)
RESPONSE = load_transcript(str(HTTP)).conversations[0].sent(False)


def start(workdir: str, cid: int, *args: str, name: str = "app", vm: str = "") -> VsproxyProcess:
    sock = os.path.join(workdir, "v.sock")
    return VsproxyProcess(["--vm", f"name={name},guest-cid={cid},socket={sock}{vm}", *args], sock,
                          os.path.join(workdir, "v.log"))


def test_http_fixture_answered_byte_for_byte_with_the_server_gone_and_the_capture_matches(workdir: str) -> None:
    pcap = os.path.join(workdir, "again.pcapng")
    vp = start(workdir, 5, "--replay-server", str(HTTP), "--pcap", pcap, "--flush")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(8080, cid=2)
            s.sendall(REQUEST)
            s.shutdown_write()
            assert s.recv_all(timeout=10) == RESPONSE
            s.close(timeout=5)
        report = vp.report()
        assert f"replay {HTTP} at 2:8080: matched=1 unmatched=0 exhausted=0" in report
    finally:
        assert vp.stop() == 0
    proc = subprocess.run([sys.executable, "-m", "vsproxy", "diff", str(HTTP), pcap], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nitro_heartbeat_served_from_its_capture_instead_of_the_built_in_service(workdir: str) -> None:
    vp = start(workdir, 16, "--replay-server", str(NITRO), "--nitro", name="enclave")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(9000, cid=3)
            s.sendall(b"\xb7")
            assert s.recv(1, timeout=10) == b"\xb7"
            s.shutdown_write()
            assert s.recv_all(timeout=10) == b""  # the recorded parent's half-close follows the enclave's
            s.close(timeout=5)
        assert f"replay {NITRO} at 3:9000: matched=1 " in vp.report()
        assert "rule 'service replay:" in vp.report()
    finally:
        vp.stop()
    assert f"--replay-server {NITRO}: 3:9000" in vp.log()


def test_seqpacket_answers_keep_their_boundaries(workdir: str) -> None:
    vp = start(workdir, 5, "--service", f"2:5005=replay:{SEQ}")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(5005, cid=2, type=SEQPACKET)
            got = []
            for m in (b"HELLO", b"GET region", b"BYE"):
                s.send_message(m, eor=True)
                got.append(s.recv_message(timeout=10))
            s.close(timeout=5)
        assert got == [(b"HELLO from the host", H.SEQ_EOM), (b"region=eu-west-1", H.SEQ_EOM), (b"BYE", H.SEQ_EOM)]
    finally:
        vp.stop()


def test_unmatched_request_gets_rst_and_is_counted_and_a_used_connection_is_exhausted(workdir: str) -> None:
    vp = start(workdir, 5, "--replay-server", str(HTTP))
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(8080, cid=2)
            s.sendall(b"GET /nothing-like-it HTTP/1.1\r\n\r\n")
            wait_for(lambda: (g.poll(0.01), s.conn.reset)[1], what="RST for the unmatched request")
            s = g.connect(8080, cid=2)
            s.sendall(REQUEST)
            s.shutdown_write()
            assert s.recv_all(timeout=10) == RESPONSE
            s.close(timeout=5)
            s = g.connect(8080, cid=2)  # the one recorded connection was used
            s.sendall(REQUEST)
            wait_for(lambda: (g.poll(0.01), s.conn.reset)[1], what="RST once the capture is used up")
        assert f"replay {HTTP} at 2:8080: matched=1 unmatched=1 exhausted=1" in vp.report()
        assert "guest message matches no recorded connection's first message" in vp.log()
    finally:
        vp.stop()


def test_reuse_answers_the_same_request_again(workdir: str) -> None:
    vp = start(workdir, 5, "--replay-server", str(HTTP), "--replay-reuse")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            for _ in range(3):
                s = g.connect(8080, cid=2)
                s.sendall(REQUEST)
                s.shutdown_write()
                assert s.recv_all(timeout=10) == RESPONSE
                s.close(timeout=5)
        assert "matched=3 unmatched=0 exhausted=0" in vp.report()
    finally:
        vp.stop()


def test_a_bad_replay_capture_stops_vsproxy_before_it_starts(workdir: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcapng"
    bad.write_bytes(b"not a capture")
    for args, says in ((["--replay-server", str(bad)], "not a pcap or pcapng file"),
                       (["--service", "2:80=replay:/no/such/file"], "No such file or directory"),
                       (["--replay-server", str(CAPTURES / "sibling-denied.pcapng")], "no connection between"),
                       (["--replay-match", "fuzzy"], "bad matching")):
        proc = subprocess.run([sys.executable, "-m", "vsproxy", "--socket", os.path.join(workdir, "x.sock"),
                               "--guest-cid", "5", *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_unmatched_connection_forwarded_to_the_endpoint_the_configuration_would_use(workdir: str) -> None:
    from helpers import unix_server

    echo = unix_server(os.path.join(workdir, "u_8080"))
    vp = start(workdir, 5, "--replay-server", str(HTTP), "--replay-unmatched", "forward",
               vm=f",uds-path={workdir}/u")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(8080, cid=2)
            s.sendall(b"not HTTP at all\n")  # matches nothing: the echo service behind gets it, first
            s.sendall(b"and more after it\n")
            s.shutdown_write()
            assert s.recv_all(timeout=10) == b"not HTTP at all\nand more after it\n"
            s.close(timeout=5)
            s = g.connect(8080, cid=2)  # the recorded request is still answered from the capture
            s.sendall(REQUEST)
            s.shutdown_write()
            assert s.recv_all(timeout=10) == RESPONSE
            s.close(timeout=5)
        assert "matched=1 unmatched=1 exhausted=0" in vp.report()
        assert "forwarded to unix:" in vp.log()
    finally:
        vp.stop()
        echo.close()


def test_seqpacket_unmatched_message_forwarded_with_its_boundaries(workdir: str) -> None:
    from replay_servers import seqpacket_server

    with seqpacket_server(os.path.join(workdir, "u_5005"), {b"HELLO": b"live hello", b"other": b"live other"}) as got:
        vp = start(workdir, 5, "--replay-server", str(SEQ), "--replay-unmatched", "forward",
                   vm=f",uds-path={workdir}/u")
        try:
            with SimGuest(vp.socket_path, timeout=10) as g:
                s = g.connect(5005, cid=2, type=SEQPACKET)
                s.send_message(b"HELLO", eor=True)
                assert s.recv_message(timeout=10) == (b"HELLO from the host", H.SEQ_EOM)  # from the capture
                s.send_message(b"other", eor=True)  # not the recorded second message
                assert s.recv_message(timeout=10) == (b"live other", H.SEQ_EOM)
                s.close(timeout=5)
        finally:
            vp.stop()
    assert got == [b"other"]


def test_forward_with_nowhere_to_go_is_rst(workdir: str) -> None:
    vp = start(workdir, 5, "--replay-server", str(HTTP), "--replay-unmatched", "forward")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(8080, cid=2)
            s.sendall(b"unmatched\n")
            wait_for(lambda: (g.poll(0.01), s.conn.reset)[1], what="RST: nothing to forward to")
        assert "there is nothing to forward it to" in vp.log()
    finally:
        vp.stop()


def test_replay_counters_in_ctl_stats_and_the_snapshot(workdir: str) -> None:
    import json

    ctl_path = os.path.join(workdir, "ctl")
    vp = start(workdir, 5, "--replay-server", str(HTTP), "--control", ctl_path)
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(8080, cid=2)
            s.sendall(REQUEST)
            s.shutdown_write()
            assert s.recv_all(timeout=10) == RESPONSE
            s.close(timeout=5)
        stats = subprocess.run([sys.executable, "-m", "vsproxy", "ctl", ctl_path, "stats"], capture_output=True,
                               text=True, timeout=30)
        assert stats.returncode == 0, stats.stderr
        assert f"replay {HTTP} at 2:8080: matched=1 unmatched=0 exhausted=0" in stats.stdout.splitlines()
        from vsproxy.ctl import snapshot

        snap = snapshot(ctl_path)
        assert snap["services"] == {f"replay {HTTP} at 2:8080": {"matched": 1, "unmatched": 0, "exhausted": 0}}
        json.dumps(snap)
    finally:
        vp.stop()


def record_host_made(workdir: str) -> str:
    """A capture of a host program connecting into the guest's port 7000 (hybrid CONNECT)."""
    from helpers import hybrid_connect

    original = os.path.join(workdir, "hostmade.pcapng")
    sock = os.path.join(workdir, "r.sock")
    vp = VsproxyProcess(["--vm", f"name=app,guest-cid=5,socket={sock},uds-path={workdir}/u", "--pcap", original,
                         "--flush"], sock, os.path.join(workdir, "r.log"))
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            host, gs = hybrid_connect(f"{workdir}/u", g, 7000)
            host.sendall(b"status?\n")
            host.shutdown(1)
            assert gs.recv_all(timeout=10) == b"status?\n"
            gs.sendall(b"guest is fine\n")
            gs.close(timeout=5)
            assert host.recv(100) == b"guest is fine\n"
            host.close()
    finally:
        vp.stop()
    return original


def serve_once(g: SimGuest, answer: bytes) -> bytes:
    s = g.listen(7000).accept(timeout=10)
    got = s.recv_all(timeout=10)
    s.sendall(answer)
    s.close(timeout=5)
    return got


def test_connections_the_host_made_toward_the_guest_are_made_again(workdir: str) -> None:
    original = record_host_made(workdir)
    again = os.path.join(workdir, "again.pcapng")
    vp = start(workdir, 5, "--replay-server", original, "--pcap", again, "--flush")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            assert serve_once(g, b"guest is fine\n") == b"status?\n"  # vsproxy played the host's side
        wait_for(lambda: "made=1 same=1 different=0 refused=0" in vp.report(), what="the host-made connection counted")
        assert f"replay {original} toward app: made=1 same=1 different=0 refused=0" in vp.report()
    finally:
        vp.stop()
    proc = subprocess.run([sys.executable, "-m", "vsproxy", "diff", original, again], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_guest_that_answers_otherwise_is_counted_different(workdir: str) -> None:
    original = record_host_made(workdir)
    vp = start(workdir, 5, "--replay-server", original)
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            assert serve_once(g, b"guest is on fire\n") == b"status?\n"
        wait_for(lambda: "different=1" in vp.report(), what="the different answer counted")
        assert "made=1 same=0 different=1 refused=0" in vp.report()
        assert "answered #1 app 2:" in vp.log() and "differently: bytes differ" in vp.log()
    finally:
        vp.stop()


def test_server_replay_of_a_capture_without_whole_connections_is_refused_at_start(workdir: str,
                                                                                  tmp_path: Path) -> None:
    from capture_edit import edited

    late = edited(HTTP, tmp_path / "late.pcapng",
                  lambda r, h, p: [] if h.op in (H.Op.REQUEST, H.Op.RESPONSE) else [(r, h, p)])
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(HTTP.read_bytes()[:-30])
    for path, says in ((late, "no connection a guest made and its peer accepted"), (cut, "truncated")):
        proc = subprocess.run([sys.executable, "-m", "vsproxy", "--socket", os.path.join(workdir, "x.sock"),
                               "--guest-cid", "5", "--replay-server", str(path)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_siblings_service_answered_from_a_capture_without_the_sibling(workdir: str) -> None:
    sibling = CAPTURES / "sibling-denied.pcapng"
    vp = start(workdir, 5, "--service", f"6:5001=replay:{sibling}")
    try:
        with SimGuest(vp.socket_path, timeout=10) as g:
            s = g.connect(5001, cid=6)  # vault's echo server, as app reached it in the capture
            s.sendall(b"hello vault\n")
            s.shutdown_write()
            assert s.recv_all(timeout=10) == b"hello vault\n"
            s.close(timeout=5)
        assert f"replay {sibling} at 6:5001: matched=1 unmatched=0 exhausted=0" in vp.report()
    finally:
        vp.stop()
