"""The capture the Linux kernel wrote, captures/kernel-vsockmon-loopback.pcap, read by vsproxy's
reader, by `vsproxy read` (text and --json) and by tshark, with the same facts from each.

The kernel's vsockmon device recorded it in the test guest (tests/e2e/test_kernel_capture.py, which
regenerates it; captures/README.md says how): vsock loopback traffic, CID 1 to CID 1. EXPECTED pins
its structure: ops, types, flags, payloads, the listening ports, and the client's ephemeral port
named per connection (c1, c2, c3) since the kernel picks it at random.

VSPROXY_KERNEL_CAPTURE=FILE checks FILE instead of the committed file; the end-to-end test does so
with a capture it has just made.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import Packet, dissect, records, time_text
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "captures" / "kernel-vsockmon-loopback.pcap"
CAPTURE = Path(os.environ.get("VSPROXY_KERNEL_CAPTURE") or FIXTURE)
VSPROXY = Path(sys.executable).with_name("vsproxy")  # the console script beside the venv's python
LAST_RESERVED_PORT = 1023  # Linux vsock: ephemeral ports are above it


class Step(NamedTuple):
    """One packet, with the client's ephemeral port shown as its connection's name (c1, c2...)."""

    src: str
    dst: str
    op: str
    type: str
    flags: int
    payload: bytes


HELLO = b"hello vsock"
MESSAGE = b"one seqpacket message"
C1, C2, C3 = "1:c1", "1:c2", "1:c3"
ECHO, NOBODY, SEQ = "1:5000", "1:5999", "1:5001"
S, Q = "STREAM", "SEQPACKET"
EOM_EOR = H.SEQ_EOM | H.SEQ_EOR

EXPECTED = [
    # STREAM echo on 5000: handshake; data both ways, each read answered by a credit update;
    # the client's half-close; the server's close (SHUTDOWN of both directions); the client's
    # RST for that SHUTDOWN and its RST when it closes.
    Step(C1, ECHO, "REQUEST", S, 0, b""),
    Step(ECHO, C1, "RESPONSE", S, 0, b""),
    Step(C1, ECHO, "RW", S, 0, HELLO),
    Step(ECHO, C1, "CREDIT_UPDATE", S, 0, b""),
    Step(ECHO, C1, "RW", S, 0, HELLO),
    Step(C1, ECHO, "CREDIT_UPDATE", S, 0, b""),
    Step(C1, ECHO, "SHUTDOWN", S, H.SHUTDOWN_SEND, b""),
    Step(ECHO, C1, "SHUTDOWN", S, H.SHUTDOWN_BOTH, b""),
    Step(C1, ECHO, "RST", S, 0, b""),
    Step(C1, ECHO, "RST", S, 0, b""),
    # Nothing listens on 5999.
    Step(C2, NOBODY, "REQUEST", S, 0, b""),
    Step(NOBODY, C2, "RST", S, 0, b""),
    # One SEQPACKET message (end of message and of record) echoed on 5001; the client closes.
    Step(C3, SEQ, "REQUEST", Q, 0, b""),
    Step(SEQ, C3, "RESPONSE", Q, 0, b""),
    Step(C3, SEQ, "RW", Q, EOM_EOR, MESSAGE),
    Step(SEQ, C3, "CREDIT_UPDATE", Q, 0, b""),
    Step(SEQ, C3, "RW", Q, EOM_EOR, MESSAGE),
    Step(C3, SEQ, "CREDIT_UPDATE", Q, 0, b""),
    Step(C3, SEQ, "SHUTDOWN", Q, H.SHUTDOWN_BOTH, b""),
    Step(SEQ, C3, "RST", Q, 0, b""),
    Step(SEQ, C3, "RST", Q, 0, b""),
]

# virtio op -> af_vsockmon_hdr op, as the kernel maps them (include/uapi/linux/vsockmon.h)
MON_OP = {
    "REQUEST": fmt.AF_VSOCK_OP_CONNECT, "RESPONSE": fmt.AF_VSOCK_OP_CONNECT,
    "RST": fmt.AF_VSOCK_OP_DISCONNECT, "SHUTDOWN": fmt.AF_VSOCK_OP_DISCONNECT,
    "RW": fmt.AF_VSOCK_OP_PAYLOAD, "CREDIT_UPDATE": fmt.AF_VSOCK_OP_CONTROL,
}  # fmt: skip


@functools.cache
def packets(path: Path) -> tuple[Packet, ...]:
    with open(path, "rb") as f:
        return tuple(dissect(r) for r in records(f))


def header(p: Packet) -> H.Header:
    assert p.hdr is not None, f"frame without a virtio header: {p.record.frame.hex()}"
    return p.hdr


Row = tuple[int, int, int, int, str, str, int, bytes]  # src_cid dst_cid src_port dst_port op type flags payload


def client_names(rows: list[Row]) -> dict[int, str]:
    """The source port of each REQUEST, named c1, c2... in order."""
    names: dict[int, str] = {}
    for _sc, _dc, sp, _dp, op, *_ in rows:
        if op == "REQUEST":
            names.setdefault(sp, f"c{len(names) + 1}")
    return names


def steps(rows: list[Row]) -> list[Step]:
    names = client_names(rows)
    return [
        Step(f"{sc}:{names.get(sp, sp)}", f"{dc}:{names.get(dp, dp)}", op, kind, flags, payload)
        for sc, dc, sp, dp, op, kind, flags, payload in rows
    ]


def reader_rows(pkts: tuple[Packet, ...]) -> list[Row]:
    return [
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port, H.Op(h.op).name, H.Type(h.type).name, h.flags, p.payload)
        for p in pkts
        for h in [header(p)]
    ]


@pytest.fixture(scope="module")
def capture() -> tuple[Packet, ...]:
    assert CAPTURE.is_file(), f"{CAPTURE} is missing (regenerate it: see captures/README.md)"
    return packets(CAPTURE)


def test_file_is_classic_pcap_linktype_vsock_and_small() -> None:
    data = CAPTURE.read_bytes()
    magic, vmaj, vmin, _tz, _sig, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, vmaj, vmin, linktype) == (0xA1B2C3D4, 2, 4, fmt.LINKTYPE_VSOCK)  # microsecond pcap
    assert snaplen == 65535
    assert len(data) < 4096


def test_reader_finds_the_expected_packets(capture: tuple[Packet, ...]) -> None:
    assert steps(reader_rows(capture)) == EXPECTED


def test_every_packet_is_cid_1_to_cid_1_from_an_ephemeral_client_port(capture: tuple[Packet, ...]) -> None:
    assert {(header(p).src_cid, header(p).dst_cid) for p in capture} == {(1, 1)}
    ports = client_names(reader_rows(capture))
    assert len(ports) == 3 and all(port > LAST_RESERVED_PORT for port in ports)
    assert {header(p).src_port for p in capture} | {header(p).dst_port for p in capture} == {*ports, 5000, 5999, 5001}


def test_vsockmon_header_repeats_the_virtio_addresses_and_maps_the_op(capture: tuple[Packet, ...]) -> None:
    for p in capture:
        h = header(p)
        frame = p.record.frame
        src_cid, dst_cid, src_port, dst_port, mon_op, transport, tlen = fmt.VSOCKMON.unpack_from(frame)
        assert (src_cid, dst_cid, src_port, dst_port) == (h.src_cid, h.dst_cid, h.src_port, h.dst_port)
        assert (transport, tlen, frame[30:32]) == (fmt.AF_VSOCK_TRANSPORT_VIRTIO, H.HDR_SIZE, b"\0\0")
        assert mon_op == p.mon_op == MON_OP[H.Op(h.op).name]
        assert len(frame) == fmt.VSOCKMON.size + H.HDR_SIZE + h.len and len(p.payload) == h.len


def test_vsproxy_builds_the_kernels_frames_byte_for_byte(capture: tuple[Packet, ...]) -> None:
    # What makes vsproxy's captures interchangeable with the kernel's.
    for p in capture:
        frame = p.record.frame
        assert fmt.vsockmon_frame(frame[32:76], frame[76:]) == frame


def test_credit_updates_report_the_bytes_read(capture: tuple[Packet, ...]) -> None:
    received: dict[tuple[int, int], int] = {}  # (receiver port, sender port) -> payload bytes
    seen = 0
    for p in capture:
        h = header(p)
        if h.op == H.Op.RW:
            received[h.dst_port, h.src_port] = received.get((h.dst_port, h.src_port), 0) + h.len
        if h.op == H.Op.CREDIT_UPDATE:
            assert h.fwd_cnt == received[h.src_port, h.dst_port] > 0
            seen += 1
    assert seen == 4


def test_timestamps_rise_within_seconds(capture: tuple[Packet, ...]) -> None:
    ts = [p.record.ts for p in capture]
    assert ts == sorted(ts) and ts[-1] - ts[0] < 30 and ts[0] > 1.6e9  # the guest's clock is real time


CLI_LINE = re.compile(
    r"(\d\d:\d\d:\d\d\.\d{6}) (\d+):(\d+) > (\d+):(\d+) ([A-Z_]+)( SEQPACKET)?(?: flags=(0x[0-9a-f]+))? "
    r"len=(\d+) buf_alloc=(\d+) fwd_cnt=(\d+)"
)


def run_cli(*args: str) -> list[str]:
    assert VSPROXY.exists(), f"{VSPROXY} missing: install vsproxy in the venv (pip install -e .)"
    p = subprocess.run([str(VSPROXY), "read", *args, str(CAPTURE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return p.stdout.splitlines()


def test_vsproxy_read_prints_one_line_per_packet(capture: tuple[Packet, ...]) -> None:
    lines = run_cli()
    assert len(lines) == len(EXPECTED)
    rows: list[Row] = []
    for line, p in zip(lines, capture, strict=True):
        m = CLI_LINE.fullmatch(line)
        assert m, line
        t, sc, sp, dc, dp, op, seq, flags, length, buf_alloc, fwd_cnt = m.groups()
        h = header(p)
        assert (t, int(length), int(buf_alloc), int(fwd_cnt)) == (time_text(p.record.ts), h.len, h.buf_alloc, h.fwd_cnt)
        # The text has no payload bytes: those come from the reader.
        rows.append((int(sc), int(dc), int(sp), int(dp), op, Q if seq else S, int(flags or "0", 16), p.payload))
    assert steps(rows) == EXPECTED


def test_vsproxy_read_json_gives_the_same_facts(capture: tuple[Packet, ...]) -> None:
    objs = [json.loads(line) for line in run_cli("--json")]
    rows = [
        (
            o["src_cid"],
            o["dst_cid"],
            o["src_port"],
            o["dst_port"],
            o["op"],
            H.Type(o["type"]).name,
            o["flags"],
            p.payload,
        )
        for o, p in zip(objs, capture, strict=True)
    ]
    assert steps(rows) == EXPECTED
    assert [o["payload_len"] for o in objs] == [len(s.payload) for s in EXPECTED]
    assert [o["vsockmon_op"] for o in objs] == [MON_OP[s.op] for s in EXPECTED]
    assert {(o["device"], o["from_guest"], o["comment"]) for o in objs} == {(None, None, None)}  # classic pcap


TSHARK_FIELDS = (
    "vsock.src_cid",
    "vsock.dst_cid",
    "vsock.src_port",
    "vsock.dst_port",
    "vsock.op",
    "vsock.virtio.op",
    "vsock.virtio.type",
    "vsock.virtio.flags",
    "vsock.trans",
    "vsock.trans_len",
    "vsock.payload",
)


def test_tshark_decodes_the_same_packets() -> None:
    exe = shutil.which("tshark")
    assert exe, "tshark is required (tests/run.sh installs it)"
    cmd = [exe, "-r", str(CAPTURE), "-T", "fields", "-E", "separator=|"] + [a for f in TSHARK_FIELDS for a in ("-e", f)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows: list[Row] = []
    for line in p.stdout.splitlines():
        sc, dc, sp, dp, mon_op, op, kind, flags, trans, trans_len, payload = line.split("|")
        assert (trans, trans_len) == (str(fmt.AF_VSOCK_TRANSPORT_VIRTIO), str(H.HDR_SIZE))
        name = H.Op(int(op)).name
        assert int(mon_op) == MON_OP[name]
        rows.append(
            (
                int(sc),
                int(dc),
                int(sp),
                int(dp),
                name,
                H.Type(int(kind)).name,
                int(flags, 16),
                bytes.fromhex(payload.replace(":", "")),
            )
        )
    assert steps(rows) == EXPECTED


def test_same_structure_as_the_committed_fixture() -> None:
    # Meaningful for a fresh capture (VSPROXY_KERNEL_CAPTURE); the committed file matches itself.
    assert FIXTURE.is_file(), f"{FIXTURE} is missing"
    assert steps(reader_rows(packets(CAPTURE))) == steps(reader_rows(packets(FIXTURE)))
