"""vhost-user message codec (QEMU docs/interop/vhost-user.rst), sans-I/O.

A message is a 12-byte header ``{u32 request; u32 flags; u32 size}`` followed by
``size`` bytes of payload; file descriptors travel beside it as SCM_RIGHTS.
This module only turns bytes into records and back; it never touches a socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
# vhost-user.rst: "the maximum payload size" is bounded by the largest message,
# the memory table of VHOST_MEMORY_BASELINE_NREGIONS (8) regions.
MAX_PAYLOAD = 4096
MAX_FDS = 8
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest_addr, size, user_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
# SET_VRING_KICK/CALL/ERR payload: bits 0-7 the vring index, bit 8 "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class Request(IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CONFIG = 9


# Virtio / vhost feature bits offered to the front-end.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1


class ProtocolError(Exception):
    """The front-end sent something vhost-user forbids; the session must end."""


class Message(NamedTuple):
    request: int
    flags: int
    payload: bytes

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class MemRegion:
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Return (request, flags, size); raise ProtocolError on a bad header."""
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"short header: {len(data)} bytes")
    request, flags, size = HEADER.unpack_from(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload size {size} exceeds {MAX_PAYLOAD}")
    return request, flags, size


def encode(request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, reply=True)


def _expect_size(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        name = _name(msg.request)
        raise ProtocolError(f"{name}: payload is {len(msg.payload)} bytes, expected {size}")


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def decode_u64(msg: Message) -> int:
    _expect_size(msg, U64.size)
    return int(U64.unpack(msg.payload)[0])


def decode_vring_state(msg: Message) -> tuple[int, int]:
    _expect_size(msg, VRING_STATE.size)
    index, num = VRING_STATE.unpack(msg.payload)
    return int(index), int(num)


def encode_vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_addr(msg: Message) -> VringAddr:
    _expect_size(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def decode_vring_fd_index(msg: Message) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR: (index, fd_present)."""
    value = decode_u64(msg)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{_name(msg.request)}: reserved bits set in {value:#x}")
    return value & VRING_IDX_MASK, not value & VRING_NOFD_MASK


def decode_mem_table(msg: Message) -> list[MemRegion]:
    if len(msg.payload) < MEMORY_HEADER.size:
        raise ProtocolError("SET_MEM_TABLE: payload shorter than its header")
    nregions, _padding = MEMORY_HEADER.unpack_from(msg.payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise ProtocolError(f"SET_MEM_TABLE: {nregions} regions (1..{MAX_MEM_REGIONS} allowed)")
    # QEMU sends the whole fixed-size array; accept exactly that or exactly nregions.
    full = MEMORY_HEADER.size + MAX_MEM_REGIONS * MEMORY_REGION.size
    exact = MEMORY_HEADER.size + nregions * MEMORY_REGION.size
    if len(msg.payload) not in (exact, full):
        raise ProtocolError(f"SET_MEM_TABLE: payload is {len(msg.payload)} bytes for {nregions} regions")
    regions = []
    for i in range(nregions):
        ga, size, ua, off = MEMORY_REGION.unpack_from(msg.payload, MEMORY_HEADER.size + i * MEMORY_REGION.size)
        if size == 0:
            raise ProtocolError(f"SET_MEM_TABLE: region {i} has size 0")
        if ga + size > 1 << 64 or ua + size > 1 << 64 or off + size > 1 << 64:
            raise ProtocolError(f"SET_MEM_TABLE: region {i} wraps the address space")
        regions.append(MemRegion(ga, size, ua, off))
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            if a.guest_addr < b.guest_addr + b.size and b.guest_addr < a.guest_addr + a.size:
                raise ProtocolError("SET_MEM_TABLE: guest address ranges overlap")
    return regions


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    out = bytearray(MEMORY_HEADER.pack(len(regions), 0))
    for r in regions:
        out += MEMORY_REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    return bytes(out)


def decode_config(msg: Message) -> tuple[int, int, int]:
    """GET_CONFIG/SET_CONFIG: (offset, size, flags); payload must be header plus size bytes."""
    if len(msg.payload) < CONFIG_HEADER.size:
        raise ProtocolError(f"{_name(msg.request)}: payload shorter than the config header")
    offset, size, flags = CONFIG_HEADER.unpack_from(msg.payload)
    if size > MAX_CONFIG_SIZE or len(msg.payload) != CONFIG_HEADER.size + size:
        raise ProtocolError(f"{_name(msg.request)}: config size {size} does not match payload {len(msg.payload)}")
    return int(offset), int(size), int(flags)


def encode_config(offset: int, data: bytes, flags: int = 0) -> bytes:
    return CONFIG_HEADER.pack(offset, len(data), flags) + data


class MessageReader:
    """Reassembles one message at a time from a stream socket.

    The caller asks ``wanted()`` bytes per read, so one read never spans two
    messages and the fds that arrive belong to the message being read (QEMU
    sends them with the header).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size: int | None = None
        self._request = 0
        self._flags = 0

    def wanted(self) -> int:
        if self._size is None:
            return HEADER_SIZE - len(self._buf)
        return HEADER_SIZE + self._size - len(self._buf)

    def pending_fds(self) -> list[int]:
        return self._fds

    def feed(self, data: bytes, fds: list[int]) -> tuple[Message, list[int]] | None:
        """Add bytes read; return a complete message and its fds, or None."""
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise ProtocolError(f"{len(self._fds)} fds with one message (at most {MAX_FDS})")
        self._buf += data
        if self._size is None and len(self._buf) >= HEADER_SIZE:
            self._request, self._flags, self._size = parse_header(self._buf)
        if self._size is None or len(self._buf) < HEADER_SIZE + self._size:
            return None
        payload = bytes(self._buf[HEADER_SIZE:])
        fds, self._fds = self._fds, []
        self._buf.clear()
        self._size = None
        return Message(self._request, self._flags, payload), fds
