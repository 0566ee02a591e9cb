"""Close and 4-tuple reuse as on a kernel-to-kernel link, with real Linux 6.1 guests
(tests/test_close_semantics.py pins the same with simulated guests):

Two guests, siblings through one vsproxy:
1. the client sends 3 bytes and closes; the server, told by the host (over its serial input)
   that the close happened, sends one byte: EPIPE, as a kernel peer's SHUTDOWN 3 makes it;
2. the client connects again from the same local port while the server's first accepted socket
   is still open: the server's listener accepts it and gets its byte.

One guest and host unix sockets (the hybrid socket both ways):
3. a host program connects into the guest, sends 3 bytes and closes: the guest's send() gets
   EPIPE, and a second host connection is accepted and read;
4. the guest connects to a host listener from a fixed port, sends and closes, and connects
   again from the same port while the host still holds the first accepted socket.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from test_captures_e2e import MACHINE, Guest, running_vsproxy, stop_vsproxy

from vsproxy.endpoints.listeners import hybrid_dial

pytestmark = pytest.mark.e2e


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


def hybrid_send_and_close(uds: Path, port: int, data: bytes) -> None:
    s, _ = hybrid_dial(str(uds), port, timeout=30)
    with s:
        s.sendall(data)


class HostListener(threading.Thread):
    """A host program's unix listener: accepts two connections, reads each to its EOF; the first
    stays open until the second is read (the guest reuses its port meanwhile)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        self.srv.settimeout(120)
        self.got: list[bytes] = []
        self.first_done = threading.Event()
        self.start()

    def _read(self, c: socket.socket) -> bytes:
        data = b""
        while chunk := c.recv(64):
            data += chunk
        return data

    def run(self) -> None:
        with self.srv:
            c1, _ = self.srv.accept()
            self.got.append(self._read(c1))
            self.first_done.set()
            c2, _ = self.srv.accept()  # c1 is still open
            self.got.append(self._read(c2))
            c2.close()
            c1.close()


def test_host_unix_sockets_close_and_reuse_as_kernel_peers(guest: Guest, workdir: Path) -> None:
    vhost, uds, log = workdir / "v.sock", workdir / "h.sock", workdir / "vsproxy.log"
    script = ("vsock_tool close-server 7000 </dev/console\n"
              "read -t 60 go </dev/console\n"
              "vsock_tool reuse-client 2 7001 40000 </dev/console\n")
    host = HostListener(Path(f"{uds}_7001"))
    with running_vsproxy(["--vm", f"guest-cid=5,socket={vhost},uds-path={uds}"], vhost, log) as vp:
        with guest.start(vhost, script) as run:
            assert run.proc.stdin is not None

            def say(line: bytes) -> None:
                assert run.proc.stdin is not None
                run.proc.stdin.write(line)
                run.proc.stdin.flush()

            run.wait_for(r"LISTENING 7000")
            hybrid_send_and_close(uds, 7000, b"abc")  # the host program sends and closes
            run.wait_for(r"READ 3 abc")
            say(b"closed\n")
            sent = run.wait_for(r"SEND-AFTER-CLOSE (\S+)").group(1)
            hybrid_send_and_close(uds, 7000, b"2")
            run.wait_for(r"READ2 1 2")
            say(b"go\n")  # the guest dials the host from port 40000
            run.wait_for(r"CLOSED")
            assert host.first_done.wait(30), "the host listener never saw the first connection end"
            say(b"again\n")
            rc = run.wait_exit()
            assert rc == 0, run.describe(f"guest script exit {rc}") + "\n--- vsproxy ---\n" + log.read_text()[-5000:]
            out = run.result().script_output()
        stop_vsproxy(vp, log)
    host.join(30)
    assert sent == "EPIPE", out  # the host's close() reached the guest as SHUTDOWN 3
    assert "RECONNECTED" in out and "CONNECT-FAIL" not in out, out
    assert host.got == [b"abc", b"2"], host.got
