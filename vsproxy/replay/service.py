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

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vsproxy.endpoints.base import Buffer, PeerBase, scatter
from vsproxy.endpoints.services import REPORTERS, Service, register
from vsproxy.replay.match import Matching
from vsproxy.replay.server import (
    Action,
    EndStream,
    Forward,
    ReplayBook,
    ReplayCounters,
    ResetConn,
    Send,
    ServerSession,
    scripts_of,
)
from vsproxy.replay.transcript import Transcript, load_transcript

log = logging.getLogger("vsproxy.replay")

PENDING_MAX = 4 << 20  # guest bytes a session holds unanswered before it stops taking more


class ReplayConfigError(ValueError):
    pass


@dataclass
class ReplayOptions:
    matching: Matching = field(default_factory=Matching)
    reuse: bool = False
    unmatched: str = "rst"  # "rst" or "forward"


OPTIONS = ReplayOptions()


class Library:
    """Captures read once, and one book per rule."""

    def __init__(self) -> None:
        self.transcripts: dict[str, Transcript] = {}
        self.books: dict[tuple[str, int, int], ReplayBook] = {}

    def transcript(self, path: str) -> Transcript:
        t = self.transcripts.get(path)
        if t is None:
            try:
                t = load_transcript(path)
            except OSError as e:
                raise ReplayConfigError(f"replay capture {path}: {e.strerror or e}") from None
            if t.error is not None:
                raise ReplayConfigError(f"replay capture {path}: {t.error}")
            if not scripts_of(t):
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

    def report_lines(self) -> list[str]:
        return [f"replay {path} at {cid}:{port}: {b.counters.text()}" for (path, cid, port), b in self.books.items()]

    def counters(self) -> dict[str, ReplayCounters]:
        return {f"{path} at {cid}:{port}": b.counters for (path, cid, port), b in self.books.items()}


LIBRARY = Library()
REPORTERS.append(LIBRARY.report_lines)


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
                  on_writable: Callable[[], None]) -> ReplayPeer:
        assert arg is not None  # check_arg ran when the rule was made
        book = LIBRARY.book(arg, cid, port)
        return ReplayPeer(book.session(port, sock_type), f"replay:{arg}", schedule, on_readable, on_writable)


class ReplayPeer(PeerBase):
    """One guest connection answered by a ``ServerSession``."""

    def __init__(self, session: ServerSession, label: str, schedule: Callable[[Callable[[], None]], None],
                 on_readable: Callable[[], None], on_writable: Callable[[], None]) -> None:
        self.session = session
        self.label = label
        self._schedule = schedule
        self._on_readable = on_readable
        self._on_writable = on_writable
        self._stream = bytearray()  # STREAM answers not yet read by the core
        self._messages: deque[tuple[bytes, bool]] = deque()  # SEQPACKET answers
        self._eof = False  # after what is queued: end of stream
        self._reset: str | None = None  # after what is queued: reset, for this reason
        self._reading = False
        self._writing = False
        self.closed = False
        self._take(session.opened())

    def describe(self) -> str:
        return self.label

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
            elif isinstance(a, ResetConn | Forward):  # forwarding is not offered yet: a reset
                log.info("%s: %s", self.label, a.reason)
                self._reset = a.reason
        if actions and self._reading:
            self._schedule(self._on_readable)

    def _ending(self) -> None:
        """Nothing queued: raise the reset, if one is due."""
        if self._reset is not None:
            raise ConnectionResetError(f"replay: {self._reset}")

    # -- Peer --------------------------------------------------------------------------------
    def send(self, bufs: Sequence[Buffer]) -> int:
        if self.closed:
            raise BrokenPipeError("replay peer closed")
        if len(self._stream) >= PENDING_MAX:
            return 0
        taken = 0
        for b in bufs:
            data = bytes(b)
            taken += len(data)
            self._take(self.session.received(data))
        return taken

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self._stream:
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
        self._take(self.session.received(data, eor))
        return True

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        if not self._messages:
            self._ending()
            return (b"", False) if self._eof or self.closed else None
        return self._messages.popleft()

    def shutdown_write(self) -> None:
        self._take(self.session.shut())
        if self._reading:
            self._schedule(self._on_readable)

    def close(self, reset: bool) -> None:
        self.closed = True
        self._stream.clear()
        self._messages.clear()

    def watch_read(self, on: bool) -> None:
        self._reading = on
        if on and (self._stream or self._messages or self._eof or self._reset is not None):
            self._schedule(self._on_readable)

    def watch_write(self, on: bool) -> None:
        self._writing = on
        if on and len(self._stream) < PENDING_MAX:
            self._schedule(self._on_writable)

    def established(self, local_port: int) -> None:
        pass

