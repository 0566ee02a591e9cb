"""The test guest boots on every QEMU/machine pair and runs its script.

No vsock device here (a vhost-user device needs a backend); these tests prove
the image, the /init protocol and the harness, including the reboot scenario
and scripts too long for the kernel command line.
"""

from __future__ import annotations

from collections.abc import Callable

import harness
import pytest
from guestdata import fnv1a64, prng_bytes

pytestmark = pytest.mark.e2e

CONFIGS = [(q, m) for q in ("qemu7", "qemu10") for m in harness.MACHINES]
IDS = [f"{q}-{m}" for q, m in CONFIGS]

BOOT_SCRIPT = r"""
echo "KERNEL $(uname -r)"
for m in virtio_ring virtio virtio_pci virtio_mmio vsock \
         vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    grep -q "^$m " /proc/modules && echo "MODULE $m"
done
vsock_tool prng 7 4096 | vsock_tool fnv
# No vsock device: AF_VSOCK works in the guest but a connect to the host fails.
vsock_tool connect 2 1234 </dev/null
echo "CONNECT-RC $?"
exit 42
"""


@pytest.mark.parametrize("qemu_name,machine", CONFIGS, ids=IDS)
def test_boot(
    qemu_name: str,
    machine: str,
    qemu_by_name: Callable[[str], harness.Qemu],
    guest_image: harness.GuestImage,
    record_property: Callable[[str, object], None],
) -> None:
    q = qemu_by_name(qemu_name)
    r = harness.boot_guest(q, machine, None, BOOT_SCRIPT, timeout=120, image=guest_image)
    out = r.script_output()
    detail = f"\n--- serial ---\n{r.serial}"
    record_property("boot_seconds", round(r.timings["init1"], 2))
    print(
        f"{qemu_name} {q.version} {machine}: init at {r.timings['init1']:.2f}s, "
        f"script exit at {r.timings['exit1']:.2f}s, qemu exit at {r.timings['qemu_exit']:.2f}s"
    )
    assert r.rc == 42, detail
    assert r.exit_codes == [42], detail
    assert r.qemu_returncode == 0, r.qemu_stderr + detail  # powered off, not killed
    assert f"VSPROXY-INIT {guest_image.kernel_release}" in r.serial, detail
    assert "VSPROXY-MODULES-OK 9" in r.serial, detail
    assert "VSPROXY-INSMOD-FAIL" not in r.serial, detail
    assert f"KERNEL {guest_image.kernel_release}" in out, detail
    for m in ("virtio_pci", "virtio_mmio", "vsock", "vmw_vsock_virtio_transport"):
        assert f"MODULE {m}" in out.splitlines(), detail
    assert f"FNV 4096 {fnv1a64(prng_bytes(7, 4096))}" in out, detail
    assert "CONNECT-FAIL E" in out, detail
    assert "CONNECT-RC 2" in out, detail


@pytest.mark.parametrize(
    "qemu_name,machine",
    [("qemu7", "pc"), ("qemu10", "microvm-legacy")],
    ids=["qemu7-pc", "qemu10-microvm-legacy"],
)
def test_reboot_scenario(
    qemu_name: str, machine: str, qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage
) -> None:
    """Two boots inside one QEMU: part 1, guest `reboot -f`, part 2, power off."""
    q = qemu_by_name(qemu_name)
    parts = [
        'echo "PART-ONE boot=$VSPROXY_BOOT"; exit 11',
        'echo "PART-TWO boot=$VSPROXY_BOOT"; exit 0',
    ]
    r = harness.boot_guest(q, machine, None, parts, timeout=180, image=guest_image)
    detail = f"\n--- serial ---\n{r.serial}"
    assert r.exit_codes == [11, 0], detail
    assert r.serial.count("VSPROXY-INIT ") == 2, detail
    assert "PART-ONE boot=1" in r.script_output(1), detail
    assert "PART-TWO boot=2" in r.script_output(2), detail
    assert "PART-ONE" not in r.script_output(2), detail
    assert r.qemu_returncode == 0, r.qemu_stderr + detail


def test_streaming_and_long_script(
    qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage
) -> None:
    """wait_for() sees lines while the guest runs; a long script goes in via cpio."""
    filler = "".join(f"# filler {i:04d} {'x' * 70}\n" for i in range(300))  # ~25 KB
    script = filler + "echo READY-FOR-HOST 5000\nsleep 2\necho AFTER-HOST\nexit 3\n"
    with harness.start_guest(qemu_by_name("qemu7"), "pc", None, script, timeout=120, image=guest_image) as run:
        m = run.wait_for(r"READY-FOR-HOST (\d+)")
        assert m.group(1) == "5000"
        assert run.proc.poll() is None  # still running: the host can act now
        assert not run.exit_codes
        run.wait_for("AFTER-HOST")
        assert run.wait_exit() == 3
        assert (run.log_dir / "initrd-with-script.cpio").exists()
        assert "vsproxy.script=" not in " ".join(run.argv)
    assert not run.log_dir.exists()  # temporary logs are removed after success


def test_timeout_fails_loudly(qemu_by_name: Callable[[str], harness.Qemu], guest_image: harness.GuestImage) -> None:
    with harness.start_guest(
        qemu_by_name("qemu7"), "pc", None, "echo SLOW; sleep 600", timeout=60, image=guest_image
    ) as run:
        run.wait_for("SLOW")
        with pytest.raises(harness.GuestTimeout) as ei:
            run.wait_for("NEVER-PRINTED", timeout=3)
        assert "SLOW" in str(ei.value)  # the serial log is in the message
        assert run.proc.poll() is not None  # QEMU was killed
