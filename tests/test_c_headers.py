"""The names the C uses agree with the Python that holds the same values: virtio-vsock ops, types
and flags (vsproxy/vsock/header.py), descriptor and ring flags (vsproxy/virtq.py,
vsproxy/simguest/ring.py), the vsockmon ops and their mapping from virtio ops
(vsproxy/capture/format.py), and the values of the fields Python reads back from C
(vsproxy/fastpath.py, vsproxy/taps.py, vsproxy/simguest/cblast.py). The headers are read as
text: ``#define NAME 123`` lines and ``NAME = 123`` entries of enums."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dissectors import layers
from vsproxy import fastpath, taps, virtq
from vsproxy.capture import format as fmt
from vsproxy.capture import hub
from vsproxy.simguest import cblast
from vsproxy.simguest import ring as sgring
from vsproxy.vsock import header as H
from vsproxy.vsock import lending, rx

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "vsproxy" / "_c"
SG_C_DIR = ROOT / "vsproxy" / "simguest" / "_c"
LINUX = Path("/usr/include/linux")  # linux-libc-dev: there wherever the C builds (libc6-dev needs it)


def strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def constants(path: Path, known: dict[str, int] | None = None) -> dict[str, int]:
    """The integer constants of a C header: ``#define NAME <int>`` (or ``#define NAME OTHER``,
    an alias of one already read, or in ``known``) and ``NAME = <int>`` inside ``enum { ... }``."""
    text = strip_comments(path.read_text())
    out: dict[str, int] = dict(known or {})
    for body in re.findall(r"\benum\b[^{;]*\{(.*?)\}", text, flags=re.S):
        for name, value in re.findall(r"\b([A-Z][A-Z0-9_]*)\s*=\s*(-?(?:0x[0-9a-fA-F]+|\d+))", body):
            out[name] = int(value, 0)
    for name, value in re.findall(r"^[ \t]*#[ \t]*define[ \t]+([A-Z][A-Z0-9_]*)[ \t]+\(?([A-Za-z0-9_]+)\)?[ \t]*$",
                                  text, flags=re.M):
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", value):
            out[name] = int(value, 0)
        elif value in out:
            out[name] = out[value]
    return out


def with_prefix(consts: dict[str, int], prefix: str) -> dict[str, int]:
    return {name[len(prefix):]: v for name, v in consts.items() if name.startswith(prefix)}


VIRTIO = constants(C_DIR / "virtio_vsock.h")
MON = constants(C_DIR / "vsockmon.h")
FASTPATH = constants(C_DIR / "fastpath.h")
CAPTURE = constants(C_DIR / "capture.h")
RING = constants(C_DIR / "ring.h", VIRTIO)
CBLAST = constants(SG_C_DIR / "cblast.h")


def test_the_parser_reads_defines_and_enums() -> None:
    assert VIRTIO["VIRTIO_VSOCK_OP_RW"] == 5 and VIRTIO["VRING_DESC_F_INDIRECT"] == 4
    assert RING["HDR"] == 44 and FASTPATH["FILL_BACK"] == -1


def test_virtio_types_and_ops_are_the_header_modules() -> None:
    assert with_prefix(VIRTIO, "VIRTIO_VSOCK_TYPE_") == {t.name: int(t) for t in H.Type}
    assert with_prefix(VIRTIO, "VIRTIO_VSOCK_OP_") == {op.name: int(op) for op in H.Op}


def test_virtio_flags_and_header_size_are_the_header_modules() -> None:
    assert with_prefix(VIRTIO, "VIRTIO_VSOCK_SHUTDOWN_") == {"RCV": H.SHUTDOWN_RCV, "SEND": H.SHUTDOWN_SEND}
    assert with_prefix(VIRTIO, "VIRTIO_VSOCK_SEQ_") == {"EOM": H.SEQ_EOM, "EOR": H.SEQ_EOR}
    assert VIRTIO["VIRTIO_VSOCK_HDR_LEN"] == H.HDR_SIZE == H.HDR.size


def test_ring_flags_are_the_walkers_and_the_simulated_guests() -> None:
    c = with_prefix(VIRTIO, "VRING_DESC_F_")
    assert c == {"NEXT": virtq.VIRTQ_DESC_F_NEXT, "WRITE": virtq.VIRTQ_DESC_F_WRITE,
                 "INDIRECT": virtq.VIRTQ_DESC_F_INDIRECT}
    assert c == {"NEXT": sgring.VRING_DESC_F_NEXT, "WRITE": sgring.VRING_DESC_F_WRITE,
                 "INDIRECT": sgring.VRING_DESC_F_INDIRECT}
    assert VIRTIO["VRING_USED_F_NO_NOTIFY"] == virtq.VRING_USED_F_NO_NOTIFY == sgring.VRING_USED_F_NO_NOTIFY
    assert (VIRTIO["VRING_AVAIL_F_NO_INTERRUPT"] == virtq.VRING_AVAIL_F_NO_INTERRUPT
            == sgring.VRING_AVAIL_F_NO_INTERRUPT)


def test_vsockmon_ops_and_transports_are_the_capture_formats() -> None:
    assert with_prefix(MON, "AF_VSOCK_OP_") == {op.name: int(op) for op in fmt.MonOp}
    assert with_prefix(MON, "AF_VSOCK_TRANSPORT_") == {t.name: int(t) for t in fmt.MonTransport}
    assert MON["AF_VSOCKMON_HDR_LEN"] == fmt.VSOCKMON.size == 32


def c_mon_op_table() -> dict[int, int]:
    """vsockmon.h's VSOCKMON_OP_OF_VIRTIO initializer, ``[VIRTIO_VSOCK_OP_X] = AF_VSOCK_OP_Y``
    entries, as virtio op -> vsockmon op."""
    text = strip_comments((C_DIR / "vsockmon.h").read_text())
    entries = re.findall(r"\[\s*(VIRTIO_VSOCK_OP_[A-Z_]+)\s*\]\s*=\s*(AF_VSOCK_OP_[A-Z_]+)", text)
    table = {VIRTIO[virtio]: MON[mon] for virtio, mon in entries}
    assert len(table) == len(entries), "a virtio op twice in VSOCKMON_OP_OF_VIRTIO"
    return table


def test_the_c_maps_virtio_ops_to_vsockmon_ops_as_the_python_table() -> None:
    table = c_mon_op_table()
    # the C array has VSOCKMON_OP_OF_VIRTIO_N entries, one per op up to CREDIT_REQUEST; past it, UNKNOWN
    assert sorted(table) == list(range(VIRTIO["VIRTIO_VSOCK_OP_CREDIT_REQUEST"] + 1))
    for op in [*H.Op, 8, 0xFFFF]:
        assert table.get(int(op), fmt.AF_VSOCK_OP_UNKNOWN) == fmt.mon_op(op), op
    assert {op: table[op] for op in fmt.MON_OP_OF_VIRTIO} == dict(fmt.MON_OP_OF_VIRTIO)


def test_the_scapy_layers_use_the_python_table() -> None:
    for op in H.Op:
        frame = bytes(layers.VsockMon() / layers.VirtioVsock(op=int(op)))
        assert int.from_bytes(frame[24:26], "little") == fmt.mon_op(op), op
    assert layers.MON_OPS == {int(op): op.name for op in fmt.MonOp}


def test_capture_record_constants_are_the_capture_formats() -> None:
    assert CAPTURE["PCAPNG_BT_EPB"] == fmt.BT_EPB
    assert CAPTURE["PCAPNG_EPB_FLAGS"] == fmt.EPB_FLAGS
    assert (CAPTURE["PCAPNG_EPB_INBOUND"], CAPTURE["PCAPNG_EPB_OUTBOUND"]) == (fmt.EPB_INBOUND, fmt.EPB_OUTBOUND)
    assert CAPTURE["PCAPNG_OPT_COMMENT"] == fmt.OPT_COMMENT


def test_a_lent_chunk_always_has_room_for_one_largest_record_and_the_spare() -> None:
    assert CAPTURE["CAP_COMMENT_MAX"] == taps.CAP_COMMENT_MAX and CAPTURE["CAP_SPARE"] == taps.CAP_SPARE
    # a largest record: the frame (vsockmon + virtio header + 64 KiB), the longest comment, pcapng's framing
    largest = 28 + (H.MAX_PKT_PAYLOAD + 32 + 44 + 3) // 4 * 4 + 8 + 4 + taps.CAP_COMMENT_MAX + 4 + 4
    assert hub.RESERVE_ROOM >= largest + taps.CAP_SPARE
    # vq_tx_kick stops a round with less than CAP_LOW left: what reserve() guarantees, so a kick
    # with a fresh chunk always runs one round
    assert CAPTURE["CAP_LOW"] == hub.RESERVE_ROOM


def test_the_values_python_reads_back_from_the_fast_path() -> None:
    assert (FASTPATH["ITEM_SLOW"], FASTPATH["ITEM_CREDIT"], FASTPATH["ITEM_TAIL"]) == (
        fastpath.SLOW, fastpath.CREDIT, fastpath.TAIL)
    assert with_prefix(FASTPATH, "CAP_") == {"NONE": taps.CAP_NONE, "PCAP": taps.CAP_PCAP, "PCAPNG": taps.CAP_PCAPNG}
    # a run's segment names its region, below the table's size, or the scratch buffer
    assert (FASTPATH["SEG_SCRATCH"], FASTPATH["VQ_MAX_REGIONS"]) == (fastpath.SEG_SCRATCH, fastpath.MAX_REGIONS)
    assert fastpath.MAX_REGIONS <= fastpath.SEG_SCRATCH <= 255
    flags = with_prefix(FASTPATH, "OWN_F_")
    # the lending records and flags are defined sans-I/O beside the core (vsock/lending.py, vsock/rx.py)
    assert flags and flags == {name: getattr(lending, f"OWN_F_{name}") for name in flags}
    why = {name: v for name, v in with_prefix(FASTPATH, "OWN_").items() if not name.startswith("F_")}
    assert why == {name: getattr(lending, f"OWN_{name}") for name in why} and lending.OWN_TAKEN not in why.values()
    for prefix, module in (("RX_", rx), ("KICK_", fastpath), ("FILL_", fastpath)):
        c = with_prefix(FASTPATH, prefix)
        assert c and c == {name: getattr(module, prefix + name) for name in c}, prefix


def test_the_values_python_reads_back_from_the_simulated_guest() -> None:
    c = with_prefix(CBLAST, "SG_")
    assert len(c) == 7 and c == {name: getattr(cblast, f"SG_{name}") for name in c}
    modes = with_prefix(CBLAST, "RTT_")  # sg_rtt's modes
    assert len(modes) == 3 and modes == {name: getattr(cblast, f"RTT_{name}") for name in modes}


def test_cdef_headers_have_no_preprocessor_lines() -> None:
    for path in (C_DIR / "fastpath_cdef.h", SG_C_DIR / "cblast_cdef.h"):
        assert not [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")], path


def test_the_c_spells_ops_and_types_by_name() -> None:
    magic = re.compile(r"\b(op|type|vop)\s*(==|!=|=)\s*[1-9]")  # = 0 initializes
    for path in [*C_DIR.glob("*.[ch]"), *SG_C_DIR.glob("*.[ch]")]:
        code = strip_comments(path.read_text())
        assert not [m.group(0) for m in magic.finditer(code)], path


@pytest.mark.parametrize("mirror", ["virtio_vsock.h", "vsockmon.h"])
def test_the_mirrors_agree_with_the_linux_headers(mirror: str) -> None:
    ours = constants(C_DIR / mirror)
    linux = constants(LINUX / "virtio_vsock.h") | constants(LINUX / "virtio_ring.h") | constants(LINUX / "vsockmon.h")
    own = {"VIRTIO_VSOCK_HDR_LEN", "AF_VSOCKMON_HDR_LEN"}  # sizeof of the structs, which Linux does not name
    assert {k: v for k, v in ours.items() if k not in own} == {k: linux.get(k) for k in ours if k not in own}
