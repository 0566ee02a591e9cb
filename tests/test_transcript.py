"""vsproxy.replay.transcript: the per-connection model of a capture that diff, replay and the TUI's
follow view use. The committed captures in captures/, and records built by hand for what those do
not hold: a capture started mid-connection, one that lost packets, a damaged file, a SEQPACKET
message in several packets, a remapped connection, bytes a dissector has no message for."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import Record
from vsproxy.decode import Decoder
from vsproxy.replay.transcript import Data, Outcome, Reset, Shutdown, load_transcript, transcript_of
from vsproxy.verdict import Mark, Verdict
from vsproxy.vsock import header as H

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
GUEST, HOST = (5, 1024), (2, 8080)
REQ = b"GET /v1/keys HTTP/1.1\r\nHost: keys.internal\r\n\r\n"


def rec(src: tuple[int, int], dst: tuple[int, int], op: int, payload: bytes = b"", flags: int = 0,
        kind: int = H.Type.STREAM, fwd_cnt: int = 0, ts: float = 1.0, comment: str | None = None,
        device: str = "app") -> Record:
    hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), kind, op, flags, 262144, fwd_cnt)
    return Record(ts, device, src[0] != 2, fmt.vsockmon_frame(hdr, payload), comment)


def test_http_fixture_is_one_request_and_one_response_with_half_closes_in_order() -> None:
    t = load_transcript(str(CAPTURES / "http-over-vsock.pcapng"))
    assert t.problems() == [] and t.packets == 9
    (c,) = t.conversations
    assert (c.device, c.client[0], c.server, c.type_name, c.proto) == ("app", 5, (2, 8080), "STREAM", "http")
    assert c.guest_is_client is True and c.guest == c.client and c.peer == (2, 8080)
    assert c.outcome is Outcome.ESTABLISHED and c.closed and c.verdict is Verdict.ALLOWED
    kinds = [(type(s).__name__, s.from_client) for s in c.steps]
    assert kinds == [("Data", True), ("Shutdown", True), ("Data", False), ("Shutdown", False), ("Shutdown", True),
                     ("Reset", False)]
    req, resp = c.data(True)[0], c.data(False)[0]
    assert req.data.startswith(b"GET /v1/keys HTTP/1.1\r\n") and req.app == ("HTTP GET /v1/keys",)
    assert resp.data.startswith(b"HTTP/1.1 200 OK\r\n") and resp.app == ("HTTP 200 OK",)
    shut = [s for s in c.steps if isinstance(s, Shutdown)]
    assert [(s.flags, s.flag_names) for s in shut] == [(2, "SEND"), (2, "SEND"), (3, "RCV|SEND")]


def test_seqpacket_fixture_keeps_each_message_with_its_eor_mark() -> None:
    (c,) = load_transcript(str(CAPTURES / "seqpacket.pcapng")).conversations
    assert [(d.data, d.eom, d.eor) for d in c.data(True)] == [
        (b"HELLO", True, True), (b"GET region", True, True), (b"BYE", True, True)]
    assert [(d.data, d.eor) for d in c.data(False)] == [
        (b"HELLO from the host", False), (b"region=eu-west-1", False), (b"BYE", False)]
    # question, answer, question, answer: the order across directions is kept
    assert [s.from_client for s in c.steps if isinstance(s, Data)] == [True, False] * 3


def test_denied_connection_carries_verdict_and_comment_and_sibling_is_seen_on_both_devices() -> None:
    t = load_transcript(str(CAPTURES / "sibling-denied.pcapng"))
    denied, app, vault = t.conversations
    assert denied.outcome is Outcome.DENIED and denied.verdict is Verdict.DENIED
    assert denied.comment is not None and denied.comment.startswith("denied by not in app's outbound allowlist")
    assert denied.steps == [Reset(denied.steps[0].time, False)] and denied.problems() == []
    assert (app.device, vault.device) == ("app", "vault")
    # on vault's interface the guest is the side that was connected to
    assert app.guest_is_client is True and vault.guest_is_client is False and vault.guest == (6, 5001)
    assert app.sent(True) == vault.sent(True) == b"hello vault\n"


def test_refused_connection_and_classic_pcap_without_directions() -> None:
    t = load_transcript(str(CAPTURES / "kernel-vsockmon-loopback.pcap"))
    echo, refused, seq = t.conversations
    assert refused.outcome is Outcome.REFUSED and refused.server == (1, 5999)
    assert echo.guest_is_client is None and echo.guest is None and echo.device == ""
    assert seq.type_name == "SEQPACKET" and seq.data(True)[0].eor


def test_remapped_connection_knows_its_real_peer() -> None:
    mark = Mark.rewritten_to("remap 3=2", 2, 9000)
    t = transcript_of([
        rec(GUEST, (3, 9000), H.Op.REQUEST, comment=mark),
        rec((3, 9000), GUEST, H.Op.RESPONSE),
        rec(GUEST, (3, 9000), H.Op.RW, b"\xb7"),
        rec((3, 9000), GUEST, H.Op.RST),
    ])
    (c,) = t.conversations
    assert c.peer == (3, 9000) and c.real_peer == (2, 9000) and c.verdict is Verdict.ALLOWED
    assert "(real peer 2:9000)" in c.title()


def test_capture_started_mid_connection_says_so() -> None:
    t = transcript_of([
        rec(GUEST, HOST, H.Op.RW, b"tail of a request", fwd_cnt=300),
        rec(HOST, GUEST, H.Op.RW, b"answer", fwd_cnt=999),
        rec(GUEST, HOST, H.Op.RST),
        rec((5, 1025), HOST, H.Op.CREDIT_UPDATE),  # of a connection nothing else of is here
    ])
    (c,) = t.conversations
    assert c.outcome is Outcome.MID_STREAM and not c.seen_start
    assert c.lost == 0  # without the start, fwd_cnt says nothing
    assert t.started_mid and t.orphans == 1
    assert "#1: started before the capture" in t.problems()


def test_lost_packets_show_as_bytes_the_peer_acknowledged_but_the_capture_lacks() -> None:
    t = transcript_of([
        rec(GUEST, HOST, H.Op.REQUEST),
        rec(HOST, GUEST, H.Op.RESPONSE),
        rec(GUEST, HOST, H.Op.RW, b"x" * 100),
        # a 50-byte RW from the guest was dropped from the capture: the host took 150 bytes
        rec(HOST, GUEST, H.Op.CREDIT_UPDATE, fwd_cnt=150),
        rec(GUEST, HOST, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH),
        rec(HOST, GUEST, H.Op.RST),
    ])
    (c,) = t.conversations
    assert c.lost == 50 and t.lost == 50
    assert t.problems() == ["#1: 50 bytes missing from the capture"]


def test_acknowledging_exactly_what_was_sent_is_no_loss() -> None:
    t = transcript_of([
        rec(GUEST, HOST, H.Op.REQUEST),
        rec(HOST, GUEST, H.Op.RESPONSE),
        rec(GUEST, HOST, H.Op.RW, b"x" * 100),
        rec(HOST, GUEST, H.Op.CREDIT_UPDATE, fwd_cnt=100),
    ])
    assert t.lost == 0 and t.ended_early and t.problems() == ["#1: not closed when the capture ended"]


def test_seqpacket_message_in_several_packets_is_one_step_and_a_cut_message_is_flagged() -> None:
    s = H.Type.SEQPACKET
    t = transcript_of([
        rec(GUEST, (2, 5005), H.Op.REQUEST, kind=s),
        rec((2, 5005), GUEST, H.Op.RESPONSE, kind=s),
        rec(GUEST, (2, 5005), H.Op.RW, b"first ", kind=s),
        rec(GUEST, (2, 5005), H.Op.RW, b"half", H.SEQ_EOM | H.SEQ_EOR, kind=s),
        rec(GUEST, (2, 5005), H.Op.RW, b"", H.SEQ_EOM, kind=s),  # an empty message is a message
        rec(GUEST, (2, 5005), H.Op.RW, b"never ends", kind=s),
    ])
    (c,) = t.conversations
    assert [(d.data, d.eom, d.eor, d.packets) for d in c.data(True)] == [
        (b"first half", True, True, 2), (b"", True, False, 1), (b"never ends", False, False, 1)]
    assert c.cut and "#1: the capture ended inside a message" in t.problems()


def test_stream_bytes_without_a_dissector_are_the_chunks_as_they_crossed() -> None:
    t = transcript_of([
        rec(GUEST, (2, 7777), H.Op.REQUEST),
        rec((2, 7777), GUEST, H.Op.RESPONSE),
        rec(GUEST, (2, 7777), H.Op.RW, b"hello "),
        rec((2, 7777), GUEST, H.Op.RW, b"hi"),
        rec(GUEST, (2, 7777), H.Op.RW, b"there "),
        rec(GUEST, (2, 7777), H.Op.RW, b"you"),
    ], Decoder(dissectors=()))  # (ttrpc's detect would take these bytes)
    (c,) = t.conversations
    assert c.proto is None
    assert [(d.from_client, d.data) for d in c.steps if isinstance(d, Data)] == [
        (True, b"hello "), (False, b"hi"), (True, b"there "), (True, b"you")]


def test_http_request_in_two_packets_is_one_message() -> None:
    t = transcript_of([
        rec(GUEST, HOST, H.Op.REQUEST),
        rec(HOST, GUEST, H.Op.RESPONSE),
        rec(GUEST, HOST, H.Op.RW, REQ[:10]),
        rec(GUEST, HOST, H.Op.RW, REQ[10:]),
    ])
    (c,) = t.conversations
    (d,) = c.data(True)
    assert d.data == REQ and d.packets == 2 and d.app == ("HTTP GET /v1/keys",)


def test_damaged_capture_keeps_what_came_before_and_says_where(tmp_path: Path) -> None:
    whole = (CAPTURES / "http-over-vsock.pcapng").read_bytes()
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(whole[: len(whole) - 40])
    t = load_transcript(str(cut))
    assert t.error is not None and "truncated" in t.error
    assert t.conversations and t.problems()[0].startswith("damaged capture: truncated")


def test_not_a_capture_is_an_error_with_nothing_read(tmp_path: Path) -> None:
    bad = tmp_path / "x.pcap"
    bad.write_bytes(b"hello, not a capture at all")
    t = load_transcript(str(bad))
    assert t.error is not None and "not a pcap or pcapng file" in t.error and not t.conversations


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_transcript(str(tmp_path / "absent.pcapng"))


def test_spoofed_packets_make_no_step() -> None:
    from vsproxy.capture.reader import records

    buf = io.BytesIO(fmt.pcapng_shb() + fmt.pcapng_idb("app") + fmt.pcapng_epb(
        0, 1.0, fmt.vsockmon_frame(H.pack(9, 2, 1, 80, 1, 1, H.Op.RW, 0, 0, 0), b"x"), inbound=True,
        comment=Mark.spoofed(9, 5)))
    t = transcript_of(records(buf))
    assert t.spoofed == 1 and not t.conversations


def test_a_transcript_holds_at_most_max_bytes_of_payload_and_says_where_it_stopped() -> None:
    t = load_transcript(str(CAPTURES / "http-over-vsock.pcapng"), max_bytes=100)
    assert t.error is not None and t.error.startswith("more than 100 bytes of payload")
    (c,) = t.conversations
    assert c.sent(True).startswith(b"GET /v1/keys") and c.sent(False) == b""  # the 194-byte answer is not taken
    whole = load_transcript(str(CAPTURES / "http-over-vsock.pcapng"), max_bytes=285)
    assert whole.error is None  # 91 + 194 bytes: exactly the limit


def test_replay_show_prints_the_transcript_and_fails_cleanly(tmp_path: Path) -> None:
    import subprocess
    import sys

    def show(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vsproxy", "replay", "show", *args], capture_output=True,
                              text=True, timeout=60, cwd=CAPTURES.parent)

    seq = show("--data", "captures/seqpacket.pcapng")
    assert seq.returncode == 0
    assert seq.stdout.splitlines()[1:5] == [">>> +0.021412s 5 bytes EOM EOR", "    HELLO",
                                            "<<< +0.021821s 19 bytes EOM", "    HELLO from the host"]
    vault = show("captures/sibling-denied.pcapng", "--filter", "device == vault")
    assert vault.stdout.splitlines()[:2] == ["=== #3 vault 5:2400453638 > 6:5001 STREAM ===",
                                             "    (the peer connected to the guest: >>> is the peer)"]
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes((CAPTURES / "http-over-vsock.pcapng").read_bytes()[:-30])
    damaged = show(str(cut))
    assert damaged.returncode == 1 and "HTTP GET /v1/keys" in damaged.stdout
    assert "truncated" in damaged.stderr and "Traceback" not in damaged.stderr
    assert show(str(tmp_path / "absent")).returncode == 2
    assert show("captures/seqpacket.pcapng", "--filter", "port = 1").returncode == 2


def test_a_live_builder_shows_steps_as_they_complete_and_what_is_still_arriving() -> None:
    from vsproxy.replay.transcript import TranscriptBuilder

    dec, b = Decoder(), TranscriptBuilder()
    for r in (rec(GUEST, HOST, H.Op.REQUEST), rec(HOST, GUEST, H.Op.RESPONSE, ts=1.5),
              rec(GUEST, HOST, H.Op.RW, REQ[:10], ts=2.0)):
        b.feed(dec.decode(r))
    (c,) = b.transcript.conversations
    assert c.steps == [] and c.outcome is Outcome.ESTABLISHED
    (partial,) = b.pending(c.id)
    assert (partial.data, partial.from_client, partial.eom) == (REQ[:10], True, False)
    b.feed(dec.decode(rec(GUEST, HOST, H.Op.RW, REQ[10:], ts=3.0)))
    assert [s.data for s in c.steps if isinstance(s, Data)] == [REQ] and b.pending(c.id) == []
    assert b.pending(99) == []


def test_records_a_snaplen_cut_say_how_many_bytes_are_missing_and_are_not_counted_lost_twice() -> None:
    def snapped(src: tuple[int, int], dst: tuple[int, int], payload: bytes, keep: int, fwd_cnt: int = 0) -> Record:
        hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), H.Type.STREAM, H.Op.RW, 0, 262144, fwd_cnt)
        return Record(1.0, "app", src[0] != 2, fmt.vsockmon_frame(hdr, payload[:keep]), None)

    t = transcript_of([
        rec(GUEST, HOST, H.Op.REQUEST),
        rec(HOST, GUEST, H.Op.RESPONSE),
        snapped(GUEST, HOST, REQ, 16),  # the record keeps 16 of the request's bytes
        rec(HOST, GUEST, H.Op.CREDIT_UPDATE, fwd_cnt=len(REQ)),  # the host took them all
        rec(GUEST, HOST, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH),
        rec(HOST, GUEST, H.Op.RST),
    ])
    (c,) = t.conversations
    cut = len(REQ) - 16
    assert c.snapped == cut and c.lost == cut  # a replay leaves it alone (it checks lost)
    assert c.sent(True) == REQ[:16]
    assert t.problems() == [f"#1: {cut} bytes cut by a snaplen (the records keep only each packet's first bytes)"]
