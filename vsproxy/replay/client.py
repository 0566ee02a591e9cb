"""Client replay, sans-I/O: the plan that plays a recorded connection's connecting side, what the
other side answers (``Answers``), and the comparison with what it answered in the capture.

``plan(conv)`` turns a conversation into ``Send`` / ``ShutWrite`` / ``Abort`` / ``Await`` steps:
before each thing the connecting side did, wait until the other side has answered as much as it
had by then in the capture (bytes for STREAM, messages for SEQPACKET, whole responses for HTTP),
so a request is never sent before the answer it followed; at the end, ``Await`` everything and
the end of stream when the recorded side ended it. Each step keeps its recorded time (seconds
after the connection's first packet) for ``--speed``.

``compare_answers`` judges what came back: byte for byte, or application-aware for HTTP (status,
headers except the ignored ones, body; JSON bodies compared as JSON), and SEQPACKET message by
message (the record mark is left out: unix sockets do not carry it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from vsproxy.replay import http
from vsproxy.replay.compare import Line, byte_context, snippet
from vsproxy.replay.server import Action, EndStream, ResetConn
from vsproxy.replay.server import Send as SendAction
from vsproxy.replay.transcript import Conversation, Data, Outcome, Reset, Shutdown
from vsproxy.vsock import header as H


@dataclass(frozen=True, slots=True)
class Send:
    at: float
    data: bytes
    eor: bool = False  # SEQPACKET: one message, with its record mark


@dataclass(frozen=True, slots=True)
class ShutWrite:
    at: float
    flags: int = H.SHUTDOWN_SEND  # as recorded: SEND, or RCV|SEND (a full close)


@dataclass(frozen=True, slots=True)
class Abort:
    at: float


@dataclass(frozen=True, slots=True)
class Await:
    at: float
    units: int  # answers (bytes, messages or HTTP responses) received in all, at least
    end: bool = False  # and the end of the stream (the last step: wait for it when recorded)


PlanStep = Send | ShutWrite | Abort | Await


def replayable(conv: Conversation) -> bool:
    """A connection whose connecting side a client can play: accepted, seen from its start, and
    made by the guest (or by the client, in a classic pcap that does not say which is the guest)."""
    return conv.outcome is Outcome.ESTABLISHED and conv.guest_is_client is not False


def app_aware(conv: Conversation, exact: bool) -> bool:
    return not exact and conv.proto == "http" and conv.sock_type == int(H.Type.STREAM)


def units_of(conv: Conversation, data: list[Data], aware: bool) -> int:
    """How many answer units the recorded ``data`` (of the accepting side) holds."""
    if conv.sock_type == int(H.Type.SEQPACKET):
        return len(data)
    if aware:
        return len(_responses(b"".join(d.data for d in data), ended=False)[0])
    return sum(len(d.data) for d in data)


def plan(conv: Conversation, exact: bool = False) -> list[PlanStep]:
    aware = app_aware(conv, exact)
    out: list[PlanStep] = []
    answered: list[Data] = []
    awaited = 0
    ended = awaited_end = False  # the accepting side had ended its stream (by now; waited for)
    t0 = conv.start
    for step in conv.steps:
        at = max(0.0, step.time - t0)
        if not step.from_client:
            if isinstance(step, Data):
                answered.append(step)
            elif isinstance(step, Shutdown) and step.flags & H.SHUTDOWN_SEND:
                ended = True
            continue
        want = units_of(conv, answered, aware)
        if want > awaited or (ended and not awaited_end):
            out.append(Await(at, want, ended))
            awaited, awaited_end = want, ended
        if isinstance(step, Data):
            out.append(Send(at, step.data, step.eor))
        elif isinstance(step, Shutdown):
            out.append(ShutWrite(at, step.flags & H.SHUTDOWN_BOTH))
        elif isinstance(step, Reset):
            out.append(Abort(at))
            return out
    out.append(Await(max(0.0, conv.end - t0), units_of(conv, answered, aware), server_ended(conv)))
    return out


@dataclass
class Answers:
    """What the accepting side sent back, as it arrives."""

    seqpacket: bool
    aware: bool = False  # count HTTP responses
    data: bytearray = field(default_factory=bytearray)
    messages: list[bytes] = field(default_factory=list)
    ended: bool = False  # end of stream
    reset: bool = False
    _parsed: int = 0  # HTTP: responses complete so far
    _pos: int = 0  # HTTP: bytes those responses used

    def feed(self, data: bytes) -> None:
        if self.seqpacket:
            self.messages.append(data)
        else:
            self.data += data

    def units(self) -> int:
        if self.seqpacket:
            return len(self.messages)
        if not self.aware:
            return len(self.data)
        while True:  # count responses incrementally: each byte is parsed a bounded number of times
            try:
                got = http.parse(bytes(self.data[self._pos :]), self.ended)
            except http.NotHttp:
                return self._parsed + 1  # not HTTP: nothing more to wait for
            if got is None:
                return self._parsed
            self._parsed += 1
            self._pos += got[1]


@dataclass(frozen=True, slots=True)
class Mismatch:
    what: str
    context: tuple[Line, ...] = ()

    def lines(self, recorded: str = "recorded", live: str = "live") -> list[str]:
        names = {"A": recorded, "B": live, "": ""}
        return [self.what, *(f"  {names[w]}: {t}" if w else f"  {t}" for w, t in self.context)]


def compare_answers(conv: Conversation, got: Answers, exact: bool = False,
                    ignore_headers: frozenset[str] = frozenset()) -> Mismatch | None:
    """What the live side answered (``got``) against the capture: None when they agree."""
    m = _compare_answers(conv, got, exact, ignore_headers)
    if m is not None and got.reset:
        return Mismatch(f"{m.what} (the live side reset the connection)", m.context)
    return m


def _compare_answers(conv: Conversation, got: Answers, exact: bool,
                     ignore_headers: frozenset[str]) -> Mismatch | None:
    recorded = conv.data(False)
    if conv.sock_type == int(H.Type.SEQPACKET):
        want = [d.data for d in recorded]
        for i in range(max(len(want), len(got.messages))):
            a = want[i] if i < len(want) else None
            b = got.messages[i] if i < len(got.messages) else None
            if a == b:
                continue
            if a is None or b is None:
                only, who = (b, "B") if a is None else (a, "A")
                assert only is not None
                side = "only live" if who == "B" else "only recorded"
                return Mismatch(f"message {i + 1}: {side}", ((who, f"{len(only)} bytes {snippet(only)}"),))
            return Mismatch(f"message {i + 1} differs", byte_context(a, b))
        return _end_mismatch(conv, got)
    want_bytes = b"".join(d.data for d in recorded)
    if app_aware(conv, exact):
        m = _http_mismatch(want_bytes, bytes(got.data), ignore_headers)
        if m is not None:
            return m
    elif want_bytes != bytes(got.data):
        return Mismatch("bytes differ", byte_context(want_bytes, bytes(got.data)))
    return _end_mismatch(conv, got)


def server_ended(conv: Conversation) -> bool:
    """Whether the accepting side ended its stream (a half-close, or an RST of its own: not the
    one that completes the connecting side's close)."""
    before: object = None
    for s in conv.steps:
        if not s.from_client:
            if isinstance(s, Shutdown) and s.flags & H.SHUTDOWN_SEND:
                return True
            if isinstance(s, Reset):
                return not (isinstance(before, Shutdown) and before.from_client)
        before = s
    return False


def _end_mismatch(conv: Conversation, got: Answers) -> Mismatch | None:
    if server_ended(conv) and not (got.ended or got.reset):
        return Mismatch("the recorded side ended its stream; the live one did not")
    return None


def _responses(data: bytes, ended: bool) -> tuple[list[http.HttpMessage], bytes]:
    """The whole HTTP messages in ``data`` and what is left after them."""
    out = []
    pos = 0
    while pos < len(data):
        try:
            got = http.parse(data[pos:], ended)
        except http.NotHttp:
            break
        if got is None:
            break
        out.append(got[0])
        pos += got[1]
    return out, data[pos:]


def _http_mismatch(want: bytes, got: bytes, ignored: frozenset[str]) -> Mismatch | None:
    a, rest_a = _responses(want, True)
    b, rest_b = _responses(got, True)
    for i in range(max(len(a), len(b))):
        ra = a[i] if i < len(a) else None
        rb = b[i] if i < len(b) else None
        n = i + 1
        if ra is None or rb is None:
            only, who = (rb, "B") if ra is None else (ra, "A")
            assert only is not None
            return Mismatch(f"HTTP response {n}: only {'live' if who == 'B' else 'recorded'}",
                            ((who, f"{only.status} {only.reason}"),))
        if ra.status != rb.status:
            return Mismatch(f"HTTP response {n}: status differs", (("A", f"{ra.status} {ra.reason}"),
                                                                    ("B", f"{rb.status} {rb.reason}")))
        ha, hb = ra.headers_except(ignored), rb.headers_except(ignored)
        if ha != hb:
            return Mismatch(f"HTTP response {n}: headers differ", _header_context(ha, hb))
        ja, jb = ra.json_body(), rb.json_body()
        if ja is not None and jb is not None:
            if ja != jb:
                return Mismatch(f"HTTP response {n}: JSON body differs", _json_context(ja, jb))
        elif ra.body != rb.body:
            return Mismatch(f"HTTP response {n}: body differs", byte_context(ra.body, rb.body))
    if rest_a != rest_b:
        return Mismatch("bytes after the HTTP responses differ", byte_context(rest_a, rest_b))
    return None


def _header_context(a: tuple[tuple[str, str], ...], b: tuple[tuple[str, str], ...]) -> tuple[Line, ...]:
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x != y:
            return (("A", f"{x[0]}: {x[1]}" if x else "(no more headers)"),
                    ("B", f"{y[0]}: {y[1]}" if y else "(no more headers)"))
    return ()


def _json_context(a: object, b: object, path: str = "$") -> tuple[Line, ...]:
    """The first place two JSON values part, as a path."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, _MISSING) != b.get(k, _MISSING):
                if k in a and k in b:
                    return _json_context(a[k], b[k], f"{path}.{k}")
                return (("", f"at {path}.{k}"), ("A", _short(a.get(k, _MISSING))), ("B", _short(b.get(k, _MISSING))))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _json_context(x, y, f"{path}[{i}]")
    return (("", f"at {path}"), ("A", _short(a)), ("B", _short(b)))


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def _short(v: object) -> str:
    if isinstance(v, _Missing):
        return "(absent)"
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."



class ClientSession:
    """Playing a recorded connection's connecting side from inside vsproxy (server replay's
    connections toward the guest), sans-I/O: the same actions as ``ServerSession``
    (vsproxy/replay/server.py) come out, ``result`` compares what the guest answered."""

    def __init__(self, conv: Conversation, exact: bool = True) -> None:
        self.conv = conv
        self.stream = conv.sock_type == int(H.Type.STREAM)
        self.steps = plan(conv, exact)
        self.i = 0
        self.answers = Answers(not self.stream, app_aware(conv, exact))
        self.exact = exact
        self.started = False

    @property
    def done(self) -> bool:
        return self.i >= len(self.steps)

    def opened(self) -> list[Action]:
        return []  # nothing until the guest accepts

    def established(self) -> list[Action]:
        self.started = True
        return self._advance()

    def received(self, data: bytes, eor: bool = False) -> list[Action]:
        self.answers.feed(data)
        return self._advance()

    def shut(self) -> list[Action]:
        self.answers.ended = True
        return self._advance()

    def result(self) -> Mismatch | None:
        if not self.started:
            return Mismatch("the guest did not accept the connection")
        return compare_answers(self.conv, self.answers, self.exact)

    def _advance(self) -> list[Action]:
        out: list[Action] = []
        a = self.answers
        while self.i < len(self.steps):
            step = self.steps[self.i]
            if isinstance(step, Send):
                out.append(SendAction(step.data, step.eor))
            elif isinstance(step, ShutWrite):
                out.append(EndStream(step.flags))
            elif isinstance(step, Abort):
                out.append(ResetConn("the recorded connecting side reset the connection"))
            elif isinstance(step, Await):
                met = a.ended or a.reset or (a.units() >= step.units and not step.end)
                if not met:
                    return out
            self.i += 1
        return out
