"""`vsproxy read` speed: a 100,000-packet pcapng (heartbeats and HTTP-sized RW packets with
their control packets) printed in one-line mode to /dev/null.

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.pcapng")
        with open(path, "wb") as f:
            f.write(fmt.pcapng_shb() + fmt.pcapng_idb("enclave1"))
            for i in range(args.packets):
                op = (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RW, H.Op.RW, H.Op.CREDIT_UPDATE)[i % 5]
                payload = b"GET /v1/keys HTTP/1.1\r\n\r\n" if op == H.Op.RW else b""
                hdr = H.pack(5, 2, 1024 + i % 7, 8000, len(payload), 1, op, 0, 262144, i)
                f.write(fmt.pcapng_epb(0, 1e9 + i / 1000, fmt.vsockmon_frame(hdr, payload), inbound=i % 2 == 0))
        size = os.path.getsize(path)
        start = time.perf_counter()
        with open(os.devnull, "w") as null:
            p = subprocess.run([sys.executable, "-m", "vsproxy", "read", path], stdout=null, timeout=300)
        elapsed = time.perf_counter() - start
    assert p.returncode == 0
    print(f"vsproxy read: {args.packets:,} packets ({size / 1e6:.1f} MB pcapng) in {elapsed:.2f} s "
          f"({args.packets / elapsed:,.0f} packets/s; target: under 10 s for 100,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
