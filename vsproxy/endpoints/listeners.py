"""Host listeners: hybrid unix sockets (a ``CONNECT <port>`` line, then a connection into
the guest), TCP ports that lead into one guest port, and the ``Acceptor`` under every
listening socket (the vhost-user one too), which survives running out of descriptors."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Callable

from vsproxy.endpoints.sockets import (
    LINGER_RESET,
    SEQPACKET,
    CoreHooks,
    HybridPeer,
    SocketPeer,
    refused_for_descriptors,
)
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


# How often a hybrid listener checks that its socket file is still its own.
PATH_CHECK_INTERVAL = 1.0


def _path_ident(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class SocketFile:
    """The file a listening unix socket is found by (a hybrid socket, the vhost-user socket),
    checked every ``PATH_CHECK_INTERVAL``. Removed under vsproxy (a cleanup script, a tmpfiles
    run): made again, logged. Replaced by another program's file: logged once, left alone (and
    not removed at exit); vsproxy keeps its old socket (connections made go on) and makes its
    own file again if that one goes."""

    def __init__(self, path: str, loop: Loop, what: str, make: Callable[[], Acceptor]) -> None:
        self.path = path
        self.loop = loop
        self.what = what
        self._make = make
        self.acceptor = make()
        self.ident = _path_ident(path)
        self._replaced = False
        self._timer: TimerHandle | None = loop.call_later(PATH_CHECK_INTERVAL, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.acceptor.closed:
            return
        now = _path_ident(self.path)
        if now is None:
            try:
                acceptor = self._make()
            except OSError as e:
                ratelog(log, logging.WARNING, f"{self.what} gone", "%s: the socket file was removed and cannot be "
                        "made again: %s", self.what, e.strerror or e)
            else:
                self.acceptor.close()  # connections it accepted live on; its backlog goes with it
                self.acceptor = acceptor
                self.ident = _path_ident(self.path)
                self._replaced = False
                log.warning("%s: the socket file was removed under vsproxy: listening there again", self.what)
        elif now != self.ident and not self._replaced:
            self._replaced = True
            log.warning("%s: the socket file was replaced by another one: what connects there no longer reaches "
                        "vsproxy; vsproxy leaves that file alone and listens there again if it is removed",
                        self.what)
        self._timer = self.loop.call_later(PATH_CHECK_INTERVAL, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.acceptor.close()
        if self.ident is not None and _path_ident(self.path) == self.ident:  # only vsproxy's own file
            with contextlib.suppress(OSError):
                os.unlink(self.path)


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
        self.file = SocketFile(path, loop, f"hybrid {path}", self._listen)

    @property
    def acceptor(self) -> Acceptor:
        return self.file.acceptor

    def _listen(self) -> Acceptor:
        sock = listen_unix(self.path, 128, socket.SOCK_SEQPACKET if self.seqpacket else socket.SOCK_STREAM)
        return Acceptor(sock, self.loop, f"hybrid {self.path}", self._accepted)

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
        self.file.close()


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


def into_guest(s: socket.socket, loop: Loop, hooks_for: Callable[[], CoreHooks | None],
               connect: Callable[[SocketPeer, int, int], Connection | None], label: str, guest_port: int) -> None:
    """An accepted host socket becomes a STREAM connection into the guest's ``guest_port``, or
    is reset (no guest attached, a rule or a limit refused it)."""
    hooks = hooks_for()
    if hooks is None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        s.close()
        return
    peer = SocketPeer(s, loop, hooks, label)
    conn = connect(peer, guest_port, 1)
    if conn is None:
        peer.close(reset=True)
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
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = addr[:2] if isinstance(addr, tuple) else ("?", 0)
        into_guest(s, self.loop, self.hooks_for, self.connect, f"tcp:{host}:{port}", self.guest_port)

    def close(self) -> None:
        self.acceptor.close()


def hybrid_dial(path: str, port: int, timeout: float | None = None) -> tuple[socket.socket, bytes]:
    """A host program's side of the handshake ``HybridListener`` serves: connect to ``path``,
    send ``CONNECT port``, read the answer line byte by byte (what follows it is the guest's
    data, left in the socket). The socket and the ``OK ...`` line; ConnectionError when vsproxy
    closes first or answers otherwise. It blocks until the guest accepts: the guest must run
    elsewhere (a real guest, another process)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"CONNECT %d\n" % port)
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                raise ConnectionError(f"hybrid connect to port {port}: vsproxy closed after {line!r}")
            line += chunk
            if len(line) > HANDSHAKE_MAX:
                raise ConnectionError(f"hybrid connect to port {port}: no line end in {line!r}")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"hybrid connect to port {port}: answered {line!r}")
    except BaseException:
        s.close()
        raise
    return s, line
