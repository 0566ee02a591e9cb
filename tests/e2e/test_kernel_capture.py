"""A capture written by the Linux kernel itself (vsockmon), made in the test guest.

The guest loads vsock_loopback and vsockmon, creates `vsockmon0` with busybox
`ip link add name vsockmon0 type vsockmon`, and records it with
`vsockmon_cap capture` (an AF_PACKET socket, classic pcap, LINKTYPE_VSOCK) while
traffic crosses the loopback transport (CID 1): a STREAM echo (connect, data both
ways, shutdown, close, RST), a connect to a port where nothing listens (RST) and
one SEQPACKET message echoed (`vsockmon_cap echo-pair`, whose packets come in one
order on every run).  The only way out of the guest is the serial console,
so the pcap comes back as base64 lines (`VSOCKMON-PCAP <b64>`) closed by
`VSOCKMON-PCAP-END <size> <sha256>`.

The fresh capture then goes through the same checks as the committed fixture
(tests/test_kernel_capture_fixture.py, run with VSPROXY_KERNEL_CAPTURE=FILE:
vsproxy's reader, `vsproxy read`, tshark, and the same structure as
captures/kernel-vsockmon-loopback.pcap).  With VSPROXY_UPDATE_CAPTURES=1 the
fixture is rewritten instead of compared (after every other check passed):

    VSPROXY_UPDATE_CAPTURES=1 .venv/bin/pytest tests/e2e/test_kernel_capture.py

AF_VSOCK sockets exist only inside the guest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.e2e

FIXTURE = harness.REPO / "captures" / "kernel-vsockmon-loopback.pcap"
FIXTURE_CHECKS = harness.REPO / "tests" / "test_kernel_capture_fixture.py"
UPDATE_ENV = "VSPROXY_UPDATE_CAPTURES"

# Each wait is bounded (about 20 s) so a broken step ends the script, not the whole timeout.
GUEST_SCRIPT = r"""
wait_line() {  # wait_line FILE PATTERN
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 200 ] && { echo "TIMEOUT waiting for $2 in $1"; cat "$1"; exit 95; }
        sleep 0.1
    done
}
insmod /lib/modules/vsock_loopback.ko || exit 90
insmod /lib/modules/vsockmon.ko || exit 91
ip link add name vsockmon0 type vsockmon || exit 92
ip link set vsockmon0 up || exit 93

vsockmon_cap capture vsockmon0 0 120 >/tmp/cap.pcap 2>/tmp/cap.log &
CAP=$!
wait_line /tmp/cap.log CAPTURING

# STREAM: connect, data both ways, the client's half-close, the server's close, RST.
vsockmon_cap echo-pair stream 5000 'hello vsock' || exit 94

# Nothing listens on 5999: REQUEST answered by RST.
vsock_tool connect 1 5999 </dev/null
echo "NOLISTENER-RC $?"

# SEQPACKET: one message (EOM and EOR) echoed, the client's close, RST.
vsockmon_cap echo-pair seqpacket 5001 'one seqpacket message' || exit 96

# The loopback transport delivers packets from a work queue: let it drain.
sleep 1
kill -INT $CAP
wait $CAP || { cat /tmp/cap.log; exit 97; }
cat /tmp/cap.log
base64 -w 96 /tmp/cap.pcap | sed 's/^/VSOCKMON-PCAP /'
echo "VSOCKMON-PCAP-END $(wc -c </tmp/cap.pcap) $(sha256sum /tmp/cap.pcap | cut -d' ' -f1)"
"""

_LINE = re.compile(r"^VSOCKMON-PCAP ([A-Za-z0-9+/=]+)$")
_END = re.compile(r"^VSOCKMON-PCAP-END (\d+) ([0-9a-f]{64})$")


class SerialTransferError(Exception):
    """The pcap printed on the serial console did not arrive whole."""


def pcap_from_serial(output: str) -> bytes:
    """The pcap bytes between the VSOCKMON-PCAP lines, checked against the size and sha256 the
    guest printed.  Other lines (kernel messages, tool output) are ignored; a kernel message
    written into the middle of a base64 line shows up as a checksum mismatch."""
    chunks: list[str] = []
    for line in output.splitlines():
        line = line.strip()
        m = _LINE.match(line)
        if m:
            chunks.append(m.group(1))
            continue
        end = _END.match(line)
        if end:
            try:
                data = base64.b64decode("".join(chunks), validate=True)
            except binascii.Error as e:
                raise SerialTransferError(f"bad base64 from the guest: {e}") from None
            size, digest = int(end.group(1)), end.group(2)
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                raise SerialTransferError(
                    f"pcap damaged on the serial console: {len(data)} bytes, sha256 "
                    f"{hashlib.sha256(data).hexdigest()}; the guest sent {size} bytes, {digest}"
                )
            return data
    raise SerialTransferError("no VSOCKMON-PCAP-END line in the guest's output")


def run_fixture_checks(capture: Path, *, compare_with_fixture: bool) -> subprocess.CompletedProcess[str]:
    """tests/test_kernel_capture_fixture.py against `capture` instead of the committed file; without
    the comparison with the committed file when that file is about to be replaced (or made)."""
    env = dict(os.environ, VSPROXY_KERNEL_CAPTURE=str(capture))
    checks = FIXTURE_CHECKS.relative_to(harness.REPO)  # --deselect wants the node id, relative to the root
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)]
    if not compare_with_fixture:
        argv += ["--deselect", f"{checks}::test_same_structure_as_the_committed_fixture"]
    return subprocess.run(argv, cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=300)


def test_pcap_from_serial_checks_size_and_digest() -> None:
    data = b"\xd4\xc3\xb2\xa1 kernel capture"
    enc = base64.b64encode(data).decode()
    end = f"VSOCKMON-PCAP-END {len(data)} {hashlib.sha256(data).hexdigest()}"
    serial = f"noise\nVSOCKMON-PCAP {enc[:8]}\r\n[ 1.0] kernel says hi\nVSOCKMON-PCAP {enc[8:]}\n{end}\n"
    assert pcap_from_serial(serial) == data
    damaged = serial.replace(enc[8:], enc[8:-4] + "AAA=")
    with pytest.raises(SerialTransferError, match="damaged"):
        pcap_from_serial(damaged)
    with pytest.raises(SerialTransferError, match="no VSOCKMON-PCAP-END"):
        pcap_from_serial(f"VSOCKMON-PCAP {enc}\n")


def test_kernel_vsockmon_capture_of_loopback_traffic(
    qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage, tmp_path: Path
) -> None:
    r = harness.boot_guest(qemu_by_name("qemu7"), "pc", None, GUEST_SCRIPT, timeout=240, image=guest_image)
    out = r.script_output()
    detail = f"\n--- serial ---\n{r.serial}"
    assert r.rc == 0, detail
    for line in ("ECHO-PAIR stream 11", "NOLISTENER-RC 2", "ECHO-PAIR seqpacket 21", "CAPTURED 21"):
        assert line in out.splitlines(), detail
    fresh = tmp_path / "kernel-vsockmon-loopback.pcap"
    fresh.write_bytes(pcap_from_serial(out))

    update = os.environ.get(UPDATE_ENV) == "1"
    checks = run_fixture_checks(fresh, compare_with_fixture=not update)
    assert checks.returncode == 0, (
        f"the kernel's capture ({fresh}, kernel {guest_image.kernel_release}) fails the fixture checks:\n"
        f"{checks.stdout}\n{checks.stderr}"
    )
    if update:
        FIXTURE.write_bytes(fresh.read_bytes())
        print(f"wrote {FIXTURE} ({fresh.stat().st_size} bytes, kernel {guest_image.kernel_release})")
