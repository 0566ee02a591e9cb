"""`vsproxy enclave run` end to end: the test guest's kernel and initramfs made an EIF with
`vsproxy eif build`, booted on QEMU's nitro-enclave machine (QEMU 10 built with libcbor by
tests/guest/qemu-nitro.sh), with vsproxy as its vsock device. The Debian 6.1 kernel cannot take
the machine's virtio-mmio devices from the command line, so the machine runs with acpi=on
(`--acpi`); tsc_early_khz keeps the boot from hanging under TCG."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

NITRO_QEMU = harness.cache_root() / "qemu-nitro" / "bin" / "qemu-system-x86_64"


@pytest.fixture(scope="session")
def nitro_qemu() -> Path:
    if not NITRO_QEMU.exists():
        pytest.fail(f"{NITRO_QEMU} is missing: tests/guest/qemu-nitro.sh builds it (tests/run.sh runs it)",
                    pytrace=False)
    return NITRO_QEMU


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello from the parent, you asked for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_service() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def make_eif(image: harness.GuestImage, script: str, out: Path) -> Path:
    """The guest as an EIF: its initramfs (padded to 4 bytes, so the appended archive is found)
    and the script in a second ramdisk, the enclave's application ramdisk (PCR2)."""
    base = image.initrd.read_bytes()
    (out.parent / "initrd").write_bytes(base + b"\0" * (-len(base) % 4))
    (out.parent / "app").write_bytes(harness._script_cpio(script.encode()))
    cmdline = ["console=ttyS0", "loglevel=4", "panic=-1", "edd=off", "reboot=t", "vsproxy.end=poweroff"]
    khz = harness.host_tsc_khz()
    if khz:
        cmdline.append(f"tsc_early_khz={khz}")
    r = subprocess.run([sys.executable, "-m", "vsproxy", "eif", "build", "--kernel", str(image.kernel),
                        "--ramdisk", str(out.parent / "initrd"), "--ramdisk", str(out.parent / "app"),
                        "--cmdline", " ".join(cmdline), "--memory", "256", "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "PCR0: " in r.stdout
    return out


SCRIPT = r"""
echo "HEARTBEAT $(printf '\267' | vsock_tool connect 3 9000 | od -An -tx1 | tr -d ' ')"
printf 'GET /config HTTP/1.0\r\nHost: parent\r\n\r\n' | vsock_tool connect 3 8080 > /tmp/http 2>&1
echo "HTTP-RC $?"
cat /tmp/http
echo
vsock_tool connect 3 7000 < /dev/null 2>&1 | head -1
echo DONE
"""


def test_an_enclave_from_an_eif_runs_on_the_nitro_machine_with_heartbeat_forward_and_allowlist(
        nitro_qemu: Path, guest_image: harness.GuestImage, http_service: int, tmp_path: Path) -> None:
    eif = make_eif(guest_image, SCRIPT, tmp_path / "enclave.eif")
    pcap = tmp_path / "enclave.pcapng"
    r = subprocess.run(
        [sys.executable, "-m", "vsproxy", "enclave", "run", "--eif-path", str(eif), "--enclave-cid", "16",
         "--memory", "256", "--cpu-count", "1", "--debug-mode", "--acpi", "--qemu", str(nitro_qemu),
         "--forward", f"8080=tcp:127.0.0.1:{http_service}", "--allow-out", "3:9000", "--allow-out", "2:8080",
         "--pcap", str(pcap)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=240)
    out = r.stdout
    assert r.returncode == 0, f"rc {r.returncode}\n--- console\n{out[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    assert "VSPROXY-SCRIPT-EXIT 0" in out, out[-4000:]
    assert "HEARTBEAT b7" in out  # the heartbeat answered: the enclave's init goes on
    assert "HTTP-RC 0" in out and "HTTP/1.0 200" in out
    assert "hello from the parent, you asked for /config" in out  # CID 3:8080 -> --forward -> TCP
    assert "CONNECT-FAIL ECONNRESET" in out  # 3:7000 is not in the allowlist
    assert "DONE" in out
    assert re.search(r"vsproxy: --nitro: service nitro-heartbeat at 3:9000", r.stderr)
    assert re.search(r"denied", r.stderr), r.stderr[-3000:]
    # the exchange in the capture, as vsproxy read and tshark show it
    read = subprocess.run([sys.executable, "-m", "vsproxy", "read", str(pcap), "proto == http"],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0 and "GET /config" in read.stdout and "200" in read.stdout, read.stdout[-3000:]
    ts = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.number"], capture_output=True,
                        text=True, timeout=120)
    assert ts.returncode == 0 and len(ts.stdout.split()) > 10
