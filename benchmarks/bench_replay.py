"""Replay speed: guest replay of bulk data, client replay of many short connections, and server
replay's answer latency, each printed beside what it is measured against.

    python benchmarks/bench_replay.py [--g2h-mib N] [--connections N] [--exchanges N] [--quick]

1. Guest replay (``vsproxy replay guest --speed asap``) of a capture holding N MiB (default
   1024, the issue's figure) that a guest sent to a host socket in 64 KiB packets, through a
   vsproxy process to a draining unix socket; beside it the simulated guest's own guest-to-host
   rate through the same vsproxy (``blast``, as benchmarks/bench_throughput.py measures it).
   Target: at least 50%. Also printed: the replay process's peak RSS (VmHWM; the capture's
   payload stays in the file: it must not grow with N), and the rate from the first byte reaching the
   host to the last (the sending alone, after the capture has been read).
2. Client replay (``vsproxy replay client``) of a capture of N short connections (default
   10,000; a request line and its answer each) against a live unix service in another process,
   the whole command timed, reading the capture included. Target: at most 15 s.
3. Server replay: one guest connection making N request/answer exchanges (default 2,000) with a
   ``replay`` service, beside the same with the built-in ``echo`` service, through a vsproxy
   process; median and 90th percentile per exchange. Target: replay at most 2x echo.

Captures are made here (vsproxy's own pcapng block writers) in a temporary directory.
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
from collections.abc import Iterator
from multiprocessing.connection import Connection as Pipe
from typing import BinaryIO

from vsproxy.capture import format as fmt
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H

MiB = 1 << 20
GUEST, HOST_CID = 5, 2
PY = sys.executable


# -- captures ------------------------------------------------------------------------------------
class CaptureFile:
    """A pcapng file of one device's packets, written as they are made."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.ts = 1_800_000_000.0
        f.write(fmt.pcapng_shb("bench_replay") + fmt.pcapng_idb("app"))

    def packet(self, src: tuple[int, int], dst: tuple[int, int], op: int, payload: bytes = b"", flags: int = 0,
               fwd_cnt: int = 0) -> None:
        self.ts += 0.000_01
        hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), H.Type.STREAM, op, flags, 262144, fwd_cnt)
        self.f.write(fmt.pcapng_epb(0, self.ts, fmt.vsockmon_frame(hdr, payload), inbound=src[0] == GUEST))

    def connection(self, gport: int, hport: int, sent: Iterator[bytes] | list[bytes], answer: bytes) -> None:
        """The guest connects, sends ``sent``, half-closes; the host answers, half-closes; the
        guest closes and the host resets, as vsproxy captures a Linux guest's connection."""
        g, h = (GUEST, gport), (HOST_CID, hport)
        self.packet(g, h, H.Op.REQUEST)
        self.packet(h, g, H.Op.RESPONSE)
        n = 0
        for chunk in sent:
            self.packet(g, h, H.Op.RW, chunk)
            n += len(chunk)
        self.packet(g, h, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
        if answer:
            self.packet(h, g, H.Op.RW, answer, fwd_cnt=n & 0xFFFFFFFF)
        self.packet(h, g, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND, fwd_cnt=n & 0xFFFFFFFF)
        self.packet(g, h, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH, fwd_cnt=len(answer))
        self.packet(h, g, H.Op.RST, fwd_cnt=n & 0xFFFFFFFF)


# -- processes -----------------------------------------------------------------------------------
class Vsproxy:
    def __init__(self, d: str, *args: str) -> None:
        self.sock = os.path.join(d, "v.sock")
        self.log = open(os.path.join(d, "vsproxy.log"), "ab")
        self.proc = subprocess.Popen([PY, "-m", "vsproxy", "--socket", self.sock, "--guest-cid", str(GUEST), "-q",
                                      *args], stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vsproxy did not start: see {self.log.name}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.sock) if os.path.exists(self.sock) else None


def _drain(path: str, ready: Pipe, result: Pipe, expect: int) -> None:
    """Accept one unix connection, read until ``expect`` bytes, report how many, when the last
    and when the first came, close."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    ready.send(True)
    c, _ = srv.accept()
    view = memoryview(bytearray(1 << 20))
    got = 0
    first = 0.0
    while got < expect:
        n = c.recv_into(view)
        if not n:
            break
        if not got:
            first = time.monotonic()
        got += n
    result.send((got, time.monotonic(), first))
    c.close()


def vm_hwm(pid: int) -> int:
    """A process's peak RSS so far (VmHWM: its memory since exec), in bytes; 0 once gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(argv: list[str], d: str) -> tuple[int, str, int]:
    """Run ``argv`` to its end: exit status, its output (stdout and stderr, in files: a pipe
    nobody reads could stall it) and its peak RSS in bytes: VmHWM read as it runs (wait4's
    ru_maxrss would count the memory of this process, which it was forked from, as its own)."""
    peak = 0
    with open(os.path.join(d, "replay.out"), "w+b") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while p.poll() is None:
            peak = max(peak, vm_hwm(p.pid))
            if time.monotonic() > deadline:
                p.kill()
            time.sleep(0.005)
        out.seek(0)
        text = out.read().decode(errors="replace").strip()
    return p.returncode or 0, text, peak


def drain_process(path: str, expect: int) -> tuple[mp.Process, Pipe]:
    ready_r, ready_w = mp.Pipe(False)
    res_r, res_w = mp.Pipe(False)
    p = mp.Process(target=_drain, args=(path, ready_w, res_w, expect), daemon=True)
    p.start()
    ready_r.recv()
    return p, res_r


def _pong_server(path: str, ready: Pipe) -> None:
    """A unix service in its own process: each connection's request line gets its answer, and
    the answer side half-closes once the client has."""
    import asyncio

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's half-close
        writer.write(data.replace(b"ping", b"pong"))
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path, backlog=1024)
        ready.send(True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- 1. guest replay of bulk data ---------------------------------------------------------------
def guest_replay_rate(d: str, mib: int) -> None:
    total = mib * MiB
    payload = os.urandom(64 * 1024)
    cap = os.path.join(d, "bulk.pcapng")
    with open(cap, "wb") as f:
        CaptureFile(f).connection(40_000, 5000, (payload for _ in range(total // len(payload))), b"")
    vp = Vsproxy(d, "--uds-path", os.path.join(d, "u"))
    try:
        # the simulated guest's own rate through this vsproxy: blast, as bench_throughput measures it
        drain, res = drain_process(os.path.join(d, "u_5001"), total)
        with SimGuest(vp.sock, timeout=60, rx_buf_size=64 * 1024 + 44) as g:
            s = g.connect(5001)
            t0 = time.monotonic()
            s.blast(payload, total // len(payload))
            got, t1, _ = res.recv()
            s.close(timeout=5)
        drain.join(5)
        blast_rate = got / (t1 - t0) / MiB
        drain, res = drain_process(os.path.join(d, "u_5000"), total)
        t0 = time.monotonic()
        rc, out, peak = run_measured([PY, "-m", "vsproxy", "replay", "guest", cap, "--socket", vp.sock, "-q"], d)
        elapsed = time.monotonic() - t0
        got, last, first = res.recv()
        drain.join(5)
    finally:
        vp.stop()
    ok = "ok" if rc == 0 and got == total else f"exit {rc}, {got} of {total} bytes: {out}"
    rate = got / elapsed / MiB
    print(f"guest replay asap, {mib} MiB guest->host in 64 KiB packets: {elapsed:.2f} s, {rate:.0f} MiB/s "
          f"(whole command, reading the capture included; {ok})")
    print(f"  replay process peak RSS {peak / MiB:.0f} MiB for a {os.path.getsize(cap) / MiB:.0f} MiB capture; "
          f"first to last byte at the host {last - first:.2f} s, {got / max(last - first, 1e-9) / MiB:.0f} MiB/s "
          f"(the sending alone)")
    print(f"  simulated guest's own guest->host rate (blast) through the same vsproxy: {blast_rate:.0f} MiB/s; "
          f"replay is {100 * rate / blast_rate:.0f}% of it (target 50%)")


# -- 2. client replay of many short connections -------------------------------------------------
def client_replay_time(d: str, n: int) -> None:
    cap = os.path.join(d, "many.pcapng")
    with open(cap, "wb") as f:
        c = CaptureFile(f)
        for i in range(n):
            line = b"ping %d\n" % i
            c.connection(50_000 + i, 6000, [line], line.replace(b"ping", b"pong"))
    ready_r, ready_w = mp.Pipe(False)
    server = mp.Process(target=_pong_server, args=(os.path.join(d, "svc_6000"), ready_w), daemon=True)
    server.start()
    ready_r.recv()
    try:
        t0 = time.monotonic()
        proc = subprocess.run([PY, "-m", "vsproxy", "replay", "client", cap, "--to", f"uds:{d}/svc", "-q"],
                              capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - t0
    finally:
        server.terminate()
        server.join(5)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()
    print(f"client replay of {n:,} short connections: {elapsed:.2f} s (target 15 s; exit {proc.returncode}: {last})")


# -- 3. server replay latency -------------------------------------------------------------------
def server_replay_latency(d: str, k: int) -> None:
    cap = os.path.join(d, "exchanges.pcapng")
    msgs = [b"req %06d" % i for i in range(k)]
    with open(cap, "wb") as f:
        c = CaptureFile(f)
        g, h = (GUEST, 60_000), (HOST_CID, 7100)
        c.packet(g, h, H.Op.REQUEST)
        c.packet(h, g, H.Op.RESPONSE)
        for m in msgs:
            c.packet(g, h, H.Op.RW, m)
            c.packet(h, g, H.Op.RW, m.replace(b"req", b"ans"))
        c.packet(g, h, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
        c.packet(h, g, H.Op.RST)
    vp = Vsproxy(d, "--service", "2:7000=echo", "--service", f"2:7100=replay:{cap}")
    try:
        with SimGuest(vp.sock, timeout=20) as guest:
            rows = {}
            for name, port in (("echo", 7000), ("replay", 7100)):
                s = guest.connect(port)
                times = []
                for m in msgs:
                    t0 = time.perf_counter()
                    s.sendall(m)
                    back = s.recv_exactly(len(m), timeout=10)
                    times.append(time.perf_counter() - t0)
                    if name == "replay" and back != m.replace(b"req", b"ans"):
                        raise SystemExit(f"replay answered {back!r} to {m!r}")
                s.close(timeout=5)
                times.sort()
                rows[name] = (statistics.median(times), times[int(len(times) * 0.9)])
    finally:
        vp.stop()
    (em, ep), (rm, rp) = rows["echo"], rows["replay"]
    print(f"server replay, {k:,} request/answer exchanges on one connection: median {rm * 1e6:.0f} us, "
          f"p90 {rp * 1e6:.0f} us")
    print(f"  built-in echo service, the same: median {em * 1e6:.0f} us, p90 {ep * 1e6:.0f} us; replay/echo "
          f"{rm / em:.2f}x median (target 2x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--g2h-mib", type=int, default=1024)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--exchanges", type=int, default=2_000)
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 8 MiB, 300 connections, 200 exchanges")
    args = ap.parse_args()
    if args.quick:
        args.g2h_mib, args.connections, args.exchanges = 8, 300, 200
    with tempfile.TemporaryDirectory(prefix="vsp-bench-") as d:
        guest_replay_rate(d, args.g2h_mib)
        client_replay_time(d, args.connections)
        server_replay_latency(d, args.exchanges)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
