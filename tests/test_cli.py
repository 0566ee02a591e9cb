"""The command line: one-line errors with exit status 2, clean shutdown, limits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
from helpers import VsproxyProcess, wait_for

from vsproxy.simguest import SimGuest

Start = Callable[..., VsproxyProcess]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("cid", ["0", "1", "2", "4294967295", "-5", "banana", "4294967296"])
def test_reserved_or_bad_guest_cid_is_refused_in_one_line(workdir: str, cid: str) -> None:
    p = run_cli("--socket", os.path.join(workdir, "s"), "--guest-cid", cid)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsproxy: error:") and "--guest-cid" in lines[0]
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--forward", "5000=tcp:127.0.0.1"],
        ["--forward", "x=tcp:127.0.0.1:80"],
        ["--forward", "5000=udp:127.0.0.1:80"],
        ["--listen", "tcp:127.0.0.1:99999=5000"],
        ["--tx-buffer-size", "12"],
        ["--no-such-option"],
        ["--max-connections", "0"],
        ["--max-pending", "lots"],
        ["--max-handshakes", "9999999999"],
        ["--vm", "guest-cid=6,socket=/tmp/x6.sock,max-connections=-1"],
    ],
)
def test_bad_options_are_refused_in_one_line(workdir: str, args: list[str]) -> None:
    p = run_cli("--socket", os.path.join(workdir, "s"), "--guest-cid", "5", *args)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "vsproxy: error:" in p.stderr


def test_missing_directory_is_refused(workdir: str) -> None:
    p = run_cli("--socket", os.path.join(workdir, "nope", "s"), "--guest-cid", "5")
    assert p.returncode == 2 and "does not exist" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_socket_already_served_is_refused(start_vsproxy: Start) -> None:
    vp = start_vsproxy()
    p = run_cli("--socket", vp.socket_path, "--guest-cid", "6")
    assert p.returncode == 2 and "already served" in p.stderr
    assert vp.proc.poll() is None  # the first one is untouched
    with SimGuest(vp.socket_path) as g:
        assert g.guest_cid == 5


def test_stale_socket_file_is_replaced(workdir: str, start_vsproxy: Start) -> None:
    path = os.path.join(workdir, "vhost.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # a socket file nobody serves, as a killed vsproxy leaves behind
    vp = start_vsproxy()
    wait_for(lambda: "serving vhost-user" in vp.log(), what="vsproxy to listen")
    with SimGuest(vp.socket_path) as g:
        assert g.guest_cid == 5


def test_tcp_listen_port_in_use_is_refused(workdir: str) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    p = run_cli("--socket", os.path.join(workdir, "s"), "--guest-cid", "5", "--listen", f"tcp:127.0.0.1:{port}=5000")
    busy.close()
    assert p.returncode == 2 and "cannot listen" in p.stderr


def test_sigterm_closes_host_sockets_and_reports(start_vsproxy: Start, workdir: str) -> None:
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{uds}_5000")
    srv.listen()
    g = SimGuest(vp.socket_path)
    g.start()
    s = g.connect(5000)
    s.sendall(b"hi")
    peer, _ = srv.accept()
    peer.settimeout(10)
    assert peer.recv(16) == b"hi"
    vp.proc.send_signal(signal.SIGTERM)
    assert vp.proc.wait(10) == 0
    assert peer.recv(16) == b""  # closed by vsproxy on the way out
    log = vp.log()
    assert "sessions=1" in log and "Traceback" not in log
    assert not os.path.exists(vp.socket_path) and not os.path.exists(uds)
    peer.close()
    srv.close()
    g.close()


def test_open_file_soft_limit_is_raised_to_hard(start_vsproxy: Start) -> None:
    vp = start_vsproxy()
    with open(f"/proc/{vp.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard


def test_help_lists_the_options() -> None:
    p = run_cli("--help")
    assert p.returncode == 0
    for opt in ("--socket", "--guest-cid", "--uds-path", "--forward", "--listen", "--tx-buffer-size"):
        assert opt in p.stdout


def test_limits_come_from_flags_keys_and_files_and_the_rest_from_the_file_limit_share(workdir: str) -> None:
    from vsproxy import config as cfg
    from vsproxy.cli import build_parser, settings_from_args
    from vsproxy.limits import default_limits

    toml = os.path.join(workdir, "v.toml")
    with open(toml, "w") as f:
        f.write('[[vm]]\nguest-cid = 7\nsocket = "/tmp/x7.sock"\nmax-handshakes = 9\n')
    args = build_parser().parse_args(["--vm", "guest-cid=5,socket=/tmp/x5.sock,max-connections=300",
                                      "--vm", "guest-cid=6,socket=/tmp/x6.sock", "--config", toml,
                                      "--max-pending", "40"])
    devs = settings_from_args(args).devices
    share = default_limits(1024, 3)
    got = [d.limits(share) for d in devs]
    assert [(x.max_connections, x.max_pending, x.max_handshakes) for x in got] == [
        (300, 40, share.max_handshakes),
        (share.max_connections, 40, share.max_handshakes),
        (share.max_connections, 40, 9),
    ]
    bad = cfg.Settings()  # add_vm collects problems (every one, for --check) instead of raising the first
    cfg.add_vm(bad, {"guest-cid": 5, "socket": "/s", "max-pending": 0}, "t")
    assert len(bad.problems) == 1 and "max-pending" in bad.problems[0]
    with pytest.raises(cfg.ConfigError, match="max-pending"):
        bad.raise_problems()


def test_start_logs_the_file_limit_and_the_limits_it_gives(start_vsproxy: Start) -> None:
    vp = start_vsproxy("--max-connections", "123")
    wait_for(lambda: "open-file limit" in vp.log(), what="the limits line")
    line = next(ln for ln in vp.log().splitlines() if "open-file limit" in ln)
    assert "at most 123 connections" in line
