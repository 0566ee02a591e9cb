"""`vsproxy eif describe`'s PCR0/1/2 against QEMU's own: QEMU's nitro-enclave machine hashes the
EIF itself (hw/core/eif.c) and extends the PCRs of its NSM device at reset
(hw/i386/nitro_enclave.c); a guest with the NSM driver reads them back through /dev/nsm
(tests/guest/nsm_tool.c, DescribePCR over NSM_IOCTL_RAW). The guest is bookworm-backports' 6.12
cloud kernel (tests/guest/build-nsm.sh): Debian 12's 6.1 has no NSM driver. It takes the
machine's virtio-mmio devices from ACPI (`--acpi`), as the 6.1 guest does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import harness
import pytest

NITRO_QEMU = harness.cache_root() / "qemu-nitro" / "bin" / "qemu-system-x86_64"
BUILD_NSM = Path(__file__).resolve().parents[1] / "guest" / "build-nsm.sh"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nsm_guest() -> harness.GuestImage:
    """The NSM-capable guest, built (or found cached) by tests/guest/build-nsm.sh."""
    d = harness.cache_root() / "nsm-guest"
    r = subprocess.run(["bash", str(BUILD_NSM), str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"tests/guest/build-nsm.sh failed (exit {r.returncode}):\n{r.stderr[-3000:]}", pytrace=False)
    if not NITRO_QEMU.exists():
        pytest.fail(f"{NITRO_QEMU} is missing: tests/guest/qemu-nitro.sh builds it (tests/run.sh runs it)",
                    pytrace=False)
    return harness.GuestImage(kernel=d / "vmlinuz", initrd=d / "initramfs.cpio.gz",
                              kernel_release=(d / "kernel-version").read_text().strip(),
                              vsock_tool=d / "vsock_tool")


def vsproxy(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=timeout)


PCR_LINE = re.compile(r"^PCR(\d+) ([0-9a-f]{96}) lock=(true|false)\r?$", re.M)


def boot_and_read_pcrs(eif: Path, log: Path) -> dict[str, tuple[str, str]]:
    """Boots EIF with `vsproxy enclave run`; returns {"PCR0": (hex, lock), ...} as the guest printed them."""
    r = vsproxy("enclave", "run", "--eif-path", eif.name, "--enclave-cid", "16", "--acpi", "--qemu", str(NITRO_QEMU),
                "--console-log", log.name, cwd=eif.parent, timeout=300)
    console = log.read_text(errors="replace")
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stderr[-3000:]}\n--- console\n{console[-3000:]}"
    assert "VSPROXY-SCRIPT-EXIT 0" in console, console[-3000:]
    return {f"PCR{m[1]}": (m[2], m[3]) for m in PCR_LINE.finditer(console)}


SCRIPT = "nsm_tool describe-pcr 0 1 2\n"


def test_the_pcrs_qemus_nsm_gives_the_enclave_are_the_ones_eif_describe_computes(
        nsm_guest: harness.GuestImage, tmp_path: Path) -> None:
    """Two EIFs that differ in the command line (PCR0 and PCR1) and in the application ramdisk
    (PCR0 and PCR2): each enclave reads, from QEMU's NSM, the PCRs `vsproxy eif describe --json`
    printed for its own EIF, and the two differ in all three, so a wrong hash in either
    implementation would show."""
    base = nsm_guest.initrd.read_bytes()
    (tmp_path / "initramfs.cpio").write_bytes(base + b"\0" * (-len(base) % 4))
    khz = harness.host_tsc_khz()
    # quiet: no kernel message cuts into a PCR line on the console
    cmdline = f"console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz={khz}"
    variants = {"a": (cmdline, SCRIPT), "b": (cmdline + " vsproxy.end=poweroff", SCRIPT + "echo variant b\n")}
    described: dict[str, dict[str, str]] = {}
    read: dict[str, dict[str, tuple[str, str]]] = {}
    for name, (cmd, script) in variants.items():
        (tmp_path / f"app-{name}.cpio").write_bytes(harness._script_cpio(script.encode()))
        r = vsproxy("eif", "build", "--kernel", str(nsm_guest.kernel), "--ramdisk", "initramfs.cpio",
                    "--ramdisk", f"app-{name}.cpio", "--memory", "256", "--cmdline", cmd, "-o", f"{name}.eif",
                    cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        r = vsproxy("eif", "describe", "--json", f"{name}.eif", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        described[name] = json.loads(r.stdout)["Measurements"]
        read[name] = boot_and_read_pcrs(tmp_path / f"{name}.eif", tmp_path / f"{name}.log")
    for name in variants:
        assert sorted(read[name]) == ["PCR0", "PCR1", "PCR2"], read[name]
        for pcr in ("PCR0", "PCR1", "PCR2"):
            value, lock = read[name][pcr]
            want = described[name][pcr]
            assert value == want, f"{name}.eif {pcr}: QEMU's NSM says {value}, eif describe {want}"
            assert lock == "true"  # the machine locks PCRs 0-15 at reset, as a Nitro enclave's are
    for pcr in ("PCR0", "PCR1", "PCR2"):
        assert read["a"][pcr][0] != read["b"][pcr][0], pcr
