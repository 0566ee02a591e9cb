"""Typed snapshots of a running vsproxy: devices, rules and every connection.

``take`` reads the proxy's state and changes nothing: counters of connections the C pump
runs are peeked, not handed over. It must run on the loop thread; ``Proxy.snapshot`` takes
care of that for callers on other threads (the control socket, a TUI).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vsproxy.endpoints.services import service_rows
from vsproxy.limits import Health
from vsproxy.verdict import verdict_of
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.header import U32
from vsproxy.vsock.lending import OwnedBack, add_counts
from vsproxy.vsock.table import Counters, Traffic

if TYPE_CHECKING:
    from vsproxy.app import Proxy
    from vsproxy.device import Device


# Per-connection records are plain slotted dataclasses: a frozen one sets each field through
# object.__setattr__, which doubles the time a snapshot of thousands of connections takes.
@dataclass(slots=True)
class CreditState:
    """Both directions' credit. Guest -> vsproxy: what vsproxy advertises (``buf_alloc``,
    ``fwd_cnt``) and holds (``queued``: bytes the host has not taken yet); vsproxy -> guest:
    what the guest advertised and how much of it is in flight."""

    buf_alloc: int
    fwd_cnt: int
    queued: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    tx_cnt: int
    in_flight: int  # bytes sent to the guest it has not reported consumed


@dataclass(slots=True)
class ConnectionInfo:
    device: str
    type: str  # "stream" or "seqpacket"
    state: str  # connecting, requested, established, closed
    initiator: str  # "guest" or "host"
    guest_cid: int
    guest_port: int
    peer_cid: int  # as the guest sees it
    peer_port: int
    real_cid: int  # the real peer after any remap (the same as peer_* when none)
    real_port: int
    peer: str  # the host side: a socket, a service, a sibling
    age: float  # seconds
    to_peer_packets: int
    to_peer_bytes: int
    to_guest_packets: int
    to_guest_bytes: int
    credit: CreditState
    in_c: bool  # the C pump runs it now
    verdict: str
    rules: tuple[str, ...]
    guest_shut: int  # SHUTDOWN flags from the guest
    host_eof: bool


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    name: str
    guest_cid: int
    socket: str
    frontend: bool  # a front-end (QEMU) is connected
    running: bool  # its guest driver has both rings up
    sessions: int
    remaps: tuple[str, ...]
    allow: tuple[str, ...]
    connections: int
    bad_chains: int  # chains of its rings that failed the walker's checks
    counters: Counters  # a copy


@dataclass(frozen=True, slots=True)
class RuleInfo:
    name: str
    connections: int
    denials: int
    rewrites: int
    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    devices: tuple[DeviceInfo, ...]
    rules: tuple[RuleInfo, ...]
    connections: tuple[ConnectionInfo, ...]
    process: Health  # a copy
    capture: dict[str, dict[str, int]] | None  # "all": the --pcap file; "live": live subscribers (app.py)
    # counters service kinds keep per rule (replay: matched, unmatched, exhausted), by rule
    services: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


def take(proxy: Proxy) -> Snapshot:
    now = proxy.loop.time()
    devices: list[DeviceInfo] = []
    conns: list[ConnectionInfo] = []
    traffic: dict[str, Traffic] = {}
    for k, v in proxy.switch.rule_totals.items():
        traffic.setdefault(k, Traffic()).add(v)
    for d in proxy.devices:
        core = d.session.core if d.session is not None else None
        counters = dataclasses.replace(core.counters, drops=dict(core.counters.drops)) if core else Counters()
        if core is not None:
            for conn in core.conns.values():
                back = core.owner.peek(conn.own) if conn.own >= 0 and core.owner is not None else None
                info, stats = _connection(d, conn, now, back)
                conns.append(info)
                if back is not None:
                    add_counts(counters, back.counts)  # what C did that Python has not folded in yet
                for rule in conn.rule:
                    traffic.setdefault(rule, Traffic()).add(stats)
        policy = proxy.switch.policy
        devices.append(DeviceInfo(
            d.name, d.config.guest_cid, d.config.socket_path, d.session is not None, d.running, d.sessions_served,
            tuple(r.label() for r in policy.remaps if r.device in (None, d.name)),
            tuple(a.label() for a in policy.allows if a.device == d.name),
            len(core.conns) if core else 0,
            sum(q.counters.bad_chains for q in d.session.queues if q is not None) if d.session else 0, counters))
    rules = tuple(RuleInfo(name, rc.connections, rc.denials, rc.rewrites, t.packets, t.bytes)
                  for name, rc in sorted(proxy.switch.rules.items())
                  for t in (traffic.get(name, Traffic()),))
    return Snapshot(tuple(devices), rules, tuple(conns), dataclasses.replace(proxy.loop.health),
                    proxy.capture_rows() or None, service_rows())


def _connection(d: Device, conn: Connection, now: float, back: OwnedBack | None) -> tuple[ConnectionInfo, list[int]]:
    """One connection; ``back``: C's credit state and what it did since Python looked, if C runs it."""
    cr = conn.credit
    tx_cnt, peer_buf_alloc, peer_fwd_cnt = cr.tx_state()
    stats = list(conn.stats)
    if back is not None:
        tx_cnt, peer_buf_alloc, peer_fwd_cnt = back.tx_cnt, back.peer_buf_alloc, back.peer_fwd_cnt
        n = back.counts
        stats = [stats[0] + n.tx_packets, stats[1] + n.tx_bytes, stats[2] + n.packets, stats[3] + n.bytes]
    real = conn.real or (conn.peer_cid, conn.peer_port)
    credit = CreditState(cr.buf_alloc, cr.fwd_cnt, conn.out_bytes, peer_buf_alloc, peer_fwd_cnt, tx_cnt,
                         (tx_cnt - peer_fwd_cnt) & U32)
    return ConnectionInfo(
        device=d.name, type="seqpacket" if conn.type == 2 else "stream", state=conn.state.value,
        initiator="host" if conn.host_initiated else "guest", guest_cid=d.config.guest_cid,
        guest_port=conn.guest_port, peer_cid=conn.peer_cid, peer_port=conn.peer_port, real_cid=real[0],
        real_port=real[1], peer=conn.peer.describe(), age=max(0.0, now - conn.created),
        to_peer_packets=stats[0], to_peer_bytes=stats[1], to_guest_packets=stats[2], to_guest_bytes=stats[3],
        credit=credit, in_c=conn.own >= 0, verdict=verdict_of(conn.mark).word, rules=conn.rule,
        guest_shut=conn.guest_shut, host_eof=conn.host_eof,
    ), stats
