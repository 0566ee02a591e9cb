"""The filter language's speed: 100,000 PacketViews through typical filters.

    python benchmarks/bench_filter.py

Prints packets/s through ``Filter()`` and through its bare ``predicate`` (what a hot loop
such as the TUI's calls), best of five runs.
"""

from __future__ import annotations

import time

from vsproxy.capture.view import PacketView
from vsproxy.filter import compile_filter
from vsproxy.vsock import header as H

FILTERS = [
    'op == rw and dst.port == 9000 and payload contains "GET"',
    "cid == 5 or port in {8000, 9000}",
    'not (verdict == denied) and proto == http and app contains "x"',
    'payload matches r"^GET /v\\d"',
]


def packets(n: int) -> list[PacketView]:
    out = []
    for i in range(n):
        op = (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RW, H.Op.RW, H.Op.CREDIT_UPDATE)[i % 5]
        request = b"GET /v1/keys HTTP/1.1\r\n\r\n" if i % 3 else b"POST / HTTP/1.1\r\n\r\n"
        payload = request if op == H.Op.RW else b""
        hdr = H.Header(5, 2, 1024 + i % 7, 9000 if i % 4 else 8000, len(payload), 1, int(op), 0, 262144, i)
        out.append(PacketView(1e9 + i / 1000, "enclave1", i % 2 == 0, hdr, 4, payload, None, "http", ()))
    return out


def main() -> int:
    ps = packets(100_000)
    for text in FILTERS:
        f = compile_filter(text)
        for label, fn in (("Filter()", f), ("predicate", f.predicate)):
            best = 1e9
            n = 0
            for _ in range(5):
                t = time.perf_counter()
                n = sum(1 for p in ps if fn(p))
                best = min(best, time.perf_counter() - t)
            print(f"{text!r:70} {label:10} {n:6} matched  {len(ps) / best:>12,.0f} packets/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
