"""vsproxy.decode: the decoding pipeline `vsproxy read` prints and a TUI or replay tool reuses.
Records from the captures in captures/, from pcapng bytes built here and from records built by
hand (as a live tap makes them); the filter; follow chunks from the one tracker; application
messages; connections that have ended; opening files, rotated sets and live streams."""

from __future__ import annotations

import gc
import io
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dissectors.app import Http1
from dissectors.streams import SelectorError, StreamTracker, TrackedConnection
from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, Record, records, summary_line
from vsproxy.capture.view import PacketView
from vsproxy.decode import (
    RECENT_CONNECTIONS,
    Decoded,
    Decoder,
    capture_files,
    describe,
    follow_selector,
    open_capture,
    read_captures,
)
from vsproxy.filter import FilterError, compile_filter
from vsproxy.vsock import header as H

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
HTTP = CAPTURES / "http-over-vsock.pcapng"
SIBLING = CAPTURES / "sibling-denied.pcapng"
SEQ = CAPTURES / "seqpacket.pcapng"
ALL_CAPTURES = sorted(p for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng"))

GUEST, HOST = (5, 1024), (2, 8080)
GET = b"GET /v1/keys HTTP/1.1\r\nHost: keys.internal\r\n\r\n"
OK = b"HTTP/1.1 204 No Content\r\n\r\n"


def decode_file(path: Path, decoder: Decoder | None = None) -> list[Decoded]:
    decoder = Decoder() if decoder is None else decoder
    with open_capture(str(path)) as f:
        return [decoder.decode(r) for r in records(f)]


def frame(src: tuple[int, int], dst: tuple[int, int], op: int, payload: bytes = b"", flags: int = 0,
          kind: int = H.Type.STREAM) -> bytes:
    hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), kind, op, flags, 262144, 0)
    return fmt.vsockmon_frame(hdr, payload)


def conversation() -> list[tuple[bool, bytes]]:
    """(from the guest, frame): an HTTP request and response, each side's SHUTDOWN of its
    sending (the second closes the connection), a trailing RST."""
    return [
        (True, frame(GUEST, HOST, H.Op.REQUEST)),
        (False, frame(HOST, GUEST, H.Op.RESPONSE)),
        (True, frame(GUEST, HOST, H.Op.RW, GET[:10])),
        (True, frame(GUEST, HOST, H.Op.RW, GET[10:])),
        (False, frame(HOST, GUEST, H.Op.RW, OK)),
        (True, frame(GUEST, HOST, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)),
        (False, frame(HOST, GUEST, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)),
        (False, frame(HOST, GUEST, H.Op.RST)),
    ]


def pcapng(frames: list[tuple[bool, bytes]], device: str = "vm5", t0: float = 1.0) -> bytes:
    out = fmt.pcapng_shb() + fmt.pcapng_idb(device)
    return out + b"".join(fmt.pcapng_epb(0, t0 + i / 10, f, inbound=g) for i, (g, f) in enumerate(frames))


# --- files and bytes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ALL_CAPTURES, ids=lambda p: p.name)
def test_every_record_of_a_capture_decodes_to_one_packet_with_its_view_and_record(path: Path) -> None:
    with open(path, "rb") as f:
        recs = list(records(f))
    decoder = Decoder()
    decoded = list(decoder.packets(recs))
    assert decoder.count == len(recs) == len(decoded) and not decoder.done
    for d, rec in zip(decoded, recs, strict=True):
        assert d.record is rec and d.packet.record is rec and d.matched and d.chunk is None
        assert (d.view.time, d.view.device, d.view.from_guest, d.view.comment) == (
            rec.ts, rec.interface, rec.inbound, rec.comment)
        assert (d.view.hdr, d.view.payload) == (d.packet.hdr, d.packet.payload)
        assert d.view.app == tuple(m.summary for m in d.messages)
        assert d.conn_id == (d.conn.id if d.conn is not None else None)


def test_the_http_capture_gives_connection_protocol_and_messages_with_their_fields() -> None:
    decoded = decode_file(HTTP)
    assert [(d.view.op_name, d.conn_id, d.view.proto, d.view.app) for d in decoded] == [
        ("request", 1, None, ()),
        ("response", 1, None, ()),
        ("rw", 1, "http", ("HTTP GET /v1/keys",)),
        ("shutdown", 1, "http", ()),
        ("rw", 1, "http", ("HTTP 200 OK",)),
        ("shutdown", 1, "http", ()),
        # after both SHUTDOWNs the tracker has closed #1: its trailing packets still name it
        ("credit_update", 1, None, ()),
        ("shutdown", 1, None, ()),
        ("rst", 1, None, ()),
    ]
    (get,) = decoded[2].messages
    assert get.proto == "http" and ("request", "GET /v1/keys HTTP/1.1") in get.fields
    assert ("host", "keys.internal") in get.fields
    assert decoded[2].conn_text() == "#1 app 5:2157979543 > 2:8080 STREAM http"
    assert {d.conn for d in decoded} == {decoded[0].conn}  # one object for the whole connection


def test_pcapng_bytes_built_here_decode_with_a_message_on_the_packet_carrying_its_last_byte() -> None:
    decoder = Decoder()
    decoded = list(decoder.packets(records(io.BytesIO(pcapng(conversation())))))
    assert [d.view.app for d in decoded] == [(), (), (), ("HTTP GET /v1/keys",), ("HTTP 204 No Content",), (), (), ()]
    # the first 10 bytes did not decide the protocol yet: the packet's own proto is unknown,
    # its connection's (as known now) is http
    assert decoded[2].messages == [] and decoded[2].view.proto is None and decoded[3].view.proto == "http"
    assert decoded[2].conn is not None and decoded[2].conn.proto == "http"
    assert [d.conn_id for d in decoded] == [1] * 8
    assert decoded[-1].conn is decoded[0].conn and decoder.tracker.live == 0  # the RST trails the close
    assert decoded[0].conn_text() == "#1 vm5 5:1024 > 2:8080 STREAM http"


def test_records_built_by_hand_as_a_live_tap_makes_them_decode_one_at_a_time() -> None:
    decoder = Decoder()
    seen = []
    for i, (from_guest, f) in enumerate(conversation()):
        d = decoder.decode(Record(100.0 + i, "tap0", from_guest, f, None))
        seen.append((d.view.device, d.view.from_guest, d.conn_id, d.view.app))
        assert decoder.count == i + 1
    assert seen[3] == ("tap0", True, 1, ("HTTP GET /v1/keys",))
    assert seen[4] == ("tap0", False, 1, ("HTTP 204 No Content",))


def test_a_packet_of_no_known_connection_has_none() -> None:
    decoder = Decoder()
    credit = decoder.decode(Record(1.0, "vm5", True, frame(GUEST, HOST, H.Op.CREDIT_UPDATE), None))
    assert credit.conn is None and credit.conn_id is None and credit.conn_text() is None
    not_virtio = decoder.decode(Record(2.0, "vm5", True, fmt.VSOCKMON.pack(1, 2, 3, 4, 4, 1, 0) + b"zz", None))
    assert not_virtio.view.hdr is None and not_virtio.conn is None and not_virtio.view.payload == b"zz"


def test_a_frame_shorter_than_the_vsockmon_header_raises_capture_error_and_is_counted() -> None:
    decoder = Decoder()
    decoder.decode(Record(1.0, "vm5", True, frame(GUEST, HOST, H.Op.REQUEST), None))
    with pytest.raises(CaptureError, match="shorter than af_vsockmon_hdr"):
        decoder.decode(Record(2.0, "vm5", True, b"\x00" * 8, None))
    assert decoder.count == 2


def test_trailing_packets_of_an_ended_connection_are_named_only_while_it_is_recent() -> None:
    def trailing_ids(recent: int) -> list[int | None]:
        decoder = Decoder(recent=recent)
        return [d.conn_id for d in decoder.packets(records(io.BytesIO(pcapng(conversation()))))][-2:]

    assert RECENT_CONNECTIONS == 4096
    assert trailing_ids(RECENT_CONNECTIONS) == [1, 1]  # the second SHUTDOWN closes it, the RST trails
    assert trailing_ids(0) == [1, None]


def test_decoded_packets_keep_ended_connections_without_their_dissectors() -> None:
    made: weakref.WeakSet[Http1] = weakref.WeakSet()

    class Counted(Http1):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.add(self)

    decoder = Decoder(dissectors=[Counted])
    kept = list(decoder.packets(records(io.BytesIO(pcapng(conversation())))))
    gc.collect()
    assert not made and kept[0].conn is not None and kept[0].conn.proto == "http"  # what it was stays known


def test_the_dissectors_to_choose_from_can_be_given() -> None:
    bare = decode_file(HTTP, Decoder(dissectors=()))
    assert {d.view.proto for d in bare} == {None} and not any(d.messages for d in bare)
    assert [d.conn_id for d in bare] == [d.conn_id for d in decode_file(HTTP)]


# --- the filter -----------------------------------------------------------------------------------------


def test_the_filter_picks_the_packets_but_the_tracker_sees_them_all() -> None:
    decoder = Decoder("app")
    with open(HTTP, "rb") as f:
        shown = list(decoder.packets(records(f)))
    assert decoder.count == 9 and [d.view.app for d in shown] == [("HTTP GET /v1/keys",), ("HTTP 200 OK",)]
    assert [d.matched for d in decode_file(HTTP, Decoder("app"))] == [False, False, True, False, True] + [False] * 4


@pytest.mark.parametrize(
    "given",
    ["verdict == denied", compile_filter("verdict == denied"), compile_filter("verdict == denied").predicate],
    ids=["text", "Filter", "predicate"],
)
def test_the_filter_can_be_text_a_compiled_filter_or_a_predicate(given: object) -> None:
    decoder = Decoder(given)  # type: ignore[arg-type]
    with open(SIBLING, "rb") as f:
        (denied,) = list(decoder.packets(records(f)))
    assert denied.view.verdict == "denied" and denied.view.op_name == "request"


def test_an_empty_filter_is_no_filter_and_a_bad_one_raises_filter_error() -> None:
    assert Decoder("").filter is None and Decoder("  ").filter is None and Decoder().filter is None
    assert Decoder(compile_filter("")).filter is None
    with pytest.raises(FilterError, match=r"unknown field 'src\.cdi'"):
        Decoder("op == rw and src.cdi == 3")


def test_the_filter_sees_the_protocol_and_messages_of_the_packet_it_judges() -> None:
    judged: list[tuple[str | None, tuple[str, ...]]] = []

    def pred(view: PacketView) -> bool:
        judged.append((view.proto, view.app))
        return True

    decode_file(HTTP, Decoder(pred))
    assert judged[2] == ("http", ("HTTP GET /v1/keys",))


# --- following ------------------------------------------------------------------------------------------


def test_follow_chunks_are_the_payload_of_the_selected_connection_from_the_one_tracker() -> None:
    decoded = decode_file(HTTP, Decoder(follow=1))
    chunks = [d.chunk for d in decoded if d.chunk is not None]
    rw = [d.view.payload for d in decoded if d.view.op_name == "rw"]
    assert [c.data for c in chunks] == rw and [c.from_client for c in chunks] == [True, False]
    assert [c.from_guest for c in chunks] == [True, False]
    assert all(c.conn is decoded[0].conn for c in chunks)
    assert chunks[0].conn.proto == "http"  # the dissecting tracker's connection: it knows the protocol
    assert [d.chunk is not None for d in decoded] == [d.view.op_name == "rw" for d in decoded]


def test_follow_chunks_mark_seqpacket_message_ends() -> None:
    decoded = decode_file(SEQ, Decoder(follow=1))
    chunks = [d.chunk for d in decoded if d.chunk is not None]
    assert [(c.data, c.eom) for c in chunks][:2] == [(b"HELLO", True), (b"HELLO from the host", True)]


def test_following_a_connection_id_stops_reading_once_it_has_ended() -> None:
    recs = [Record(float(i), "vm5", g, f, None) for i, (g, f) in enumerate(conversation())]
    read: list[Record] = []

    def source() -> Iterator[Record]:
        for r in recs:
            read.append(r)
            yield r

    decoder = Decoder(follow=1)
    got = [d.chunk for d in decoder.packets(source())]
    assert decoder.done and len(read) == decoder.count == 7  # the RST after both SHUTDOWNs is not read
    assert b"".join(c.data for c in got if c is not None and c.from_client) == GET
    assert list(decoder.packets(recs)) == []  # done: nothing more is read
    everyone = Decoder(follow=follow_selector("all"))
    list(everyone.packets(recs))
    assert not everyone.done and everyone.count == 8


def test_the_filter_and_following_together_pick_the_chunks() -> None:
    shown = list(Decoder("dir == to_guest", follow=follow_selector("all")).packets(
        records(io.BytesIO(pcapng(conversation())))))
    assert [d.chunk.data for d in shown if d.chunk is not None] == [OK]


@pytest.mark.parametrize(
    ("text", "picks"),
    [("all", {1, 2}), ("1", {1}), ("#2", {2}), ("5:1024", {1}), ("2:8080", {1, 2}), ("2:8080,5:1025", {2})],
)
def test_follow_selector_takes_ids_endpoints_and_all(text: str, picks: set[int]) -> None:
    frames = [*conversation()[:5], (True, frame((5, 1025), HOST, H.Op.RW, GET))]
    decoded = list(Decoder(follow=follow_selector(text)).packets(records(io.BytesIO(pcapng(frames)))))
    assert {d.chunk.conn.id for d in decoded if d.chunk is not None} == picks


def test_a_bad_follow_selector_raises_selector_error() -> None:
    for bad in ("", "5:", "x", "1:2,3:4,5:6"):
        with pytest.raises(SelectorError):
            follow_selector(bad)


def test_describe_names_the_connection_and_escapes_its_device() -> None:
    conn = TrackedConnection(7, "vm\n1", (5, 1024), (2, 8080), int(H.Type.SEQPACKET), True)
    assert describe(conn) == "#7 vm\\n1 5:1024 > 2:8080 SEQPACKET"
    conn = TrackedConnection(8, "", (5, 1024), (2, 8080), 9, False)
    assert describe(conn) == "#8 5:1024 > 2:8080 type9"


# --- opening captures -------------------------------------------------------------------------------------


def test_open_capture_reads_a_file_or_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stdin:
        buffer = io.BytesIO(HTTP.read_bytes())

    monkeypatch.setattr("sys.stdin", Stdin)
    assert open_capture("-") is Stdin.buffer
    with open_capture(str(HTTP)) as f:
        assert f.read(4) == Stdin.buffer.read(4)
    with pytest.raises(FileNotFoundError):
        open_capture(str(CAPTURES / "missing.pcapng"))


def test_a_rotated_set_is_found_in_number_order_and_decoded_as_one_capture(tmp_path: Path) -> None:
    frames = conversation()
    base = tmp_path / "cap.pcapng"
    # as vsproxy rotates: each file has its own section header and interfaces; with
    # --pcap-files the first ones are gone
    (tmp_path / "cap.pcapng.2").write_bytes(pcapng(frames[:3], t0=1.0))
    (tmp_path / "cap.pcapng.3").write_bytes(pcapng(frames[3:5], t0=2.0))
    (tmp_path / "cap.pcapng.10").write_bytes(pcapng(frames[5:], t0=3.0))
    (tmp_path / "cap.pcapng.old").write_bytes(b"not part of the set")
    (tmp_path / "cap.pcapng.2x").write_bytes(b"nor this")
    paths = capture_files(str(base))
    assert paths == [str(tmp_path / f"cap.pcapng.{n}") for n in (2, 3, 10)]
    decoded = list(Decoder().packets(read_captures(paths)))
    assert [d.conn_id for d in decoded] == [1] * 8  # one connection across the files
    assert [s for d in decoded for s in d.view.app] == ["HTTP GET /v1/keys", "HTTP 204 No Content"]
    base.write_bytes(pcapng(frames))
    assert capture_files(str(base)) == [str(base)]  # the file itself, when it is there
    assert capture_files("-") == ["-"] and capture_files(str(tmp_path / "none.pcapng")) == []
    assert capture_files(str(tmp_path / "nodir" / "x.pcapng")) == []


def test_a_live_pcapng_stream_is_decoded_record_by_record_as_it_arrives() -> None:
    r, w = os.pipe()
    frames = conversation()
    head = pcapng(frames[:4])
    got: queue.Queue[Decoded | None] = queue.Queue()

    def consume() -> None:
        with os.fdopen(r, "rb") as f:
            for d in Decoder().packets(records(f)):
                got.put(d)
        got.put(None)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        os.write(w, head)  # the writer keeps the stream open: the packets come anyway
        first = [got.get(timeout=10) for _ in range(4)]
        assert [d.view.app for d in first if d is not None][-1] == ("HTTP GET /v1/keys",)
        assert got.empty()
        os.write(w, b"".join(fmt.pcapng_epb(0, 5.0 + i, f, inbound=g) for i, (g, f) in enumerate(frames[4:])))
    finally:
        os.close(w)
    rest = [got.get(timeout=10) for _ in range(5)]
    assert rest[-1] is None and [d.conn_id for d in rest[:-1] if d is not None] == [1] * 4
    reader.join(timeout=10)


def test_vsproxy_reads_one_line_output_is_rebuilt_from_the_decoded_packets(capsys: pytest.CaptureFixture[str]) -> None:
    """What a packet list needs is on the decoded packet: `vsproxy read` prints nothing else."""
    from vsproxy import read

    for path in ALL_CAPTURES:
        lines = [
            summary_line(d.packet, read.app_tail(d.conn_id, d.view.app) if d.view.app else "")
            for d in decode_file(path)
        ]
        assert read.main([str(path)]) == 0
        assert capsys.readouterr().out.splitlines() == lines


def test_vsproxy_read_follow_runs_one_tracker(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import dissectors.streams
    import vsproxy.decode
    from vsproxy import read

    made: list[StreamTracker] = []

    class Counted(StreamTracker):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dissectors.streams, "StreamTracker", Counted)
    monkeypatch.setattr(vsproxy.decode, "StreamTracker", Counted)
    assert read.main(["--follow", "all", str(HTTP)]) == 0
    assert capsys.readouterr().out.startswith("=== #1 app 5:2157979543 > 2:8080 STREAM http ===\n")
    assert len(made) == 1  # the one that dissects also cuts the payload
