"""The real ``vsproxy tui`` in a real terminal (tmux), driven with keys as a user would: a capture
file, a pcapng stream piped into ``vsproxy tui -``, and ``vsproxy --tui`` watching a simulated
guest."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import unix_server
from tui_helpers import CAPTURES, ROOT

from vsproxy.simguest import SimGuest

PY = shlex.quote(sys.executable)
# A tmux server of these tests' own (its socket named for this process): the sizes asked for
# are the sizes given, whatever another server's options say.
TMUX = ["tmux", "-L", f"vsproxy-tui-{os.getpid()}"]


class Tmux:
    def __init__(self, name: str, command: str, size: tuple[int, int] = (100, 30)) -> None:
        self.name = name
        subprocess.run([*TMUX, "new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]),
                        # COLUMNS and LINES (set by some runners) would override the terminal's size
                        f"cd {shlex.quote(str(ROOT))} && unset COLUMNS LINES && {command}; sleep 30"],
                       check=True, timeout=10)

    def screen(self) -> str:
        p = subprocess.run([*TMUX, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                           timeout=10)
        return p.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*TMUX, "send-keys", "-t", self.name, *keys], check=True, timeout=10)

    def wait(self, cond: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if cond(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run([*TMUX, "kill-session", "-t", self.name], capture_output=True, timeout=10)


@pytest.fixture
def tmux() -> Iterator[Callable[[str, str], Tmux]]:
    made: list[Tmux] = []

    def make(name: str, command: str) -> Tmux:
        t = Tmux(f"{name}-{os.getpid()}", command)
        made.append(t)
        return t

    yield make
    for t in made:
        t.kill()
    subprocess.run([*TMUX, "kill-server"], capture_output=True, timeout=10)


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
    screen = t.wait(lambda s: "20 packets" in s, "the piped packets")
    assert "stdin" in screen
    t.keys("!")
    t.wait(lambda s: "4 of 20 packets" in s, "only denied, spoofed and reset")
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
