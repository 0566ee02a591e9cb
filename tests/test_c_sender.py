"""C sends a lent connection's guest data to its host socket (OWN_F_TX), with plain rings:
one guest memory holding an rx and a tx ring, a TxFastPath attached to an RxFastPath, and a
socketpair as the host socket. What C consumed, what it wrote to the rx ring, what reached the
socket and what it gave back are checked byte for byte."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from ringkit import BUF_ALLOC, GUEST, HOST_PORT, PORT, Rings

from vsproxy.fastpath import CreditItem, Run, Tail
from vsproxy.vsock import header as H
from vsproxy.vsock import lending
from vsproxy.vsock.lending import OwnedBack

pytestmark = pytest.mark.c_paths


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
    assert back.why == lending.OWN_BLOCKED and back.ahead == tail.total
    assert (back.rx_cnt, back.fwd_cnt, back.counts.tx_bytes) == (len(data), len(data), len(data))


def test_a_run_past_the_credit_we_gave_goes_to_python_untouched(rings: Rings) -> None:
    rings.lend(rx_cnt=60000, fwd_cnt=60000, adv_fwd_cnt=0)  # the guest was told of none of it
    rings.send_rw(b"x" * 8000)  # 60000 + 8000 > 64 KiB
    (run,) = rings.tx.batch()
    assert isinstance(run, Run) and run.total == 8000 and rings.host_got() == b""
    ((_, back),) = rings.tx.released
    assert back.why == lending.OWN_GUEST and back.rx_cnt == 60000 and back.counts.tx_bytes == 0


def test_a_socket_error_drops_the_run_with_the_connection(rings: Rings) -> None:
    rings.lend()
    rings.peer.close()
    rings.send_rw(b"x" * 100)
    assert rings.tx.batch() == [] and len(rings.tx.consumed) == 1
    ((_, back),) = rings.tx.released
    assert back.why == lending.OWN_ERROR and back.err != 0


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
    assert isinstance(back, OwnedBack) and back.why == lending.OWN_LIMIT
    # two rx buffers of 4096 bytes, headers included, filled the reopened 4 KiB window
    assert (back.tx_cnt, back.counts.packets, back.counts.bytes, back.counts.credit_items) == (8192, 2, 4096, 0)
    assert rings.tx._ctx.owned == 0  # counted once
