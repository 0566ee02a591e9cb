"""vsock_tool and its Python twins (guestdata.py).

The PRNG/hash check runs vsock_tool's socket-free `prng`/`fnv` modes on the
host.  Everything with sockets runs inside the guest over the vsock loopback
transport (CID 1), which needs no vhost-user backend.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import harness
import pytest
from guestdata import Fnv1a64, PrngStream, fnv1a64, prng_bytes

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("seed,n", [(0, 0), (1, 1), (1, 7), (2, 8), (3, 1000), (2**64 - 1, 4097), (5, 1 << 20)])
def test_prng_and_fnv_match_c(guest_image: harness.GuestImage, seed: int, n: int) -> None:
    # Socket-free modes only: no AF_VSOCK socket is ever opened on the host.
    c = subprocess.run(
        [str(guest_image.vsock_tool), "prng", str(seed), str(n)], check=True, stdout=subprocess.PIPE
    ).stdout
    assert c == prng_bytes(seed, n)
    fnv = subprocess.run(
        [str(guest_image.vsock_tool), "fnv"], input=c, check=True, stdout=subprocess.PIPE
    ).stdout.decode()
    assert fnv.strip() == f"FNV {n} {fnv1a64(c)}"


def test_incremental_twins() -> None:
    data = prng_bytes(9, 100_000)
    s = PrngStream(9)
    chunks = [s.read(k) for k in (1, 2, 3, 5, 8, 13, 4096, 0, 95_872)]
    assert b"".join(chunks) == data
    h = Fnv1a64()
    for c in chunks:
        h.update(c)
    assert h.hexdigest() == fnv1a64(data)
    assert fnv1a64(b"") == "cbf29ce484222325"
    assert fnv1a64(b"a") == "af63dc4c8601ec8c"  # published FNV-1a 64 test vector


LOOPBACK_SCRIPT = r"""
insmod /lib/modules/vsock_loopback.ko || exit 90
wait_listening() { while ! grep -q "LISTENING $2" "$1" 2>/dev/null; do sleep 1; done; }

vsock_tool echo-server 5000 >/tmp/echo.log 2>&1 &
ECHO=$!
wait_listening /tmp/echo.log 5000
vsock_tool send 1 5000 300000 9
printf 'hello vsock\n' | vsock_tool connect 1 5000
vsock_tool multi 1 5000 6 200000

vsock_tool sink-server 5001 >/tmp/sink.log 2>&1 &
SINK=$!
wait_listening /tmp/sink.log 5001
vsock_tool send 1 5001 50000 3
wait $SINK
cat /tmp/sink.log

vsock_tool source-server 5002 30000 4 >/tmp/src.log 2>&1 &
SRC=$!
wait_listening /tmp/src.log 5002
vsock_tool connect 1 5002 </dev/null | vsock_tool fnv
wait $SRC
cat /tmp/src.log

vsock_tool connect 1 5999 </dev/null
echo "NOLISTENER-RC $?"
kill $ECHO
cat /tmp/echo.log
exit 0
"""


def test_vsock_tool_over_loopback(qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage) -> None:
    r = harness.boot_guest(qemu_by_name("qemu7"), "pc", None, LOOPBACK_SCRIPT, timeout=240, image=guest_image)
    out = r.script_output()
    lines = out.splitlines()
    detail = f"\n--- serial ---\n{r.serial}"
    assert r.rc == 0, detail
    # send: the echo comes back byte for byte
    assert "SENT 300000" in lines, detail
    assert f"REPLY 300000 {fnv1a64(prng_bytes(9, 300000))}" in lines, detail
    assert "hello vsock" in lines, detail
    assert "MULTI-OK 6" in lines, detail
    # sink-server: a sender whose peer sends nothing back gets an empty reply
    assert f"RECEIVED 50000 {fnv1a64(prng_bytes(3, 50000))}" in lines, detail
    assert f"REPLY 0 {fnv1a64(b'')}" in lines, detail
    # source-server -> connect
    assert f"FNV 30000 {fnv1a64(prng_bytes(4, 30000))}" in lines, detail
    assert "SOURCED 30000" in lines, detail
    assert "CONNECT-FAIL ECONNRESET" in lines, detail
    assert "NOLISTENER-RC 2" in lines, detail
    assert any(line.startswith("ACCEPTED 1 ") for line in lines), detail
    assert "ECHOED 300000" in lines, detail
