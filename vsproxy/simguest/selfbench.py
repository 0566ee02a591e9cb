"""How fast the simulated guest alone is: ``python -m vsproxy.simguest.selfbench``.

The backend here is the fake one in a separate process, in "null" mode for tx (chains returned
unread) and with prebuilt payloads for rx, so the guest process's CPU time is what it costs the
guest to push or pull each packet. Both wall-clock and guest-CPU rates are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import tempfile
import time

from vsproxy.vsock import header as vh

from . import SimGuest
from .fake_backend import EchoHost, FakeBackend

NULL_PORT = 9999
STREAM_PORT = 7777


def _serve(path: str, ready: multiprocessing.synchronize.Event, nbytes: int) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    srv.close()
    host = EchoHost(echo=False, buf_alloc=vh.U32, null_port=NULL_PORT)

    def idle(be: FakeBackend) -> None:
        for key, c in host.conns.items():
            if key[2] == STREAM_PORT and not c.tx_cnt and not c.to_send:
                c.to_send = nbytes
        host.pump(be)

    be = FakeBackend(conn, host=host)
    be.on_idle = idle
    be.serve()


def run(kind: str, count: int, size: int, ring_size: int, indirect: bool) -> None:
    tmp = tempfile.mkdtemp(prefix="simguest-bench-")
    path = os.path.join(tmp, "vhost.sock")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    nbytes = count * size
    proc = ctx.Process(target=_serve, args=(path, ready, nbytes), daemon=True)
    proc.start()
    ready.wait(10)
    # The null backend never reads tx chains, so it never returns credit; a guest caps its credit
    # at its own buf_alloc (CVE-2026-23086), so the guest's window here is the whole transfer.
    g = SimGuest(path, ring_size=ring_size, indirect=indirect, timeout=30, buf_alloc=min(vh.U32, nbytes + 1))
    try:
        g.start()
        if kind == "tx":
            s = g.connect(NULL_PORT)
            cpu0, t0 = time.process_time(), time.monotonic()
            s.blast(b"x" * size, count)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
            print(f"guest->host blast: {count} x {size} B in {wall:.2f}s wall: {count / wall:,.0f} pkt/s wall, "
                  f"{count / cpu:,.0f} pkt/s per guest CPU second (ring {ring_size}, indirect={indirect})")
        else:
            s = g.connect(STREAM_PORT)
            cpu0, t0 = time.process_time(), time.monotonic()
            got = s.drain(nbytes)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
            pk = g.stats.rx_packets
            print(f"host->guest drain: {got} B, {pk} packets in {wall:.2f}s: {got / wall / 1e6:.0f} MB/s wall, "
                  f"{got / cpu / 1e6:.0f} MB/s and {pk / cpu:,.0f} pkt/s per guest CPU second")
    finally:
        g.close()
        proc.kill()
        proc.join()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=500_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--ring-size", type=int, default=128)
    ap.add_argument("--no-indirect", action="store_true")
    ap.add_argument("--rx-mib", type=int, default=200)
    args = ap.parse_args(argv)
    run("tx", args.count, args.size, args.ring_size, not args.no_indirect)
    run("rx", args.rx_mib, 1 << 20, args.ring_size, True)


if __name__ == "__main__":
    main()
