"""Plain rings for the C paths: one guest memory holding an rx and a tx ring, a TxFastPath
attached to an RxFastPath, and a socketpair as the host socket of the connection C is lent."""

from __future__ import annotations

import socket

from vsproxy import fastpath
from vsproxy.memory import GuestMemory as DeviceMemory
from vsproxy.simguest.memory import GuestMemory
from vsproxy.simguest.ring import Buf, SplitRing
from vsproxy.virtq import SplitQueue
from vsproxy.vsock import header as H
from vsproxy.vsock import lending

GUEST, PORT, HOST_PORT = 5, 1000, 5000
KEY = (1, PORT, 2, HOST_PORT)
BUF_ALLOC = 65536


class Rings:
    def __init__(self, num: int = 64, rx_bufs: int = 8, rx_size: int = 4096, regions: int = 1) -> None:
        self.gmem = GuestMemory(8 << 20, regions)
        self.rx_ring = SplitRing(self.gmem, 0, num, indirect=True, event_idx=True)
        self.tx_ring = SplitRing(self.gmem, 1, num, indirect=True, event_idx=True)
        if regions == 2:  # the rings in region 0, every buffer in region 1 (behind its mmap_offset)
            r0 = self.gmem.regions[0]
            self.gmem.alloc(r0.gpa + r0.size - self.gmem.alloc(16), 1)
        self.dmem = DeviceMemory.map_fds(self.gmem.mem_regions(), [self.gmem.fd] * len(self.gmem.regions))
        self.rxq, self.txq = (
            SplitQueue(self.dmem, num, self.gmem.uva(r.desc_gpa), self.gmem.uva(r.avail_gpa),
                       self.gmem.uva(r.used_gpa), indirect=True, event_idx=True, device_writes=r is self.rx_ring)
            for r in (self.rx_ring, self.tx_ring))
        self.rx_size = rx_size
        self.rx_gpa = [self.gmem.alloc(rx_size) for _ in range(rx_bufs)]
        for gpa in self.rx_gpa:
            self.rx_ring.add_chain([Buf(gpa, rx_size, writable=True)])
        self.tx = fastpath.TxFastPath(self.txq, GUEST, 64)
        self.rx = fastpath.RxFastPath(self.rxq)
        assert self.tx.attach_rx(self.rx, lambda: -1, 256 * 1024, 16)
        self.host, self.peer = socket.socketpair()  # host: vsproxy's end; peer: the host program
        self.host.setblocking(False)
        self.peer.setblocking(False)
        self.slot = -1

    def lend(self, *, rx_cnt: int = 0, fwd_cnt: int = 0, adv_fwd_cnt: int = 0, tx_cnt: int = 0,
             peer_buf_alloc: int = BUF_ALLOC, peer_fwd_cnt: int = 0, flags: int = lending.OWN_F_WAIT) -> None:
        hdr = H.pack(2, GUEST, HOST_PORT, PORT, 0, 1, H.Op.RW, 0, BUF_ALLOC, fwd_cnt)
        self.slot = self.tx.own("conn", KEY, self.host.fileno(), tx_cnt, peer_buf_alloc, peer_fwd_cnt, hdr, flags,
                                (BUF_ALLOC, rx_cnt, fwd_cnt, adv_fwd_cnt))
        assert self.slot >= 0

    def send_rw(self, payload: bytes, *, fwd_cnt: int = 0, buf_alloc: int = BUF_ALLOC, src_port: int = PORT) -> None:
        hdr = H.pack(GUEST, 2, src_port, HOST_PORT, len(payload), 1, H.Op.RW, 0, buf_alloc, fwd_cnt)
        self.tx_ring.add_chain([Buf(self._buf(hdr), H.HDR_SIZE), Buf(self._buf(payload), len(payload))])

    def send_update(self, *, fwd_cnt: int, buf_alloc: int = BUF_ALLOC) -> None:
        hdr = H.pack(GUEST, 2, PORT, HOST_PORT, 0, 1, H.Op.CREDIT_UPDATE, 0, buf_alloc, fwd_cnt)
        self.tx_ring.add_chain([Buf(self._buf(hdr), H.HDR_SIZE)])

    def _buf(self, data: bytes) -> int:
        gpa = self.gmem.alloc(len(data))
        self.gmem.write(gpa, data)
        return gpa

    def to_guest(self) -> list[tuple[H.Header, bytes]]:
        """Every packet C wrote to the rx ring (published), as the guest reads it."""
        out = []
        for i in range(self.rx_ring.used_idx()):
            head, length = self.rx_ring.read_used(i)
            raw = self.gmem.read(self.rx_gpa[head], length)
            out.append((H.unpack(raw[: H.HDR_SIZE]), raw[H.HDR_SIZE:]))
        return out

    def host_got(self) -> bytes:
        out = b""
        while True:
            try:
                b = self.peer.recv(1 << 20)
            except BlockingIOError:
                return out
            if not b:
                return out
            out += b

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        self.host.close()
        self.peer.close()
        self.dmem.close()
        self.gmem.close()  # the memfd: a hypothesis test makes hundreds of these
