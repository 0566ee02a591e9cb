"""Read-ahead: while the guest's window of a connection C runs is shut, C reads the host
socket into rx chains it holds without publishing them, and sends them the moment the guest's
credit allows (own_reserve, own_deliver, own_unreserve). With plain rings first, byte for
byte; then through vsproxy and the simulated guest, hash-checked."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from helpers import VsproxyProcess, hybrid_connect, send_then_shut
from hypothesis import given, settings
from hypothesis import strategies as st
from ringkit import GUEST, HOST_PORT, PORT, Rings

from vsproxy.simguest import SimGuest
from vsproxy.simguest.ring import INDIRECT_SLOTS, Buf
from vsproxy.vsock import header as H
from vsproxy.vsock import lending
from vsproxy.vsock.lending import OwnedBack

pytestmark = pytest.mark.c_paths

PAYLOAD = 4096 - H.HDR_SIZE  # what one of the harness's rx buffers holds
SELF = lending.OWN_F_WAIT | lending.OWN_F_SELF  # a guest that sends its updates unasked
Start = Callable[..., VsproxyProcess]
MakeRings = Callable[..., Rings]


@pytest.fixture
def make_rings() -> Iterator[MakeRings]:
    made: list[Rings] = []

    def make(**kw: int) -> Rings:
        made.append(Rings(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def rw_payloads(rings: Rings) -> bytes:
    """The RW payloads the guest got so far, in used-ring order, each header checked."""
    out = b""
    for hdr, payload in rings.to_guest():
        if hdr.op == H.Op.RW:
            assert (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port, hdr.len) == (
                2, GUEST, HOST_PORT, PORT, len(payload))
            out += payload
    return out


def shut_with_chains_held(rings: Rings, data: bytes, window: int) -> None:
    rings.peer.sendall(data)
    rings.lend(peer_buf_alloc=window, flags=SELF)
    assert rings.tx.fill(rings.slot) is False  # C keeps it: the window is shut, it waits for the guest


def test_while_the_window_is_shut_c_holds_rx_chains_with_the_next_bytes_unpublished(make_rings: MakeRings) -> None:
    rings = make_rings(rx_bufs=16)
    data = os.urandom(30000)
    shut_with_chains_held(rings, data, 8192)
    assert rw_payloads(rings) == data[:8192] and rings.rx_ring.used_idx() == 3
    # three more chains taken from the ring (8192 bytes: 4052 + 4052 + 88), none used yet
    assert rings.rxq.last_avail_idx == 6
    assert rings.tx.counts(rings.slot).read_ahead == 8192
    # the held bytes are in the guest's buffers already, after the 8192 sent
    spots = ((3, PAYLOAD), (4, PAYLOAD), (5, 88))
    held = b"".join(rings.gmem.read(rings.rx_gpa[h] + H.HDR_SIZE, n) for h, n in spots)
    assert held == data[8192:16384]


def test_the_held_chains_go_out_in_order_the_moment_the_guest_s_update_comes(make_rings: MakeRings) -> None:
    rings = make_rings(rx_bufs=16)
    data = os.urandom(30000)
    shut_with_chains_held(rings, data, 8192)
    rings.send_update(fwd_cnt=8192, buf_alloc=8192)
    assert rings.tx.batch() == [] and rings.tx.released == []  # C took the update itself
    assert rw_payloads(rings) == data[:16384]
    # and it read ahead again for the next window
    assert rings.rxq.last_avail_idx == rings.rx_ring.used_idx() + 3
    back = rings.tx.take_back(rings.slot)
    assert back.tx_cnt == 16384 and back.counts.read_ahead == 16384
    # what it held comes back for the peer's prebuf; its chains reach the guest as updates
    assert back.prebuf == data[16384:24576]
    updates = [h for h, _ in rings.to_guest() if h.op == H.Op.CREDIT_UPDATE]
    assert len(updates) == 3 and all(h.len == 0 and h.fwd_cnt == back.fwd_cnt for h in updates)
    assert back.counts.updates_sent == 3
    assert rings.rxq.last_avail_idx == rings.rx_ring.used_idx()  # nothing held any more


def test_credit_that_ends_inside_a_held_chain_moves_the_rest_to_the_next_chain_in_order(make_rings: MakeRings) -> None:
    rings = make_rings(rx_bufs=16)
    data = os.urandom(30000)
    shut_with_chains_held(rings, data, 8192)
    rings.send_update(fwd_cnt=5000, buf_alloc=8192)  # 5000 of credit: 4052 + 948 of the next 4052
    rings.tx.batch()
    assert rw_payloads(rings) == data[:8192 + 5000]
    assert [h.len for h, _ in rings.to_guest()][-2:] == [PAYLOAD, 948]
    rings.send_update(fwd_cnt=8192, buf_alloc=8192)  # the rest: 3104 moved, then 88
    rings.tx.batch()
    assert rw_payloads(rings) == data[:16384]
    assert rings.tx.take_back(rings.slot).prebuf == data[16384:24576]


def test_with_no_chain_for_the_rest_c_gives_the_connection_back_and_loses_nothing(make_rings: MakeRings) -> None:
    rings = make_rings(rx_bufs=5)
    data = os.urandom(20000)
    shut_with_chains_held(rings, data, 2 * PAYLOAD)  # 2 chains used, 1 of 3 held, 2 left
    assert rings.rxq.last_avail_idx == 3
    fwd = 0
    for _ in range(2):  # each update ends inside the held chain: a posted chain takes the rest
        fwd += 1000
        rings.send_update(fwd_cnt=fwd, buf_alloc=2 * PAYLOAD)
        rings.tx.batch()
        assert rings.tx.released == []
    fwd += 1000
    rings.send_update(fwd_cnt=fwd, buf_alloc=2 * PAYLOAD)
    rings.tx.batch()  # no chain left for the rest
    ((_, back),) = rings.tx.released
    assert isinstance(back, OwnedBack) and back.why == lending.OWN_SLOW
    got = rw_payloads(rings)
    assert got + back.prebuf == data[: len(got) + len(back.prebuf)]
    assert len(got) == 2 * PAYLOAD + 2000 and back.tx_cnt == len(got)
    assert rings.to_guest()[-1][0].op == H.Op.CREDIT_UPDATE  # the chain it held


def test_half_of_the_posted_chains_stay_for_everything_else(make_rings: MakeRings) -> None:
    rings = make_rings(rx_bufs=6)
    shut_with_chains_held(rings, os.urandom(40000), 4 * PAYLOAD)  # 4 used, 2 posted: 1 held
    assert rings.rxq.last_avail_idx == 5 and rings.tx.counts(rings.slot).read_ahead == PAYLOAD


def test_held_bytes_then_end_of_stream_reach_the_guest_in_that_order(make_rings: MakeRings) -> None:
    rings = make_rings(rx_bufs=16)
    data = os.urandom(6000)
    rings.peer.sendall(data)
    rings.peer.shutdown(socket.SHUT_WR)
    rings.lend(peer_buf_alloc=PAYLOAD, flags=SELF)
    assert rings.tx.fill(rings.slot) is False
    assert rings.tx.counts(rings.slot).read_ahead == 6000 - PAYLOAD
    rings.send_update(fwd_cnt=PAYLOAD, buf_alloc=PAYLOAD)
    rings.tx.batch()
    ((_, back),) = rings.tx.released
    assert back.why == lending.OWN_EOF and back.prebuf == b""
    assert rw_payloads(rings) == data


def _counter(vp: VsproxyProcess, name: str) -> int:
    return int(vp.report().split(f"{name}=")[1].split()[0])


def test_a_guest_that_half_closes_while_c_holds_its_chains_still_gets_every_byte(start_vsproxy: Start,
                                                                                 workdir: str) -> None:
    """The guest stops reading with its window shut (C reads ahead and holds chains), then
    half-closes: Python takes the connection back, the held bytes become the peer's prebuf
    and reach the guest before the socket's, hash-checked."""
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    data = os.urandom(3 << 20)
    with SimGuest(vp.socket_path, buf_alloc=256 * 1024, rx_buf_size=64 * 1024 + 44) as g:
        host, gs = hybrid_connect(uds, g, 6200)
        sender = send_then_shut(host, data)
        got = bytearray(gs.recv_exactly(1 << 20, timeout=30))
        for _ in range(20):
            g.poll(0.01)  # the window shuts; C holds chains for what the host sends next
        assert _counter(vp, "c_pump_read_ahead") > 0
        gs.shutdown_write()
        got += gs.recv_all(timeout=30)
        sender.join()
        assert len(got) == len(data) and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        gs.close()
        host.close()


def test_a_memory_table_resent_while_c_holds_chains_loses_and_repeats_nothing(start_vsproxy: Start,
                                                                               workdir: str) -> None:
    """QEMU may send SET_MEM_TABLE to running rings (memory hot-plug): vsproxy re-creates its
    queues over the new table. The chains C holds go back before the new rx queue reads the used
    index, so the guest sees one consistent used ring and every byte once."""
    from vsproxy.vhost_user import codec
    from vsproxy.vhost_user.codec import ProtocolFeature as PF

    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)
    detached = "bytes it had read ahead go to the guest from Python"
    with SimGuest(vp.socket_path, buf_alloc=256 * 1024, rx_buf_size=64 * 1024 + 44) as g:
        # C holds chains only for 50 ms after the window shuts (then Python asks for credit): a
        # slow machine may miss that moment, so the scenario is tried until it happened, each
        # try checked byte for byte.
        for attempt in range(8):
            data = os.urandom(3 << 20)
            host, gs = hybrid_connect(uds, g, 6201 + attempt)
            try:
                sender = threading.Thread(target=host.sendall, args=(data,))
                sender.start()
                got = bytearray(gs.recv_exactly(1 << 20, timeout=30))
                g.poll(0.005)  # the window shuts and C holds chains
                fe, mem = g.frontend, g.mem
                assert fe is not None
                fe.client.request(codec.Request.SET_MEM_TABLE, codec.encode_mem_table(mem.mem_regions()),
                                  [mem.fd] * len(mem.regions), need_reply=fe._has_pf(PF.REPLY_ACK))
                got += gs.recv_exactly(len(data) - len(got), timeout=10)
                sender.join()
                assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
                assert g.stats.protocol_errors == [] and "memory table" in vp.log()
            finally:
                gs.close()
                host.close()
            if vp.log().count(detached) > 0:
                break
        assert detached in vp.log()


def test_all_connections_together_hold_at_most_half_of_the_ring(make_rings: MakeRings) -> None:
    rings = make_rings(num=64, rx_bufs=64)
    other, other_peer = socket.socketpair()
    try:
        window = 256 * 1024
        fills = []
        for port, host, peer in ((PORT, rings.host, rings.peer), (PORT + 1, other, other_peer)):
            peer.sendall(os.urandom(140000))
            hdr = H.pack(2, GUEST, HOST_PORT, port, 0, 1, H.Op.RW, 0, 65536, 0)
            # one rx buffer of credit left in a 256 KiB window: C fills it, then reads ahead
            slot = rings.tx.own(port, (1, port, 2, HOST_PORT), host.fileno(), window, window, PAYLOAD, hdr, SELF)
            assert rings.tx.fill(slot) is False
            fills.append(rings.tx.counts(slot).read_ahead)
        # the first holds 31 chains (half of the 63 posted); the second only what is left of 32
        assert fills == [31 * PAYLOAD, 1 * PAYLOAD]
    finally:
        other.close()
        other_peer.close()


MEM = 8 << 20  # the harness's guest memory: one region from gpa 0


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([45, 200, 4096, 70000]), min_size=1, max_size=14),
    hostile=st.lists(
        st.tuples(st.integers(0, 15), st.sampled_from([0, MEM - 100, MEM - 4096, MEM, 1 << 40, (1 << 64) - 64]),
                  st.sampled_from([0, 44, 45, 4096, 1 << 20, 0xFFFFFFFF]),
                  st.sampled_from([2, 2 | 1, 2 | 4, 0, 7]), st.integers(0, 20)),
        max_size=4),
    window=st.integers(1, 40000),
    data_len=st.integers(1, 120000),  # what a socketpair holds
    updates=st.lists(st.integers(-5000, 30000), max_size=5),
)
def test_hostile_rx_descriptors_never_lose_repeat_or_misplace_a_byte(
        sizes: list[int], hostile: list[tuple[int, int, int, int, int]], window: int, data_len: int,
        updates: list[int]) -> None:
    """Whatever the guest posts (buffers too small or too big, addresses outside its memory,
    lengths that wrap, chained or indirect flags, heads past the table) and whatever fwd_cnt it
    claims, C uses only Linux-shaped buffers inside the region, each at most once, and every host
    byte reaches the guest or comes back as prebuf, once and in order."""
    rings = Rings(num=16, rx_bufs=0)
    try:
        _hostile_run(rings, sizes, hostile, window, data_len, updates)
    finally:
        rings.close()


def _overlapping(rings: Rings, bufs: list[tuple[int, int]]) -> bool:
    """Do any of the used buffers overlap each other or the rings' own memory (descriptor tables,
    avail and used rings, indirect tables)?"""
    areas = []
    for r in (rings.rx_ring, rings.tx_ring):
        n = r.size
        areas += [(r.desc_gpa, 16 * n), (r.avail_gpa, 6 + 2 * n), (r.used_gpa, 6 + 8 * n)]
        if r.indirect_gpa:
            areas.append((r.indirect_gpa, 16 * INDIRECT_SLOTS * n))
    for i, (a, n) in enumerate(bufs):
        for b, m in areas + bufs[:i]:
            if a < b + m and b < a + n:
                return True
    return False


def _hostile_run(rings: Rings, sizes: list[int], hostile: list[tuple[int, int, int, int, int]], window: int,
                 data_len: int, updates: list[int]) -> None:
    ring = rings.rx_ring
    for size in sizes:
        ring.add_chain([Buf(rings.gmem.alloc(size), size, writable=True)])
    for slot, addr, length, flags, nxt in hostile:  # overwrite descriptors, post heads of any value
        ring.write_desc(slot, addr & 0xFFFFFFFFFFFFFFFF, length, flags, nxt)
        ring.publish_avail(nxt)
    descs = {h: ring.read_desc(h) for h in range(16)}
    posted = [rings.rxq._avail16[2 + (i & 15)] for i in range(ring.avail_idx)]
    data = os.urandom(data_len)
    rings.peer.sendall(data)
    rings.lend(peer_buf_alloc=window, flags=SELF)
    back: OwnedBack | None = None
    r = rings.tx.fill(rings.slot)
    if isinstance(r, OwnedBack):
        back = r
    fwd = 0
    for step in updates:
        if back is not None:
            break
        fwd = (fwd + step) & 0xFFFFFFFF
        rings.send_update(fwd_cnt=fwd, buf_alloc=window)
        rings.tx.batch()
        if rings.tx.released:
            ((_, back),) = rings.tx.released
    if back is None:
        back = rings.tx.take_back(rings.slot)
    used = [ring.read_used(i) for i in range(ring.used_idx())]
    for head, length in used:
        addr, dlen, flags, _ = descs[head]
        assert flags == 2 and H.HDR_SIZE < dlen and addr + dlen <= MEM and H.HDR_SIZE <= length <= dlen
    if len(set(posted)) < len(posted):
        return  # a guest that posts one buffer twice gets what it asked for: the same memory written twice
    if _overlapping(rings, [(descs[h][0], descs[h][1]) for h, _ in used]):
        return  # nor one whose buffers overlap each other or its own rings: C's later writes land in them
    # every chain C took was used by the time it let go (held ones too), each once; not
    # always in the order posted: a chain that takes the rest of a split one goes before later held ones
    assert sorted(h for h, _ in used) == sorted(posted[: len(used)]) and rings.rxq.last_avail_idx == len(used)
    got = b""
    for head, length in used:
        addr = descs[head][0]
        hdr = H.unpack(rings.gmem.read(addr, H.HDR_SIZE))
        assert length == H.HDR_SIZE + hdr.len
        if hdr.op == H.Op.RW:
            got += rings.gmem.read(addr + H.HDR_SIZE, hdr.len)
        else:
            assert hdr.op == H.Op.CREDIT_UPDATE and hdr.len == 0
    assert back.tx_cnt == len(got)
    assert got + back.prebuf == data[: len(got) + len(back.prebuf)]
