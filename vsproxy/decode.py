"""The decoding pipeline: capture records in, decoded packets out. ``vsproxy read`` prints what
it gives; a TUI or a replay tool uses it the same way, without knowing how ``read`` prints.

    from vsproxy.capture.reader import records
    from vsproxy.decode import Decoder, open_capture

    decoder = Decoder("proto == http")  # a filter (docs/filter.md); none: every packet
    with open_capture("app.pcapng") as f:
        for d in decoder.packets(records(f)):
            print(d.conn_id, d.view.op_name, d.view.app, [m.fields for m in d.messages])

Records are ``vsproxy.capture.reader.Record``: ``records(f)`` over a file, or over a live
pcapng stream (``vsproxy --pcap - | ...``: a pipe yields each record as it is written), or
built from a live tap's frames (``Record(ts, device, from_guest, frame, comment)``). The
decoder itself is sans-I/O: it never opens or reads anything, so records can be fed one at a
time (``decode``) as they arrive. The helpers at the end open files for it (``open_capture``,
and ``capture_files`` / ``read_captures`` for the rotated sets FILE.0, FILE.1, ... that
``--pcap-rotate-*`` writes).

Each record, in capture order, is:

1. taken apart (``reader.dissect``: the ``Packet``) and made the ``PacketView`` that filters
   and printers look at;
2. fed to one ``StreamTracker`` (``dissectors.streams``), every record whatever the filter
   says, since reassembly needs them all: it fills in ``view.proto`` and ``view.app`` and
   returns the application messages that end in this packet;
3. given its connection: the tracker's current one or, for the trailing packets of one the
   tracker has already closed (a CREDIT_UPDATE after both SHUTDOWNs, the last RST), that
   one, remembered while ``recent`` newer ones have not ended;
4. judged by the filter (``Decoded.matched``);
5. when following (``follow=``), cut into the payload chunk it adds to a followed connection
   (``Decoded.chunk``), from the same tracker, so connection ids and protocols are the ones
   every other mode shows.

A damaged capture raises ``vsproxy.capture.reader.CaptureError``, from the records iterator
or from ``decode`` (a frame shorter than af_vsockmon_hdr); ``Decoder.count`` is then the
number of records taken, the damaged one included.
"""

from __future__ import annotations

import os
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final

from dissectors.app import AppDissector, AppMessage
from dissectors.streams import (
    MAX_BUFFERED,
    MAX_CONNECTIONS,
    ConnKey,
    FollowChunk,
    Selector,
    StreamTracker,
    TrackedConnection,
    as_selector,
    ended,
    follow_chunk,
    parse_selector,
)
from vsproxy.capture.reader import Packet, Record, dissect, printable, records
from vsproxy.capture.view import PacketView
from vsproxy.filter import Filter, Predicate, compile_filter
from vsproxy.vsock import header as H

__all__ = [
    "RECENT_CONNECTIONS",
    "Decoded",
    "Decoder",
    "capture_files",
    "describe",
    "follow_selector",
    "open_capture",
    "read_captures",
]

# Connections that ended stay known for their trailing packets (a CREDIT_UPDATE after both
# SHUTDOWNs, the last RST) while this many newer ones have not ended since.
RECENT_CONNECTIONS: Final = 4096

_TYPE_NAMES: Final = {int(t): t.name for t in H.Type}


@dataclass(slots=True, eq=False)
class Decoded:
    """One packet through the pipeline.

    - ``packet``: the frame taken apart: ``record`` (time, device, direction, frame, comment),
      the virtio header ``hdr`` (None when the transport is not virtio), ``mon_op``, ``payload``.
    - ``view``: what the filter judged, with ``proto`` and ``app`` filled in by the tracker.
    - ``messages``: the application messages whose last byte is in this packet, in order
      (``view.app`` holds their summaries; each has ``proto``, ``summary`` and ``fields``).
    - ``conn``: the packet's connection; for the trailing packets of one that has ended, that
      one; None for a packet of no known connection. Its ``proto`` is the connection's protocol
      as known now (the packet's own is ``view.proto``). A connection that has ended keeps its
      identity only, never its dissectors' buffers, so keeping decoded packets is cheap.
    - ``matched``: the filter's verdict (True without a filter).
    - ``chunk``: following, the payload this packet adds to a followed connection, else None.
    """

    packet: Packet
    view: PacketView
    messages: list[AppMessage]
    conn: TrackedConnection | None
    matched: bool
    chunk: FollowChunk | None = None

    @property
    def record(self) -> Record:
        return self.packet.record

    @property
    def conn_id(self) -> int | None:
        """The connection's number (1, 2, ... in order of first appearance), or None."""
        conn = self.conn
        return conn.id if conn is not None else None

    def conn_text(self) -> str | None:
        """``describe(conn)``: ``#1 app 5:1024 > 2:8080 STREAM http``, or None."""
        conn = self.conn
        return describe(conn) if conn is not None else None


def describe(conn: TrackedConnection) -> str:
    """``#1 app 5:1024 > 2:8080 STREAM http``: id, device, client > server, type, protocol (the
    client is the side that connected). Safe to print: the device name is escaped."""
    dev = f"{printable(conn.device)} " if conn.device else ""
    kind = _TYPE_NAMES.get(conn.sock_type, f"type{conn.sock_type}")
    proto = f" {conn.proto}" if conn.proto else ""
    return f"#{conn.id} {dev}{conn.client[0]}:{conn.client[1]} > {conn.server[0]}:{conn.server[1]} {kind}{proto}"


def follow_selector(text: str) -> int | Selector:
    """What to follow, as ``vsproxy read --follow`` takes it: ``N`` or ``#N`` (a connection id),
    ``CID:PORT``, ``CID:PORT,CID:PORT``, or ``all``. Raises ``SelectorError``."""
    if text.strip().lower() == "all":
        return lambda conn: True
    return parse_selector(text)


class Decoder:
    """Records in, ``Decoded`` packets out; one per capture (or live stream), fed in order.

    ``filter``: filter text (docs/filter.md; ``FilterError`` when it is bad), a compiled
    ``Filter`` or a predicate over ``PacketView``; None or an empty filter matches every packet.
    ``follow``: a connection id or a selector (``follow_selector``) whose payload ``Decoded.chunk``
    carries; with an id, ``done`` turns True once that connection has ended.
    ``dissectors``: the application dissectors to choose from (default: the registered ones,
    as they are when the decoder is made, plugins loaded by then included).
    ``recent``, ``max_connections``, ``max_buffered``: the memory bounds (module constants and
    ``dissectors.streams``).
    """

    def __init__(
        self,
        filter: str | Filter | Predicate | None = None,
        *,
        follow: int | Selector | None = None,
        dissectors: Sequence[type[AppDissector]] | None = None,
        recent: int = RECENT_CONNECTIONS,
        max_connections: int = MAX_CONNECTIONS,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        if isinstance(filter, str):
            filter = compile_filter(filter)
        if isinstance(filter, Filter):
            filter = None if filter.matches_all else filter.predicate
        self.filter: Predicate | None = filter  # None: every packet matches (the call is skipped)
        # the one tracker; its connections(), live and buffered are there to read
        self.tracker: Final = StreamTracker(dissectors, max_connections=max_connections, max_buffered=max_buffered)
        self.count = 0  # records taken so far, a damaged one included
        self.done = False  # following one connection id, and it has ended: nothing more can come
        self._follow_id = follow if isinstance(follow, int) else None
        self._match = as_selector(follow) if follow is not None else None
        self._recent: OrderedDict[ConnKey, TrackedConnection] = OrderedDict()
        self._max_recent = max(0, recent)

    def decode(self, record: Record) -> Decoded:
        """Decode the next record, whatever the filter says (``matched`` has its verdict).
        Raises ``CaptureError`` for a frame too short to be a vsockmon frame."""
        self.count += 1
        pkt = dissect(record)
        view = PacketView(record.ts, record.interface, record.inbound, pkt.hdr, pkt.mon_op, pkt.payload,
                          record.comment)
        tracker = self.tracker
        msgs = tracker.feed(view)
        if tracker.closed:
            self._remember(tracker.closed)
        conn = tracker.current
        if conn is None and self._recent:
            conn = self._ended(view)
        pred = self.filter
        chunk = None
        if self._match is not None:
            chunk = follow_chunk(tracker, view, self._match)
            if self._follow_id is not None and ended(tracker, self._follow_id):
                self.done = True
        return Decoded(pkt, view, msgs, conn, pred is None or pred(view), chunk)

    def packets(self, records: Iterable[Record]) -> Iterator[Decoded]:
        """Decode ``records`` in turn, yielding the packets the filter matches, until they run
        out or ``done``: then no further record is read (a live stream is left open)."""
        if self.done:
            return
        decode = self.decode
        for rec in records:
            d = decode(rec)
            if d.matched:
                yield d
            if self.done:
                return

    # -- connections that have ended ---------------------------------------------------------
    def _remember(self, closed: list[TrackedConnection]) -> None:
        recent = self._recent
        for c in closed:
            lo, hi = sorted((c.client, c.server))
            key = (c.device, lo, hi, c.sock_type)
            recent[key] = c
            recent.move_to_end(key)  # a reused key is the newest, not kept at its old place
            while len(recent) > self._max_recent:
                recent.popitem(last=False)

    def _ended(self, view: PacketView) -> TrackedConnection | None:
        h = view.hdr
        if h is None:
            return None
        src, dst = (h.src_cid, h.src_port), (h.dst_cid, h.dst_port)
        lo, hi = (src, dst) if src < dst else (dst, src)
        return self._recent.get((view.device, lo, hi, h.type))


# -- opening captures ------------------------------------------------------------------------------
_ROTATED: Final = re.compile(r"\.(\d+)")


def open_capture(path: str) -> BinaryIO:
    """``path`` opened for ``records``; ``-`` is stdin. Raises ``OSError``."""
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def capture_files(path: str) -> list[str]:
    """The files of one capture: ``[path]`` when it exists (or is ``-``), else the rotated set
    vsproxy writes with ``--pcap-rotate-size`` / ``--pcap-rotate-seconds`` (``path.0``,
    ``path.1``, ...), in number order, however many of the first ones ``--pcap-files`` has
    removed; ``[]`` when there is neither."""
    if path == "-" or os.path.exists(path):
        return [path]
    folder, base = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(base):
            m = _ROTATED.fullmatch(name, len(base))
            if m is not None:
                found.append((int(m.group(1)), os.path.join(folder, name)))
    return [p for _, p in sorted(found)]


def read_captures(paths: Iterable[str]) -> Iterator[Record]:
    """The records of each file in turn, each opened when it is reached and closed after: one
    ``Decoder`` fed them all follows connections from one rotated file into the next.
    Raises ``OSError`` (a file cannot be opened or read) and ``CaptureError``."""
    for path in paths:
        with open_capture(path) as f:
            yield from records(f)
