"""``vsproxy read [options] FILE [FILTER ...]``: print a vsock capture, like ``tcpdump -r`` and
``tshark -r`` (``-`` reads stdin).

Reads vsproxy's captures and the kernel's vsockmon ones (pcap or pcapng, LINKTYPE_VSOCK). Every
packet goes through the stream tracker (``dissectors.streams``), which reassembles connections
and names what they carry; the filter (``vsproxy.filter``, docs/filter.md), the rest of the
command line joined by spaces, then picks the packets to print, in one of four forms:

- one line per packet (default): the capture's summary line, and when application messages end
  in the packet, two spaces, the connection id and their summaries (``  #1 HTTP GET /v1/keys``);
- ``--json``: one object per packet, with ``conn``, ``proto`` and ``app``;
- ``-V``: that line, then the frame's facts, the headers as scapy decodes them, each message's
  fields and the start of the payload;
- ``--follow SELECTOR``: the payload of the selected connection(s), like ``tshark -z follow``.

Exit status: 0 done (also when whoever reads the output goes away), 1 a damaged capture (what
could be read is printed first), 2 a bad command line, filter, selector or plugin, or a file
that cannot be opened. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO, Final

from dissectors.app import AppMessage, PluginError, load_plugins
from dissectors.streams import (
    FollowChunk,
    Selector,
    SelectorError,
    StreamTracker,
    TrackedConnection,
    follow,
    parse_selector,
)
from vsproxy.capture.reader import CaptureError, Packet, Record, as_json, dissect, printable, records, summary_line
from vsproxy.capture.view import PacketView
from vsproxy.filter import FilterError, Predicate, compile_filter
from vsproxy.vsock import header as H

PROG: Final = "vsproxy read"

# One-line mode: at most this many summaries per packet, each cut to this many characters, so
# a packet that ends a burst of HTTP/2 frames still prints a readable line.
MAX_SUMMARIES: Final = 3
MAX_SUMMARY: Final = 100
# -V: the payload dump stops after this many bytes, a field value after this many characters.
VERBOSE_PAYLOAD: Final = 256
MAX_FIELD: Final = 200
# Connections that ended stay known for their trailing packets (a CREDIT_UPDATE after both
# SHUTDOWNs, the last RST) while this many newer ones have not ended since.
RECENT_CONNECTIONS: Final = 4096

_SEQPACKET: Final = int(H.Type.SEQPACKET)
_TYPE_NAMES: Final = {int(t): t.name for t in H.Type}


class _Usage(Exception):
    """A bad command line, filter, selector or plugin: exit 2 with this message."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Print a vsock capture (pcap or pcapng, LINKTYPE_VSOCK), like tcpdump -r. The words after "
        "FILE are a filter (docs/filter.md), e.g. 'dst.port == 9000 and op == rw'.",
        epilog="Application dissectors: docs/dissectors.md. Exit status: 0 done, 1 damaged capture, "
        "2 bad arguments or unreadable file.",
    )
    p.add_argument("file", metavar="FILE", help="a pcap or pcapng file, or - for stdin")
    p.add_argument("filter", metavar="FILTER", nargs="*", help="filter expression (its words are joined by spaces)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="one JSON object per packet")
    mode.add_argument(
        "-V",
        dest="verbose",
        action="store_true",
        help="the full dissection of each packet: headers, capture facts, application fields, payload",
    )
    mode.add_argument(
        "--follow",
        metavar="SELECTOR",
        help="print the payload of connection(s): N or #N (a connection id), CID:PORT, CID:PORT,CID:PORT, or all",
    )
    p.add_argument("--hex", action="store_true", help="with --follow: a hex dump instead of escaped text")
    p.add_argument(
        "-c",
        dest="count",
        metavar="N",
        type=_positive,
        help="stop after printing N packets (with --follow: N payload chunks)",
    )
    p.add_argument(
        "--dissector",
        metavar="MODULE:CLASS",
        action="append",
        default=[],
        help="load a plugin application dissector (repeatable); installed 'vsproxy.dissectors' "
        "entry points are always loaded",
    )
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return n


@dataclass(slots=True)
class _Progress:
    """Packets read so far, for the message a damaged capture ends with."""

    read: int = 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        pred = _compile(" ".join(args.filter))
        select = _selector(args.follow) if args.follow is not None else None
        if args.hex and select is None:
            raise _Usage("--hex goes with --follow")
        load_plugins(args.dissector)
    except _Usage as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except PluginError as e:
        print(f"{PROG}: {_one_line(str(e))}", file=sys.stderr)
        return 2
    try:
        f: BinaryIO = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        print(f"{PROG}: {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    out = sys.stdout
    progress = _Progress()
    try:
        with f:
            packets = records(f)
            if select is not None:
                printed = _follow(packets, pred, select, args.count, args.hex, out, progress)
                if not printed:
                    print(f"{PROG}: --follow {args.follow}: no payload to show", file=sys.stderr)
            else:
                render = _json if args.json else _verbose if args.verbose else _line
                # one-line mode needs a connection only for a packet that ends messages, and
                # such a packet's connection is the tracker's current one
                _print_packets(packets, pred, args.count, render, args.json or args.verbose, out, progress)
            out.flush()
    except CaptureError as e:
        _flush_quietly(out)
        n = progress.read
        print(f"{PROG}: {args.file}: {e} (after {n} packet{'' if n == 1 else 's'})", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _reader_went_away()
    except OSError as e:  # reading the input or writing the output failed (EIO, ENOSPC)
        _flush_quietly(out)
        print(f"{PROG}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _compile(text: str) -> Predicate | None:
    """The filter's predicate, or None when it matches every packet (the loop skips the call)."""
    try:
        flt = compile_filter(text)
    except FilterError as e:
        raise _Usage(f"bad filter: {e}\n{e.render()}") from None
    return None if flt.matches_all else flt.predicate


def _selector(text: str) -> Selector | int:
    if text.strip().lower() == "all":
        return lambda conn: True
    try:
        return parse_selector(text)
    except SelectorError as e:
        raise _Usage(f"--follow: {e}, or all") from None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _flush_quietly(out: IO[str]) -> None:
    try:
        out.flush()
    except BrokenPipeError:
        _reader_went_away()
    except OSError:  # the output is failing anyway; the error message goes to stderr
        pass


def _reader_went_away() -> int:
    """stdout's reader is gone (``| head``): stop quietly, as tcpdump does. stdout now points at
    /dev/null so the interpreter's last flush does not complain about the pipe either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 0


# --- the packets -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ended:
    """A connection the tracker has closed, kept small: the tracker's ``TrackedConnection``
    would keep its dissectors' buffers alive."""

    id: int
    device: str
    client: tuple[int, int]
    server: tuple[int, int]
    sock_type: int
    proto: str | None


def describe(conn: TrackedConnection | _Ended) -> str:
    """``#1 app 5:1024 > 2:8080 STREAM http``: id, device, client > server, type, protocol."""
    dev = f"{printable(conn.device)} " if conn.device else ""
    kind = _TYPE_NAMES.get(conn.sock_type, f"type{conn.sock_type}")
    proto = f" {conn.proto}" if conn.proto else ""
    return f"#{conn.id} {dev}{conn.client[0]}:{conn.client[1]} > {conn.server[0]}:{conn.server[1]} {kind}{proto}"


class _Connections:
    """Each packet's connection: the tracker's current one or, for the trailing packets of a
    connection the tracker has already closed (a CREDIT_UPDATE after both SHUTDOWNs, the last
    RST), that connection, remembered while RECENT_CONNECTIONS newer ones have not ended."""

    def __init__(self, tracker: StreamTracker) -> None:
        self._tracker = tracker
        self._recent: OrderedDict[tuple[str, tuple[int, int], tuple[int, int], int], _Ended] = OrderedDict()

    def fed(self) -> None:
        """Call after each ``tracker.feed``: remember the connections that packet ended."""
        for c in self._tracker.closed:
            lo, hi = sorted((c.client, c.server))
            self._recent[(c.device, lo, hi, c.sock_type)] = _Ended(
                c.id, c.device, c.client, c.server, c.sock_type, c.proto
            )
            while len(self._recent) > RECENT_CONNECTIONS:
                self._recent.popitem(last=False)

    def id_of(self, view: PacketView) -> int | None:
        conn = self._tracker.current
        if conn is not None:
            return conn.id
        ended = self._ended(view)
        return ended.id if ended is not None else None

    def text_of(self, view: PacketView) -> str | None:
        conn = self._tracker.current
        if conn is not None:
            return describe(conn)
        ended = self._ended(view)
        return describe(ended) if ended is not None else None

    def _ended(self, view: PacketView) -> _Ended | None:
        h = view.hdr
        if h is None:
            return None
        src, dst = (h.src_cid, h.src_port), (h.dst_cid, h.dst_port)
        lo, hi = (src, dst) if src < dst else (dst, src)
        return self._recent.get((view.device, lo, hi, h.type))


def _view(rec: Record, pkt: Packet) -> PacketView:
    return PacketView(rec.ts, rec.interface, rec.inbound, pkt.hdr, pkt.mon_op, pkt.payload, rec.comment)


_Render = Callable[[Packet, PacketView, list[AppMessage], _Connections], str]


def _print_packets(
    recs: Iterable[Record],
    pred: Predicate | None,
    count: int | None,
    render: _Render,
    remember: bool,
    out: IO[str],
    progress: _Progress,
) -> None:
    """Feed every packet to the tracker (it needs them all), print those the filter matches."""
    tracker = StreamTracker()
    conns = _Connections(tracker)
    feed = tracker.feed
    write = out.write
    printed = 0
    for rec in recs:
        progress.read += 1
        pkt = dissect(rec)
        view = _view(rec, pkt)
        msgs = feed(view)
        if remember and tracker.closed:
            conns.fed()
        if pred is not None and not pred(view):
            continue
        write(render(pkt, view, msgs, conns))
        printed += 1
        if printed == count:
            return


# --- one line, JSON ----------------------------------------------------------------------------


def app_tail(conn_id: int | None, summaries: tuple[str, ...]) -> str:
    """What one-line mode appends for a packet that ends application messages:
    ``"  #1 HTTP GET /v1/keys"``; several messages are joined with ``"; "``, at most
    MAX_SUMMARIES of them (``"; +2 more"``), each cut to MAX_SUMMARY characters."""
    shown = [_cut(printable(s), MAX_SUMMARY) for s in summaries[:MAX_SUMMARIES]]
    if len(summaries) > MAX_SUMMARIES:
        shown.append(f"+{len(summaries) - MAX_SUMMARIES} more")
    conn = f"#{conn_id} " if conn_id is not None else ""
    return f"  {conn}{'; '.join(shown)}"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _line(pkt: Packet, view: PacketView, msgs: list[AppMessage], conns: _Connections) -> str:
    if not view.app:
        return summary_line(pkt) + "\n"
    return summary_line(pkt, app_tail(conns.id_of(view), view.app)) + "\n"


def _json(pkt: Packet, view: PacketView, msgs: list[AppMessage], conns: _Connections) -> str:
    obj = as_json(pkt)
    obj["conn"] = conns.id_of(view)
    obj["proto"] = view.proto
    obj["app"] = list(view.app)
    return json.dumps(obj) + "\n"


# --- -V -------------------------------------------------------------------------------------------

_INDENT: Final = "    "
_STRUCTS: Final = {"VsockMon": "af_vsockmon_hdr", "VirtioVsock": "virtio_vsock_hdr"}
_DIRECTION: Final = {
    True: "from the guest (inbound)",
    False: "to the guest (outbound)",
    None: "unknown (not in the file)",
}


def _verbose(pkt: Packet, view: PacketView, msgs: list[AppMessage], conns: _Connections) -> str:
    conn = conns.text_of(view)
    rec = pkt.record
    lines = [_line(pkt, view, msgs, conns).rstrip("\n"), f"{_INDENT}frame"]
    facts = [
        ("time", _date(rec.ts)),
        ("interface", printable(rec.interface) or "(not in the file)"),
        ("direction", _DIRECTION[rec.inbound]),
        ("length", f"{len(rec.frame)} bytes"),
    ]
    if rec.comment is not None:
        facts.append(("comment", printable(rec.comment)))
    if conn is not None:
        facts.append(("connection", conn))
    lines += _fields(facts)
    lines += _layers(rec.frame)
    for m in msgs:
        lines.append(f"{_INDENT}{printable(m.summary)}")
        lines += [f"{_INDENT * 2}{printable(name)}: {_cut(printable(value), MAX_FIELD)}" for name, value in m.fields]
    if pkt.payload:
        lines.append(f"{_INDENT}payload ({len(pkt.payload)} bytes)")
        shown = pkt.payload[:VERBOSE_PAYLOAD]
        lines += [f"{_INDENT * 2}{row}" for row in hexdump(shown, digits=4)]
        if len(pkt.payload) > len(shown):
            lines.append(f"{_INDENT * 2}... {len(pkt.payload) - len(shown)} more bytes")
    return "\n".join(lines) + "\n\n"


def _fields(pairs: list[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in pairs)
    return [f"{_INDENT * 2}{name:<{width}} = {value}" for name, value in pairs]


def _date(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    except (OverflowError, OSError, ValueError):  # beyond what datetime holds: the raw number
        return f"{ts:.6f} s since the epoch"


def _layers(frame: bytes) -> list[str]:
    """af_vsockmon_hdr and virtio_vsock_hdr as the scapy layers decode them. scapy is imported
    here, for -V only: it costs a third of a second, more than the one-line mode's whole run on a
    small file."""
    from dissectors.layers import VirtioVsock, VsockMon

    lines: list[str] = []
    try:
        layer: Any = VsockMon(frame)
        while isinstance(layer, VsockMon | VirtioVsock):
            pairs = []
            for fld in layer.fields_desc:
                value = layer.getfieldval(fld.name)
                number = str(int(value)) if value is not None else ""
                text = str(fld.i2repr(layer, value)) or number  # no flag set reads as ""
                pairs.append((fld.name, text if text == number else f"{text} ({number})"))
            lines.append(f"{_INDENT}{layer.name} ({_STRUCTS[type(layer).__name__]})")
            lines += _fields(pairs)
            layer = layer.payload
    except Exception as e:  # scapy on a hostile frame: say so, keep printing the rest
        lines.append(f"{_INDENT}(scapy could not decode the frame: {type(e).__name__}: {_one_line(str(e))})")
    return lines


def hexdump(data: bytes, digits: int = 8) -> list[str]:
    """``hexdump -C`` rows: offset, 16 bytes in two groups of 8, printable ASCII between bars."""
    rows = []
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        hexes = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        rows.append(f"{off:0{digits}x}  {hexes.rstrip():<48}  |{text}|")
    return rows


# --- --follow -------------------------------------------------------------------------------------

# Payload as text: printable ASCII as it is, the rest escaped as Python writes it in a bytes
# literal, so the bytes can be read back exactly; a line break follows each \n, so text
# protocols read as text.
_TEXT: Final = [chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in range(256)]
_TEXT[ord("\\")] = "\\\\"
_TEXT[ord("\t")] = "\\t"
_TEXT[ord("\r")] = "\\r"
_TEXT[ord("\n")] = "\\n\n"


def escaped(data: bytes) -> str:
    """The payload as ``--follow`` prints it: lines ending in a real line break."""
    text = "".join(map(_TEXT.__getitem__, data))
    return text if text.endswith("\n") else text + "\n"


@dataclass(slots=True)
class _Current:
    """The packet the follow loop is on: ``follow`` yields a chunk while it handles it."""

    view: PacketView | None = None
    proto: str | None = None
    matched: bool = False


def _follow(
    recs: Iterable[Record],
    pred: Predicate | None,
    select: Selector | int,
    count: int | None,
    as_hex: bool,
    out: IO[str],
    progress: _Progress,
) -> int:
    """Print the selected connections' payload; return how many chunks were printed.

    ``follow`` tracks connections itself from every packet, so its ids are the ones one-line
    mode shows; the dissecting tracker runs beside it for the protocol name and for filters on
    ``proto`` and ``app``. The filter decides which packets' payload is printed."""
    tracker = StreamTracker()
    cur = _Current()

    def packets() -> Iterator[PacketView]:
        for rec in recs:
            progress.read += 1
            view = _view(rec, dissect(rec))
            tracker.feed(view)
            cur.view = view
            cur.proto = tracker.current.proto if tracker.current is not None else None
            cur.matched = pred is None or pred(view)
            yield view

    write = out.write
    printed = 0
    shown: TrackedConnection | None = None
    for chunk in follow(packets(), select):
        if not cur.matched:
            continue
        if chunk.conn is not shown:
            shown = chunk.conn
            text = describe(chunk.conn)
            if chunk.conn.proto is None and cur.proto:  # follow's own tracker does not dissect
                text += f" {cur.proto}"
            write(f"=== {text} ===\n")
        write(_chunk_head(chunk, cur.view))
        if as_hex:
            write("".join(f"{row}\n" for row in hexdump(chunk.data)))
        elif chunk.data:
            write(escaped(chunk.data))
        printed += 1
        if printed == count:
            break
    return printed


def _chunk_head(chunk: FollowChunk, view: PacketView | None) -> str:
    """``>>> guest -> host 91 bytes``: ``>>>`` from the client (the side that connected),
    ``<<<`` from the server; guest and host from the capture's direction flag, client and
    server when the file has none (classic pcap). SEQPACKET message marks follow."""
    arrow = ">>>" if chunk.from_client else "<<<"
    if chunk.from_guest is None:
        who = "client -> server" if chunk.from_client else "server -> client"
    else:
        who = "guest -> host" if chunk.from_guest else "host -> guest"
    marks = ""
    if chunk.conn.sock_type == _SEQPACKET:
        flags = view.hdr.flags if view is not None and view.hdr is not None else 0
        marks = (" EOM" if chunk.eom else "") + (" EOR" if flags & H.SEQ_EOR else "")
    size = "1 byte" if len(chunk.data) == 1 else f"{len(chunk.data)} bytes"
    return f"{arrow} {who} {size}{marks}\n"
