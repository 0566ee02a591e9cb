"""Just enough HTTP/1.x to match requests and compare responses in replay (sans-I/O).

``parse`` takes one message off the front of a buffer: the start line, the headers (names lower
case, in order) and the body, framed by Content-Length or chunked transfer coding (the body is
then the decoded chunks), or, for a response with neither, by the end of the stream (``ended``).
It returns None while bytes are missing and raises ``NotHttp`` for bytes that are not HTTP/1.x.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

MAX_HEAD: Final = 64 * 1024  # a head longer than this without its blank line is not HTTP we replay
_REQUEST_LINE: Final = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] (\d{3})(?: (.*))?")


class NotHttp(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HttpMessage:
    method: str  # "" for a response
    target: str  # request target ("" for a response)
    status: int  # 0 for a request
    reason: str
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order
    body: bytes

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def headers_except(self, ignored: frozenset[str]) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.headers if k not in ignored)

    def json_body(self) -> object | None:
        """The body as JSON when the content type says JSON and it parses; else None."""
        kind = self.header("content-type") or ""
        if "json" not in kind.lower():
            return None
        try:
            value: object = json.loads(self.body)
        except (ValueError, RecursionError):  # not JSON, or nested past what the parser takes
            return None
        return value


def looks_like_http(data: bytes) -> bool:
    return bool(_REQUEST_LINE.match(data) or data.startswith(b"HTTP/1."))


def parse(buf: bytes, ended: bool = False) -> tuple[HttpMessage, int] | None:
    """One message from the front of ``buf`` and the bytes it used; None when more are needed
    (``ended``: no more will come, so a body framed by the end of the stream is complete)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD or (ended and buf):
            raise NotHttp("no end of headers")
        if buf and not (b"HTTP/1."[: len(buf)] == buf[:7] or re.match(rb"[A-Z]", buf)):
            raise NotHttp("not an HTTP/1.x start line")
        return None
    lines = buf[:end].split(b"\r\n")
    method = target = reason = ""
    status = 0
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is not None:
        method, target = m.group(1).decode(), m.group(2).decode(errors="replace")
    else:
        s = _STATUS_LINE.fullmatch(lines[0])
        if s is None:
            raise NotHttp(f"not an HTTP/1.x start line: {lines[0][:60]!r}")
        status, reason = int(s.group(1)), (s.group(2) or b"").decode(errors="replace")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise NotHttp(f"bad header line {line[:60]!r}")
        headers.append((name.strip().lower().decode(errors="replace"), value.strip().decode(errors="replace")))
    start = end + 4
    hdrs = dict(headers)
    no_body = status in (204, 304) or 100 <= status < 200
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        got = _chunked(buf, start)
        if got is None:
            if ended:
                raise NotHttp("the stream ended inside a chunked body")
            return None
        body, used = got
    elif "content-length" in hdrs or method or no_body:
        try:
            n = int(hdrs.get("content-length", "0"))
        except ValueError:
            raise NotHttp("bad Content-Length") from None
        if len(buf) - start < n:
            if ended:
                raise NotHttp("the stream ended inside the body")
            return None
        body, used = buf[start : start + n], start + n
    else:  # a response framed by the end of the stream
        if not ended:
            return None
        body, used = buf[start:], len(buf)
    return HttpMessage(method, target, status, reason, tuple(headers), bytes(body)), used


def _chunked(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(buf[pos:eol].split(b";")[0], 16)
        except ValueError:
            raise NotHttp("bad chunk size") from None
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # trailers, then the blank line
            return (bytes(body), end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2
