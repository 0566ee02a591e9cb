"""What vsproxy decided about a packet or a connection, in one place.

A ``Mark`` is made where the decision is taken (the switch, the core) and is the text that
goes into logs and pcapng comments, rendered once, here. ``verdict_of`` reads it back from
a capture's comment, for ``vsproxy read``, the filter language and the TUI: writing and
reading the words live side by side, so they cannot drift apart.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    ALLOWED = "allowed"
    DENIED = "denied"  # a rule refused it: vsproxy answered RST
    SPOOFED = "spoofed"  # the guest spoke as another CID: dropped
    REFUSED = "refused"  # a limit refused it (max-connections, max-pending): vsproxy answered RST

    @property
    def word(self) -> str:
        return self.value


class Mark(str):
    """A connection's or packet's capture comment, typed: the text is the ``str`` itself (so
    taps and the C paths take it as it is), the verdict and the rule ride along."""

    verdict: Verdict
    rule: str
    rewritten: bool

    def __new__(cls, text: str, verdict: Verdict = Verdict.ALLOWED, rule: str = "", rewritten: bool = False) -> Mark:
        m = super().__new__(cls, text)
        m.verdict = verdict
        m.rule = rule
        m.rewritten = rewritten
        return m

    @classmethod
    def denied(cls, rule: str) -> Mark:
        return cls(f"denied by {rule}; vsproxy answers RST", Verdict.DENIED, rule)

    @classmethod
    def rewritten_to(cls, rule: str | None, cid: int, port: int) -> Mark:
        """Allowed, with the peer's address rewritten: the real peer is ``cid:port``."""
        text = f"rewritten ({rule}): real peer {cid}:{port}" if rule else f"rewritten: real peer {cid}:{port}"
        return cls(text, Verdict.ALLOWED, rule or "", rewritten=True)

    @classmethod
    def spoofed(cls, src_cid: int, guest_cid: int) -> Mark:
        return cls(f"spoofed: src_cid {src_cid} is not the guest's CID {guest_cid}; dropped", Verdict.SPOOFED)

    @classmethod
    def refused(cls, why: str) -> Mark:
        return cls(f"refused: the device is at its {why}; vsproxy answers RST", Verdict.REFUSED, why)


# How each kind of mark starts, as written above (the first word: as read since the first captures).
_PREFIXES = (("denied", Verdict.DENIED), ("spoofed", Verdict.SPOOFED), ("refused", Verdict.REFUSED))


def verdict_of(comment: str | None) -> Verdict:
    """The verdict a capture comment written by vsproxy records (allowed when none)."""
    if not comment:
        return Verdict.ALLOWED
    if isinstance(comment, Mark):
        return comment.verdict
    for prefix, verdict in _PREFIXES:
        if comment.startswith(prefix):
            return verdict
    return Verdict.ALLOWED


def rewritten_in(comment: str | None) -> bool:
    return comment is not None and comment.startswith("rewritten")
