"""The AF_VSOCK host endpoint: guest connections forwarded to a host vsock CID
(vhost-device-vsock's ``forward-cid``), and host vsock ports listened on and connected into
the guest (``forward-listen``).

Sockets come from a factory so the endpoint can be tested without AF_VSOCK: on the
development machines AF_VSOCK belongs to the infrastructure and tests must never open one.
``UnixVsockFactory`` stands in for it with unix sockets in a directory (``--vsock-via-unix``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol

from vsproxy.endpoints.listeners import Acceptor, into_guest
from vsproxy.endpoints.sockets import CoreHooks, SocketPeer, connecting_peer, refused_for_descriptors
from vsproxy.limits import EXHAUSTION_ERRNOS, exhausted, ratelog
from vsproxy.loop import Loop
from vsproxy.vsock.connection import Connection

log = logging.getLogger("vsproxy.endpoints")

VMADDR_CID_ANY = 0xFFFFFFFF


class VsockFactory(Protocol):
    def connect(self, cid: int, port: int) -> tuple[socket.socket, int]:
        """A non-blocking socket with its connect started, and the connect_ex result."""
        ...

    def listen(self, port: int) -> socket.socket:
        ...

    def describe(self, cid: int, port: int) -> str:
        ...


class AfVsockFactory:
    """Real AF_VSOCK sockets (the default)."""

    family = getattr(socket, "AF_VSOCK", 40)

    def connect(self, cid: int, port: int) -> tuple[socket.socket, int]:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.setblocking(False)
        return s, s.connect_ex((cid, port))

    def listen(self, port: int) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.bind((VMADDR_CID_ANY, port))
        s.listen(128)
        s.setblocking(False)
        return s

    def describe(self, cid: int, port: int) -> str:
        return f"vsock:{cid}:{port}"


class UnixVsockFactory:
    """AF_VSOCK emulated with unix sockets: CID:PORT is ``DIR/vsock-CID-PORT``, a listener on
    PORT is ``DIR/listen-PORT``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def connect(self, cid: int, port: int) -> tuple[socket.socket, int]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(os.path.join(self.directory, f"vsock-{cid}-{port}"))
        if err == errno.ENOENT:
            err = errno.ECONNRESET  # what AF_VSOCK reports for a port nobody listens on
        return s, err

    def listen(self, port: int) -> socket.socket:
        path = os.path.join(self.directory, f"listen-{port}")
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(128)
        s.setblocking(False)
        return s

    def describe(self, cid: int, port: int) -> str:
        return f"vsock-via-unix:{cid}:{port}"


def vsock_connect(factory: VsockFactory, cid: int, port: int, conn: Connection, loop: Loop,
                  hooks: CoreHooks) -> SocketPeer | None:
    what = f"guest connect to {factory.describe(cid, port)}"
    try:
        sock, err = factory.connect(cid, port)
    except OSError as e:
        if exhausted(e):
            refused_for_descriptors(loop, what, e)
        else:
            ratelog(log, logging.INFO, "guest connect failed", "%s failed: %s", what, e.strerror)
        return None
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
        if err in EXHAUSTION_ERRNOS:
            refused_for_descriptors(loop, what, OSError(err, os.strerror(err)))
        else:
            ratelog(log, logging.INFO, "guest connect failed", "%s failed: %s", what, os.strerror(err))
        sock.close()
        return None
    return connecting_peer(sock, err, factory.describe(cid, port), conn, loop, hooks)


class VsockListener:
    """A host vsock port whose connections go into the same port of the guest."""

    def __init__(self, factory: VsockFactory, port: int, loop: Loop, hooks_for: Callable[[], CoreHooks | None],
                 connect: Callable[[SocketPeer, int, int], Connection | None]) -> None:
        self.port = port
        self.loop = loop
        self.hooks_for = hooks_for
        self.connect = connect
        self.factory = factory
        self.acceptor = Acceptor(factory.listen(port), loop, f"vsock port {port}", self._accepted)

    def _accepted(self, s: socket.socket, _addr: object) -> None:
        into_guest(s, self.loop, self.hooks_for, self.connect,
                   f"{self.factory.describe(VMADDR_CID_ANY, self.port)} (accepted)", self.port)

    def close(self) -> None:
        self.acceptor.close()
