"""Close and 4-tuple reuse as a kernel-to-kernel vsock link has them (Linux's
virtio_transport_common.c): what one guest shuts, SHUTDOWN RCV and SEND each, reaches its peer at
once, right after the data it sent, in the same pass over the rx ring; a guest whose close vsproxy
answered with RST may reuse its 4-tuple at once, the new connection waiting for the old hop.

The ordering and the hold are pinned on the core with plain records (no timing); the sibling
cases run two simulated guests through a real vsproxy."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable

import pytest
from helpers import hybrid_connect
from test_routing import start_multi
from test_vsock_core import GPORT, GUEST, Harness

from vsproxy.endpoints.sibling import SiblingEnd, pair
from vsproxy.simguest import SimGuest
from vsproxy.simguest.sockets import GuestSocket
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.core import CONNECT_TIMEOUT
from vsproxy.vsock.header import Op

# -- the core, with a sibling's end as the peer (its notifications queued, not run) -------------


def sibling_core() -> tuple[Harness, SiblingEnd, SiblingEnd, list[Callable[[], None]]]:
    """A core whose guest (GUEST:GPORT) connected out to a sibling: ``far`` is the other guest's
    end of the pair, ``near`` this connection's peer."""
    notes: list[Callable[[], None]] = []
    near, far = pair("sibling:b", "sibling:a", notes.append)
    t = Harness()
    t.peer = near  # type: ignore[assignment]
    conn = t.open()
    near.attach(_NoHooks(), conn)  # the core's hooks are not needed: the test drives it
    near.watch_read(True)
    return t, near, far, notes


class _NoHooks:
    def readable(self, conn: Connection) -> None: ...
    def writable(self, conn: Connection) -> None: ...
    def connected(self, conn: Connection) -> None: ...
    def failed(self, conn: Connection, reason: str) -> None: ...
    def aborted(self, conn: Connection) -> None: ...
    def held(self, conn: Connection, n: int) -> None: ...


def test_a_siblings_last_bytes_and_its_close_reach_the_guest_in_one_pass_as_shutdown_3() -> None:
    t, _near, far, _ = sibling_core()
    (conn,) = t.core.conns.values()
    far.send([b"abc"])  # the other guest wrote, then closed
    far.close(reset=False)
    t.core.peer_readable(conn)
    got = t.drain()  # one fill_rx pass
    assert [(h.op, h.len, h.flags) for h, _ in got] == [(Op.RW, 3, 0), (Op.SHUTDOWN, 0, H.SHUTDOWN_BOTH)]
    assert got[0][1] == b"abc"
    assert conn.host_eof and t.drain() == []  # nothing more, and no second SHUTDOWN


def test_a_siblings_half_close_is_relayed_as_send_alone_and_its_shutdown_rcv_alone() -> None:
    t, _near, far, _ = sibling_core()
    (conn,) = t.core.conns.values()
    far.shutdown_read()  # the other guest receives no more: this guest's sends must fail
    t.core.peer_readable(conn)
    assert [(h.op, h.flags) for h, _ in t.drain()] == [(Op.SHUTDOWN, H.SHUTDOWN_RCV)]
    far.send([b"xy"])
    far.shutdown_write()  # then sends no more
    t.core.peer_readable(conn)
    assert [(h.op, h.len, h.flags) for h, _ in t.drain()] == [(Op.RW, 2, 0), (Op.SHUTDOWN, 0, H.SHUTDOWN_SEND)]


def test_the_guests_shutdown_rcv_reaches_the_far_side_and_its_send_alone_too() -> None:
    t, _near, far, _ = sibling_core()
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_RCV)
    assert far.far_shutdown() == H.SHUTDOWN_RCV and not far.eof
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
    assert far.far_shutdown() == H.SHUTDOWN_BOTH  # nothing left in its inbox: the EOF is there


def held_setup() -> tuple[Harness, SiblingEnd, Connection]:
    """A sibling's connection into this guest from 9:777, established; then the far guest
    closes, before this core has relayed it (its notification not yet run)."""
    t = Harness()
    near, far = pair("sibling:a", "sibling:b", lambda f: None)
    old = t.core.host_connect(near, GPORT, src_cid=9, src_port=777)
    assert old is not None
    t.drain()
    t.core.guest_packet(H.pack(GUEST, 9, GPORT, 777, 0, 1, Op.RESPONSE, 0, 262144, 0), [], 0)
    assert old.state is State.ESTABLISHED
    near.attach(_NoHooks(), old)
    near.watch_read(True)
    far.send([b"bye"])
    far.close(reset=False)  # the far guest wrote and closed
    return t, near, old


def guest_says(t: Harness, op: int) -> None:
    t.core.guest_packet(H.pack(GUEST, 9, GPORT, 777, 0, 1, op, 0, 262144, 0), [], 0)


def test_a_reused_4_tuple_waits_for_the_old_hop_to_close_then_gets_its_request_and_the_old_rst_is_not_its() -> None:
    t, _, old = held_setup()
    again, _far2 = pair("sibling:a", "sibling:b", lambda f: None)
    new = t.core.host_connect(again, GPORT, src_cid=9, src_port=777)
    assert new is not None and new is not old
    assert t.core.conns[old.key] is old  # held: no REQUEST while the old one is there
    # a third on the same tuple meanwhile is refused
    assert t.core.host_connect(pair("x", "y", lambda f: None)[0], GPORT, src_cid=9, src_port=777) is None
    # this core relays the close: the last bytes, SHUTDOWN 3, and at once the waiting REQUEST
    t.core.peer_readable(old)
    got = t.drain()
    assert [(h.op, h.flags, h.len) for h, _ in got] == [(Op.RW, 0, 3), (Op.SHUTDOWN, 3, 0), (Op.REQUEST, 0, 0)]
    assert [(h.src_cid, h.src_port, h.dst_port) for h, _ in got] == [(9, 777, GPORT)] * 3
    assert t.core.conns[new.key] is new and new.state is State.REQUESTED and old.state is State.CLOSED
    # the guest's kernel answers the SHUTDOWN 3 with RST (nothing unread): the old one's, not the new one's
    guest_says(t, Op.RST)
    assert t.core.conns[new.key].state is State.REQUESTED
    guest_says(t, Op.RESPONSE)
    assert t.core.conns[new.key].state is State.ESTABLISHED
    guest_says(t, Op.RST)  # a later RST on the tuple is the new connection's again
    assert new.key not in t.core.conns


def test_what_the_guest_sent_before_it_saw_shutdown_3_is_ignored_not_reset_until_its_rst() -> None:
    """A closing kernel socket ignores packets on its way out; vsproxy, whose side is gone at
    once, does too: no RST for the guest's in-flight data or credit update, counted instead."""
    t, _, old = held_setup()
    t.core.peer_readable(old)
    assert [(h.op, h.flags) for h, _ in t.drain()] == [(Op.RW, 0), (Op.SHUTDOWN, 3)]
    t.core.guest_packet(H.pack(GUEST, 9, GPORT, 777, 5, 1, Op.RW, 0, 262144, 0), [memoryview(b"late!")], 5)
    guest_says(t, Op.CREDIT_UPDATE)
    assert t.drain() == [] and t.core.counters.drops["after-close"] == 2
    guest_says(t, Op.RST)  # the guest's answer: the old connection is over for it too
    assert t.drain() == []
    guest_says(t, Op.CREDIT_UPDATE)  # past it, a packet for no connection gets RST again
    assert [h.op for h, _ in t.drain()] == [Op.RST]


def test_a_new_host_connection_on_a_closed_tuple_gets_the_guests_answers_while_the_old_rst_never_came() -> None:
    """The guest kept the old socket (bytes unread), so no RST answered our SHUTDOWN 3; a sibling
    connects again from the same port: the guest's RESPONSE is the new connection's."""
    t, _, old = held_setup()
    t.core.peer_readable(old)
    t.drain()
    new = t.core.host_connect(pair("sibling:a", "sibling:b", lambda f: None)[0], GPORT, src_cid=9, src_port=777)
    assert new is not None and [h.op for h, _ in t.drain()] == [Op.REQUEST]
    guest_says(t, Op.RESPONSE)
    assert new.state is State.ESTABLISHED and t.core.counters.drops.get("after-close", 0) == 0


def test_a_guest_that_closes_with_shutdown_after_the_far_sides_close_gets_rst_at_once() -> None:
    """Linux answers a peer's SHUTDOWN 3 with RST; a guest that sends SHUTDOWN 3 instead would wait
    for a kernel peer's close timeout (8 s): vsproxy answers it with RST at once."""
    t, _, old = held_setup()
    t.core.peer_readable(old)
    t.drain()
    t.core.guest_packet(H.pack(GUEST, 9, GPORT, 777, 0, 1, Op.SHUTDOWN, H.SHUTDOWN_BOTH, 262144, 3), [], 0)
    assert [(h.op, h.src_cid, h.src_port, h.dst_port) for h, _ in t.drain()] == [(Op.RST, 9, 777, GPORT)]


def test_without_a_waiting_connection_the_tuple_is_free_once_shutdown_3_is_queued() -> None:
    t, _, old = held_setup()
    t.core.peer_readable(old)
    assert [(h.op, h.flags) for h, _ in t.drain()] == [(Op.RW, 0), (Op.SHUTDOWN, 3)]
    assert old.key not in t.core.conns
    fresh = t.core.host_connect(pair("a", "b", lambda f: None)[0], GPORT, src_cid=9, src_port=777)
    assert fresh is not None and [h.op for h, _ in t.drain()] == [Op.REQUEST]


def test_a_held_connection_fails_at_its_connect_deadline_when_the_old_hop_stays() -> None:
    t, _, old = held_setup()
    near2, far2 = pair("sibling:a", "sibling:b", lambda f: None)
    notes: list[str] = []
    far2.hooks = _Recorder(notes)
    far2.conn = Connection(1, 1, 1, 1, far2, 65536)
    far2.conn.state = State.CONNECTING
    far2.schedule = lambda f: f()  # its notifications run at once here
    new = t.core.host_connect(near2, GPORT, src_cid=9, src_port=777)
    assert new is not None
    refused = t.core.counters.connections_refused
    t.core.tick(t.core.now + CONNECT_TIMEOUT - 0.1)  # the old hop is never relayed (no pump here)
    assert notes == [] and t.core.next_deadline() is not None
    t.core.tick(t.core.now + 0.2)
    assert notes == ["failed"] and t.core.counters.connections_refused == refused + 1  # the dialler gets RST
    assert t.core.conns[old.key] is old


class _Recorder(_NoHooks):
    def __init__(self, notes: list[str]) -> None:
        self.notes = notes

    def failed(self, conn: Connection, reason: str) -> None:
        self.notes.append("failed")


# -- two simulated guests through a real vsproxy ------------------------------------------------


def siblings(workdir: str) -> tuple[str, str, object]:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a},groups=g", "--vm", f"guest-cid=6,socket={b},groups=g")
    return a, b, vp


def run_b(b: str, body: Callable[[SimGuest], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def main() -> None:
        try:
            with SimGuest(b, timeout=15) as g:
                body(g)
        except BaseException as e:  # reported by the test
            errors.append(e)

    t = threading.Thread(target=main, daemon=True)
    t.start()
    return t, errors


@pytest.mark.parametrize("closer", ["client", "server"])
def test_a_sibling_that_sends_and_closes_is_seen_closed_both_ways_right_after_its_data(
        workdir: str, closer: str) -> None:
    a, b, vp = siblings(workdir)
    seen: dict[str, object] = {}
    listening, done = threading.Event(), threading.Event()

    def b_main(g: SimGuest) -> None:
        lst = g.listen(7000)
        listening.set()
        c = lst.accept(timeout=15)
        if closer == "server":
            c.sendall(b"abc")
            c.close()
        else:
            seen["data"] = c.recv_exactly(3, timeout=15)
            g.driver.deadline_wait(lambda: c.conn.peer_shutdown == H.SHUTDOWN_BOTH, 10, "the peer's close")
            seen["flags"] = [h.flags for h, _ in g.received_raw if h.op == Op.SHUTDOWN and h.src_port == c.peer[1]]
        done.wait(15)

    t, errors = run_b(b, b_main)
    try:
        assert listening.wait(15)
        with SimGuest(a, timeout=15) as ga:
            s = ga.connect(7000, cid=6)
            if closer == "client":
                s.sendall(b"abc")
                s.close()
            else:
                seen["data"] = s.recv_exactly(3, timeout=15)
                ga.driver.deadline_wait(lambda: s.conn.peer_shutdown == H.SHUTDOWN_BOTH, 10, "the peer's close")
                seen["flags"] = [h.flags for h, _ in ga.received_raw
                                 if h.op == Op.SHUTDOWN and h.dst_port == s.local_port]
            done.set()
        t.join(20)
        assert not errors, errors
        assert seen["data"] == b"abc"
        # one SHUTDOWN, both flags: the closer's close() as its kernel sends it (a send now fails)
        assert seen["flags"] == [H.SHUTDOWN_BOTH]
    finally:
        done.set()
        vp.stop()  # type: ignore[attr-defined]


def test_a_client_reconnects_from_the_same_port_while_the_first_accepted_socket_is_open(workdir: str) -> None:
    a, b, vp = siblings(workdir)
    listening, first_read, second = threading.Event(), threading.Event(), threading.Event()
    got: list[bytes] = []

    def b_main(g: SimGuest) -> None:
        lst = g.listen(7000)
        listening.set()
        c1 = lst.accept(timeout=15)
        got.append(c1.recv_exactly(1, timeout=15))
        first_read.set()
        c2 = lst.accept(timeout=15)  # c1 is still open here
        got.append(c2.recv_exactly(1, timeout=15))
        assert c2.peer == c1.peer  # the same 4-tuple
        second.set()
        c2.close()

    t, errors = run_b(b, b_main)
    try:
        assert listening.wait(15)
        with SimGuest(a, timeout=15) as ga:
            s = ga.connect(7000, cid=6, local_port=40000)
            s.sendall(b"1")
            assert first_read.wait(15)
            s.close()
            s2 = ga.connect(7000, cid=6, local_port=40000)  # at once, from the same port
            s2.sendall(b"2")
            assert second.wait(15)
            s2.close()
        t.join(20)
        assert not errors, errors
        assert got == [b"1", b"2"]
    finally:
        vp.stop()  # type: ignore[attr-defined]


# -- host sockets: what their close says, as a kernel peer's would -------------------------------


def guest_shutdowns(g: SimGuest, s: GuestSocket) -> list[int]:
    return [h.flags for h, _ in g.received_raw if h.op == Op.SHUTDOWN and h.dst_port == s.local_port]


@pytest.mark.parametrize("how", ["close", "shut_wr"])
def test_a_unix_clients_close_reaches_the_guest_as_shutdown_3_and_its_half_close_as_send_alone(
        workdir: str, how: str) -> None:
    """A hybrid client that sends and close()s: the guest sees its bytes, then SHUTDOWN 3 (a
    send now fails, as on a kernel link); one that only shuts its write side: SHUTDOWN SEND, and
    the guest's answer still reaches it."""
    a, uds = os.path.join(workdir, "a.sock"), os.path.join(workdir, "h.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a},uds-path={uds}")
    try:
        with SimGuest(a, timeout=15) as g:
            host, gs = hybrid_connect(uds, g, 7000)
            host.sendall(b"abc")
            if how == "close":
                host.close()
            else:
                host.shutdown(socket.SHUT_WR)
            assert gs.recv_exactly(3, timeout=10) == b"abc"
            want = H.SHUTDOWN_BOTH if how == "close" else H.SHUTDOWN_SEND
            g.driver.deadline_wait(lambda: gs.conn.peer_shutdown == want, 10, "the host's close")
            assert guest_shutdowns(g, gs) == [want]
            if how == "shut_wr":
                gs.sendall(b"reply")
                gs.close()
                got = b""
                while chunk := host.recv(64):
                    got += chunk
                assert got == b"reply"
                host.close()
    finally:
        vp.stop()


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_a_host_server_that_answers_and_closes_is_seen_closed_as_far_as_its_socket_can_tell(
        workdir: str, family: str) -> None:
    """A unix server's close() shuts both ways (POLLHUP): SHUTDOWN 3. TCP's FIN says nothing of
    the read side: SHUTDOWN SEND, the one thing vsproxy can know."""
    a, uds = os.path.join(workdir, "a.sock"), os.path.join(workdir, "h.sock")
    if family == "unix":
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{uds}_5000")
        extra = f"uds-path={uds}"
    else:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        extra = f"forward=5000=tcp:127.0.0.1:{srv.getsockname()[1]}"
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.sendall(b"hello")
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a},{extra}")
    try:
        with SimGuest(a, timeout=15) as g:
            s = g.connect(5000, cid=2)
            assert s.recv_exactly(5, timeout=10) == b"hello"
            want = H.SHUTDOWN_BOTH if family == "unix" else H.SHUTDOWN_SEND
            g.driver.deadline_wait(lambda: s.conn.peer_shutdown == want, 10, "the server's close")
            assert guest_shutdowns(g, s) == [want]
            s.close()
        t.join(10)
    finally:
        srv.close()
        vp.stop()
