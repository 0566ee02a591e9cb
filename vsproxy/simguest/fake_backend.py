"""A deliberately small vhost-user-vsock backend, to test the simulated guest without the real one.

It is the device side of everything SimGuest does: answers the vhost-user requests (logging them
with their fd counts), maps the memfd regions, walks rings by UVA/GPA, follows indirect tables,
fills rx buffers and signals call eventfds (honouring EVENT_IDX). The vsock behaviour is a pluggable
``Host``; ``EchoHost`` accepts connections, echoes or sinks data and keeps credit both ways.
It trusts the guest (it is a test double, not the product).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import ProtocolFeature as PF
from vsproxy.vhost_user.codec import Request as R
from vsproxy.vsock import header as vh
from vsproxy.vsock.header import Header, Op

from .ring import DESC, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, vring_need_event

DEFAULT_FEATURES = (1 << codec.VIRTIO_F_VERSION_1 | 1 << codec.VHOST_USER_F_PROTOCOL_FEATURES
                    | 1 << codec.VIRTIO_RING_F_EVENT_IDX | 1 << codec.VIRTIO_RING_F_INDIRECT_DESC)
DEFAULT_PROTOCOL_FEATURES = 1 << PF.CONFIG | 1 << PF.REPLY_ACK | 1 << PF.MQ
HOST_CID = vh.VMADDR_CID_HOST


@dataclass
class DevQueue:
    num: int = 0
    base: int = 0
    addr: codec.VringAddr | None = None
    kick: int = -1
    call: int = -1
    err: int = -1
    enabled: bool = False
    last_avail: int = 0
    used_idx: int = 0
    signalled_at: int = 0


@dataclass
class _Mapping:
    region: codec.MemRegion
    mm: mmap.mmap
    view: memoryview


Host = Callable[["FakeBackend", Header, memoryview], None]


class FakeBackend:
    """Serves one front-end connection on ``sock`` (call ``serve`` in a thread, ``stop`` to end)."""

    def __init__(self, sock: socket.socket, *, guest_cid: int = 3, features: int = DEFAULT_FEATURES,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES, host: Host | None = None) -> None:
        self.sock = sock
        self.guest_cid = guest_cid
        self.features = features
        self.protocol_features = protocol_features
        self.acked_features = 0
        self.acked_protocol = 0
        self.host: Host = host if host is not None else EchoHost()
        self.log: list[tuple[codec.Message, int]] = []
        self.maps: list[_Mapping] = []
        self.queues = [DevQueue(), DevQueue()]
        self.pending_rx: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = False
        self.error: BaseException | None = None
        self.tx_packets = 0
        self.null_tx = False  # benchmark mode: return tx chains unread, like an infinitely fast device
        self.on_idle: Callable[[FakeBackend], None] | None = None

    # -- memory ------------------------------------------------------------------------------------

    def _find(self, addr: int, length: int, uva: bool) -> tuple[_Mapping, int]:
        for m in self.maps:
            start = m.region.user_addr if uva else m.region.guest_addr
            if start <= addr and addr + length <= start + m.region.size:
                return m, addr - start
        raise ValueError(f"{'UVA' if uva else 'GPA'} {addr:#x}+{length} not in the memory table")

    def gpa(self, addr: int, length: int) -> memoryview:
        m, off = self._find(addr, length, False)
        return m.view[off : off + length]

    # -- rings -------------------------------------------------------------------------------------

    def _ring(self, q: int) -> tuple[DevQueue, memoryview, int, int, int]:
        dq = self.queues[q]
        assert dq.addr is not None
        m, off_desc = self._find(dq.addr.desc, 16 * dq.num, True)
        _, off_avail = self._find(dq.addr.avail, 6 + 2 * dq.num, True)
        _, off_used = self._find(dq.addr.used, 6 + 8 * dq.num, True)
        return dq, m.view, off_desc, off_avail, off_used

    def pop(self, q: int) -> tuple[int, list[tuple[int, int, int]]] | None:
        """Next available chain as (head, [(gpa, len, flags)]), following an indirect table."""
        dq, view, od, oa, ou = self._ring(q)
        u16 = view.cast("H")
        if u16[(oa >> 1) + 1] == dq.last_avail:
            return None
        head = u16[(oa >> 1) + 2 + (dq.last_avail % dq.num)]
        dq.last_avail = (dq.last_avail + 1) & 0xFFFF
        if self.acked_features >> codec.VIRTIO_RING_F_EVENT_IDX & 1:
            u16[(ou >> 1) + 2 + 4 * dq.num] = dq.last_avail  # avail_event
        bufs: list[tuple[int, int, int]] = []
        table, base, i = view, od, head
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, base + 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                table, base, i = self.gpa(addr, length), 0, 0
                continue
            bufs.append((addr, length, flags))
            if not flags & VRING_DESC_F_NEXT:
                return head, bufs
            i = nxt

    def push_used(self, q: int, head: int, length: int) -> None:
        dq, view, _od, _oa, ou = self._ring(q)
        u32 = view.cast("I")
        slot = (ou >> 2) + 1 + 2 * (dq.used_idx % dq.num)
        u32[slot], u32[slot + 1] = head, length
        dq.used_idx = (dq.used_idx + 1) & 0xFFFF
        view.cast("H")[(ou >> 1) + 1] = dq.used_idx

    def notify(self, q: int) -> None:
        dq, view, _od, oa, _ou = self._ring(q)
        u16 = view.cast("H")
        if self.acked_features >> codec.VIRTIO_RING_F_EVENT_IDX & 1:
            need = vring_need_event(u16[(oa >> 1) + 2 + dq.num], dq.used_idx, dq.signalled_at)
        else:
            need = not u16[oa >> 1] & VRING_AVAIL_F_NO_INTERRUPT
        dq.signalled_at = dq.used_idx
        if need and dq.call >= 0:
            os.eventfd_write(dq.call, 1)

    # -- vsock -------------------------------------------------------------------------------------

    def to_guest(self, hdr: bytes, payload: bytes = b"") -> None:
        """Queue a packet for the guest (thread-safe); delivered when rx buffers are there."""
        with self._lock:
            self.pending_rx.append(hdr + payload)
        os.eventfd_write(self._wake, 1)

    def _deliver_rx(self) -> None:
        if not self.queues[0].enabled or self.queues[0].addr is None:
            return
        sent = False
        while True:
            with self._lock:
                if not self.pending_rx:
                    break
                pkt = self.pending_rx[0]
            chain = self.pop(0)
            if chain is None:
                break
            head, bufs = chain
            addr, length, _flags = bufs[0]
            assert len(pkt) <= length, "fake backend: packet larger than the rx buffer"
            self.gpa(addr, len(pkt))[:] = pkt
            self.push_used(0, head, len(pkt))
            with self._lock:
                self.pending_rx.popleft()
            sent = True
        if sent:
            self.notify(0)

    def _process_tx(self) -> None:
        if not self.queues[1].enabled or self.queues[1].addr is None:
            return
        if self.null_tx:
            self._null_tx()
            return
        done = False
        while (chain := self.pop(1)) is not None:
            head, bufs = chain
            data = b"".join(bytes(self.gpa(a, n)) for a, n, _f in bufs)
            self.push_used(1, head, 0)
            done = True
            self.tx_packets += 1
            h = vh.unpack(data)
            self.host(self, h, memoryview(data)[vh.HDR_SIZE : vh.HDR_SIZE + h.len])
        if done:
            self.notify(1)

    def _null_tx(self) -> None:
        dq, view, _od, oa, ou = self._ring(1)
        u16, u32 = view.cast("H"), view.cast("I")
        avail = u16[(oa >> 1) + 1]
        n = (avail - dq.last_avail) & 0xFFFF
        if not n:
            return
        ring_w, used_d, mask = (oa >> 1) + 2, (ou >> 2) + 1, dq.num - 1
        last, used = dq.last_avail, dq.used_idx
        for k in range(n):
            d = used_d + 2 * ((used + k) & mask)
            u32[d] = u16[ring_w + ((last + k) & mask)]
            u32[d + 1] = 0
        dq.last_avail = avail
        if self.acked_features >> codec.VIRTIO_RING_F_EVENT_IDX & 1:
            u16[(ou >> 1) + 2 + 4 * dq.num] = avail
        dq.used_idx = (used + n) & 0xFFFF
        u16[(ou >> 1) + 1] = dq.used_idx
        self.tx_packets += n
        self.notify(1)

    # -- vhost-user --------------------------------------------------------------------------------

    def _reply(self, msg: codec.Message, payload: bytes) -> None:
        self.sock.sendall(codec.encode_reply(msg.request, payload))

    def handle(self, msg: codec.Message, fds: list[int]) -> None:
        self.log.append((msg, len(fds)))
        req, q = msg.request, None
        if req == R.GET_FEATURES:
            self._reply(msg, codec.U64.pack(self.features))
        elif req == R.GET_PROTOCOL_FEATURES:
            self._reply(msg, codec.U64.pack(self.protocol_features))
        elif req == R.SET_PROTOCOL_FEATURES:
            self.acked_protocol = codec.decode_u64(msg)
        elif req == R.SET_FEATURES:
            self.acked_features = codec.decode_u64(msg)
        elif req == R.GET_QUEUE_NUM:
            self._reply(msg, codec.U64.pack(2))
        elif req == R.GET_CONFIG:
            self._reply(msg, codec.encode_config(0, codec.U64.pack(self.guest_cid)))
        elif req == R.SET_MEM_TABLE:
            for m in self.maps:
                m.view.release()
                m.mm.close()
            self.maps = []
            for r, fd in zip(codec.decode_mem_table(msg), fds, strict=True):
                mm = mmap.mmap(fd, r.size, offset=r.mmap_offset)
                self.maps.append(_Mapping(r, mm, memoryview(mm)))
                os.close(fd)
            fds = []
        elif req in (R.SET_VRING_CALL, R.SET_VRING_KICK, R.SET_VRING_ERR):
            q, _has = codec.decode_vring_fd_index(msg)
            dq = self.queues[q]
            attr = {R.SET_VRING_CALL: "call", R.SET_VRING_KICK: "kick", R.SET_VRING_ERR: "err"}[R(req)]
            old = getattr(dq, attr)
            if old >= 0:
                os.close(old)
            setattr(dq, attr, fds.pop() if fds else -1)
        elif req == R.SET_VRING_NUM:
            q, n = codec.decode_vring_state(msg)
            self.queues[q].num = n
        elif req == R.SET_VRING_BASE:
            q, n = codec.decode_vring_state(msg)
            dq = self.queues[q]
            dq.base = dq.last_avail = dq.used_idx = dq.signalled_at = n
        elif req == R.SET_VRING_ADDR:
            a = codec.decode_vring_addr(msg)
            self.queues[a.index].addr = a
        elif req == R.SET_VRING_ENABLE:
            q, n = codec.decode_vring_state(msg)
            self.queues[q].enabled = bool(n)
        elif req == R.GET_VRING_BASE:
            q, _ = codec.decode_vring_state(msg)
            self.queues[q].enabled = False
            self._reply(msg, codec.encode_vring_state(q, self.queues[q].last_avail))
        for fd in fds:
            os.close(fd)
        if msg.need_reply:
            self._reply(msg, codec.U64.pack(0))

    def serve(self) -> None:
        """Run until the front-end disconnects or ``stop``; exceptions are kept in ``self.error``."""
        reader = codec.MessageReader()
        try:
            while not self._stop:
                fds = [self.sock.fileno(), self._wake] + [dq.kick for dq in self.queues if dq.kick >= 0]
                ready, _, _ = select.select(fds, [], [], 0.05)
                if self.sock.fileno() in ready:
                    data, got, _f, _a = socket.recv_fds(self.sock, reader.wanted(), codec.MAX_FDS)
                    if not data:
                        return
                    done = reader.feed(data, got)
                    if done is not None:
                        self.handle(*done)
                for fd in ready:
                    if fd != self.sock.fileno():
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                self._process_tx()
                if self.on_idle is not None:
                    self.on_idle(self)
                self._deliver_rx()
        except BaseException as e:  # surfaced by the test
            self.error = e
            raise
        finally:
            self.sock.close()
            for dq in self.queues:
                for fd in (dq.kick, dq.call, dq.err):
                    if fd >= 0:
                        os.close(fd)
                dq.kick = dq.call = dq.err = -1

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)


@dataclass
class HostConn:
    guest_buf_alloc: int = 0
    guest_fwd_cnt: int = 0
    tx_cnt: int = 0
    fwd_cnt: int = 0
    to_send: int = 0  # pending generated bytes for the guest (stream test / drain)
    received: bytearray = field(default_factory=bytearray)


class EchoHost:
    """Host side for tests: accepts REQUEST (except ``refuse`` ports), echoes or sinks RW, RST on SHUTDOWN(3)."""

    def __init__(self, *, echo: bool = True, keep: bool = False, refuse: frozenset[int] = frozenset(),
                 buf_alloc: int = 262144, rx_payload: int = 3776 - vh.HDR_SIZE, null_port: int = -1) -> None:
        self.null_port = null_port  # after accepting this port, switch the backend to null_tx
        self._pattern = bytes(range(256)) * (rx_payload // 256 + 2)
        self.echo, self.keep, self.refuse, self.buf_alloc, self.rx_payload = echo, keep, refuse, buf_alloc, rx_payload
        self.conns: dict[tuple[int, int, int, int], HostConn] = {}
        self.packets: list[Header] = []

    def _send(self, be: FakeBackend, h: Header, op: int, c: HostConn | None, payload: bytes = b"",
              flags: int = 0) -> None:
        fwd = c.fwd_cnt if c else 0
        be.to_guest(vh.pack(HOST_CID, h.src_cid, h.dst_port, h.src_port, len(payload), h.type, op, flags,
                            self.buf_alloc, fwd), payload)

    def __call__(self, be: FakeBackend, h: Header, payload: memoryview) -> None:
        self.packets.append(h)
        key = (h.src_cid, h.src_port, h.dst_port, h.type)
        c = self.conns.get(key)
        if c is not None:
            c.guest_buf_alloc, c.guest_fwd_cnt = h.buf_alloc, h.fwd_cnt
        if h.op == Op.REQUEST:
            if h.dst_port in self.refuse:
                self._send(be, h, Op.RST, None)
                return
            self.conns[key] = HostConn(h.buf_alloc, h.fwd_cnt)
            self._send(be, h, Op.RESPONSE, self.conns[key])
            if h.dst_port == self.null_port:
                be.null_tx = True
        elif c is None and h.op == Op.RESPONSE:  # the guest accepted a REQUEST injected with to_guest
            self.conns[key] = HostConn(h.buf_alloc, h.fwd_cnt)
        elif c is None:
            if h.op != Op.RST:
                self._send(be, h, Op.RST, None)
        elif h.op == Op.RW:
            c.fwd_cnt = (c.fwd_cnt + h.len) & vh.U32
            if self.keep:
                c.received += payload
            if self.echo:
                data = bytes(payload)
                for i in range(0, len(data), self.rx_payload):
                    chunk = data[i : i + self.rx_payload]
                    c.tx_cnt = (c.tx_cnt + len(chunk)) & vh.U32
                    self._send(be, h, Op.RW, c, chunk)
        elif h.op == Op.CREDIT_REQUEST:
            self._send(be, h, Op.CREDIT_UPDATE, c)
        elif h.op == Op.SHUTDOWN and h.flags & vh.SHUTDOWN_BOTH == vh.SHUTDOWN_BOTH:
            self._send(be, h, Op.RST, c)
            del self.conns[key]
        elif h.op == Op.RST:
            del self.conns[key]

    def credit_all(self, be: FakeBackend) -> None:
        """Advertise every connection's fwd_cnt (a sink host calls this after each tx batch)."""
        for (cid, sport, dport, typ), c in self.conns.items():
            h = Header(cid, HOST_CID, sport, dport, 0, typ, 0, 0, 0, 0)
            self._send(be, h, Op.CREDIT_UPDATE, c)

    def pump(self, be: FakeBackend) -> None:
        """Send pending generated bytes to the guest within its credit (byte i is i & 0xFF)."""
        for (cid, sport, dport, typ), c in self.conns.items():
            h = Header(cid, HOST_CID, sport, dport, 0, typ, 0, 0, 0, 0)
            while c.to_send and len(be.pending_rx) < 64:
                free = c.guest_buf_alloc - ((c.tx_cnt - c.guest_fwd_cnt) & vh.U32)
                n = min(c.to_send, free, self.rx_payload)
                if n <= 0:
                    break
                data = self._pattern[c.tx_cnt & 0xFF : (c.tx_cnt & 0xFF) + n]
                c.tx_cnt = (c.tx_cnt + n) & vh.U32
                c.to_send -= n
                self._send(be, h, Op.RW, c, data)


def start_pair(guest_cid: int = 3, **kw: object) -> tuple[str, FakeBackend, threading.Thread, str]:
    """Listen on a fresh unix socket, serve the first connection with a FakeBackend in a thread.

    Returns (socket path, backend, thread, tmpdir); the backend object exists before the guest connects.
    """
    import tempfile

    tmp = tempfile.mkdtemp(prefix="simguest-")
    path = os.path.join(tmp, "vhost.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    a, b = socket.socketpair()
    a.close()
    be = FakeBackend(b, guest_cid=guest_cid, **kw)  # type: ignore[arg-type]

    def run() -> None:
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
        finally:
            srv.close()
        be.sock.close()
        be.sock = conn
        be.serve()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return path, be, t, tmp
