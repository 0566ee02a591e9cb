"""virtio-vsock packet header (virtio spec 5.10.6, Linux include/uapi/linux/virtio_vsock.h).

``struct virtio_vsock_hdr`` is 44 bytes, packed, little-endian:
src_cid u64, dst_cid u64, src_port u32, dst_port u32, len u32, type u16, op u16,
flags u32, buf_alloc u32, fwd_cnt u32.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple, NewType

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44
assert HDR_SIZE == 44

Cid = NewType("Cid", int)
Port = NewType("Port", int)

VMADDR_CID_HYPERVISOR = 0
VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
VMADDR_CID_ANY = 0xFFFFFFFF
RESERVED_CIDS = frozenset({VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_CID_HOST, VMADDR_CID_ANY})

# Linux VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload a packet may carry.
MAX_PKT_PAYLOAD = 64 * 1024
U32 = 0xFFFFFFFF


class Type(IntEnum):
    STREAM = 1
    SEQPACKET = 2


class Op(IntEnum):
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


# SHUTDOWN flags
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
# SEQPACKET RW flags
SEQ_EOM = 1
SEQ_EOR = 2


class Header(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HDR.pack(*self)

    def describe(self) -> str:
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op{self.op}"
        return (
            f"{self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} {op} len={self.len} "
            f"flags={self.flags:#x} buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}"
        )


def unpack(data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    return Header._make(HDR.unpack_from(data, offset))


pack = HDR.pack
pack_into = HDR.pack_into
