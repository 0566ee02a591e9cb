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
from collections import OrderedDict
from collections.abc import Callable, Sequence

from vsproxy.endpoints.base import Buffer, scatter
from vsproxy.limits import exhausted, ratelog
from vsproxy.loop import Loop, TimerHandle
from vsproxy.vsock.connection import Connection

log = logging.getLogger("vsproxy.endpoints")

HANDSHAKE_MAX = 64  # "CONNECT 4294967295\n" fits easily
HANDSHAKE_TIMEOUT = 5.0
DEFAULT_MAX_HANDSHAKES = 1024
# A listener whose accept() failed for want of descriptors waits this long before trying
# again: level-triggered epoll would otherwise wake it at once, for ever (a busy loop).
ACCEPT_PAUSE = 0.1
ACCEPT_BATCH = 64  # accepts per wake-up, so one listener cannot hog the loop
_LINGER_RESET = struct.pack("ii", 1, 0)
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


def refused_for_descriptors(loop: Loop, what: str, e: OSError) -> None:
    """A descriptor could not be made for ``what``: counted, logged at most a few times."""
    loop.health.fd_exhausted += 1
    ratelog(log, logging.WARNING, "out of descriptors", "%s: %s (refused; counted as fd_exhausted)",
            what, e.strerror or e)


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
        if err in (errno.ENOBUFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
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


class Acceptor:
    """A listening socket on the loop whose accept() survives running out of descriptors:
    on EMFILE, ENFILE, ENOBUFS or ENOMEM it stops watching the socket for ``ACCEPT_PAUSE``
    (the connections wait in the backlog) instead of waking again at once, for ever."""

    def __init__(self, sock: socket.socket, loop: Loop, what: str,
                 handle: Callable[[socket.socket, object], None]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.what = what
        self.handle = handle
        self.paused: TimerHandle | None = None
        self.closed = False
        loop.set_reader(self.fd, self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                s, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if exhausted(e):
                    self.loop.health.accept_pauses += 1
                    refused_for_descriptors(self.loop, f"{self.what}: accept", e)
                    self.pause()
                    return
                else:  # ECONNABORTED and the like: that one client, not the listener
                    ratelog(log, logging.INFO, "accept failed", "%s: accept: %s", self.what, e)
                continue
            try:
                self.handle(s, addr)
            except Exception:
                # the handler failed half way: whatever it registered goes with the socket
                self.loop.forget(s.fileno())
                s.close()
                raise
            if self.closed or self.paused is not None:
                return

    def pause(self, seconds: float = ACCEPT_PAUSE) -> None:
        if self.closed or self.paused is not None:
            return
        self.loop.set_reader(self.fd, None)
        self.paused = self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.paused = None
        if not self.closed:
            self.loop.set_reader(self.fd, self._ready)

    def on_fault(self, exc: Exception) -> None:
        """The handler failed unexpectedly (logged by the loop): the listener goes on."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        self.loop.forget(self.fd)
        self.sock.close()


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
    SEQPACKET one.

    At most ``max_handshakes`` connections wait in their handshake (for their line, or for a
    guest to attach); one more drops the oldest, so idle connections cannot hold the socket
    while a client that sends its line at once still gets through."""

    def __init__(
        self,
        path: str,
        loop: Loop,
        hooks_for: Callable[[], CoreHooks | None],
        connect: Callable[[SocketPeer, int, int], Connection | None],
        seqpacket: bool = False,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
    ) -> None:
        self.path = path
        self.loop = loop
        self.hooks_for = hooks_for
        self.connect = connect
        self.seqpacket = seqpacket
        self.max_handshakes = max(1, max_handshakes)
        self.handshakes: OrderedDict[_Handshake, None] = OrderedDict()
        self.dropped = 0
        sock = listen_unix(path, 128, socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM)
        self.acceptor = Acceptor(sock, loop, f"hybrid {path}", self._accepted)

    def _accepted(self, s: socket.socket, _addr: object) -> None:
        if len(self.handshakes) >= self.max_handshakes:
            oldest = next(iter(self.handshakes))
            self.dropped += 1
            self.loop.health.handshakes_dropped += 1
            ratelog(log, logging.WARNING, "handshake limit",
                    "hybrid %s: %d connections in their handshake (the limit): the oldest dropped",
                    self.path, self.max_handshakes)
            oldest.fail("dropped: too many connections in their handshake", quiet=True)
        self.handshakes[_Handshake(s, self)] = None

    def close(self) -> None:
        for h in list(self.handshakes):
            h.fail("vsproxy closing", quiet=True)
        self.acceptor.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Handshake:
    """One host connection between accept and its connection into the guest."""

    __slots__ = ("_retry", "_timer", "buf", "done", "have_line", "listener", "port", "rest", "sock", "started")

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
        self._retry: TimerHandle | None = None
        loop.set_reader(sock.fileno(), self._read)
        self._timer: TimerHandle | None = loop.call_later(HANDSHAKE_TIMEOUT, self._timeout)

    def _finish(self) -> None:
        """Out of the handshake: its timers, its place in the listener and its fd's callbacks
        go now, so nothing of it outlives it (memory follows the handshakes in flight)."""
        self.done = True
        self.listener.handshakes.pop(self, None)
        for t in (self._timer, self._retry):
            if t is not None:
                t.cancel()
        self._timer = self._retry = None
        self.listener.loop.forget(self.sock.fileno())

    def fail(self, why: str, quiet: bool = False) -> None:
        if self.done:
            return
        if not quiet:
            ratelog(log, logging.INFO, "hybrid handshake failed", "hybrid %s: %s", self.listener.path, why)
        self._finish()
        self.sock.close()

    def on_fault(self, exc: Exception) -> None:
        self.fail(f"internal error: {exc!r}", quiet=True)

    def _timeout(self) -> None:
        self._timer = None
        if not self.done:
            why = "no guest attached" if self.have_line else f"no CONNECT line within {HANDSHAKE_TIMEOUT:.0f} s"
            self.fail(why)

    def _read(self) -> None:
        try:
            data = self.sock.recv(HANDSHAKE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.fail(str(e))
            return
        if not data:
            self.fail("client closed before CONNECT")
            return
        self.buf += data
        nl = self.buf.find(b"\n")
        if nl < 0:
            if len(self.buf) > HANDSHAKE_MAX:
                self.fail("CONNECT line too long")
            return
        line, rest = self.buf[:nl], self.buf[nl + 1 :]
        parts = line.strip().split()
        if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit() or int(parts[1]) > 0xFFFFFFFF:
            self.fail(f"bad handshake line {line[:40]!r}")
            return
        self.listener.loop.forget(self.sock.fileno())
        self.port = int(parts[1])
        self.rest = rest
        self.have_line = True
        self._attach()

    def _attach(self) -> None:
        """Connect once the guest's driver is up: a host program may dial before it is."""
        self._retry = None
        if self.done:
            return
        hooks = self.listener.hooks_for()
        if hooks is None:
            if self.listener.loop.time() - self.started < HANDSHAKE_TIMEOUT:
                self._retry = self.listener.loop.call_later(0.05, self._attach)
            else:
                self.fail("no guest attached")
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
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.address = sock.getsockname()
        self.acceptor = Acceptor(sock, loop, f"tcp listener {host}:{port}", self._accepted)

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
        self.acceptor.close()
