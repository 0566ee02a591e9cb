"""The ``replay`` service kind: ``--service CID:PORT=replay:FILE`` answers guest connections to
CID:PORT from the capture FILE (``--replay-server FILE``: a rule for every host-side port in it).

``ReplayPeer`` is the ``Peer`` the core drives, as it drives a socket: the guest's bytes or
messages go into a ``ServerSession`` (vsproxy/replay/server.py) and its actions come back as
bytes, messages, end of stream or a reset (an ``OSError`` from a read, which the core turns into
RST). Each rule (file, CID, port) has its own ``ReplayBook``, so its counters and the recorded
connections it has used are its own; a file is read once, when the configuration is checked,
so a bad capture stops vsproxy before it starts.

``OPTIONS`` (``--replay-match``, ``--replay-ignore-header``, ``--replay-reuse``,
``--replay-unmatched``) apply to every replay rule of the process; the command line sets them
before the rules are made.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vsproxy.endpoints.base import Buffer, Peer, PeerBase, scatter
from vsproxy.endpoints.services import COUNTERS, Fallback, Service, register
from vsproxy.endpoints.sockets import CoreHooks
from vsproxy.replay.match import Matching
from vsproxy.replay.server import (
    Action,
    EndStream,
    Forward,
    ReplayBook,
    ResetConn,
    Send,
    Session,
    scripts_of,
)
from vsproxy.replay.transcript import Transcript, load_transcript
from vsproxy.vsock.connection import Connection

log = logging.getLogger("vsproxy.replay")

PENDING_MAX = 4 << 20  # guest bytes a session holds unanswered before it stops taking more


class ReplayConfigError(ValueError):
    pass


@dataclass
class ReplayOptions:
    matching: Matching = field(default_factory=Matching)
    reuse: bool = False
    unmatched: str = "rst"  # "rst" or "forward" (to the endpoint the configuration would otherwise use)


OPTIONS = ReplayOptions()


class Library:
    """Captures read once, and one book per rule."""

    def __init__(self) -> None:
        self.transcripts: dict[str, Transcript] = {}
        self.books: dict[tuple[str, int, int], ReplayBook] = {}

    def transcript(self, path: str, toward_guest: bool = False) -> Transcript:
        """The capture at ``path``, read once; it must hold a connection a guest made (or, with
        ``toward_guest``, one the host made toward a guest, which ``--replay-server`` makes)."""
        t = self.transcripts.get(path)
        if t is None:
            try:
                t = load_transcript(path)
            except OSError as e:
                raise ReplayConfigError(f"replay capture {path}: {e.strerror or e}") from None
            if t.error is not None:
                raise ReplayConfigError(f"replay capture {path}: {t.error}")
            if not scripts_of(t) and not (toward_guest and scripts_of(t, made_by_guest=False)):
                raise ReplayConfigError(f"replay capture {path}: no connection a guest made and its peer accepted")
            for problem in t.problems():
                log.warning("replay capture %s: %s", path, problem)
            self.transcripts[path] = t
        return t

    def book(self, path: str, cid: int, port: int) -> ReplayBook:
        key = (path, cid, port)
        b = self.books.get(key)
        if b is None:
            scripts = [s for s in scripts_of(self.transcript(path)) if s.port == port]
            b = ReplayBook(scripts, OPTIONS.matching, OPTIONS.reuse, OPTIONS.unmatched == "forward")
            self.books[key] = b
        return b

    def rows(self) -> dict[str, dict[str, int]]:
        """Each rule's counters, for the snapshot (read on the loop, where they change)."""
        return {f"replay {path} at {cid}:{port}": dataclasses.asdict(b.counters)
                for (path, cid, port), b in self.books.items()}


LIBRARY = Library()
COUNTERS.append(LIBRARY.rows)


@register
class Replay(Service):
    """Answers from a capture (the ARG is its path)."""

    kind = "replay"

    @classmethod
    def check_arg(cls, arg: str | None, cid: int, port: int) -> None:
        if not arg:
            raise ReplayConfigError("service kind 'replay' needs a capture: replay:FILE")
        LIBRARY.book(arg, cid, port)

    @classmethod
    def open_peer(cls, arg: str | None, sock_type: int, cid: int, port: int,
                  schedule: Callable[[Callable[[], None]], None], on_readable: Callable[[], None],
                  on_writable: Callable[[], None], fallback: Fallback | None = None) -> ReplayPeer:
        assert arg is not None  # check_arg ran when the rule was made
        book = LIBRARY.book(arg, cid, port)
        return ReplayPeer(book.session(port, sock_type), f"replay:{arg}", schedule, on_readable, on_writable,
                          fallback)


class _InnerHooks(CoreHooks):
    """What the endpoint a connection is forwarded to reports, taken by the replay peer: the core
    saw the connection established long ago, so "connected" is the replay peer's business."""

    def __init__(self, peer: ReplayPeer) -> None:
        self.peer = peer

    def readable(self, conn: Connection) -> None:
        self.peer._on_readable()

    def writable(self, conn: Connection) -> None:
        self.peer._inner_writable()

    def connected(self, conn: Connection) -> None:
        self.peer._inner_connected()

    def failed(self, conn: Connection, reason: str) -> None:
        self.peer._inner_failed(reason)

    def aborted(self, conn: Connection) -> None:
        self.peer._inner_failed("the forwarded connection was aborted")

    def fault(self, conn: Connection, exc: Exception) -> None:
        self.peer._inner_failed(f"the forwarded connection failed: {type(exc).__name__}")


class ReplayPeer(PeerBase):
    """One guest connection answered by a ``ServerSession``; with ``--replay-unmatched forward``,
    handed over to the endpoint the configuration would otherwise use (``fallback``) at the first
    unmatched message: the guest's bytes so far go there first, then the peer is that endpoint."""

    def __init__(self, session: Session, label: str, schedule: Callable[[Callable[[], None]], None],
                 on_readable: Callable[[], None], on_writable: Callable[[], None],
                 fallback: Fallback | None = None, on_close: Callable[[], None] | None = None) -> None:
        self.session = session
        self.on_close = on_close  # told once, when the core lets the peer go
        self.label = label
        self._schedule = schedule
        self._on_readable = on_readable
        self._on_writable = on_writable
        self._fallback = fallback
        self._stream = bytearray()  # STREAM answers not yet read by the core
        self._messages: deque[tuple[bytes, bool]] = deque()  # SEQPACKET answers
        self._eof = False  # after what is queued: end of stream
        self._reset: str | None = None  # after what is queued: reset, for this reason
        self._reading = False
        self._writing = False
        self.closed = False
        # forwarding: the endpoint, whether it is connected, what it still has to take first
        self._inner: Peer | None = None
        self._inner_up = False
        self._to_inner: deque[bytes] = deque()
        self._inner_shut = False  # the guest half-closed before the endpoint took everything
        self._take(session.opened())

    def describe(self) -> str:
        inner = f" -> {self._inner.describe()}" if self._inner is not None else ""
        return f"{self.label}{inner}"

    # -- the session's actions ---------------------------------------------------------------
    def _take(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                if self.session.stream:
                    self._stream += a.data
                else:
                    self._messages.append((a.data, a.eor))
            elif isinstance(a, EndStream):
                self._eof = True
            elif isinstance(a, Forward):
                self._forward(a)
            elif isinstance(a, ResetConn):
                log.info("%s: %s", self.label, a.reason)
                self._reset = a.reason
        if actions and self._reading:
            self._schedule(self._on_readable)

    def _forward(self, a: Forward) -> None:
        inner = self._fallback(_InnerHooks(self)) if self._fallback is not None else None
        if inner is None:
            log.info("%s: %s, and there is nothing to forward it to", self.label, a.reason)
            self._reset = f"{a.reason}, and there is nothing to forward it to"
            return
        log.info("%s: %s: forwarded to %s", self.label, a.reason, inner.describe())
        self._inner = inner
        self._to_inner.extend(m for m in a.pending if m or not self.session.stream)

    def _ending(self) -> None:
        """Nothing queued: raise the reset, if one is due."""
        if self._reset is not None:
            raise ConnectionResetError(f"replay: {self._reset}")

    # -- forwarding ----------------------------------------------------------------------------
    def _inner_connected(self) -> None:
        self._inner_up = True
        inner = self._inner
        assert inner is not None
        self._flush_inner()
        inner.watch_read(self._reading)
        inner.watch_write(self._writing or bool(self._to_inner))
        self._schedule(self._on_readable)
        self._schedule(self._on_writable)

    def _inner_failed(self, reason: str) -> None:
        self._reset = f"forwarding failed: {reason}"
        self._schedule(self._on_readable)

    def _inner_writable(self) -> None:
        if self._to_inner:
            self._flush_inner()
        self._on_writable()

    def _flush_inner(self) -> bool:
        """The guest's bytes from before the handover go first; True once they all went."""
        inner = self._inner
        assert inner is not None
        q = self._to_inner
        while q:
            if self.session.stream:
                n = inner.send([q[0]])
                if n < len(q[0]):
                    q[0] = q[0][n:]
                    inner.watch_write(True)
                    return False
                q.popleft()
            else:
                if not inner.send_message(q[0], False):
                    inner.watch_write(True)
                    return False
                q.popleft()
        if self._inner_shut:
            self._inner_shut = False
            inner.shutdown_write()
        return True

    def _forwarded(self) -> Peer | None:
        """The endpoint, once it is connected and has had the bytes from before the handover."""
        if self._inner is None or not self._inner_up or self._stream or self._messages:
            return None
        return self._inner

    # -- Peer --------------------------------------------------------------------------------
    def send(self, bufs: Sequence[Buffer]) -> int:
        if self.closed:
            raise BrokenPipeError("replay peer closed")
        if self._inner is not None:
            if not self._inner_up or not self._flush_inner():
                return 0
            return self._inner.send(bufs)
        if len(self._stream) >= PENDING_MAX:
            return 0
        taken = 0
        for b in bufs:
            data = bytes(b)
            taken += len(data)
            self._take(self.session.received(data))
            if self._inner is not None:
                break  # the rest of these bytes are the endpoint's, taken once it is connected
        return taken

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self._stream:
            inner = self._forwarded()
            if inner is not None:
                return inner.recv_into(bufs)
            if self._inner is not None:
                self._ending()
                return None
            self._ending()
            return 0 if self._eof or self.closed else None
        n = scatter(self._stream, bufs)
        del self._stream[:n]
        if self._writing:
            self._schedule(self._on_writable)
        return n

    def send_message(self, data: bytes, eor: bool) -> bool:
        if self.closed:
            raise BrokenPipeError("replay peer closed")
        if self._inner is not None:
            if not self._inner_up or not self._flush_inner():
                return False
            return self._inner.send_message(data, eor)
        self._take(self.session.received(data, eor))
        return True

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        if not self._messages:
            inner = self._forwarded()
            if inner is not None:
                return inner.recv_message(limit)
            self._ending()
            if self._inner is not None:
                return None
            return (b"", False) if self._eof or self.closed else None
        return self._messages.popleft()

    def shutdown_write(self) -> None:
        if self._inner is not None:
            if self._inner_up and not self._to_inner:
                self._inner.shutdown_write()
            else:
                self._inner_shut = True
            return
        self._take(self.session.shut())
        if self._reading:
            self._schedule(self._on_readable)

    def close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._stream.clear()
        self._messages.clear()
        if self._inner is not None:
            self._inner.close(reset)
        if self.on_close is not None:
            self.on_close()

    def watch_read(self, on: bool) -> None:
        self._reading = on
        if self._inner is not None and self._inner_up:
            self._inner.watch_read(on)
        if on and (self._stream or self._messages or self._eof or self._reset is not None):
            self._schedule(self._on_readable)

    def watch_write(self, on: bool) -> None:
        self._writing = on
        if self._inner is not None:
            if self._inner_up:
                self._inner.watch_write(on or bool(self._to_inner))
            return
        if on and len(self._stream) < PENDING_MAX:
            self._schedule(self._on_writable)

    def established(self, local_port: int) -> None:
        """A connection toward the guest was accepted (server replay's host-made connections)."""
        self._take(self.session.established())
