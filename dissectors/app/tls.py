"""TLS records (RFC 8446 section 5.1, RFC 5246 section 6.2): ``type u8 (20-24), version u16,
length u16`` then the fragment. Each record is one message. Handshake messages are
reassembled across records until the direction turns encrypted (a ChangeCipherSpec); the
ClientHello is read down to its extensions: ``TLS ClientHello sni=kms.us-east-1.amazonaws.com``.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from dissectors.app._wire import text
from dissectors.app.base import AppDissector, Step, Undecodable

RECORD = struct.Struct(">BHH")
MAX_FRAGMENT = (1 << 14) + 2048  # RFC 5246 6.2.3: TLSCiphertext.length <= 2^14 + 2048
MAX_HANDSHAKE = 64 << 10  # handshake bytes reassembled across records
CONTENT_TYPES = {20: "ChangeCipherSpec", 21: "Alert", 22: "Handshake", 23: "ApplicationData", 24: "Heartbeat"}
HANDSHAKE_TYPES = {0: "HelloRequest", 1: "ClientHello", 2: "ServerHello", 4: "NewSessionTicket",
                   5: "EndOfEarlyData", 8: "EncryptedExtensions", 11: "Certificate", 12: "ServerKeyExchange",
                   13: "CertificateRequest", 14: "ServerHelloDone", 15: "CertificateVerify",
                   16: "ClientKeyExchange", 20: "Finished", 24: "KeyUpdate", 254: "MessageHash"}
VERSIONS = {0x0300: "SSL3.0", 0x0301: "TLS1.0", 0x0302: "TLS1.1", 0x0303: "TLS1.2", 0x0304: "TLS1.3"}
ALERT_LEVELS = {1: "warning", 2: "fatal"}
ALERTS = {0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
          40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
          44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
          47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
          51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
          86: "inappropriate_fallback", 90: "user_canceled", 109: "missing_extension",
          110: "unsupported_extension", 112: "unrecognized_name", 116: "certificate_required",
          120: "no_application_protocol"}
# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest
HRR_RANDOM = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
EXT_SNI, EXT_ALPN, EXT_SUPPORTED_VERSIONS = 0, 16, 43


def version_name(v: int) -> str:
    return VERSIONS.get(v, f"{v:#06x}")


class _Reader:
    """Bounds-checked big-endian reads over a handshake body; ``ok`` turns False at the first
    read past the end, and every later read returns zero/empty."""

    __slots__ = ("data", "ok", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.ok = data, 0, True

    def uint(self, n: int) -> int:
        if not self.ok or self.pos + n > len(self.data):
            self.ok = False
            return 0
        v = int.from_bytes(self.data[self.pos : self.pos + n], "big")
        self.pos += n
        return v

    def take(self, n: int) -> bytes:
        if not self.ok or self.pos + n > len(self.data):
            self.ok = False
            return b""
        v = self.data[self.pos : self.pos + n]
        self.pos += n
        return v

    def vector(self, len_bytes: int) -> bytes:
        return self.take(self.uint(len_bytes))


def _extensions(r: _Reader) -> list[tuple[int, bytes]]:
    block = _Reader(r.vector(2))
    out: list[tuple[int, bytes]] = []
    while block.ok and block.pos < len(block.data) and len(out) < 128:
        kind = block.uint(2)
        data = block.vector(2)
        if block.ok:
            out.append((kind, data))
    return out


def client_hello(body: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(summary tail, fields) of a ClientHello body (RFC 8446 4.1.2)."""
    r = _Reader(body)
    legacy = r.uint(2)
    r.take(32)
    r.vector(1)  # legacy_session_id
    suites = r.vector(2)
    r.vector(1)  # legacy_compression_methods
    fields = [("client_version", version_name(legacy)), ("cipher_suites", str(len(suites) // 2))]
    if not r.ok:
        return " (truncated)", fields
    sni = ""
    for kind, data in _extensions(r):
        if kind == EXT_SNI:
            names = _Reader(_Reader(data).vector(2))
            while names.ok and names.pos < len(names.data):
                name_type, name = names.uint(1), names.vector(2)
                if names.ok and name_type == 0:
                    sni = text(name, 253)
                    fields.append(("sni", sni))
                    break
        elif kind == EXT_ALPN:
            protos = _Reader(_Reader(data).vector(2))
            alpn: list[str] = []
            while protos.ok and protos.pos < len(protos.data) and len(alpn) < 16:
                p = protos.vector(1)
                if protos.ok:
                    alpn.append(text(p, 40))
            fields.append(("alpn", ",".join(alpn)))
        elif kind == EXT_SUPPORTED_VERSIONS:
            vs = _Reader(data).vector(1)
            names_ = [version_name(int.from_bytes(vs[i : i + 2], "big")) for i in range(0, len(vs) - 1, 2)]
            fields.append(("supported_versions", ",".join(names_)))
    return (f" sni={sni}" if sni else ""), fields


def server_hello(body: bytes) -> tuple[str, str, list[tuple[str, str]]]:
    """(handshake name, summary tail, fields) of a ServerHello body."""
    r = _Reader(body)
    legacy = r.uint(2)
    random = r.take(32)
    r.vector(1)
    suite = r.uint(2)
    r.uint(1)
    name = "HelloRetryRequest" if random == HRR_RANDOM else "ServerHello"
    if not r.ok:
        return name, " (truncated)", [("server_version", version_name(legacy))]
    version = legacy
    for kind, data in _extensions(r):
        if kind == EXT_SUPPORTED_VERSIONS and len(data) == 2:
            version = int.from_bytes(data, "big")
    fields = [("server_version", version_name(version)), ("cipher_suite", f"{suite:#06x}")]
    return name, f" version={version_name(version)} cipher={suite:#06x}", fields


class Tls(AppDissector):
    name: ClassVar[str] = "tls"

    def __init__(self) -> None:
        super().__init__()
        self._handshake = bytearray()  # handshake bytes not yet forming a whole message
        self._encrypted = False

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        if not first:
            return None
        if first[0] not in CONTENT_TYPES:
            return False
        if len(first) >= 2 and first[1] != 3:
            return False
        if len(first) >= 3 and first[2] > 4:
            return False
        if len(first) < RECORD.size:
            return None
        _t, _v, length = RECORD.unpack_from(first)
        return bool(0 < length <= MAX_FRAGMENT)

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if len(buf) < RECORD.size:
            return None
        kind, version, length = RECORD.unpack_from(buf)
        if kind not in CONTENT_TYPES or version >> 8 != 3 or length > MAX_FRAGMENT:
            raise Undecodable("bad record")
        if len(buf) < RECORD.size + length:
            return None
        fragment = bytes(buf[RECORD.size : RECORD.size + length])
        ctype = CONTENT_TYPES[kind]
        fields = [("content_type", f"{kind} ({ctype})"), ("version", version_name(version)), ("length", str(length))]
        if kind == 22 and not self._encrypted:
            summary, more = self._handshake_messages(fragment)
            fields += more
        elif kind == 22:
            summary = "TLS encrypted Handshake"
        elif kind == 20:
            self._encrypted = True
            summary = "TLS ChangeCipherSpec"
        elif kind == 21 and length == 2 and not self._encrypted:
            level, desc = fragment[0], fragment[1]
            summary = f"TLS Alert {ALERT_LEVELS.get(level, level)} {ALERTS.get(desc, desc)}"
        elif kind == 21:
            summary = "TLS encrypted Alert"
        else:
            summary = f"TLS {ctype} len={length}"
        return RECORD.size + length, self.message(summary, *fields)

    def _handshake_messages(self, fragment: bytes) -> tuple[str, list[tuple[str, str]]]:
        hs = self._handshake
        hs += fragment
        names: list[str] = []
        tail = ""
        fields: list[tuple[str, str]] = []
        while len(hs) >= 4:
            hs_type = hs[0]
            hs_len = int.from_bytes(hs[1:4], "big")
            if hs_len > MAX_HANDSHAKE:
                hs.clear()
                return "TLS Handshake (too large to dissect)", fields
            if len(hs) < 4 + hs_len:
                break
            body = bytes(hs[4 : 4 + hs_len])
            del hs[: 4 + hs_len]
            name = HANDSHAKE_TYPES.get(hs_type, f"handshake{hs_type}")
            if hs_type == 1:
                tail, more = client_hello(body)
                fields += more
            elif hs_type == 2:
                name, tail, more = server_hello(body)
                fields += more
            names.append(name)
            fields.append(("handshake", f"{name} ({hs_len} bytes)"))
        if not names:
            return "TLS Handshake (fragment)", fields
        return "TLS " + ", ".join(names) + (tail if len(names) == 1 else ""), fields
