"""Host endpoints over real sockets: hybrid unix (Firecracker convention) and TCP.

Guest-initiated: the ``HostEndpoints`` connector opens ``<uds_path>_<port>``
or the TCP address forwarded for that port. Host-initiated: a hybrid unix
listener reads ``CONNECT <port>\\n`` and answers ``OK <host port>\\n`` once the
guest accepts; a TCP listener connects straight into a fixed guest port.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Sequence

from vsproxy.endpoints.base import Buffer, scatter
from vsproxy.limits import EXHAUSTION_ERRNOS, exhausted, ratelog
from vsproxy.loop import Loop
from vsproxy.vsock.connection import Connection

log = logging.getLogger("vsproxy.endpoints")

LINGER_RESET = struct.pack("ii", 1, 0)
SEQPACKET = 2  # virtio-vsock type
SNDBUF = 1 << 20


class CoreHooks:
    """What a socket peer reports to (a device's vsock core through the shell)."""

    def readable(self, conn: Connection) -> None: ...
    def writable(self, conn: Connection) -> None: ...
    def connected(self, conn: Connection) -> None: ...
    def failed(self, conn: Connection, reason: str) -> None: ...
    def aborted(self, conn: Connection) -> None: ...
    def fault(self, conn: Connection, exc: Exception) -> None: ...
    def held(self, conn: Connection, n: int) -> None:
        """``n`` more (or, negative, fewer) bytes ``conn``'s guest sent are held in vsproxy
        outside the connection's queue (a sibling's inbox): counted in the device's buffered."""


def refused_for_descriptors(loop: Loop, what: str, e: OSError) -> None:
    """A descriptor could not be made for ``what``: counted, logged at most a few times."""
    loop.health.fd_exhausted += 1
    ratelog(log, logging.WARNING, "out of descriptors", "%s: %s (refused; counted as fd_exhausted)",
            what, e.strerror or e)


class SocketPeer:
    """A Peer over a non-blocking stream socket."""

    __slots__ = ("_reading", "_shut_wr", "_writing", "closed", "conn", "fd", "hooks", "label", "loop", "prebuf", "sock")

    def __init__(self, sock: socket.socket, loop: Loop, hooks: CoreHooks, label: str) -> None:
        sock.setblocking(False)
        if SNDBUF:
            try:
                # A host socket that can hold a whole credit window takes guest data without a copy
                # into our own buffer; the kernel caps the value at net.core.wmem_max.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            except OSError:
                pass
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.hooks = hooks
        self.conn: Connection | None = None
        self.prebuf = b""  # bytes that came with a hybrid CONNECT line
        self.label = label
        self.closed = False
        self._reading = False
        self._writing = False
        self._shut_wr = False

    def describe(self) -> str:
        return self.label

    def fast_fd(self) -> int:
        """The fd the C rx path may read directly, or -1 (bytes of our own still come first)."""
        return -1 if self.prebuf or self.closed else self.fd

    def unread(self, data: bytes) -> None:
        self.prebuf = data + self.prebuf

    def send(self, bufs: Sequence[Buffer]) -> int:
        try:
            if len(bufs) == 1:
                return self.sock.send(bufs[0])
            return self.sock.sendmsg(bufs)
        except (BlockingIOError, InterruptedError):
            return 0

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if self.prebuf:
            n = scatter(self.prebuf, bufs)
            self.prebuf = self.prebuf[n:]
            return n
        try:
            if len(bufs) == 1:
                return self.sock.recv_into(bufs[0])
            return self.sock.recvmsg_into(bufs)[0]
        except (BlockingIOError, InterruptedError):
            return None

    def send_message(self, data: bytes, eor: bool) -> bool:
        """SEQPACKET: the whole message or nothing (a unix seqpacket socket has no record mark,
        so EOR is not carried)."""
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        """SEQPACKET: the next whole message, (b"", False) at EOF, None if none is ready. A
        message longer than ``limit`` comes back longer than it (the caller refuses it)."""
        if self.prebuf:
            data, self.prebuf = self.prebuf, b""
            return data, False
        try:
            data, _anc, flags, _addr = self.sock.recvmsg(max(limit, 1) + 1)
        except (BlockingIOError, InterruptedError):
            return None
        if flags & socket.MSG_TRUNC:
            data += b"\0"  # longer than the limit either way
        return data, False

    def shutdown_write(self) -> None:
        self._shut_wr = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def shutdown_read(self) -> None:
        # A unix socket passes it on (the writer's next send gets EPIPE), as the guest's kernel
        # peer would see it; TCP has no way to, and the bytes that still come are dropped.
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def far_shutdown(self) -> int:
        return 0

    def far_closed(self) -> bool:
        return False

    def hung_up(self) -> bool:
        # A unix socket's peer that close()d (or shut both ways) leaves this end shut both ways,
        # which poll shows as POLLHUP; its shutdown(SHUT_WR) alone does not. Once we shut our
        # own write side, POLLHUP says nothing of the far side's reading.
        if self.closed or self._shut_wr or self.sock.family != socket.AF_UNIX:
            return False
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return any(ev & select.POLLHUP for _, ev in p.poll(0))

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.forget(self.fd)
        if reset and self.sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                # SO_LINGER 0: close sends RST, so the peer cannot mistake a cut stream for a complete one.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass
        self.sock.close()

    def watch_read(self, on: bool) -> None:
        if self.closed or on == self._reading:
            return
        self._reading = on
        self.loop.set_reader(self.fd, self._on_readable if on else None)

    def watch_write(self, on: bool) -> None:
        if self.closed or on == self._writing:
            return
        self._writing = on
        self.loop.set_writer(self.fd, self._on_writable if on else None)

    def established(self, local_port: int) -> None:
        pass

    def _on_readable(self) -> None:
        if self.conn is not None:
            self.hooks.readable(self.conn)

    def _on_writable(self) -> None:
        if self.conn is not None:
            self.hooks.writable(self.conn)

    def _report_connected(self) -> None:
        if self.conn is not None:
            self.hooks.connected(self.conn)

    def _on_connect(self) -> None:
        """A non-blocking connect finished, one way or the other."""
        self.loop.set_writer(self.fd, None)
        self._writing = False
        if self.conn is None:
            return
        e = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if e:
            self.hooks.failed(self.conn, os.strerror(e))
        else:
            self.hooks.connected(self.conn)

    def on_fault(self, exc: Exception) -> None:
        """The loop caught an unexpected exception in one of this peer's callbacks: that
        connection ends, the others go on."""
        if self.conn is not None:
            self.hooks.fault(self.conn, exc)
        else:
            self.close(reset=True)


class HybridPeer(SocketPeer):
    """Host side of a hybrid-unix CONNECT: answers OK once the guest accepts."""

    __slots__ = ()

    def established(self, local_port: int) -> None:
        try:
            self.sock.send(b"OK %d\n" % local_port)
        except OSError:
            pass  # the next read or write reports it


def unix_connect(
    path: str, conn: Connection, loop: Loop, hooks: CoreHooks, kind: int = socket.SOCK_STREAM
) -> SocketPeer | None:
    try:
        sock = socket.socket(socket.AF_UNIX, kind)
    except OSError as e:
        refused_for_descriptors(loop, f"guest connect to {path}", e)
        return None
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError as e:
        # ENOENT, ECONNREFUSED, or EAGAIN (backlog full): the guest gets RST.
        if exhausted(e):
            refused_for_descriptors(loop, f"guest connect to {path}", e)
        else:
            ratelog(log, logging.INFO, "guest connect failed", "guest connect to %s failed: %s", path, e.strerror)
        sock.close()
        return None
    peer = SocketPeer(sock, loop, hooks, f"unix:{path}")
    peer.conn = conn
    loop.call_soon(peer._report_connected)
    return peer


def tcp_connect(host: str, port: int, conn: Connection, loop: Loop, hooks: CoreHooks) -> SocketPeer | None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror as e:
        log.warning("bad forward address %s:%d: %s", host, port, e)
        return None
    family, type_, proto, _, addr = infos[0]
    what = f"guest connect to tcp:{host}:{port}"
    try:
        sock = socket.socket(family, type_, proto)
    except OSError as e:
        refused_for_descriptors(loop, what, e)
        return None
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS):
        if err in EXHAUSTION_ERRNOS:
            refused_for_descriptors(loop, what, OSError(err, os.strerror(err)))
        else:
            ratelog(log, logging.INFO, "guest connect failed", "%s failed: %s", what, os.strerror(err))
        sock.close()
        return None
    return connecting_peer(sock, err, f"tcp:{host}:{port}", conn, loop, hooks)


def connecting_peer(
    sock: socket.socket, err: int, label: str, conn: Connection, loop: Loop, hooks: CoreHooks
) -> SocketPeer:
    """A peer for a non-blocking connect that returned ``err`` (0 or in progress): the core
    hears connected or failed once the socket says so."""
    peer = SocketPeer(sock, loop, hooks, label)
    peer.conn = conn
    if err == 0:
        loop.call_soon(peer._report_connected)
        return peer
    loop.set_writer(peer.fd, peer._on_connect)
    peer._writing = True
    return peer
