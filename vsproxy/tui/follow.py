"""A connection as the follow screen draws it: its transcript (``vsproxy.replay.transcript``, the
model ``vsproxy read --follow`` and replay use), built from the store's packets of that
connection, then styled text. Sans-I/O apart from reading the store.

Each step is drawn as ``vsproxy read --follow`` prints it (``read.step_head``), with the packet
numbers it came in after the arrow (``>>> #3 guest -> host 91 bytes``): bytes (text or hex) in
their direction's colour from the packet list, SEQPACKET message ends and record ends
(``[EOM]``, ``[EOR]``), the application messages that end there (``⮑ HTTP GET /v1/keys``),
half-closes and resets. Under the title: the verdict comment (a denial's rule, a remap) and what
the capture lacks (its start, bytes a peer acknowledged that are not there, its end). A live
source's open connection shows what is still arriving as provisional steps (``so far``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from rich.text import Text

from vsproxy.capture.reader import CaptureError
from vsproxy.decode import Decoder
from vsproxy.read import capture_lost, escaped, gap_head, hexdump, start_notes, step_head
from vsproxy.replay.transcript import Conversation, Data, Reset, Step, TranscriptBuilder
from vsproxy.tui import styles
from vsproxy.tui.model import Store

MAX_CHUNK_BYTES = 64 * 1024  # a step's bytes drawn at most (the rest is counted)
_NOT_CLOSED = "not closed when the capture ended"
_STARTED_BEFORE = "started before the capture"  # said by start_notes


class Gap(NamedTuple):
    """Bytes the capture lost, where a peer's ``fwd_cnt`` showed it (``vsproxy read``'s ``!!!`` line)."""

    from_client: bool  # sent by the client (the peer that acknowledged them is the server)
    lost: int


@dataclass(slots=True)
class Followed:
    """One connection's transcript, with the store's packets each step came in."""

    conv: Conversation | None  # None: no packet of it is held
    steps: list[tuple[Step | Gap, int, int]] = field(default_factory=list)  # its first and last packet index
    arriving: list[Data] = field(default_factory=list)  # live: bytes not a whole step yet
    problems: list[str] = field(default_factory=list)  # what the capture lacks (beyond its start)


def followed(store: Store, cid: int, ended: bool = True) -> Followed:
    """Connection ``cid``'s transcript from the packets the store holds (a fresh decoder over them,
    so its protocol and messages are the ones its packets get; its id is the store's).
    ``ended``: the source will add nothing (a file read to its end): what is still being cut is
    made steps and an open connection is one the capture ended; else (live) it shows as arriving."""
    idx = store.conn_packets(cid)
    decoder = Decoder()
    builder = TranscriptBuilder(stream=True)
    out = Followed(None)
    lost = 0
    try:
        for j in idx:
            d = decoder.decode(store.record(j))
            builder.feed(d)
            out.steps += [(m.step, idx[m.first], idx[m.last]) for m in builder.drain()]
            conv = builder.conversation(d.conn.id) if d.conn is not None else None
            if conv is not None and capture_lost(conv) > lost and d.view.hdr is not None:
                h = d.view.hdr  # its sender acknowledged bytes of the other side's the capture lacks
                out.steps.append((Gap((h.src_cid, h.src_port) != conv.client, capture_lost(conv) - lost), j, j))
                lost = capture_lost(conv)
    except (CaptureError, IndexError):  # a bad frame, or a packet the ring let go meanwhile: what came before
        pass
    convs = builder.transcript.conversations
    if not convs:
        return out
    conv = out.conv = convs[0]
    if ended:
        builder.finish()
        out.steps += [(m.step, idx[m.first], idx[m.last]) for m in builder.drain()]
    else:
        out.arriving = builder.pending(conv.id)
    conv.id = cid  # the fresh decoder counted from 1; the store's id is the one everything shows
    out.problems = [p for p in conv.problems() if p != _STARTED_BEFORE and (ended or p != _NOT_CLOSED)]
    return out


def render(f: Followed, as_hex: bool, drops: int = 0) -> Text:
    out = Text(no_wrap=False)
    conv = f.conv
    if conv is None:
        out.append("(no packet of this connection is held)\n", style="italic")
        return out
    out.append(f"=== {conv.title()} ===\n", style="bold")
    for note in start_notes(conv):
        out.append(f"    {note}\n", style=styles.DENIED if conv.comment and note.startswith("[denied") else "italic")
    for p in f.problems:
        out.append(f"    ({p})\n", style="italic")
    if drops:
        out.append(f"    (the live feed dropped {drops:,} packets: this connection may lack some)\n",
                   style=styles.DROPS)
    if not f.steps and not f.arriving:
        out.append("(nothing sent on this connection)\n", style="italic")
    for step, first, last in f.steps:
        _step(out, conv, step, f"#{first + 1}" if first == last else f"#{first + 1}-#{last + 1}", as_hex)
    for data in f.arriving:
        _step(out, conv, data, "so far", as_hex)
    return out


def _step(out: Text, conv: Conversation, step: Step | Gap, where: str, as_hex: bool) -> None:
    if isinstance(step, Gap):
        arrow, _, rest = gap_head(conv, step.from_client, step.lost).partition(" ")
        out.append(f"{arrow} {where} {rest}\n", style=styles.DROPS)
        return
    from_guest = None if conv.guest_is_client is None else step.from_client == conv.guest_is_client
    style = styles.direction_style(from_guest, step.from_client)
    arrow, _, rest = step_head(conv, step, tui=True).partition(" ")
    out.append(f"{arrow} {where} {rest}\n", style=styles.RST if isinstance(step, Reset) else f"bold {style}")
    if not isinstance(step, Data):
        return
    data = step.data[:MAX_CHUNK_BYTES]
    if data:
        out.append("\n".join(hexdump(data)) + "\n" if as_hex else escaped(data), style=style)
    if len(step.data) > len(data):
        out.append(f"... {len(step.data) - len(data)} more bytes\n", style="italic")
    for summary in step.app:
        out.append(f"    ⮑ {summary}\n", style=f"italic {style}")
    if conv.type_name == "SEQPACKET" and step.eom:
        out.append("─" * 20 + " message end\n", style="dim")


def text_of(f: Followed, as_hex: bool = False) -> str:
    """What ``render`` draws, as plain text (tests compare it with ``vsproxy read --follow``)."""
    return render(f, as_hex).plain


__all__: Sequence[str] = ("Followed", "Gap", "followed", "render", "text_of")
