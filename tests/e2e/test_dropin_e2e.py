"""vhost-device-vsock's command line from QEMU's nitro-enclave documentation, run by vsproxy
unchanged (issue 22), with a real Linux guest on QEMU 10's microvm.

    vhost-device-vsock --vm guest-cid=4,forward-cid=1,forward-listen=9001+9002,socket=/tmp/vhost4.socket
    (qemu/qemu docs/system/i386/nitro-enclave.rst, "Running a nitro-enclave VM")

The nitro-enclave machine builds on microvm: virtio-mmio, whose rings have 1024 entries,
exactly vhost-device-vsock's (and vsproxy's) default --queue-size. The guest dials its parent
at CID 3 (no device has it, so forward-cid takes it, as vhost-device-vsock does) and a host
program dials guest port 9001 through forward-listen. AF_VSOCK belongs to the infrastructure
here: ``--vsock-via-unix`` (the socket factory the tests inject) stands in for it with unix
sockets, so nothing opens AF_VSOCK on the host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import harness
import pytest
from guestdata import fnv1a64, prng_bytes

REPO = Path(__file__).resolve().parents[2]


def echo_once(listener: socket.socket, got: list[int]) -> None:
    """A host echo service behind forward-cid 1, port 9000: one connection, echoed to EOF."""
    listener.settimeout(120)
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(60)
        while data := conn.recv(65536):
            got.append(len(data))
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)


@pytest.mark.e2e
def test_qemu_nitro_enclave_command_line_serves_a_microvm_guest_unchanged(
    sockdir: Path, qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage
) -> None:
    vhost, vdir, log = sockdir / "vhost4.socket", sockdir / "vsock", sockdir / "vsproxy.log"
    vdir.mkdir()
    argv = [sys.executable, "-m", "vsproxy",
            "--vm", f"guest-cid=4,forward-cid=1,forward-listen=9001+9002,socket={vhost}",  # the doc's line
            "--vsock-via-unix", str(vdir)]
    got: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(vdir / "vsock-1-9000"))
        listener.listen(1)
        server = threading.Thread(target=echo_once, args=(listener, got), daemon=True)
        server.start()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(log, "wb") as logf:
            vp = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                  stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 10
            while not (vhost.exists() and (vdir / "listen-9001").exists()):
                assert vp.poll() is None and time.monotonic() < end, log.read_text(errors="replace")
                time.sleep(0.05)
            script = "vsock_tool send 3 9000 100000 7\nvsock_tool echo-server 9001 1\n"
            with harness.start_guest(qemu_by_name("qemu10"), "microvm-legacy", vhost, script, timeout=180,
                                     image=guest_image) as run:
                assert run.wait_for(r"SENT (\d+)").group(1) == "100000"
                reply = run.wait_for(r"REPLY (\d+) (\w+)")
                assert reply.groups() == ("100000", fnv1a64(prng_bytes(7, 100_000)))
                run.wait_for(r"LISTENING 9001")
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:  # "host$ nc --vsock 1 9001"
                    host.settimeout(30)
                    host.connect(str(vdir / "listen-9001"))
                    host.sendall(b"host dials the enclave")
                    host.shutdown(socket.SHUT_WR)
                    echoed = b""
                    while chunk := host.recv(4096):
                        echoed += chunk
                assert echoed == b"host dials the enclave"
                assert run.wait_for(r"ACCEPTED (\d+) (\d+)").group(1) == "2"  # from the host
                assert run.wait_exit() == 0
        finally:
            rc = harness.stop_process(vp)
        server.join(10)
    text = log.read_text(errors="replace")
    assert rc == 0, text
    assert sum(got) == 100_000
    assert "serving vhost-user on " in text and "(guest CID 4)" in text
    assert "vring 0 started: size 1024" in text  # microvm's ring, at the queue-size limit
    assert "Traceback" not in text and " ERROR " not in text, text
