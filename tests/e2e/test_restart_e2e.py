"""vsproxy restarted under running guests, with QEMU 7.2 and 10 (issue 18, item 2): what QEMU's
vhost-user-vsock does is pinned here, since a back-end cannot change it.

- Without ``reconnect``: when the back-end dies, QEMU keeps running but the device is dead for
  that QEMU process (the guest's connects time out); vsproxy started again on the same socket
  serves the next QEMU at once (the stale socket file is replaced).
- With the chardev's ``reconnect`` (7.2) / ``reconnect-ms`` (10): QEMU does not even start the
  device: vhost-user-vsock initialises the back-end while realizing the device, before the
  background connect, and fails ("Failed to set msg fds", "vhost_backend_init failed").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.e2e


class Echo:
    """A host unix echo service (one connection at a time, each until EOF)."""

    def __init__(self, path: str) -> None:
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            with c:
                c.settimeout(30)
                try:
                    while data := c.recv(65536):
                        c.sendall(data)
                except OSError:
                    pass

    def close(self) -> None:
        self.srv.close()


def start_vsproxy(d: Path, vh: str, uds: str, n: int) -> subprocess.Popen[bytes]:
    """vsproxy once it serves ``vh`` (the socket file of a killed one may still be there)."""
    log = d / f"vsproxy{n}.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "vsproxy", "--socket", vh, "--guest-cid", "5", "--uds-path", uds],
                             stdout=f, stderr=subprocess.STDOUT, cwd=harness.REPO)
    end = time.monotonic() + 10
    while "serving vhost-user" not in log.read_text(errors="replace"):
        assert p.poll() is None and time.monotonic() < end, log.read_text(errors="replace")
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("qemu_name", ["qemu7", "qemu10"])
def test_a_killed_vsproxy_leaves_that_qemus_device_dead_and_serves_the_next_qemu_when_restarted(
        qemu_name: str, guest_image: harness.GuestImage, workdir: Path) -> None:
    qemu = harness.require_qemu(qemu_name)
    vh, uds = str(workdir / "v.sock"), str(workdir / "u")
    echo = Echo(f"{uds}_5000")
    vp = start_vsproxy(workdir, vh, uds, 1)
    script = ("echo hi1 | vsock_tool connect 2 5000; echo RC1 $?\n"
              "echo READY\nread -t 60 go </dev/console\n"
              "echo hi2 | timeout 15 vsock_tool connect 2 5000; echo RC2 $?\n")
    try:
        with harness.start_guest(qemu, "pc", vh, script, 120, image=guest_image) as run:
            run.wait_for(r"READY")
            assert "RC1 0" in run.serial, run.serial
            os.kill(vp.pid, signal.SIGKILL)  # a crash: no clean-up at all
            vp.wait()
            vp = start_vsproxy(workdir, vh, uds, 2)
            assert run.proc.stdin is not None
            run.proc.stdin.write(b"go\n")
            run.proc.stdin.flush()
            run.wait_for(r"RC2 \d+")
            # that QEMU's device is gone with the back-end it was connected to
            assert "RC2 0" not in run.serial, run.serial
            run.kill()
        # the restarted vsproxy serves the next QEMU on the same socket
        with harness.start_guest(qemu, "pc", vh, "echo hi3 | vsock_tool connect 2 5000; echo RC3 $?\n", 120,
                                 image=guest_image) as run2:
            assert run2.wait_exit() == 0, run2.describe("second QEMU")
            assert "RC3 0" in run2.result().script_output()
    finally:
        harness.stop_process(vp)
        echo.close()


@pytest.mark.parametrize("qemu_name", ["qemu7", "qemu10"])
def test_qemu_refuses_to_start_vhost_user_vsock_with_a_reconnecting_chardev(
        qemu_name: str, guest_image: harness.GuestImage, workdir: Path) -> None:
    qemu = harness.require_qemu(qemu_name)
    vh, uds = str(workdir / "v.sock"), str(workdir / "u")
    vp = start_vsproxy(workdir, vh, uds, 1)
    try:
        cfg = harness.GuestConfig(qemu, "pc", guest_image, vh, "true\n")
        argv = harness._build_command(cfg, workdir)
        chardev = argv.index("-chardev") + 1
        argv[chardev] += ",reconnect-ms=500" if qemu_name == "qemu10" else ",reconnect=1"
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "vhost_backend_init failed" in r.stdout + r.stderr, r.stdout + r.stderr
        assert vp.poll() is None  # vsproxy itself is unharmed and keeps serving
    finally:
        harness.stop_process(vp)
