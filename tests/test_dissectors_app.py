"""Application dissectors on real bytes: transcripts in, messages out, whole and split at
every byte boundary; garbage never raises; the plugin registry and its errors.

The sample builders (``sample_*``) are shared with test_dissectors_streams.py.
"""

from __future__ import annotations

import http.client
import http.server
import importlib.metadata
import io
import itertools
import ssl
import struct
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dissectors.app as app
from dissectors.app import (
    BUILTINS,
    AppDissector,
    AppMessage,
    Http1,
    Http2,
    HybridHandshake,
    NitroHeartbeat,
    PluginError,
    Qmp,
    Step,
    SystemdNotify,
    Tls,
    Ttrpc,
    Undecodable,
)
from dissectors.app._wire import proto_fields, varint

# A sample is one direction of a connection: parts, each the bytes of the messages ending at
# its last byte, and their summaries.
Sample = list[tuple[bytes, list[str]]]


# -- real bytes ------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, incoming: bytes = b"") -> None:
        self.incoming = incoming
        self.out = bytearray()

    def sendall(self, data: bytes) -> None:
        self.out += data

    def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
        return io.BytesIO(self.incoming)

    def close(self) -> None:
        pass


def _http_request(method: str, url: str, body: object = None, headers: dict[str, str] | None = None) -> bytes:
    """What http.client sends for one request."""
    rec = _Recorder()
    conn = http.client.HTTPConnection("kms.us-east-1.amazonaws.com")
    conn.sock = rec
    conn.request(method, url, body=body, headers=headers or {})  # type: ignore[arg-type]
    return bytes(rec.out)


class _KmsHandler(http.server.BaseHTTPRequestHandler):
    """A keep-alive HTTP/1.1 server: Content-Length, chunked, HEAD and 204 responses."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def version_string(self) -> str:
        return "kms-test"

    def date_time_string(self, timestamp: float | None = None) -> str:
        return "Thu, 01 Jan 2026 00:00:00 GMT"

    def do_GET(self) -> None:
        body = b'{"Keys":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1234")  # the size a GET would get; no body follows
        self.end_headers()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in (b'{"Plaintext":', b'"aGk="}'):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self) -> None:
        while size := int(self.rfile.readline().split(b";")[0], 16):
            self.rfile.read(size + 2)
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.send_response(204)
        self.end_headers()


def _http_responses(requests: bytes) -> bytes:
    """What http.server answers to ``requests`` on one keep-alive connection."""
    rec = _Recorder(requests)
    _KmsHandler(rec, ("127.0.0.1", 1), None)  # type: ignore[arg-type]
    return bytes(rec.out)


def sample_http() -> tuple[Sample, Sample]:
    """(requests, responses) of one keep-alive connection: GET, POST with Content-Length,
    PUT with a chunked body, HEAD."""
    reqs: Sample = [
        (_http_request("GET", "/v1/keys"), ["HTTP GET /v1/keys"]),
        (_http_request("POST", "/v1/decrypt", b'{"CiphertextBlob":"AQID"}', {"Content-Type": "application/json"}),
         ["HTTP POST /v1/decrypt"]),
        (_http_request("PUT", "/upload", iter([b"Wiki", b"pedia"])), ["HTTP PUT /upload"]),
        (_http_request("HEAD", "/status"), ["HTTP HEAD /status"]),
    ]
    responses = _http_responses(b"".join(p for p, _ in reqs))
    # split the response stream at the message ends the server wrote
    marks = [responses.index(b"HTTP/1.1", 1)]
    marks.append(responses.index(b"HTTP/1.1", marks[-1] + 1))
    marks.append(responses.index(b"HTTP/1.1", marks[-1] + 1))
    cuts = [0, *marks, len(responses)]
    parts = [responses[a:b] for a, b in itertools.pairwise(cuts)]
    summaries = ["HTTP 200 OK", "HTTP 200 OK", "HTTP 204 No Content", "HTTP 200 OK"]
    return reqs, [(p, [s]) for p, s in zip(parts, summaries, strict=True)]


def sample_client_hello() -> bytes:
    """A real TLS ClientHello from Python's ssl module (OpenSSL), as a vsock-proxy client sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="kms.us-east-1.amazonaws.com")
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def _tls_record(kind: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack(">BHH", kind, version, len(body)) + body


def sample_server_hello() -> bytes:
    """A TLS 1.3 ServerHello record (RFC 8446 4.1.3), X25519 key share, TLS_AES_128_GCM_SHA256."""
    exts = struct.pack(">HHH", 43, 2, 0x0304) + struct.pack(">HHHH", 51, 36, 29, 32) + bytes(range(32))
    body = struct.pack(">H", 0x0303) + bytes(32) + b"\x20" + bytes(range(32)) + struct.pack(">HB", 0x1301, 0)
    body += struct.pack(">H", len(exts)) + exts
    return _tls_record(22, b"\x02" + len(body).to_bytes(3, "big") + body)


def sample_tls_client() -> Sample:
    return [
        (sample_client_hello(), ["TLS ClientHello sni=kms.us-east-1.amazonaws.com"]),
        (_tls_record(20, b"\x01"), ["TLS ChangeCipherSpec"]),
        (_tls_record(23, bytes(range(200))), ["TLS ApplicationData len=200"]),
        (_tls_record(21, bytes(24)), ["TLS encrypted Alert"]),
    ]


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """RFC 9113 4.1: length u24, type u8, flags u8, R + stream id u31."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(index: int, value: bytes) -> bytes:
    """RFC 7541 6.2.2 literal without indexing, indexed name (index < 15), not Huffman-coded."""
    return bytes([index, len(value)]) + value


def _hpack_literal_new(name: bytes, value: bytes) -> bytes:
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def grpc_message(body: bytes, compressed: bool = False) -> bytes:
    return struct.pack(">BI", int(compressed), len(body)) + body


def sample_h2() -> tuple[Sample, Sample]:
    """A gRPC health check: client preface, SETTINGS, HEADERS, DATA with one gRPC message split
    over two DATA frames; the server's SETTINGS, ACK, HEADERS, DATA, trailers."""
    settings_ = struct.pack(">HIHI", 3, 100, 4, 65535)
    block = (b"\x83\x86" + _hpack_literal(4, b"/grpc.health.v1.Health/Check") + _hpack_literal(1, b"localhost")
             + _hpack_literal_new(b"content-type", b"application/grpc"))
    msg = grpc_message(b"\x0a\x07service")
    client: Sample = [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", ["HTTP2 client preface"]),
        (h2_frame(4, 0, 0, settings_), ["HTTP2 SETTINGS stream=0"]),
        (h2_frame(1, 0x4, 1, block),
         ["HTTP2 HEADERS stream=1 :method=POST :path=/grpc.health.v1.Health/Check END_HEADERS"]),
        (h2_frame(0, 0, 1, msg[:7]), ["HTTP2 DATA stream=1 len=7"]),
        (h2_frame(0, 0x1, 1, msg[7:]), ["HTTP2 DATA stream=1 len=7 END_STREAM", "gRPC message stream=1 len=9"]),
    ]
    server: Sample = [
        (h2_frame(4, 0, 0, b""), ["HTTP2 SETTINGS stream=0"]),
        (h2_frame(4, 0x1, 0, b""), ["HTTP2 SETTINGS stream=0 ACK"]),
        (h2_frame(1, 0x4, 1, b"\x88" + _hpack_literal_new(b"content-type", b"application/grpc")),
         ["HTTP2 HEADERS stream=1 :status=200 END_HEADERS"]),
        (h2_frame(0, 0, 1, grpc_message(b"\x08\x01") + grpc_message(b"")),
         ["HTTP2 DATA stream=1 len=12", "gRPC message stream=1 len=2", "gRPC message stream=1 len=0"]),
        (h2_frame(1, 0x5, 1, _hpack_literal_new(b"grpc-status", b"0")),
         ["HTTP2 HEADERS stream=1 END_STREAM END_HEADERS"]),
        (h2_frame(7, 0, 0, struct.pack(">II", 1, 0)), ["HTTP2 GOAWAY stream=0 last_stream=1 NO_ERROR"]),
    ]
    return client, server


def pb_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def pb_field(number: int, data: bytes) -> bytes:
    return pb_varint(number << 3 | 2) + pb_varint(len(data)) + data


def ttrpc_frame(stream: int, kind: int, body: bytes, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", len(body), stream, kind, flags) + body


def sample_ttrpc() -> tuple[Sample, Sample]:
    """Kata agent calls: a Request (service, method, payload, timeout), its Response, a failed
    call's Response with a google.rpc.Status, and a Data frame."""
    req1 = (pb_field(1, b"grpc.AgentService") + pb_field(2, b"CreateContainer") + pb_field(3, b"\x0a\x03abc")
            + pb_varint(5 << 3) + pb_varint(10**9))
    req3 = pb_field(1, b"grpc.AgentService") + pb_field(2, b"WaitProcess") + pb_field(3, bytes(300))
    client: Sample = [
        (ttrpc_frame(1, 1, req1), [f"TTRPC request stream=1 grpc.AgentService/CreateContainer len={len(req1)}"]),
        (ttrpc_frame(3, 1, req3), [f"TTRPC request stream=3 grpc.AgentService/WaitProcess len={len(req3)}"]),
        (ttrpc_frame(3, 3, b"data", flags=1), ["TTRPC data stream=3 len=4"]),
    ]
    status = pb_varint(1 << 3) + pb_varint(5) + pb_field(2, b"container not found")
    server: Sample = [
        (ttrpc_frame(1, 2, pb_field(2, b"")), ["TTRPC response stream=1 len=2"]),
        (ttrpc_frame(3, 2, pb_field(1, status)), [f"TTRPC response stream=3 status=5 len={len(status) + 2}"]),
    ]
    return client, server


def sample_qmp() -> tuple[Sample, Sample]:
    """qemu-ga: guest-sync-delimited (its reply after 0xFF), guest-ping, an unknown command."""
    client: Sample = [
        (b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": 123}}', ["QMP execute guest-sync-delimited"]),
        (b'\n{"execute":"guest-ping"}', ["QMP execute guest-ping"]),
        (b'\n{"execute": "guest-foo", "id": "a}\\"{"}', ["QMP execute guest-foo"]),
    ]
    server: Sample = [
        (b'\xff{"return": 123}', ["QMP return"]),
        (b"\n{\"return\": {}}", ["QMP return"]),
        (b'\n{"error": {"class": "CommandNotFound", "desc": "The command guest-foo has not been found"}}',
         ["QMP error CommandNotFound: The command guest-foo has not been found"]),
        (b'\n{"event": "SHUTDOWN", "data": {"guest": true}, "timestamp": {"seconds": 1, "microseconds": 2}}',
         ["QMP event SHUTDOWN"]),
    ]
    return client, server


def sample_hybrid() -> tuple[Sample, Sample]:
    return [(b"CONNECT 52\n", ["HYBRID CONNECT 52"]), (b"GET / HTTP/1.1\r\n\r\n", [])], [
        (b"OK 1073741824\n", ["HYBRID OK 1073741824"])]


# -- helpers -----------------------------------------------------------------------------------
def feed_all(d: AppDissector, chunks: list[bytes], eom_at_end: bool = False) -> list[str]:
    out: list[str] = []
    for chunk in chunks:
        out += [m.summary for m in d.feed(chunk)]
    if eom_at_end:
        out += [m.summary for m in d.feed(b"", eom=True)]
    return out


def expected(sample: Sample) -> list[str]:
    return [s for _, msgs in sample for s in msgs]


def whole(sample: Sample) -> bytes:
    return b"".join(p for p, _ in sample)


def assert_reported_on_last_byte(make: type[AppDissector] | AppDissector, sample: Sample) -> None:
    """Fed one byte at a time, each message comes out with the last byte of its part."""
    d = make() if isinstance(make, type) else make
    data = whole(sample)
    got: dict[int, list[str]] = {}
    for i in range(len(data)):
        fed = d.feed(data[i : i + 1])
        if fed:
            got[i] = [m.summary for m in fed]
    want: dict[int, list[str]] = {}
    end = 0
    for part, summaries in sample:
        end += len(part)
        if summaries:
            want[end - 1] = summaries
    assert got == want


def assert_every_split(make: type[AppDissector], sample: Sample, eom_at_end: bool = False) -> None:
    data = whole(sample)
    want = expected(sample)
    for cut in range(len(data) + 1):
        assert feed_all(make(), [data[:cut], data[cut:]], eom_at_end) == want, f"split at {cut}"


# -- the dissectors on real bytes -------------------------------------------------------------------
def test_http_keep_alive_requests_with_content_length_and_chunked_bodies_are_each_found() -> None:
    reqs, _ = sample_http()
    assert feed_all(Http1(), [whole(reqs)]) == expected(reqs)
    assert_every_split(Http1, reqs)
    assert_reported_on_last_byte(Http1, reqs)


def test_http_responses_use_content_length_chunked_204_and_a_head_response_without_body() -> None:
    reqs, resps = sample_http()
    client, server = Http1.pair()
    assert feed_all(client, [whole(reqs)]) == expected(reqs)
    assert feed_all(server, [whole(resps)]) == expected(resps)
    client, server = Http1.pair()
    client.feed(whole(reqs))
    assert_reported_on_last_byte(server, resps)


def test_http_message_fields_carry_the_request_line_headers_and_body_size() -> None:
    reqs, _ = sample_http()
    msgs = Http1().feed(reqs[1][0])
    assert len(msgs) == 1
    fields = dict(msgs[0].fields)
    assert msgs[0].proto == "http"
    assert fields["request"] == "POST /v1/decrypt HTTP/1.1"
    assert fields["host"] == "kms.us-east-1.amazonaws.com"
    assert fields["content-type"] == "application/json"
    assert fields["body"] == "25 bytes"


def test_http_response_without_length_runs_to_the_end_of_the_stream() -> None:
    d = Http1()
    assert d.feed(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nsome body") == []
    assert d.feed(b" more") == []
    msgs = d.feed(b"", eom=True)
    assert [m.summary for m in msgs] == ["HTTP 200 OK"]
    assert dict(msgs[0].fields)["body"] == "14 bytes"


def test_http_after_101_switching_protocols_the_stream_is_not_http() -> None:
    client, server = Http1.pair()
    client.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert [m.summary for m in server.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello")] == [
        "HTTP 101 Switching Protocols"]
    assert server.feed(b"GARBAGE that is not a status line\r\n\r\n") == []
    assert client.feed(b"\x81\x85more websocket\r\n\r\n") == []


def test_http_bad_start_line_gives_one_message_then_silence() -> None:
    d = Http1()
    assert [m.summary for m in d.feed(b"HELLO THERE\r\n\r\n")] == ["HTTP bad start line"]
    assert d.gave_up
    assert d.feed(b"GET / HTTP/1.1\r\n\r\n") == []


def test_tls_client_hello_from_openssl_shows_the_sni() -> None:
    hello = sample_client_hello()
    assert Tls.detect(hello[:3]) is None and Tls.detect(hello[:5]) is True
    msgs = Tls().feed(hello)
    assert [m.summary for m in msgs] == ["TLS ClientHello sni=kms.us-east-1.amazonaws.com"]
    fields = dict(msgs[0].fields)
    assert fields["sni"] == "kms.us-east-1.amazonaws.com"
    assert "TLS1.3" in fields["supported_versions"]


def test_tls_records_split_at_every_byte_boundary() -> None:
    sample = sample_tls_client()
    assert_every_split(Tls, sample)
    assert_reported_on_last_byte(Tls, sample)


def test_tls_server_hello_and_a_handshake_message_spanning_two_records() -> None:
    sh = sample_server_hello()
    assert [m.summary for m in Tls().feed(sh)] == ["TLS ServerHello version=TLS1.3 cipher=0x1301"]
    hs = sample_client_hello()[5:]
    two = _tls_record(22, hs[:100], 0x0301) + _tls_record(22, hs[100:], 0x0301)
    assert [m.summary for m in Tls().feed(two)] == [
        "TLS Handshake (fragment)", "TLS ClientHello sni=kms.us-east-1.amazonaws.com"]


def test_tls_alert_in_clear_is_named() -> None:
    assert [m.summary for m in Tls().feed(_tls_record(21, b"\x02\x28"))] == ["TLS Alert fatal handshake_failure"]


def test_tls_bad_record_header_gives_up() -> None:
    d = Tls()
    assert [m.summary for m in d.feed(_tls_record(22, b"\x01\x00\x01\x00x") + b"\x99\x99\x99\x00\x01x")] == [
        "TLS Handshake (fragment)", "TLS bad record"]
    assert d.feed(_tls_record(23, b"x")) == []


def test_http2_frames_and_grpc_messages_both_directions() -> None:
    client, server = sample_h2()
    assert feed_all(Http2(), [whole(client)]) == expected(client)
    assert feed_all(Http2(), [whole(server)]) == expected(server)
    msgs = Http2().feed(whole(client))
    assert [m.proto for m in msgs][-2:] == ["http2", "grpc"]
    headers = dict(msgs[2].fields)
    assert headers[":path"] == "/grpc.health.v1.Health/Check"
    assert headers["content-type"] == "application/grpc"
    assert headers[":authority"] == "localhost"


def test_http2_split_at_every_byte_boundary() -> None:
    for sample in sample_h2():
        assert_every_split(Http2, sample)
        assert_reported_on_last_byte(Http2, sample)


def test_http2_detects_the_preface_and_a_server_settings_frame() -> None:
    client, server = sample_h2()
    assert Http2.detect(whole(client)[:10]) is None
    assert Http2.detect(whole(client)) is True
    assert Http2.detect(whole(server)) is True
    assert Http2.detect(b"GET / HTTP/1.1\r\n") is False


def test_ttrpc_requests_name_service_and_method() -> None:
    client, server = sample_ttrpc()
    assert feed_all(Ttrpc(), [whole(client)]) == expected(client)
    assert feed_all(Ttrpc(), [whole(server)]) == expected(server)
    fields = dict(Ttrpc().feed(client[0][0])[0].fields)
    assert fields["service"] == "grpc.AgentService" and fields["method"] == "CreateContainer"
    assert fields["type"] == "1 (request)" and fields["stream_id"] == "1"


def test_ttrpc_split_at_every_byte_boundary() -> None:
    for sample in sample_ttrpc():
        assert_every_split(Ttrpc, sample)
        assert_reported_on_last_byte(Ttrpc, sample)


def test_ttrpc_large_message_is_summarised_without_being_buffered() -> None:
    body = pb_field(1, b"svc") + pb_field(2, b"Put") + pb_field(3, bytes(3 << 20))
    frame = ttrpc_frame(5, 1, body)
    d = Ttrpc()
    out: list[AppMessage] = []
    for i in range(0, len(frame), 65536):
        out += d.feed(frame[i : i + 65536])
        assert d.buffered <= 65536 + 10
    assert [m.summary for m in out] == [f"TTRPC request stream=5 svc/Put len={len(body)}"]


def test_ttrpc_bad_type_gives_up() -> None:
    assert [m.summary for m in Ttrpc().feed(ttrpc_frame(1, 9, b""))] == ["TTRPC bad message type 9"]


def test_qmp_commands_replies_errors_and_events() -> None:
    client, server = sample_qmp()
    assert feed_all(Qmp(), [whole(client)]) == expected(client)
    assert feed_all(Qmp(), [whole(server)]) == expected(server)
    first = Qmp().feed(server[0][0])[0]
    assert ("sync", "0xff before this message") in first.fields
    assert ("json", '{"return": 123}') in first.fields


def test_qmp_split_at_every_byte_boundary() -> None:
    for sample in sample_qmp():
        assert_every_split(Qmp, sample)
        assert_reported_on_last_byte(Qmp, sample)


def test_qmp_nesting_is_bounded_and_bad_json_is_reported() -> None:
    assert [m.summary for m in Qmp().feed(b'{"a":' * 100)] == ["QMP JSON nested too deeply"]
    assert [m.summary for m in Qmp().feed(b'{"return": tru}')] == ["QMP bad JSON"]
    assert [m.summary for m in Qmp().feed(b"hello")] == ["QMP not JSON"]


def test_notify_message_ends_at_eom() -> None:
    d = SystemdNotify()
    assert d.feed(b"READY=1\nSTATUS=Started ") == []
    msgs = d.feed(b"the agent", eom=True)
    assert [m.summary for m in msgs] == ["NOTIFY READY=1 STATUS=Started the agent"]
    assert msgs[0].fields == (("READY", "1"), ("STATUS", "Started the agent"))
    assert [m.summary for m in d.feed(b"WATCHDOG=1", eom=True)] == ["NOTIFY WATCHDOG=1"]
    data = b"READY=1\nSTATUS=Up\nMAINPID=42\n"
    for cut in range(len(data) + 1):
        assert feed_all(SystemdNotify(), [data[:cut], data[cut:]], eom_at_end=True) == [
            "NOTIFY READY=1 STATUS=Up MAINPID=42"]


def test_nitro_heartbeat_is_one_byte_each_way() -> None:
    assert NitroHeartbeat.detect(b"\xb7") is True
    assert NitroHeartbeat.detect(b"\xb7\xb7x") is False
    assert [m.summary for m in NitroHeartbeat().feed(b"\xb7")] == ["Nitro heartbeat 0xB7"]
    assert [m.summary for m in NitroHeartbeat().feed(b"A")] == ["Nitro bad heartbeat byte 0x41"]


def test_hybrid_handshake_then_the_proxied_stream_is_left_alone() -> None:
    client, server = sample_hybrid()
    assert feed_all(HybridHandshake(), [whole(client)]) == expected(client)
    assert feed_all(HybridHandshake(), [whole(server)]) == expected(server)
    for sample in (client, server):
        assert_every_split(HybridHandshake, sample)
    assert HybridHandshake.detect(b"CONNECT 5") is None
    assert HybridHandshake.detect(b"CONNECT 52\n") is True
    assert HybridHandshake.detect(b"CONNECT kms:443 HTTP/1.1\r\n") is False


@pytest.mark.parametrize(("first", "cls"), [
    (b"\x16\x03\x01\x02\x00\x01", Tls),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Http2),
    (b"CONNECT 52\n", HybridHandshake),
    (b"GET /v1/keys HTTP/1.1\r\n", Http1),
    (b"CONNECT kms:443 HTTP/1.1\r\n", Http1),
    (b"HTTP/1.1 200 OK\r\n", Http1),
    (ttrpc_frame(1, 1, pb_field(1, b"svc")), Ttrpc),
    (b'{"execute":"guest-ping"}', Qmp),
    (b"\xff{\"return\": {}}", Qmp),
    (b"READY=1", SystemdNotify),
    (b"\xb7", NitroHeartbeat),
])
def test_first_bytes_pick_exactly_one_builtin(first: bytes, cls: type[AppDissector]) -> None:
    assert [c for c in BUILTINS if c.detect(first)] == [cls]


# -- garbage ---------------------------------------------------------------------------------------
def _all_samples() -> list[Sample]:
    return [*sample_http(), sample_tls_client(), *sample_h2(), *sample_ttrpc(), *sample_qmp(), *sample_hybrid()]


@settings(max_examples=300, deadline=None)
@given(cls=st.sampled_from(BUILTINS), chunks=st.lists(st.tuples(st.binary(max_size=300), st.booleans()), max_size=8))
def test_garbage_never_raises_and_stays_bounded(cls: type[AppDissector], chunks: list[tuple[bytes, bool]]) -> None:
    cls.detect(b"".join(c for c, _ in chunks))
    d = cls()
    for data, eom in chunks:
        for m in d.feed(data, eom):
            assert isinstance(m, AppMessage) and "\n" not in m.summary
        assert d.buffered <= d.max_buffer
    d.feed(b"", eom=True)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), cls=st.sampled_from(BUILTINS))
def test_damaged_real_streams_never_raise(data: st.DataObject, cls: type[AppDissector]) -> None:
    raw = bytearray(whole(data.draw(st.sampled_from(_all_samples()))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    d = cls()
    d.feed(bytes(raw[:cut]))
    d.feed(bytes(raw[cut:]))
    d.feed(b"", eom=True)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_chunking_gives_the_same_messages(data: st.DataObject) -> None:
    samples = {"tls": (Tls, sample_tls_client()), "h2": (Http2, sample_h2()[1]), "ttrpc": (Ttrpc, sample_ttrpc()[0]),
               "qmp": (Qmp, sample_qmp()[1]), "http": (Http1, sample_http()[0])}
    cls, sample = samples[data.draw(st.sampled_from(sorted(samples)))]
    raw = whole(sample)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert feed_all(cls(), pieces) == expected(sample)


def test_a_stream_buffering_over_the_bound_gives_up_once() -> None:
    d = Qmp()
    out = d.feed(b'{"return": "')
    for _ in range(20):
        out += d.feed(b"x" * 65536)
    assert [m.summary.split(":")[0] for m in out] == ["QMP undecodable"]
    assert d.buffered == 0 and d.gave_up


# -- the base class and the plugin API ------------------------------------------------------------
class _Lines(AppDissector):
    """A plugin as docs/dissectors.md shows it: one message per line."""

    name = "lines"
    ports = frozenset({7777})

    @classmethod
    def detect(cls, first: bytes) -> bool | None:
        return first.startswith(b"LINE") or (None if b"LINE".startswith(first) else False)

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        end = buf.find(b"\n")
        if end < 0:
            return None
        if not buf.startswith(b"LINE"):
            raise Undecodable("bad line")
        return end + 1, self.message(f"LINES {bytes(buf[4:end]).decode(errors='replace').strip()}")


def test_base_class_defaults_label_and_reports_undecodable_once() -> None:
    assert _Lines.label == "LINES"
    d = _Lines()
    assert [m.summary for m in d.feed(b"LINE one\nLI")] == ["LINES one"]
    assert [m.summary for m in d.feed(b"NE two\nNOPE\nLINE three\n")] == ["LINES two", "LINES bad line"]
    assert d.feed(b"LINE four\n") == []


def test_skipping_past_the_buffer_reports_the_message_at_its_last_byte() -> None:
    class Sized(AppDissector):
        name = "sized"

        def parse(self, buf: bytearray, eom: bool) -> Step | None:
            if len(buf) < 2:
                return None
            n = int.from_bytes(buf[:2], "big")
            return 2 + n, self.message(f"SIZED {n}")

    d = Sized()
    assert d.feed(b"\x00\x05ab") == []
    assert d.buffered == 0  # the body is skipped, not kept
    assert [m.summary for m in d.feed(b"cde\x00\x01")] == ["SIZED 5"]
    assert [m.summary for m in d.feed(b"z")] == ["SIZED 1"]
    # a unit cannot run past a SEQPACKET message end: the next message starts afresh
    d = Sized()
    assert d.feed(b"\x00\x09abc", eom=True) == []
    assert [m.summary for m in d.feed(b"\x00\x00", eom=True)] == ["SIZED 0"]


@pytest.fixture
def registry() -> Iterator[None]:
    saved = app.registered()
    yield
    for cls in app.registered():
        app.unregister(cls.name)
    for cls in saved:
        app.register(cls)


def test_builtins_are_registered_in_detection_order() -> None:
    assert app.registered()[: len(BUILTINS)] == BUILTINS
    assert [c.name for c in BUILTINS] == ["tls", "http2", "hybrid", "http", "ttrpc", "qmp", "notify", "nitro"]


def test_register_as_decorator_and_replacing_by_name(registry: None) -> None:
    @app.register
    class Mine(_Lines):
        name = "mine"

    assert app.registered()[-1] is Mine

    class OtherHttp(_Lines):
        name = "http"

    app.register(OtherHttp, first=True)
    assert app.registered()[0] is OtherHttp
    assert Http1 not in app.registered()


@pytest.mark.parametrize(("cls", "message"), [
    (int, "is not an AppDissector subclass"),
    (type("NoName", (_Lines,), {"name": ""}), "needs a name"),
    (type("Upper", (_Lines,), {"name": "Upper"}), "needs a name"),
    (type("BadPorts", (_Lines,), {"name": "bp", "ports": {1, 2}}), "ports must be a frozenset"),
    (type("NoParse", (AppDissector,), {"name": "np"}), "does not implement parse()"),
])
def test_register_refuses_unusable_classes(cls: type[AppDissector], message: str, registry: None) -> None:
    with pytest.raises(PluginError, match=message):
        app.register(cls)


def _write_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent('''
        from dissectors.app import AppDissector, Step

        class Echo(AppDissector):
            name = "echo"
            ports = frozenset({7})

            def parse(self, buf: bytearray, eom: bool) -> Step | None:
                return len(buf), self.message(f"ECHO {len(buf)} bytes")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_load_plugins_from_module_class_spec_goes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       registry: None) -> None:
    _write_plugin(tmp_path, monkeypatch, "vsp_plugin_spec")
    loaded = app.load_plugins(["vsp_plugin_spec:Echo"], entry_points=False)
    assert [c.name for c in loaded] == ["echo"]
    assert app.registered()[0] is loaded[0]
    assert [m.summary for m in loaded[0]().feed(b"abc")] == ["ECHO 3 bytes"]


def test_load_plugins_from_an_installed_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     registry: None) -> None:
    _write_plugin(tmp_path, monkeypatch, "vsp_plugin_ep")
    dist = tmp_path / "vsp_plugin_ep-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsp-plugin-ep\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vsproxy.dissectors]\necho = vsp_plugin_ep:Echo\n")
    assert [ep.value for ep in importlib.metadata.entry_points(group=app.ENTRY_POINT_GROUP)] == ["vsp_plugin_ep:Echo"]
    loaded = app.load_plugins()
    assert [c.__module__ for c in loaded] == ["vsp_plugin_ep"]
    assert "echo" in [c.name for c in app.registered()]


def test_broken_entry_point_is_a_plugin_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: None) -> None:
    dist = tmp_path / "vsp_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vsp-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vsproxy.dissectors]\nbroken = vsp_no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"entry point 'broken'.*cannot load: ModuleNotFoundError"):
        app.load_plugins()


@pytest.mark.parametrize(("spec", "message"), [
    ("no-colon", "expected module:Class"),
    ("a:b:c", "expected module:Class"),
    ("vsp_no_such_module_xyz:Thing", "cannot import vsp_no_such_module_xyz: ModuleNotFoundError"),
    ("json:NoSuchThing", "json has no NoSuchThing"),
    ("json:JSONDecoder", "is not an AppDissector subclass"),
])
def test_bad_plugin_specs_are_one_line_errors(spec: str, message: str, registry: None) -> None:
    before = app.registered()
    with pytest.raises(PluginError, match=message) as err:
        app.load_plugins([spec], entry_points=False)
    assert "\n" not in str(err.value)
    assert app.registered() == before


def test_app_package_does_not_import_scapy() -> None:
    import subprocess

    code = "import sys, dissectors.app, dissectors.streams; print('scapy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_wire_readers_stop_at_truncation() -> None:
    assert varint(b"\x96\x01", 0, 2) == (150, 2)
    assert varint(b"\x96", 0, 1) is None
    assert varint(b"\xff" * 11, 0, 11) is None
    msg = pb_field(1, b"svc") + pb_field(2, b"method")
    assert list(proto_fields(msg)) == [(1, 2, b"svc"), (2, 2, b"method")]
    assert list(proto_fields(msg[:-1])) == [(1, 2, b"svc")]


def test_the_example_in_docs_dissectors_md_runs() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "dissectors.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    assert len(blocks) == 2
    namespace: dict[str, object] = {"__name__": "docs_example"}
    for block in blocks:
        exec(compile(block, "docs/dissectors.md", "exec"), namespace)
    cls = namespace["JsonFrames"]
    assert isinstance(cls, type) and issubclass(cls, AppDissector)
    assert cls.detect(struct.pack(">I", 2) + b"{}") is True
    assert [m.summary for m in cls().feed(struct.pack(">I", 3) + b"[1]")] == ["JSONF ?"]
    assert [m.summary for m in cls().feed(struct.pack(">I", 1 << 30))] == ["JSONF bad frame length 1073741824"]
