"""Latency of a request/response turn through vsproxy, each row beside its floor, in one run.

    python benchmarks/bench_latency.py [--rounds N] [--runs R] [--quick] [--vsproxy-arg ARG]

Every loop is C: the floors' processes, the host ends (vsproxy.simguest._cblast's ``lat_*``)
and the simulated guest's side (``sg_rtt``: a request posted and kicked, then a sleep on the
interrupt until the answer is on the rx ring), so the figures measure vsproxy, not a Python
driver. Each round is 1 byte each way, the next request sent once the answer is in.

- floor: two C processes ping-pong over a unix socketpair (two wake-ups per round trip).
- 4-hop floor: C client -> C relay process -> C echo and back over unix socketpairs: what any
  proxy costs at best (four wake-ups).
- guest->host: the guest's C loop connects to CID 2 and pings a C echo process on the hybrid
  socket's listener path ``uds_PORT``, through vsproxy.
- host->guest: a C host client connects through the hybrid socket (``CONNECT port``, ``OK``)
  and pings an echo the guest runs in C.
- setup: REQUEST to RESPONSE through vsproxy to a unix listener that accepts (in C), against a
  unix connect() until the acceptor's first byte (connect()+accept() and back).

Figures: p50 and p99 of the round times (after a warm-up), their ratio to the row's floor (and
for vsproxy's turns, p50 over the 4-hop relay's), vsproxy's sleeps (voluntary context switches)
per round trip, and the CPU each process took per round trip (schedstat, ns resolution; vsproxy's
includes its polling). Targets (issue 19): p50 <= 1.5x and p99 <= 3x the floor, setup p50 <= 2x.
``--runs`` repeats every row (interleaved: floors, rows, floors, ...) and prints the median of each
figure over the runs (each ratio taken within its run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_throughput import _task_cpu  # the same CPU accounting as the throughput rows

from vsproxy.endpoints.listeners import hybrid_dial
from vsproxy.simguest import SimGuest, cblast

EXTRA: list[str] = []  # --vsproxy-arg
WARMUP = 200  # rounds left out of the figures: caches, page faults, the first lending to C


class Row(NamedTuple):
    name: str
    p50_us: float
    p99_us: float
    cpu: dict[str, float]  # process -> CPU µs per round trip
    wakes: float = -1.0  # vsproxy's sleeps (voluntary context switches) per round trip
    r50: float = 0.0  # p50 and p99 over the floor's, of the same run
    r99: float = 0.0
    relay: float = 0.0  # p50 over the 4-hop C relay's (vsproxy rows): what any proxy costs at best


def _ffi_lib() -> tuple[Any, Any]:
    if not cblast.AVAILABLE:
        raise SystemExit("bench_latency: vsproxy.simguest._cblast was not built (pip install -e . with a C compiler)")
    return cblast.ffi, cblast.lib


def _self_cpu() -> float:
    """CPU seconds of this process so far (schedstat: ns resolution)."""
    return _task_cpu(os.getpid())


def _check(rc: int, what: str) -> None:
    if rc:
        raise SystemExit(f"bench_latency: {what}: {os.strerror(rc)}")


# -- C processes (forked: each runs one C loop and reports its CPU) ------------------------------

def _pinger(fd: int, n: int, out: Pipe) -> None:
    ffi, lib = _ffi_lib()
    times = ffi.new("uint64_t[]", n)
    c0 = _self_cpu()
    _check(lib.lat_ping(fd, n, 1, times), "lat_ping")
    out.send((list(ffi.unpack(times, n)), _self_cpu() - c0))
    os.close(fd)


def _echoer(fd: int, n: int, out: Pipe) -> None:
    ffi, lib = _ffi_lib()
    rounds = ffi.new("uint64_t *")
    c0 = _self_cpu()
    _check(lib.lat_echo(fd, n, 1, rounds), "lat_echo")
    out.send((int(rounds[0]), _self_cpu() - c0))
    os.close(fd)


def _relayer(a: int, b: int, n: int, out: Pipe) -> None:
    ffi, lib = _ffi_lib()
    rounds = ffi.new("uint64_t *")
    c0 = _self_cpu()
    _check(lib.lat_relay(a, b, n, 1, rounds), "lat_relay")
    out.send((int(rounds[0]), _self_cpu() - c0))
    os.close(a)
    os.close(b)


def _listen_echo(path: str, n: int, ready: Pipe, out: Pipe) -> None:
    """Host echo on ``path``: accept one connection, answer ``n`` rounds."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.send(True)
    c, _ = srv.accept()
    srv.close()
    _echoer(c.detach(), n, out)


def _listen_accept(path: str, n: int, hello: bool, ready: Pipe, out: Pipe) -> None:
    _, lib = _ffi_lib()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    ready.send(True)
    c0 = _self_cpu()
    _check(lib.lat_accept(srv.fileno(), n, 1 if hello else 0), "lat_accept")
    out.send((n, _self_cpu() - c0))
    srv.close()


def _connecter(path: str, n: int, out: Pipe) -> None:
    ffi, lib = _ffi_lib()
    times = ffi.new("uint64_t[]", n)
    c0 = _self_cpu()
    _check(lib.lat_connect(path.encode(), n, times), "lat_connect")
    out.send((list(ffi.unpack(times, n)), _self_cpu() - c0))


def _hybrid_pinger(uds: str, port: int, n: int, out: Pipe) -> None:
    """Host client through the hybrid socket: CONNECT, the OK line, then the C ping loop."""
    try:
        s, _ = hybrid_dial(uds, port)
    except ConnectionError as e:
        raise SystemExit(f"bench_latency: {e}") from None
    _pinger(s.detach(), n, out)


def _start(target: object, *args: object) -> tuple[mp.Process, Pipe]:
    r, w = mp.Pipe(duplex=False)
    p = mp.Process(target=target, args=(*args, w))  # type: ignore[arg-type]
    p.start()
    w.close()
    return p, r


# -- figures ------------------------------------------------------------------------------------

def _pct(ns: list[int], q: float) -> float:
    s = sorted(ns[WARMUP:] if len(ns) > 2 * WARMUP else ns)
    return s[min(len(s) - 1, int(len(s) * q))] / 1000


def _row(name: str, ns: list[int], cpu: dict[str, float], switches: int = -1) -> Row:
    n = len(ns)
    return Row(name, _pct(ns, 0.5), _pct(ns, 0.99), {k: v * 1e6 / n for k, v in cpu.items()},
               switches / n if switches >= 0 else -1.0)


def _switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid``: how often it went to sleep."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            pass
    return total


def floor_pair(n: int) -> Row:
    a, b = socket.socketpair()
    echo, echo_out = _start(_echoer, b.fileno(), n)
    ping, ping_out = _start(_pinger, a.fileno(), n)
    ns, ping_cpu = ping_out.recv()
    a.close()
    b.close()
    _, echo_cpu = echo_out.recv()
    ping.join()
    echo.join()
    return _row("floor (2 C procs)", ns, {"client": ping_cpu, "echo": echo_cpu})


def floor_relay(n: int) -> Row:
    ca, cb = socket.socketpair()
    ea, eb = socket.socketpair()
    echo, echo_out = _start(_echoer, eb.fileno(), n)
    relay, relay_out = _start(_relayer, cb.fileno(), ea.fileno(), n)
    ping, ping_out = _start(_pinger, ca.fileno(), n)
    ns, ping_cpu = ping_out.recv()
    for s in (ca, cb, ea, eb):
        s.close()
    _, relay_cpu = relay_out.recv()
    _, echo_cpu = echo_out.recv()
    for p in (ping, relay, echo):
        p.join()
    return _row("4-hop C relay", ns, {"client": ping_cpu, "relay": relay_cpu, "echo": echo_cpu})


def floor_connect(tmp: str, n: int) -> Row:
    path = os.path.join(tmp, "floor-accept")
    ready_r, ready_w = mp.Pipe(duplex=False)
    acc, acc_out = _start(_listen_accept, path, n, True, ready_w)
    ready_r.recv()
    con, con_out = _start(_connecter, path, n)
    ns, con_cpu = con_out.recv()
    _, acc_cpu = acc_out.recv()
    con.join()
    acc.join()
    os.unlink(path)
    return _row("connect+accept", ns, {"client": con_cpu, "acceptor": acc_cpu})


class Rig:
    """vsproxy with a simulated guest (in this process) on its vhost-user socket."""

    def __init__(self, tmp: str, extra: list[str]) -> None:
        self.vhost = os.path.join(tmp, "vhost.sock")
        self.uds = os.path.join(tmp, "uds")
        self.log = open(os.path.join(tmp, "vsproxy.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vsproxy", "--socket", self.vhost, "--guest-cid", "5", "--uds-path", self.uds,
             "-q", *extra], stderr=self.log,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.vhost):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("bench_latency: vsproxy did not start")
            time.sleep(0.02)
        self.guest = SimGuest(self.vhost, timeout=30, record_limit=0)
        self.guest.start()
        self.port = 20000

    def _cpu(self) -> tuple[float, float]:
        return _task_cpu(self.proc.pid), _self_cpu()

    def switches(self) -> int:
        return _switches(self.proc.pid)

    def guest_to_host(self, n: int) -> Row:
        self.port += 1
        path = f"{self.uds}_{self.port}"
        ready_r, ready_w = mp.Pipe(duplex=False)
        echo, echo_out = _start(_listen_echo, path, n, ready_w)
        ready_r.recv()
        s = self.guest.connect(self.port)
        w0, (v0, g0) = self.switches(), self._cpu()
        ns = s.ping(n)
        v1, g1 = self._cpu()
        w1 = self.switches()
        s.close()
        _, echo_cpu = echo_out.recv()
        echo.join()
        return _row("guest->host", ns, {"guest": g1 - g0, "vsproxy": v1 - v0, "echo": echo_cpu}, w1 - w0)

    def host_to_guest(self, n: int) -> Row:
        self.port += 1
        lst = self.guest.listen(self.port)
        ping, ping_out = _start(_hybrid_pinger, self.uds, self.port, n)
        s = lst.accept(timeout=10)
        w0, (v0, g0) = self.switches(), self._cpu()
        s.echo(n)
        v1, g1 = self._cpu()
        w1 = self.switches()
        ns, ping_cpu = ping_out.recv()
        ping.join()
        s.close()
        lst.close()
        return _row("host->guest", ns, {"client": ping_cpu, "vsproxy": v1 - v0, "guest": g1 - g0}, w1 - w0)

    def setup(self, n: int) -> Row:
        self.port += 1
        path = f"{self.uds}_{self.port}"
        ready_r, ready_w = mp.Pipe(duplex=False)
        acc, acc_out = _start(_listen_accept, path, n, False, ready_w)
        ready_r.recv()
        ns: list[int] = []
        v_cpu = g_cpu = 0.0
        wakes = 0
        for _ in range(n):
            w0, (v0, g0) = self.switches(), self._cpu()
            s, t = self.guest.connect_timed(self.port)
            v1, g1 = self._cpu()
            wakes += self.switches() - w0
            ns.append(t)
            v_cpu += v1 - v0
            g_cpu += g1 - g0
            s.close(timeout=10)
        _, acc_cpu = acc_out.recv()
        acc.join()
        return _row("setup (connect)", ns, {"guest": g_cpu, "vsproxy": v_cpu, "acceptor": acc_cpu}, wakes)

    def close(self) -> str:
        """Stop vsproxy; its busy-poll line (what polling caught and cost), or ""."""
        self.guest.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()
        with open(self.log.name, errors="replace") as f:
            return next((line.strip() for line in f if line.startswith("busy poll:")), "")


def one_run(tmp: str, rounds: int, setups: int, extra: list[str]) -> list[Row]:
    """Every row once, each floor measured just before the rows it is the floor of; each row's
    ratios to its floor of this run."""
    rows = [floor_pair(rounds), floor_relay(rounds)]
    sub = tempfile.mkdtemp(dir=tmp)
    rig = Rig(sub, extra)
    try:
        rows += [rig.guest_to_host(rounds), rig.host_to_guest(rounds)]
        rows.append(floor_connect(sub, setups))
        rows.append(rig.setup(setups))
    finally:
        polled = rig.close()
    print(f"vsproxy {polled or 'busy poll: off'}", flush=True)
    by = {r.name: r for r in rows}
    out = []
    for r in rows:
        fl = by.get(FLOOR_OF.get(r.name, ""))
        if fl:
            r = r._replace(r50=r.p50_us / fl.p50_us, r99=r.p99_us / fl.p99_us)
        if r.name in ("guest->host", "host->guest"):
            r = r._replace(relay=r.p50_us / by["4-hop C relay"].p50_us)
        out.append(r)
    return out


FLOOR_OF = {"4-hop C relay": "floor (2 C procs)", "guest->host": "floor (2 C procs)",
            "host->guest": "floor (2 C procs)", "setup (connect)": "connect+accept"}
TARGET = {"guest->host": (1.5, 3.0), "host->guest": (1.5, 3.0), "setup (connect)": (2.0, 0.0)}


def print_table(rows: list[Row]) -> None:
    print(f"{'row':<18} {'p50 µs':>8} {'p99 µs':>8} {'p50/floor':>9} {'p99/floor':>9} {'target':>10} "
          f"{'p50/4-hop':>9} {'vsp sleeps':>10}  CPU µs per round trip")
    for r in rows:
        r50 = f"{r.r50:.2f}x" if r.r50 else "-"
        r99 = f"{r.r99:.2f}x" if r.r99 else "-"
        t = TARGET.get(r.name)
        target = "-" if t is None else (f"{t[0]}x/{t[1]}x" if t[1] else f"{t[0]}x")
        wakes = f"{r.wakes:.2f}" if r.wakes >= 0 else "-"
        relay = f"{r.relay:.2f}x" if r.relay else "-"
        cpu = " ".join(f"{k} {v:.1f}" for k, v in r.cpu.items())
        print(f"{r.name:<18} {r.p50_us:>8.1f} {r.p99_us:>8.1f} {r50:>9} {r99:>9} {target:>10} {relay:>9} {wakes:>10}  "
              f"{cpu}", flush=True)


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Per row, the median of each figure over the runs (ratios of each run to its own floor)."""
    out = []
    for k in range(len(runs[0])):
        rs = [run[k] for run in runs]
        med = statistics.median
        out.append(Row(rs[0].name, med(r.p50_us for r in rs), med(r.p99_us for r in rs),
                       {p: med(r.cpu[p] for r in rs) for p in rs[0].cpu}, med(r.wakes for r in rs),
                       med(r.r50 for r in rs), med(r.r99 for r in rs), med(r.relay for r in rs)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds, one run (a smoke run, figures are noisy)")
    ap.add_argument("--rounds", type=int, default=20000, help="round trips per row (default 20000)")
    ap.add_argument("--setups", type=int, default=2000, help="connections for the setup rows (default 2000)")
    ap.add_argument("--runs", type=int, default=3, help="runs of every row, interleaved; the median is printed")
    ap.add_argument("--vsproxy-arg", action="append", default=[], help="extra vsproxy option (repeatable)")
    args = ap.parse_args()
    _ffi_lib()
    if args.quick:
        args.rounds, args.setups, args.runs = 1000, 100, 1
    if args.rounds < 1 or args.setups < 1 or args.runs < 1:
        ap.error("--rounds, --setups and --runs must be at least 1")
    extra = [*EXTRA, *args.vsproxy_arg]
    runs: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="vsp-lat-") as tmp:
        for k in range(args.runs):
            rows = one_run(tmp, args.rounds, args.setups, extra)
            if args.runs > 1:
                print(f"run {k + 1}:")
                print_table(rows)
            runs.append(rows)
    if args.runs > 1:
        print(f"median of {args.runs} runs:")
    print_table(median_rows(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
