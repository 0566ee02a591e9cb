"""The TUI's store: every packet it holds, as compact per-packet arrays, never one Python object
per packet. Sans-I/O: no Textual, no files, no sockets. Records are fed in capture order
(``feed``); the frames themselves live either where the source keeps them (a file: the store
keeps each record's location and asks a ``RecordAccess`` for it when a row is drawn) or in the
store's bounded ring (live sources, ``limit`` packets).

Each packet is decoded once, when fed, by the one ``vsproxy.decode.Decoder`` (the stream tracker
sees every record in order): the store keeps its time, connection id, protocol, direction,
meaning flags (denied, spoofed, RST, rewritten, refused, marked) and, sparsely, the application
summaries of packets that end messages. A row's text, its ``-V`` detail and a connection's
payload are decoded again from the record when asked for. Live sources feed a store of the
same kind in their ingest process (``vsproxy.tui.ingest``, ``keep_records=False``) and the
UI's store takes its rows, frames and connections as they are (``apply``).

Indices are absolute: packet ``i`` keeps its number while older packets leave the ring;
``first`` is the oldest still held.
"""

from __future__ import annotations

import re
import struct
import threading
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from dissectors.streams import TrackedConnection
from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, Record, dissect
from vsproxy.capture.view import PacketView
from vsproxy.decode import Decoded, Decoder
from vsproxy.filter import Filter, compile_filter
from vsproxy.read import app_tail
from vsproxy.verdict import Verdict, rewritten_in, verdict_of
from vsproxy.vsock import header as H

# Per-packet meaning flags (one byte a packet).
DENIED: Final = 1
SPOOFED: Final = 2
RST: Final = 4
REWRITTEN: Final = 8
REFUSED: Final = 16
MARKED: Final = 32
BAD: Final = 64  # a frame too short to decode: shown, never dissected

# The "only trouble" filter: one key shows it.
TROUBLE_FILTER: Final = "verdict == denied or verdict == spoofed or verdict == refused or op == rst"

_RST_OP: Final = int(H.Op.RST)
_RW_OP: Final = int(H.Op.RW)
_SHUTDOWN_OP: Final = int(H.Op.SHUTDOWN)
_RULE: Final = re.compile(r"denied by (.*?); vsproxy answers RST")
SPARK_SECONDS: Final = 3600  # per-device rate history kept, one bucket a second


class RecordAccess(Protocol):
    """Where a file source's records are: ``read(loc)`` the frame and comment of the record at a
    location ``feed`` was given (the store keeps its time, device and direction itself)."""

    def read(self, loc: int) -> tuple[bytes, str | None]: ...


@dataclass(slots=True)
class ConnRow:
    """One connection as the capture shows it. Side 0 is the client (it sent the REQUEST)."""

    id: int
    device: str
    client: tuple[int, int]
    server: tuple[int, int]
    sock_type: int
    first: int  # absolute index of its first packet
    last: int
    first_ts: float
    last_ts: float
    proto: str | None = None
    state: str = "open"  # open, half-closed, closed, reset, denied
    verdict: str = "allowed"
    rule: str = ""
    rewritten: bool = False
    # per side (client, server): plain ints, not lists, as a big capture has many connections
    pk0: int = 0
    pk1: int = 0
    by0: int = 0
    by1: int = 0
    ba0: int = 0  # buf_alloc each side advertised last
    ba1: int = 0
    fc0: int = 0  # fwd_cnt each side advertised last
    fc1: int = 0

    @property
    def packets(self) -> tuple[int, int]:
        return self.pk0, self.pk1

    @property
    def bytes(self) -> tuple[int, int]:
        return self.by0, self.by1

    @property
    def buf_alloc(self) -> tuple[int, int]:
        return self.ba0, self.ba1

    @property
    def fwd_cnt(self) -> tuple[int, int]:
        return self.fc0, self.fc1

    @property
    def type_name(self) -> str:
        return "seqpacket" if self.sock_type == int(H.Type.SEQPACKET) else "stream"

    def in_flight(self, side: int) -> int:
        """Bytes sent to ``side`` it has not reported consumed (its last fwd_cnt)."""
        return max(0, self.bytes[1 - side] - self.fwd_cnt[side])

    def describe(self) -> str:
        dev = f"{self.device} " if self.device else ""
        return f"#{self.id} {dev}{self.client[0]}:{self.client[1]} > {self.server[0]}:{self.server[1]}"


@dataclass(slots=True)
class DeviceRow:
    """A device (capture interface) as the capture shows it."""

    name: str
    packets: int = 0
    bytes: int = 0
    denied: int = 0
    spoofed: int = 0
    rewritten: int = 0
    connections: int = 0
    cids: set[int] = field(default_factory=set)
    per_second: dict[int, int] = field(default_factory=dict)

    def spark(self, seconds: int = 60) -> list[float]:
        """Packets per second over the last ``seconds`` seconds of this device's traffic."""
        if not self.per_second:
            return [0.0] * seconds
        end = max(self.per_second)
        return [float(self.per_second.get(s, 0)) for s in range(end - seconds + 1, end + 1)]


@dataclass(slots=True)
class IngestBatch:
    """Packets indexed elsewhere (the live ingest process, ``vsproxy.tui.ingest``), for
    ``Store.apply``: per packet its row (time, direction, device, flags, connection, protocol)
    and its frame; what the packets changed (connections, devices); rare things (comments,
    application summaries) by the packet's place in the batch."""

    n: int
    ts: array[float]
    dirs: bytes
    devs: array[int]  # "H"
    flags: bytes
    conns: array[int]  # "i"
    protos: bytes
    frames: bytes | memoryview  # the frames one after another
    offsets: array[int]  # "I": n + 1, where each starts and where the last ends
    comments: dict[int, str]
    apps: dict[int, tuple[str, ...]]
    dev_names: list[str]  # names new since the last batch (device ids go on from the store's)
    proto_names: list[str | None]
    conn_rows: list[ConnRow]  # the connections these packets changed, as they are now
    device_rows: list[DeviceRow]  # the devices, as they are now (per_second: the recent seconds)
    bad_frames: int  # every bad frame so far


class Store:
    """Packets in capture order. ``access``: where a file source's records are (None: the store
    keeps the records, at most ``limit`` of them: a ring). Thread-safe: sources feed it from
    their threads, the UI reads it; ``lock`` guards both."""

    def __init__(self, access: RecordAccess | None = None, limit: int | None = None,
                 keep_records: bool = True) -> None:
        if access is None and (limit is None or limit < 1):
            raise ValueError("a store without record access needs a ring size")
        self.access = access
        self.limit = limit
        # False: the index only (the live ingest process: the UI's store keeps the frames)
        self.keep_records = keep_records
        # when a set: the connections ``feed`` changed go in it (the ingest process sends those)
        self.touched: set[int] | None = None
        self.lock = threading.RLock()
        self.decoder = Decoder()
        self.first = 0  # absolute index of the oldest packet held
        self.total = 0  # packets fed, evicted ones included
        self.evicted = 0
        self.bad_frames = 0
        self._locs = array("q")
        self._ts = array("d")
        self._conn = array("i")  # connection id; 0: none
        self._proto = array("B")  # index into protos; 0: none
        self._dev = array("H")  # index into dev_names
        self.dev_names: list[str] = []
        self._dev_ids: dict[str, int] = {}
        self._dir = bytearray()  # 0 unknown, 1 from the guest, 2 to the guest
        self._flags = bytearray()
        self._records: deque[Record] = deque()
        # live frames from the ingest process (``apply``): per batch its first index, the frames
        # one after another and where each starts; comments (rare: verdicts) by index
        self._chunks: deque[tuple[int, bytes | memoryview, array[int]]] = deque()
        self._chunk_starts: deque[int] = deque()
        self._comments: dict[int, str] = {}
        # application summaries of the packets that end messages: a ring keeps them by index
        # (sparse, leaving with the packets); a file, as an index per packet into a table of the
        # distinct ones (a big capture repeats the same few: 4 bytes a packet, not a dict entry)
        self._apps: dict[int, tuple[str, ...]] = {}
        self._app = array("I")
        self._app_table: list[tuple[str, ...]] = [()]
        self._app_ids: dict[tuple[str, ...], int] = {(): 0}
        self.protos: list[str | None] = [None]
        self._proto_ids: dict[str | None, int] = {None: 0}
        self.conns: dict[int, ConnRow] = {}
        self._conns_checked = 0  # connections left after the last look for gone ones (ring)
        self.devices: dict[str, DeviceRow] = {}
        self.marks = 0
        self.generation = 0  # bumps on every change the UI should redraw for

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, record: Record, loc: int = -1) -> None:
        """The next record in capture order; ``loc``: where ``access`` finds it again."""
        with self.lock:
            self._feed(record, loc)
            self._trim()
            self.generation += 1

    def feed_many(self, items: Iterable[tuple[Record, int]]) -> None:
        with self.lock:
            for record, loc in items:
                self._feed(record, loc)
            self._trim()
            self.generation += 1

    def _feed(self, record: Record, loc: int) -> None:
        i = self.total
        flags = 0
        try:
            d: Decoded | None = self.decoder.decode(record)
        except CaptureError:  # a frame shorter than af_vsockmon_hdr: kept, shown as bad
            d = None
            flags = BAD
            self.bad_frames += 1
        self.total += 1
        self._locs.append(loc)
        self._ts.append(record.ts)
        self._dir.append(0 if record.inbound is None else 1 if record.inbound else 2)
        did = self._dev_ids.get(record.interface)
        if did is None:
            did = self._dev_ids[record.interface] = len(self.dev_names)
            self.dev_names.append(record.interface)
        self._dev.append(did)
        if self.access is None and self.keep_records:
            self._records.append(record)
        dev = self.devices.get(record.interface)
        if dev is None:
            dev = self.devices[record.interface] = DeviceRow(record.interface)
        dev.packets += 1
        dev.bytes += len(record.frame)
        sec = int(record.ts)
        ps = dev.per_second
        ps[sec] = ps.get(sec, 0) + 1
        if len(ps) > SPARK_SECONDS:
            del ps[min(ps)]
        if d is None:
            self._conn.append(0)
            self._proto.append(0)
            self._flags.append(flags)
            if self.access is not None:
                self._app.append(0)
            return
        view = d.view
        comment = record.comment
        if comment:
            word = verdict_of(comment)
            if word is Verdict.DENIED:
                flags |= DENIED
                dev.denied += 1
            elif word is Verdict.SPOOFED:
                flags |= SPOOFED
                dev.spoofed += 1
            elif word is Verdict.REFUSED:
                flags |= REFUSED
            if rewritten_in(comment):
                flags |= REWRITTEN
                dev.rewritten += 1
        h = view.hdr
        if h is not None:
            if h.op == _RST_OP:
                flags |= RST
            if record.inbound:
                dev.cids.add(h.src_cid)
        pid = self._proto_ids.get(view.proto)
        if pid is None:
            pid = self._proto_ids[view.proto] = len(self.protos)
            self.protos.append(view.proto)
        self._proto.append(pid if pid < 256 else 0)  # one byte a packet: past 255 protocols, "unknown"
        self._flags.append(flags)
        if self.access is None:
            if view.app:
                self._apps[i] = view.app
        else:
            aid = self._app_ids.get(view.app)
            if aid is None:
                aid = self._app_ids[view.app] = len(self._app_table)
                self._app_table.append(view.app)
            self._app.append(aid)
        conn = d.conn
        self._conn.append(conn.id if conn is not None else 0)
        if conn is not None and h is not None:
            self._account(conn.id, conn, d, h, i, flags, dev)

    def apply(self, b: IngestBatch) -> None:
        """Take in packets the ingest process indexed (in order, after the ones held)."""
        with self.lock:
            i0 = self.total
            for name in b.dev_names:
                self._dev_ids[name] = len(self.dev_names)
                self.dev_names.append(name)
            for proto in b.proto_names:
                self._proto_ids[proto] = len(self.protos)
                self.protos.append(proto)
            self._locs.frombytes(b"\xff" * (8 * b.n))  # -1: no location, the frames are here
            self._ts.extend(b.ts)
            self._dir += b.dirs
            self._dev.extend(b.devs)
            self._flags += b.flags
            self._conn.extend(b.conns)
            self._proto.frombytes(b.protos)
            if b.n:
                self._chunks.append((i0, b.frames, b.offsets))
                self._chunk_starts.append(i0)
            for k, c in b.comments.items():
                self._comments[i0 + k] = c
            for k, a in b.apps.items():
                self._apps[i0 + k] = a
            conns = self.conns
            for row in b.conn_rows:
                conns[row.id] = row
            for d in b.device_rows:
                have = self.devices.get(d.name)
                if have is None:
                    self.devices[d.name] = d
                    continue
                have.packets, have.bytes, have.denied, have.spoofed = d.packets, d.bytes, d.denied, d.spoofed
                have.rewritten, have.connections = d.rewritten, d.connections
                have.cids |= d.cids
                ps = have.per_second
                ps.update(d.per_second)
                while len(ps) > SPARK_SECONDS:
                    del ps[min(ps)]
            self.total += b.n
            self.bad_frames = b.bad_frames
            self._trim()
            self.generation += 1

    def _chunk_record(self, i: int, pos: int) -> Record:
        k = bisect_right(self._chunk_starts, i) - 1
        start, frames, off = self._chunks[k]
        j = i - start
        d = self._dir[pos]
        return Record(self._ts[pos], self.dev_names[self._dev[pos]], None if d == 0 else d == 1,
                      bytes(frames[off[j]:off[j + 1]]), self._comments.get(i))

    def _account(self, cid: int, conn: TrackedConnection, d: Decoded, h: H.Header, i: int, flags: int,
                 dev: DeviceRow) -> None:
        row = self.conns.get(cid)
        ts = d.record.ts
        if row is None:
            row = self.conns[cid] = ConnRow(cid, conn.device, conn.client, conn.server, conn.sock_type, i, i, ts, ts)
            dev.connections += 1
        if self.touched is not None:
            self.touched.add(cid)
        row.last = i
        row.last_ts = ts
        row.proto = conn.proto or row.proto
        rw = h.len if h.op == _RW_OP else 0
        if (h.src_cid, h.src_port) == row.client:
            row.pk0 += 1
            row.by0 += rw
            row.ba0 = h.buf_alloc
            row.fc0 = h.fwd_cnt
        else:
            row.pk1 += 1
            row.by1 += rw
            row.ba1 = h.buf_alloc
            row.fc1 = h.fwd_cnt
        if flags & (DENIED | REFUSED | SPOOFED):
            row.verdict = "denied" if flags & DENIED else "refused" if flags & REFUSED else "spoofed"
            m = _RULE.search(d.record.comment or "")
            if m:
                row.rule = m.group(1)
            row.state = row.verdict if row.verdict != "spoofed" else row.state
        if flags & REWRITTEN:
            row.rewritten = True
            row.rule = row.rule or (d.record.comment or "")
        if h.op == _RST_OP and row.state not in ("denied", "refused"):
            row.state = "reset"
        elif h.op == _SHUTDOWN_OP and row.state == "open":
            row.state = "half-closed" if (h.flags & 3) != 3 else "closed"
        elif h.op == _SHUTDOWN_OP and row.state == "half-closed":
            row.state = "closed"

    def _trim(self) -> None:
        """Keep at most ``limit`` packets: the oldest leave (ring mode only)."""
        if self.limit is None:
            return
        excess = (self.total - self.first) - self.limit
        if excess <= 0:
            return
        del self._locs[:excess], self._ts[:excess], self._conn[:excess], self._proto[:excess]
        del self._dir[:excess], self._flags[:excess], self._dev[:excess]
        for _ in range(min(excess, len(self._records))):
            self._records.popleft()
        first = self.first + excess
        chunks = self._chunks
        while chunks and chunks[0][0] + len(chunks[0][2]) - 1 <= first:  # every frame of it has left
            chunks.popleft()
            self._chunk_starts.popleft()
        comments = self._comments
        while comments:  # kept in index order, as the apps
            k = next(iter(comments))
            if k >= first:
                break
            del comments[k]
        self.first += excess
        self.evicted += excess
        apps = self._apps
        while apps:  # kept in index order: the ones that left are at the front
            k = next(iter(apps))
            if k >= self.first:
                break
            del apps[k]
        # Connections whose packets have all left: looked for only when the table has doubled
        # since the last look, so a busy ring does not scan it on every batch (amortised O(1),
        # at most twice the connections still held)
        if len(self.conns) > self._conns_checked * 2 + 1024:
            for c in [c for c, row in self.conns.items() if row.last < self.first]:
                del self.conns[c]
            self._conns_checked = len(self.conns)

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.total - self.first

    def record(self, i: int) -> Record:
        with self.lock:
            pos = i - self.first
            if pos < 0 or pos >= self.total - self.first:
                raise IndexError(i)
            if self.access is None:
                if self._chunks:
                    return self._chunk_record(i, pos)
                return self._records[pos]
            loc = self._locs[pos]
            ts, dev, d = self._ts[pos], self.dev_names[self._dev[pos]], self._dir[pos]
            access = self.access
        frame, comment = access.read(loc)
        return Record(ts, dev, None if d == 0 else d == 1, frame, comment)

    def flags(self, i: int) -> int:
        return self._flags[i - self.first]

    def conn_of(self, i: int) -> int:
        return self._conn[i - self.first]

    def direction(self, i: int) -> bool | None:
        d = self._dir[i - self.first]
        return None if d == 0 else d == 1

    def side(self, i: int) -> bool | None:
        """True for a packet from the guest, False to it; when the capture does not say (classic
        pcap), True for the client's side (the side that connected) so colours still pair up."""
        d = self.direction(i)
        if d is not None:
            return d
        row = self.conns.get(self.conn_of(i))
        if row is None:
            return None
        h = dissect(self.record(i)).hdr
        return h is not None and (h.src_cid, h.src_port) == row.client

    def app(self, i: int) -> tuple[str, ...]:
        """The summaries of the application messages that end in packet ``i``."""
        if self.access is None:
            return self._apps.get(i, ())
        return self._app_table[self._app[i - self.first]]

    def line(self, i: int) -> str:
        """Packet ``i`` as ``vsproxy read`` prints it in one-line mode (without the line break)."""
        from vsproxy.capture.reader import summary_line

        rec = self.record(i)
        if self.flags(i) & BAD:
            return f"(bad frame: {len(rec.frame)} bytes, shorter than af_vsockmon_hdr)"
        app = self.app(i)
        conn = self.conn_of(i) or None
        return summary_line(dissect(rec), app_tail(conn, app) if app else "")

    def view(self, i: int) -> PacketView | None:
        """What the filter judges for packet ``i``: its fields, with the protocol and application
        summaries the tracker gave it when it was fed. None for a bad frame."""
        rec = self.record(i)
        if self.flags(i) & BAD:
            return None
        pkt = dissect(rec)
        pos = i - self.first
        return PacketView(rec.ts, rec.interface, rec.inbound, pkt.hdr, pkt.mon_op, pkt.payload, rec.comment,
                          self.protos[self._proto[pos]], self.app(i))

    def decoded(self, i: int) -> Decoded | None:
        """Packet ``i`` decoded again for its ``-V`` detail, with its application messages: its
        connection's packets up to it go through a fresh decoder (the messages depend on the
        bytes before), whose connection then gets the store's id back."""
        if self.flags(i) & BAD:
            return None
        cid = self.conn_of(i)
        decoder = Decoder()
        last: Decoded | None = None
        idx = self.conn_packets(cid, upto=i) if cid else [i]
        for j in idx:
            last = decoder.decode(self.record(j))
        if last is not None and last.conn is not None:
            last.conn.id = cid
        return last

    def conn_packets(self, cid: int, upto: int | None = None) -> list[int]:
        """Absolute indices of connection ``cid``'s packets still held (up to ``upto``)."""
        with self.lock:
            row = self.conns.get(cid)
            if row is None:
                return []
            start = max(row.first, self.first)
            stop = row.last if upto is None else min(row.last, upto)
            base = self.first
            conn = self._conn
            return [j for j in range(start, stop + 1) if conn[j - base] == cid]

    # -- marks -------------------------------------------------------------------------------------
    def toggle_mark(self, i: int) -> bool:
        with self.lock:
            pos = i - self.first
            self._flags[pos] ^= MARKED
            marked = bool(self._flags[pos] & MARKED)
            self.marks += 1 if marked else -1
            self.generation += 1
            return marked

    def marked(self) -> list[int]:
        with self.lock:
            return [self.first + p for p, f in enumerate(self._flags) if f & MARKED]

    def first_of(self, cid: int) -> int | None:
        row = self.conns.get(cid)
        return None if row is None else max(row.first, self.first)


class FilterRun:
    """A filter over the store, run in steps (``step``) so a worker can report progress and stop
    when cancelled. ``matches``: the absolute indices that matched so far."""

    def __init__(self, store: Store, flt: str | Filter) -> None:
        self.store = store
        self.filter = compile_filter(flt) if isinstance(flt, str) else flt
        self.text = self.filter.text
        with store.lock:
            self.next = store.first
            self.end = store.total
        self.start = self.next
        self.matches = array("q")
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.next >= self.end or self.cancelled

    @property
    def progress(self) -> float:
        span = self.end - self.start
        return 1.0 if span <= 0 else (self.next - self.start) / span

    STEP = 20_000  # packets judged between progress reports (and checks for a cancel)

    def step(self, most: int | None = None) -> None:
        pred = self.filter.predicate
        store = self.store
        stop = min(self.end, self.next + (most or self.STEP))
        append = self.matches.append
        for i in range(max(self.next, store.first), stop):
            v = store.view(i)
            if v is not None and pred(v):
                append(i)
        self.next = stop

    def extend_to(self, end: int) -> None:
        """New packets came (live): judge them too."""
        self.end = max(self.end, end)

    def run(self, cancelled: Callable[[], bool] = lambda: False,
            progress: Callable[[float], None] = lambda f: None) -> None:
        while not self.done:
            if cancelled():
                self.cancelled = True
                return
            self.step()
            progress(self.progress)


def pcapng_bytes(store: Store, indices: Sequence[int] | Iterable[int]) -> Iterator[bytes]:
    """A pcapng holding these packets (one interface per device, direction flags, comments)."""
    ifaces: dict[str, int] = {}
    yield fmt.pcapng_shb()
    for i in indices:
        rec = store.record(i)
        idx = ifaces.get(rec.interface)
        if idx is None:
            idx = ifaces[rec.interface] = len(ifaces)
            yield fmt.pcapng_idb(rec.interface or f"if{idx}", f"vsproxy device {rec.interface}")
        yield pcapng_epb(idx, rec)


def pcapng_epb(iface: int, rec: Record) -> bytes:
    """The record as an Enhanced Packet Block: microsecond time rounded (not truncated, so a
    time read from a microsecond file comes back the same), the direction flag only when the
    record has one (a classic pcap's packet has none), and its comment."""
    ticks = round(rec.ts * 1_000_000)
    n = len(rec.frame)
    opts = b""
    if rec.inbound is not None:
        opts += struct.pack("<HHI", fmt.EPB_FLAGS, 4, fmt.EPB_INBOUND if rec.inbound else fmt.EPB_OUTBOUND)
    if rec.comment:
        c = rec.comment.encode()
        opts += struct.pack("<HH", fmt.OPT_COMMENT, len(c)) + c + b"\0" * (-len(c) % 4)
    if opts:
        opts += struct.pack("<HH", fmt.OPT_ENDOFOPT, 0)
    body = struct.pack("<IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, n, n) + rec.frame + b"\0" * (-n % 4) + opts
    total = 12 + len(body)
    return struct.pack("<II", fmt.BT_EPB, total) + body + struct.pack("<I", total)
