"""QMP, as qemu-guest-agent speaks it (QEMU docs/interop/qmp-spec and qemu-ga): JSON objects,
usually one per line, ``{"execute":"guest-ping"}`` answered by ``{"return":{}}``, plus
``{"event":...}`` and the greeting ``{"QMP":...}``. A 0xFF byte is a sync delimiter
(guest-sync-delimited puts one before its reply; a client sends one to reset the parser).

Objects are found by a scanner that keeps its place between packets, so an object split
across packets costs one pass over its bytes and is reported when its closing brace arrives.
"""

from __future__ import annotations

import json
from typing import ClassVar

from dissectors.app._wire import text
from dissectors.app.base import AppDissector, AppMessage, Step, Undecodable

SYNC = 0xFF
MAX_DEPTH = 64
_SPACE = b" \t\r\n"
_KEYS = (b"QMP", b"execute", b"exec-oob", b"return", b"error", b"event", b"arguments", b"id", b"timestamp", b"data")


class Qmp(AppDissector):
    name: ClassVar[str] = "qmp"

    def __init__(self) -> None:
        super().__init__()
        self._scan = 0  # where scanning resumes, relative to the buffer's start
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._synced = False  # a 0xFF came before this object

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        head = first.lstrip(bytes([SYNC]) + _SPACE)
        if not head:
            return None
        if head[:1] != b"{":
            return False
        head = head[1:].lstrip(_SPACE)
        if not head:
            return None
        if head[:1] != b'"':
            return False
        key = head[1:]
        end = key.find(b'"')
        if end < 0:
            return None if any(k.startswith(key) for k in _KEYS) else False
        return key[:end] in _KEYS

    def restart(self) -> None:
        self._scan, self._depth, self._in_string, self._escape = 0, 0, False, False

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if not buf:
            return None
        if self._scan == 0:
            skip = 0
            while skip < len(buf) and (buf[skip] in _SPACE or buf[skip] == SYNC):
                self._synced |= buf[skip] == SYNC
                skip += 1
            if skip:
                return skip, None
            if buf[:1] != b"{":
                raise Undecodable("not JSON")
        i, n = self._scan, len(buf)
        depth, in_string, escape = self._depth, self._in_string, self._escape
        while i < n:
            c = buf[i]
            i += 1
            if c == SYNC:  # a delimiter mid-object, even inside a string: the sender reset its stream
                self.restart()
                self._synced = True
                return i, self.message("QMP incomplete object before 0xFF", ("error", "reset by 0xFF"))
            if in_string:
                if escape:
                    escape = False
                elif c == 0x5C:  # backslash
                    escape = True
                elif c == 0x22:
                    in_string = False
            elif c == 0x22:
                in_string = True
            elif c in (0x7B, 0x5B):  # { [
                depth += 1
                if depth > MAX_DEPTH:
                    raise Undecodable("JSON nested too deeply")
            elif c in (0x7D, 0x5D):  # } ]
                depth -= 1
                if depth == 0:
                    self.restart()
                    return i, self._message(bytes(buf[:i]))
        self._scan, self._depth, self._in_string, self._escape = i, depth, in_string, escape
        return None

    def _message(self, raw: bytes) -> AppMessage:
        synced, self._synced = self._synced, False
        fields = [("json", text(raw, 400))] + ([("sync", "0xff before this message")] if synced else [])
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return self.message("QMP bad JSON", *fields)
        if not isinstance(obj, dict):
            return self.message("QMP bad JSON", *fields)
        if "id" in obj:
            fields.append(("id", text(json.dumps(obj["id"]).encode(), 80)))
        for verb in ("execute", "exec-oob", "event"):
            if isinstance(obj.get(verb), str):
                return self.message(f"QMP {verb} {text(obj[verb].encode(), 80)}", *fields)
        if "return" in obj:
            return self.message("QMP return", *fields)
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {}
            cls, desc = str(err.get("class", "")), str(err.get("desc", ""))
            return self.message(text(f"QMP error {cls}: {desc}".encode(), 160), *fields)
        if "QMP" in obj:
            return self.message("QMP greeting", *fields)
        return self.message("QMP message", *fields)
