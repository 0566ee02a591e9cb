"""Small bounded readers shared by the dissectors: protobuf varints and fields, text for
summaries. None of them raises on short or malformed input."""

from __future__ import annotations

from collections.abc import Iterator

MAX_FIELDS = 64  # protobuf fields looked at per message: a summary needs the first few


def varint(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it), or None when truncated or longer than 10 bytes."""
    value = shift = 0
    for _ in range(10):
        if pos >= end:
            return None
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return None


def proto_fields(buf: bytes, pos: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message: an int for varint and fixed
    fields, bytes for length-delimited ones. Stops quietly at the first malformed or truncated
    field, and after MAX_FIELDS fields."""
    end = len(buf) if end is None else min(end, len(buf))
    for _ in range(MAX_FIELDS):
        tag = varint(buf, pos, end)
        if tag is None:
            return
        key, pos = tag
        field, wire = key >> 3, key & 7
        if field == 0:
            return
        if wire == 0:
            v = varint(buf, pos, end)
            if v is None:
                return
            value, pos = v
            yield field, wire, value
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                return
            yield field, wire, int.from_bytes(buf[pos : pos + n], "little")
            pos += n
        elif wire == 2:
            ln = varint(buf, pos, end)
            if ln is None:
                return
            length, pos = ln
            if pos + length > end:
                return
            yield field, wire, bytes(buf[pos : pos + length])
            pos += length
        else:
            return


def text(data: bytes | bytearray, limit: int = 160) -> str:
    """Printable one-line text for a summary or a field: non-UTF-8 bytes and control characters
    escaped, long values cut with an ellipsis."""
    s = bytes(data[: limit * 4]).decode("utf-8", "backslashreplace")
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s if len(s) <= limit else s[: limit - 1] + "…"
