"""`vsproxy read`: captures written by vsproxy (pcap and pcapng) and by hand-built vsockmon
files read back; damaged files end in a one-line error."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, dissect, records, summary_line
from vsproxy.vsock import header as H

REQ = H.pack(5, 2, 1024, 9000, 0, 1, H.Op.REQUEST, 0, 262144, 0)
RW = H.pack(5, 2, 1024, 9000, 1, 1, H.Op.RW, 0, 262144, 0)
RST = H.pack(2, 5, 9000, 1024, 0, 1, H.Op.RST, 0, 0, 0)


def pcapng_file() -> bytes:
    out = fmt.pcapng_shb() + fmt.pcapng_idb("enclave1")
    out += fmt.pcapng_epb(0, 1.5, fmt.vsockmon_frame(REQ, b""), inbound=True)
    out += fmt.pcapng_epb(0, 1.6, fmt.vsockmon_frame(RW, b"\xb7"), inbound=True)
    out += fmt.pcapng_epb(0, 1.7, fmt.vsockmon_frame(RST, b""), inbound=False, comment="denied by test")
    return out


def pcap_file() -> bytes:
    return fmt.pcap_header() + b"".join(fmt.pcap_record(t, fmt.vsockmon_frame(h, p))
                                        for t, h, p in ((1.5, REQ, b""), (1.6, RW, b"\xb7")))


def test_pcapng_records_keep_interface_direction_comment_and_time() -> None:
    recs = list(records(io.BytesIO(pcapng_file())))
    assert [(r.interface, r.inbound, r.comment) for r in recs] == [
        ("enclave1", True, None), ("enclave1", True, None), ("enclave1", False, "denied by test")]
    assert recs[1].ts == pytest.approx(1.6)
    p = dissect(recs[1])
    assert p.hdr is not None and p.hdr.op == H.Op.RW and p.payload == b"\xb7"
    assert summary_line(p) == ("00:00:01.600000 enclave1 5:1024 > 2:9000 RW len=1 buf_alloc=262144 fwd_cnt=0")
    assert summary_line(dissect(recs[2])).endswith("  [denied by test]")


def test_classic_pcap_in_both_byte_orders() -> None:
    little = pcap_file()
    assert [dissect(r).hdr.op for r in records(io.BytesIO(little))] == [H.Op.REQUEST, H.Op.RW]  # type: ignore[union-attr]
    # big-endian file header and record headers, as a big-endian capturer writes them
    big = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 271)
    frame = fmt.vsockmon_frame(RW, b"\xb7")
    big += struct.pack(">IIII", 7, 0, len(frame), len(frame)) + frame
    (rec,) = list(records(io.BytesIO(big)))
    assert rec.ts == 7 and dissect(rec).payload == b"\xb7"


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage!", pcap_file()[:30], pcapng_file()[:-3], fmt.pcap_header()[:-4] + struct.pack("<I", 1)],
    ids=["empty", "garbage", "cut-record", "cut-block", "ethernet"],
)
def test_damaged_files_raise_capture_error(data: bytes) -> None:
    with pytest.raises(CaptureError):
        for r in records(io.BytesIO(data)):
            dissect(r)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_random_corruption_never_escapes_as_anything_but_capture_error(noise: bytes, at: int) -> None:
    data = bytearray(pcapng_file())
    data[at : at + len(noise)] = noise
    try:
        for r in records(io.BytesIO(bytes(data))):
            summary_line(dissect(r))
    except CaptureError:
        pass


def test_vsproxy_read_prints_one_line_per_packet_and_json(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "c.pcapng")
    with open(path, "wb") as f:
        f.write(pcapng_file())
    p = subprocess.run([sys.executable, "-m", "vsproxy", "read", path], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 3
    assert "5:1024 > 2:9000 REQUEST" in p.stdout
    j = subprocess.run([sys.executable, "-m", "vsproxy", "read", "--json", path], capture_output=True, text=True,
                       timeout=30)
    objs = [json.loads(line) for line in j.stdout.splitlines()]
    assert [o["op"] for o in objs] == ["REQUEST", "RW", "RST"] and objs[2]["comment"] == "denied by test"
    with open(path, "r+b") as f:
        f.truncate(len(pcapng_file()) - 5)
    bad = subprocess.run([sys.executable, "-m", "vsproxy", "read", path], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stdout.splitlines()) == 2  # what could be read was printed
