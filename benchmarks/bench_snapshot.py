"""How long a typed snapshot of a busy vsproxy takes: N open connections, one device.

    python benchmarks/bench_snapshot.py [--connections N] [--quick]

vsproxy runs in-process (its loop in a thread), a simulated guest opens N connections to a
host listener and keeps them open, and the snapshot is taken from this thread (so on the loop,
through call_soon_threadsafe, as a control-socket client or a TUI takes it) and directly on the
loop thread. Target: 4,096 connections in under 50 ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

from vsproxy.app import Proxy
from vsproxy.device import DeviceConfig
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.simguest import SimGuest
from vsproxy.snapshot import take

TARGET_MS = 50.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="256 connections (a smoke run)")
    args = ap.parse_args()
    n = 256 if args.quick else args.connections
    with tempfile.TemporaryDirectory(prefix="vsp-snap-") as tmp:
        cfg = DeviceConfig(5, os.path.join(tmp, "a.sock"), name="A",
                           endpoints=HostEndpoints(uds_path=os.path.join(tmp, "ha")), max_connections=n + 16,
                           max_pending=n + 16)
        proxy = Proxy([cfg])
        proxy.start()
        loop_thread = threading.Thread(target=proxy.run, daemon=True)
        loop_thread.start()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(os.path.join(tmp, "ha_5000"))
        srv.listen(n + 16)  # the backlog holds them: nothing accepts
        try:
            with SimGuest(cfg.socket_path, timeout=30, record_limit=0) as g:
                socks = [g.connect(5000) for _ in range(n)]
                threaded = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    snap = proxy.snapshot()
                    threaded.append((time.perf_counter() - t0) * 1000)
                assert len(snap.connections) == n, len(snap.connections)
                on_loop: list[float] = []
                done = threading.Event()

                def measure() -> None:
                    for _ in range(20):
                        t0 = time.perf_counter()
                        take(proxy)
                        on_loop.append((time.perf_counter() - t0) * 1000)
                    done.set()

                proxy.loop.call_soon_threadsafe(measure)
                done.wait(60)
                for s in socks:
                    s.close(timeout=10)
        finally:
            proxy.stop()
            loop_thread.join(10)
            proxy.close()
            srv.close()
    med_t, med_l = statistics.median(threaded), statistics.median(on_loop)
    print(f"snapshot of {n:,} connections: {med_t:.1f} ms median from another thread, {med_l:.1f} ms on the loop "
          f"(p90 {sorted(threaded)[17]:.1f} / {sorted(on_loop)[17]:.1f} ms); target for 4,096: < {TARGET_MS:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
