"""Shared test helpers: a vsproxy process, host echo/sink servers, guest-side transfer loops."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsproxy.simguest import GuestSocket, SimGuest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vsproxy.app import Proxy


class VsproxyProcess:
    """``python -m vsproxy`` as a real process, stopped by its own pid."""

    def __init__(self, args: list[str], socket_path: str, log_path: str, nofile: int | None = None) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._log = open(log_path, "wb")

        def limit() -> None:  # in the child, before exec: soft and hard, so vsproxy cannot raise it
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vsproxy", *args], stdout=subprocess.DEVNULL, stderr=self._log,
            preexec_fn=limit if nofile is not None else None,
        )
        deadline = time.monotonic() + 15
        while not os.path.exists(socket_path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"vsproxy exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vsproxy did not create {socket_path}:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def report(self) -> str:
        """Counters via SIGUSR1 (printed to stderr)."""
        before = len(self.log())
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = self.log()[before:]
            if "sessions=" in text:
                return text
            time.sleep(0.02)
        raise AssertionError("no counters report after SIGUSR1")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclass
class EchoServer:
    """A host echo (or sink) service on a unix or TCP socket, one thread per connection."""

    sock: socket.socket
    sink: bool = False
    received: list[bytes] = field(default_factory=list)
    conns: list[socket.socket] = field(default_factory=list)
    stall: threading.Event | None = None  # while set, connections do not read
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock.listen(128)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(30)
        buf = bytearray()
        try:
            while True:
                if self.stall is not None:
                    while self.stall.is_set() and not self._stop.is_set():
                        time.sleep(0.01)
                data = c.recv(65536)
                if not data:
                    break
                if self.sink:
                    buf += data
                else:
                    c.sendall(data)
            if not self.sink:
                c.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            self.received.append(bytes(buf))
            c.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


def unix_server(path: str, **kw: object) -> EchoServer:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    return EchoServer(s, **kw)  # type: ignore[arg-type]


def tcp_server(**kw: object) -> EchoServer:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return EchoServer(s, **kw)  # type: ignore[arg-type]


def hybrid_connect(uds: str, guest: SimGuest, port: int) -> tuple[socket.socket, GuestSocket]:
    """A host program's hybrid CONNECT into a guest listener on ``port``: the host socket (past
    its OK line) and the guest's accepted socket."""
    lst = guest.listen(port)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.connect(uds)
    host.sendall(b"CONNECT %d\n" % port)
    gs = lst.accept(timeout=10)
    line = host.recv(64)
    assert line.startswith(b"OK "), line
    return host, gs


def send_then_shut(sock: socket.socket, data: bytes) -> threading.Thread:
    """A host program in a thread: sends ``data``, then half-closes (the guest sees EOF)."""

    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    return t


def echo_many(guest: SimGuest, socks: list[GuestSocket], payloads: list[bytes], chunk: int = 32768,
              timeout: float = 60.0) -> list[bytes]:
    """Send each payload on its socket and read the echo back, interleaved so no one blocks."""
    sent = [0] * len(socks)
    got = [bytearray() for _ in socks]
    done = [False] * len(socks)
    deadline = time.monotonic() + timeout
    while not all(done):
        if time.monotonic() > deadline:
            raise TimeoutError(f"echo_many: {sum(done)}/{len(done)} done, got {[len(g) for g in got]}")
        progressed = False
        for i, s in enumerate(socks):
            if done[i]:
                continue
            if sent[i] < len(payloads[i]) and s.conn.peer_free() >= min(chunk, len(payloads[i]) - sent[i]):
                piece = payloads[i][sent[i] : sent[i] + chunk]
                s.sendall(piece)
                sent[i] += len(piece)
                if sent[i] == len(payloads[i]):
                    s.shutdown_write()
                progressed = True
            while s.conn.rx:
                got[i] += s.recv(1 << 20, timeout=1)
                progressed = True
            if sent[i] == len(payloads[i]) and len(got[i]) >= len(payloads[i]):
                done[i] = True
        if not progressed:
            guest.poll(0.05)
    return [bytes(g) for g in got]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def running(proxy: Proxy) -> Iterator[Proxy]:
    """vsproxy in this process: started, its loop in a thread, stopped and closed at the end."""
    proxy.start()
    t = threading.Thread(target=proxy.run, daemon=True)
    t.start()
    try:
        yield proxy
    finally:
        proxy.stop()
        t.join(10)
        assert not t.is_alive()
        proxy.close()
