"""EIF files (vsproxy.enclave.eif): built as QEMU's hw/core/eif.c reads them, damaged ones refused
with one clear line, and the PCR0-2 measurements as the nitro-enclave machine extends them."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsproxy.enclave import eif as E

KERNEL = b"\x7fkernel image" * 100
CMDLINE = "console=ttyS0 panic=-1"
INITRD = b"initramfs archive" * 50
APP = b"application ramdisk" * 30


def sample(**kw: object) -> bytes:
    return E.build(KERNEL, CMDLINE, [INITRD, APP], **kw)  # type: ignore[arg-type]


def test_a_built_eif_reads_back_section_by_section_with_its_crc_and_defaults() -> None:
    data = sample(default_mem=256 << 20, default_cpus=2)
    image = E.parse(data)
    assert data[:4] == b".eif" and image.version == 4 and image.flags == 0
    assert (image.default_mem, image.default_cpus) == (256 << 20, 2)
    assert [s.name for s in image.sections] == ["kernel", "cmdline", "ramdisk", "ramdisk"]
    assert image.kernel == KERNEL and image.cmdline == CMDLINE and image.ramdisks == [INITRD, APP]
    # the layout, independently: header, then each 12-byte section header and its data, in order
    off = 548
    for s, (t, body) in zip(image.sections, [(1, KERNEL), (2, CMDLINE.encode()), (3, INITRD), (3, APP)], strict=True):
        assert s.offset == off and data[off : off + 12] == struct.pack(">HHQ", t, 0, len(body))
        assert data[off + 12 : off + 12 + len(body)] == body
        off += 12 + len(body)
    assert off == len(data)
    # CRC32 over the header without its last 4 bytes, then every section in table order
    assert image.crc32 == zlib.crc32(data[:544] + data[548:]) == struct.unpack(">I", data[544:548])[0]
    assert struct.unpack_from(">H", data, 26)[0] == 4  # section_cnt


def test_the_measurements_are_sha384_chains_extended_from_zero_as_the_machine_does() -> None:
    m = E.parse(sample()).measurements()
    zero = bytes(48)

    def pcr(data: bytes) -> bytes:
        return hashlib.sha384(zero + hashlib.sha384(data).digest()).digest()

    assert m.pcr0 == pcr(KERNEL + CMDLINE.encode() + INITRD + APP)  # the whole image
    assert m.pcr1 == pcr(KERNEL + CMDLINE.encode() + INITRD)  # kernel, cmdline, bootstrap ramdisk
    assert m.pcr2 == pcr(APP)  # the application's ramdisks
    one = E.parse(E.build(KERNEL, CMDLINE, [INITRD])).measurements()
    assert one.pcr2 == pcr(b"") and one.pcr1 == m.pcr1
    # metadata is covered by the CRC, not by any measurement
    with_meta = E.parse(E.build(KERNEL, CMDLINE, [INITRD, APP], metadata=b'{"BuildTool":"vsproxy"}'))
    assert with_meta.measurements() == m and with_meta.crc32 != E.parse(sample()).crc32


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


def fix_crc(data: bytes) -> bytes:
    return data[:544] + struct.pack(">I", zlib.crc32(data[:544] + data[548:])) + data[548:]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: b"ELF!" + d[4:], "not an EIF: magic"),
    (lambda d: corrupt(d, 548 + 12 + 5, b"X"), "bad CRC"),
    (lambda d: d[:600], "truncated"),
    (lambda d: d[:100], "truncated"),
    (lambda d: fix_crc(corrupt(d, 26, struct.pack(">H", 33))), "at most 32"),
    (lambda d: fix_crc(corrupt(d, 4, struct.pack(">H", 3))), "version 3"),
    (lambda d: fix_crc(corrupt(d, 548 + 2, struct.pack(">H", 1))), "flags"),
    (lambda d: fix_crc(corrupt(d, 548 + 12 + len(KERNEL) + 12 + len(CMDLINE) + 4, struct.pack(">Q", 7))),
     "size 7 in its header"),
    (lambda d: fix_crc(corrupt(d, 548 + 12 + len(KERNEL), struct.pack(">H", 1))), "more than one kernel"),
], ids=["magic", "crc", "truncated-section", "truncated-header", "too-many-sections", "old-version",
        "section-flags", "size-mismatch", "two-kernels"])
def test_a_damaged_eif_is_refused_with_one_clear_line(damage: object, message: str) -> None:
    bad = damage(sample())  # type: ignore[operator]
    with pytest.raises(E.EifError, match=message) as e:
        E.parse(bad)
    assert "\n" not in str(e.value)


def test_an_eif_without_a_ramdisk_is_refused_and_cannot_be_built() -> None:
    with pytest.raises(E.EifError, match="at least one ramdisk"):
        E.build(KERNEL, CMDLINE, [])
    # built by hand: kernel and cmdline only
    body = struct.pack(">HHQ", 1, 0, 4) + b"kern" + struct.pack(">HHQ", 2, 0, 2) + b"ro"
    head = struct.pack(">4sHHQQHH32Q32QII", b".eif", 4, 0, 0, 0, 0, 2, 548, 548 + 16, *([0] * 30), 4, 2,
                       *([0] * 30), 0, 0)
    data = fix_crc(head + body)
    with pytest.raises(E.EifError, match="no ramdisk section"):
        E.parse(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, 3000))
def test_no_damage_makes_parse_fail_other_than_with_eif_error(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(E.build(b"k" * 300, "c", [b"r" * 300, b"a" * 100]))
    for at, value in flips:
        if at < len(data):
            data[at] = value
    try:
        E.parse(bytes(data[: len(data) - cut]))
    except E.EifError:
        pass


def vsproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", *args], capture_output=True, text=True, timeout=60)


def test_eif_build_and_describe_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(KERNEL)
    (tmp_path / "r1").write_bytes(INITRD)
    (tmp_path / "r2").write_bytes(APP)
    out = tmp_path / "x.eif"
    r = vsproxy("eif", "build", "--kernel", str(tmp_path / "k"), "--ramdisk", str(tmp_path / "r1"),
                "--ramdisk", str(tmp_path / "r2"), "--cmdline", CMDLINE, "--memory", "256", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == sample(default_mem=256 << 20)
    d = vsproxy("eif", "describe", str(out))
    m = E.parse(out.read_bytes()).measurements()
    assert d.returncode == 0 and f"PCR0: {m.pcr0.hex()}" in d.stdout and f"cmdline: {CMDLINE}" in d.stdout
    assert "section 3: ramdisk" in d.stdout and "default memory 256 MiB" in d.stdout
    j = vsproxy("eif", "describe", "--json", str(out))
    assert '"PCR2": "' + m.pcr2.hex() + '"' in j.stdout
    # damaged and missing: one line, exit 2, no traceback
    (tmp_path / "bad.eif").write_bytes(out.read_bytes()[:1000])
    for path in (tmp_path / "bad.eif", tmp_path / "missing.eif"):
        b = vsproxy("eif", "describe", str(path))
        assert b.returncode == 2 and b.stderr.count("\n") == 1 and "Traceback" not in b.stderr, b.stderr
        assert str(path) in b.stderr


def test_enclave_run_refuses_a_bad_eif_and_cid_3_and_explains_a_qemu_without_the_machine(tmp_path: Path) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b"not an eif at all")
    r = vsproxy("enclave", "run", "--eif-path", str(bad))
    assert r.returncode == 2 and "not an EIF" in r.stderr and "Traceback" not in r.stderr
    r = vsproxy("enclave", "run", "--eif-path", str(bad), "--enclave-cid", "3")
    assert r.returncode == 2 and "3 is the parent" in r.stderr
    good = tmp_path / "x.eif"
    good.write_bytes(sample())
    # Debian's QEMU 7.2 on PATH has no nitro-enclave machine
    r = vsproxy("enclave", "run", "--eif-path", str(good), "--qemu", "qemu-system-x86_64")
    assert r.returncode == 2 and "no nitro-enclave machine" in r.stderr and "libcbor" in r.stderr, r.stderr


def test_an_enclave_config_splits_into_vsproxys_devices_and_the_enclaves_to_start() -> None:
    from vsproxy.enclave.config import EnclaveConfigError, split

    data = {"vms": [{"name": "e1", "guest_cid": 16, "eif_path": "a.eif", "memory": 256, "uds_path": "/tmp/p1"},
                    {"guest-cid": 17, "eif-path": "b.eif", "cpu-count": 2, "socket": "/tmp/e2.sock"},
                    {"name": "parent", "guest_cid": 10, "socket": "/tmp/parent.sock"}]}
    vsproxy_part, specs = split(data, "f.yaml", "/run/x")
    assert [(s.name, s.cid, s.socket, s.eif_path, s.memory, s.cpu_count) for s in specs] == [
        ("e1", 16, "/run/x/e1.sock", "a.eif", 256, None), ("enclave17", 17, "/tmp/e2.sock", "b.eif", None, 2)]
    assert vsproxy_part == {"vms": [
        {"name": "e1", "guest-cid": 16, "uds-path": "/tmp/p1", "socket": "/run/x/e1.sock"},
        {"guest-cid": 17, "socket": "/tmp/e2.sock", "name": "enclave17"},
        {"name": "parent", "guest-cid": 10, "socket": "/tmp/parent.sock"}]}
    for bad, message in [
        ({"vms": [{"guest_cid": 5, "socket": "/s"}]}, "no entry names an eif-path"),
        ({"vms": [{"guest_cid": 5, "memory": 256}]}, "memory without eif-path"),
        ({"vms": [{"guest_cid": 3, "eif_path": "a.eif"}]}, "3 is the parent"),
        ({"vms": [{"guest_cid": 16, "eif_path": "a.eif", "memory": "lots"}]}, "memory: expected a positive number"),
        ({"enclaves": []}, "expected a 'vms:' list"),
    ]:
        with pytest.raises(EnclaveConfigError, match=message):
            split(bad, "f.yaml", "/run/x")


def test_enclave_run_with_a_config_refuses_bad_files_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text("[[vm]]\n")
    (tmp_path / "bad.yaml").write_text("vms: [\n")
    (tmp_path / "none.yaml").write_text("vms:\n  - guest_cid: 5\n    socket: /tmp/s\n")
    for name, message in [("x.toml", "is YAML"), ("bad.yaml", "bad.yaml: "), ("none.yaml", "no entry names"),
                          ("missing.yaml", "No such file")]:
        r = vsproxy("enclave", "run", "--config", str(tmp_path / name))
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = vsproxy("enclave", "run")
    assert r.returncode == 2 and "--eif-path (one enclave) or --config" in r.stderr
