"""scapy layers for LINKTYPE_VSOCK: captures written by vsproxy.capture.format (pcapng and
classic pcap) read back with scapy's rdpcap, and packets built with scapy byte-identical to
vsockmon_frame."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from scapy.packet import Padding, Raw
from scapy.utils import PcapWriter, rdpcap

from dissectors.layers import DLT_VSOCK, VirtioVsock, VsockMon
from vsproxy.capture import format as fmt
from vsproxy.capture.reader import dissect, records
from vsproxy.vsock import header as H

GUEST, HOST = 5, 2


def _hdr(op: int, payload: bytes = b"", *, kind: int = H.Type.STREAM, flags: int = 0,
         src: tuple[int, int] = (GUEST, 1024), dst: tuple[int, int] = (HOST, 9000)) -> bytes:
    return H.Header(src[0], dst[0], src[1], dst[1], len(payload), kind, op, flags, 262144, 77).pack()


FRAMES = [
    fmt.vsockmon_frame(_hdr(H.Op.REQUEST), b""),
    fmt.vsockmon_frame(_hdr(H.Op.RESPONSE, src=(HOST, 9000), dst=(GUEST, 1024)), b""),
    fmt.vsockmon_frame(_hdr(H.Op.RW, b"hello vsock"), b"hello vsock"),
    fmt.vsockmon_frame(_hdr(H.Op.RW, b"msg", kind=H.Type.SEQPACKET, flags=H.SEQ_EOM | H.SEQ_EOR), b"msg"),
    fmt.vsockmon_frame(_hdr(H.Op.CREDIT_UPDATE), b""),
    fmt.vsockmon_frame(_hdr(H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH), b""),
    fmt.vsockmon_frame(_hdr(H.Op.RST, src=(HOST, 9000), dst=(GUEST, 1024)), b""),
]


def _pcapng(path: Path) -> Path:
    data = fmt.pcapng_shb() + fmt.pcapng_idb("vm5")
    data += b"".join(fmt.pcapng_epb(0, 1700000000 + i, f, inbound=i % 2 == 0, comment="rewritten 3->2" if i == 2
                                    else None) for i, f in enumerate(FRAMES))
    path.write_bytes(data)
    return path


def _pcap(path: Path) -> Path:
    path.write_bytes(fmt.pcap_header() + b"".join(fmt.pcap_record(1700000000 + i, f) for i, f in enumerate(FRAMES)))
    return path


@pytest.mark.parametrize("write", [_pcapng, _pcap])
def test_rdpcap_decodes_vsproxy_captures(tmp_path: Path, write: Callable[[Path], Path]) -> None:
    pkts = rdpcap(str(write(tmp_path / "cap")))
    assert len(pkts) == len(FRAMES)
    assert all(isinstance(p, VsockMon) and p.transport == 2 and p.len == 44 for p in pkts)
    ops = [(p[VsockMon].op, p[VirtioVsock].op) for p in pkts]
    assert ops == [(1, 1), (1, 2), (4, 5), (4, 5), (3, 6), (2, 4), (2, 3)]
    rw = pkts[2]
    assert (rw.src_cid, rw.dst_cid, rw.src_port, rw.dst_port) == (GUEST, HOST, 1024, 9000)
    v = rw[VirtioVsock]
    assert (v.src_cid, v.dst_cid, v.src_port, v.dst_port, v.len, v.type, v.buf_alloc, v.fwd_cnt) == (
        GUEST, HOST, 1024, 9000, 11, 1, 262144, 77)
    assert v[Raw].load == b"hello vsock"
    seq = pkts[3][VirtioVsock]
    assert seq.type == 2 and seq.flags.EOM and seq.flags.EOR and seq[Raw].load == b"msg"
    assert pkts[5][VirtioVsock].flags == 3
    assert Raw not in pkts[0] and Raw not in pkts[5]


def test_field_names_and_summaries_read_as_the_headers_name_them() -> None:
    rw = VsockMon(FRAMES[3])
    assert rw.sprintf("%VsockMon.op% %VsockMon.transport%") == "PAYLOAD VIRTIO"
    assert rw[VirtioVsock].sprintf("%type% %op% %flags%") == "SEQPACKET RW EOM+EOR"
    assert "5:1024 > 2:9000 SEQPACKET RW len=3" in rw.summary()
    shutdown = VsockMon(FRAMES[5])[VirtioVsock]
    assert shutdown.sprintf("%op% %flags%") == "SHUTDOWN RCV+SEND"
    assert "vsockmon 5:1024 > 2:9000 CONNECT" == VsockMon(FRAMES[0]).mysummary()


def test_payload_length_comes_from_the_len_field() -> None:
    padded = VsockMon(FRAMES[2] + b"\x00\x00\x00")
    assert padded[Raw].load == b"hello vsock"
    assert padded[Padding].load == b"\x00\x00\x00"
    # only RW carries a payload: bytes after a control packet are padding
    ctl = VsockMon(FRAMES[4] + b"zz")
    assert Raw not in ctl and ctl[Padding].load == b"zz"


@pytest.mark.parametrize("index", range(len(FRAMES)))
def test_scapy_built_packets_equal_vsockmon_frame(index: int) -> None:
    h = H.unpack(FRAMES[index], fmt.VSOCKMON.size)
    payload = FRAMES[index][fmt.VSOCKMON.size + H.HDR_SIZE :]
    pkt = VsockMon(src_cid=h.src_cid, dst_cid=h.dst_cid, src_port=h.src_port, dst_port=h.dst_port) / VirtioVsock(
        src_cid=h.src_cid, dst_cid=h.dst_cid, src_port=h.src_port, dst_port=h.dst_port, type=h.type, op=h.op,
        flags=h.flags, buf_alloc=h.buf_alloc, fwd_cnt=h.fwd_cnt)
    if payload:
        pkt = pkt / Raw(payload)
    assert bytes(pkt) == FRAMES[index]


def test_pcapwriter_writes_link_type_271_that_vsproxys_reader_reads(tmp_path: Path) -> None:
    path = tmp_path / "scapy.pcap"
    pkts = [VsockMon(f) for f in FRAMES]
    with PcapWriter(str(path)) as w:
        for p in pkts:
            w.write(p)
    with open(path, "rb") as f:
        assert int.from_bytes(f.read(24)[20:24], "little") == DLT_VSOCK
    with open(path, "rb") as f:
        back = [dissect(r) for r in records(f)]
    assert [p.record.frame for p in back] == FRAMES
    assert back[2].payload == b"hello vsock"


def test_a_kernel_style_frame_with_an_unknown_transport_keeps_its_bytes() -> None:
    frame = fmt.VSOCKMON.pack(3, 2, 1, 2, fmt.AF_VSOCK_OP_PAYLOAD, 1, 0) + b"payload"
    pkt = VsockMon(frame)
    assert pkt.transport == 1 and VirtioVsock not in pkt and pkt[Raw].load == b"payload"
    assert bytes(pkt) == frame


def test_importing_the_layers_is_all_rdpcap_needs(tmp_path: Path) -> None:
    path = _pcapng(tmp_path / "cap.pcapng")
    code = ("import dissectors.layers; from scapy.utils import rdpcap; "
            f"p = rdpcap({str(path)!r})[2]; print(type(p).__name__, p['VirtioVsock'].op)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["VsockMon", "5"]


def test_vsproxy_reader_and_scapy_agree_on_every_field(tmp_path: Path) -> None:
    path = _pcapng(tmp_path / "cap.pcapng")
    ours = [dissect(r) for r in records(io.BytesIO(path.read_bytes()))]
    theirs = rdpcap(str(path))
    for mine, pkt in zip(ours, theirs, strict=True):
        assert mine.hdr is not None
        v = pkt[VirtioVsock]
        assert tuple(mine.hdr) == (v.src_cid, v.dst_cid, v.src_port, v.dst_port, v.len, v.type, v.op, int(v.flags),
                                   v.buf_alloc, v.fwd_cnt)
        assert mine.payload == (bytes(v[Raw].load) if Raw in v else b"")
        assert mine.mon_op == pkt[VsockMon].op


CAPTURES = sorted((Path(__file__).resolve().parent.parent / "captures").glob("*.pcap*"))


def test_the_fixture_captures_are_there() -> None:
    names = {p.name for p in CAPTURES}
    assert "kernel-vsockmon-loopback.pcap" in names and "nitro-heartbeat.pcapng" in names


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_scapy_and_vsproxys_reader_agree_on_every_fixture_including_the_kernels(path: Path) -> None:
    ours = [dissect(r) for r in records(io.BytesIO(path.read_bytes()))]
    theirs = rdpcap(str(path))
    assert len(ours) == len(theirs) > 0
    for mine, pkt in zip(ours, theirs, strict=True):
        assert VsockMon in pkt and mine.hdr is not None
        v = pkt[VirtioVsock]
        assert tuple(mine.hdr) == (v.src_cid, v.dst_cid, v.src_port, v.dst_port, v.len, v.type, v.op, int(v.flags),
                                   v.buf_alloc, v.fwd_cnt)
        assert mine.payload == (bytes(v[Raw].load) if Raw in v else b"")
        assert (pkt[VsockMon].src_cid, pkt[VsockMon].dst_cid, pkt[VsockMon].op) == (
            mine.hdr.src_cid, mine.hdr.dst_cid, mine.mon_op)
