"""Server replay, sans-I/O: vsproxy plays the host side of recorded connections.

A ``ReplayBook`` holds the connections a capture shows a guest making (``Script``s), by the port
it dialled. A ``ServerSession`` is one live guest connection to such a port: the guest's bytes
in (``received``, ``shut``), ``Send`` / ``EndStream`` / ``Reset`` actions out. It chooses a
recorded connection when the guest's first message matches that connection's first one
(``vsproxy.replay.match``: exact bytes by default), or at once when the recorded server spoke
first; a recorded connection is used once unless the book reuses them. Then it walks the
recorded steps: each server step is played (bytes with their SEQPACKET boundaries and EOR, the
half-close), each guest message must match the next recorded one.

Half-closes keep their order where it carries meaning: the recorded guest's half-close is waited
for only when the server's next step is its own half-close (an echo server that closes when its
client does); bytes the server sent after the guest's half-close are sent without waiting for
it (they answered the request, not the close). The final RST of vsock's close handshake is the
core's business, not a step to play.

Counters per book (the rule): ``matched`` guest messages, ``unmatched`` ones (the connection is
reset, or forwarded), and ``exhausted`` connections that came when every recorded connection
their first message matches had been used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Protocol

from vsproxy.replay.match import Matching, Result
from vsproxy.replay.transcript import Data, Outcome, Reset, Shutdown, Step, Transcript
from vsproxy.vsock import header as H

_STREAM: Final = int(H.Type.STREAM)


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes
    eor: bool = False  # SEQPACKET: the message ends a record (each Send is one message)


@dataclass(frozen=True, slots=True)
class EndStream:
    """The recorded server shut its sending side: the guest reads end of stream. ``flags``: the
    recorded SHUTDOWN's (RCV|SEND: it closed both ways at once)."""

    flags: int = H.SHUTDOWN_SEND


@dataclass(frozen=True, slots=True)
class ResetConn:
    reason: str


@dataclass(frozen=True, slots=True)
class Forward:
    """No recorded message matched: hand the connection to the endpoint the configuration
    would otherwise use, with the guest's bytes so far (``--replay-unmatched forward``)."""

    pending: tuple[bytes, ...]  # STREAM: one item; SEQPACKET: the messages, in order
    reason: str


Action = Send | EndStream | ResetConn | Forward


@dataclass(frozen=True, slots=True)
class Script:
    """One recorded connection, as the server replays it."""

    conv_id: int
    port: int  # the port the guest dialled
    sock_type: int
    steps: tuple[Step, ...]

    def first_data(self) -> Data | None:
        return next((s for s in self.steps if isinstance(s, Data)), None)


@dataclass
class ReplayCounters:
    matched: int = 0
    unmatched: int = 0
    exhausted: int = 0

    def text(self) -> str:
        return f"matched={self.matched} unmatched={self.unmatched} exhausted={self.exhausted}"


def scripts_of(t: Transcript, made_by_guest: bool = True) -> list[Script]:
    """The connections ``t`` shows a guest making and its peer accepting (a classic pcap, which
    does not say which end is the guest: every accepted connection, the client playing the guest);
    ``made_by_guest=False``: those its peer made toward the guest (the guest answers them)."""
    out = []
    for conv in t.conversations:
        if conv.outcome is not Outcome.ESTABLISHED or conv.lost or conv.cut:
            continue
        if (conv.guest_is_client is False) == made_by_guest:
            continue
        out.append(Script(conv.id, conv.server[1], conv.sock_type, tuple(conv.steps)))
    return out


def host_ports(t: Transcript) -> list[tuple[int, int]]:
    """The peers (CID, port), as the guest saw them, of the connections a guest made to a peer that
    was no sibling guest (what ``--replay-server`` serves), in order of first appearance."""
    devices = {c.device for c in t.conversations}
    seen: list[tuple[int, int]] = []
    sibling_cids = {c.guest[0] for c in t.conversations if c.guest is not None and c.device in devices}
    for conv in t.conversations:
        if conv.outcome is not Outcome.ESTABLISHED or conv.guest_is_client is not True:
            continue
        if conv.server[0] in sibling_cids and conv.real_peer is None:
            continue  # a sibling's port: the other guest's business
        if conv.server not in seen:
            seen.append(conv.server)
    return seen


@dataclass
class ReplayBook:
    """The recorded connections of one capture that one rule answers from."""

    scripts: list[Script]
    matching: Matching = field(default_factory=Matching)
    reuse: bool = False
    forward: bool = False  # unmatched: Forward instead of ResetConn
    counters: ReplayCounters = field(default_factory=ReplayCounters)
    _used: set[int] = field(default_factory=set)

    def candidates(self, port: int, sock_type: int) -> list[Script]:
        return [s for s in self.scripts if s.port == port and s.sock_type == sock_type]

    def free(self, s: Script) -> bool:
        return self.reuse or s.conv_id not in self._used

    def take(self, s: Script) -> None:
        self._used.add(s.conv_id)

    def session(self, port: int, sock_type: int) -> ServerSession:
        return ServerSession(self, port, sock_type)


class Session(Protocol):
    """What a replay peer (vsproxy/replay/service.py) drives: ``ServerSession`` answering the
    guest, or ``client.ClientSession`` playing a connection toward it."""

    stream: bool

    def opened(self) -> list[Action]: ...
    def established(self) -> list[Action]: ...
    def received(self, data: bytes, eor: bool = False) -> list[Action]: ...
    def shut(self) -> list[Action]: ...


class ServerSession:
    """One guest connection answered from a book. Call ``opened`` first."""

    def __init__(self, book: ReplayBook, port: int, sock_type: int) -> None:
        self.book = book
        self.port = port
        self.stream = sock_type == _STREAM
        self.sock_type = sock_type
        self.script: Script | None = None
        self.pos = 0
        self.buf = bytearray()  # STREAM: the guest's bytes not yet matched
        self.messages: list[bytes] = []  # SEQPACKET: the guest's messages so far, for Forward
        self.guest_shut = False
        self.over = False  # reset, forwarded or done: nothing more is played

    # -- events in ---------------------------------------------------------------------------
    def opened(self) -> list[Action]:
        """The guest's connection was accepted: a recorded server that spoke first speaks now."""
        for s in self.book.candidates(self.port, self.sock_type):
            first = s.first_data()
            if first is not None and not first.from_client and self.book.free(s):
                self._choose(s)
                return self._advance()
        return []

    def established(self) -> list[Action]:
        return []  # the guest connected: ``opened`` said what there was to say

    def received(self, data: bytes, eor: bool = False) -> list[Action]:
        """Bytes from the guest (SEQPACKET: one whole message)."""
        if self.over:
            return []
        if self.stream:
            self.buf += data
        else:
            self.messages.append(data)
        return self._match(data, False)

    def shut(self) -> list[Action]:
        """The guest will send no more."""
        if self.over:
            return []
        self.guest_shut = True
        out: list[Action] = []
        if self.stream and self.buf:
            out += self._match(b"", True)
            if self.over:
                return out
        step = self._step()
        if isinstance(step, Shutdown) and step.from_client:
            self.pos += 1
            out += self._advance()
        elif isinstance(step, Shutdown) and self.script is not None:
            out += self._advance()  # the server's close that waited for this half-close
        return out

    # -- the walk ----------------------------------------------------------------------------
    def _step(self) -> Step | None:
        s = self.script
        return s.steps[self.pos] if s is not None and self.pos < len(s.steps) else None

    def _choose(self, s: Script) -> None:
        self.script, self.pos = s, 0
        self.book.take(s)

    def _match(self, message: bytes, ended: bool) -> list[Action]:
        out: list[Action] = []
        while not self.over:
            if self.script is None:
                got = self._select(message, ended)
                if got is None:
                    return out
                if isinstance(got, list):
                    return out + got
                out += got.actions
                if not self.stream or not self.buf:
                    return out
                continue
            step = self._step()
            if not isinstance(step, Data) or not step.from_client:
                return out + self._unmatched("more from the guest than the capture has")
            checked = self._check(step, message, ended)
            if checked.result is Result.WAIT:
                return out
            if checked.result is Result.NO:
                return out + self._unmatched(f"does not match recorded message {self._msg_no()}")
            self._consume(checked.used)
            out += self._advance()
            if not self.stream or not self.buf:
                return out
        return out

    def _select(self, message: bytes, ended: bool) -> _Chosen | list[Action] | None:
        """The first message picks a recorded connection; None: wait for more bytes."""
        cands = [s for s in self.book.candidates(self.port, self.sock_type) if s.first_data() is not None]
        waiting = False
        for s in cands:
            if not self.book.free(s):
                continue
            first = s.first_data()
            assert first is not None
            if not first.from_client:
                continue
            checked = self._check(first, message, ended)
            if checked.result is Result.MATCH:
                self._choose(s)
                self.pos = s.steps.index(first)
                self._consume(checked.used)
                return _Chosen(self._advance())
            waiting = waiting or checked.result is Result.WAIT
        if waiting:
            return None
        for s in cands:  # would a used one have matched? then the book is exhausted for it
            first = s.first_data()
            assert first is not None
            if not self.book.free(s) and first.from_client and self._check(first, message, True).result is Result.MATCH:
                self.book.counters.exhausted += 1
                self.over = True
                return [ResetConn(f"every recorded connection to port {self.port} that matches was used")]
        return self._unmatched("matches no recorded connection's first message" if cands else
                               f"the capture has no connection to port {self.port}")

    def _check(self, step: Data, message: bytes, ended: bool) -> _Checked:
        if self.stream:
            o = self.book.matching.check(bytes(self.buf), step.data, ended)
            return _Checked(o.result, o.used)
        o = self.book.matching.check(message, step.data, True)
        if o.result is Result.MATCH and o.used != len(message):
            return _Checked(Result.NO, 0)  # a message is matched whole
        return _Checked(o.result, o.used)

    def _consume(self, used: int) -> None:
        self.book.counters.matched += 1
        if self.stream:
            del self.buf[:used]
        self.messages.clear()
        self.pos += 1

    def _msg_no(self) -> int:
        s = self.script
        assert s is not None
        return sum(1 for x in s.steps[: self.pos + 1] if isinstance(x, Data) and x.from_client)

    def _unmatched(self, why: str) -> list[Action]:
        self.book.counters.unmatched += 1
        self.over = True
        text = f"guest message {why}"
        if self.book.forward:
            pending = (bytes(self.buf),) if self.stream else tuple(self.messages)
            return [Forward(pending, text)]
        return [ResetConn(text)]

    def _advance(self) -> list[Action]:
        """Play the recorded server's steps up to the next guest message it waits for."""
        s = self.script
        assert s is not None
        out: list[Action] = []
        steps = s.steps
        while self.pos < len(steps):
            step = steps[self.pos]
            if step.from_client:
                if isinstance(step, Data):
                    return out
                if isinstance(step, Reset):
                    self.over = True
                    return out
                # the guest's half-close: wait for it only when the server's next step is its own
                nxt = next((x for x in steps[self.pos + 1 :] if not x.from_client), None)
                if isinstance(nxt, Shutdown) and not self.guest_shut:
                    return out
            elif isinstance(step, Data):
                if step.data or not self.stream:
                    out.append(Send(step.data, step.eor))
            elif isinstance(step, Shutdown):
                if not self.guest_shut and any(isinstance(x, Shutdown) and x.from_client
                                               for x in steps[: self.pos]):
                    # The recorded server closed after the guest's half-close: its answers
                    # need not wait for it (an HTTP client may never half-close), its close does
                    # (shut() goes on from here), so the guest sees the order the capture had.
                    return out
                if step.flags & H.SHUTDOWN_SEND:
                    out.append(EndStream(step.flags & H.SHUTDOWN_BOTH))
            elif isinstance(step, Reset):
                before = steps[self.pos - 1] if self.pos else None
                closing = isinstance(before, Shutdown) and before.from_client and before.flags == H.SHUTDOWN_BOTH
                if not closing:  # a reset of its own, not the end of the guest's close
                    out.append(ResetConn("the recorded server reset the connection"))
                self.over = True
                self.pos = len(steps)
                return out
            self.pos += 1
        return out


@dataclass(frozen=True, slots=True)
class _Chosen:
    actions: list[Action]


@dataclass(frozen=True, slots=True)
class _Checked:
    result: Result
    used: int

