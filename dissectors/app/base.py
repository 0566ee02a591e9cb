"""The plugin interface: ``AppMessage`` (what a dissector reports) and ``AppDissector`` (one
direction of one connection, fed bytes in order, sans-I/O).

A subclass names itself (``name``, ``ports``, ``detect``) and implements ``parse``: take one
unit off the front of the buffered bytes. The base class does the rest, the same way for
every protocol: buffering with a bound (``max_buffer``), skipping bodies the parser does not
need to see, holding a message until its last byte has arrived, and giving up on a stream
once, with one message, when ``parse`` raises ``Undecodable`` or the bound is reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

MAX_BUFFER = 1 << 20  # bytes buffered per direction before a dissector gives up on the stream


@dataclass(frozen=True, slots=True)
class AppMessage:
    """One application message (or frame, or record) that ended in a packet."""

    proto: str  # short lower-case name: "http", "tls", "grpc", ...
    summary: str  # one line: "HTTP GET /v1/keys"
    fields: tuple[tuple[str, str], ...] = ()  # the detail lines, (name, value)


class Undecodable(Exception):
    """Raised by ``parse``: this stream cannot be dissected further. The text completes the
    one message the stream then gets: ``TLS`` + ``bad record``."""


# What parse returns: bytes used, and the message(s) that unit completes (None for none).
Step = tuple[int, AppMessage | Sequence[AppMessage] | None]


class AppDissector:
    """One direction of one connection. Subclasses set ``name`` and implement ``parse``.

    ``feed`` never raises for any input: ``parse`` signals a damaged or foreign stream by
    raising ``Undecodable``, after which the direction is silent.
    """

    name: ClassVar[str] = ""  # short lower-case protocol name, unique in the registry
    label: ClassVar[str] = ""  # what summaries start with; defaults to name.upper()
    ports: ClassVar[frozenset[int]] = frozenset()  # vsock ports that select this dissector
    max_buffer: ClassVar[int] = MAX_BUFFER

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and "label" not in cls.__dict__:
            cls.label = cls.name.upper()

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes still to discard: the rest of a unit parse has summarised
        self._held: list[AppMessage] = []  # reported once the skip is done
        self._gave_up = False

    # -- what a subclass provides ------------------------------------------------------------
    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        """From the first bytes of either direction of a connection: True this protocol,
        False not, None need more bytes (asked again as more arrive, up to a few KiB). A
        dissector chosen by port is dropped when this returns False. Not overriding it means
        "cannot tell from bytes": the dissector is then chosen by its ports only."""
        return None

    @classmethod
    def detects(cls) -> bool:
        """Whether the class overrides ``detect`` (takes part in first-bytes detection)."""
        return cls.detect.__func__ is not AppDissector.detect.__func__  # type: ignore[attr-defined]

    @classmethod
    def pair(cls) -> tuple[AppDissector, AppDissector]:
        """The two directions of one connection: (what the connecting side sends, what the
        accepting side sends). Override to share state between them (HTTP: a HEAD request
        means its response has no body)."""
        return cls(), cls()

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        """Take one unit off the front of ``buf``: ``None`` when more bytes are needed, else
        ``(used, message)`` where message is an ``AppMessage``, a sequence of them, or None.
        ``used`` may exceed ``len(buf)``: the rest is discarded as it arrives and the message
        is reported when its last byte has. ``eom`` says the buffer ends at a message boundary
        (SEQPACKET EOM, or the end of the stream); what is left in the buffer then is dropped
        and ``restart`` called. ``buf`` is empty only when ``eom`` is set, so a unit that ends
        at the end of the stream can be finished. ``buf`` belongs to the base class: copy what
        you keep. Raise ``Undecodable`` to give up on the stream."""
        raise NotImplementedError

    def restart(self) -> None:
        """Bytes were dropped at a message boundary (``eom``) before they made a whole unit:
        forget any position kept into the buffer and expect a unit to start next."""

    # -- what the base class does ------------------------------------------------------------
    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def gave_up(self) -> bool:
        return self._gave_up

    def message(self, summary: str, *fields: tuple[str, str], proto: str | None = None) -> AppMessage:
        return AppMessage(proto or self.name, summary, fields)

    def feed(self, data: bytes, eom: bool = False) -> list[AppMessage]:
        """Bytes of this direction, in order; ``eom`` marks a SEQPACKET message end (and,
        with no data, the end of the stream). Returns the messages whose last byte was in
        ``data``."""
        if self._gave_up:
            return []
        out: list[AppMessage] = []
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not self._skip:
                out += self._held
                self._held = []
        if self._skip:
            if eom:  # a unit cannot run past a message boundary: start afresh after it
                self._skip, self._held = 0, []
                self.restart()
            return out
        buf = self._buf
        buf += data
        try:
            while buf or eom:
                step = self.parse(buf, eom)
                if step is None:
                    break
                used, got = step
                msgs = [] if got is None else [got] if isinstance(got, AppMessage) else list(got)
                if used > len(buf):
                    if eom:  # a unit cannot run past a message boundary
                        self.restart()
                    else:
                        self._skip, self._held = used - len(buf), msgs
                    buf.clear()
                    break
                del buf[: max(used, 0)]  # bytearray drops a prefix without copying the rest
                out += msgs
                if used <= 0:
                    break
        except Undecodable as e:
            return [*out, self._give_up(str(e))]
        if eom and buf:
            buf.clear()
            self.restart()
        elif len(buf) > self.max_buffer:
            out.append(self._give_up(f"undecodable: {len(buf)} bytes without a complete message"))
        return out

    def _give_up(self, reason: str) -> AppMessage:
        self._gave_up = True
        self._buf = bytearray()
        self._skip, self._held = 0, []
        return self.message(f"{self.label} {reason}", ("error", reason))
