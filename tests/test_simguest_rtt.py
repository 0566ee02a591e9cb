"""The simulated guest's request/response loop in C (sg_rtt: ping, echo, timed connect) through
a real vsproxy, with and without vsproxy's busy polling: every round answered, the rings and the
connection left as the Python driver expects (it goes on from there), and the benchmark that
uses it runs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import VsproxyProcess, hybrid_connect, unix_server

from vsproxy.simguest import SimGuest, cblast

pytestmark = pytest.mark.c_paths

ROOT = Path(__file__).resolve().parent.parent
Start = Callable[..., VsproxyProcess]


def test_the_c_request_response_loop_is_built() -> None:
    assert cblast.AVAILABLE, "vsproxy.simguest._cblast was not built: bench_latency would have no guest"


@pytest.mark.parametrize("busy_poll", [0, 50])
def test_ping_through_vsproxy_answers_every_round_and_leaves_the_connection_to_python(
    start_vsproxy: Start, workdir: str, busy_poll: int
) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds, f"--busy-poll={busy_poll}")
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(vp.socket_path, record_limit=100) as g:
            s = g.connect(5000)
            ns = s.ping(600)
            assert len(ns) == 600 and all(0 < t < 10**10 for t in ns)
            assert (s.conn.tx_cnt, s.conn.rx_cnt, s.conn.fwd_cnt) == (600, 600, 600)
            s.sendall(b"after")  # the Python driver goes on from the state C left
            assert s.recv_exactly(5, timeout=10) == b"after"
            assert s.close(timeout=10)
            drv = g.driver
            g.poll(0.1)
            assert drv.tx.n_inflight == 0 and len(drv.tx.free) == drv.tx.size
            assert len(drv.tx_free_slots) == min(drv.tx.size, 32)
            assert g.stats.protocol_errors == []
            assert g.stats.tx_packets >= 601 + 2  # REQUEST, 600 requests, "after", SHUTDOWN
        if busy_poll:  # vsproxy's C path polled for the turns (vq_tx_kick)
            m = re.search(r"busy poll: max_us=50 hits=(\d+)", vp.report())
            assert m is not None and int(m.group(1)) > 0
    finally:
        echo.close()


def test_a_ping_loop_whose_last_answer_comes_with_the_peers_close_counts_every_round(
    start_vsproxy: Start, workdir: str
) -> None:
    """The host answers the last round and closes at once: the answer and SHUTDOWN 3 reach the
    guest together, and the loop is done, not cut one round short."""
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    rounds = 50
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{uds}_5000")
    srv.listen(8)

    def answer_then_close() -> None:
        for _ in range(5):
            c, _ = srv.accept()
            for _ in range(rounds):
                c.recv(1)
                c.sendall(b"!")
            c.close()  # right after the last answer

    host = threading.Thread(target=answer_then_close, daemon=True)
    host.start()
    try:
        with SimGuest(vp.socket_path, record_limit=100) as g:
            for _ in range(5):
                s = g.connect(5000)
                assert len(s.ping(rounds)) == rounds
                s.close(timeout=10)
        host.join(10)
    finally:
        srv.close()


def test_echo_answers_a_host_client_through_the_hybrid_socket(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    with SimGuest(vp.socket_path) as g:
        host, s = hybrid_connect(uds, g, 6000)
        host.settimeout(10)
        answers: list[bytes] = []

        def client() -> None:
            for k in range(400):
                host.sendall(bytes([k & 0xFF]))
                answers.append(host.recv(1))

        t = threading.Thread(target=client)
        t.start()
        s.echo(400)
        t.join(10)
        assert len(answers) == 400 and all(len(a) == 1 for a in answers)
        host.sendall(b"tail")
        assert s.recv_exactly(4, timeout=10) == b"tail"
        s.sendall(b"back")
        assert host.recv(4) == b"back"
        host.close()
        assert g.stats.protocol_errors == []


def test_a_timed_connect_opens_a_working_connection_and_a_refused_one_raises(start_vsproxy: Start,
                                                                            workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    echo = unix_server(f"{uds}_7000")
    try:
        with SimGuest(vp.socket_path) as g:
            s, ns = g.connect_timed(7000)
            assert 0 < ns < 10**10
            s.sendall(b"hello")
            assert s.recv_exactly(5, timeout=10) == b"hello"
            assert s.close(timeout=10)
            with pytest.raises(ConnectionResetError):
                g.connect_timed(7001)  # nothing listens on uds_7001: vsproxy answers RST
            for _ in range(20):  # many in a row, each closed: the answer is always C's or Python's
                s, ns = g.connect_timed(7000)
                assert ns > 0
                s.close(timeout=10)
            assert g.stats.protocol_errors == []
    finally:
        echo.close()


def test_host_latency_tools_ping_an_echo_over_a_socketpair() -> None:
    ffi, lib = cblast.ffi, cblast.lib
    a, b = socket.socketpair()
    rounds = ffi.new("uint64_t *")
    t = threading.Thread(target=lambda: lib.lat_echo(b.fileno(), 100, 1, rounds))
    t.start()
    times = ffi.new("uint64_t[]", 100)
    assert lib.lat_ping(a.fileno(), 100, 1, times) == 0
    t.join(10)
    assert rounds[0] == 100 and all(x > 0 for x in ffi.unpack(times, 100))
    a.close()
    b.close()


def test_latency_benchmark_runs_and_prints_every_row_beside_its_floor() -> None:
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "benchmarks/bench_latency.py", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ("floor (2 C procs)", "4-hop C relay", "guest->host", "host->guest", "connect+accept", "setup (connect)")
    rows = {n: line[len(n):].split() for line in proc.stdout.splitlines() for n in names if line.startswith(n)}
    assert list(rows) == list(names), proc.stdout
    for name, cols in rows.items():
        p50, p99 = float(cols[0]), float(cols[1])
        assert 0 < p50 <= p99
        if name in ("4-hop C relay", "guest->host", "host->guest", "setup (connect)"):
            assert cols[2].endswith("x") and float(cols[2][:-1]) > 0  # the ratio to its floor
        assert "CPU" not in cols and re.search(r"\d", " ".join(cols[6:]))  # CPU µs per process
    assert "vsproxy" in " ".join(rows["guest->host"])
