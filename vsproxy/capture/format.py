"""Capture file formats, sans-I/O: vsockmon frames in classic pcap and in pcapng.

A frame is laid out exactly as the kernel's vsockmon writes it (include/uapi/linux/vsockmon.h,
net/vmw_vsock/virtio_transport_common.c virtio_transport_build_skb): the 32-byte
``af_vsockmon_hdr``, the 44-byte virtio header, and the payload for RW packets only. The link
type is LINKTYPE_VSOCK (271), so Wireshark, tshark, tcpdump and scapy read the files unchanged.
pcapng adds one interface per device, the direction in ``epb_flags`` and a comment per packet
(rewrites, denials, spoofing), which classic pcap cannot carry.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from enum import IntEnum
from types import MappingProxyType
from typing import Final

from vsproxy.vsock import header as H

LINKTYPE_VSOCK = 271
SNAPLEN = 0x40000

VSOCKMON = struct.Struct("<QQIIHHH2x")  # src_cid dst_cid src_port dst_port op transport len


class MonOp(IntEnum):
    """enum af_vsockmon_op (include/uapi/linux/vsockmon.h): the op of an af_vsockmon_hdr."""

    UNKNOWN = 0
    CONNECT = 1
    DISCONNECT = 2
    CONTROL = 3
    PAYLOAD = 4


class MonTransport(IntEnum):
    """enum af_vsockmon_transport: the transport header that follows an af_vsockmon_hdr."""

    UNKNOWN = 0
    NO_INFO = 1
    VIRTIO = 2  # struct virtio_vsock_hdr


AF_VSOCK_OP_UNKNOWN = int(MonOp.UNKNOWN)
AF_VSOCK_OP_CONNECT = int(MonOp.CONNECT)
AF_VSOCK_OP_DISCONNECT = int(MonOp.DISCONNECT)
AF_VSOCK_OP_CONTROL = int(MonOp.CONTROL)
AF_VSOCK_OP_PAYLOAD = int(MonOp.PAYLOAD)
AF_VSOCK_TRANSPORT_VIRTIO = int(MonTransport.VIRTIO)

# The vsockmon op of each virtio op, as the kernel maps them (virtio_transport_build_skb in
# net/vmw_vsock/virtio_transport_common.c); any other op is UNKNOWN (mon_op). The one table,
# MON_OP_OF_VIRTIO: the scapy layers (dissectors/layers.py) use it, and the C that writes capture
# records mirrors it (vsproxy/_c/vsockmon.h; tests/test_c_headers.py checks that they agree).
_MON_OP: Final[dict[int, int]] = {
    H.Op.REQUEST: AF_VSOCK_OP_CONNECT,
    H.Op.RESPONSE: AF_VSOCK_OP_CONNECT,
    H.Op.RST: AF_VSOCK_OP_DISCONNECT,
    H.Op.SHUTDOWN: AF_VSOCK_OP_DISCONNECT,
    H.Op.RW: AF_VSOCK_OP_PAYLOAD,
    H.Op.CREDIT_UPDATE: AF_VSOCK_OP_CONTROL,
    H.Op.CREDIT_REQUEST: AF_VSOCK_OP_CONTROL,
}
MON_OP_OF_VIRTIO: Final[Mapping[int, int]] = MappingProxyType(_MON_OP)


def mon_op(virtio_op: int) -> int:
    """The af_vsockmon_hdr op the kernel writes for a packet with this virtio op."""
    return _MON_OP.get(virtio_op, AF_VSOCK_OP_UNKNOWN)


def vsockmon_parts(hdr: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """(af_vsockmon_hdr + the virtio header, the payload for RW only): a frame in two parts,
    so a large payload is written as it is rather than copied into one buffer."""
    src_cid, dst_cid, src_port, dst_port, _len, _type, op, _flags, _ba, _fc = H.HDR.unpack_from(hdr)
    mon = VSOCKMON.pack(src_cid, dst_cid, src_port, dst_port, _MON_OP.get(op, AF_VSOCK_OP_UNKNOWN),
                        AF_VSOCK_TRANSPORT_VIRTIO, H.HDR_SIZE)
    return mon + bytes(hdr[: H.HDR_SIZE]), (payload if op == H.Op.RW else b"")


def vsockmon_frame(hdr: bytes, payload: bytes) -> bytes:
    """af_vsockmon_hdr + the virtio header + (RW only) the payload."""
    head, body = vsockmon_parts(hdr, payload)
    return head + body


# -- classic pcap ----------------------------------------------------------------------
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")


def pcap_header() -> bytes:
    return PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_VSOCK)


def pcap_record(ts: float, frame: bytes) -> bytes:
    return b"".join(pcap_record_parts(ts, frame, b""))


def pcap_record_parts(ts: float, head: bytes, body: bytes, orig: int = 0) -> tuple[bytes, ...]:
    """A record of the frame ``head + body``; ``orig``: the frame's length before a snaplen cut
    its body (0: it was not cut)."""
    sec = int(ts)
    usec = int((ts - sec) * 1_000_000)
    n = len(head) + len(body)
    return PCAP_RECORD.pack(sec, usec, n, max(n, orig)) + head, body


# -- pcapng ------------------------------------------------------------------------------
BT_SHB, BT_IDB, BT_EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
OPT_ENDOFOPT, OPT_COMMENT = 0, 1
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9
SHB_USERAPPL = 4
EPB_FLAGS = 2
EPB_INBOUND, EPB_OUTBOUND = 1, 2


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _options(opts: list[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    out = b"".join(struct.pack("<HH", code, len(value)) + _pad(value) for code, value in opts)
    return out + struct.pack("<HH", OPT_ENDOFOPT, 0)


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def pcapng_shb(app: str = "vsproxy") -> bytes:
    body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _options([(SHB_USERAPPL, app.encode())])
    return _block(BT_SHB, body)


def pcapng_idb(name: str, description: str = "") -> bytes:
    opts = [(IF_NAME, name.encode()), (IF_TSRESOL, bytes([6]))]
    if description:
        opts.append((IF_DESCRIPTION, description.encode()))
    body = struct.pack("<HHI", LINKTYPE_VSOCK, 0, SNAPLEN) + _options(opts)
    return _block(BT_IDB, body)


def pcapng_epb(interface: int, ts: float, frame: bytes, *, inbound: bool, comment: str | None = None) -> bytes:
    """An Enhanced Packet Block. Each interface is a device seen from the host, as a tap
    device is: what the guest sends is inbound, what it receives outbound."""
    return b"".join(pcapng_epb_parts(interface, ts, frame, b"", inbound=inbound, comment=comment))


def pcapng_epb_parts(
    interface: int, ts: float, head: bytes, body: bytes, *, inbound: bool, comment: str | None = None,
    orig: int = 0,
) -> tuple[bytes, ...]:
    """pcapng_epb for a frame given in two parts, returned in parts to write one after another;
    ``orig``: the frame's length before a snaplen cut its body (0: it was not cut)."""
    usec = int(ts * 1_000_000)
    n = len(head) + len(body)
    opts = [(EPB_FLAGS, struct.pack("<I", EPB_INBOUND if inbound else EPB_OUTBOUND))]
    if comment:
        opts.append((OPT_COMMENT, comment.encode()))
    tail = b"\0" * (-n % 4) + _options(opts)
    total = 12 + 20 + n + len(tail)
    start = struct.pack("<IIIIIII", BT_EPB, total, interface, usec >> 32, usec & 0xFFFFFFFF, n, max(n, orig))
    return start + head, body, tail + struct.pack("<I", total)
