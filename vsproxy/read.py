"""``vsproxy read [options] FILE [FILTER ...]``: print a vsock capture, like ``tcpdump -r`` and
``tshark -r`` (``-`` reads stdin).

Reads vsproxy's captures and the kernel's vsockmon ones (pcap or pcapng, LINKTYPE_VSOCK). The
decoding is ``vsproxy.decode.Decoder``'s: every packet goes through the stream tracker
(``dissectors.streams``), which reassembles connections and names what they carry; the filter
(``vsproxy.filter``, docs/filter.md), the rest of the command line joined by spaces, then picks
the packets to print. This module parses the command line and prints, in one of four forms:

- one line per packet (default): the capture's summary line, and when application messages end
  in the packet, two spaces, the connection id and their summaries (``  #1 HTTP GET /v1/keys``);
- ``--json``: one object per packet, with ``conn``, ``proto`` and ``app``;
- ``-V``: that line, then the frame's facts, the headers as scapy decodes them, each message's
  fields and the start of the payload;
- ``--follow SELECTOR``: what the selected connection(s) carried, like ``tshark -z follow``, from
  their transcripts (``vsproxy.replay.transcript``, the model the TUI's follow view and replay
  use): each message or chunk of bytes with its direction, SEQPACKET marks and application
  messages, half-closes, resets, and what the capture lacks.

Exit status: 0 done (also when whoever reads the output goes away), 1 a damaged capture (what
could be read is printed first), 2 a bad command line, filter, selector or plugin, or a file
that cannot be opened. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import IO, Any, Final

from dissectors.app import PluginError, load_plugins
from dissectors.streams import Selector, SelectorError, as_selector
from vsproxy.capture.reader import CaptureError, Record, as_json, printable, records, summary_line
from vsproxy.decode import RECENT_CONNECTIONS, Decoded, Decoder, follow_selector, open_capture
from vsproxy.filter import Filter, FilterError, compile_filter
from vsproxy.replay.transcript import Conversation, Data, Made, Shutdown, Step, TranscriptBuilder
from vsproxy.vsock import header as H

PROG: Final = "vsproxy read"

# One-line mode: at most this many summaries per packet, each cut to this many characters, so
# a packet that ends a burst of HTTP/2 frames still prints a readable line.
MAX_SUMMARIES: Final = 3
MAX_SUMMARY: Final = 100
# -V: the payload dump stops after this many bytes, a field value after this many characters.
VERBOSE_PAYLOAD: Final = 256
MAX_FIELD: Final = 200

_SEQPACKET: Final = int(H.Type.SEQPACKET)


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
        help="print what connection(s) carried (their transcripts): N or #N (a connection id), CID:PORT, "
        "CID:PORT,CID:PORT, or all",
    )
    p.add_argument("--hex", action="store_true", help="with --follow: a hex dump instead of escaped text")
    p.add_argument(
        "-c",
        dest="count",
        metavar="N",
        type=_positive,
        help="stop after printing N packets (with --follow: N messages or chunks of bytes)",
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        flt = _compile(" ".join(args.filter))
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
        f = open_capture(args.file)
    except OSError as e:
        print(f"{PROG}: {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    decoder = Decoder(flt)  # after load_plugins: it takes the registered dissectors
    out = sys.stdout
    follow: Follow | None = None
    try:
        with f:
            if select is not None:
                every = args.follow.strip().lower() == "all"
                follow = Follow(out, select, args.hex, args.count, every=every)
                follow.run(decoder, records(f))
                if not follow.printed:
                    print(f"{PROG}: --follow {args.follow}: nothing to show", file=sys.stderr)
            else:
                packets = decoder.packets(records(f))
                render = _json if args.json else _verbose if args.verbose else _line
                _print_packets(packets, args.count, render, out)
            out.flush()
    except CaptureError as e:
        if follow is not None:  # what the capture lacks, as far as it was read
            try:
                follow.end(str(e))
            except BrokenPipeError:
                return _reader_went_away()
        _flush_quietly(out)
        n = decoder.count
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


def _compile(text: str) -> Filter:
    try:
        return compile_filter(text)
    except FilterError as e:
        raise _Usage(f"bad filter: {e}\n{e.render()}") from None


def _selector(text: str) -> Selector | int:
    try:
        return follow_selector(text)
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

_Render = Callable[[Decoded], str]


def _print_packets(packets: Iterable[Decoded], count: int | None, render: _Render, out: IO[str]) -> None:
    """Print the packets the filter matched (the decoder has fed every packet to the tracker)."""
    write = out.write
    printed = 0
    for d in packets:
        write(render(d))
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


def line_text(d: Decoded) -> str:
    """One packet as one-line mode prints it (with its line break); the TUI's packet list too."""
    app = d.view.app
    if not app:
        return summary_line(d.packet) + "\n"
    return summary_line(d.packet, app_tail(d.conn_id, app)) + "\n"


def _json(d: Decoded) -> str:
    obj = as_json(d.packet)
    obj["conn"] = d.conn_id
    obj["proto"] = d.view.proto
    obj["app"] = list(d.view.app)
    return json.dumps(obj) + "\n"


# --- -V -------------------------------------------------------------------------------------------

_INDENT: Final = "    "
_STRUCTS: Final = {"VsockMon": "af_vsockmon_hdr", "VirtioVsock": "virtio_vsock_hdr"}
_DIRECTION: Final = {
    True: "from the guest (inbound)",
    False: "to the guest (outbound)",
    None: "unknown (not in the file)",
}


def verbose_text(d: Decoded) -> str:
    """One packet as ``-V`` prints it; the TUI's detail tree is built from these lines."""
    pkt = d.packet
    conn = d.conn_text()
    rec = pkt.record
    lines = [_line(d).rstrip("\n"), f"{_INDENT}frame"]
    facts = [
        ("time", _date(rec.ts)),
        ("interface", printable(rec.interface) or "(not in the file)"),
        ("direction", _DIRECTION[rec.inbound]),
        ("length", f"{len(rec.frame)} bytes"
                   + (f" captured of {len(rec.frame) + pkt.snapped} (a snaplen cut it)" if pkt.snapped else "")),
    ]
    if rec.comment is not None:
        facts.append(("comment", printable(rec.comment)))
    if conn is not None:
        facts.append(("connection", conn))
    lines += _fields(facts)
    lines += _layers(rec.frame)
    for m in d.messages:
        lines.append(f"{_INDENT}{printable(m.summary)}")
        lines += [f"{_INDENT * 2}{printable(name)}: {_cut(printable(value), MAX_FIELD)}" for name, value in m.fields]
    if pkt.payload:
        lines.append(f"{_INDENT}payload ({len(pkt.payload)} bytes)" if not pkt.snapped else
                     f"{_INDENT}payload (the first {len(pkt.payload)} of {len(pkt.payload) + pkt.snapped} bytes)")
        shown = pkt.payload[:VERBOSE_PAYLOAD]
        lines += [f"{_INDENT * 2}{row}" for row in hexdump(shown, digits=4)]
        if len(pkt.payload) > len(shown):
            lines.append(f"{_INDENT * 2}... {len(pkt.payload) - len(shown)} more bytes")
    return "\n".join(lines) + "\n\n"


_line = line_text
_verbose = verbose_text


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


class Follow:
    """``--follow``: records in, the selected connections' transcripts out, each step printed as
    the builder makes it (a streaming builder holds only what is not printed yet):

    - ``=== title ===`` (``Conversation.title``: id, device, ends, type, protocol, real peer,
      outcome) when a connection's first step prints, and again when the output switches between
      connections; the first time, its verdict comment (``[denied by ...]``) and a start the
      capture lacks follow on indented lines;
    - a step: ``>>>`` from the side that connected, ``<<<`` from the other, who sent it to whom
      (guest and host from the capture's direction flag; client and server when the file has
      none), then for bytes their size, SEQPACKET marks (``EOM``, ``EOR``; ``(no EOM)``: the
      capture ended inside the message) and the application messages that end there, the bytes
      below (escaped text, or ``--hex``); ``SHUTDOWN`` with its flags and who stops what; ``RST``;
    - where the capture lost bytes (a peer's ``fwd_cnt`` acknowledged more than the capture
      holds; capture drops), a line that says how many, at the packet that showed it;
    - at the end, for each connection the capture did not hold whole (not closed, bytes lost,
      cut inside a message), its header again with what is missing; with ``all``, the packets of
      connections nothing else of is in the capture.

    A connection is shown when ``select`` picks it and a packet of it matches the filter; only the
    packets of connections ``select`` picks go into the transcript. Following one connection id,
    reading stops once no later packet can join it: its last packets (the second RST, a credit
    update) can come after it closed, so not then, but once the decoder has forgotten it
    (``recent`` connections, the decoder's own bound, ended after it), or at the end of the capture."""

    def __init__(self, out: IO[str], select: Selector | int, as_hex: bool = False, count: int | None = None,
                 *, every: bool = False, recent: int = RECENT_CONNECTIONS) -> None:
        self.out = out
        self.select = as_selector(select)
        self.only = select if isinstance(select, int) else None
        self.recent = recent  # the decoder's: how many ended connections it still gives packets to
        self.every = every  # ``all``: say so for packets of no connection too
        self.as_hex = as_hex
        self.count = count
        self.builder = TranscriptBuilder(stream=True)
        self.printed = 0  # lines of transcript printed
        self.data = 0  # data steps printed (what -c counts)
        self._shown: Conversation | None = None
        self._seen: set[int] = set()  # conversations whose header has been printed
        self._lost: dict[int, int] = {}  # conversation id -> bytes lost said so far

    def run(self, decoder: Decoder, recs: Iterable[Record]) -> None:
        builder = self.builder
        select = self.select
        ended_after: int | None = None  # following one id: connections ended since it closed
        for rec in recs:
            d = decoder.decode(rec)
            conn = d.conn
            if ended_after is not None:
                ended_after += len(decoder.tracker.closed)
                if ended_after >= self.recent:
                    break
            if conn is None or not select(conn):
                if conn is None and self.every:
                    builder.feed(d)  # counted: packets of connections the capture lacks the start and data of
                continue
            builder.feed(d)
            if self._print(builder.drain()):
                return
            if conn is not None and d.view.hdr is not None:
                h = d.view.hdr
                conv = builder.conversation(conn.id)
                self._gap(conv, (h.src_cid, h.src_port) == conn.client)
                if self.only == conn.id and ended_after is None and conv is not None and conv.closed:
                    ended_after = 0  # counted from the next packet (this one's ended connections are not after it)
            if builder.full:  # bytes not printed yet: a message still being cut, connections not selected yet
                raise CaptureError(f"more than {builder.max_bytes} bytes of payload not printed yet: stopped here")
        self.end()

    def end(self, error: str | None = None) -> None:
        """The capture ended (or is damaged, ``error``): the steps still being cut, then what the
        capture lacks."""
        builder = self.builder
        t = builder.finish(error)
        if self._print(builder.drain()):
            return
        write = self.out.write
        for conv in t.conversations:
            if not conv.selected:
                continue
            lacks = [p for p in conv.problems() if p != _STARTED_BEFORE]
            if lacks:
                write(f"=== {conv.title()} ===\n" + "".join(f"    ({p})\n" for p in lacks))
                self.printed += 1
        if t.forgotten:
            n = f"{t.forgotten} more connection{'' if t.forgotten == 1 else 's'}"
            write(f"=== the capture ===\n    ({n} the capture lacks part of, said above where it showed)\n")
            self.printed += 1
        if self.every and t.orphans:
            n = f"{t.orphans} packet{'' if t.orphans == 1 else 's'}"
            write(f"=== the capture ===\n    ({n} of connections whose start and data are not in the capture)\n")
            self.printed += 1

    def _gap(self, conv: Conversation | None, by_client: bool) -> None:
        """Say where a selected conversation turned out to lack bytes (``capture_lost`` grew at a
        packet from the client, ``by_client``, or the server: the other side's bytes are lost)."""
        if conv is None or not conv.selected:
            return
        lost, before = capture_lost(conv), self._lost.get(conv.id, 0)
        if lost <= before:
            return
        self._lost[conv.id] = lost
        self._header(conv)
        self.out.write(gap_head(conv, not by_client, lost - before) + "\n")
        self.printed += 1

    def _header(self, conv: Conversation) -> None:
        if conv is not self._shown:
            self._shown = conv
            self.out.write(f"=== {conv.title()} ===\n")
            if conv.id not in self._seen:
                self._seen.add(conv.id)
                self.out.write("".join(f"    {line}\n" for line in start_notes(conv)))

    def _print(self, made: list[Made]) -> bool:
        """Print steps; True once ``count`` data steps are printed."""
        write = self.out.write
        for m in made:
            conv = m.conv
            self._header(conv)
            write(step_text(conv, m.step, self.as_hex))
            self.printed += 1
            if isinstance(m.step, Data):
                self.data += 1
                if self.data == self.count:
                    return True
        return False


_STARTED_BEFORE: Final = "started before the capture"


def start_notes(conv: Conversation) -> list[str]:
    """What to say under a connection's first header: its verdict comment (a denial's rule, a
    remap's real peer) and a start the capture lacks."""
    notes = [f"[{printable(conv.comment)}]"] if conv.comment else []
    if not conv.seen_start:
        notes.append(f"({_STARTED_BEFORE}: who connected is a guess)")
    return notes


def who(conv: Conversation, from_client: bool) -> tuple[str, str]:
    """(sender, receiver): guest and host from the capture's direction flag, client and server
    when the file has none."""
    if conv.guest_is_client is None:
        return ("client", "server") if from_client else ("server", "client")
    from_guest = from_client == conv.guest_is_client
    return ("guest", "host") if from_guest else ("host", "guest")


_STOPS: Final = {H.SHUTDOWN_RCV: "receives no more", H.SHUTDOWN_SEND: "sends no more",
                 H.SHUTDOWN_BOTH: "sends and receives no more", 0: "says nothing"}


def step_head(conv: Conversation, step: Step, tui: bool = False) -> str:
    """A step's line without its bytes: ``>>> guest -> host 91 bytes  HTTP GET /v1/keys``,
    ``>>> guest -> host 5 bytes EOM EOR``, ``<<< host -> guest SHUTDOWN SEND (the host sends no
    more)``, ``<<< host -> guest RST``. ``tui``: the follow view's form, marks as ``[EOM]`` and
    without the application messages (it draws them on lines of their own)."""
    arrow = ">>>" if step.from_client else "<<<"
    src, dst = who(conv, step.from_client)
    if isinstance(step, Data):
        n = len(step.data)
        marks = ""
        if conv.sock_type == _SEQPACKET:
            marks = (" EOM" if step.eom else " (no EOM)") + (" EOR" if step.eor else "")
            if tui:
                marks = marks.replace(" EOM", " [EOM]").replace(" EOR", " [EOR]")
        app = app_tail(None, step.app) if step.app and not tui else ""
        return f"{arrow} {src} -> {dst} {n} byte{'' if n == 1 else 's'}{marks}{app}"
    if isinstance(step, Shutdown):
        return f"{arrow} {src} -> {dst} SHUTDOWN {step.flag_names} (the {src} {_STOPS[step.flags]})"
    return f"{arrow} {src} -> {dst} RST"


def capture_lost(conv: Conversation) -> int:
    """Bytes a peer acknowledged that the capture lacks (drops), as far as they are told apart
    from what a snaplen cut (which the records say themselves, and the end's account counts)."""
    return conv.lost if conv.lost > conv.snapped else 0


def gap_head(conv: Conversation, from_client: bool, lost: int) -> str:
    """``!!! host -> guest 194 bytes missing (the guest acknowledged them; the capture lost them)``:
    where a conversation turned out to lack bytes a side sent, how many more than it was known
    to lack."""
    src, dst = who(conv, from_client)
    n = f"{lost} byte{'' if lost == 1 else 's'}"
    return f"!!! {src} -> {dst} {n} missing (the {dst} acknowledged them; the capture lost them)"


def step_text(conv: Conversation, step: Step, as_hex: bool = False) -> str:
    """A step as ``--follow`` prints it: its line, then its bytes."""
    head = step_head(conv, step) + "\n"
    if not isinstance(step, Data) or not step.data:
        return head
    if as_hex:
        return head + "".join(f"{row}\n" for row in hexdump(step.data))
    return head + escaped(step.data)
