"""Per-connection, per-direction reassembly of vsock captures, and the application dissectors
run over it.

``StreamTracker.feed`` takes packets (``PacketView``) in capture order. A connection is keyed
by (device, the two (cid, port) endpoints unordered, socket type); a REQUEST starts a fresh
one, an RST or a SHUTDOWN of both directions ends it, and a connection first seen mid-stream
(a capture started late) is picked up at its first RESPONSE or RW. RW payloads go to their
direction's dissector: STREAM bytes as they come, SEQPACKET bytes with the message ends the
EOM flag marks. The dissector is chosen once per connection: by port (the port the REQUEST
was sent to first), unless its ``detect`` rejects the first bytes; otherwise by asking every
registered dissector's ``detect`` about the first bytes of each direction, in registry order.

Memory is bounded whatever the capture: at most ``max_connections`` live connections (the
least recently active is forgotten first), closed connections are forgotten at once, the
bytes kept for detection are capped per direction, and the dissectors' buffers together are
capped (``max_buffered``) by forgetting the least recently active connections. Packets of a
connection without a dissector cost one dictionary lookup.

``follow`` replays one connection's payload in order (``follow_chunk`` does it one packet at a
time, beside a tracker that dissects, for ``vsproxy read --follow``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from dissectors.app import AppDissector, AppMessage, registered
from vsproxy.capture.view import PacketView
from vsproxy.vsock import header as H

Endpoint = tuple[int, int]  # (cid, port)
ConnKey = tuple[str, Endpoint, Endpoint, int]  # device, lower endpoint, higher endpoint, type

MAX_CONNECTIONS = 4096
MAX_BUFFERED = 64 << 20  # all dissector buffers together
DETECT_BYTES = 4096  # bytes of each direction kept while no dissector is chosen

# plain ints: comparing with IntEnum members costs more on the per-packet path
_REQUEST, _RESPONSE, _RST, _SHUTDOWN, _RW = (int(op) for op in (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RST,
                                                                 H.Op.SHUTDOWN, H.Op.RW))
_SEQPACKET = int(H.Type.SEQPACKET)


class _Direction:
    """One direction of a connection: its dissector, or what detection has seen so far."""

    __slots__ = ("buffered", "candidates", "dissector", "ended", "first", "lost", "pending", "pending_size")

    def __init__(self, candidates: list[type[AppDissector]]) -> None:
        self.dissector: AppDissector | None = None
        self.candidates = candidates  # still undecided about this direction's first bytes
        self.first = b""  # the first DETECT_BYTES bytes, what detect() sees
        self.pending: list[tuple[bytes, bool]] = []  # (data, eom) to replay once a dissector is chosen
        self.pending_size = 0
        self.lost = False  # pending outgrew DETECT_BYTES: this direction is not dissected
        self.ended = False
        self.buffered = 0  # the dissector's buffer, as last counted in the tracker's total


@dataclass(slots=True, eq=False)
class TrackedConnection:
    """A connection as the tracker knows it, from the packets of a capture (not the data path's
    ``vsproxy.vsock.connection.Connection``). ``client`` sent the REQUEST (for a connection
    first seen mid-stream: the first sender seen, or the receiver of a RESPONSE)."""

    id: int  # 1, 2, ... in order of first appearance in the capture
    device: str
    client: Endpoint
    server: Endpoint
    sock_type: int  # H.Type: STREAM or SEQPACKET
    seen_request: bool
    dissector: type[AppDissector] | None = None
    decided: bool = False  # dissector chosen, or known to be none
    _port_choice: type[AppDissector] | None = field(default=None, repr=False)
    _dirs: tuple[_Direction, _Direction] = field(init=False, repr=False)

    @property
    def proto(self) -> str | None:
        return self.dissector.name if self.dissector is not None else None

    def describe(self) -> str:
        dev = f"{self.device} " if self.device else ""
        kind = " SEQPACKET" if self.sock_type == _SEQPACKET else ""
        return f"#{self.id} {dev}{self.client[0]}:{self.client[1]} > {self.server[0]}:{self.server[1]}{kind}"


class StreamTracker:
    """Feed packets in capture order; each gets its ``proto`` and ``app`` filled in."""

    def __init__(
        self,
        dissectors: Sequence[type[AppDissector]] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self._dissectors = list(registered() if dissectors is None else dissectors)
        self._detectors = [cls for cls in self._dissectors if cls.detects()]
        self._by_port: dict[int, type[AppDissector]] = {}
        for cls in self._dissectors:
            for port in cls.ports:
                self._by_port.setdefault(port, cls)
        self._conns: OrderedDict[ConnKey, TrackedConnection] = OrderedDict()
        self._max_connections = max(1, max_connections)
        self._max_buffered = max_buffered
        self._buffered = 0
        self._next_id = 1
        self.current: TrackedConnection | None = None  # the connection of the packet fed last
        self.closed: list[TrackedConnection] = []  # connections the packet fed last ended (or evicted)

    @property
    def live(self) -> int:
        """How many connections are tracked now."""
        return len(self._conns)

    @property
    def buffered(self) -> int:
        """Bytes held by the live connections' dissectors."""
        return self._buffered

    def feed(self, view: PacketView) -> list[AppMessage]:
        """Take the next packet: set ``view.proto`` (the connection's protocol, or that of the
        last message ending here) and ``view.app`` (the summaries of the messages ending
        here), and return those messages."""
        self.closed = []
        h = view.hdr
        if h is None:
            self.current = None
            return []
        src_cid, dst_cid, src_port, dst_port, _len, kind, op, flags, _buf_alloc, _fwd_cnt = h
        src = (src_cid, src_port)
        dst = (dst_cid, dst_port)
        key = (view.device, src, dst, kind) if src < dst else (view.device, dst, src, kind)
        conns = self._conns
        conn = conns.get(key)
        if op == _REQUEST or (conn is None and (op == _RW or op == _RESPONSE)):
            if conn is not None:  # a REQUEST on a live key: the old connection is over
                self._forget(key, conn)
            conn = self._open(key, view.device, src, dst, kind, op)
        elif conn is None:
            self.current = None
            return []
        else:
            conns.move_to_end(key)
        self.current = conn
        msgs: list[AppMessage]
        if op == _RW:
            if conn.decided and conn.dissector is None:
                return []  # the common cheap path: nothing to dissect on this connection
            eom = kind == _SEQPACKET and bool(flags & H.SEQ_EOM)
            msgs = self._data(conn, src == conn.client, view.payload, eom) if view.payload or eom else []
            if len(view.payload) < _len:
                # the capture kept only the first bytes (a snaplen): what follows in this
                # direction cannot be put back together, so it is not dissected
                self._lose(conn, src == conn.client)
        elif op == _SHUTDOWN:
            msgs = []
            if flags & H.SHUTDOWN_SEND:
                msgs += self._end(conn, src == conn.client)
            if flags & H.SHUTDOWN_RCV:
                msgs += self._end(conn, src != conn.client)
            if conn._dirs[0].ended and conn._dirs[1].ended:
                self._forget(key, conn)
        elif op == _RST:
            msgs = self._end(conn, True) + self._end(conn, False)
            self._forget(key, conn)
        else:
            msgs = []
        if conn.dissector is not None:
            view.proto = msgs[-1].proto if msgs else conn.dissector.name
        if msgs:
            view.app = tuple(m.summary for m in msgs)
        return msgs

    def connections(self) -> list[TrackedConnection]:
        """The live connections, least recently active first."""
        return list(self._conns.values())

    # -- connections -------------------------------------------------------------------------
    def _open(self, key: ConnKey, device: str, src: Endpoint, dst: Endpoint, kind: int, op: int) -> TrackedConnection:
        client, server = (dst, src) if op == _RESPONSE else (src, dst)
        while len(self._conns) >= self._max_connections:
            old_key, old = next(iter(self._conns.items()))
            self._forget(old_key, old)
        conn = TrackedConnection(self._next_id, device, client, server, kind, op == _REQUEST)
        self._next_id += 1
        conn._port_choice = self._by_port.get(server[1]) or self._by_port.get(client[1])
        cands = [c for c in self._detectors if c is not conn._port_choice]
        conn._dirs = (_Direction(cands), _Direction(list(cands)))
        if conn._port_choice is None and not cands:
            conn.decided = True  # nothing could ever be chosen: the cheap path from the start
        self._conns[key] = conn
        return conn

    def _forget(self, key: ConnKey, conn: TrackedConnection) -> None:
        """Done with ``conn``: its dissectors and the bytes kept for detection are let go here,
        so a caller that keeps the connection object (a decoded packet names it) keeps only
        its identity, and forgetting connections to stay under ``max_buffered`` frees memory."""
        for d in conn._dirs:
            self._buffered -= d.buffered
            d.buffered = d.pending_size = 0
            d.dissector, d.pending, d.first, d.candidates = None, [], b"", []
        del self._conns[key]
        self.closed.append(conn)

    # -- data --------------------------------------------------------------------------------
    def _data(self, conn: TrackedConnection, from_client: bool, data: bytes, eom: bool) -> list[AppMessage]:
        d = conn._dirs[0 if from_client else 1]
        if conn.decided:
            return self._feed(conn, d, data, eom)
        if d.lost and not d.candidates:
            return []  # this direction matched nothing and the other has not spoken yet
        if not d.lost:
            d.pending.append((data, eom))
            d.pending_size += len(data)
            if len(d.first) < DETECT_BYTES:
                d.first += data[: DETECT_BYTES - len(d.first)]
            elif d.pending_size > DETECT_BYTES:  # waiting on the other direction: stop keeping bytes
                d.pending, d.pending_size, d.lost = [], 0, True
        chosen = self._choose(conn, d)
        if chosen is None:
            other = conn._dirs[1 if from_client else 0]
            if not d.candidates and not other.candidates and (other.first or other.ended):
                conn.decided = True  # neither direction looks like anything registered
                for x in conn._dirs:
                    x.pending, x.pending_size, x.first = [], 0, b""
            return []
        return self._start(conn, chosen, d)

    def _choose(self, conn: TrackedConnection, d: _Direction) -> type[AppDissector] | None:
        port_cls = conn._port_choice
        if port_cls is not None:
            conn._port_choice = None
            if _detect(port_cls, d.first) is not False:
                return port_cls
        if not d.first:
            return None
        still: list[type[AppDissector]] = []
        for cls in d.candidates:
            verdict = _detect(cls, d.first)
            if verdict:
                return cls
            if verdict is None and len(d.first) < DETECT_BYTES:
                still.append(cls)
        d.candidates = still
        return None

    def _start(self, conn: TrackedConnection, cls: type[AppDissector], current: _Direction) -> list[AppMessage]:
        """Dissector chosen: replay what each direction sent so far, the other one first."""
        conn.dissector, conn.decided = cls, True
        pendings = []
        for d in conn._dirs:
            pendings.append(d.pending)
            d.pending, d.pending_size, d.first, d.candidates = [], 0, b"", []
        try:
            pair = cls.pair()
        except Exception:  # a plugin's constructor failed: leave the connection undissected
            conn.dissector = None
            return []
        out: list[AppMessage] = []
        order = (1, 0) if current is conn._dirs[0] else (0, 1)
        for i in order:
            d, pending = conn._dirs[i], pendings[i]
            if d.lost:
                continue
            d.dissector = pair[i]
            for data, eom in pending:
                out += self._feed(conn, d, data, eom)
            if d.ended:
                out += self._feed(conn, d, b"", True)
        return out

    def _feed(self, conn: TrackedConnection, d: _Direction, data: bytes, eom: bool) -> list[AppMessage]:
        dis = d.dissector
        if dis is None:
            return []
        try:
            msgs = dis.feed(data, eom)
            now = dis.buffered
        except Exception as e:  # a plugin's bug must not end the read: report it once, go quiet
            d.dissector = None
            self._buffered -= d.buffered
            d.buffered = 0
            label = type(dis).label or type(dis).__name__
            return [AppMessage(type(dis).name, f"{label} dissector failed: {type(e).__name__}",
                               (("error", f"{type(e).__name__}: {e}"[:200]),))]
        if now != d.buffered:
            self._buffered += now - d.buffered
            d.buffered = now
            if self._buffered > self._max_buffered:
                self._shed(conn)
        return msgs

    def _lose(self, conn: TrackedConnection, from_client: bool) -> None:
        d = conn._dirs[0 if from_client else 1]
        self._buffered -= d.buffered
        d.buffered = d.pending_size = 0
        d.dissector, d.pending, d.lost = None, [], True

    def _end(self, conn: TrackedConnection, from_client: bool) -> list[AppMessage]:
        d = conn._dirs[0 if from_client else 1]
        if d.ended:
            return []
        d.ended = True
        return self._feed(conn, d, b"", True) if conn.decided else []

    def _shed(self, keep: TrackedConnection) -> None:
        """Over the buffer budget: forget the least recently active connections."""
        for key, conn in list(self._conns.items()):
            if self._buffered <= self._max_buffered:
                return
            if conn is not keep:
                self._forget(key, conn)


def _detect(cls: type[AppDissector], first: bytes) -> bool | None:
    try:
        return cls.detect(first)
    except Exception:  # a plugin's detect() failing means "not this one"
        return False


# -- follow ------------------------------------------------------------------------------------
class FollowChunk(NamedTuple):
    """Payload of the followed connection(s), in capture order."""

    conn: TrackedConnection
    time: float
    from_client: bool
    from_guest: bool | None  # from the capture's direction flag; None when the file does not say
    data: bytes
    eom: bool  # SEQPACKET message end


class SelectorError(ValueError):
    pass


Selector = Callable[[TrackedConnection], bool]
_ENDPOINT = re.compile(r"(\d+):(\d+)")


def parse_selector(text: str) -> int | Selector:
    """``N`` (a connection id, as ``TrackedConnection.id`` counts), ``CID:PORT`` (connections
    with that endpoint) or ``CID:PORT,CID:PORT`` (both endpoints, either order)."""
    text = text.strip()
    if text.lstrip("#").isdigit():
        return int(text.lstrip("#"))
    parts = [p.strip() for p in text.split(",")]
    eps: list[Endpoint] = []
    for p in parts:
        m = _ENDPOINT.fullmatch(p)
        if m is None or len(parts) > 2:
            raise SelectorError(f"bad connection selector {text!r}: expected N, CID:PORT or CID:PORT,CID:PORT")
        eps.append((int(m.group(1)), int(m.group(2))))
    want = set(eps)
    if len(eps) == 1:
        return lambda c: eps[0] in (c.client, c.server)
    return lambda c: {c.client, c.server} == want


def as_selector(select: int | Selector) -> Selector:
    """A connection id (``parse_selector``'s ``N``) as a selector; a selector as it is."""
    if isinstance(select, int):
        return lambda c: c.id == select
    return select


def follow_chunk(tracker: StreamTracker, view: PacketView, select: Selector) -> FollowChunk | None:
    """The payload ``view`` adds to a connection ``select`` picks, after ``tracker.feed(view)``:
    an RW packet's bytes, or an empty SEQPACKET message end; None for any other packet."""
    conn, h = tracker.current, view.hdr
    if conn is None or h is None or h.op != _RW or not select(conn):
        return None
    eom = h.type == _SEQPACKET and bool(h.flags & H.SEQ_EOM)
    if not (view.payload or eom):
        return None
    return FollowChunk(conn, view.time, (h.src_cid, h.src_port) == conn.client, view.from_guest, view.payload, eom)


def ended(tracker: StreamTracker, conn_id: int) -> bool:
    """Whether the packet fed last ended (or evicted) connection ``conn_id``: following that
    id, no later packet can add to it."""
    return any(c.id == conn_id for c in tracker.closed)


def follow(views: Iterable[PacketView], select: int | Selector) -> Iterator[FollowChunk]:
    """The payload of the selected connection(s), chunk by chunk in capture order; nothing is
    kept between packets. With a connection id, stops once that connection has ended.
    Tracks connections itself, without dissectors; ``vsproxy.decode.Decoder`` follows with
    the tracker it dissects with."""
    tracker = StreamTracker(dissectors=())
    match = as_selector(select)
    for view in views:
        tracker.feed(view)
        chunk = follow_chunk(tracker, view, match)
        if chunk is not None:
            yield chunk
        if isinstance(select, int) and ended(tracker, select):
            return
