"""The hybrid vsock handshake of Firecracker, Cloud Hypervisor and vhost-device-vsock
(firecracker docs/vsock.md): the host side writes ``CONNECT <port>\\n``, the device answers
``OK <host port>\\n``; after that the stream is the proxied protocol's, not dissected here."""

from __future__ import annotations

import re
from typing import ClassVar

from dissectors.app.base import AppDissector, Step, Undecodable

MAX_LINE = 32  # "CONNECT 4294967295\n" is 19 bytes
_LINE = re.compile(rb"(CONNECT|OK) ([0-9]{1,10})\r?\n")
_STARTS = (b"CONNECT ", b"OK ")


class HybridHandshake(AppDissector):
    name: ClassVar[str] = "hybrid"

    def __init__(self) -> None:
        super().__init__()
        self._done = False

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        head = first[:MAX_LINE]
        for start in _STARTS:
            if start.startswith(head):
                return None
            if head.startswith(start):
                if _LINE.match(head):
                    return True
                rest = head[len(start) :]
                tail = rest.lstrip(b"0123456789")
                return None if tail in (b"", b"\r") and len(rest) - len(tail) <= 10 else False
        return False

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if self._done:
            return len(buf), None  # the proxied protocol's bytes
        if not buf:
            return None
        end = buf.find(b"\n", 0, MAX_LINE)
        if end < 0:
            if len(buf) >= MAX_LINE or eom:
                raise Undecodable("bad handshake line")
            return None
        m = _LINE.fullmatch(bytes(buf[: end + 1]))
        if m is None:
            raise Undecodable("bad handshake line")
        self._done = True
        word, port = m.group(1).decode(), m.group(2).decode()
        return end + 1, self.message(f"HYBRID {word} {port}", ("command", word), ("port", port))
