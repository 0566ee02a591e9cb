"""StreamTracker on captures: pcapng bytes written with vsproxy.capture.format, read back with
vsproxy.capture.reader, fed packet by packet. Connection tracking, dissector choice (port
first, then first bytes), SEQPACKET messages, memory bounds, follow."""

from __future__ import annotations

import gc
import io
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dissectors_app import (
    Sample,
    expected,
    sample_client_hello,
    sample_h2,
    sample_http,
    sample_ttrpc,
    ttrpc_frame,
    whole,
)

from dissectors.app import AppDissector, AppMessage, Http1, Qmp, Step, registered
from dissectors.streams import (
    FollowChunk,
    SelectorError,
    StreamTracker,
    as_selector,
    ended,
    follow,
    follow_chunk,
    parse_selector,
)
from vsproxy.capture import format as fmt
from vsproxy.capture.reader import dissect, records
from vsproxy.capture.view import PacketView
from vsproxy.vsock import header as H

GUEST, HOST = 5, 2
STREAM, SEQPACKET = H.Type.STREAM, H.Type.SEQPACKET
Endpoint = tuple[int, int]


@dataclass
class Capture:
    """Builds a pcapng capture packet by packet, as vsproxy's writer lays it out."""

    frames: list[tuple[int, bool, bytes]] = field(default_factory=list)
    devices: list[str] = field(default_factory=lambda: ["vm5"])

    def packet(self, src: Endpoint, dst: Endpoint, op: int, payload: bytes = b"", *, kind: int = STREAM,
               flags: int = 0, device: int = 0) -> None:
        hdr = H.Header(src[0], dst[0], src[1], dst[1], len(payload), kind, op, flags, 1 << 18, 0)
        self.frames.append((device, src[0] == GUEST, fmt.vsockmon_frame(hdr.pack(), payload)))

    def connect(self, client: Endpoint, server: Endpoint, kind: int = STREAM) -> None:
        self.packet(client, server, H.Op.REQUEST, kind=kind)
        self.packet(server, client, H.Op.RESPONSE, kind=kind)

    def send(self, src: Endpoint, dst: Endpoint, data: bytes, size: int = 1 << 16, kind: int = STREAM) -> None:
        for i in range(0, len(data), size):
            self.packet(src, dst, H.Op.RW, data[i : i + size], kind=kind)

    def close(self, a: Endpoint, b: Endpoint) -> None:
        self.packet(a, b, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
        self.packet(b, a, H.Op.RST)

    def pcapng(self) -> bytes:
        out = fmt.pcapng_shb() + b"".join(fmt.pcapng_idb(name) for name in self.devices)
        return out + b"".join(fmt.pcapng_epb(dev, 1700000000 + i / 1000, frame, inbound=inbound)
                              for i, (dev, inbound, frame) in enumerate(self.frames))

    def views(self) -> list[PacketView]:
        out = []
        for rec in records(io.BytesIO(self.pcapng())):
            pkt = dissect(rec)
            out.append(PacketView(rec.ts, rec.interface, rec.inbound, pkt.hdr, pkt.mon_op, pkt.payload, rec.comment))
        return out


def track(views: list[PacketView], tracker: StreamTracker | None = None) -> list[PacketView]:
    tracker = StreamTracker() if tracker is None else tracker
    for v in views:
        tracker.feed(v)
    return views


def summaries(views: list[PacketView]) -> list[str]:
    return [s for v in views for s in v.app]


def conversation(client: Endpoint, server: Endpoint, c2s: Sample, s2c: Sample, size: int) -> Capture:
    """Request/response turns: the client's messages, then the server's, part by part, each
    cut into packets of ``size`` bytes."""
    cap = Capture()
    cap.connect(client, server)
    for i in range(max(len(c2s), len(s2c))):
        if i < len(c2s):
            cap.send(client, server, c2s[i][0], size)
        if i < len(s2c):
            cap.send(server, client, s2c[i][0], size)
    cap.close(client, server)
    return cap


def interleaved(c2s: Sample, s2c: Sample) -> list[str]:
    out: list[str] = []
    for i in range(max(len(c2s), len(s2c))):
        out += c2s[i][1] if i < len(c2s) else []
        out += s2c[i][1] if i < len(s2c) else []
    return out


# -- choosing the dissector ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 7, 64, 1 << 16])
def test_http_on_an_unknown_port_is_found_by_first_bytes_in_packets_of_any_size(size: int) -> None:
    reqs, resps = sample_http()
    views = track(conversation((GUEST, 1050), (HOST, 8080), reqs, resps, size).views())
    assert summaries(views) == interleaved(reqs, resps)
    first_message = next(i for i, v in enumerate(views) if v.app)
    assert {v.proto for v in views[first_message:-1]} == {"http"}  # the last, an RST, ends nothing live
    assert {v.proto for v in views[:first_message] if v.payload} <= {None, "http"}
    # each message is reported on the packet carrying its last byte
    ends = [v for v in views if v.app]
    assert all(v.payload for v in ends)


@pytest.mark.parametrize("size", [1, 5, 100])
def test_ttrpc_on_the_kata_agent_port_and_grpc_over_http2(size: int) -> None:
    c2s, s2c = sample_ttrpc()
    views = track(conversation((HOST, 40001), (GUEST, 1024), c2s, s2c, size).views())
    assert summaries(views) == interleaved(c2s, s2c)
    h2c, h2s = sample_h2()
    views = track(conversation((GUEST, 1051), (HOST, 50051), h2c, h2s, size).views())
    assert summaries(views) == interleaved(h2c, h2s)
    assert "grpc" in {v.proto for v in views} and "http2" in {v.proto for v in views}


def test_tls_to_the_vsock_proxy_shows_the_sni_in_the_capture() -> None:
    cap = Capture()
    cap.connect((GUEST, 1052), (3, 8000))
    cap.send((GUEST, 1052), (3, 8000), sample_client_hello(), size=100)
    views = track(cap.views())
    assert summaries(views) == ["TLS ClientHello sni=kms.us-east-1.amazonaws.com"]
    assert views[-1].app == ("TLS ClientHello sni=kms.us-east-1.amazonaws.com",)
    assert all(v.app == () for v in views[:-1])


class _PortOnly(AppDissector):
    """Chosen by port only: no detect()."""

    name = "portonly"
    ports = frozenset({7777})

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        return len(buf), self.message(f"PORTONLY {len(buf)}")


def _port_plugin(name: str, port: int) -> type[AppDissector]:
    return type(name, (_PortOnly,), {"name": name, "ports": frozenset({port})})


def test_port_selects_a_dissector_that_cannot_detect_and_only_on_its_port() -> None:
    for port, want in ((7777, ["PORTONLY 5"]), (7778, [])):
        cap = Capture()
        cap.connect((GUEST, 1053), (HOST, port))
        cap.send((GUEST, 1053), (HOST, port), b"hello")
        views = track(cap.views(), StreamTracker([*registered(), _PortOnly]))
        assert summaries(views) == want
        assert views[-1].proto == ("portonly" if want else None)


def test_the_port_the_request_was_sent_to_is_checked_first() -> None:
    a, b = _port_plugin("porta", 7001), _port_plugin("portb", 7002)
    for client, server, want in (((GUEST, 7001), (HOST, 7002), "portb"), ((HOST, 7002), (GUEST, 7001), "porta")):
        cap = Capture()
        cap.connect(client, server)
        cap.send(client, server, b"x")
        views = track(cap.views(), StreamTracker([a, b]))
        assert views[-1].proto == want


def test_a_port_match_whose_detect_rejects_the_bytes_falls_back_to_detection() -> None:
    # port 9000 is the Nitro heartbeat's, but this connection speaks HTTP
    reqs, resps = sample_http()
    views = track(conversation((GUEST, 1054), (3, 9000), reqs, resps, 50).views())
    assert summaries(views) == interleaved(reqs, resps)


def test_nitro_heartbeat_both_ways() -> None:
    cap = Capture()
    cap.connect((GUEST, 1055), (3, 9000))
    cap.send((GUEST, 1055), (3, 9000), b"\xb7")
    cap.send((3, 9000), (GUEST, 1055), b"\xb7")
    views = track(cap.views())
    assert [v.app for v in views] == [(), (), ("Nitro heartbeat 0xB7",), ("Nitro heartbeat 0xB7",)]
    assert views[-1].proto == "nitro"


def test_the_server_speaking_first_decides_too() -> None:
    cap = Capture()
    cap.connect((HOST, 1056), (GUEST, 4000))
    cap.send((GUEST, 4000), (HOST, 1056), b'{"QMP": {"version": {}}}\n')
    cap.send((HOST, 1056), (GUEST, 4000), b'{"execute": "qmp_capabilities"}\n')
    assert summaries(track(cap.views())) == ["QMP greeting", "QMP execute qmp_capabilities"]


def test_undetected_connections_cost_nothing_and_keep_no_bytes() -> None:
    cap = Capture()
    cap.connect((GUEST, 1057), (HOST, 5555))
    for _ in range(200):
        cap.send((GUEST, 1057), (HOST, 5555), b"\x00\x01garbage" * 8)
        cap.send((HOST, 5555), (GUEST, 1057), b"\x02\x03more garbage" * 8)
    tracker = StreamTracker()
    views = track(cap.views(), tracker)
    assert summaries(views) == [] and {v.proto for v in views} == {None}
    conn = tracker.connections()[0]
    assert conn.decided and conn.dissector is None
    assert tracker.buffered == 0


# -- connections ---------------------------------------------------------------------------------------
def test_seqpacket_messages_are_dissected_one_by_one_using_eom() -> None:
    cap = Capture()
    c, s = (GUEST, 1058), (HOST, 8888)
    cap.connect(c, s, kind=SEQPACKET)
    cap.packet(c, s, H.Op.RW, b"READY=1\nSTA", kind=SEQPACKET)
    cap.packet(c, s, H.Op.RW, b"TUS=Up", kind=SEQPACKET, flags=H.SEQ_EOM)
    cap.packet(c, s, H.Op.RW, b"WATCHDOG=1", kind=SEQPACKET, flags=H.SEQ_EOM | H.SEQ_EOR)
    views = track(cap.views())
    assert [v.app for v in views[2:]] == [(), ("NOTIFY READY=1 STATUS=Up",), ("NOTIFY WATCHDOG=1",)]


def test_a_stream_notify_message_ends_with_the_senders_shutdown() -> None:
    cap = Capture()
    c, s = (GUEST, 1059), (HOST, 8888)
    cap.connect(c, s)
    cap.send(c, s, b"READY=1\nSTATUS=Booted", size=4)
    cap.packet(c, s, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
    views = track(cap.views())
    assert [v.app for v in views if v.app] == [("NOTIFY READY=1 STATUS=Booted",)]
    assert views[-1].app and views[-1].hdr is not None and views[-1].hdr.op == H.Op.SHUTDOWN


def test_a_request_starts_a_fresh_connection_and_rst_or_shutdown_ends_it() -> None:
    c, s = (GUEST, 1060), (HOST, 8443)
    cap = Capture()
    cap.connect(c, s)
    cap.send(c, s, sample_client_hello())
    cap.connect(c, s)  # same endpoints, no close in between: a new connection
    cap.send(c, s, b"GET / HTTP/1.1\r\n\r\n")
    cap.close(c, s)
    tracker = StreamTracker()
    ids = []
    views = cap.views()
    for v in views:
        tracker.feed(v)
        ids.append(tracker.current.id if tracker.current else None)
    assert summaries(views) == ["TLS ClientHello sni=kms.us-east-1.amazonaws.com", "HTTP GET /"]
    assert ids == [1, 1, 1, 2, 2, 2, 2, None]  # the RST after both-way SHUTDOWN finds nothing
    assert tracker.live == 0
    cap = Capture()
    cap.connect(c, s)
    cap.packet(s, c, H.Op.RST)
    tracker = StreamTracker()
    track(cap.views(), tracker)
    assert tracker.live == 0 and [c.id for c in tracker.closed] == [1]


def test_devices_and_socket_types_separate_connections() -> None:
    cap = Capture(devices=["vm5", "vm6"])
    c, s = (GUEST, 1061), (HOST, 8080)
    cap.connect(c, s)
    cap.packet(c, s, H.Op.REQUEST, device=1)
    cap.packet(c, s, H.Op.REQUEST, kind=SEQPACKET)
    tracker = StreamTracker()
    track(cap.views(), tracker)
    assert sorted((c.device, c.sock_type) for c in tracker.connections()) == [("vm5", 1), ("vm5", 2), ("vm6", 1)]


def test_a_connection_seen_mid_stream_is_picked_up() -> None:
    reqs, resps = sample_http()
    cap = Capture()
    cap.send((GUEST, 1062), (HOST, 8080), whole(reqs), size=30)
    cap.send((HOST, 8080), (GUEST, 1062), whole(resps), size=30)
    tracker = StreamTracker()
    views = track(cap.views(), tracker)
    assert summaries(views) == expected(reqs) + expected(resps)
    conn = tracker.connections()[0]
    assert conn.client == (GUEST, 1062) and not conn.seen_request


def test_packets_that_are_not_virtio_are_ignored() -> None:
    frame = fmt.VSOCKMON.pack(GUEST, HOST, 1, 2, fmt.AF_VSOCK_OP_PAYLOAD, 1, 0) + b"data"
    data = fmt.pcapng_shb() + fmt.pcapng_idb("vm5") + fmt.pcapng_epb(0, 1.0, frame, inbound=True)
    rec = next(records(io.BytesIO(data)))
    pkt = dissect(rec)
    view = PacketView(rec.ts, rec.interface, rec.inbound, pkt.hdr, pkt.mon_op, pkt.payload)
    tracker = StreamTracker()
    assert tracker.feed(view) == [] and tracker.current is None and view.proto is None


# -- bounds -------------------------------------------------------------------------------------------------
def test_live_connections_are_capped_evicting_the_least_recently_active() -> None:
    cap = Capture()
    keep = (GUEST, 999)
    cap.connect(keep, (HOST, 80))
    for i in range(300):
        cap.connect((GUEST, 2000 + i), (HOST, 443))
        cap.send((GUEST, 2000 + i), (HOST, 443), sample_client_hello()[:200])  # never completes
        cap.send(keep, (HOST, 80), b"GET ")  # keeps the first connection active
    tracker = StreamTracker(max_connections=16)
    seen = 0
    for v in cap.views():
        tracker.feed(v)
        seen = max(seen, tracker.live)
    assert seen == 16
    assert (GUEST, 999) in [c.client for c in tracker.connections()]
    assert max(c.id for c in tracker.connections()) == 301
    assert tracker.connections()[-1].client == keep  # the most recently active comes last


def test_buffered_bytes_are_capped_across_connections() -> None:
    cap = Capture()
    for i in range(100):
        c = (GUEST, 3000 + i)
        cap.connect(c, (HOST, 4444))
        cap.send(c, (HOST, 4444), b'{"return": "' + b"x" * 20000)  # an object that never closes
    tracker = StreamTracker(max_buffered=256 << 10)
    high = 0
    for v in cap.views():
        tracker.feed(v)
        high = max(high, tracker.buffered)
    assert 200 << 10 < high <= (256 << 10) + 20012
    assert tracker.live < 100


def test_a_forgotten_connection_lets_its_dissectors_go_even_while_someone_holds_it() -> None:
    made: weakref.WeakSet[AppDissector] = weakref.WeakSet()

    class Held(AppDissector):
        """Never completes a message: everything stays in the buffer."""

        name = "held"
        ports = frozenset({4545})

        def __init__(self) -> None:
            super().__init__()
            made.add(self)

        def parse(self, buf: bytearray, eom: bool) -> Step | None:
            return None

    cap = Capture()
    for i in range(6):
        c = (GUEST, 3000 + i)
        cap.connect(c, (HOST, 4545))
        cap.send(c, (HOST, 4545), b"x" * 3000)
    cap.close((GUEST, 3005), (HOST, 4545))
    tracker = StreamTracker([Held], max_buffered=10000)
    held = []  # every connection object, as a consumer that keeps decoded packets would
    for v in cap.views():
        tracker.feed(v)
        held += tracker.closed
    gc.collect()
    # three were shed to stay under 10,000 bytes and one closed: only the two live ones' remain
    assert len(held) == 4 and tracker.live == 2 and tracker.buffered == 6000
    assert len(made) == 2 * tracker.live
    assert [c.proto for c in held] == ["held"] * 4  # what the connection was stays known


def test_a_failing_plugin_is_reported_once_and_does_not_stop_the_read() -> None:
    class Boom(AppDissector):
        name = "boom"
        ports = frozenset({6666})

        def parse(self, buf: bytearray, eom: bool) -> Step | None:
            raise ValueError("plugin bug")

    class BadDetect(AppDissector):
        name = "baddetect"

        @classmethod
        def detect(cls, first: bytes) -> bool | None:
            raise RuntimeError("detect bug")

        def parse(self, buf: bytearray, eom: bool) -> Step | None:
            return None

    class BadPair(Boom):
        name = "badpair"
        ports = frozenset({6668})

        @classmethod
        def pair(cls) -> tuple[AppDissector, AppDissector]:
            raise TypeError("pair bug")

    cap = Capture()
    cap.connect((GUEST, 1065), (HOST, 6668))
    cap.send((GUEST, 1065), (HOST, 6668), b"x")
    cap.connect((GUEST, 1063), (HOST, 6666))
    cap.send((GUEST, 1063), (HOST, 6666), b"one")
    cap.send((GUEST, 1063), (HOST, 6666), b"two")
    cap.connect((GUEST, 1064), (HOST, 6667))
    cap.send((GUEST, 1064), (HOST, 6667), b'{"return": {}}')
    views = track(cap.views(), StreamTracker([Boom, BadDetect, BadPair, Qmp]))
    assert summaries(views) == ["BOOM dissector failed: ValueError", "QMP return"]


_PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x10", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                     b'{"execute":"x"}', b"READY=1", b"\xb7", b"CONNECT 5\n", ttrpc_frame(1, 1, b"\x0a\x01s")]),
)
_PACKETS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 8), st.integers(1, 2),
                              st.integers(0, 3), _PAYLOADS), max_size=60)


@settings(max_examples=200, deadline=None)
@given(packets=_PACKETS)
def test_any_packet_sequence_is_tracked_without_raising_within_bounds(
        packets: list[tuple[int, int, int, int, int, bytes]]) -> None:
    eps = [(GUEST, 1024), (HOST, 9000), (HOST, 1024)]
    tracker = StreamTracker(max_connections=2, max_buffered=1000)
    for a, b, op, kind, flags, payload in packets:
        hdr = H.Header(eps[a][0], eps[b][0], eps[a][1], eps[b][1], len(payload), kind, op, flags, 0, 0)
        view = PacketView(0.0, "vm5", None, hdr, 4, payload if op == H.Op.RW else b"")
        msgs = tracker.feed(view)
        assert view.app == tuple(m.summary for m in msgs)
        assert tracker.live <= 2
        assert tracker.buffered <= 1000 + 64


# -- follow ------------------------------------------------------------------------------------------------
def _two_connections() -> Capture:
    cap = Capture()
    a, b, s = (GUEST, 1070), (GUEST, 1071), (HOST, 8080)
    cap.connect(a, s)
    cap.connect(b, s)
    cap.send(a, s, b"GET /a HTTP/1.1\r\n", size=5)
    cap.send(b, s, b"GET /b HTTP/1.1\r\n\r\n")
    cap.send(a, s, b"\r\n")
    cap.send(s, a, b"HTTP/1.1 204 No Content\r\n\r\n")
    cap.close(a, s)
    cap.send(s, b, b"HTTP/1.1 404 Not Found\r\n\r\n")
    return cap


def test_follow_yields_one_connections_stream_in_order() -> None:
    views = _two_connections().views()
    chunks = list(follow(views, 1))
    assert all(isinstance(c, FollowChunk) and c.conn.id == 1 for c in chunks)
    assert b"".join(c.data for c in chunks if c.from_client) == b"GET /a HTTP/1.1\r\n\r\n"
    assert b"".join(c.data for c in chunks if not c.from_client) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert [c.from_guest for c in chunks] == [c.from_client for c in chunks]  # the client is the guest
    assert [c.data for c in chunks][:2] == [b"GET /", b"a HTT"]


def test_follow_by_endpoints_and_bad_selectors() -> None:
    views = _two_connections().views()
    by_ep = list(follow(views, parse_selector("5:1071")))
    assert b"".join(c.data for c in by_ep) == b"GET /b HTTP/1.1\r\n\r\nHTTP/1.1 404 Not Found\r\n\r\n"
    both = list(follow(views, parse_selector("2:8080, 5:1070")))
    assert {c.conn.id for c in both} == {1}
    assert parse_selector("#2") == 2
    assert {c.conn.id for c in follow(views, parse_selector("2:8080"))} == {1, 2}
    for bad in ("x", "1:2:3", "1:2,3:4,5:6", ""):
        with pytest.raises(SelectorError, match="expected N, CID:PORT"):
            parse_selector(bad)


def test_follow_by_id_stops_once_the_connection_has_ended() -> None:
    views = _two_connections().views()
    consumed: list[PacketView] = []

    def source() -> Iterator[PacketView]:
        for v in views:
            consumed.append(v)
            yield v

    assert len(list(follow(source(), 1))) == 6
    # it stopped at the both-way SHUTDOWN: the RST and connection 2's last packet were not read
    assert len(consumed) == len(views) - 2


def test_follow_chunk_beside_a_dissecting_tracker_gives_what_follow_gives() -> None:
    views = _two_connections().views()
    for select in (1, 2, parse_selector("2:8080")):
        tracker = StreamTracker()
        match = as_selector(select)
        chunks, stopped_at = [], None
        for i, v in enumerate(views):
            tracker.feed(v)
            chunk = follow_chunk(tracker, v, match)
            if chunk is not None:
                chunks.append(chunk)
            if isinstance(select, int) and stopped_at is None and ended(tracker, select):
                stopped_at = i
        alone = list(follow(views, select))
        assert [(c.conn.id, c.time, c.from_client, c.from_guest, c.data, c.eom) for c in chunks] == [
            (c.conn.id, c.time, c.from_client, c.from_guest, c.data, c.eom) for c in alone
        ]
        assert {c.conn.proto for c in chunks} == {"http"}  # the dissecting tracker names the protocol
        assert {c.conn.proto for c in alone} == {None}
        assert stopped_at == (len(views) - 3 if select == 1 else None)  # connection 1's both-way SHUTDOWN
    assert follow_chunk(StreamTracker(), views[0], as_selector(1)) is None  # a REQUEST carries no payload


# -- cost ---------------------------------------------------------------------------------------------------
def _rw_views(n: int, payload: bytes) -> list[PacketView]:
    a = H.Header(GUEST, HOST, 1080, 5000, len(payload), STREAM, H.Op.RW, 0, 1 << 18, 0)
    b = H.Header(HOST, GUEST, 5000, 1080, len(payload), STREAM, H.Op.RW, 0, 1 << 18, 0)
    return [PacketView(i / 1000, "vm5", i % 2 == 0, a if i % 2 == 0 else b, 4, payload) for i in range(n)]


def test_100k_packets_without_a_dissector_take_well_under_a_second_each_10k() -> None:
    views = _rw_views(100_000, bytes(range(64)))
    tracker = StreamTracker()
    start = time.process_time()
    for v in views:
        tracker.feed(v)
    spent = time.process_time() - start
    # about 1 us per packet on an idle machine; the bound leaves room for a busy CI host
    assert spent < 5.0, f"{spent:.2f} s for 100k packets"
    assert tracker.buffered == 0


def test_feed_returns_the_messages_with_their_fields() -> None:
    cap = Capture()
    cap.connect((GUEST, 1090), (HOST, 1024))
    cap.send((GUEST, 1090), (HOST, 1024), ttrpc_frame(1, 1, b"\x0a\x03svc\x12\x01M"))
    tracker = StreamTracker()
    msgs: list[AppMessage] = []
    for v in cap.views():
        msgs += tracker.feed(v)
    assert [m.proto for m in msgs] == ["ttrpc"]
    assert ("method", "M") in msgs[0].fields
    assert tracker.current is not None and tracker.current.proto == "ttrpc"
    assert tracker.current.describe() == "#1 vm5 5:1090 > 2:1024"
    assert Http1 in registered()


def test_a_packet_a_snaplen_cut_ends_the_dissection_of_its_direction_and_says_what_is_missing() -> None:
    client, server = (GUEST, 40000), (HOST, 8080)
    reqs, resps = sample_http()
    cap = Capture()
    cap.connect(client, server)
    cap.send(client, server, reqs[0][0])
    cap.send(server, client, resps[0][0])
    cap.send(client, server, reqs[1][0])
    cap.send(server, client, resps[1][0])
    cap.close(client, server)
    whole_views = track(cap.views())
    # the server's first answer cut to 10 payload bytes, as a snaplen cuts a record (the header
    # keeps its len: the packet's whole length)
    i = next(n for n, (_, inbound, frame) in enumerate(cap.frames) if not inbound and frame[32 + 30] == H.Op.RW)
    _, inbound, frame = cap.frames[i]
    cap.frames[i] = (0, inbound, frame[: 32 + 44 + 10])
    views = track(cap.views())
    pkt = dissect(next(r for n, r in enumerate(records(io.BytesIO(cap.pcapng()))) if n == i))
    assert pkt.snapped == len(resps[0][0]) - 10 and dissect(records(io.BytesIO(cap.pcapng())).__next__()).snapped == 0
    assert summaries(whole_views) == interleaved(reqs[:2], resps[:2])
    got = summaries(views)
    assert got == [s for s in interleaved(reqs[:2], resps[:2]) if s not in (resps[0][1] + resps[1][1])]
    assert views[i].app == ()  # nothing made up from the cut bytes, and the server's side stays quiet after
