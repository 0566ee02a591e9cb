"""Transcripts: what each connection in a capture carried, as its two ends exchanged it.

A ``Transcript`` is built from decoded packets (``vsproxy.decode.Decoder``), so connection ids,
protocols and application summaries are the ones ``vsproxy read`` shows. Per connection (a
``Conversation``): the device, the ends as the guest saw them (the packets on a device's
interface are the guest's view) and the real peer a remap sent it to (from vsproxy's
``rewritten ... real peer C:P`` comment), the socket type, who connected, and the ordered
``steps``:

- ``Data``: bytes one side sent. SEQPACKET: one whole message (its RW packets up to the one with
  EOM), with its EOR mark. STREAM: when a dissector knows the protocol, the bytes up to the
  packet in which application messages end (``app`` holds their summaries); else each RW
  packet's bytes, as they crossed. Bytes a side sent are never merged across another step.
- ``Shutdown``: a half-close, with its RCV/SEND flags.
- ``Reset``: an RST.

The connection's ``outcome`` says whether it was accepted, refused (RST before RESPONSE),
denied (the REQUEST carries vsproxy's denial), still pending, or seen without its start; its
``verdict`` is the capture comment's. Credit packets carry no step; their ``fwd_cnt`` is used
to see bytes the capture lost (a peer acknowledged more than the capture holds).

A capture that starts inside a connection, ends before connections closed, lost packets or is
damaged is read as far as it goes, and the transcript says so (``problems``).

Sans-I/O: ``TranscriptBuilder.feed`` takes ``Decoded`` packets one at a time (its ``transcript``
grows as they come, and ``pending`` shows what is not a step yet, for a live view);
``transcript_of`` runs a decoder over records; ``load_transcript`` reads files (the only I/O here).
A builder made with ``stream=True`` also hands out each step as it is made (``drain``: the step,
its conversation and the packets it came in), and lets go of what it has handed out, so a reader
that prints steps as they come (``vsproxy read --follow``) holds only what is not printed yet.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Final, NamedTuple

from dissectors.streams import DETECT_BYTES, MAX_CONNECTIONS
from vsproxy.capture.reader import CaptureError, Record, printable
from vsproxy.decode import RECENT_CONNECTIONS, Decoded, Decoder, read_captures
from vsproxy.verdict import Verdict, verdict_of
from vsproxy.vsock import header as H

__all__ = [
    "Conversation",
    "Data",
    "Endpoint",
    "Made",
    "Outcome",
    "Reset",
    "Shutdown",
    "Step",
    "Transcript",
    "TranscriptBuilder",
    "load_transcript",
    "transcript_of",
]

Endpoint = tuple[int, int]  # (cid, port)

_REQUEST, _RESPONSE, _RST, _SHUTDOWN, _RW = (int(op) for op in (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RST,
                                                                 H.Op.SHUTDOWN, H.Op.RW))
_SEQPACKET: Final = int(H.Type.SEQPACKET)
_REAL_PEER: Final = re.compile(r"real peer (\d+):(\d+)")
MAX_BYTES: Final = 4 << 30  # payload a transcript holds at most (bad input must not take all memory)
MAX_STEP: Final = 16 << 20  # a STREAM step longer than this is cut (a message is not held whole past it)
_HALF: Final = 1 << 31  # fwd_cnt arithmetic is modulo 2^32: a difference past this is behind, not ahead


class Outcome(Enum):
    ESTABLISHED = "established"  # the REQUEST got a RESPONSE
    REFUSED = "refused"  # RST before any RESPONSE: nothing listened, or vsproxy refused it (a limit)
    DENIED = "denied"  # the REQUEST carries vsproxy's denial: it never reached the other side
    PENDING = "pending"  # the capture ended before the REQUEST was answered
    MID_STREAM = "mid-stream"  # the capture started after the REQUEST: its start is not known


@dataclass(frozen=True, slots=True)
class Data:
    """Bytes one side sent (see the module docstring for how they are cut)."""

    time: float  # of the last packet
    from_client: bool  # sent by the side that connected
    data: bytes
    eom: bool = False  # SEQPACKET: a whole message (False: the capture ended inside it)
    eor: bool = False  # SEQPACKET: the message ends a record (MSG_EOR)
    app: tuple[str, ...] = ()  # summaries of the application messages that end here
    packets: int = 1


@dataclass(frozen=True, slots=True)
class Shutdown:
    time: float
    from_client: bool
    flags: int  # H.SHUTDOWN_RCV (1): will receive no more; H.SHUTDOWN_SEND (2): will send no more

    @property
    def flag_names(self) -> str:
        names = [n for bit, n in ((H.SHUTDOWN_RCV, "RCV"), (H.SHUTDOWN_SEND, "SEND")) if self.flags & bit]
        return "|".join(names) or "none"


@dataclass(frozen=True, slots=True)
class Reset:
    time: float
    from_client: bool


Step = Data | Shutdown | Reset


@dataclass(slots=True, eq=False)
class Conversation:
    """One connection as one device's interface saw it."""

    id: int  # the decoder's connection id (``#1`` in ``vsproxy read``)
    device: str  # the capture's interface ("" in classic pcap)
    sock_type: int  # H.Type
    client: Endpoint  # the side that connected (for a connection seen mid-stream: a guess)
    server: Endpoint
    guest_is_client: bool | None  # the guest connected (True), its peer did (False); None: the file does not say
    start: float  # time of the first packet
    end: float = 0.0  # time of the last packet
    outcome: Outcome = Outcome.PENDING
    verdict: Verdict = Verdict.ALLOWED
    comment: str | None = None  # the first capture comment (denial, remap)
    real_peer: Endpoint | None = None  # where a remap really sent the guest's peer side
    proto: str | None = None  # the application protocol, when a dissector knew it
    steps: list[Step] = field(default_factory=list)
    closed: bool = False  # an RST, or both directions shut down
    lost: int = 0  # bytes a side acknowledged (fwd_cnt) beyond what the capture holds, or cut by a snaplen
    snapped: int = 0  # payload bytes a snaplen cut from the records (tcpdump -s, ctl pcap --snaplen)
    cut: bool = False  # the capture ended inside a SEQPACKET message
    selected: bool = False  # a packet of it matched the decoder's filter (every one does without a filter)

    @property
    def seen_start(self) -> bool:
        return self.outcome is not Outcome.MID_STREAM

    @property
    def type_name(self) -> str:
        return "SEQPACKET" if self.sock_type == _SEQPACKET else "STREAM"

    @property
    def guest(self) -> Endpoint | None:
        """The guest's end, when the file says which end is the guest."""
        if self.guest_is_client is None:
            return None
        return self.client if self.guest_is_client else self.server

    @property
    def peer(self) -> Endpoint | None:
        """The guest's peer as the guest saw it (``real_peer``: where it really went)."""
        if self.guest_is_client is None:
            return None
        return self.server if self.guest_is_client else self.client

    def data(self, from_client: bool) -> list[Data]:
        return [s for s in self.steps if isinstance(s, Data) and s.from_client == from_client]

    def sent(self, from_client: bool) -> bytes:
        """Every byte one side sent, in order."""
        return b"".join(s.data for s in self.data(from_client))

    def title(self) -> str:
        """``#1 app 5:2157979543 > 2:8080 STREAM http``, plus the real peer and outcome when they say
        something."""
        dev = f"{printable(self.device)} " if self.device else ""
        proto = f" {self.proto}" if self.proto else ""
        real = f" (real peer {self.real_peer[0]}:{self.real_peer[1]})" if self.real_peer else ""
        out = "" if self.outcome is Outcome.ESTABLISHED else f" [{self.outcome.value}]"
        return (f"#{self.id} {dev}{self.client[0]}:{self.client[1]} > {self.server[0]}:{self.server[1]} "
                f"{self.type_name}{proto}{real}{out}")

    def problems(self) -> list[str]:
        out = []
        if not self.seen_start:
            out.append("started before the capture")
        if not self.closed and self.outcome not in (Outcome.DENIED, Outcome.REFUSED):
            out.append("not closed when the capture ended")
        if self.lost > self.snapped:
            out.append(f"{self.lost} bytes missing from the capture")
        if self.snapped:
            out.append(f"{self.snapped} bytes cut by a snaplen (the records keep only each packet's first bytes)")
        if self.cut:
            out.append("the capture ended inside a message")
        return out


class Made(NamedTuple):
    """A step as a streaming builder hands it out (``TranscriptBuilder.drain``)."""

    conv: Conversation
    step: Step
    first: int  # the packets it came in, numbered as fed (0: the first packet fed the builder)
    last: int


@dataclass(slots=True)
class Transcript:
    conversations: list[Conversation] = field(default_factory=list)
    packets: int = 0  # records read
    orphans: int = 0  # packets of no connection the capture shows the start or data of
    spoofed: int = 0  # packets vsproxy dropped as spoofed (no step is made of them)
    other: int = 0  # frames without a virtio header
    error: str | None = None  # the capture is damaged here; what came before it is read
    forgotten: int = 0  # streaming: conversations the capture lacks part of, let go of to bound memory

    @property
    def started_mid(self) -> bool:
        return self.orphans > 0 or any(not c.seen_start for c in self.conversations)

    @property
    def ended_early(self) -> bool:
        return any("not closed when the capture ended" in c.problems() for c in self.conversations)

    @property
    def lost(self) -> int:
        return sum(c.lost for c in self.conversations)

    def problems(self) -> list[str]:
        """One line per thing the capture does not hold, empty when it is whole."""
        out = []
        if self.error is not None:
            out.append(f"damaged capture: {self.error} (after {self.packets} packets)")
        for c in self.conversations:
            out += [f"#{c.id}: {p}" for p in c.problems()]
        if self.orphans:
            out.append(f"{self.orphans} packets of connections whose start and data are not in the capture")
        return out


class _Pending:
    """One direction's bytes not yet made a step: the packets' payloads as they are (joined once,
    when the step is made; one packet's payload becomes the step without a copy)."""

    __slots__ = ("app", "chunks", "first", "last", "packets", "size", "time")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.app: list[str] = []
        self.packets = 0
        self.time = 0.0
        self.first = self.last = 0  # the packets' numbers, as fed (for ``Made``)


class _Live:
    """Building one conversation: the per-direction state the finished one does not keep."""

    __slots__ = ("conv", "pending", "sent", "shut", "spans")

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.spans: list[tuple[int, int]] = []  # streaming: each step's packets, beside ``conv.steps``
        self.pending = (_Pending(), _Pending())  # (from client, from server)
        self.sent = [0, 0]  # payload bytes seen from (client, server), modulo 2^32
        self.shut = [False, False]  # (client, server) will send no more


class TranscriptBuilder:
    """Decoded packets in, in capture order; ``finish`` gives the transcript. A transcript holds
    every payload byte, so it is bounded: past ``max_bytes`` of payload, ``full`` turns True and
    further packets are not taken (the caller stops; ``finish`` says where).

    ``stream=True``: ``drain`` hands out the steps made since it was last called, and a step handed
    out leaves its conversation's ``steps`` (and ``held``), so memory is what is not handed out
    yet; the steps of a conversation not ``selected`` yet wait for it to be, and are let go when
    it ends unselected. Conversations that closed are let go too, once ``recent`` newer ones
    have closed (past the decoder's own memory of ended connections, no packet can join them),
    and so are those no packet came for while ``max_live`` others had one (a connection the
    tracker dropped without a close: a REQUEST on its ends started another, or it was evicted):
    ``transcript.conversations`` keeps the open ones and, of those the capture does not hold
    whole, the last ``recent`` (the rest are counted in ``transcript.forgotten``), so the count of
    connections in a capture does not bound memory either."""

    def __init__(self, max_bytes: int = MAX_BYTES, *, stream: bool = False,
                 recent: int = 2 * RECENT_CONNECTIONS,
                 max_live: int = 2 * (MAX_CONNECTIONS + RECENT_CONNECTIONS)) -> None:
        self.transcript = Transcript()
        # by connection id; kept to the end (steps are the point), streaming: least recently fed first
        self._live: OrderedDict[int, _Live] = OrderedDict()
        self.max_bytes = max_bytes
        self.held = 0  # payload bytes held
        self.full = False
        self.stream = stream
        # streaming: the conversation of each step made since the last drain, in the order made
        # (the step is that conversation's next one not handed out)
        self._made: list[_Live] = []
        self._newly: list[_Live] = []  # selected since the last drain, with steps made before
        self._ended: OrderedDict[int, _Live] = OrderedDict()  # streaming: closed, by id, oldest first
        self._recent = max(1, recent)
        self._max_live = max(1, max_live)
        self._forgotten = 0  # let go of since ``transcript.conversations`` was last compacted

    def feed(self, d: Decoded) -> None:
        if self.full:
            return
        self.held += len(d.view.payload)
        if self.held > self.max_bytes:
            self.full = True
            return
        t = self.transcript
        t.packets += 1
        now = t.packets - 1  # this packet's number
        h, view = d.view.hdr, d.view
        if h is None:
            t.other += 1
            return
        if verdict_of(view.comment) is Verdict.SPOOFED:
            t.spoofed += 1
            return
        tc = d.conn
        if tc is None:
            t.orphans += 1
            return
        live = self._live.get(tc.id)
        if live is None:
            live = self._open(d)
            if self.stream and len(self._live) > self._max_live:
                self._forget(next(iter(self._live.values())))
        elif self.stream:
            self._live.move_to_end(tc.id)
        conv = live.conv
        conv.end = view.time
        if d.matched and not conv.selected:
            conv.selected = True
            if self.stream and conv.steps:
                self._newly.append(live)
        if conv.proto is None and tc.proto is not None:
            conv.proto = tc.proto
        if view.comment and conv.comment is None:
            self._note_comment(conv, view.comment)
        src = (h.src_cid, h.src_port)
        from_client = src == conv.client
        side = 0 if from_client else 1
        self._check_ack(live, side, h.fwd_cnt)
        op = h.op
        if op == _RW:
            self._data(live, side, d, now)
        elif op == _RESPONSE:
            if conv.outcome is Outcome.PENDING:
                conv.outcome = Outcome.ESTABLISHED
        elif op == _SHUTDOWN:
            self._flush(live, 0)
            self._flush(live, 1)
            self._step(live, Shutdown(view.time, from_client, h.flags & H.SHUTDOWN_BOTH), now, now)
            if h.flags & H.SHUTDOWN_SEND:
                live.shut[side] = True
            if h.flags & H.SHUTDOWN_RCV:
                live.shut[1 - side] = True
            if all(live.shut):
                conv.closed = True
        elif op == _RST:
            self._flush(live, 0)
            self._flush(live, 1)
            self._step(live, Reset(view.time, from_client), now, now)
            conv.closed = True
            if conv.outcome is Outcome.PENDING:
                conv.outcome = Outcome.DENIED if conv.verdict is Verdict.DENIED else Outcome.REFUSED
        if self.stream and conv.closed and conv.id not in self._ended:
            self._ended[conv.id] = live
            if len(self._ended) > self._recent:
                self._forget(self._ended.popitem(last=False)[1])

    def conversation(self, conv_id: int) -> Conversation | None:
        """Connection ``conv_id``'s conversation so far (a live view watches its ``lost`` grow)."""
        live = self._live.get(conv_id)
        return live.conv if live is not None else None

    def pending(self, conv_id: int) -> list[Data]:
        """What connection ``conv_id`` has sent that is not a step yet (a message still arriving,
        bytes a dissector has no message for so far), as provisional steps: a live view (the
        TUI's follow) shows ``steps`` and then these. Empty for an unknown or ended connection."""
        live = self._live.get(conv_id)
        if live is None:
            return []
        out = []
        for side, p in enumerate(live.pending):
            if p.packets:
                out.append(Data(p.time, side == 0, b"".join(p.chunks), False, False, tuple(p.app), p.packets))
        return sorted(out, key=lambda d: d.time)

    def drain(self) -> list[Made]:
        """Streaming (``stream=True``): the steps made since the last call, in the order they were
        made, of the conversations selected so far (a conversation selected late hands out the
        steps it made before first). They leave the transcript. Empty when not streaming."""
        if not self._made and not self._newly:  # most packets make no step
            return []
        out: list[Made] = []
        given: dict[int, int] = {}  # conversation id -> its steps handed out by this call
        touched: dict[int, _Live] = {}
        for live in self._newly:  # selected since: what it made while unselected comes first
            conv = live.conv
            out += [Made(conv, step, *span) for step, span in zip(conv.steps, live.spans, strict=True)]
            given[conv.id] = len(conv.steps)
            touched[conv.id] = live
        self._newly.clear()
        for live in self._made:
            conv = live.conv
            at = given.get(conv.id, 0)
            touched[conv.id] = live
            if conv.selected and at < len(conv.steps):
                out.append(Made(conv, conv.steps[at], *live.spans[at]))
                given[conv.id] = at + 1
        self._made.clear()
        for live in touched.values():
            if live.conv.selected:
                self._release(live, given.get(live.conv.id, 0))
            elif live.conv.closed:  # ended unselected: nobody will ask for its steps
                self._release(live, len(live.spans))
        return out

    def _forget(self, live: _Live) -> None:
        """Let go of a conversation that closed long ago (streaming): of its steps, whatever has
        not been handed out (nobody will); it stays in the transcript if the capture lacks part of
        it (for the end's account)."""
        if self._live.get(live.conv.id) is live:
            del self._live[live.conv.id]
        self._ended.pop(live.conv.id, None)
        self._release(live, len(live.spans))
        self._forgotten += 1
        convs = self.transcript.conversations
        if self._forgotten > max(1024, len(convs) // 2):  # compact now and then: O(1) a conversation
            self._forgotten = 0
            kept = self._live
            lacking = 0
            out = []
            for c in reversed(convs):  # the newest of those the capture lacks part of are kept
                x = kept.get(c.id)
                if x is not None and x.conv is c:
                    out.append(c)
                elif c.lost or c.cut or not c.seen_start:
                    lacking += 1
                    if lacking <= self._recent:
                        out.append(c)
            self.transcript.forgotten += max(0, lacking - self._recent)
            convs[:] = out[::-1]

    def _release(self, live: _Live, n: int) -> None:
        steps = live.conv.steps
        for step in steps[:n]:
            if isinstance(step, Data):
                self.held -= len(step.data)
        del steps[:n]
        del live.spans[:n]

    def finish(self, error: str | None = None) -> Transcript:
        """The transcript of everything fed; ``error``: the capture was damaged after it."""
        for live in self._live.values():
            self._flush(live, 0)
            self._flush(live, 1)
        t = self.transcript
        t.error = error
        return t

    # -- the parts ---------------------------------------------------------------------------
    def _open(self, d: Decoded) -> _Live:
        tc = d.conn
        assert tc is not None and d.view.hdr is not None
        h = d.view.hdr
        started = tc.seen_request
        guest_is_client: bool | None = None
        if d.view.from_guest is not None:
            from_client = (h.src_cid, h.src_port) == tc.client
            guest_is_client = d.view.from_guest == from_client
        conv = Conversation(tc.id, tc.device, tc.sock_type, tc.client, tc.server, guest_is_client, d.view.time,
                            d.view.time, Outcome.PENDING if started else Outcome.MID_STREAM)
        self.transcript.conversations.append(conv)
        live = _Live(conv)
        self._live[tc.id] = live
        return live

    @staticmethod
    def _note_comment(conv: Conversation, comment: str) -> None:
        conv.comment = comment
        conv.verdict = verdict_of(comment)
        m = _REAL_PEER.search(comment)
        if m is not None:
            conv.real_peer = (int(m.group(1)), int(m.group(2)))

    @staticmethod
    def _check_ack(live: _Live, side: int, fwd_cnt: int) -> None:
        """``fwd_cnt`` from ``side`` counts the bytes it took of the other side's: more than the
        capture holds means packets are missing (known only when the start was seen)."""
        conv = live.conv
        if not conv.seen_start:
            return
        ahead = (fwd_cnt - live.sent[1 - side]) & H.U32
        if 0 < ahead < _HALF and ahead > conv.lost:
            conv.lost = ahead

    def _data(self, live: _Live, side: int, d: Decoded, now: int) -> None:
        h = d.view.hdr
        assert h is not None
        payload = d.view.payload
        conv = live.conv
        cut = h.len - len(payload) if h.len > len(payload) else 0
        if cut:  # a snaplen cut the record: the steps cannot be whole (nor replayed)
            conv.snapped += cut
            conv.lost = max(conv.lost, conv.snapped)
        live.sent[side] = (live.sent[side] + len(payload) + cut) & H.U32  # (what the peer acknowledges)
        stream = conv.sock_type != _SEQPACKET
        if stream:  # the other side's bytes came first: they are a step of their own
            self._flush(live, 1 - side)
        p = live.pending[side]
        if payload:
            p.chunks.append(payload)
            p.size += len(payload)
        if not p.packets:
            p.first = now
        p.packets += 1
        p.last = now
        p.time = d.view.time
        if d.view.app:
            p.app += d.view.app
        if not stream:
            if h.flags & H.SEQ_EOM:
                self._flush(live, side, eom=True, eor=bool(h.flags & H.SEQ_EOR))
        elif d.view.app or p.size > MAX_STEP or (d.conn is not None and d.conn.dissector is None
                                                   and (d.conn.decided or p.size > DETECT_BYTES)):
            # a message ended, no dissector will ever find one (the tracker decided, or stopped
            # keeping this direction's bytes for detection), or the step is as large as steps get
            self._flush(live, side)

    def _flush(self, live: _Live, side: int, eom: bool = False, eor: bool = False) -> None:
        p = live.pending[side]
        if not p.packets:
            return
        conv = live.conv
        if conv.sock_type == _SEQPACKET and not eom:
            conv.cut = True
        data = p.chunks[0] if len(p.chunks) == 1 else b"".join(p.chunks)
        self._step(live, Data(p.time, side == 0, data, eom, eor, tuple(p.app), p.packets), p.first, p.last)
        live.pending = (_Pending(), live.pending[1]) if side == 0 else (live.pending[0], _Pending())

    def _step(self, live: _Live, step: Step, first: int, last: int) -> None:
        live.conv.steps.append(step)
        if self.stream:
            live.spans.append((first, last))
            self._made.append(live)


def transcript_of(records: Iterable[Record], decoder: Decoder | None = None, max_bytes: int = MAX_BYTES) -> Transcript:
    """The transcript of ``records`` (a damaged capture: what came before the damage, with
    ``error`` set; one holding more than ``max_bytes`` of payload: what came before, likewise)."""
    dec = decoder if decoder is not None else Decoder()
    builder = TranscriptBuilder(max_bytes)
    try:
        for rec in records:
            builder.feed(dec.decode(rec))
            if builder.full:
                return builder.finish(f"more than {max_bytes} bytes of payload: a transcript holds them all, "
                                      "so it stops here")
    except CaptureError as e:
        return builder.finish(str(e))
    return builder.finish()


def load_transcript(path: str, filter: str | None = None, max_bytes: int = MAX_BYTES) -> Transcript:
    """The transcript of the capture at ``path`` (``-``: stdin; a rotated set FILE.0, FILE.1, ...
    is read as one); ``filter`` (docs/filter.md) marks the conversations it selects. Raises
    ``OSError`` when it cannot be opened and ``FilterError`` for a bad filter; a damaged file
    gives what could be read, with ``error`` set."""
    from vsproxy.decode import capture_files

    decoder = Decoder(filter or None)
    files = capture_files(path)
    if not files:
        raise FileNotFoundError(2, "No such file or directory", path)
    return transcript_of(_opened(files), decoder, max_bytes)


def _opened(files: list[str]) -> Iterator[Record]:
    yield from read_captures(files)
