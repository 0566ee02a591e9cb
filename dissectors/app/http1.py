"""HTTP/1.x (RFC 9112): request and status lines, header fields, and message bodies framed by
Content-Length, chunked transfer coding or the end of the stream (RFC 9112 section 6.3), so
each message of a keep-alive connection is found. A message is reported when its body ends:
``HTTP GET /v1/keys``, ``HTTP 200 OK``. After ``101 Switching Protocols`` or a successful
CONNECT the rest of the connection is another protocol and is not dissected.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar

from dissectors.app._wire import text
from dissectors.app.base import AppDissector, AppMessage, Step, Undecodable

METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
MAX_HEAD = 64 << 10  # request/status line and header fields
MAX_LINE = 8 << 10  # a chunk-size or trailer line
MAX_FIELDS_SHOWN = 32
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) (HTTP/\d\.\d)")
_STATUS_LINE = re.compile(rb"(HTTP/\d\.\d) (\d{3})(?: (.*))?")
_DETECT_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/1\.\d\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")


class _State(Enum):
    HEAD = auto()
    CHUNK_SIZE = auto()
    CHUNK_END = auto()  # the CRLF after a chunk's data
    TRAILERS = auto()
    UNTIL_CLOSE = auto()  # a response body delimited by the end of the stream
    OPAQUE = auto()  # after an upgrade: not HTTP any more


@dataclass(slots=True)
class _Shared:
    """What one direction tells the other: request methods (a HEAD response has no body) and
    whether the connection switched protocols."""

    methods: deque[str] = field(default_factory=lambda: deque(maxlen=64))
    switched: bool = False


class Http1(AppDissector):
    name: ClassVar[str] = "http"

    def __init__(self, shared: _Shared | None = None) -> None:
        super().__init__()
        self._shared = shared or _Shared()
        self._state = _State.HEAD
        self._searched = 0  # where the search for the end of the header block resumes
        self._summary = ""
        self._fields: list[tuple[str, str]] = []
        self._body = 0

    @classmethod
    def pair(cls) -> tuple[AppDissector, AppDissector]:
        shared = _Shared()
        return cls(shared), cls(shared)

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        head = first[:MAX_LINE]
        if head.startswith(b"HTTP/1."):
            return True
        if len(head) < 8 and any(m.startswith(head) or b"HTTP/1.".startswith(head) for m in METHODS):
            return None
        if not any(head.startswith(m + b" ") for m in METHODS):
            return False
        end = head.find(b"\n")
        if end < 0:
            return None if len(head) < MAX_LINE else False
        return _DETECT_LINE.match(head, 0, end + 1) is not None

    def restart(self) -> None:
        self._state = _State.OPAQUE if self._shared.switched else _State.HEAD
        self._searched = 0

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        state = self._state
        if self._shared.switched and state is _State.HEAD:
            self._state = state = _State.OPAQUE
        if state is _State.OPAQUE:
            return len(buf), None
        if state is _State.HEAD:
            return self._head(buf, eom)
        if state is _State.UNTIL_CLOSE:
            self._body += len(buf)
            if eom:
                self._state = _State.HEAD
                return len(buf), self._finish()
            return len(buf), None
        if state is _State.CHUNK_END:
            if buf.startswith(b"\r\n"):
                self._state = _State.CHUNK_SIZE
                return 2, None
            if buf.startswith(b"\n"):
                self._state = _State.CHUNK_SIZE
                return 1, None
            if buf == b"\r" or not buf:
                return None
            raise Undecodable("bad chunk end")
        end = buf.find(b"\n", 0, MAX_LINE)
        if end < 0:
            if len(buf) >= MAX_LINE:
                raise Undecodable("bad chunk size" if state is _State.CHUNK_SIZE else "bad trailer")
            return None
        line = bytes(buf[:end]).rstrip(b"\r")
        if state is _State.CHUNK_SIZE:
            m = _CHUNK_SIZE.match(line.split(b";", 1)[0].strip())
            if m is None or m.end() != len(line.split(b";", 1)[0].strip()):
                raise Undecodable("bad chunk size")
            size = int(m.group(), 16)
            if size == 0:
                self._state = _State.TRAILERS
                return end + 1, None
            self._body += size
            self._state = _State.CHUNK_END
            return end + 1 + size, None  # the chunk's data is skipped as it arrives
        # TRAILERS: header fields after the last chunk, up to an empty line
        if line:
            return end + 1, None
        self._state = _State.HEAD
        return end + 1, self._finish()

    def _head(self, buf: bytearray, eom: bool) -> Step | None:
        blank = 0
        while blank < len(buf) and buf[blank] in b"\r\n":  # RFC 9112 2.2: empty lines before a message
            blank += 1
        if blank:
            return blank, None
        start = max(0, self._searched - 3)
        crlf = buf.find(b"\r\n\r\n", start, MAX_HEAD + 4)
        lf = buf.find(b"\n\n", start, MAX_HEAD + 2)
        if crlf < 0 and lf < 0:
            if len(buf) > MAX_HEAD:
                raise Undecodable("header section over 64 KiB")
            self._searched = len(buf)
            return None
        self._searched = 0
        end, used = (crlf, crlf + 4) if crlf >= 0 and (lf < 0 or crlf < lf) else (lf, lf + 2)
        lines = bytes(buf[:end]).split(b"\n")
        first = lines[0].rstrip(b"\r")
        headers: list[tuple[str, str]] = []
        for raw in lines[1:]:
            name, sep, value = raw.rstrip(b"\r").partition(b":")
            if sep and name and not name[-1:].isspace():
                headers.append((text(name, 64).lower(), text(value.strip(), 200)))
        req = _REQUEST_LINE.fullmatch(first)
        if req is not None:
            method = req.group(1).decode("ascii")
            self._summary = f"HTTP {method} {text(req.group(2), 120)}"
            self._fields = [("request", text(first, 200))]
            length = self._body_length(headers, response=False)
            self._shared.methods.append(method)
        else:
            status = _STATUS_LINE.fullmatch(first)
            if status is None:
                raise Undecodable("bad start line")
            code = int(status.group(2))
            reason = text(status.group(3) or b"", 120)
            self._summary = f"HTTP {code} {reason}".rstrip()
            self._fields = [("status", text(first, 200))]
            length = self._response_length(code, headers)
        self._fields += headers[:MAX_FIELDS_SHOWN]
        self._body = 0
        if length == "chunked":
            self._state = _State.CHUNK_SIZE
            return used, None
        if length == "close":
            self._state = _State.UNTIL_CLOSE
            return used, None
        if length == "switch":
            self._shared.switched = True
            self._state = _State.OPAQUE
            return used, self._finish()
        assert isinstance(length, int)
        self._body = length
        return used + length, self._finish()

    def _response_length(self, code: int, headers: list[tuple[str, str]]) -> int | str:
        if 100 <= code < 200:
            return "switch" if code == 101 else 0  # interim: the final response follows
        method = self._shared.methods.popleft() if self._shared.methods else ""
        if method == "CONNECT" and 200 <= code < 300:
            return "switch"
        if method == "HEAD" or code in (204, 304):
            return 0
        return self._body_length(headers, response=True)

    @staticmethod
    def _body_length(headers: list[tuple[str, str]], *, response: bool) -> int | str:
        # RFC 9112 6.3: chunked as the final transfer coding wins over Content-Length
        codings = [c.strip().lower() for n, v in headers if n == "transfer-encoding" for c in v.split(",")]
        if codings:
            return "chunked" if codings[-1] == "chunked" else "close" if response else 0
        lengths = {v for n, v in headers if n == "content-length"}
        if not lengths:
            return "close" if response else 0
        if len(lengths) > 1 or not all(v.isdigit() and len(v) <= 15 for v in lengths):
            raise Undecodable("bad Content-Length")
        return int(lengths.pop())

    def _finish(self) -> AppMessage:
        return self.message(self._summary, *self._fields, ("body", f"{self._body} bytes"))
