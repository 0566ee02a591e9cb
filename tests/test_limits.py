"""Limits and the last line of defence, with plain objects: the core's connection and
pending limits, the default shares of the file limit, rate-limited logging, cancellable
timers, the loop's fault handling, a listener paused by EMFILE, capture rotation without
descriptors."""

from __future__ import annotations

import errno
import gc
import io
import logging
import os
import socket
import time
import weakref
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vsock_core import FakePeer, Harness

from vsproxy import limits
from vsproxy.endpoints.listeners import ACCEPT_PAUSE, Acceptor
from vsproxy.limits import RATE_BURST, default_limits, fds_needed, ratelog
from vsproxy.loop import Loop
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import State
from vsproxy.vsock.core import CONNECT_TIMEOUT, SHUTDOWN_TIMEOUT
from vsproxy.vsock.header import Op


# -- the core's limits ------------------------------------------------------------------------
def limited(max_connections: int = 1 << 16, max_pending: int = 1 << 16) -> Harness:
    t = Harness()
    t.core.max_connections = max_connections
    t.core.max_pending = max_pending
    return t


def test_guest_requests_past_max_connections_get_rst_and_are_counted() -> None:
    t = limited(max_connections=3)
    for port in (1, 2, 3):
        t.send(Op.REQUEST, dst_port=port)
    for conn in list(t.core.conns.values()):
        t.core.peer_connected(conn)
    t.drain()
    t.send(Op.REQUEST, dst_port=4)
    ((h, _),) = t.drain()
    assert (h.op, h.src_port) == (Op.RST, 4) and len(t.core.conns) == 3
    c = t.core.counters
    assert c.limit_refused == 1 and c.connections_refused == 1 and c.drops == {"too-many-connections": 1}
    t.send(Op.RST, dst_port=2)  # the guest closes one: the next fits
    t.send(Op.REQUEST, dst_port=5)
    assert len(t.core.conns) == 3 and c.limit_refused == 1


def test_a_closed_connection_still_flushing_to_the_host_holds_its_place_until_it_is_done() -> None:
    t = Harness(FakePeer(accept=0))  # the host takes nothing: what the guest sent lingers
    t.core.max_connections = 1
    t.open()
    t.send(Op.RW, payload=b"bytes the host has not taken")
    t.send(Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    assert not t.core.conns and t.core.lingering() == 1
    t.drain()
    t.send(Op.REQUEST, dst_port=9)
    assert [h.op for h, _ in t.drain()] == [Op.RST]  # its host socket is still open
    t.core.tick(SHUTDOWN_TIMEOUT + 1)
    t.send(Op.REQUEST, dst_port=9)
    assert len(t.core.conns) == 1


def test_connects_past_max_pending_get_rst_until_one_completes() -> None:
    t = limited(max_pending=2)
    t.send(Op.REQUEST, dst_port=1)
    t.send(Op.REQUEST, dst_port=2)
    t.send(Op.REQUEST, dst_port=3)
    assert [h.op for h, _ in t.drain()] == [Op.RST]
    assert t.core.counters.drops == {"too-many-pending": 1} and t.core.pending == 2
    t.core.peer_connected(t.core.conns[(H.Type.STREAM, 40000, 2, 1)])
    assert t.core.pending == 1
    t.send(Op.REQUEST, dst_port=3)
    assert t.core.pending == 2 and len(t.core.conns) == 3


def test_host_connections_past_the_limit_are_refused() -> None:
    t = limited(max_connections=2)
    assert t.core.host_connect(FakePeer(), 7000) is not None
    assert t.core.host_connect(FakePeer(), 7000) is not None
    assert t.core.host_connect(FakePeer(), 7000) is None
    assert t.core.counters.limit_refused == 1 and t.core.pending == 2


OPS = st.lists(st.tuples(st.sampled_from(["request", "connected", "failed", "guest-rst", "tick", "host",
                                          "response", "close-all"]), st.integers(0, 7)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_the_pending_count_is_the_connections_still_connecting_whatever_happens(ops: list[tuple[str, int]]) -> None:
    t = limited(max_connections=6, max_pending=4)
    now = 0.0
    for op, k in ops:
        conns = list(t.core.conns.values())
        conn = conns[k % len(conns)] if conns else None
        if op == "request":
            t.send(Op.REQUEST, dst_port=k)
        elif op == "connected" and conn is not None:
            t.core.peer_connected(conn)
        elif op == "failed" and conn is not None:
            t.core.peer_failed(conn, "test")
        elif op == "guest-rst" and conn is not None:
            t.core.guest_packet(*_to(conn, Op.RST))
        elif op == "response" and conn is not None:
            t.core.guest_packet(*_to(conn, Op.RESPONSE))
        elif op == "tick":
            now += CONNECT_TIMEOUT * k / 4
            t.core.tick(now)
        elif op == "host":
            t.core.host_connect(FakePeer(), 7000 + k)
        elif op == "close-all":
            t.core.close_all()
        t.drain()
        waiting = [c for c in t.core.conns.values() if c.state in (State.CONNECTING, State.REQUESTED)]
        assert t.core.pending == len(waiting) <= 4
        assert len(t.core.conns) <= 6


def _to(conn: object, op: int) -> tuple[bytes, list[memoryview], int]:
    """A packet from the guest on ``conn`` (either direction's connection)."""
    c = conn  # Connection: guest_port is the guest's end
    hdr = H.pack(5, c.peer_cid, c.guest_port, c.peer_port, 0, c.type, op, 0, 65536, 0)  # type: ignore[attr-defined]
    return hdr, [], 0


# -- the default shares ---------------------------------------------------------------------------
@given(st.integers(1024, 1 << 21), st.integers(1, 16))
def test_default_limits_keep_every_device_together_below_the_file_limit(nofile: int, devices: int) -> None:
    shares = [default_limits(nofile, devices)] * devices
    assert fds_needed(shares) <= nofile
    x = shares[0]
    assert 1 <= x.max_pending <= x.max_connections and x.max_handshakes >= 2


def test_default_limits_leave_a_busy_guest_room_at_common_file_limits() -> None:
    assert default_limits(1024, 1).max_connections == 820  # a shell's soft limit, one guest (README)
    assert default_limits(524288, 4).max_connections == 65536  # systemd's hard limit: the cap
    assert default_limits(524288, 4).max_handshakes == 1024


# -- rate-limited logging -----------------------------------------------------------------------
def test_ratelog_passes_a_burst_then_counts_and_reports_what_it_left_out(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    limits.reset_ratelog()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    lg = logging.getLogger("vsproxy.test.ratelog")
    with caplog.at_level(logging.INFO, logger="vsproxy.test.ratelog"):
        logged = [ratelog(lg, logging.INFO, "k", "line %d", i) for i in range(100)]
        assert sum(logged) == RATE_BURST
        assert ratelog(lg, logging.INFO, "other kind", "another")  # kinds are counted apart
        now[0] += limits.RATE_INTERVAL
        assert ratelog(lg, logging.INFO, "k", "later")
    texts = [r.getMessage() for r in caplog.records]
    assert texts[:RATE_BURST] == [f"line {i}" for i in range(RATE_BURST)]
    assert f"k: {100 - RATE_BURST} similar messages left out in the last 5 s" in texts
    assert texts[-1] == "later"
    limits.reset_ratelog()


# -- the loop: cancellable timers, faults -----------------------------------------------------------
@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


class Held:
    pass


def test_a_cancelled_timer_never_runs_and_lets_go_of_what_it_held(loop: Loop) -> None:
    ran: list[str] = []
    held = Held()
    ref = weakref.ref(held)
    h = loop.call_later(0.0, lambda held=held: ran.append(type(held).__name__))  # type: ignore[misc]
    del held
    h.cancel()
    gc.collect()
    assert ref() is None  # the handshake (here: Held) is freed at cancel, not at the deadline
    loop.call_later(0.0, lambda: ran.append("other"))
    loop.run_once(0.01)
    assert ran == ["other"] and loop.pending_timers() == 0


def test_a_flood_of_cancelled_timers_does_not_accumulate(loop: Loop) -> None:
    for _ in range(20000):
        loop.call_later(5.0, lambda: None).cancel()
    assert loop.pending_timers() == 0 and len(loop._timers) < 1000


def test_an_exception_in_a_callback_goes_to_its_owner_and_the_loop_goes_on(loop: Loop) -> None:
    class Owner:
        faults: list[Exception] = []

        def on_read(self) -> None:
            raise ValueError("boom")

        def on_fault(self, exc: Exception) -> None:
            self.faults.append(exc)
            loop.forget(a.fileno())

    a, b = socket.socketpair()
    owner = Owner()
    loop.set_reader(a.fileno(), owner.on_read)
    ran: list[int] = []
    def zero_division() -> None:
        print(1 / 0)

    def index_error() -> None:
        print([][0])

    loop.call_soon(zero_division)
    loop.call_soon(lambda: ran.append(1))
    loop.call_later(0.0, index_error)
    loop.call_later(0.0, lambda: ran.append(2))
    b.send(b"x")
    loop.run_once(0.5)
    loop.run_once(0.01)
    assert [type(e) for e in owner.faults] == [ValueError] and sorted(ran) == [1, 2]
    assert loop.health.faults == 3
    a.close()
    b.close()


def test_a_reader_that_fails_with_no_owner_to_recover_it_is_taken_off_the_loop(loop: Loop) -> None:
    a, b = socket.socketpair()
    calls: list[int] = []

    def bad() -> None:
        calls.append(1)
        raise RuntimeError("always")

    loop.set_reader(a.fileno(), bad)
    b.send(b"x")
    for _ in range(5):
        loop.run_once(0.01)
    assert calls == [1] and a.fileno() not in loop._cbs  # no busy loop on a level-triggered fd
    a.close()
    b.close()


# -- a listener out of descriptors ----------------------------------------------------------------
class EmfileOnce(socket.socket):
    fail = 1

    def accept(self) -> tuple[socket.socket, object]:
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().accept()


def test_a_listener_out_of_descriptors_pauses_instead_of_spinning_and_resumes(loop: Loop, workdir: str) -> None:
    path = os.path.join(workdir, "l.sock")
    srv = EmfileOnce(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    srv.setblocking(False)
    got: list[socket.socket] = []
    acc = Acceptor(srv, loop, "test listener", lambda s, _a: got.append(s))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    loop.run_once(0.5)
    assert acc.paused is not None and loop.health.accept_pauses == 1 and loop.health.fd_exhausted == 1
    wakes = 0
    start = time.monotonic()
    while not got and time.monotonic() - start < 2:
        loop.run_once(0.5)
        wakes += 1
    assert len(got) == 1 and time.monotonic() - start >= ACCEPT_PAUSE * 0.9
    assert wakes <= 3  # it slept through the pause instead of waking for the waiting connection
    for s in (*got, client):
        s.close()
    acc.close()


# -- capture rotation without descriptors ------------------------------------------------------------
def test_capture_rotation_out_of_descriptors_keeps_writing_the_current_file(workdir: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from vsproxy.capture import format as fmt
    from vsproxy.capture import writer as wmod
    from vsproxy.capture.reader import records

    real_open = open
    opened: list[str] = []

    def fake_open(path: str, *a: object, **kw: object) -> object:
        if opened:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        opened.append(path)
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(wmod, "open", fake_open, raising=False)
    path = os.path.join(workdir, "r.pcapng")
    w = wmod.CaptureWriter(wmod.CaptureOptions(path, rotate_bytes=2000), ["dev"])
    for i in range(40):
        h = H.pack(5, 2, 1, 2, 100, 1, H.Op.RW, 0, 0, i)
        head, body = fmt.vsockmon_parts(h, bytes([i]) * 100)
        w.commit(b"".join(fmt.pcapng_epb_parts(0, 1.0, head, body, inbound=True)), 1)
    w.close()
    with real_open(opened[0], "rb") as f:
        recs = list(records(io.BytesIO(f.read())))
    assert [H.unpack(r.frame, 32).fwd_cnt for r in recs] == list(range(40))  # nothing lost
    assert w.counters.rotate_failed >= 1 and w.counters.packets == 40
