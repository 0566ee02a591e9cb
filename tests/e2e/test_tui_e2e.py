"""The real ``vsproxy tui --attach`` in a real terminal (tmux) watching a vsproxy while a real
Linux guest (QEMU 10, -M pc) talks through it: the guest's connection shows in the packet list
and, from vsproxy's snapshot, on the connections screen with the bytes it carried."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.e2e

TMUX = ["tmux", "-L", f"vsproxy-tui-e2e-{os.getpid()}"]


def screen() -> str:
    return subprocess.run([*TMUX, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True,
                          timeout=10).stdout


def wait_screen(cond: Callable[[str], bool], what: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = screen()
        if cond(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
        time.sleep(0.2)


def test_the_tui_attached_shows_a_real_guests_connection(
        start_vsproxy: Callable[..., harness.VsproxyProcess], sockdir: Path,
        qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage) -> None:
    uds, control = sockdir / "h.sock", sockdir / "ctl.sock"
    vp = start_vsproxy(["--uds-path", str(uds), "--control", str(control)])
    root = Path(__file__).resolve().parent.parent.parent
    cmd = (f"cd {shlex.quote(str(root))} && unset COLUMNS LINES && "
           f"{shlex.quote(sys.executable)} -m vsproxy tui --attach {shlex.quote(str(control))}; sleep 60")
    subprocess.run([*TMUX, "new-session", "-d", "-s", "tui", "-x", "160", "-y", "40", cmd], check=True, timeout=10)
    try:
        wait_screen(lambda s: "attached to" in s, "the TUI attached")
        with harness.start_guest(qemu_by_name("qemu10"), "pc", vp.socket_path, "vsock_tool echo-server 5000 1",
                                 timeout=180, image=guest_image) as run:
            run.wait_for(r"LISTENING 5000")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(30)
                c.connect(str(uds))
                c.sendall(b"CONNECT 5000\n")
                assert c.recv(64).startswith(b"OK ")
                c.sendall(b"y" * 10000)
                got = b""
                while len(got) < 10000:
                    got += c.recv(65536)
                wait_screen(lambda s: "> 5:5000 REQUEST" in s and "RW len=" in s, "the guest's packets")
                subprocess.run([*TMUX, "send-keys", "-t", "tui", "2"], check=True, timeout=10)
                text = wait_screen(lambda s: "established" in s and "10.0K" in s, "the live connection")
                assert "5:5000" in text
            assert run.wait_exit() == 0
        subprocess.run([*TMUX, "send-keys", "-t", "tui", "q"], check=True, timeout=10)
        wait_screen(lambda s: "attached to" not in s, "the TUI gone")
    finally:
        subprocess.run([*TMUX, "kill-server"], capture_output=True, timeout=10)
