"""Host endpoints over real sockets: hybrid unix (Firecracker convention) and TCP.

Guest-initiated: the ``HostEndpoints`` connector opens ``<uds_path>_<port>``
or the TCP address forwarded for that port. Host-initiated: a hybrid unix
listener reads ``CONNECT <port>\\n`` and answers ``OK <host port>\\n`` once the
guest accepts; a TCP listener connects straight into a fixed guest port.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsproxy.endpoints.base import Buffer

if TYPE_CHECKING:
    from vsproxy.endpoints.vsock import VsockFactory
from vsproxy.loop import Loop
from vsproxy.vsock.connection import Connection

log = logging.getLogger("vsproxy.endpoints")

HANDSHAKE_MAX = 64  # "CONNECT 4294967295\n" fits easily
HANDSHAKE_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)
SEQPACKET = 2  # virtio-vsock type
SNDBUF = 1 << 20


class CoreHooks:
    """What a socket peer reports to (a device's vsock core through the shell)."""

    def readable(self, conn: Connection) -> None: ...
    def writable(self, conn: Connection) -> None: ...
    def connected(self, conn: Connection) -> None: ...
    def failed(self, conn: Connection, reason: str) -> None: ...


def scatter_prefix(data: bytes, bufs: Sequence[memoryview]) -> int:
    """Copy as much of ``data`` as ``bufs`` hold, in order; the number of bytes copied."""
    n = 0
    for b in bufs:
        k = min(len(b), len(data) - n)
        b[:k] = data[n : n + k]
        n += k
    return n


class SocketPeer:
    """A Peer over a non-blocking stream socket."""

    __slots__ = ("_reading", "_writing", "closed", "conn", "fd", "hooks", "label", "loop", "prebuf", "sock")

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

    def describe(self) -> str:
        return self.label

    def fast_fd(self) -> int:
        """The fd the C rx path may read directly, or -1 (bytes of our own still come first)."""
        return -1 if self.prebuf or self.closed else self.fd

    def send(self, bufs: Sequence[Buffer]) -> int:
        try:
            if len(bufs) == 1:
                return self.sock.send(bufs[0])
            return self.sock.sendmsg(bufs)
        except (BlockingIOError, InterruptedError):
            return 0

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if self.prebuf:
            n = scatter_prefix(self.prebuf, bufs)
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
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.forget(self.fd)
        if reset and self.sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                # SO_LINGER 0: close sends RST, so the peer cannot mistake a cut stream for a complete one.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
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


class HybridPeer(SocketPeer):
    """Host side of a hybrid-unix CONNECT: answers OK once the guest accepts."""

    __slots__ = ()

    def established(self, local_port: int) -> None:
        try:
            self.sock.send(b"OK %d\n" % local_port)
        except OSError:
            pass  # the next read or write reports it


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
            return _unix_connect(f"{self.uds_path}_{port}", conn, loop, hooks, socket.SOCK_SEQPACKET)
        fwd = self.forwards.get(port)
        if fwd is not None:
            return _tcp_connect(fwd, conn, loop, hooks)
        if self.forward_cid is not None:
            from vsproxy.endpoints.vsock import AfVsockFactory, vsock_connect

            return vsock_connect(self.vsock_factory or AfVsockFactory(), self.forward_cid, port, conn, loop, hooks)
        if self.uds_path is not None:
            return _unix_connect(f"{self.uds_path}_{port}", conn, loop, hooks)
        return None


def _unix_connect(
    path: str, conn: Connection, loop: Loop, hooks: CoreHooks, kind: int = socket.SOCK_STREAM
) -> SocketPeer | None:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError as e:
        # ENOENT, ECONNREFUSED, or EAGAIN (backlog full): the guest gets RST.
        log.info("guest connect to %s failed: %s", path, e.strerror)
        sock.close()
        return None
    peer = SocketPeer(sock, loop, hooks, f"unix:{path}")
    peer.conn = conn
    loop.call_soon(lambda: hooks.connected(conn))
    return peer


def _tcp_connect(fwd: TcpForward, conn: Connection, loop: Loop, hooks: CoreHooks) -> SocketPeer | None:
    try:
        infos = socket.getaddrinfo(fwd.host, fwd.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror as e:
        log.warning("bad forward address %s:%d: %s", fwd.host, fwd.port, e)
        return None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS):
        log.info("guest connect to tcp:%s:%d failed: %s", fwd.host, fwd.port, os.strerror(err))
        sock.close()
        return None
    return connecting_peer(sock, err, f"tcp:{fwd.host}:{fwd.port}", conn, loop, hooks)


def connecting_peer(
    sock: socket.socket, err: int, label: str, conn: Connection, loop: Loop, hooks: CoreHooks
) -> SocketPeer:
    """A peer for a non-blocking connect that returned ``err`` (0 or in progress): the core
    hears connected or failed once the socket says so."""
    peer = SocketPeer(sock, loop, hooks, label)
    peer.conn = conn
    if err == 0:
        loop.call_soon(lambda: hooks.connected(conn))
        return peer

    def on_connect() -> None:
        loop.set_writer(peer.fd, None)
        peer._writing = False
        e = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if e:
            hooks.failed(conn, os.strerror(e))
        else:
            hooks.connected(conn)

    loop.set_writer(peer.fd, on_connect)
    peer._writing = True
    return peer


def accept_all(sock: socket.socket, what: str, handle: Callable[[socket.socket, object], None]) -> None:
    """Accept what is waiting (at most 64 at a time, so one listener cannot hog the loop)."""
    for _ in range(64):
        try:
            s, addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s: accept: %s", what, e)
            return
        handle(s, addr)


def listen_unix(path: str, backlog: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A listening unix socket that appears at ``path`` only once it accepts: bound under a
    temporary name, then renamed, so a client that sees the file never gets ECONNREFUSED."""
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(tmp)
        sock.listen(backlog)
        os.rename(tmp, path)
    except OSError:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sock.setblocking(False)
    return sock


class HybridListener:
    """Accepts host programs on ``uds_path`` and reads their ``CONNECT <port>`` line. The
    SEQPACKET variant listens on ``uds_path.seqpacket`` (a SOCK_SEQPACKET socket): the CONNECT
    line and the OK answer are each one message, and the connection into the guest is a
    SEQPACKET one."""

    def __init__(
        self,
        path: str,
        loop: Loop,
        hooks_for: Callable[[], CoreHooks | None],
        connect: Callable[[SocketPeer, int, int], Connection | None],
        seqpacket: bool = False,
    ) -> None:
        self.path = path
        self.loop = loop
        self.hooks_for = hooks_for
        self.connect = connect
        self.seqpacket = seqpacket
        self.sock = listen_unix(path, 128, socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM)
        loop.set_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        accept_all(self.sock, f"hybrid {self.path}", self._accepted)

    def _accepted(self, s: socket.socket, _addr: object) -> None:
        _Handshake(s, self)

    def close(self) -> None:
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Handshake:
    def __init__(self, sock: socket.socket, listener: HybridListener) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.listener = listener
        self.buf = b""
        self.done = False
        self.port = 0
        self.rest = b""
        self.have_line = False
        loop = listener.loop
        self.started = loop.time()
        loop.set_reader(sock.fileno(), self._read)
        loop.call_later(HANDSHAKE_TIMEOUT, self._timeout)

    def _finish(self) -> None:
        self.done = True
        self.listener.loop.forget(self.sock.fileno())

    def _fail(self, why: str) -> None:
        log.info("hybrid %s: %s", self.listener.path, why)
        self._finish()
        self.sock.close()

    def _timeout(self) -> None:
        if not self.done:
            why = "no guest attached" if self.have_line else f"no CONNECT line within {HANDSHAKE_TIMEOUT:.0f} s"
            self._fail(why)

    def _read(self) -> None:
        try:
            data = self.sock.recv(HANDSHAKE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(str(e))
            return
        if not data:
            self._fail("client closed before CONNECT")
            return
        self.buf += data
        nl = self.buf.find(b"\n")
        if nl < 0:
            if len(self.buf) > HANDSHAKE_MAX:
                self._fail("CONNECT line too long")
            return
        line, rest = self.buf[:nl], self.buf[nl + 1 :]
        parts = line.strip().split()
        if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or int(parts[1]) > 0xFFFFFFFF:
            self._fail(f"bad handshake line {line[:40]!r}")
            return
        self.listener.loop.forget(self.sock.fileno())
        self.port = int(parts[1])
        self.rest = rest
        self.have_line = True
        self._attach()

    def _attach(self) -> None:
        """Connect once the guest's driver is up: a host program may dial before it is."""
        if self.done:
            return
        hooks = self.listener.hooks_for()
        if hooks is None:
            if self.listener.loop.time() - self.started < HANDSHAKE_TIMEOUT:
                self.listener.loop.call_later(0.05, self._attach)
            else:
                self._fail("no guest attached")
            return
        self._finish()
        peer = HybridPeer(self.sock, self.listener.loop, hooks, f"hybrid:{self.listener.path}")
        peer.prebuf = self.rest
        conn = self.listener.connect(peer, self.port, SEQPACKET if self.listener.seqpacket else 1)
        if conn is None:
            peer.close(reset=False)
            return
        peer.conn = conn


class TcpListener:
    """Host TCP port that connects into a fixed guest port."""

    def __init__(
        self,
        host: str,
        port: int,
        guest_port: int,
        loop: Loop,
        hooks_for: Callable[[], CoreHooks | None],
        connect: Callable[[SocketPeer, int, int], Connection | None],
    ) -> None:
        self.loop = loop
        self.guest_port = guest_port
        self.hooks_for = hooks_for
        self.connect = connect
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        family, type_, proto, _, addr = infos[0]
        self.sock = socket.socket(family, type_, proto)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        loop.set_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        accept_all(self.sock, "tcp listener", self._accepted)

    def _accepted(self, s: socket.socket, addr: object) -> None:
        hooks = self.hooks_for()
        if hooks is None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            s.close()
            return
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = addr[:2] if isinstance(addr, tuple) else ("?", 0)
        peer = SocketPeer(s, self.loop, hooks, f"tcp:{host}:{port}")
        conn = self.connect(peer, self.guest_port, 1)
        if conn is None:
            peer.close(reset=True)
            return
        peer.conn = conn

    def close(self) -> None:
        self.loop.forget(self.sock.fileno())
        self.sock.close()
