"""systemd's notification protocol (sd_notify(3)) over vsock, as ``vmm.notify_socket=
vsock:CID:PORT`` (or vsock-stream:, vsock-seqpacket:) sends it: one message per SEQPACKET
message, or per STREAM connection, of newline-separated ``KEY=VALUE`` assignments:
``NOTIFY READY=1 STATUS=Started``. A message ends at EOM or at the end of the stream.
"""

from __future__ import annotations

import re
from typing import ClassVar

from dissectors.app._wire import text
from dissectors.app.base import AppDissector, Step, Undecodable

MAX_MESSAGE = 64 << 10  # systemd itself reads at most NOTIFY_BUFFER_MAX (4 KiB)
_KEY = re.compile(rb"[A-Z][A-Z0-9_]*")


class SystemdNotify(AppDissector):
    name: ClassVar[str] = "notify"

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        head = first[:64]
        key, sep, _ = head.partition(b"=")
        if key and not _KEY.fullmatch(key):
            return False
        if sep:
            return bool(key)
        return None if len(head) < 64 else False

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if len(buf) > MAX_MESSAGE:
            raise Undecodable("message over 64 KiB")
        if not eom:
            return None  # the message runs to the end of the SEQPACKET message or the stream
        if not buf:
            return None
        pairs: list[tuple[str, str]] = []
        for line in bytes(buf).split(b"\n"):
            key, sep, value = line.partition(b"=")
            if sep and _KEY.fullmatch(key):
                pairs.append((key.decode("ascii"), text(value, 200)))
        if not pairs:
            return len(buf), self.message("NOTIFY bad message", ("error", "no KEY=VALUE line"))
        summary = text(("NOTIFY " + " ".join(f"{k}={v}" for k, v in pairs)).encode(), 200)
        return len(buf), self.message(summary, *pairs)
