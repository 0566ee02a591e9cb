"""Many connections and many devices (issue 19 item 6): what one vsproxy process gives when the
traffic is spread.

    python benchmarks/bench_scale.py [--connections N] [--devices N] [--seconds S] [--quick]

1. One guest streams 64 KiB packets on N concurrent connections (4,096 by default) to a host
   unix listener, round-robin, each as far as its credit allows; a host sink reads them all.
   Printed: the aggregate rate beside the same sender on one connection (target: at least 80%),
   and fairness: the bytes of the slowest connection against the mean (target: at least half).
   The guest side is Python here (one sender for both figures, so the ratio compares vsproxy,
   not two senders); bench_throughput.py gives the C-driven single-connection figure.
2. N devices (64 by default) in one vsproxy, each with its own simulated guest (a process, its
   sender in C) streaming 64 KiB packets to its own host sink: the aggregate rate beside one
   device's, measured in the same run (target: at least 70%).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event

from vsproxy.simguest import SimGuest
from vsproxy.simguest.driver import Conn
from vsproxy.simguest.ring import Buf
from vsproxy.vsock import header as H

PAYLOAD = 65536
MiB = 1 << 20


def start_vsproxy(tmp: str, devices: list[tuple[int, str, str]]) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "vsproxy", "-q"]
    for cid, vhost, uds in devices:
        args += ["--vm", f"guest-cid={cid},socket={vhost},uds-path={uds}"]
    log = open(os.path.join(tmp, f"vsproxy-{len(devices)}.log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(v) for _, v, _ in devices):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vsproxy did not start: see {log.name}")
        time.sleep(0.05)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sink(paths: list[str], expect: int, ready: Pipe, control: Pipe) -> None:
    """Accept ``expect`` connections on ``paths``; count each one's bytes between the "go" and
    "stop" messages on ``control``; send the counts back."""
    sel = selectors.DefaultSelector()
    for p in paths:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(p)
        srv.listen(4096)
        srv.setblocking(False)
        sel.register(srv, selectors.EVENT_READ, None)
    sel.register(control, selectors.EVENT_READ, "control")
    ready.send("listening")
    buf = bytearray(1 << 20)
    counts: dict[int, int] = {}
    counting = False
    while True:
        for key, _ in sel.select():
            if key.data == "control":
                msg = control.recv()
                if msg == "go":
                    counting = True
                    counts = dict.fromkeys(counts, 0)
                elif msg == "stop":
                    control.send(list(counts.values()))
                    return
            elif key.data is None:
                while True:
                    try:
                        c, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, c.fileno())
                    counts[c.fileno()] = 0
            else:
                try:
                    n = key.fileobj.recv_into(buf)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                if n == 0:
                    sel.unregister(key.fileobj)
                    continue
                if counting:
                    counts[key.data] += n


def many_connections(tmp: str, n: int, seconds: float) -> tuple[float, list[int]]:
    """Aggregate bytes/s of ``n`` connections from one guest, and each one's bytes."""
    d = tempfile.mkdtemp(dir=tmp)
    vhost, uds = os.path.join(d, "v.sock"), os.path.join(d, "h.sock")
    proc = start_vsproxy(d, [(5, vhost, uds)])
    ready_r, ready_w = mp.Pipe(False)
    ctl_a, ctl_b = mp.Pipe()
    sp = mp.Process(target=sink, args=([f"{uds}_5000"], n, ready_w, ctl_b), daemon=True)
    sp.start()
    try:
        ready_r.recv()
        with SimGuest(vhost, timeout=60, record_limit=0, mem_size=128 << 20) as g:
            drv = g.driver
            socks = [g.connect(5000, timeout=30) for _ in range(n)]
            conns = [s.conn for s in socks]
            payload_gpa = drv.mem.alloc(PAYLOAD, 64)
            drv.mem.write(payload_gpa, bytes(range(256)) * (PAYLOAD // 256))
            heads = []
            for c in conns:  # each connection's header, written once: a pure sender's never changes
                gpa = drv.mem.alloc(64, 64)
                drv.mem.write(gpa, drv_header(g, c))
                heads.append((Buf(gpa, 44), Buf(payload_gpa, PAYLOAD)))
            tx = drv.tx
            ctl_a.send("go")
            start = time.monotonic()
            end = start + seconds
            nxt = 0  # round-robin: each pass starts where the last one stopped (the ring is smaller than n)
            while time.monotonic() < end:
                drv.poll(0)  # used buffers back, credit updates in
                queued = 0
                for _ in range(n):
                    if len(tx.free) < 2:
                        break
                    c, bufs = conns[nxt], heads[nxt]
                    nxt = nxt + 1 if nxt + 1 < n else 0
                    if c.peer_free() >= PAYLOAD:
                        tx.queue_avail(tx.add_chain(bufs, 1, publish=False))
                        c.tx_cnt = (c.tx_cnt + PAYLOAD) & 0xFFFFFFFF
                        queued += 1
                if queued:
                    tx.flush_avail()
                    drv._kick(tx)
                else:
                    drv.poll(0.01)
            elapsed = time.monotonic() - start
            ctl_a.send("stop")
            counts: list[int] = ctl_a.recv()
    finally:
        stop(proc)
        sp.join(5)
        if sp.is_alive():
            sp.kill()
    return sum(counts) / elapsed, counts


def drv_header(g: SimGuest, c: Conn) -> bytes:
    """The RW header of a 64 KiB packet on ``c`` (a pure sender's never changes)."""
    return H.pack(g.driver.guest_cid, c.peer_cid, c.local_port, c.peer_port, PAYLOAD, c.type, H.Op.RW, 0,
                  c.buf_alloc, c.fwd_cnt)


def _device_guest(vhost: str, count: int, go: Event, result: Pipe) -> None:
    with SimGuest(vhost, timeout=60, record_limit=0) as g:
        s = g.connect(5000, timeout=30)
        result.send("connected")
        go.wait()
        start = time.monotonic()
        g.driver.blast(s.conn, bytes(PAYLOAD), count)
        result.send((start, time.monotonic()))


def many_devices(tmp: str, n: int, count: int) -> float:
    """Aggregate bytes/s of ``n`` devices, each guest sending ``count`` 64 KiB packets."""
    d = tempfile.mkdtemp(dir=tmp)
    devices = [(10 + k, os.path.join(d, f"v{k}.sock"), os.path.join(d, f"h{k}.sock")) for k in range(n)]
    ready_r, ready_w = mp.Pipe(False)
    ctl_a, ctl_b = mp.Pipe()
    sp = mp.Process(target=sink, args=([f"{u}_5000" for _, _, u in devices], n, ready_w, ctl_b), daemon=True)
    sp.start()
    ready_r.recv()
    proc = start_vsproxy(d, devices)
    go = mp.Event()
    guests, pipes = [], []
    try:
        for _, vhost, _ in devices:
            r, w = mp.Pipe(False)
            p = mp.Process(target=_device_guest, args=(vhost, count, go, w), daemon=True)
            p.start()
            guests.append(p)
            pipes.append(r)
        for r in pipes:
            if not r.poll(60):
                raise SystemExit("a guest did not connect")
            r.recv()
        go.set()
        spans = [r.recv() for r in pipes]
    finally:
        for p in guests:
            p.join(30)
            if p.is_alive():
                p.kill()
        stop(proc)
        ctl_a.send("stop")
        sp.join(5)
        if sp.is_alive():
            sp.kill()
    start: float = min(s for s, _ in spans)
    end: float = max(e for _, e in spans)
    return n * count * PAYLOAD / (end - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=4096)
    ap.add_argument("--devices", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each many-connections run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure, best taken")
    ap.add_argument("--quick", action="store_true", help="256 connections, 8 devices, short runs")
    args = ap.parse_args()
    if args.quick:
        args.connections, args.devices, args.seconds, args.repeat = 256, 8, 1.0, 1
    count = 2000 if args.quick else 10000
    with tempfile.TemporaryDirectory(prefix="vsp-scale-") as tmp:
        one = many = 0.0
        counts: list[int] = []
        for _ in range(args.repeat):  # interleaved: the machine is shared
            one = max(one, many_connections(tmp, 1, args.seconds)[0])
            rate, c = many_connections(tmp, args.connections, args.seconds)
            if rate > many:
                many, counts = rate, c
        mean = sum(counts) / len(counts)
        print(f"{'case':<34} {'vsproxy':>12} {'reference':>12} {'ratio':>6} {'target':>7}")
        print(f"{f'{args.connections} connections, one guest':<34} {many / 1e6:>7,.0f} MB/s "
              f"{one / 1e6:>7,.0f} MB/s {many / one:>6.0%} {'>= 80%':>7}   (reference: one connection)")
        print(f"{'fairness: slowest / mean':<34} {min(counts) / MiB:>7,.1f} MiB {mean / MiB:>7,.1f} MiB "
              f"{min(counts) / mean:>6.0%} {'>= 50%':>7}   ({len(counts)} connections counted)")
        dev1 = devn = 0.0
        for _ in range(args.repeat):
            dev1 = max(dev1, many_devices(tmp, 1, count))
            devn = max(devn, many_devices(tmp, args.devices, max(count // args.devices, 200)))
        print(f"{f'{args.devices} devices, one process':<34} {devn / 1e6:>7,.0f} MB/s {dev1 / 1e6:>7,.0f} MB/s "
              f"{devn / dev1:>6.0%} {'>= 70%':>7}   (reference: one device)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
