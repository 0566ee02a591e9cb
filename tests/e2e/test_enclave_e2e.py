"""`vsproxy enclave run` end to end: the test guest's kernel and initramfs made an EIF with
`vsproxy eif build`, booted on QEMU's nitro-enclave machine (QEMU 10 built with libcbor by
tests/guest/qemu-nitro.sh), with vsproxy as its vsock device. The Debian 6.1 kernel cannot take
the machine's virtio-mmio devices from the command line, so the machine runs with acpi=on
(`--acpi`); tsc_early_khz keeps the boot from hanging under TCG."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

from vsproxy.enclave import eif as E

pytestmark = pytest.mark.e2e

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


class Parent(threading.Thread):
    """A parent's service on a hybrid socket (PATH_8080): answers each connection with its name."""

    def __init__(self, path: str, name: bytes) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.srv.settimeout(0.5)
        self.name_ = name
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                c, _ = self.srv.accept()
            except TimeoutError:
                continue
            with c:
                c.settimeout(10)
                c.recv(64)
                c.sendall(b"I am " + self.name_ + b"\n")

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        self.srv.close()


def readme_enclaves_yaml() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"### Several enclaves.*?```yaml\n(.*?)```", text, re.S)
    assert m, "the README has no several-enclaves YAML example"
    return m.group(1)


PARENT_SCRIPT = r"""
echo "HEARTBEAT $(printf '\267' | vsock_tool connect 3 9000 | od -An -tx1 | tr -d ' ')"
echo "PARENT $(printf 'who?' | vsock_tool connect 3 8080)"
"""


def test_two_enclaves_from_one_config_each_reach_their_own_parent(
        nitro_qemu: Path, guest_image: harness.GuestImage, tmp_path: Path) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="vsp-enc-"))  # short: unix socket paths
    base = guest_image.initrd.read_bytes()
    (tmp_path / "initramfs.cpio").write_bytes(base + b"\0" * (-len(base) % 4))
    (tmp_path / "app.cpio").write_bytes(harness._script_cpio(PARENT_SCRIPT.encode()))
    khz = harness.host_tsc_khz()
    cmdline = f"console=ttyS0 panic=-1 reboot=t tsc_early_khz={khz}"
    for name in ("enclave1", "enclave2"):
        r = subprocess.run([sys.executable, "-m", "vsproxy", "eif", "build", "--kernel", str(guest_image.kernel),
                            "--ramdisk", "initramfs.cpio", "--ramdisk", "app.cpio", "--cmdline", cmdline,
                            "-o", f"{name}.eif"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    yaml_text = readme_enclaves_yaml().replace("/tmp/parent", f"{sock_dir}/parent")
    (tmp_path / "enclaves.yaml").write_text(yaml_text)
    parents = [Parent(f"{sock_dir}/parent1.sock_8080", b"parent one"),
               Parent(f"{sock_dir}/parent2.sock_8080", b"parent two")]
    try:
        r = subprocess.run([sys.executable, "-m", "vsproxy", "enclave", "run", "--config", "enclaves.yaml", "--acpi",
                            "--qemu", str(nitro_qemu)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, errors="replace", timeout=300)
    finally:
        for p in parents:
            p.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace") for n in ("enclave1", "enclave2")}
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{logs}"
    for name, parent in (("enclave1", "parent one"), ("enclave2", "parent two")):
        out = logs[name]
        assert "VSPROXY-SCRIPT-EXIT 0" in out, out[-3000:]
        assert "HEARTBEAT b7" in out and f"PARENT I am {parent}" in out, out[-3000:]
    assert "enclave1: serving vhost-user" in r.stderr and "enclave2: serving vhost-user" in r.stderr


def test_qemu_reads_our_eif_layout_and_crc_and_refuses_what_vsproxy_refuses(
        nitro_qemu: Path, tmp_path: Path) -> None:
    """QEMU's own EIF reader (hw/core/eif.c) as the second implementation of the format: a byte
    changed after the CRC was made is a CRC mismatch to both; the same EIF intact gets past
    QEMU's checks, and QEMU takes its kernel section for the kernel (it then refuses the fake
    kernel itself)."""
    good = E.build(b"\x90" * 4096, "console=ttyS0", [b"initrd" * 100, b"app" * 10])
    damaged = bytearray(good)
    damaged[548 + 12 + 100] ^= 0xFF
    results = {}
    for name, data in (("good", good), ("damaged", bytes(damaged))):
        path = tmp_path / f"{name}.eif"
        path.write_bytes(data)
        r = subprocess.run([str(nitro_qemu), "-accel", "tcg", "-M", "nitro-enclave", "-m", "64M", "-nodefaults",
                            "-display", "none", "-kernel", str(path)], capture_output=True, text=True, timeout=60)
        results[name] = r.stderr
    with pytest.raises(E.EifError, match="bad CRC"):
        E.parse(bytes(damaged))
    assert "CRC mismatch" in results["damaged"], results["damaged"]
    assert "CRC" not in results["good"] and "EIF" not in results["good"], results["good"]
    assert "linux kernel too old" in results["good"], results["good"]  # our 4 KiB of NOPs, as the kernel


FOREVER_SCRIPT = r"""
echo "HEARTBEAT $(printf '\267' | vsock_tool connect 3 9000 | od -An -tx1 | tr -d ' ')"
sleep 600
"""


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(d))
    return out


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_the_running_enclave_and_its_qemu(
        nitro_qemu: Path, guest_image: harness.GuestImage, tmp_path: Path, sig: str) -> None:
    """An enclave that would run for ten minutes: Ctrl-C (SIGINT to vsproxy alone, as a shell's
    kill -INT would; a terminal's Ctrl-C reaches QEMU too) or SIGTERM stops QEMU and vsproxy,
    promptly, without a traceback, with the status a signal ends a program with."""
    import signal
    import time

    base = guest_image.initrd.read_bytes()
    (tmp_path / "initramfs.cpio").write_bytes(base + b"\0" * (-len(base) % 4))
    (tmp_path / "app.cpio").write_bytes(harness._script_cpio(FOREVER_SCRIPT.encode()))
    cmdline = f"console=ttyS0 panic=-1 reboot=t tsc_early_khz={harness.host_tsc_khz()}"
    r = subprocess.run([sys.executable, "-m", "vsproxy", "eif", "build", "--kernel", str(guest_image.kernel),
                        "--ramdisk", "initramfs.cpio", "--ramdisk", "app.cpio", "--cmdline", cmdline,
                        "-o", "forever.eif"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    console, log = tmp_path / "console.log", tmp_path / "vsproxy.log"
    with open(log, "wb") as logf:
        p = subprocess.Popen([sys.executable, "-m", "vsproxy", "enclave", "run", "--eif-path", "forever.eif",
                              "--acpi", "--qemu", str(nitro_qemu), "--console-log", str(console)],
                             cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    qemu: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not (console.exists() and "HEARTBEAT b7" in console.read_text(errors="replace")):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        qemu = [c for c in children(p.pid) if b"qemu" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(qemu) == 1, children(p.pid)
        start = time.monotonic()
        p.send_signal(getattr(signal, sig))
        rc = p.wait(30)
        took = time.monotonic() - start
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        for q in qemu:  # never left behind by a failing test
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text(errors="replace")
    assert not Path(f"/proc/{qemu[0]}").exists() or "zombie" in Path(f"/proc/{qemu[0]}/status").read_text().lower()
    assert took < 15, (took, text[-2000:])
    assert "Traceback" not in text, text[-3000:]
    assert rc == 128 + getattr(signal, sig), (rc, text[-2000:])  # as a shell reports a program it stopped
    assert "SIGKILL" not in text and "exited with status -9" not in text  # QEMU stopped on the signal
