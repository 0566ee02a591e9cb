"""Close and 4-tuple reuse between two real Linux 6.1 guests, siblings through one vsproxy, as on
a kernel-to-kernel link (tests/test_close_semantics.py pins the same with simulated guests):

1. the client sends 3 bytes and closes; the server, told by the host (over its serial input)
   that the close happened, sends one byte: EPIPE, as a kernel peer's SHUTDOWN 3 makes it;
2. the client connects again from the same local port while the server's first accepted socket
   is still open: the server's listener accepts it and gets its byte.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
import pytest
from test_captures_e2e import MACHINE, QEMU, Guest, running_vsproxy, stop_vsproxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def guest(guest_image: harness.GuestImage, qemu_by_name: Callable[[str], harness.Qemu]) -> Guest:
    return Guest(qemu_by_name(QEMU), guest_image)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = harness.short_tempdir("vsp-close-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_close_reaches_the_sibling_at_once_and_the_client_may_reuse_its_port(guest: Guest, workdir: Path) -> None:
    assert MACHINE == "pc"
    client, server, log = workdir / "client.sock", workdir / "server.sock", workdir / "vsproxy.log"
    server_script = "vsock_tool close-server 7000 </dev/console\n"
    client_script = "read -t 60 go </dev/console\nvsock_tool reuse-client 6 7000 40000 </dev/console\n"
    args = ["--vm", f"name=client,guest-cid=5,socket={client},groups=g",
            "--vm", f"name=server,guest-cid=6,socket={server},groups=g"]
    with running_vsproxy(args, client, log) as vp:
        with guest.start(server, server_script) as srun, guest.start(client, client_script) as crun:
            srun.wait_for(r"LISTENING 7000")
            assert crun.proc.stdin is not None and srun.proc.stdin is not None
            crun.proc.stdin.write(b"GO\n")  # the client starts once the server listens
            crun.proc.stdin.flush()
            srun.wait_for(r"READ 3 abc")
            crun.wait_for(r"CLOSED")  # the client's close() returned: vsproxy answered it with RST
            srun.proc.stdin.write(b"closed\n")  # "another channel": the server now sends
            srun.proc.stdin.flush()
            srun.wait_for(r"SEND-AFTER-CLOSE \S+")
            crun.proc.stdin.write(b"again\n")  # the client reconnects from the same port
            crun.proc.stdin.flush()
            for run in (crun, srun):
                rc = run.wait_exit()
                assert rc == 0, (run.describe(f"guest script exit {rc}") + "\n--- vsproxy ---\n"
                                 + log.read_text()[-5000:])
            cout, sout = crun.result().script_output(), srun.result().script_output()
        stop_vsproxy(vp, log)
    assert "SEND-AFTER-CLOSE EPIPE" in sout, sout
    assert "RECONNECTED" in cout and "CONNECT-FAIL" not in cout, cout
    assert "READ2 1 2" in sout, sout
    assert sout.count("ACCEPTED 5 40000") == 2, sout  # both from the client's port 40000
