"""C sends a lent connection's guest data to its host socket (OWN_F_TX), with plain rings:
one guest memory holding an rx and a tx ring, a TxFastPath attached to an RxFastPath, and a
socketpair as the host socket. What C consumed, what it wrote to the rx ring, what reached the
socket and what it gave back are checked byte for byte."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vsproxy import fastpath
from vsproxy.fastpath import CreditItem, OwnedBack, Run, Tail
from vsproxy.memory import GuestMemory as DeviceMemory
from vsproxy.simguest.memory import GuestMemory
from vsproxy.simguest.ring import Buf, SplitRing
from vsproxy.virtq import SplitQueue
from vsproxy.vsock import header as H

GUEST, PORT, HOST_PORT = 5, 1000, 5000
KEY = (1, PORT, 2, HOST_PORT)
BUF_ALLOC = 65536


class Rings:
    def __init__(self, num: int = 64, rx_bufs: int = 8, rx_size: int = 4096) -> None:
        self.gmem = GuestMemory(8 << 20)
        self.rx_ring = SplitRing(self.gmem, 0, num, indirect=True, event_idx=True)
        self.tx_ring = SplitRing(self.gmem, 1, num, indirect=True, event_idx=True)
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
             peer_buf_alloc: int = BUF_ALLOC, peer_fwd_cnt: int = 0, flags: int = fastpath.OWN_F_WAIT) -> None:
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


@pytest.fixture
def rings() -> Iterator[Rings]:
    r = Rings()
    yield r
    r.close()


def test_a_run_is_sent_from_guest_memory_and_its_chains_consumed(rings: Rings) -> None:
    rings.lend()
    payloads = [bytes([i]) * 3000 for i in range(4)]
    for p in payloads:
        rings.send_rw(p)
    items = rings.tx.batch()
    assert items == [] and len(rings.tx.consumed) == 4 and rings.tx.released == []
    assert rings.host_got() == b"".join(payloads)
    back = rings.tx.take_back(rings.slot)
    assert (back.rx_cnt, back.fwd_cnt, back.ahead, back.counts.tx_packets, back.counts.tx_bytes, back.counts.sends) == (
        12000, 12000, 0, 4, 12000, 1)


def test_the_update_a_run_makes_due_is_written_to_the_rx_ring_with_our_counts(rings: Rings) -> None:
    rings.lend(rx_cnt=100, fwd_cnt=100, adv_fwd_cnt=100)
    rings.send_rw(b"a" * 20000)  # past a quarter of the 64 KiB window: an update is due
    rings.tx.batch()
    ((hdr, payload),) = rings.to_guest()
    assert (hdr.op, hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port, hdr.len) == (
        H.Op.CREDIT_UPDATE, 2, GUEST, HOST_PORT, PORT, 0)
    assert (hdr.buf_alloc, hdr.fwd_cnt) == (BUF_ALLOC, 20100) and payload == b""
    rings.send_rw(b"b" * 1000)  # 1000 outstanding: no update
    rings.tx.batch()
    assert len(rings.to_guest()) == 1
    back = rings.tx.take_back(rings.slot)
    assert (back.rx_cnt, back.fwd_cnt, back.adv_fwd_cnt, back.counts.updates_sent) == (21100, 21100, 20100, 1)


def test_a_socket_that_takes_part_gives_back_the_exact_unsent_tail(rings: Rings) -> None:
    rings.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    rings.lend()
    payloads = [bytes([65 + i]) * 20000 for i in range(3)]
    for p in payloads:
        rings.send_rw(p)
    items = rings.tx.batch()
    (tail,) = items
    assert isinstance(tail, Tail)
    got = rings.host_got()
    data = b"".join(payloads)
    assert 0 < len(got) < len(data) and got == data[: len(got)]
    assert tail.total == len(data) - len(got) and b"".join(bytes(s) for s in tail.segments) == data[len(got):]
    assert len(tail.heads) == 3 and rings.tx.consumed == []
    ((_, back),) = rings.tx.released
    assert back.why == fastpath.OWN_BLOCKED and back.ahead == tail.total
    assert (back.rx_cnt, back.fwd_cnt, back.counts.tx_bytes) == (len(data), len(data), len(data))


def test_a_run_past_the_credit_we_gave_goes_to_python_untouched(rings: Rings) -> None:
    rings.lend(rx_cnt=60000, fwd_cnt=60000, adv_fwd_cnt=0)  # the guest was told of none of it
    rings.send_rw(b"x" * 8000)  # 60000 + 8000 > 64 KiB
    (run,) = rings.tx.batch()
    assert isinstance(run, Run) and run.total == 8000 and rings.host_got() == b""
    ((_, back),) = rings.tx.released
    assert back.why == fastpath.OWN_GUEST and back.rx_cnt == 60000 and back.counts.tx_bytes == 0


def test_a_socket_error_drops_the_run_with_the_connection(rings: Rings) -> None:
    rings.lend()
    rings.peer.close()
    rings.send_rw(b"x" * 100)
    assert rings.tx.batch() == [] and len(rings.tx.consumed) == 1
    ((_, back),) = rings.tx.released
    assert back.why == fastpath.OWN_ERROR and back.err != 0


def test_a_run_that_gives_the_connection_back_leaves_the_next_update_to_python(rings: Rings) -> None:
    """A run whose credit opens the guest's window makes C read host data into the rx ring;
    a guest that must be asked for credit then goes back to Python. The CREDIT_UPDATE after
    it in the same batch is Python's: C must not take it for a connection it gave back."""
    rings.lend(tx_cnt=4096, peer_buf_alloc=4096, peer_fwd_cnt=0, flags=0)  # window shut, not WAIT
    rings.peer.sendall(b"h" * 50000)  # host data waiting
    rings.send_rw(b"g" * 100, fwd_cnt=4096, buf_alloc=4096)  # the guest consumed everything
    rings.send_update(fwd_cnt=8192, buf_alloc=4096)
    items = rings.tx.batch()
    assert [type(i) for i in items] == [CreditItem]
    assert rings.host_got() == b"g" * 100
    ((_, back),) = rings.tx.released
    assert isinstance(back, OwnedBack) and back.why == fastpath.OWN_LIMIT
    # two rx buffers of 4096 bytes, headers included, filled the reopened 4 KiB window
    assert (back.tx_cnt, back.counts.packets, back.counts.bytes, back.counts.credit_items) == (8192, 2, 4096, 0)
    assert rings.tx._ctx.owned == 0  # counted once
