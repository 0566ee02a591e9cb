"""Reading captures back: classic pcap (either byte order, micro- or nanosecond) and pcapng,
LINKTYPE_VSOCK frames as vsproxy or the kernel's vsockmon writes them. Sans-I/O over bytes
from a stream; a damaged file ends in a ``CaptureError`` naming the offset, never a traceback.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from vsproxy.capture import format as fmt
from vsproxy.vsock import header as H

MAX_BLOCK = 16 << 20


class CaptureError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Record:
    ts: float
    interface: str
    inbound: bool | None  # from the guest (pcapng flags); None when the file does not say
    frame: bytes
    comment: str | None


@dataclass(frozen=True, slots=True)
class Packet:
    """A vsockmon frame taken apart."""

    record: Record
    mon_op: int
    hdr: H.Header | None  # the virtio header, when the transport is virtio
    payload: bytes

    @property
    def snapped(self) -> int:
        """Payload bytes the capture did not keep (a snaplen cut the record: ``vsproxy ctl PATH
        pcap --snaplen``, tcpdump -s, editcap -s): the header's ``len`` less what is here."""
        h = self.hdr
        if h is None or h.op != H.Op.RW or h.len <= len(self.payload):
            return 0
        return h.len - len(self.payload)


def _read_exact(f: BinaryIO, n: int, where: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise CaptureError(f"truncated at byte {where}: wanted {n} bytes, got {len(data)}")
    return data


def records(f: BinaryIO) -> Iterator[Record]:
    magic = f.read(4)
    if len(magic) < 4:
        raise CaptureError("empty or truncated file: no capture header")
    if magic == struct.pack("<I", fmt.BT_SHB):
        yield from _pcapng(f, magic)
        return
    for endian in ("<", ">"):
        (m,) = struct.unpack(endian + "I", magic)
        if m in (0xA1B2C3D4, 0xA1B23C4D):
            yield from _pcap(f, endian, nano=m == 0xA1B23C4D)
            return
    raise CaptureError(f"not a pcap or pcapng file (magic {magic.hex()})")


def _pcap(f: BinaryIO, e: str, nano: bool) -> Iterator[Record]:
    rest = _read_exact(f, 20, 4)
    _vmaj, _vmin, _tz, _sig, _snap, linktype = struct.unpack(e + "HHiIII", rest)
    if linktype & 0xFFFF != fmt.LINKTYPE_VSOCK:
        raise CaptureError(f"link type {linktype} is not LINKTYPE_VSOCK ({fmt.LINKTYPE_VSOCK})")
    off = 24
    while True:
        head = f.read(16)
        if not head:
            return
        if len(head) < 16:
            raise CaptureError(f"truncated record header at byte {off}")
        sec, frac, incl, _orig = struct.unpack(e + "IIII", head)
        if incl > MAX_BLOCK:
            raise CaptureError(f"record at byte {off} claims {incl} bytes")
        frame = _read_exact(f, incl, off + 16)
        yield Record(sec + frac / (1e9 if nano else 1e6), "", None, frame, None)
        off += 16 + incl


def _pcapng(f: BinaryIO, magic: bytes) -> Iterator[Record]:
    interfaces: list[tuple[str, int, float]] = []  # name, linktype, ticks per second
    off = 0
    first = True
    while True:
        head = magic if first else f.read(4)
        first = False
        if not head:
            return
        if len(head) < 4:
            raise CaptureError(f"truncated block at byte {off}")
        length_raw = _read_exact(f, 4, off + 4)
        (btype,) = struct.unpack("<I", head)
        (length,) = struct.unpack("<I", length_raw)
        if btype == fmt.BT_SHB:
            bom = _read_exact(f, 4, off + 8)
            if bom != struct.pack("<I", 0x1A2B3C4D):
                raise CaptureError("big-endian pcapng is not supported")
            if length < 28 or length % 4 or length > MAX_BLOCK:
                raise CaptureError(f"section header at byte {off} has a bad length {length}")
            _read_exact(f, length - 16, off + 12)
            interfaces = []
        else:
            if length < 12 or length % 4 or length > MAX_BLOCK:
                raise CaptureError(f"block at byte {off} has a bad length {length}")
            body = _read_exact(f, length - 12, off + 8)
        trailer = _read_exact(f, 4, off + length - 4)
        if struct.unpack("<I", trailer)[0] != length:
            raise CaptureError(f"block at byte {off}: trailing length does not match")
        if btype == fmt.BT_IDB:
            interfaces.append(interface_block(body, off, len(interfaces)))
        elif btype == fmt.BT_EPB:
            if len(body) < 20:
                raise CaptureError(f"packet block at byte {off} is too short")
            iface, hi, lo, caplen, _orig = struct.unpack_from("<IIIII", body)
            if iface >= len(interfaces):
                raise CaptureError(f"packet block at byte {off} names interface {iface}, not described")
            name, linktype, ticks = interfaces[iface]
            if caplen > len(body) - 20:
                raise CaptureError(f"packet block at byte {off}: captured length {caplen} beyond the block")
            frame = body[20 : 20 + caplen]
            opts = _parse_options(body[20 + caplen + (-caplen % 4) :], off)
            flags = opts.get(fmt.EPB_FLAGS)
            inbound = None if flags is None or len(flags) < 4 else (struct.unpack("<I", flags[:4])[0] & 3) == 1
            comment = opts.get(fmt.OPT_COMMENT)
            if linktype == fmt.LINKTYPE_VSOCK:
                yield Record(((hi << 32) | lo) / ticks, name, inbound, frame,
                             comment.decode(errors="replace") if comment else None)
        off += length


def interface_block(body: bytes, off: int, index: int) -> tuple[str, int, float]:
    """(name, link type, timestamp ticks a second) of the pcapng Interface Description Block whose
    body (after type and length) is ``body``, at byte ``off``, the ``index``th of its section."""
    if len(body) < 8:
        raise CaptureError(f"interface block at byte {off} is too short")
    linktype, _res, _snap = struct.unpack_from("<HHI", body)
    opts = _parse_options(body[8:], off)
    name = opts.get(fmt.IF_NAME, b"").decode(errors="replace") or f"if{index}"
    tsresol = opts.get(fmt.IF_TSRESOL, bytes([6]))
    if len(tsresol) != 1:
        raise CaptureError(f"interface block at byte {off}: if_tsresol is {len(tsresol)} bytes, not 1")
    res = tsresol[0]
    ticks = 2 ** (res & 0x7F) if res & 0x80 else 10 ** res
    return name, linktype, float(ticks)


def _parse_options(data: bytes, off: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i + 4 <= len(data):
        code, length = struct.unpack_from("<HH", data, i)
        if code == fmt.OPT_ENDOFOPT:
            break
        value = data[i + 4 : i + 4 + length]
        if len(value) != length:
            raise CaptureError(f"block at byte {off}: option {code} runs past the block")
        out.setdefault(code, value)
        i += 4 + length + (-length % 4)
    return out


def dissect(record: Record) -> Packet:
    frame = record.frame
    if len(frame) < fmt.VSOCKMON.size:
        raise CaptureError(f"frame of {len(frame)} bytes is shorter than af_vsockmon_hdr")
    _sc, _dc, _sp, _dp, mon_op, transport, tlen = fmt.VSOCKMON.unpack_from(frame)
    hdr = None
    start = fmt.VSOCKMON.size
    if transport == fmt.AF_VSOCK_TRANSPORT_VIRTIO and tlen >= H.HDR_SIZE and len(frame) >= start + tlen:
        hdr = H.unpack(frame, start)
    return Packet(record, mon_op, hdr, frame[start + tlen :])


# Per-packet text, looked up rather than built: summary_line runs once per printed packet.
_OP_TEXT = {int(op): op.name for op in H.Op}
_TYPE_TEXT = {int(H.Type.STREAM): "", int(H.Type.SEQPACKET): " SEQPACKET"}


def summary_line(p: Packet, tail: str = "") -> str:
    """One line per packet, as ``vsproxy read`` prints it. ``tail`` (the reader's
    ``"  #1 HTTP GET /v1/keys"``) goes before the capture comment, which stays last."""
    r = p.record
    t = time_text(r.ts)
    name = r.interface
    dev = (f"{name} " if name.isprintable() else f"{printable(name)} ") if name else ""
    h = p.hdr
    if h is None:
        line = f"{t} {dev}vsockmon op {p.mon_op}, {len(p.payload)} bytes{tail}"
    else:
        op = _OP_TEXT.get(h.op) or f"op{h.op}"
        kind = _TYPE_TEXT.get(h.type)
        if kind is None:
            kind = f" type{h.type}"
        flags = f" flags={h.flags:#x}" if h.flags else ""
        line = (f"{t} {dev}{h.src_cid}:{h.src_port} > {h.dst_cid}:{h.dst_port} {op}{kind}{flags} "
                f"len={h.len} buf_alloc={h.buf_alloc} fwd_cnt={h.fwd_cnt}{tail}")
    if r.comment:
        line += f"  [{printable(r.comment)}]"
    return line


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\n``, ``\\x1b``):
    names and comments come from the file, and a line must stay one line and never drive
    the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def time_text(ts: float) -> str:
    """Time of day (UTC), as tcpdump prints it."""
    # whole microseconds first, so 59.9999996 s rounds to the next minute, never to ":60.000000"
    sec, us = divmod(round(ts * 1_000_000) % 86_400_000_000, 1_000_000)
    return f"{_clock(sec)}.{us:06d}"


@functools.lru_cache(maxsize=256)
def _clock(sec: int) -> str:
    """HH:MM:SS of a second of the day; packets come many to a second."""
    return f"{sec // 3600:02d}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def as_json(p: Packet) -> dict[str, object]:
    r = p.record
    out: dict[str, object] = {"time": r.ts, "device": r.interface or None, "from_guest": r.inbound,
                              "comment": r.comment, "vsockmon_op": p.mon_op, "payload_len": len(p.payload),
                              "snapped": p.snapped}
    if p.hdr is not None:
        out.update(p.hdr._asdict())
        out["op"] = H.Op(p.hdr.op).name if p.hdr.op in H.Op._value2member_map_ else p.hdr.op
    return out
