"""HTTP/2 (RFC 9113) and gRPC over it (grpc PROTOCOL-HTTP2.md).

The client opens with the 24-byte preface, then both sides send frames: a 9-byte header
(``length u24, type u8, flags u8, R + stream id u31``) and ``length`` bytes. Every frame is
one message, ``HTTP2 HEADERS stream=1 END_HEADERS``. HPACK is not decoded in general; a
header block's ``:method``, ``:path``, ``:status`` and ``content-type`` are shown when the
encoder used the static table or a literal that is not Huffman-coded. DATA frames whose
stream carries gRPC messages (``flag u8, length u32 BE`` then the message) also report each
message as it ends: ``gRPC message stream=1 len=5``.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from dissectors.app._wire import text
from dissectors.app.base import AppDissector, AppMessage, Step

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME = struct.Struct(">BHBBI")  # length as u8 + u16, type, flags, stream id
FRAME_LOOKED_AT = 64 << 10  # larger frames are summarised from the header and skipped
GRPC_MAX_MESSAGE = 1 << 31
MAX_STREAMS = 256  # gRPC reassembly state kept per connection direction

TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE",
         6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}
_END_STREAM, _ACK, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
FLAG_NAMES: dict[int, tuple[tuple[int, str], ...]] = {
    0: ((_END_STREAM, "END_STREAM"), (_PADDED, "PADDED")),
    1: ((_END_STREAM, "END_STREAM"), (_END_HEADERS, "END_HEADERS"), (_PADDED, "PADDED"), (_PRIORITY, "PRIORITY")),
    4: ((_ACK, "ACK"),),
    5: ((_END_HEADERS, "END_HEADERS"), (_PADDED, "PADDED")),
    6: ((_ACK, "ACK"),),
    9: ((_END_HEADERS, "END_HEADERS"),),
}
SETTINGS = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS", 4: "INITIAL_WINDOW_SIZE",
            5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE", 8: "ENABLE_CONNECT_PROTOCOL"}
ERRORS = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 4: "SETTINGS_TIMEOUT",
          5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR",
          10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}
# RFC 7541 Appendix A: the static-table entries a summary uses (index: name, value)
STATIC: dict[int, tuple[str, str]] = {
    1: (":authority", ""), 2: (":method", "GET"), 3: (":method", "POST"), 4: (":path", "/"),
    5: (":path", "/index.html"), 6: (":scheme", "http"), 7: (":scheme", "https"), 8: (":status", "200"),
    9: (":status", "204"), 10: (":status", "206"), 11: (":status", "304"), 12: (":status", "400"),
    13: (":status", "404"), 14: (":status", "500"), 31: ("content-type", ""),
}
SHOWN_HEADERS = (":method", ":path", ":status", ":authority", "content-type")


def _flag_names(kind: int, flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.get(kind, ()) if flags & bit]


def _hpack_int(block: bytes, pos: int, prefix: int) -> tuple[int, int] | None:
    """RFC 7541 5.1 integer with a ``prefix``-bit prefix starting at block[pos]."""
    if pos >= len(block):
        return None
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while pos < len(block) and shift <= 28:
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return None


def _hpack_string(block: bytes, pos: int) -> tuple[str | None, int] | None:
    """RFC 7541 5.2 string: (text, or None when Huffman-coded, position after it)."""
    if pos >= len(block):
        return None
    huffman = block[pos] & 0x80
    n = _hpack_int(block, pos, 7)
    if n is None or n[1] + n[0] > len(block):
        return None
    length, pos = n
    return (None if huffman else text(block[pos : pos + length], 200)), pos + length


def header_fields(block: bytes) -> list[tuple[str, str]]:
    """The fields of an HPACK header block that can be read without the dynamic table or the
    Huffman code, in order. Stops at the first representation it cannot walk."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(block) and len(out) < 64:
        b = block[pos]
        if b & 0x80:  # indexed field
            idx = _hpack_int(block, pos, 7)
            if idx is None:
                break
            index, pos = idx
            if index in STATIC and STATIC[index][1]:
                out.append(STATIC[index])
            continue
        if b & 0xE0 == 0x20:  # dynamic table size update
            upd = _hpack_int(block, pos, 5)
            if upd is None:
                break
            pos = upd[1]
            continue
        prefix = 6 if b & 0x40 else 4  # literal with incremental indexing, or without/never indexed
        idx = _hpack_int(block, pos, prefix)
        if idx is None:
            break
        index, pos = idx
        name: str | None
        if index == 0:
            got = _hpack_string(block, pos)
            if got is None:
                break
            name, pos = got
        else:
            name = STATIC[index][0] if index in STATIC else None
        got = _hpack_string(block, pos)
        if got is None:
            break
        value, pos = got
        if name is not None and value is not None:
            out.append((name.lower(), value))
    return out


class Http2(AppDissector):
    name: ClassVar[str] = "http2"

    def __init__(self) -> None:
        super().__init__()
        self._preface_checked = False
        self._grpc: dict[int, _GrpcStream] = {}

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        if PREFACE.startswith(first[: len(PREFACE)]):
            return None if len(first) < len(PREFACE) else True
        if first.startswith(PREFACE):
            return True
        # The server side opens with a SETTINGS frame on stream 0 (RFC 9113 3.4).
        if len(first) < FRAME.size:
            return None if first[:1] == b"\x00" else False
        hi, lo, kind, flags, stream = FRAME.unpack_from(first)
        length = hi << 16 | lo
        return bool(kind == 4 and flags == 0 and stream == 0 and length % 6 == 0 and length <= 6 * 16)

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if not self._preface_checked:
            if len(buf) < len(PREFACE) and PREFACE.startswith(bytes(buf)):
                return None
            self._preface_checked = True
            if buf.startswith(PREFACE):
                return len(PREFACE), self.message("HTTP2 client preface", ("preface", text(PREFACE)))
        if len(buf) < FRAME.size:
            return None
        hi, lo, kind, flags, stream = FRAME.unpack_from(buf)
        length = hi << 16 | lo
        stream &= 0x7FFFFFFF
        want = min(length, FRAME_LOOKED_AT)
        if len(buf) < FRAME.size + want:
            return None
        payload = bytes(buf[FRAME.size : FRAME.size + want])
        whole = want == length
        kind_name = TYPES.get(kind, f"type{kind}")
        flag_names = _flag_names(kind, flags)
        flags_text = f"{flags:#04x}" + (f" ({' '.join(flag_names)})" if flag_names else "")
        fields: list[tuple[str, str]] = [("length", str(length)), ("type", f"{kind} ({kind_name})"),
                                         ("flags", flags_text), ("stream_id", str(stream))]
        summary = f"HTTP2 {kind_name} stream={stream}"
        extra: list[AppMessage] = []
        body = _unpadded(kind, flags, payload) if whole else None
        if kind == 0:
            summary += f" len={length}"
            extra = self._grpc_messages(stream, body, flags & _END_STREAM != 0)
        elif kind in (1, 5) and body is not None:
            block = body[5:] if kind == 1 and flags & _PRIORITY else body[4:] if kind == 5 else body
            shown = [(n, v) for n, v in header_fields(block) if n in SHOWN_HEADERS]
            fields += shown
            summary += "".join(f" {n}={v}" for n, v in shown if n in (":method", ":path", ":status"))
        elif kind == 4 and whole:
            settings = [struct.unpack_from(">HI", payload, i) for i in range(0, length - length % 6, 6)]
            fields += [(SETTINGS.get(k, f"setting{k}"), str(v)) for k, v in settings]
        elif kind == 3 and whole and length == 4:
            (code,) = struct.unpack(">I", payload)
            summary += f" {ERRORS.get(code, code)}"
        elif kind == 7 and whole and length >= 8:
            last, code = struct.unpack_from(">II", payload)
            summary += f" last_stream={last & 0x7FFFFFFF} {ERRORS.get(code, code)}"
        elif kind == 8 and whole and length == 4:
            (inc,) = struct.unpack(">I", payload)
            summary += f" increment={inc & 0x7FFFFFFF}"
        if flag_names:
            summary += " " + " ".join(flag_names)
        # the gRPC messages that end in this frame are reported right after it
        return FRAME.size + length, [self.message(summary, *fields), *extra]

    def _grpc_messages(self, stream: int, data: bytes | None, end_stream: bool) -> list[AppMessage]:
        """gRPC messages ending in this DATA frame; ``data`` None when the frame was too large
        to look at (or badly padded), which loses the message boundaries of that stream."""
        st = self._grpc.get(stream)
        if st is None:
            if len(self._grpc) >= MAX_STREAMS:
                del self._grpc[next(iter(self._grpc))]
            st = self._grpc[stream] = _GrpcStream()
        out = st.feed(data) if data is not None else st.lose()
        if end_stream:
            del self._grpc[stream]
        return [self.message(f"gRPC message stream={stream} len={n}" + (" compressed" if c else ""),
                             ("stream_id", str(stream)), ("compressed", str(c)), ("length", str(n)),
                             proto="grpc") for c, n in out]


def _unpadded(kind: int, flags: int, payload: bytes) -> bytes | None:
    if kind in (0, 1, 5) and flags & _PADDED:
        if not payload or payload[0] >= len(payload):
            return None
        return payload[1 : len(payload) - payload[0]]
    return payload


class _GrpcStream:
    """Length-prefixed gRPC messages in one stream's DATA bytes: ``compressed flag u8,
    length u32 BE, message``. A stream whose bytes do not fit that shape is left alone."""

    __slots__ = ("_compressed", "_head", "_left", "_length", "_off")

    def __init__(self) -> None:
        self._head = b""  # a message prefix split across DATA frames
        self._left = 0  # bytes of the current message still to come
        self._compressed = False
        self._length = 0
        self._off = False  # not gRPC

    def lose(self) -> list[tuple[bool, int]]:
        self._off = True
        return []

    def feed(self, data: bytes) -> list[tuple[bool, int]]:
        out: list[tuple[bool, int]] = []
        pos = 0
        while pos < len(data) and not self._off:
            if self._left:
                n = min(self._left, len(data) - pos)
                self._left -= n
                pos += n
                if not self._left:
                    out.append((self._compressed, self._length))
                continue
            need = 5 - len(self._head)
            self._head += data[pos : pos + need]
            pos += need
            if len(self._head) < 5:
                break
            flag, length = struct.unpack(">BI", self._head)
            self._head = b""
            if flag > 1 or length >= GRPC_MAX_MESSAGE:
                self._off = True
                break
            self._compressed, self._length, self._left = flag == 1, length, length
            if not length:
                out.append((self._compressed, 0))
        return out
