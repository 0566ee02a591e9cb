"""Typed snapshots and events of a running proxy, against known traffic from simulated guests:
connection states and credit through a lifecycle, a denial with its rule, a remap shown as
both the alias and the real peer, device events; a snapshot changes nothing and is safe from
another thread."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator

import pytest
from helpers import running, unix_server, wait_for

from vsproxy.app import Proxy, report_lines
from vsproxy.config import Settings, add_vm
from vsproxy.events import Event, EventKind
from vsproxy.simguest import SimGuest
from vsproxy.snapshot import ConnectionInfo, Snapshot, take


@pytest.fixture
def proxy(workdir: str) -> Iterator[Proxy]:
    settings = Settings()
    add_vm(settings, {"name": "A", "guest-cid": 5, "socket": os.path.join(workdir, "a.sock"),
                      "uds-path": os.path.join(workdir, "ha"), "remap": "3=2", "allow-out": "2+3"}, "A")
    add_vm(settings, {"name": "B", "guest-cid": 6, "socket": os.path.join(workdir, "b.sock")}, "B")
    with running(Proxy(settings.devices, settings.policy())) as p:
        yield p


def conns(snap: Snapshot, device: str) -> list[ConnectionInfo]:
    return [c for c in snap.connections if c.device == device]


def events_until(q: object, want: set[EventKind], timeout: float = 10.0) -> list[Event]:
    got: list[Event] = []

    def seen() -> bool:
        got.extend(q.get(0.05))  # type: ignore[attr-defined]
        return want <= {e.kind for e in got}

    wait_for(seen, timeout, f"events {sorted(k.value for k in want)}")
    return got


def test_a_connection_through_its_lifecycle_in_snapshots_and_events(proxy: Proxy, workdir: str) -> None:
    events = proxy.switch.events.subscribe()
    srv = unix_server(os.path.join(workdir, "ha_5000"))  # an echo service
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000)
            s.sendall(b"x" * 1000)
            assert s.recv_exactly(1000, timeout=10) == b"x" * 1000
            snap = proxy.snapshot()  # from this thread, not the loop's
            (c,) = conns(snap, "A")
            assert (c.state, c.type, c.initiator, c.guest_cid, c.peer_cid, c.peer_port) == (
                "established", "stream", "guest", 5, 2, 5000)
            assert (c.real_cid, c.real_port) == (2, 5000) and c.verdict == "allowed" and c.rules
            assert c.to_peer_bytes == 1000 and c.to_guest_bytes == 1000 and c.age >= 0
            assert c.credit.buf_alloc == 1 << 20 and c.credit.peer_buf_alloc == 262144
            assert c.credit.in_flight <= 1000 and c.credit.queued == 0
            a = next(d for d in snap.devices if d.name == "A")
            assert a.frontend and a.running and a.connections == 1 and a.counters.tx_bytes >= 1000
            assert "remap 3=2 (A)" in a.remaps and any("allow-out A 3" in r for r in a.allow)
            s.shutdown_write()
            assert s.recv_all(timeout=10) == b""  # the echo closes after our EOF
            s.close()
            got = events_until(events, {EventKind.REQUESTED, EventKind.ESTABLISHED, EventKind.HALF_CLOSED,
                                        EventKind.CLOSED})
            mine = [e for e in got if e.conn is not None and e.conn[3] == 5000]
            order = [e.kind for e in mine]
            assert order.index(EventKind.REQUESTED) < order.index(EventKind.ESTABLISHED) < \
                order.index(EventKind.CLOSED)
            assert any(e.kind is EventKind.HALF_CLOSED and "guest sends no more" in e.detail for e in mine)
            assert any(e.kind is EventKind.HALF_CLOSED and "host side" in e.detail for e in mine)
        got = events_until(events, {EventKind.FRONTEND_GONE})
        assert all(e.device in ("A", "B") for e in got)
    finally:
        events.close()
        srv.close()


def test_a_denial_carries_its_rule_and_a_remap_shows_alias_and_real_peer(proxy: Proxy, workdir: str) -> None:
    events = proxy.switch.events.subscribe()
    srv = unix_server(os.path.join(workdir, "ha_9000"))
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            with pytest.raises(ConnectionResetError):
                g.connect(7000, cid=6)  # B: not in A's allow-out
            s = g.connect(9000, cid=3)  # the alias: really the host
            (c,) = conns(proxy.snapshot(), "A")
            assert (c.peer_cid, c.peer_port, c.real_cid, c.real_port) == (3, 9000, 2, 9000)
            assert "remap 3=2 (A)" in c.rules
            s.close()
        got = events_until(events, {EventKind.DENIED})
        (denied,) = [e for e in got if e.kind is EventKind.DENIED]
        assert denied.device == "A" and denied.conn is not None and denied.conn[2:] == (6, 7000)
        assert "allowlist" in denied.rule or "allow" in denied.rule
        assert denied.as_dict()["event"] == "denied" and denied.as_dict()["peer_cid"] == 6
    finally:
        events.close()
        srv.close()


def test_device_events_follow_the_front_end(proxy: Proxy, workdir: str) -> None:
    events = proxy.switch.events.subscribe()
    try:
        with SimGuest(os.path.join(workdir, "b.sock")) as g:
            events_until(events, {EventKind.FRONTEND_CONNECTED, EventKind.RINGS_STARTED})
            g.restart()  # a guest reboot: rings stop and start again on the same front-end
            events_until(events, {EventKind.RINGS_STOPPED, EventKind.RINGS_STARTED})
        got = events_until(events, {EventKind.FRONTEND_GONE})
        assert {e.device for e in got} == {"B"}
    finally:
        events.close()


def test_a_slow_event_subscriber_loses_the_oldest_counted_and_others_get_everything(proxy: Proxy,
                                                                                    workdir: str) -> None:
    small = proxy.switch.events.subscribe(limit=3)
    big = proxy.switch.events.subscribe()
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            for port in range(6000, 6010):
                with pytest.raises(ConnectionResetError):
                    g.connect(port)  # nothing listens on the host: refused at once
        all_events = events_until(big, {EventKind.FRONTEND_GONE})
        refused = [e for e in all_events if e.kind is EventKind.REFUSED]
        assert len(refused) == 10
        kept = small.get(0.1)
        assert len(kept) == 3 and small.dropped == len(all_events) - 3
    finally:
        small.close()
        big.close()


def test_a_snapshot_changes_no_counter_even_of_connections_c_runs(proxy: Proxy, workdir: str) -> None:
    srv = unix_server(os.path.join(workdir, "ha_5000"), sink=True)
    try:
        with SimGuest(os.path.join(workdir, "a.sock"), timeout=30) as g:
            s = g.connect(5000)
            s.blast(b"z" * 65536, 200)  # the C sender runs the connection meanwhile
            seen: list[tuple[object, object, Snapshot]] = []
            done = threading.Event()

            def on_loop() -> None:  # before and after, on the loop thread: nothing may run between
                core = proxy.devices[0].session.core  # type: ignore[union-attr]
                before = dataclasses.replace(core.counters, drops=dict(core.counters.drops))
                snap = take(proxy)
                after = dataclasses.replace(core.counters, drops=dict(core.counters.drops))
                seen.append((before, after, snap))
                done.set()

            proxy.loop.call_soon_threadsafe(on_loop)
            assert done.wait(10)
            before, after, snap = seen[0]
            assert before == after
            a = next(d for d in snap.devices if d.name == "A")
            assert a.counters.tx_bytes >= 200 * 65536 > 0  # C's part is counted in the snapshot
            s.close()
    finally:
        srv.close()


def test_the_report_is_made_from_the_typed_snapshot(proxy: Proxy, workdir: str) -> None:
    with SimGuest(os.path.join(workdir, "a.sock")):
        lines = report_lines(proxy.snapshot())
    assert lines[0].startswith("A: sessions=1 conns=0 tx_pkts=") and " limit_refused=0 faults=0" in lines[0]
    assert lines[1] == "B: sessions=0"
    assert lines[-1].startswith("process: fd_exhausted=0")
