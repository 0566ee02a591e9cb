"""How a message a guest sends now is matched against one the capture recorded (server replay).

- ``exact`` (default): the same bytes.
- ``prefix:N``: the first N bytes are the same; the message is as long as the recorded one
  (so a nonce or a timestamp after the first N bytes does not matter).
- ``http``: both are HTTP/1.x requests with the same method, target and body, and the same
  headers except the ignored ones (``--replay-ignore-header``, names case-insensitive).

``Matching.check`` is sans-I/O: bytes buffered so far in, ``Match`` / ``WAIT`` / ``NO`` out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from vsproxy.replay import http


class MatchError(ValueError):
    """A matching option that cannot be used."""


class Result(Enum):
    MATCH = "match"
    WAIT = "wait"  # what came so far could still become the recorded message
    NO = "no"


@dataclass(frozen=True, slots=True)
class Outcome:
    result: Result
    used: int = 0  # bytes of the buffer that make the message, when it matched


WAIT: Final = Outcome(Result.WAIT)
NO: Final = Outcome(Result.NO)
MODES: Final = ("exact", "http", "prefix:N")


@dataclass(frozen=True, slots=True)
class Matching:
    mode: str = "exact"  # "exact", "prefix" or "http"
    prefix: int = 0
    ignore_headers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, text: str, ignore_headers: tuple[str, ...] = ()) -> Matching:
        ignored = frozenset(h.strip().lower() for h in ignore_headers)
        if text in ("exact", "http"):
            return cls(text, 0, ignored)
        kind, _, n = text.partition(":")
        if kind == "prefix" and n.isdigit() and int(n) > 0:
            return cls("prefix", int(n), ignored)
        raise MatchError(f"bad matching {text!r} (known: {', '.join(MODES)})")

    def describe(self) -> str:
        return f"prefix:{self.prefix}" if self.mode == "prefix" else self.mode

    def check(self, buf: bytes, expected: bytes, ended: bool) -> Outcome:
        """Whether ``buf`` (the guest's bytes not yet matched; ``ended``: no more will come,
        or ``buf`` is one whole SEQPACKET message) starts with the message ``expected``."""
        if self.mode == "http":
            return self._http(buf, expected, ended)
        if self.mode == "prefix":
            k = min(self.prefix, len(expected))
            head = buf[:k]
            if head != expected[: len(head)]:
                return NO
            if len(buf) >= len(expected):
                return Outcome(Result.MATCH, len(expected))
            if ended:
                return Outcome(Result.MATCH, len(buf)) if len(buf) >= k else NO
            return WAIT
        if len(buf) >= len(expected):
            return Outcome(Result.MATCH, len(expected)) if buf.startswith(expected) else NO
        return NO if ended or not expected.startswith(buf) else WAIT

    def _http(self, buf: bytes, expected: bytes, ended: bool) -> Outcome:
        try:
            want = http.parse(expected, ended=True)
        except http.NotHttp:
            want = None
        if want is None:  # the recorded message is not a whole HTTP request: bytes decide
            return Matching("exact").check(buf, expected, ended)
        try:
            got = http.parse(buf, ended)
        except http.NotHttp:
            return NO
        if got is None:
            return WAIT
        msg, used = got
        rec = want[0]
        same = (msg.method == rec.method and msg.target == rec.target and msg.body == rec.body
                and msg.headers_except(self.ignore_headers) == rec.headers_except(self.ignore_headers))
        return Outcome(Result.MATCH, used) if same else NO
