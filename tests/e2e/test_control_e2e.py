"""A running vsproxy watched through its control socket while a real Linux guest talks through
it: the snapshot shows the guest's connection with Linux's own credit numbers, and the event
stream its lifecycle (QEMU 10, -M pc)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.e2e

LINUX_BUF_ALLOC = 262144  # a Linux guest socket's default vsock buffer


def ctl(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "ctl", str(path), *args], capture_output=True,
                          text=True, timeout=60)


def test_a_real_guests_connection_in_the_snapshot_and_the_event_stream(
        start_vsproxy: Callable[..., harness.VsproxyProcess], sockdir: Path,
        qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage) -> None:
    uds, control = sockdir / "h.sock", sockdir / "ctl.sock"
    vp = start_vsproxy(["--uds-path", str(uds), "--control", str(control)])
    lines: list[bytes] = []
    events = subprocess.Popen([sys.executable, "-m", "vsproxy", "ctl", str(control), "events", "--seconds", "120"],
                              stdout=subprocess.PIPE)

    def collect() -> None:
        assert events.stdout is not None
        for line in events.stdout:
            lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    time.sleep(2.0)  # the ctl process is up and subscribed before QEMU connects (its first event)
    try:
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
                out = ctl(control, "conns", "--json")
                assert out.returncode == 0, out.stderr
                (conn,) = json.loads(out.stdout)
                assert (conn["state"], conn["initiator"], conn["type"], conn["guest_port"]) == (
                    "established", "host", "stream", 5000)
                assert conn["to_guest_bytes"] == 10000 and conn["to_peer_bytes"] == 10000
                assert conn["credit"]["peer_buf_alloc"] == LINUX_BUF_ALLOC  # what the Linux guest advertised
                stats = ctl(control, "stats")
                assert "running conns=1" in stats.stdout
            assert run.wait_exit() == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(b'"frontend-gone"' in ln for ln in lines):
            time.sleep(0.1)
        kinds = [json.loads(ln)["event"] for ln in lines]
        for kind in ("frontend-connected", "rings-started", "requested", "established", "frontend-gone"):
            assert kind in kinds, kinds
        assert kinds.index("requested") < kinds.index("established")
    finally:
        events.kill()
        events.wait(10)
        reader.join(10)
        if events.stdout is not None:
            events.stdout.close()
