"""The router between devices: policy verdicts carried out, and counted.

Every new connection passes here once, from whichever side it starts: a guest's REQUEST
(``open``), a host program (``inbound_host``) or a sibling (inside ``open``). The policy
(a pure function, ``policy.Policy``) decides; the switch makes the far side (host socket,
built-in service, sibling pair), counts the verdict under the rule that decided, and logs
every denial with device, CIDs, ports and rule. Data never passes through here: once a
connection exists, its packets go core to peer directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vsproxy.endpoints.base import Peer
from vsproxy.endpoints.services import open_service
from vsproxy.endpoints.sibling import SiblingEnd, pair
from vsproxy.endpoints.sockets import CoreHooks
from vsproxy.eventbus import EventBus
from vsproxy.events import EventKind
from vsproxy.limits import ratelog
from vsproxy.loop import Loop
from vsproxy.policy import HOST_CID, Policy
from vsproxy.taps import Taps
from vsproxy.verdict import Mark
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.table import Traffic

if TYPE_CHECKING:
    from vsproxy.device import DeviceConfig

log = logging.getLogger("vsproxy.switch")


@dataclass
class RuleCounters:
    connections: int = 0
    denials: int = 0
    rewrites: int = 0


class SwitchedDevice(Protocol):
    """What the switch needs of a device: its name and settings, whether a guest is up, and a
    way in for a sibling's connection. It never reaches into a device's session or core."""

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> DeviceConfig: ...
    @property
    def running(self) -> bool: ...
    def connect_sibling(self, end: SiblingEnd, guest_port: int, type_: int, src_cid: int, src_port: int,
                        window: int, rule: tuple[str, ...], mark: Mark | None,
                        real: tuple[int, int] | None = None) -> bool: ...


class Switch:
    def __init__(self, policy: Policy, loop: Loop) -> None:
        self.policy = policy
        self.loop = loop
        self.devices: dict[str, SwitchedDevice] = {}
        self.rules: dict[str, RuleCounters] = {}
        # traffic of closed connections per rule, shared by every device's core
        self.rule_totals: dict[str, Traffic] = {}
        # taps every device's core feeds (capture, TUI): one list shared by all cores
        self.taps = Taps()
        # connection and device events every device's core and session report (vsproxy/eventbus.py)
        self.events = EventBus()

    def register(self, device: SwitchedDevice) -> None:
        self.devices[device.name] = device

    def _count(self, rule: str, *, allowed: bool, remap: str | None) -> None:
        rc = self.rules.setdefault(rule, RuleCounters())
        if allowed:
            rc.connections += 1
        else:
            rc.denials += 1
        if remap is not None and allowed:
            self.rules.setdefault(remap, RuleCounters()).rewrites += 1

    def open(self, dev: SwitchedDevice, conn: Connection, hooks: CoreHooks) -> Peer | None:
        """The guest of ``dev`` sent REQUEST to conn.peer_cid:conn.peer_port (as it sees them)."""
        route = self.policy.outbound(dev.name, conn.peer_cid, conn.peer_port)
        self._count(route.rule, allowed=route.allowed, remap=route.remap)
        where = f"{dev.name}: {dev.config.guest_cid}:{conn.guest_port} -> {conn.peer_cid}:{conn.peer_port}"
        if route.remap is not None:
            where += f" (really {route.cid}:{route.port}, {route.remap})"
        if not route.allowed:
            ratelog(log, logging.WARNING, f"{dev.name}: denied", "%s denied by %s", where, route.rule)
            conn.mark = Mark.denied(route.rule)
            return None
        if route.remap is not None:
            conn.mark = Mark.rewritten_to(route.remap, route.cid, route.port)
            conn.real = (route.cid, route.port)
        # every connection is in the capture; the log keeps a sample, so a flood cannot flood it
        ratelog(log, logging.INFO, f"{dev.name}: allowed", "%s allowed by %s", where, route.rule)
        conn.rule = (route.rule,) if route.remap is None else (route.rule, route.remap)
        if route.kind == "service":
            assert route.service is not None

            def fallback(inner_hooks: CoreHooks) -> Peer | None:
                """Where the connection would go without the service (the host side only)."""
                alt = self.policy.outbound(dev.name, conn.peer_cid, conn.peer_port, services=False)
                if not alt.allowed or alt.kind != "host":
                    return None
                return dev.config.endpoints.open(alt.port, conn, self.loop, inner_hooks)

            peer = open_service(route.service, conn.type, route.cid, route.port, self.loop.call_soon,
                                lambda: hooks.readable(conn), lambda: hooks.writable(conn), fallback)
            if peer is None:
                log.info("%s: service %s does not carry this socket type", where, route.service)
                return None
            self.loop.call_soon(lambda: hooks.connected(conn))
            return peer
        if route.kind == "host":
            return dev.config.endpoints.open(route.port, conn, self.loop, hooks)
        assert route.device is not None
        target = self.devices.get(route.device)
        if target is None or not target.running:
            ratelog(log, logging.INFO, f"{dev.name}: no sibling", "%s: sibling %s has no running guest", where,
                    route.device)
            return None
        seen_cid, _ = self.policy.guest_view(target.name, dev.config.guest_cid)
        a, b = pair(f"sibling:{target.name}", f"sibling:{dev.name}", self.loop.call_soon)
        mark = Mark.rewritten_to(None, dev.config.guest_cid, conn.guest_port) if seen_cid != dev.config.guest_cid \
            else None
        # the receiving guest is told a window no larger than the sender's own
        if not target.connect_sibling(b, route.port, conn.type, seen_cid, conn.guest_port,
                                      max(conn.credit.peer_buf_alloc, 4096), conn.rule, mark,
                                      (dev.config.guest_cid, conn.guest_port) if mark is not None else None):
            return None
        a.attach(hooks, conn)
        return a

    def inbound_host(self, dev: SwitchedDevice, guest_port: int) -> tuple[int, tuple[str, ...]] | None:
        """A host program connects to ``dev``'s guest port: the CID the guest sees and the rules
        that apply, or None if denied."""
        route = self.policy.inbound(dev.name, HOST_CID, guest_port)
        seen, remap = self.policy.guest_view(dev.name, HOST_CID)
        self._count(route.rule, allowed=route.allowed, remap=remap)
        if not route.allowed:
            self.events.publish(EventKind.DENIED, dev.name, (1, guest_port, HOST_CID, 0),
                                f"host -> guest port {guest_port}", route.rule)
            ratelog(log, logging.WARNING, f"{dev.name}: denied", "%s: host -> %d:%d denied by %s", dev.name,
                    dev.config.guest_cid, guest_port, route.rule)
            return None
        return seen, (route.rule,) if remap is None else (route.rule, remap)
