"""`vsproxy enclave run` end to end: the test guest's kernel and initramfs made an EIF with
`vsproxy eif build`, booted on QEMU's nitro-enclave machine (QEMU 10 built with libcbor by
tests/guest/qemu-nitro.sh), with vsproxy as its vsock device. The Debian 6.1 kernel cannot take
the machine's virtio-mmio devices from the command line, so the machine runs with acpi=on
(`--acpi`); tsc_early_khz keeps the boot from hanging under TCG."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

from vsproxy.enclave import eif as E

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


REPO = Path(__file__).resolve().parents[2]


def readme_enclave_block() -> list[str]:
    """The command lines of the README's "Emulating a Nitro Enclave" section."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"## Emulating a Nitro Enclave\n.*?```sh\n(.*?)\n```", text, re.S)
    assert m, "the README has no enclave section with a sh block"
    return m.group(1).splitlines()


SCRIPT = r"""
echo "HEARTBEAT $(printf '\267' | vsock_tool connect 3 9000 | od -An -tx1 | tr -d ' ')"
printf 'GET /config HTTP/1.0\r\nHost: parent\r\n\r\n' | vsock_tool connect 3 8080 > /tmp/http 2>&1
echo "HTTP-RC $?"
cat /tmp/http
echo
vsock_tool connect 3 7000 < /dev/null 2>&1 | head -1
echo DONE
"""


def test_the_readmes_enclave_commands_run_an_eif_on_the_nitro_machine_with_heartbeat_forward_and_allowlist(
        nitro_qemu: Path, guest_image: harness.GuestImage, http_service: int, tmp_path: Path) -> None:
    lines = readme_enclave_block()
    assert lines[0] == "bash tests/guest/qemu-nitro.sh" and len(lines) == 5
    # the files the README names: the test guest's kernel, its initramfs (padded to 4 bytes, so
    # the appended archive is found) and the test script as a second, application ramdisk
    (tmp_path / "vmlinuz").symlink_to(guest_image.kernel)
    base = guest_image.initrd.read_bytes()
    (tmp_path / "initramfs.cpio").write_bytes(base + b"\0" * (-len(base) % 4))
    (tmp_path / "app.cpio").write_bytes(harness._script_cpio(SCRIPT.encode()))
    (tmp_path / "tests").symlink_to(REPO / "tests")
    script = "set -e\n" + "\n".join(lines).replace("127.0.0.1:8000", f"127.0.0.1:{http_service}") + "\n"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, errors="replace", timeout=300)
    out = r.stdout
    assert r.returncode == 0, f"rc {r.returncode}\n--- stdout\n{out[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    image = E.parse((tmp_path / "enclave.eif").read_bytes())
    assert out.count(f"PCR0: {image.measurements().pcr0.hex()}") == 2  # printed by build and by describe
    assert [s.name for s in image.sections] == ["kernel", "cmdline", "ramdisk", "ramdisk"]
    assert "VSPROXY-SCRIPT-EXIT 0" in out, out[-4000:]
    assert "HEARTBEAT b7" in out  # the heartbeat answered: the enclave's init goes on
    assert "HTTP-RC 0" in out and "HTTP/1.0 200" in out
    assert "hello from the parent, you asked for /config" in out  # CID 3:8080 -> --forward -> TCP
    assert "CONNECT-FAIL ECONNRESET" in out  # 3:7000 is not in the allowlist
    assert "vsproxy: --nitro: service nitro-heartbeat at 3:9000" in r.stderr
    assert "denied by not in cid16's outbound allowlist" in r.stderr
    # the device the enclave got: legacy virtio-mmio, rings of 1024, memory in two regions
    assert "size 1024" in r.stderr and "version_1=False" in r.stderr
    assert re.search(r"memory table: gpa \S+, gpa", r.stderr)
    # vsproxy read of the capture (the README's last line) shows the exchange; tshark reads it
    assert "GET /config" in out.split("VSPROXY-SCRIPT-EXIT 0", 1)[1]
    ts = subprocess.run(["tshark", "-r", str(tmp_path / "enclave.pcapng"), "-T", "fields", "-e", "frame.number"],
                        capture_output=True, text=True, timeout=120)
    assert ts.returncode == 0 and len(ts.stdout.split()) > 10
