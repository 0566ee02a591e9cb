"""The real ``vsproxy tui`` in a real terminal (tmux), driven with keys as a user would: a capture
file, a pcapng stream piped into ``vsproxy tui -``, and ``vsproxy --tui`` watching a simulated
guest."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import unix_server
from tui_helpers import CAPTURES, PY, Tmux, expected, tmux_sessions

from vsproxy.simguest import SimGuest
from vsproxy.tui.model import TROUBLE_FILTER


@pytest.fixture
def tmux() -> Iterator[Callable[[str, str], Tmux]]:
    yield from tmux_sessions()


def test_the_real_tui_on_the_http_capture_as_a_user_drives_it(tmux: Callable[[str, str], Tmux]) -> None:
    t = tmux("tui-file", f"{PY} -m vsproxy tui captures/http-over-vsock.pcapng")
    screen = t.wait(lambda s: "9 packets" in s, "the packets")
    assert max(len(line) for line in screen.splitlines()) == 100  # drawn for the terminal's 100 columns
    assert "RW len=91 buf_alloc=262144" in screen and "1 Packets" in screen
    t.keys("Up", "Up", "Up", "Up", "Up", "Up")  # to packet 3, the GET
    t.wait(lambda s: "10:44:00.612767 app 5:2157979543 >" in s and "connection = #1 app" in s, "its detail")
    t.keys("/")
    time.sleep(0.5)  # Textual moves the focus on its next turn; a person types no faster
    t.keys("-l", "op == nonsense")
    t.wait(lambda s: "^^^^^^^^" in s, "the caret under the bad token")
    t.keys("C-u")
    t.keys("-l", "proto == http")
    t.keys("Enter")
    t.wait(lambda s: "4 of 9 packets" in s, "the filtered list (as vsproxy read proto == http)")
    t.keys("f")
    screen = t.wait(lambda s: "guest -> host 91 bytes" in s, "the follow screen")
    assert "host -> guest 194 bytes" in screen
    t.keys("2")
    t.wait(lambda s: "connections from the capture" in s, "the connections screen")
    t.keys("?")
    t.wait(lambda s: "Keys" in s and "everywhere" in s, "help")
    t.keys("q")
    t.wait(lambda s: "vsproxy tui" not in s and "1 Packets" not in s, "the app gone, the shell back", 10)


def test_a_pcapng_stream_piped_into_vsproxy_tui_dash(tmux: Callable[[str, str], Tmux]) -> None:
    cap = shlex.quote(str(CAPTURES / "sibling-denied.pcapng"))
    t = tmux("tui-pipe", f"cat {cap} | {PY} -m vsproxy tui -")
    total = len(expected("sibling-denied.pcapng"))
    trouble = len(expected("sibling-denied.pcapng", TROUBLE_FILTER))
    screen = t.wait(lambda s: f"{total} packets" in s, "the piped packets")
    assert "stdin" in screen
    t.keys("!")
    t.wait(lambda s: f"{trouble} of {total} packets" in s, "only denied, spoofed and reset")
    t.keys("q")


def test_vsproxy_with_tui_watches_a_simulated_guest(tmux: Callable[[str, str], Tmux], workdir: str) -> None:
    sock = os.path.join(workdir, "v.sock")
    srv = unix_server(os.path.join(workdir, "h_5000"))
    t = tmux("tui-inproc", f"{PY} -m vsproxy --socket {sock} --guest-cid 5 --uds-path {workdir}/h --tui")
    try:
        t.wait(lambda s: "vsproxy (in this process)" in s, "the TUI")
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert time.monotonic() < deadline, "vsproxy never made its socket"
            time.sleep(0.05)
        with SimGuest(sock) as g:
            s = g.connect(5000)
            s.sendall(b"hello from the guest")
            assert s.recv_exactly(20, timeout=10) == b"hello from the guest"
            t.wait(lambda x: "RW" in x and "5:" in x and "> 2:5000" in x, "the guest's packets")
            t.keys("2")
            t.wait(lambda x: "established" in x, "the live connection from the snapshot")
            s.close()
        t.keys("q")
        t.wait(lambda x: "in this process" not in x, "vsproxy and the TUI stopped", 15)
    finally:
        srv.close()
