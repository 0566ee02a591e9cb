"""Each command of the README's "Terminal UI" section, run as written (paths moved into a
scratch directory) in a real terminal (tmux), against a real vsproxy process with a control
socket and a capture file, driven by the simulated guest."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import VsproxyProcess, unix_server
from tui_helpers import PY, ROOT, Tmux, tmux_sessions

from vsproxy.simguest import GuestSocket, SimGuest


@pytest.fixture
def tmux() -> Iterator[Callable[[str, str], Tmux]]:
    yield from tmux_sessions()


def readme_tui_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Terminal UI", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert m is not None
    return m.group(1).splitlines()


def as_run_here(cmd: str, paths: dict[str, str]) -> str:
    for old, new in paths.items():
        cmd = cmd.replace(old, new)
    return re.sub(r"(^|\| )vsproxy ", lambda m: f"{m.group(1)}{PY} -m vsproxy ", cmd)


def test_the_readme_shows_these_commands() -> None:
    cmds = readme_tui_commands()
    assert cmds[0] == "vsproxy tui captures/http-over-vsock.pcapng" and len(cmds) == 5
    assert any("--attach" in c for c in cmds) and any(c.endswith("--tui") for c in cmds)
    assert any(c.endswith("| vsproxy tui -") for c in cmds) and any("--follow-file" in c for c in cmds)


def test_each_readme_command_runs_as_written(tmux: Callable[[str, str], Tmux], workdir: str) -> None:
    paths = {"/run/vsproxy.ctl": f"{workdir}/ctl", "/var/tmp/vm5.pcapng": f"{workdir}/vm5.pcapng",
             "/run/vhost5.sock": f"{workdir}/v2.sock", "/run/vm5.vsock": f"{workdir}/h2"}
    file_cmd, follow_cmd, pipe_cmd, attach_cmd, inproc_cmd = (as_run_here(c, paths) for c in readme_tui_commands())
    echo = unix_server(f"{workdir}/h_5000")
    echo2 = unix_server(f"{workdir}/h2_5000")
    sock = os.path.join(workdir, "v.sock")
    proc = VsproxyProcess(["--socket", sock, "--guest-cid", "5", "--uds-path", f"{workdir}/h", "--control",
                           paths["/run/vsproxy.ctl"], "--pcap", paths["/var/tmp/vm5.pcapng"], "--flush"],
                          sock, os.path.join(workdir, "vsproxy.log"))
    try:
        with SimGuest(sock) as g:
            s = g.connect(5000)
            exchange(s, b"first")
            t = tmux("readme-file", file_cmd)
            t.wait(lambda x: "9 packets" in x and "http-over-vsock" in x, "the capture")
            follow = tmux("readme-follow", follow_cmd)
            follow.wait(lambda x: "RW len=5 " in x, "the capture being written")
            pipe = tmux("readme-pipe", pipe_cmd)
            attach = tmux("readme-attach", attach_cmd)
            pipe.wait(lambda x: "stdin" in x, "the piped stream")
            attach.wait(lambda x: "attached to" in x, "attached")
            time.sleep(1.0)  # both subscribed before the next packets cross
            exchange(s, b"second!")
            for term in (follow, pipe, attach):
                term.wait(lambda x: "RW len=7 " in x, "the new packets, live")
            attach.keys("2")
            attach.wait(lambda x: "established" in x and "2:5000" in x, "the live connection")
            s.close()
        inproc = tmux("readme-inproc", inproc_cmd)
        inproc.wait(lambda x: "in this process" in x, "vsproxy --tui")
        deadline = time.monotonic() + 10
        while not os.path.exists(paths["/run/vhost5.sock"]):
            assert time.monotonic() < deadline, "vsproxy --tui never made its socket"
            time.sleep(0.05)
        with SimGuest(paths["/run/vhost5.sock"]) as g2:
            s2 = g2.connect(5000)
            exchange(s2, b"in-process")
            inproc.wait(lambda x: "RW len=10 " in x, "its packets")
            s2.close()
        inproc.keys("q")
        inproc.wait(lambda x: "in this process" not in x, "vsproxy --tui stopped")
        proc.stop()  # the attached UI sees its socket go away and keeps what it had
        attach.keys("1")
        attach.wait(lambda x: "control socket" in x and "RW len=7 " in x, "the loss shown, the packets kept")
    finally:
        proc.stop()
        echo.close()
        echo2.close()


def exchange(s: GuestSocket, data: bytes) -> None:
    s.sendall(data)
    assert s.recv_exactly(len(data), timeout=10) == data
