"""Back-end side of one vhost-user front-end session, sans-I/O.

``handle(message, fds)`` checks one message against vhost-user.rst and returns
the actions the I/O shell must carry out (map memory, swap an eventfd, start or
stop a ring, send a reply). It owns no sockets and maps nothing itself. Any
violation raises ProtocolError, which ends the session; the fds that came with a
message are either handed out in an action or listed in ``CloseFds``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import (
    U64,
    MemRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
)

NUM_QUEUES = 2  # rx = 0, tx = 1; QEMU keeps the event queue itself
RX_QUEUE = 0
TX_QUEUE = 1
VIRTIO_VSOCK_CONFIG_SIZE = 8  # le64 guest_cid

BACKEND_PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)


def default_features(*, seqpacket: bool = True) -> int:
    f = (
        (1 << codec.VIRTIO_F_VERSION_1)
        | (1 << codec.VHOST_USER_F_PROTOCOL_FEATURES)
        | (1 << codec.VIRTIO_RING_F_EVENT_IDX)
        | (1 << codec.VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << codec.VIRTIO_VSOCK_F_STREAM)
    )
    if seqpacket:
        f |= 1 << codec.VIRTIO_VSOCK_F_SEQPACKET
    return f


# -- actions ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes  # a whole encoded message


@dataclass(frozen=True, slots=True)
class SetMemTable:
    regions: list[MemRegion]
    fds: list[int]


@dataclass(frozen=True, slots=True)
class SetVringFd:
    kind: str  # "kick", "call" or "err"
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class StartRing:
    index: int


@dataclass(frozen=True, slots=True)
class StopRing:
    """Stop the ring; with ``reply`` answer GET_VRING_BASE with its last_avail_idx."""

    index: int
    reply: bool = False


@dataclass(frozen=True, slots=True)
class CloseFds:
    fds: list[int]


Action = Reply | SetMemTable | SetVringFd | StartRing | StopRing | CloseFds


@dataclass(slots=True)
class Vring:
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_set: bool = False
    enabled: bool = False
    started: bool = False


@dataclass(slots=True)
class Session:
    guest_cid: int
    features: int = field(default_factory=default_features)
    max_queue_size: int = 32768
    acked_features: int = 0
    protocol_features: int = 0
    owner: bool = False
    has_mem: bool = False
    vrings: list[Vring] = field(default_factory=lambda: [Vring() for _ in range(NUM_QUEUES)])

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    @property
    def protocol_features_on(self) -> bool:
        return bool(self.acked_features & (1 << codec.VHOST_USER_F_PROTOCOL_FEATURES))

    def has(self, bit: int) -> bool:
        return bool(self.acked_features & (1 << bit))

    def handle(self, msg: Message, fds: list[int]) -> list[Action]:
        if msg.flags & codec.FLAG_REPLY:
            raise ProtocolError(f"{_req_name(msg.request)}: a front-end request carries the reply flag")
        # On ProtocolError nothing was handed out: the shell closes every fd of this message.
        actions = self._dispatch(msg, fds)
        if (
            msg.need_reply
            and self.reply_ack
            and not any(isinstance(a, Reply) or (isinstance(a, StopRing) and a.reply) for a in actions)
        ):
            # vhost-user.rst REPLY_ACK: a u64 0 for success. QEMU 10 asks on SET_VRING_ENABLE.
            actions.append(Reply(codec.encode_reply(msg.request, U64.pack(0))))
        return actions

    def _vring(self, index: int, name: str) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise ProtocolError(f"{name}: vring index {index} out of range (device has {NUM_QUEUES})")
        return self.vrings[index]

    def _no_fds(self, msg: Message, fds: list[int]) -> None:
        if fds:
            raise ProtocolError(f"{_req_name(msg.request)}: {len(fds)} unexpected fds")

    def _dispatch(self, msg: Message, fds: list[int]) -> list[Action]:
        r = msg.request
        name = _req_name(r)
        if r not in _FD_REQUESTS:
            self._no_fds(msg, fds)
        if r == Request.GET_FEATURES:
            return [Reply(codec.encode_reply(r, U64.pack(self.features)))]
        if r == Request.SET_FEATURES:
            value = codec.decode_u64(msg)
            if value & ~self.features:
                raise ProtocolError(f"SET_FEATURES: {value:#x} acks features never offered ({self.features:#x})")
            self.acked_features = value
            return []
        if r == Request.GET_PROTOCOL_FEATURES:
            return [Reply(codec.encode_reply(r, U64.pack(BACKEND_PROTOCOL_FEATURES)))]
        if r == Request.SET_PROTOCOL_FEATURES:
            value = codec.decode_u64(msg)
            if value & ~BACKEND_PROTOCOL_FEATURES:
                raise ProtocolError(f"SET_PROTOCOL_FEATURES: {value:#x} acks unknown protocol features")
            self.protocol_features = value
            return []
        if r == Request.GET_QUEUE_NUM:
            return [Reply(codec.encode_reply(r, U64.pack(NUM_QUEUES)))]
        if r == Request.SET_OWNER:
            self.owner = True
            return []
        if r in (Request.RESET_OWNER, Request.RESET_DEVICE):
            actions: list[Action] = [StopRing(i) for i, v in enumerate(self.vrings) if v.started]
            self.vrings = [Vring() for _ in range(NUM_QUEUES)]
            self.acked_features = 0
            return actions
        if r == Request.GET_CONFIG:
            offset, size, flags = codec.decode_config(msg)
            cfg = self.guest_cid.to_bytes(8, "little")
            if offset + size > VIRTIO_VSOCK_CONFIG_SIZE:
                raise ProtocolError(f"GET_CONFIG: offset {offset} size {size} beyond the 8-byte config")
            return [Reply(codec.encode_reply(r, codec.encode_config(offset, cfg[offset : offset + size], flags)))]
        if r == Request.SET_CONFIG:
            codec.decode_config(msg)
            raise ProtocolError("SET_CONFIG: the vsock config space is read-only")
        if r == Request.SET_MEM_TABLE:
            regions = codec.decode_mem_table(msg)
            if len(fds) != len(regions):
                raise ProtocolError(f"SET_MEM_TABLE: {len(regions)} regions but {len(fds)} fds")
            if any(v.started for v in self.vrings):
                # vhost-user.rst allows it; our queue views point into the old table, so restart them.
                pass
            self.has_mem = True
            return [SetMemTable(regions, list(fds))]
        if r == Request.SET_VRING_NUM:
            index, num = codec.decode_vring_state(msg)
            v = self._vring(index, name)
            if num > self.max_queue_size:
                # vhost-device-vsock's queue-size: a limit on the ring the front-end may set
                raise ProtocolError(f"SET_VRING_NUM: vring {index} size {num} is above this device's queue-size "
                                    f"{self.max_queue_size} (raise it with --queue-size or queue-size=)")
            if num == 0 or num & (num - 1):
                raise ProtocolError(f"SET_VRING_NUM: size {num} is not a power of two")
            if v.started:
                raise ProtocolError(f"SET_VRING_NUM: vring {index} is running")
            v.num = num
            return []
        if r == Request.SET_VRING_BASE:
            index, base = codec.decode_vring_state(msg)
            v = self._vring(index, name)
            if base > 0xFFFF:
                raise ProtocolError(f"SET_VRING_BASE: base {base} exceeds 16 bits")
            if v.started:
                raise ProtocolError(f"SET_VRING_BASE: vring {index} is running")
            v.base = base
            return []
        if r == Request.SET_VRING_ADDR:
            addr = codec.decode_vring_addr(msg)
            v = self._vring(addr.index, name)
            if v.started:
                raise ProtocolError(f"SET_VRING_ADDR: vring {addr.index} is running")
            v.addr = addr
            return []
        if r == Request.GET_VRING_BASE:
            index, _num = codec.decode_vring_state(msg)
            v = self._vring(index, name)
            v.started = False
            v.enabled = False
            v.kick_set = False
            # vhost-user.rst: GET_VRING_BASE stops the ring; the reply carries last_avail_idx.
            return [StopRing(index, reply=True)]
        if r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            index, fd_present = codec.decode_vring_fd_index(msg)
            if len(fds) != (1 if fd_present else 0):
                raise ProtocolError(f"{name}: {len(fds)} fds, expected {1 if fd_present else 0}")
            v = self._vring(index, name)
            fd = fds[0] if fds else None
            kind = {Request.SET_VRING_KICK: "kick", Request.SET_VRING_CALL: "call", Request.SET_VRING_ERR: "err"}[
                Request(r)
            ]
            actions = [SetVringFd(kind, index, fd)]
            if kind == "kick":
                if fd is None:
                    raise ProtocolError("SET_VRING_KICK: polling mode (no fd) is not supported")
                v.kick_set = True
                # Without PROTOCOL_FEATURES a ring is enabled as soon as it is started.
                if not self.protocol_features_on:
                    v.enabled = True
                actions += self._maybe_start(index)
            return actions
        if r == Request.SET_VRING_ENABLE:
            index, enable = codec.decode_vring_state(msg)
            v = self._vring(index, name)
            if enable not in (0, 1):
                raise ProtocolError(f"SET_VRING_ENABLE: value {enable} is not 0 or 1")
            if not self.protocol_features_on:
                raise ProtocolError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
            v.enabled = bool(enable)
            if v.enabled:
                return self._maybe_start(index)
            if v.started:
                v.started = False
                return [StopRing(index)]
            return []
        if r in (Request.SET_STATUS,):
            codec.decode_u64(msg)
            return []
        if r == Request.GET_STATUS:
            return [Reply(codec.encode_reply(r, U64.pack(0)))]
        if r == Request.SET_VRING_ENDIAN:
            raise ProtocolError("SET_VRING_ENDIAN: cross-endian rings are not supported")
        raise ProtocolError(f"{name}: not supported by this back-end")

    def _maybe_start(self, index: int) -> list[Action]:
        v = self.vrings[index]
        if v.started or not (v.enabled and v.kick_set and v.num and v.addr is not None and self.has_mem):
            return []
        v.started = True
        return [StartRing(index)]

    def reply_vring_base(self, index: int, last_avail_idx: int) -> bytes:
        return codec.encode_reply(Request.GET_VRING_BASE, codec.encode_vring_state(index, last_avail_idx))


_FD_REQUESTS = frozenset({Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR})


def _req_name(r: int) -> str:
    try:
        return Request(r).name
    except ValueError:
        return f"request {r}"
