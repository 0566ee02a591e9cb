"""``vsproxy replay show FILE [--filter EXPR] [--data]``: a capture's transcript, as replay reads
it (vsproxy/replay/transcript.py): per connection its title (ends as the guest saw them, type,
protocol, real peer, outcome), its verdict comment, what the capture lacks, then each step in
order: ``>>>`` from the side that connected, ``<<<`` from the other, data with its size,
SEQPACKET marks and application summaries (``--data``: the bytes too, escaped as ``vsproxy read
--follow`` prints them), half-closes with their flags, resets, and the time since the
connection's first packet.

Exit status: 0, 1 a damaged capture (what was read is shown first), 2 bad arguments or a file
that cannot be opened.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final, TextIO

from vsproxy.capture.reader import printable
from vsproxy.filter import FilterError
from vsproxy.replay.transcript import Conversation, Data, Reset, Shutdown, Transcript, load_transcript

PROG: Final = "vsproxy replay show"


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Print a capture's transcript: what each connection carried, as replay "
                "and vsproxy diff read it.")
    p.add_argument("file", metavar="FILE", help="a pcap or pcapng capture, or - for stdin")
    p.add_argument("--filter", metavar="EXPR", default="", help="only connections a packet of which matches EXPR")
    p.add_argument("--data", action="store_true", help="the bytes of each step too")
    return p


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(list(argv))
        t = load_transcript(args.file, args.filter)
    except _Usage as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except FilterError as e:
        print(f"{PROG}: bad filter: {e}\n{e.render()}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        render(t, sys.stdout, args.data)
        sys.stdout.flush()
    except BrokenPipeError:
        return 0
    if t.error is not None:
        print(f"{PROG}: {args.file}: {t.error} (after {t.packets} packets)", file=sys.stderr)
        return 1
    return 0


def render(t: Transcript, out: TextIO, data: bool = False) -> None:
    for conv in t.conversations:
        if conv.selected:
            out.write("".join(f"{line}\n" for line in conversation_lines(conv, data)))
    if t.orphans:
        out.write(f"({t.orphans} packets of connections whose start and data are not in the capture)\n")


def conversation_lines(conv: Conversation, data: bool = False) -> list[str]:
    from vsproxy.read import escaped

    lines = [f"=== {conv.title()} ==="]
    if conv.guest_is_client is False:
        lines.append("    (the peer connected to the guest: >>> is the peer)")
    if conv.comment:
        lines.append(f"    [{printable(conv.comment)}]")
    lines += [f"    ({p})" for p in conv.problems()]
    seq = conv.type_name == "SEQPACKET"
    for step in conv.steps:
        arrow = ">>>" if step.from_client else "<<<"
        at = f"+{step.time - conv.start:.6f}s"
        if isinstance(step, Data):
            n = len(step.data)
            marks = ((" EOM" if step.eom else " (no EOM)") if seq else "") + (" EOR" if step.eor else "")
            app = f"  {'; '.join(printable(a) for a in step.app)}" if step.app else ""
            lines.append(f"{arrow} {at} {n} byte{'' if n == 1 else 's'}{marks}{app}")
            if data and step.data:
                lines += [f"    {line}" for line in escaped(step.data).splitlines()]
        elif isinstance(step, Shutdown):
            lines.append(f"{arrow} {at} SHUTDOWN {step.flag_names}")
        elif isinstance(step, Reset):
            lines.append(f"{arrow} {at} RST")
    return lines
