"""scapy layers for Linux vsock captures: LINKTYPE_VSOCK (271).

- ``VsockMon``: ``struct af_vsockmon_hdr``, Linux include/uapi/linux/vsockmon.h: 32 bytes,
  little-endian, the link-layer header the vsockmon device (and vsproxy's ``--pcap``) writes.
- ``VirtioVsock``: ``struct virtio_vsock_hdr``, Linux include/uapi/linux/virtio_vsock.h and
  the virtio spec 5.10.6: 44 bytes, little-endian, followed by ``len`` bytes of payload for RW
  packets (net/vmw_vsock/virtio_transport_common.c, virtio_transport_build_skb, appends the
  payload for RW only).

Importing this module registers link type 271, so ``scapy.utils.rdpcap`` decodes vsproxy's
and the kernel's captures, and ``PcapWriter`` writes ``VsockMon`` packets with link type 271.
"""

from __future__ import annotations

from typing import Any

from scapy.config import conf
from scapy.fields import (
    FlagsField,
    LEIntField,
    LELongField,
    LEShortEnumField,
    LEShortField,
)
from scapy.packet import Packet, bind_layers

from vsproxy.capture import format as fmt
from vsproxy.vsock import header as H

DLT_VSOCK = fmt.LINKTYPE_VSOCK
VIRTIO_VSOCK_HDR_LEN = H.HDR_SIZE

# vsockmon.h: enum af_vsockmon_op, enum af_vsockmon_transport
MON_OPS = {int(op): op.name for op in fmt.MonOp}
MON_TRANSPORTS = {int(t): t.name for t in fmt.MonTransport}

# virtio_vsock.h: enum virtio_vsock_type, enum virtio_vsock_op
VIRTIO_TYPES = {int(t): t.name for t in H.Type}
VIRTIO_OPS = {int(op): op.name for op in H.Op}
OP_SHUTDOWN, OP_RW = int(H.Op.SHUTDOWN), int(H.Op.RW)

# The flags word means different things per op: VIRTIO_VSOCK_SEQ_EOM/EOR on SEQPACKET RW,
# VIRTIO_VSOCK_SHUTDOWN_RCV/SEND on SHUTDOWN. The field is named after the RW bits; its
# printed form follows the op.
_RW_FLAGS = ["EOM", "EOR"]
_SHUTDOWN_FLAGS = ["RCV", "SEND"]


class _VsockFlagsField(FlagsField):
    """``flags``: bit names chosen by the packet's op when printed."""

    def i2repr(self, pkt: Packet | None, x: Any) -> str:
        if pkt is not None and getattr(pkt, "op", None) == OP_SHUTDOWN:
            value = int(x or 0)
            names = [n for i, n in enumerate(_SHUTDOWN_FLAGS) if value >> i & 1]
            rest = value & ~0b11
            if rest:
                names.append(hex(rest))
            return "+".join(names) if names else "0"
        return str(super().i2repr(pkt, x))


class VsockMon(Packet):
    """af_vsockmon_hdr. ``op`` and ``len`` are filled in on build when left unset."""

    name = "vsockmon"
    fields_desc = [
        LELongField("src_cid", 0),
        LELongField("dst_cid", 0),
        LEIntField("src_port", 0),
        LEIntField("dst_port", 0),
        LEShortEnumField("op", None, MON_OPS),
        LEShortEnumField("transport", 0, MON_TRANSPORTS),
        LEShortField("len", None),
        LEShortField("reserved", 0),
    ]

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        virtio = self.payload if isinstance(self.payload, VirtioVsock) else None
        if self.op is None:
            op = fmt.mon_op(int(virtio.op)) if virtio is not None else fmt.AF_VSOCK_OP_UNKNOWN
            p = p[:24] + op.to_bytes(2, "little") + p[26:]
        if self.len is None:
            tlen = VIRTIO_VSOCK_HDR_LEN if virtio is not None else 0
            p = p[:28] + tlen.to_bytes(2, "little") + p[30:]
        return p + pay

    def mysummary(self) -> str:
        return str(self.sprintf("vsockmon %src_cid%:%src_port% > %dst_cid%:%dst_port% %op%"))


class VirtioVsock(Packet):
    """virtio_vsock_hdr. ``len`` is filled in on build (the payload's length) when left unset."""

    name = "virtio-vsock"
    fields_desc = [
        LELongField("src_cid", 0),
        LELongField("dst_cid", 0),
        LEIntField("src_port", 0),
        LEIntField("dst_port", 0),
        LEIntField("len", None),
        LEShortEnumField("type", 1, VIRTIO_TYPES),
        LEShortEnumField("op", 0, VIRTIO_OPS),
        _VsockFlagsField("flags", 0, -32, _RW_FLAGS),
        LEIntField("buf_alloc", 0),
        LEIntField("fwd_cnt", 0),
    ]

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        if self.len is None:
            p = p[:24] + len(pay).to_bytes(4, "little") + p[28:]
        return p + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        # Only RW packets carry a payload in a capture, and it is `len` bytes long; anything
        # after that is padding.
        n = int(self.len or 0) if self.op == OP_RW else 0
        return s[:n], s[n:]

    def mysummary(self) -> str:
        return str(self.sprintf("virtio-vsock %src_cid%:%src_port% > %dst_cid%:%dst_port% %type% %op% "
                                "len=%len% flags=%flags%"))


bind_layers(VsockMon, VirtioVsock, transport=2)
conf.l2types.register(DLT_VSOCK, VsockMon)
