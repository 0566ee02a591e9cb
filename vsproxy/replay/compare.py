"""Two transcripts compared as what crossed, not how it was timed (what ``vsproxy diff`` prints).

Each conversation is reduced to its ``Shape``: the device, type, which end connected and the
CID it connected from, the end it connected to, the real peer, outcome, verdict and comment,
and per side the ordered ``Item``s it sent: data (SEQPACKET: each message with its EOR mark;
STREAM: consecutive data of one side joined, since how a byte stream is cut into packets depends
on timing), half-closes with their flags, resets. Left out: timestamps, the ephemeral port of the
side that connected, credit packets, and the interleaving of the two sides (which side's packet
the capture caught first is a race). Conversations are paired by their identity (device, type,
who connected, from which CID, to which end), in capture order within it.

Sans-I/O: transcripts in, ``Difference`` values out; ``first_difference`` is what the command
prints. ``byte_context`` shows where two byte strings part, for replay's comparisons too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from vsproxy.capture.reader import printable
from vsproxy.replay.transcript import Conversation, Data, Reset, Shutdown, Transcript

CONTEXT_BYTES: Final = 24  # bytes shown on each side of the first differing byte
CONTEXT_ITEMS: Final = 2  # items shown before the first differing one


@dataclass(frozen=True, slots=True)
class Item:
    """One thing one side did, as compared."""

    kind: str  # "data", "shutdown", "reset"
    data: bytes = b""
    eor: bool = False  # SEQPACKET record mark
    seqpacket: bool = False
    flags: int = 0  # SHUTDOWN flags

    def text(self) -> str:
        if self.kind == "data":
            marks = (" EOM" if self.seqpacket else "") + (" EOR" if self.eor else "")
            n = len(self.data)
            return f"{n} byte{'' if n == 1 else 's'}{marks} {snippet(self.data)}"
        if self.kind == "shutdown":
            names = [n for bit, n in ((1, "RCV"), (2, "SEND")) if self.flags & bit]
            return f"SHUTDOWN {'|'.join(names) or 'none'}"
        return "RST"


Line = tuple[str, str]  # ("A", text), ("B", text) or ("", text): whose bytes a context line shows

Identity = tuple[str, str, str, int, tuple[int, int]]  # device, type, who connected, client CID, server


@dataclass(frozen=True, slots=True)
class Shape:
    identity: Identity
    facts: tuple[tuple[str, str], ...]  # (name, value): outcome, verdict, comment, real peer
    client: tuple[Item, ...]  # what the side that connected sent
    server: tuple[Item, ...]


def who_connected(conv: Conversation) -> str:
    return {True: "guest", False: "peer", None: "client"}[conv.guest_is_client]


def shape(conv: Conversation) -> Shape:
    seq = conv.type_name == "SEQPACKET"
    sides: tuple[list[Item], list[Item]] = ([], [])
    for step in conv.steps:
        items = sides[0 if step.from_client else 1]
        if isinstance(step, Data):
            last = items[-1] if items else None
            if not seq and last is not None and last.kind == "data":
                items[-1] = Item("data", last.data + step.data)
            else:
                items.append(Item("data", step.data, step.eor, seq))
        elif isinstance(step, Shutdown):
            items.append(Item("shutdown", flags=step.flags))
        elif isinstance(step, Reset):
            items.append(Item("reset"))
    real = f"{conv.real_peer[0]}:{conv.real_peer[1]}" if conv.real_peer else "-"
    facts = (("outcome", conv.outcome.value), ("verdict", conv.verdict.value), ("comment", conv.comment or "-"),
             ("real peer", real))
    identity = (conv.device, conv.type_name, who_connected(conv), conv.client[0], conv.server)
    return Shape(identity, facts, tuple(sides[0]), tuple(sides[1]))


@dataclass(frozen=True, slots=True)
class Difference:
    """The first thing that differs in one pair of conversations (or a conversation on one side only)."""

    title: str  # the conversation(s), as ``vsproxy read`` names them
    what: str  # one line; ``{A}`` and ``{B}`` stand for the two sides' names
    context: tuple[Line, ...] = ()  # lines that show it

    def render(self, a: str = "A", b: str = "B") -> str:
        names = {"A": a, "B": b, "": ""}
        lines = [self.title.replace("{A}", a).replace("{B}", b), "  " + self.what.replace("{A}", a).replace("{B}", b)]
        for who, text in self.context:
            lines.append(f"    {names[who]}: {text}" if who else f"    {text}")
        return "\n".join(lines)


def differences(a: Transcript, b: Transcript) -> Iterator[Difference]:
    """Every pair of conversations that differs, in the order of ``a``'s capture; then those of
    ``b`` that ``a`` lacks."""
    groups: dict[Identity, list[Conversation]] = defaultdict(list)
    for conv in b.conversations:
        groups[shape(conv).identity].append(conv)
    for conv in a.conversations:
        sa = shape(conv)
        others = groups.get(sa.identity)
        if not others:
            yield Difference(f"{conv.title()} (in {{A}})", "only in {A}: {B} has no such connection")
            continue
        other = others.pop(0)
        diff = compare_pair(conv, other)
        if diff is not None:
            yield diff
    for rest in groups.values():
        for conv in rest:
            yield Difference(f"{conv.title()} (in {{B}})", "only in {B}: {A} has no such connection")


def first_difference(a: Transcript, b: Transcript) -> Difference | None:
    return next(differences(a, b), None)


def compare_pair(a: Conversation, b: Conversation) -> Difference | None:
    sa, sb = shape(a), shape(b)
    title = a.title() if a.id == b.id else f"{a.title()} ({{B}}: #{b.id})"
    for (name, va), (_, vb) in zip(sa.facts, sb.facts, strict=True):
        if va != vb:
            return Difference(title, f"{name} differs", (("A", printable(va)), ("B", printable(vb))))
    for label, ia, ib in (("from the side that connected", sa.client, sb.client),
                          ("from the side connected to", sa.server, sb.server)):
        diff = compare_items(ia, ib)
        if diff is not None:
            what, context = diff
            who = _side_name(a, label == "from the side that connected")
            return Difference(title, f"{who}: {what}", context)
    return None


def _side_name(conv: Conversation, client: bool) -> str:
    if conv.guest_is_client is None:
        return "client -> server" if client else "server -> client"
    return "guest -> peer" if conv.guest_is_client == client else "peer -> guest"


def compare_items(a: tuple[Item, ...], b: tuple[Item, ...]) -> tuple[str, tuple[Line, ...]] | None:
    """The first differing item of one side: (what, context lines), or None when they agree."""
    for i in range(max(len(a), len(b))):
        ia = a[i] if i < len(a) else None
        ib = b[i] if i < len(b) else None
        if ia == ib:
            continue
        before = tuple(("", f"same: {x.text()}") for x in a[max(0, i - CONTEXT_ITEMS) : i])
        if ia is None or ib is None:
            extra, where = (ib, "B") if ia is None else (ia, "A")
            assert extra is not None
            return f"item {i + 1} only in {{{where}}}", (*before, (where, extra.text()))
        if ia.kind == ib.kind == "data" and ia.data != ib.data:
            return f"item {i + 1}: data differs", (*before, *byte_context(ia.data, ib.data))
        return f"item {i + 1} differs", (*before, ("A", ia.text()), ("B", ib.text()))
    return None


def first_byte_difference(a: bytes, b: bytes) -> int | None:
    """The offset of the first byte where ``a`` and ``b`` differ (the shorter one's length when
    one is a prefix of the other), or None when they are equal."""
    if a == b:
        return None
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search over equal prefixes: large payloads compare at memcmp speed
    while lo < hi:
        mid = (lo + hi) // 2
        if a[lo : mid + 1] == b[lo : mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


def byte_context(a: bytes, b: bytes) -> tuple[Line, ...]:
    """Lines showing where ``a`` and ``b`` part: the offset, sizes and the bytes around it."""
    at = first_byte_difference(a, b)
    if at is None:
        return ()
    start = max(0, at - CONTEXT_BYTES)
    lead = "..." if start else ""

    def around(x: bytes) -> str:
        return f"{lead}{snippet(x[start : at + CONTEXT_BYTES], None)}{'...' if len(x) > at + CONTEXT_BYTES else ''}"

    return (("", f"first difference at byte {at} ({len(a)} and {len(b)} bytes)"), ("A", around(a)), ("B", around(b)))


def snippet(data: bytes, limit: int | None = 48) -> str:
    """Bytes as a short one-line literal: printable ASCII as it is, the rest escaped."""
    shown = data if limit is None else data[:limit]
    text = "".join(chr(c) if 0x20 <= c < 0x7F and c not in (0x22, 0x5C) else
                   {0x22: '\\"', 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(c, f"\\x{c:02x}")
                   for c in shown)
    more = "..." if limit is not None and len(data) > limit else ""
    return f'"{text}{more}"'
