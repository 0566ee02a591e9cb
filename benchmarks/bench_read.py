"""`vsproxy read` speed: a 100,000-packet pcapng (HTTP-sized RW packets on short connections, with
their control packets) printed in one-line mode to /dev/null, once whole and once through a
filter, then as `--follow all` prints it (every connection's transcript: the streaming
transcript builder after the decoder). Every packet goes through the stream tracker each time,
and the HTTP dissector reads each request, so this is the tracker's costly case.

    python benchmarks/bench_read.py [--packets N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from vsproxy.capture import format as fmt
from vsproxy.vsock import header as H

FILTER = "dst.port == 8000 and op == rw"
TARGET_S = 10.0  # for 100,000 packets


def write_capture(path: str, packets: int) -> None:
    with open(path, "wb") as f:
        f.write(fmt.pcapng_shb() + fmt.pcapng_idb("enclave1"))
        for i in range(packets):
            op = (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RW, H.Op.RW, H.Op.CREDIT_UPDATE)[i % 5]
            payload = b"GET /v1/keys HTTP/1.1\r\n\r\n" if op == H.Op.RW else b""
            hdr = H.pack(5, 2, 1024 + i % 7, 8000, len(payload), 1, op, 0, 262144, i)
            f.write(fmt.pcapng_epb(0, 1e9 + i / 1000, fmt.vsockmon_frame(hdr, payload), inbound=i % 2 == 0))


def time_read(path: str, *filter_words: str) -> float:
    """Seconds for one `vsproxy read` process printing to /dev/null."""
    start = time.perf_counter()
    with open(os.devnull, "w") as null:
        p = subprocess.run([sys.executable, "-m", "vsproxy", "read", path, *filter_words], stdout=null, timeout=300)
    elapsed = time.perf_counter() - start
    assert p.returncode == 0, f"vsproxy read exited {p.returncode}"
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.pcapng")
        write_capture(path, args.packets)
        size = os.path.getsize(path)
        whole = time_read(path)
        filtered = time_read(path, FILTER)
        followed = time_read(path, "--follow", "all")
    print(
        f"vsproxy read: {args.packets:,} packets ({size / 1e6:.1f} MB pcapng) in {whole:.2f} s "
        f"({args.packets / whole:,.0f} packets/s; target: under {TARGET_S:.0f} s for 100,000)"
    )
    print(
        f"vsproxy read with the filter '{FILTER}': {args.packets:,} packets (2 in 5 printed) "
        f"in {filtered:.2f} s ({args.packets / filtered:,.0f} packets/s)"
    )
    print(
        f"vsproxy read --follow all: {args.packets:,} packets as transcripts in {followed:.2f} s "
        f"({args.packets / followed:,.0f} packets/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
