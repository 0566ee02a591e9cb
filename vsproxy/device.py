"""One vsock device: its settings, its vhost-user socket and host listeners, and the
front-end session (``frontend.FrontendSession``) of the QEMU connected to it, one at a time.
What the switch needs of a device (``switch.SwitchedDevice``) is here too.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsproxy.endpoints.base import Peer
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.endpoints.listeners import (
    DEFAULT_MAX_HANDSHAKES,
    Acceptor,
    HybridListener,
    SocketFile,
    TcpListener,
    listen_unix,
)
from vsproxy.endpoints.sibling import SiblingEnd
from vsproxy.endpoints.sockets import CoreHooks
from vsproxy.events import EventKind
from vsproxy.frontend import FrontendSession
from vsproxy.limits import MAX_BUFFERED, MAX_CONTROL, Limits, ratelog
from vsproxy.loop import Loop
from vsproxy.verdict import Mark
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import (
    DEFAULT_BUF_ALLOC,
    MAX_CONNECTIONS,
)
from vsproxy.vsock.header import Type as VsockType

SEQPACKET = VsockType.SEQPACKET

if TYPE_CHECKING:
    from vsproxy.endpoints.vsock import VsockListener
    from vsproxy.switch import Switch

log = logging.getLogger("vsproxy.device")

# vhost-device-vsock's --queue-size default: the largest ring the front-end may set (QEMU sets
# 128 on vhost-user-vsock-pci and 1024 on virtio-mmio); a larger SET_VRING_NUM ends the session.
DEFAULT_QUEUE_SIZE = 1024


@dataclass
class DeviceConfig:
    guest_cid: int
    socket_path: str
    name: str = ""
    endpoints: HostEndpoints = field(default_factory=HostEndpoints)
    buf_alloc: int = DEFAULT_BUF_ALLOC
    groups: frozenset[str] = frozenset()
    queue_size: int = DEFAULT_QUEUE_SIZE
    # None: the device's share of the file limit (limits.default_limits), set at start
    max_connections: int | None = None
    max_pending: int | None = None
    max_handshakes: int | None = None
    max_buffered: int | None = None  # None: limits.MAX_BUFFERED
    max_control: int | None = None  # None: limits.MAX_CONTROL

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"cid{self.guest_cid}"

    def limits(self, default: Limits | None = None) -> Limits:
        """This device's limits: those set, the rest from ``default``."""
        return Limits(
            self.max_connections or (default.max_connections if default else MAX_CONNECTIONS),
            self.max_pending or (default.max_pending if default else MAX_CONNECTIONS),
            self.max_handshakes or (default.max_handshakes if default else DEFAULT_MAX_HANDSHAKES),
            self.max_buffered or (default.max_buffered if default else MAX_BUFFERED),
            self.max_control or (default.max_control if default else MAX_CONTROL),
        )


class Device:
    def __init__(self, config: DeviceConfig, loop: Loop, switch: Switch, limits: Limits | None = None) -> None:
        self.config = config
        self.loop = loop
        self.switch = switch
        self.limits = limits if limits is not None else config.limits()
        switch.register(self)
        self.session: FrontendSession | None = None
        self.sessions_served = 0
        self.listeners: list[HybridListener | TcpListener | VsockListener] = []
        self.socket_file: SocketFile | None = None
        ep = config.endpoints
        hs = self.limits.max_handshakes
        try:
            if ep.uds_path is not None:
                self.listeners.append(HybridListener(ep.uds_path, loop, self._hooks, self._host_connect,
                                                     max_handshakes=hs))
                self.listeners.append(HybridListener(ep.uds_path + ".seqpacket", loop, self._hooks,
                                                     self._host_connect, seqpacket=True, max_handshakes=hs))
            for host, port, guest_port in ep.listens:
                self.listeners.append(TcpListener(host, port, guest_port, loop, self._hooks, self._host_connect))
            for port in ep.forward_listen:
                from vsproxy.endpoints.vsock import AfVsockFactory, VsockListener

                factory = ep.vsock_factory or AfVsockFactory()
                self.listeners.append(VsockListener(factory, port, loop, self._hooks, self._host_connect))
        except BaseException:
            self.close()
            raise

    def listen(self) -> None:
        """Open the vhost-user socket, last: once QEMU (or a test) sees it, the host-side
        listeners already accept."""
        def make() -> Acceptor:
            sock = listen_unix(self.config.socket_path, 4)
            return Acceptor(sock, self.loop, f"{self.name}: vhost-user socket", self._accepted)

        self.socket_file = SocketFile(self.config.socket_path, self.loop, f"{self.name}: vhost-user socket", make)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        s = self.session
        return s is not None and s.running

    def connect_sibling(self, end: SiblingEnd, guest_port: int, type_: int, src_cid: int, src_port: int,
                        window: int, rule: tuple[str, ...], mark: Mark | None,
                        real: tuple[int, int] | None = None) -> bool:
        """A sibling device's connection into this guest's ``guest_port``, seen as coming from
        ``src_cid:src_port``, advertising at most ``window``: True once its REQUEST is queued."""
        s = self.session
        if s is None or not s.running:
            return False
        conn = s.core.host_connect(end, guest_port, type_, src_cid=src_cid, src_port=src_port,
                                   buf_alloc=min(s.core.buf_alloc, window))
        if conn is None:
            return False
        conn.rule = rule
        conn.mark = mark
        conn.real = real
        end.attach(s, conn)
        s.kick_pump()
        return True

    def _hooks(self) -> CoreHooks | None:
        s = self.session
        return s if s is not None and s.running else None

    def hooks(self) -> CoreHooks | None:
        """What a peer reports to (the running session); None while no guest is up."""
        return self._hooks()

    def connect_from_host(self, peer: Peer, guest_port: int, type_: int) -> Connection | None:
        """A connection from the host into the guest's ``guest_port`` for ``peer``, which is not a
        socket of a listener's (server replay makes the connections a capture shows); None when
        no guest is up or a rule or limit refuses it."""
        return self._host_connect(peer, guest_port, type_)

    def _host_connect(self, peer: Peer, guest_port: int, type_: int) -> Connection | None:
        s = self.session
        if s is None or not s.running:
            return None
        if type_ == SEQPACKET and not s.core.seqpacket:
            return None  # the guest driver did not negotiate SEQPACKET
        verdict = self.switch.inbound_host(self, guest_port)
        if verdict is None:
            return None
        seen_cid, rules = verdict
        conn = s.core.host_connect(peer, guest_port, type_, src_cid=seen_cid)
        if conn is not None:
            conn.rule = rules
            if seen_cid != 2:
                conn.mark = Mark.rewritten_to(rules[-1], 2, conn.peer_port)
                conn.real = (2, conn.peer_port)
        s.kick_pump()
        return conn

    def _accepted(self, sock: socket.socket, _addr: object) -> None:
        if self.session is not None:
            ratelog(log, logging.ERROR, f"{self.name}: second front-end",
                    "%s: a second front-end connected while one is active; refused", self.name)
            sock.close()
            return
        self.sessions_served += 1
        log.info("%s: front-end connected (session %d)", self.name, self.sessions_served)
        self.switch.events.publish(EventKind.FRONTEND_CONNECTED, self.name, detail=f"session {self.sessions_served}")
        self.session = FrontendSession(self, sock)

    def session_ended(self, session: FrontendSession) -> None:
        if self.session is session:
            self.session = None

    def close(self) -> None:
        if self.session is not None:
            session = self.session
            session.end("vsproxy shutting down", error=False)
            session.core.drop_lingering()
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        if self.socket_file is not None:
            self.socket_file.close()  # and its file, if it is still vsproxy's
            self.socket_file = None
