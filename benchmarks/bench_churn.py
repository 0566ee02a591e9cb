"""Connection churn: connect/transfer/close cycles, then vsproxy back to its baseline.

    python benchmarks/bench_churn.py [--cycles N] [--quick]

One vsproxy process serves one simulated guest. Three kinds of cycle, N of each (default
100,000), one after another:

- guest -> unix: the guest connects to CID 2 port 5000, which vsproxy hands to a host unix
  listener (``uds_5000``); it sends 1..2048 random bytes, half-closes, reads the echo back to
  the host's EOF and closes (SHUTDOWN, vsproxy's RST);
- guest -> tcp: the same to port 5001, which ``forward=5001=tcp:127.0.0.1:P`` hands to a TCP
  listener on 127.0.0.1;
- host -> guest: a host program connects to the hybrid socket, sends ``CONNECT 6000`` and the
  bytes at once, half-closes; the guest accepts, reads to EOF, echoes, closes; the host reads
  ``OK <port>`` and the echo to vsproxy's EOF.

Every echo is compared with what was sent. The host echo server runs in its own process
(one selector, no thread per connection). Printed: cycles/s per kind, and vsproxy's open
descriptors (/proc/PID/fd), RSS and connection table (its control socket's snapshot) after a
warm-up and after all the cycles. Descriptors and table must come back exactly, RSS within
``--rss-bound`` KiB (default 4096); the exit status is 1 when one does not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event

from vsproxy import ctl
from vsproxy.simguest import GuestListener, SimGuest

UNIX_PORT, TCP_PORT, GUEST_PORT = 5000, 5001, 6000
MAX_PAYLOAD = 2048
RSS_BOUND_KIB = 4096


def _echo_host(unix_path: str, stop: Event, ready: Pipe) -> None:
    """Host echo service on a unix and a TCP listener: echoes, and closes after the peer's EOF."""
    sel = selectors.DefaultSelector()
    listeners = []
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.bind(unix_path)
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("127.0.0.1", 0))
    for s in (u, t):
        s.listen(1024)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, None)
        listeners.append(s)
    ready.send(t.getsockname()[1])
    while not stop.is_set():
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:
                try:
                    c, _ = sock.accept()
                except OSError:
                    continue
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, True)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                sock.setblocking(True)  # payloads are small: the send never waits long
                sock.sendall(data)
                sock.setblocking(False)
            else:
                sel.unregister(sock)
                sock.close()
    for s in listeners:
        s.close()


@dataclass(frozen=True, slots=True)
class Baseline:
    fds: int
    rss_kib: int
    table: int  # connections in vsproxy's snapshot


class ChurnRig:
    """vsproxy (with a control socket), the host echo process and one simulated guest."""

    def __init__(self, tmp: str, keys: str = "", extra: tuple[str, ...] = ()) -> None:
        """``keys``: more ``--vm`` keys for the guest's device (named ``churn``, CID 5);
        ``extra``: more vsproxy arguments (other devices)."""
        self.tmp = tmp
        self.vhost = os.path.join(tmp, "vhost.sock")
        self.uds = os.path.join(tmp, "h")
        self.control = os.path.join(tmp, "ctl")
        self.log_path = os.path.join(tmp, "vsproxy.log")
        self._stop = mp.Event()
        r, w = mp.Pipe()
        self._echo = mp.Process(target=_echo_host, args=(f"{self.uds}_{UNIX_PORT}", self._stop, w), daemon=True)
        self._echo.start()
        self.tcp_port = int(r.recv())
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vsproxy", "--vm",
             f"name=churn,guest-cid=5,socket={self.vhost},uds-path={self.uds},"
             f"forward={TCP_PORT}=tcp:127.0.0.1:{self.tcp_port}{keys}", "--control", self.control, *extra],
            stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 15
        while not (os.path.exists(self.vhost) and os.path.exists(self.control)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"vsproxy did not start:\n{self.log()}")
            time.sleep(0.02)
        self.guest = SimGuest(self.vhost, timeout=20, record_limit=0)
        self.guest.start()
        self.listener: GuestListener = self.guest.listen(GUEST_PORT, backlog=64)
        self.rng = random.Random(1)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def payload(self) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, MAX_PAYLOAD))

    # -- the cycles ------------------------------------------------------------------------------

    def guest_cycle(self, port: int) -> None:
        data = self.payload()
        s = self.guest.connect(port)
        s.sendall(data)
        s.shutdown_write()
        got = s.recv_all()
        s.close()
        if got != data:
            raise AssertionError(f"guest -> {port}: {len(got)} bytes back for {len(data)} sent, or different")

    def host_cycle(self) -> None:
        data = self.payload()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as h:
            h.settimeout(20)
            h.connect(self.uds)
            h.sendall(b"CONNECT %d\n" % GUEST_PORT + data)
            h.shutdown(socket.SHUT_WR)
            gs = self.listener.accept(timeout=20)
            got = gs.recv_all()
            gs.sendall(got)
            gs.close()
            back = bytearray()
            while chunk := h.recv(65536):
                back += chunk
        line, _, echoed = bytes(back).partition(b"\n")
        if not line.startswith(b"OK ") or got != data or echoed != data:
            raise AssertionError(f"host -> guest: line {line[:40]!r}, guest got {len(got)} of {len(data)} bytes, "
                                 f"host got {len(echoed)} back")

    def kinds(self) -> dict[str, Callable[[], None]]:
        return {"guest->unix": lambda: self.guest_cycle(UNIX_PORT),
                "guest->tcp": lambda: self.guest_cycle(TCP_PORT),
                "host->guest": self.host_cycle}

    # -- what vsproxy holds ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        return ctl.snapshot(self.control)

    def table(self) -> int:
        snap = self.snapshot()
        devices = snap["devices"]
        conns = snap["connections"]
        assert isinstance(devices, list) and isinstance(conns, list)
        return max(len(conns), sum(int(d["connections"]) for d in devices))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def settle(self, want_fds: int | None = None, want_table: int = 0, timeout: float = 10.0) -> Baseline:
        """What vsproxy holds once the table is down to ``want_table`` and its descriptor count stops moving
        (the control client's own descriptor closes just after the answer), or reaches
        ``want_fds``; the guest keeps polling meanwhile."""
        deadline = time.monotonic() + timeout
        last, same = -1, 0
        while True:
            self.guest.poll(0.02)
            table = self.table()
            fds = self.fds()
            same = same + 1 if fds == last else 0
            last = fds
            done = fds == want_fds if want_fds is not None else same >= 5
            if (table == want_table and done) or time.monotonic() > deadline:
                return Baseline(fds, self.rss_kib(), table)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if getattr(self, "guest", None) is not None:
            self.guest.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._stop.set()
        self._echo.join(5)


@dataclass(frozen=True, slots=True)
class ChurnResult:
    rates: dict[str, float]  # cycles per second, per kind
    before: Baseline
    after: Baseline
    rss_bound_kib: int
    guest_conns: int  # connections the simulated guest still holds

    @property
    def ok(self) -> bool:
        return (self.after.fds == self.before.fds and self.after.table == self.before.table == 0
                and self.after.rss_kib - self.before.rss_kib <= self.rss_bound_kib and self.guest_conns == 0)


def run_churn(cycles: int, warmup: int = 500, rss_bound_kib: int = RSS_BOUND_KIB,
              report: Callable[[str], None] | None = None) -> ChurnResult:
    """``warmup`` cycles of each kind, the baseline, ``cycles`` of each kind, the baseline again."""
    with tempfile.TemporaryDirectory(prefix="vsp-churn-") as tmp:
        rig = ChurnRig(tmp)
        try:
            kinds = rig.kinds()
            for cycle in kinds.values():
                for _ in range(warmup):
                    cycle()
            before = rig.settle()
            rates: dict[str, float] = {}
            for name, cycle in kinds.items():
                start = time.monotonic()
                for _ in range(cycles):
                    cycle()
                rates[name] = cycles / (time.monotonic() - start)
                if report is not None:
                    report(f"{name:<12} {cycles:>9,} cycles {rates[name]:>9,.0f} cycles/s")
            after = rig.settle(want_fds=before.fds)
            if not rig.alive():
                raise RuntimeError(f"vsproxy exited:\n{rig.log()[-3000:]}")
            if "Traceback" in rig.log():
                raise RuntimeError(f"vsproxy logged a traceback:\n{rig.log()[-3000:]}")
            return ChurnResult(rates, before, after, rss_bound_kib, len(rig.guest.driver.conns))
        finally:
            rig.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=100_000, help="cycles of each kind (default 100,000)")
    ap.add_argument("--quick", action="store_true", help="1,000 cycles of each kind (a smoke run)")
    ap.add_argument("--rss-bound", type=int, default=RSS_BOUND_KIB, metavar="KIB",
                    help=f"RSS growth allowed after the warm-up (default {RSS_BOUND_KIB} KiB)")
    args = ap.parse_args()
    cycles = 1000 if args.quick else args.cycles
    if cycles < 1:
        ap.error("--cycles must be at least 1")
    print(f"{cycles:,} connect/transfer/close cycles of each kind, 1..{MAX_PAYLOAD} bytes echoed each", flush=True)
    res = run_churn(cycles, warmup=min(500, cycles), rss_bound_kib=args.rss_bound,
                    report=lambda line: print(line, flush=True))
    b, a = res.before, res.after
    print(f"{'':<12} {'after warm-up':>14} {'after churn':>12}")
    print(f"{'open fds':<12} {b.fds:>14} {a.fds:>12}   {'same' if a.fds == b.fds else 'DIFFERENT'}")
    print(f"{'conn table':<12} {b.table:>14} {a.table:>12}   {'same' if a.table == b.table == 0 else 'DIFFERENT'}")
    grew = a.rss_kib - b.rss_kib
    print(f"{'RSS KiB':<12} {b.rss_kib:>14,} {a.rss_kib:>12,}   {grew:+,} KiB "
          f"({'within' if grew <= res.rss_bound_kib else 'PAST'} the {res.rss_bound_kib:,} KiB bound)")
    print(f"guest connections left: {res.guest_conns}")
    print("baseline: " + ("back" if res.ok else "NOT back"))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
