"""``vsproxy diff [--all] A B``: compare two captures as transcripts (vsproxy/replay/compare.py).

Per connection: ops, flags, payload, SEQPACKET boundaries, outcome, verdict and comments; not
timestamps, ephemeral ports or credit packets. Prints ``same: N connections`` (exit 0), or the
first difference in context (``--all``: every one; exit 1). A file that cannot be read, is not a
capture or is damaged is a one-line error (exit 2); what a capture lacks (connections started
before it, not closed, bytes lost) is said on stderr, and the comparison goes on.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

from vsproxy.replay.compare import differences
from vsproxy.replay.transcript import Transcript, load_transcript

PROG: Final = "vsproxy diff"


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Compare two vsock captures as transcripts: per connection the ops, flags, "
                "payload and message boundaries; not timestamps or ephemeral ports.",
                epilog="Exit status: 0 the same, 1 different, 2 bad arguments or a file that is not a whole capture.")
    p.add_argument("a", metavar="A", help="a pcap or pcapng file")
    p.add_argument("b", metavar="B", help="a pcap or pcapng file")
    p.add_argument("--all", action="store_true", help="every differing connection, not just the first")
    return p


def load(path: str) -> Transcript:
    """The transcript of ``path``; ``_Usage`` when it cannot be opened or is damaged."""
    try:
        t = load_transcript(path)
    except OSError as e:
        raise _Usage(f"{path}: {e.strerror or e}") from None
    if t.error is not None:
        raise _Usage(f"{path}: {t.error} (after {t.packets} packets)")
    for problem in t.problems():
        print(f"{PROG}: {path}: {problem}", file=sys.stderr)
    return t


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        a, b = load(args.a), load(args.b)
    except _Usage as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    found = 0
    for diff in differences(a, b):
        if not found:
            print(f"{args.a} (A) and {args.b} (B) differ:")
        print(diff.render())
        found += 1
        if not args.all:
            break
    if found:
        return 1
    n = len(a.conversations)
    print(f"same: {n} connection{'' if n == 1 else 's'}")
    return 0
