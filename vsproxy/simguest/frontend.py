"""The vhost-user front-end half of the simulated guest: what QEMU's vhost-user-vsock device sends.

The message order, which messages carry need_reply, and when call fds are swapped follow
qemu-vhost-user-vsock.md (QEMU 7.2, and 10 with ``qemu10=True``), because a backend that works
only with a friendlier order would hang the real QEMU. Every reply is read against a deadline.
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import ProtocolFeature as PF
from vsproxy.vhost_user.codec import Request as R

from .errors import BackendClosed, BackendNack, NegotiationError, ReplyTimeout, SimGuestError
from .memory import GuestMemory
from .ring import SplitRing

NUM_QUEUES = 2  # rx = 0, tx = 1; QEMU keeps the event queue to itself
VHOST_USER_F_PROTOCOL_FEATURES = codec.VHOST_USER_F_PROTOCOL_FEATURES
MAX_RETIRED_CALL_FDS = 4


class SentMessage(NamedTuple):
    """One message the front-end sent, kept for tests that check the sequence."""

    request: int
    flags: int
    payload: bytes
    nfds: int

    @property
    def name(self) -> str:
        try:
            return R(self.request).name
        except ValueError:
            return str(self.request)


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """What this "QEMU + machine + guest kernel" combination negotiates."""

    version_1: bool = True  # False: legacy virtio-mmio (microvm, nitro-enclave) never acks VERSION_1
    event_idx: bool = True
    indirect: bool = True
    reply_ack: bool = True
    mq: bool = False
    qemu10: bool = False  # need_reply on SET_VRING_ENABLE too, GET_FEATURES barrier without REPLY_ACK
    seqpacket: bool = False


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class VhostUserClient:
    """Message transport: send requests with fds, read replies against a deadline."""

    def __init__(self, path: str, timeout: float) -> None:
        self.timeout = timeout
        self.log: list[SentMessage] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except TimeoutError as e:
            self.sock.close()
            raise ReplyTimeout(f"connecting to vhost-user socket {path} timed out after {timeout}s") from e
        except OSError as e:
            self.sock.close()
            raise BackendClosed(f"cannot connect to vhost-user socket {path}: {e}") from e
        self.sock.setblocking(False)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False) -> None:
        data = codec.encode(request, payload, need_reply=need_reply)
        self.log.append(SentMessage(request, codec.HEADER.unpack_from(data)[1], payload, len(fds)))
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        first = True
        while view:
            self._wait(select.POLLOUT, deadline, f"sending {R(request).name}")
            try:
                if first and fds:
                    n = socket.send_fds(self.sock, [view], list(fds))
                else:
                    n = self.sock.send(view)
            except BlockingIOError:
                continue
            except OSError as e:
                raise BackendClosed(f"backend closed the socket while sending {R(request).name}: {e}") from e
            first = False
            view = view[n:]

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False) -> None:
        """Send; with need_reply wait for the u64 ack and fail on a non-zero status."""
        self.send(request, payload, fds, need_reply=need_reply)
        if need_reply:
            status = codec.decode_u64(self.read_reply(request))
            if status:
                raise BackendNack(f"backend answered {R(request).name} with status {status}")

    def query(self, request: int, payload: bytes = b"") -> codec.Message:
        self.send(request, payload)
        return self.read_reply(request)

    def read_reply(self, request: int) -> codec.Message:
        deadline = time.monotonic() + self.timeout
        reader = codec.MessageReader()
        name = R(request).name
        while True:
            self._wait(select.POLLIN, deadline, f"waiting for the reply to {name}")
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, reader.wanted(), codec.MAX_FDS)
            except BlockingIOError:
                continue
            except OSError as e:
                raise BackendClosed(f"backend closed the socket before replying to {name}: {e}") from e
            if not data:
                raise BackendClosed(f"backend closed the socket before replying to {name}")
            try:
                done = reader.feed(data, fds)
            except codec.ProtocolError as e:
                raise NegotiationError(f"bad reply to {name}: {e}") from e
            if done is None:
                continue
            msg, got_fds = done
            for fd in got_fds:
                os.close(fd)
            if msg.request != request or not msg.flags & codec.FLAG_REPLY:
                raise NegotiationError(f"expected a reply to {name}, got request {msg.request} flags {msg.flags:#x}")
            return msg

    def check_idle(self) -> None:
        """Between requests the backend has nothing to say: EOF or stray bytes are errors."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            raise BackendClosed(f"vhost-user socket failed: {e}") from e
        if not data:
            raise BackendClosed("backend closed the vhost-user socket")
        raise NegotiationError("backend sent an unsolicited message on the vhost-user socket")

    def _wait(self, events: int, deadline: float, what: str) -> None:
        p = select.poll()
        p.register(self.sock, events)
        left = deadline - time.monotonic()
        if left <= 0 or not p.poll(left * 1000):
            raise ReplyTimeout(f"backend timed out ({self.timeout}s) {what}")

    def close(self) -> None:
        self.sock.close()


class VsockFrontend:
    """QEMU's vhost-user-vsock device: realize, driver start, stop, with eventfds for kick/call/err."""

    def __init__(self, path: str, config: FrontendConfig, timeout: float) -> None:
        self.config = config
        self.client = VhostUserClient(path, timeout)
        self.offered_features = 0
        self.acked_features = 0
        self.protocol_features = 0
        self.guest_cid = 0
        self.kick_fds: list[int] = [-1] * NUM_QUEUES
        self.call_fds: list[int] = [-1] * NUM_QUEUES
        self.err_fds: list[int] = [-1] * NUM_QUEUES
        self.retired_call_fds: list[int] = []
        self.running = False

    # -- helpers ------------------------------------------------------------------------------------

    def _has_pf(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    def _set_fd(self, request: int, table: list[int], q: int) -> None:
        """Send a fresh eventfd for queue ``q``.

        A replaced call fd stays open and watched (like QEMU's masked notifier, which it checks on
        unmask): messages are not acked, so a backend may still signal the old fd for a while.
        """
        fd = _eventfd()
        self.client.request(request, codec.U64.pack(q), [fd])
        if table[q] >= 0:
            if table is self.call_fds:
                self.retired_call_fds.append(table[q])
                while len(self.retired_call_fds) > MAX_RETIRED_CALL_FDS:
                    os.close(self.retired_call_fds.pop(0))
            else:
                os.close(table[q])
        table[q] = fd

    def _set_enable(self, q: int, enable: int) -> None:
        need = self.config.qemu10 and self._has_pf(PF.REPLY_ACK)
        self.client.request(R.SET_VRING_ENABLE, codec.encode_vring_state(q, enable), need_reply=need)
        if self.config.qemu10 and not self._has_pf(PF.REPLY_ACK):
            self.client.query(R.GET_FEATURES)  # QEMU 10's sync barrier

    def wanted_features(self) -> int:
        c = self.config
        want = 1 << VHOST_USER_F_PROTOCOL_FEATURES | 1 << codec.VIRTIO_VSOCK_F_STREAM
        want |= (c.version_1 << codec.VIRTIO_F_VERSION_1) | (c.event_idx << codec.VIRTIO_RING_F_EVENT_IDX)
        want |= (c.indirect << codec.VIRTIO_RING_F_INDIRECT_DESC) | (c.seqpacket << codec.VIRTIO_VSOCK_F_SEQPACKET)
        return want

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    # -- lifecycle ------------------------------------------------------------------------------------

    def realize(self) -> None:
        """Device realize, before the guest runs (sequence step 1)."""
        cl = self.client
        self.offered_features = codec.decode_u64(cl.query(R.GET_FEATURES))
        if not self.offered_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise NegotiationError("backend does not offer VHOST_USER_F_PROTOCOL_FEATURES (QEMU would exit)")
        offered_pf = codec.decode_u64(cl.query(R.GET_PROTOCOL_FEATURES))
        if not offered_pf >> PF.CONFIG & 1:
            raise NegotiationError("backend does not offer protocol feature CONFIG (QEMU reads guest_cid with it)")
        want_pf = 1 << PF.CONFIG | (self.config.reply_ack << PF.REPLY_ACK) | (self.config.mq << PF.MQ)
        self.protocol_features = offered_pf & want_pf
        cl.request(R.SET_PROTOCOL_FEATURES, codec.U64.pack(self.protocol_features))
        if self._has_pf(PF.MQ):
            nq = codec.decode_u64(cl.query(R.GET_QUEUE_NUM))
            if nq < NUM_QUEUES:
                raise NegotiationError(f"GET_QUEUE_NUM answered {nq}, need {NUM_QUEUES}")
        cl.request(R.SET_OWNER)
        self.offered_features = codec.decode_u64(cl.query(R.GET_FEATURES))
        for q in range(NUM_QUEUES):
            self._set_fd(R.SET_VRING_CALL, self.call_fds, q)
            self._set_fd(R.SET_VRING_ERR, self.err_fds, q)
        reply = cl.query(R.GET_CONFIG, codec.encode_config(0, bytes(8)))
        try:
            offset, size, _flags = codec.decode_config(reply)
        except codec.ProtocolError as e:
            raise NegotiationError(f"bad GET_CONFIG reply: {e}") from e
        if offset != 0 or size != 8:
            raise NegotiationError(f"GET_CONFIG reply is for offset {offset} size {size}, asked 0/8")
        self.guest_cid = codec.U64.unpack_from(reply.payload, codec.CONFIG_HEADER.size)[0] & 0xFFFFFFFF

    def start(self, mem: GuestMemory, rings: Sequence[SplitRing], bases: Sequence[int] = (0, 0)) -> None:
        """Guest driver start (sequence step 2): features, memory, rings, enable, final call fds."""
        cl = self.client
        want = self.wanted_features()
        if self.config.version_1 and not self.offered_features >> codec.VIRTIO_F_VERSION_1 & 1:
            raise NegotiationError("backend does not offer VIRTIO_F_VERSION_1 (needed by vhost-user-vsock-pci)")
        for q in range(NUM_QUEUES):
            self._set_fd(R.SET_VRING_CALL, self.call_fds, q)
        self.acked_features = self.offered_features & want
        cl.request(R.SET_FEATURES, codec.U64.pack(self.acked_features))
        cl.request(R.SET_MEM_TABLE, codec.encode_mem_table(mem.mem_regions()), [mem.fd] * len(mem.regions),
                   need_reply=self._has_pf(PF.REPLY_ACK))
        for ring, base in zip(rings, bases, strict=True):
            q = ring.index
            cl.request(R.SET_VRING_NUM, codec.encode_vring_state(q, ring.size))
            cl.request(R.SET_VRING_BASE, codec.encode_vring_state(q, base))
            addr = codec.VringAddr(q, 0, mem.uva(ring.desc_gpa), mem.uva(ring.used_gpa), mem.uva(ring.avail_gpa), 0)
            cl.request(R.SET_VRING_ADDR, codec.encode_vring_addr(addr))
            self._set_fd(R.SET_VRING_KICK, self.kick_fds, q)
        for ring in rings:
            self._set_enable(ring.index, 1)
        for q in range(NUM_QUEUES):
            self._set_fd(R.SET_VRING_CALL, self.call_fds, q)
        self.running = True

    def stop(self) -> list[int]:
        """Guest poweroff/reboot (sequence step 3): disable, GET_VRING_BASE, masked call fds."""
        for q in range(NUM_QUEUES):
            self._set_enable(q, 0)
        bases = []
        for q in range(NUM_QUEUES):
            index, num = codec.decode_vring_state(self.client.query(R.GET_VRING_BASE, codec.encode_vring_state(q, 0)))
            if index != q:
                raise NegotiationError(f"GET_VRING_BASE for queue {q} answered for queue {index}")
            bases.append(num)
        for q in range(NUM_QUEUES):
            self._set_fd(R.SET_VRING_CALL, self.call_fds, q)
        self.running = False
        return bases

    def kick(self, q: int) -> None:
        os.eventfd_write(self.kick_fds[q], 1)

    def close(self) -> None:
        """Drop the socket like an exiting QEMU, and the eventfds."""
        self.client.close()
        for table in (self.kick_fds, self.call_fds, self.err_fds):
            for i, fd in enumerate(table):
                if fd >= 0:
                    os.close(fd)
                    table[i] = -1
        for fd in self.retired_call_fds:
            os.close(fd)
        self.retired_call_fds.clear()


def drain_eventfd(fd: int) -> int:
    """Read an eventfd's counter (0 if nothing pending)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


__all__ = ["FrontendConfig", "SentMessage", "SimGuestError", "VhostUserClient", "VsockFrontend", "drain_eventfd"]
