"""One tenant's flood against another's throughput: device B's rate while device A floods.

    python benchmarks/bench_flood.py [--seconds S] [--quick]

One vsproxy serves two simulated guests, A and B, at the file limit this shell gives it
(vsproxy raises its soft limit to the hard one, as it does in production). B streams 64 KiB
packets to a host sink (the bulk guest-to-host path). Its rate is measured alone, then while
A floods in each way one guest or one host program can:

- guest connections: A's guest opens connections to a host listener until vsproxy refuses
  (A's connection limit), closes them all, and starts again;
- idle host connections: a host program opens connections to A's hybrid socket and sends
  nothing, thousands of them (the oldest are dropped at the handshake limit);
- CONNECT flood: host programs send ``CONNECT`` lines to a port A does not listen on, one
  connection after another, as fast as they can (A's guest answers each with RST);
- connect loop: A's guest opens connections in a loop, 100,000 attempts (``--attempts``):
  raw REQUESTs from a new port each, as fast as the ring takes them, to a host listener that
  accepts and closes (each is a real host connect, answered RESPONSE, then RST by A's guest
  as Linux answers a RESPONSE it did not ask for), each followed by a raw CREDIT_REQUEST on an
  open connection; the flood goes on until B is measured and the attempts are all made;
- requests, no rx: A's guest posts no rx buffers and floods REQUESTs and CREDIT_REQUESTs;
  the replies pile up to A's ``--max-control`` and A's tx ring waits (``control_full``).

Printed: B's rate alone and under each flood (the target is at least 80% of alone), whether
B's transfers all finished byte-complete, what A's flood achieved meanwhile, and vsproxy's
RSS and open descriptors before and after.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event

from bench_throughput import HostReader  # the same host reader as the throughput rows

from vsproxy.limits import default_limits, nofile_limit
from vsproxy.simguest import SimGuest, SimGuestError
from vsproxy.vsock import header as H
from vsproxy.vsock.header import Op

MiB = 1 << 20
PAYLOAD = 65536
TARGET = 0.80


def _guest_connection_flood(vhost: str, uds: str, stop: Event, result: Pipe) -> None:
    """A's guest: connect until refused, close them all, again."""
    path = f"{uds}_5000"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4096)
    srv.setblocking(False)
    held_host: list[socket.socket] = []
    opened = refused = rounds = 0
    with SimGuest(vhost, timeout=30, record_limit=0) as g:
        while not stop.is_set():
            socks = []
            while not stop.is_set():
                try:
                    socks.append(g.connect(5000, timeout=10))
                    opened += 1
                except ConnectionResetError:
                    refused += 1
                    break
                while True:
                    try:
                        held_host.append(srv.accept()[0])
                    except BlockingIOError:
                        break
            for s in socks:
                s.close(timeout=10)
            for h in held_host:
                h.close()
            held_host.clear()
            rounds += 1
    result.send(f"{opened} connections opened, {refused} refused at the limit, {rounds} rounds")


def _idle_host_flood(uds: str, stop: Event, result: Pipe) -> None:
    """A host program: idle connections to A's hybrid socket, as many as it can keep."""
    held: list[socket.socket] = []
    opened = 0
    while not stop.is_set():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect(uds)
        except OSError:
            s.close()
            time.sleep(0.01)
            continue
        opened += 1
        held.append(s)
        if len(held) >= 4000:  # the flooder's own descriptors: recycle its oldest
            for old in held[:1000]:
                old.close()
            del held[:1000]
    for s in held:
        s.close()
    result.send(f"{opened} idle connections opened")


def _connect_flood(uds: str, stop: Event, result: Pipe) -> None:
    n = 0
    while not stop.is_set():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            try:
                s.connect(uds)
                s.sendall(b"CONNECT 4444\n")
                s.recv(64)
            except OSError:
                continue
        n += 1
    result.send(f"{n} CONNECTs answered")


def _accept_and_close(srv: socket.socket, stop: threading.Event) -> int:
    """Take every connection waiting on ``srv`` and close it; how many."""
    n = 0
    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except (BlockingIOError, InterruptedError):
            return n
        except OSError:
            return n
        c.close()
        n += 1
    return n


def _raw_flood(vhost: str, uds: str, attempts: int, rx: bool, stop: Event, result: Pipe) -> None:
    """A's guest: raw REQUESTs from new ports to a host listener that accepts and closes, each
    followed by a CREDIT_REQUEST on one open connection; until stopped and ``attempts`` made.
    Without ``rx`` the guest posts no rx buffers once its connection is open."""
    port_to = 5002 if rx else 5003
    path = f"{uds}_{port_to}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4096)
    srv.setblocking(False)
    requests = credit_requests = accepted = 0
    start = time.monotonic()
    finished_at = 0.0
    with SimGuest(vhost, timeout=30, record_limit=0) as g:
        keep = threading.Event()

        def accept_loop() -> None:
            nonlocal accepted
            while not keep.is_set():
                accepted += _accept_and_close(srv, keep)
                time.sleep(0.001)

        acceptor = threading.Thread(target=accept_loop, daemon=True)
        acceptor.start()
        sock = g.connect(port_to, timeout=10)  # the open connection the CREDIT_REQUESTs name
        c = sock.conn
        credit_hdr = H.pack(g.guest_cid, 2, c.local_port, port_to, 0, H.Type.STREAM, Op.CREDIT_REQUEST, 0,
                            c.buf_alloc, 0)
        if not rx:
            g.driver.pause_rx()
        drv = g.driver
        port = 1 << 20
        while not (stop.is_set() and (requests >= attempts or not rx)):
            if requests >= attempts and not finished_at:
                finished_at = time.monotonic()
            if len(drv.tx_free_slots) < 2 or len(drv.tx.free) < 2:
                g.poll(0.002)  # the ring is full: wait for vsproxy (with no rx, it may never come)
                continue
            port += 1
            g.send_raw(H.pack(g.guest_cid, 2, port, port_to, 0, H.Type.STREAM, Op.REQUEST, 0, 65536, 0))
            g.send_raw(credit_hdr)
            requests += 1
            credit_requests += 1
            if requests % 64 == 0:
                g.poll(0)
        if not finished_at and requests >= attempts:
            finished_at = time.monotonic()
        if not rx:
            drv.resume_rx()
        for _ in range(50):
            g.poll(0.01)
        keep.set()
        acceptor.join(5)
    took = (finished_at or time.monotonic()) - start
    result.send(f"{requests:,} REQUESTs + {credit_requests:,} CREDIT_REQUESTs from A"
                + (f" ({attempts:,} in {took:.1f} s)" if finished_at else "") + f", {accepted:,} host connects")


def _guest_poller(vhost: str, stop: Event, result: Pipe) -> None:
    """A's guest, attached and answering (RST to REQUESTs for ports it does not listen on)."""
    with SimGuest(vhost, timeout=30, record_limit=0) as g:
        while not stop.is_set():
            g.poll(0.01)
    result.send("")


class Rig:
    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.a, self.b = os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")
        self.ha, self.hb = os.path.join(tmp, "ha"), os.path.join(tmp, "hb")
        self.log = open(os.path.join(tmp, "vsproxy.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vsproxy", "--vm", f"name=A,guest-cid=5,socket={self.a},uds-path={self.ha}",
             "--vm", f"name=B,guest-cid=6,socket={self.b},uds-path={self.hb}"], stderr=self.log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.a):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("vsproxy did not start")
            time.sleep(0.02)
        self.guest = SimGuest(self.b, timeout=60, buf_alloc=262144, record_limit=0)
        self.guest.start()
        self.port = 6000

    def b_rate(self, count: int, pace: float = 0.0) -> tuple[float, bool]:
        """B's guest-to-host bytes per second for ``count`` 64 KiB packets, sent as fast as they
        go, or at ``pace`` bytes per second (bursts every 10 ms) if given; and whether all of it
        arrived (a stalled transfer ends at the guest's timeout and counts what came)."""
        self.port += 1
        path = f"{self.hb}_{self.port}"
        reader = HostReader(path, PAYLOAD * count)
        s = self.guest.connect(self.port)
        payload = b"\xa5" * PAYLOAD
        start = time.monotonic()
        try:
            if pace:
                per = max(1, int(pace * 0.01 / PAYLOAD))
                sent = 0
                while sent < count:
                    n = min(per, count - sent)
                    s.blast(payload, n)
                    sent += n
                    due = start + sent * PAYLOAD / pace
                    if due > time.monotonic():
                        time.sleep(due - time.monotonic())
            else:
                s.blast(payload, count)
        except SimGuestError:
            pass
        s.close()  # the reader sees EOF if the transfer stalled
        got, end = reader.result()
        return float(got / (max(end, start) - start)), got == PAYLOAD * count

    def median_rate(self, count: int, pace: float, repeat: int) -> tuple[float, bool]:
        runs = [self.b_rate(count, pace) for _ in range(repeat)]
        return sorted(r for r, _ in runs)[repeat // 2], all(done for _, done in runs)

    def status(self) -> tuple[int, int]:
        """vsproxy's RSS in KiB and its open descriptors."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def cpu(self) -> float:
        """vsproxy's CPU seconds so far (user and system)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def report(self) -> str:
        before = self.log.tell()
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        with open(self.log.name, errors="replace") as f:
            f.seek(before)
            return f.read()

    def close(self) -> None:
        self.guest.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def flood_processes(name: str, rig: Rig, stop: Event, w: Pipe, attempts: int) -> list[mp.Process]:
    """The processes that make flood ``name`` against device A (each reports on ``w``)."""
    if name == "guest connections":
        return [mp.Process(target=_guest_connection_flood, args=(rig.a, rig.ha, stop, w))]
    if name in ("connect loop", "requests, no rx"):
        return [mp.Process(target=_raw_flood, args=(rig.a, rig.ha, attempts, name == "connect loop", stop, w))]
    flooder = _idle_host_flood if name == "idle host conns" else _connect_flood
    return [mp.Process(target=_guest_poller, args=(rig.a, stop, w)), mp.Process(target=flooder, args=(rig.ha, stop, w))]


def a_counters(report: str) -> str:
    """Device A's refusals from a SIGUSR1 report (its row has counters while a guest is attached)."""
    a = re.search(r"\bA: sessions=.*$", report, re.M)
    return " ".join(f for f in (a.group(0).split() if a else [])
                    if f.startswith(("rst=", "limit_refused=", "control_full=", "buffer_resets="))) or "?"


FLOODS = ("guest connections", "idle host conns", "CONNECT flood", "connect loop", "requests, no rx")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short transfers (a smoke run, figures are noisy)")
    ap.add_argument("--repeat", type=int, default=3, help="transfers per figure, median taken (default 3)")
    ap.add_argument("--attempts", type=int, default=0, metavar="N",
                    help="the connect loop's attempts (default 100,000; 5,000 with --quick)")
    ap.add_argument("--pace", type=float, default=400.0, metavar="MB/S",
                    help="B's stream rate, as a busy tenant's (default 400 MB/s; 0: as fast as it goes)")
    args = ap.parse_args()
    pace = args.pace * 1e6
    # about 3 s a transfer at the paced rate
    count = (300 if args.quick else 3000) * max(1, int(args.pace // 100)) if pace else (3000 if args.quick else 30000)
    repeat = 1 if args.quick else args.repeat
    attempts = args.attempts or (5000 if args.quick else 100_000)
    nofile = nofile_limit()
    lim = default_limits(nofile, 2)
    print(f"file limit {nofile}: per device {lim.max_connections} connections, {lim.max_pending} pending, "
          f"{lim.max_handshakes} per hybrid socket in the handshake; B streams {count} x 64 KiB per transfer, "
          + (f"paced at {args.pace:,.0f} MB/s" if pace else "as fast as it goes"))
    with tempfile.TemporaryDirectory(prefix="vsp-flood-") as tmp:
        rig = Rig(tmp)
        try:
            rig.b_rate(max(300, count // 10))  # warm-up
            rss0, fds0 = rig.status()
            cpu0, t0 = rig.cpu(), time.monotonic()
            alone, done_alone = rig.median_rate(count, pace, repeat)
            load_alone = (rig.cpu() - cpu0) / (time.monotonic() - t0)
            print(f"{'A floods with':<18} {'B MB/s':>8} {'vs alone':>9} {'target':>7} {'B done':>6}  "
                  "what A's flood did")
            print(f"{'(nothing)':<18} {alone / 1e6:>8,.0f} {'100%':>9} {'':>7} {'yes' if done_alone else 'NO':>6}  "
                  f"vsproxy CPU {load_alone:.0%}")
            worst = 1.0
            all_done = done_alone
            for name in FLOODS:
                stop = mp.Event()
                r, w = mp.Pipe()
                procs = flood_processes(name, rig, stop, w, attempts)
                for p in procs:
                    p.start()
                time.sleep(1.0)  # the flood is under way before B starts
                cpu0, t0 = rig.cpu(), time.monotonic()
                rate, done = rig.median_rate(count, pace, repeat)
                load = (rig.cpu() - cpu0) / (time.monotonic() - t0)
                a_now = a_counters(rig.report())  # while A's guest is still attached (the row has them then)
                stop.set()
                did = [r.recv() if r.poll(120) else "(no report)" for _ in procs]
                if name in ("connect loop", "requests, no rx"):
                    did.append(f"A: {a_now}")
                for p in procs:
                    p.join(30)
                ratio = rate / alone
                worst = min(worst, ratio)
                all_done = all_done and done
                ok = "ok" if ratio >= TARGET else "BELOW"
                print(f"{name:<18} {rate / 1e6:>8,.0f} {ratio:>9.0%} {ok:>7} {'yes' if done else 'NO':>6}  "
                      f"{'; '.join(d for d in did if d)}; vsproxy CPU {load:.0%}", flush=True)
            time.sleep(1.5)
            rss1, fds1 = rig.status()
            report = rig.report()
            m = re.search(r"^process: (.*)$", report, re.M)
            print(f"vsproxy RSS {rss0:,} KiB before the floods, {rss1:,} KiB after; open descriptors {fds0} "
                  f"before, {fds1} after")
            print(f"counters: {m.group(1) if m else '?'}")
            print(f"worst: B kept {worst:.0%} of its rate alone (target {TARGET:.0%}); B's transfers "
                  + ("all finished" if all_done else "did NOT all finish"))
        finally:
            rig.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
