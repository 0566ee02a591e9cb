"""tests/guest/nsm_tool.c's hand-written CBOR, on the host: the DescribePCR request it sends and
its decoding of the responses QEMU's virtio-nsm sends (hw/virtio/virtio-nsm.c serializes with
libcbor: definite lengths, the keys "data" then "lock"), and of damaged ones (one line on stderr,
exit 4, whatever the bytes). The guest side, against QEMU's device, is
tests/e2e/test_nsm_e2e.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent / "guest" / "nsm_tool.c"


@pytest.fixture(scope="module")
def tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nsm") / "nsm_tool"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SRC)], check=True)
    return out


def text(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 24
    return bytes([0x60 | len(b)]) + b


def response(data: bytes, lock: bool, *, reverse: bool = False, extra: bytes = b"", pairs: int = 2) -> bytes:
    items = [text("data") + b"\x58" + bytes([len(data)]) + data, text("lock") + (b"\xf5" if lock else b"\xf4")]
    if reverse:
        items.reverse()
    return b"\xa1" + text("DescribePCR") + bytes([0xA0 | pairs]) + b"".join(items) + extra


PCR = bytes(range(0x30, 0x60))


def run(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool), *args], capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("index", [0, 1, 2, 23, 24, 255])
def test_the_request_is_a_describepcr_map_with_a_one_byte_index(tool: Path, index: int) -> None:
    # QEMU takes the index only as a one-byte unsigned integer (CBOR_INT_8): 0x00-0x17 or 0x18 NN
    arg = bytes([index]) if index < 24 else bytes([0x18, index])
    want = b"\xa1" + text("DescribePCR") + b"\xa1" + text("index") + arg
    assert run(tool, "encode", str(index)).stdout.strip() == want.hex()


def test_an_index_outside_a_byte_is_refused(tool: Path) -> None:
    r = run(tool, "encode", "256")
    assert r.returncode == 1 and r.stderr.strip() == "nsm_tool: bad PCR index 256 (0-255)"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lock", [True, False])
def test_a_describepcr_response_prints_the_pcr_and_its_lock(tool: Path, lock: bool, reverse: bool) -> None:
    r = run(tool, "decode", response(PCR, lock, reverse=reverse).hex())
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"PCR- {PCR.hex()} lock={'true' if lock else 'false'}\n"


def test_an_unknown_key_with_a_scalar_value_is_skipped(tool: Path) -> None:
    r = run(tool, "decode", response(PCR, True, extra=text("x") + b"\x19\x01\x00", pairs=3).hex())
    assert r.returncode == 0 and r.stdout.startswith(f"PCR- {PCR.hex()}"), r.stderr


def test_an_nsm_error_is_printed_with_its_name_and_exit_3(tool: Path) -> None:
    r = run(tool, "decode", (b"\xa1" + text("Error") + text("InvalidIndex")).hex())
    assert r.returncode == 3 and r.stdout == "NSM-ERROR - InvalidIndex\n"


def test_every_truncation_of_a_response_is_one_error_line_and_exit_4(tool: Path) -> None:
    good = response(PCR, True)
    for n in range(len(good)):
        r = run(tool, "decode", good[:n].hex())
        assert r.returncode == 4, (n, r)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and "bad response at byte" in r.stderr, (n, r)


@pytest.mark.parametrize(("damaged", "why"), [
    (response(PCR[:47], True), "data is not 48 bytes"),
    (response(PCR, True) + b"\x00", "bytes after the response"),
    (b"\xbf" + response(PCR, True)[1:], "indefinite length"),
    (response(PCR, True, extra=text("x") + b"\xa0", pairs=3), "unexpected array, map or tag"),
    (b"\xa1" + text("DescribePCR") + b"\xa1" + text("data") + b"\x5b" + b"\xff" * 8, "a string runs past the end"),
    (b"\xa1" + text("DescribePCR") + b"\xa1" + text("lock") + b"\xf5", "without data or lock"),
    (b"\xa2" + text("DescribePCR") + b"\xa0" + text("Error") + text("x"), "does not have one key"),
    (b"\xa1" + text("Attestation") + b"\xa0", "neither DescribePCR nor Error"),
    (response(PCR, True)[:-1] + b"\x01", "lock is not true or false"),
])
def test_a_damaged_response_is_named_in_one_line(tool: Path, damaged: bytes, why: str) -> None:
    r = run(tool, "decode", damaged.hex())
    assert r.returncode == 4 and r.stdout == "", r
    assert len(r.stderr.splitlines()) == 1 and why in r.stderr, r.stderr
