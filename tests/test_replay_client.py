"""``vsproxy replay client``: the guest's side of captured connections played against live loopback
services (TCP, unix STREAM and unix SEQPACKET), answers compared with the capture: the same
service (exit 0), one that answers differently (exit 1, first difference shown, as HTTP and as
bytes), one that is down (exit 1, one clear line), bad captures (exit 2), --json, --filter,
--loop, and the realtime and asap timing."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from capture_edit import Packet, edited
from replay_servers import KEYS_BODY, http_server, keys_handler, seqpacket_server

from vsproxy.capture.reader import Record
from vsproxy.replay.client import Answers, Await, PlanStep, Send, ShutWrite, plan
from vsproxy.replay.player import Timing, play
from vsproxy.replay.transcript import load_transcript
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "captures"
HTTP = CAPTURES / "http-over-vsock.pcapng"
SEQ = CAPTURES / "seqpacket.pcapng"


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "replay", "client", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_same_answers_exit_0_over_tcp_and_unix(workdir: str) -> None:
    with http_server(keys_handler()) as tcp:
        proc = replay(str(HTTP), "--to", tcp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["#1 app 5:2157979543 > 2:8080 STREAM http: same (194 bytes back)",
                                        f"1 connection replayed --to {tcp}: 1 same, 0 different, 0 failed"]
    with http_server(keys_handler(), os.path.join(workdir, "svc")) as uds:
        assert replay(str(HTTP), "--to", uds).returncode == 0


def test_different_status_exits_1_with_the_difference() -> None:
    with http_server(keys_handler(status=503)) as where:
        proc = replay(str(HTTP), "--to", where)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[:3] == [
        "#1 app 5:2157979543 > 2:8080 STREAM http: different: HTTP response 1: status differs",
        "    recorded: 200 OK", "    live: 503 Service Unavailable"]


def test_json_bodies_compare_as_json_and_exact_compares_bytes() -> None:
    reordered = b'{"keys":[{"alg":"ES256","id":"k1"},{"alg":"RS256","id":"k2"}]}\n'
    assert len(reordered) == len(KEYS_BODY) and reordered != KEYS_BODY
    with http_server(keys_handler(body=reordered)) as where:
        aware, exact = replay(str(HTTP), "--to", where), replay(str(HTTP), "--to", where, "--exact")
    assert aware.returncode == 0, aware.stdout
    assert exact.returncode == 1 and "different: bytes differ" in exact.stdout
    assert "first difference at byte 142" in exact.stdout
    changed = KEYS_BODY.replace(b"RS256", b"RS512")
    with http_server(keys_handler(body=changed)) as where:
        proc = replay(str(HTTP), "--to", where)
    assert proc.returncode == 1
    assert "JSON body differs" in proc.stdout and "at $.keys[1].alg" in proc.stdout
    assert 'recorded: "RS256"' in proc.stdout and 'live: "RS512"' in proc.stdout


def test_ignored_header_may_differ() -> None:
    with http_server(keys_handler(date="Fri, 02 Jan 2026 00:00:00 GMT")) as where:
        strict = replay(str(HTTP), "--to", where)
        lax = replay(str(HTTP), "--to", where, "--ignore-header", "Date")
    assert strict.returncode == 1 and "headers differ" in strict.stdout and "recorded: date: Thu" in strict.stdout
    assert lax.returncode == 0, lax.stdout


def test_service_down_is_one_clear_error_and_exit_1(workdir: str) -> None:
    proc = replay(str(HTTP), "--to", f"uds:{workdir}/nobody")
    assert proc.returncode == 1
    assert f"error: cannot connect to uds:{workdir}/nobody_8080: No such file or directory" in proc.stdout
    assert proc.stderr == "vsproxy replay client: the service is not answering (No such file or directory)\n"
    proc = replay(str(HTTP), "--to", "tcp:127.0.0.1:1")
    assert proc.returncode == 1 and "Connection refused" in proc.stderr


def test_seqpacket_against_a_unix_seqpacket_server(workdir: str) -> None:
    with seqpacket_server(os.path.join(workdir, "s_5005")) as got:
        proc = replay(str(SEQ), "--to", f"uds:{workdir}/s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SEQPACKET: same (3 messages back)" in proc.stdout
    assert got == [b"HELLO", b"GET region", b"BYE"]  # one message each: the boundaries were kept
    wrong = {b"HELLO": b"HELLO from the host", b"GET region": b"region=us-east-1", b"BYE": b"BYE"}
    with seqpacket_server(os.path.join(workdir, "t_5005"), wrong):
        proc = replay(str(SEQ), "--to", f"uds:{workdir}/t")
    assert proc.returncode == 1
    assert "different: message 2 differs" in proc.stdout and '    live: "region=us-east-1"' in proc.stdout


def test_json_report_and_loop(workdir: str) -> None:
    with http_server(keys_handler()) as where:
        proc = replay(str(HTTP), "--to", where, "--json", "--loop", "3")
    assert proc.returncode == 0
    rep = json.loads(proc.stdout)
    assert (rep["same"], rep["different"], rep["errors"]) == (3, 0, 0)
    assert [(c["id"], c["round"], c["result"]) for c in rep["connections"]] == [(1, 1, "same"), (1, 2, "same"),
                                                                                (1, 3, "same")]
    with http_server(keys_handler(status=404)) as where:
        rep = json.loads(replay(str(HTTP), "--to", where, "--json").stdout)
    (c,) = rep["connections"]
    assert c["result"] == "different" and c["difference"] == "HTTP response 1: status differs"


def test_filter_selects_connections_and_a_filter_that_selects_none_is_exit_2(workdir: str) -> None:
    with http_server(keys_handler()) as where:
        assert replay(str(HTTP), "--to", where, "--filter", "proto == http").returncode == 0
        proc = replay(str(HTTP), "--to", where, "--filter", "port == 1234")
    assert proc.returncode == 2 and "nothing to replay: no connection matches the filter" in proc.stderr
    proc = replay(str(HTTP), "--to", "tcp:127.0.0.1:1", "--filter", "port = 1")
    assert proc.returncode == 2 and "bad filter" in proc.stderr


def test_bad_captures_exit_2_with_one_line(tmp_path: Path) -> None:
    text = tmp_path / "x.pcapng"
    text.write_bytes(b"hello")
    classic_ethernet = tmp_path / "eth.pcap"
    classic_ethernet.write_bytes(bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000"))
    late = edited(HTTP, tmp_path / "late.pcapng",
                  lambda r, h, p: [] if h.op in (H.Op.REQUEST, H.Op.RESPONSE) else [(r, h, p)])
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(HTTP.read_bytes()[:200])
    for path, says in ((text, "not a pcap or pcapng file"), (classic_ethernet, "is not LINKTYPE_VSOCK"),
                       (late, "nothing to replay"), (cut, "nothing to replay: truncated"),
                       (tmp_path / "absent", "No such file")):
        proc = replay(str(path), "--to", "tcp:127.0.0.1:1")
        assert proc.returncode == 2, (path, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "started before the capture" in replay(str(late), "--to", "tcp:127.0.0.1:1").stderr
    assert replay(str(HTTP), "--to", "ftp:x").returncode == 2
    assert replay(str(HTTP), "--to", "tcp:127.0.0.1:1", "--speed", "fast").returncode == 2


def test_a_capture_with_lost_packets_replays_the_whole_connections_only(tmp_path: Path) -> None:
    def drop_response(rec: Record, h: H.Header, p: bytes) -> Iterable[Packet]:
        return [] if h.op == H.Op.RW and h.src_cid == 2 else [(rec, h, p)]

    lossy = edited(HTTP, tmp_path / "lossy.pcapng", drop_response)
    assert load_transcript(str(lossy)).lost == 194
    proc = replay(str(lossy), "--to", "tcp:127.0.0.1:1")
    assert proc.returncode == 2 and "194 bytes missing from the capture" in proc.stderr


def test_plan_waits_for_each_answer_before_the_next_message() -> None:
    (conv,) = load_transcript(str(SEQ)).conversations
    steps = plan(conv)
    kinds = [(type(s).__name__, getattr(s, "units", getattr(s, "data", None))) for s in steps]
    assert kinds == [("Send", b"HELLO"), ("Await", 1), ("Send", b"GET region"), ("Await", 2), ("Send", b"BYE"),
                     ("Await", 3), ("ShutWrite", None), ("Await", 3)]
    assert steps[-2] == ShutWrite(steps[-2].at, H.SHUTDOWN_BOTH)  # the guest closed in one step
    (http,) = load_transcript(str(HTTP)).conversations
    p = plan(http)
    assert [type(s) for s in p] == [Send, ShutWrite, Await, ShutWrite, Await]
    # one whole HTTP response and the end of its stream before the guest's full close
    assert p[1:] == [ShutWrite(p[1].at, H.SHUTDOWN_SEND), Await(p[2].at, 1, True),
                     ShutWrite(p[3].at, H.SHUTDOWN_BOTH), Await(p[4].at, 1, True)]


class _Recorder:
    """A channel that answers at once and notes when each thing was sent."""

    def __init__(self) -> None:
        self.sent: list[float] = []

    def send(self, data: bytes, eor: bool) -> None:
        self.sent.append(time.monotonic())

    def shut_write(self, flags: int) -> None:
        pass

    def abort(self) -> None:
        pass

    def receive(self, answers: Answers, timeout: float) -> bool:
        answers.feed(b"x")
        return True

    def close(self) -> None:
        pass


def test_realtime_keeps_the_recorded_gaps_and_asap_does_not_sleep() -> None:
    (conv,) = load_transcript(str(SEQ)).conversations
    # the gaps alone: answers are instant here
    steps: list[PlanStep] = [s for s in plan(conv) if not isinstance(s, Await)]
    sends = [s for s in steps if isinstance(s, Send)]
    gaps = [b.at - a.at for a, b in itertools.pairwise(sends)]
    assert min(gaps) > 0.003  # the capture has gaps worth keeping (20 ms and 4.7 ms)
    rec = _Recorder()
    play(steps, rec, Answers(True), Timing.parse("realtime"), 1.0)
    got = [b - a for a, b in itertools.pairwise(rec.sent)]
    assert all(abs(g - w) < 0.010 for g, w in zip(got, gaps, strict=True)), (got, gaps)
    fast = _Recorder()
    t0 = time.monotonic()
    play(steps, fast, Answers(True), Timing.parse("asap"), 1.0)
    assert time.monotonic() - t0 < 0.005
    double = _Recorder()
    play(steps, double, Answers(True), Timing.parse("2"), 1.0)
    got2 = [b - a for a, b in itertools.pairwise(double.sent)]
    assert all(abs(g - w / 2) < 0.010 for g, w in zip(got2, gaps, strict=True)), (got2, gaps)


def test_to_auto_routes_as_the_vsproxy_configuration_would(workdir: str) -> None:
    from helpers import unix_server

    nitro = str(CAPTURES / "nitro-heartbeat.pcapng")
    # the enclave dialled 3:9000; with --remap 3=2 that is the host's 9000: U_9000, an echo (0xB7 back)
    echo = unix_server(os.path.join(workdir, "u_9000"))
    try:
        vm = f"name=enclave,guest-cid=16,socket={workdir}/v.sock,uds-path={workdir}/u"
        proc = replay(nitro, "--to", "auto", "--", "--vm", vm, "--remap", "3=2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[-1] == (
            "1 connection replayed --to auto: 1 same, 0 different, 0 failed")
        # without the remap, 3 is no device and nothing: the configuration has no route for it
        proc = replay(nitro, "--to", "auto", "--", "--vm", vm)
        assert proc.returncode == 1 and "error: not replayed: the configuration denies it (no route)" in proc.stdout
        # with --nitro the heartbeat is vsproxy's own service: nothing on the host to check
        proc = replay(nitro, "--to", "auto", "--", "--vm", vm, "--nitro")
        assert proc.returncode == 1 and "sends it to service nitro-heartbeat, not a host socket" in proc.stdout
        assert proc.stderr == ""
    finally:
        echo.close()
    with http_server(keys_handler()) as where:
        port = where.rsplit(":", 1)[1]
        toml = os.path.join(workdir, "v.toml")
        with open(toml, "w") as f:
            f.write(f'[[vm]]\nname = "app"\nguest-cid = 5\nsocket = "{workdir}/a.sock"\n'
                    f'forward = ["8080=tcp:127.0.0.1:{port}"]\n')
        proc = replay(str(HTTP), "--to", "auto", "--config", toml)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert replay(str(HTTP), "--to", "auto").returncode == 2
    bad = replay(str(HTTP), "--to", "auto", "--", "--guest-cid", "1")
    assert bad.returncode == 2 and "the vsproxy configuration:" in bad.stderr


def test_realtime_client_replay_keeps_the_recorded_gaps_on_a_real_socket(workdir: str) -> None:
    import socket
    import threading

    (conv,) = load_transcript(str(SEQ)).conversations
    sent = [s for s in conv.steps if s.from_client and hasattr(s, "data")]
    recorded = [b.time - a.time for a, b in itertools.pairwise(sent)]
    arrivals: list[float] = []
    path = os.path.join(workdir, "s_5005")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        c, _ = listener.accept()
        with c:
            while msg := c.recv(65536):
                arrivals.append(time.monotonic())
                c.send({b"HELLO": b"HELLO from the host", b"GET region": b"region=eu-west-1"}.get(msg, b"BYE"))

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        proc = replay(str(SEQ), "--to", f"uds:{workdir}/s", "--speed", "realtime")
    finally:
        th.join(10)
        listener.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(got) == len(recorded) == 2
    assert all(abs(g - r) < 0.010 for g, r in zip(got, recorded, strict=True)), (got, recorded)


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from vsproxy.replay.progress import Progress, bar

    assert bar(3, 10) == "replay [#########.....................] 3/10"
    assert bar(10, 10).endswith("] 10/10") and "." not in bar(10, 10).split("]")[0]
    out = io.StringIO()  # not a terminal: nothing is drawn
    p = Progress(10, out)
    p.step()
    p.close()
    assert out.getvalue() == ""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    p = Progress(2, tty)
    p.step()
    p.step()
    p.close()
    assert "\rreplay [" in tty.getvalue() and "2/2" in tty.getvalue()


def test_replay_without_a_kind_is_a_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "vsproxy", "replay"], capture_output=True, text=True, cwd=REPO,
                          timeout=30)
    assert proc.returncode == 2 and "vsproxy replay client FILE --to" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "vsproxy", "replay", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=30)
    assert proc.returncode == 0 and "vsproxy replay guest FILE --socket PATH" in proc.stdout


def test_a_service_that_resets_is_a_difference_that_says_so() -> None:
    import socket
    import struct
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def reset_each() -> None:
        c, _ = srv.accept()
        c.recv(10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    th = threading.Thread(target=reset_each, daemon=True)
    th.start()
    try:
        proc = replay(str(HTTP), "--to", f"tcp:127.0.0.1:{srv.getsockname()[1]}")
    finally:
        th.join(10)
        srv.close()
    assert proc.returncode == 1
    assert "different: HTTP response 1: only recorded (the live side reset the connection)" in proc.stdout
