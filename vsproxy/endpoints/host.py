"""Where a device's host sides are: hybrid unix sockets, TCP forwards and listeners, and
AF_VSOCK (vhost-device-vsock's forward-cid and forward-listen), and how a guest connection
to the host is opened on them."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from vsproxy.endpoints.sockets import SEQPACKET, CoreHooks, SocketPeer, tcp_connect, unix_connect
from vsproxy.endpoints.vsock import AfVsockFactory, VsockFactory, vsock_connect
from vsproxy.loop import Loop
from vsproxy.vsock.connection import Connection


@dataclass
class TcpForward:
    host: str
    port: int


@dataclass
class HostEndpoints:
    """Where guest connections to the host go, and host listeners into the guest."""

    uds_path: str | None = None
    forwards: dict[int, TcpForward] = field(default_factory=dict)
    # host TCP (host, port) -> guest port
    listens: list[tuple[str, int, int]] = field(default_factory=list)
    # AF_VSOCK (vhost-device-vsock's forward-cid / forward-listen), through a socket factory
    forward_cid: int | None = None
    forward_listen: list[int] = field(default_factory=list)
    vsock_factory: VsockFactory | None = None

    def open(self, port: int, conn: Connection, loop: Loop, hooks: CoreHooks) -> SocketPeer | None:
        """Connect the host side for a guest connection to host port ``port`` (after any remap)."""
        if conn.type == SEQPACKET:
            # Message boundaries survive only on unix SOCK_SEQPACKET sockets (not TCP).
            if self.uds_path is None:
                return None
            return unix_connect(f"{self.uds_path}_{port}", conn, loop, hooks, socket.SOCK_SEQPACKET)
        fwd = self.forwards.get(port)
        if fwd is not None:
            return tcp_connect(fwd.host, fwd.port, conn, loop, hooks)
        if self.forward_cid is not None:
            return vsock_connect(self.vsock_factory or AfVsockFactory(), self.forward_cid, port, conn, loop, hooks)
        if self.uds_path is not None:
            return unix_connect(f"{self.uds_path}_{port}", conn, loop, hooks)
        return None
