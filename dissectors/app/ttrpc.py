"""ttrpc, containerd's lightweight gRPC (containerd/ttrpc PROTOCOL.md), as the Kata Containers
agent speaks it on guest port 1024.

A frame is a 10-byte header, ``length u32 BE, stream_id u32 BE, type u8, flags u8``, then
``length`` bytes of protobuf: type 1 Request (service = 1, method = 2, payload = 3,
timeout_nano = 5), type 2 Response (status = 1 as google.rpc.Status {code = 1, message = 2},
payload = 2), type 3 Data.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from dissectors.app._wire import proto_fields, text
from dissectors.app.base import AppDissector, Step, Undecodable

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20  # ttrpc messageLengthMax
BODY_LOOKED_AT = 4096  # service and method come first; the payload is not read
TYPES = {1: "request", 2: "response", 3: "data"}
FLAGS = {1: "REMOTE_CLOSED", 2: "REMOTE_OPEN", 4: "NO_DATA"}
KATA_AGENT_PORT = 1024


def _flag_names(flags: int) -> str:
    names = [n for bit, n in FLAGS.items() if flags & bit]
    rest = flags & ~0x7
    return "|".join(names + ([hex(rest)] if rest else [])) or "0"


class Ttrpc(AppDissector):
    name: ClassVar[str] = "ttrpc"
    label: ClassVar[str] = "TTRPC"
    ports: ClassVar[frozenset[int]] = frozenset({KATA_AGENT_PORT})

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        if len(first) < HEADER.size:
            return None
        length, stream, kind, flags = HEADER.unpack_from(first)
        if length > MAX_MESSAGE or kind not in TYPES or flags & ~0x7 or stream == 0:
            return False
        if kind == 1 and len(first) > HEADER.size:
            return first[HEADER.size] == 0x0A  # a Request starts with field 1 (service), a string
        return True

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if len(buf) < HEADER.size:
            return None
        length, stream, kind, flags = HEADER.unpack_from(buf)
        if length > MAX_MESSAGE:
            raise Undecodable(f"bad frame length {length}")
        if kind not in TYPES:
            raise Undecodable(f"bad message type {kind}")
        want = min(length, BODY_LOOKED_AT)
        if len(buf) < HEADER.size + want:
            return None
        body = bytes(buf[HEADER.size : HEADER.size + want])
        fields: list[tuple[str, str]] = [("length", str(length)), ("stream_id", str(stream)),
                                         ("type", f"{kind} ({TYPES[kind]})"), ("flags", _flag_names(flags))]
        summary = f"TTRPC {TYPES[kind]} stream={stream}"
        if kind == 1:
            service = method = ""
            for field, wire, value in proto_fields(body):
                if wire == 2 and isinstance(value, bytes) and field in (1, 2):
                    if field == 1:
                        service = text(value, 120)
                    else:
                        method = text(value, 120)
                    if service and method:
                        break
            if service or method:
                summary += f" {service}/{method}"
                fields += [("service", service), ("method", method)]
        elif kind == 2:
            for field, wire, value in proto_fields(body):
                if field == 1 and wire == 2 and isinstance(value, bytes):
                    code, message = 0, ""
                    for f2, w2, v2 in proto_fields(value):
                        if f2 == 1 and w2 == 0 and isinstance(v2, int):
                            code = v2
                        elif f2 == 2 and w2 == 2 and isinstance(v2, bytes):
                            message = text(v2, 120)
                    if code:
                        summary += f" status={code}"
                        fields.append(("status", f"{code} {message}".rstrip()))
                    break
        summary += f" len={length}"
        return HEADER.size + length, self.message(summary, *fields)
