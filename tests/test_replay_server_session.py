"""Server replay without sockets: a ServerSession over the committed captures, guest bytes in,
actions out (vsproxy/replay/server.py), and the matching options (vsproxy/replay/match.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsproxy.replay.match import MatchError, Matching, Result
from vsproxy.replay.server import EndStream, Forward, ReplayBook, ResetConn, Send, host_ports, scripts_of
from vsproxy.replay.transcript import load_transcript
from vsproxy.vsock import header as H

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
HTTP = load_transcript(str(CAPTURES / "http-over-vsock.pcapng"))
SEQ = load_transcript(str(CAPTURES / "seqpacket.pcapng"))
NITRO = load_transcript(str(CAPTURES / "nitro-heartbeat.pcapng"))
STREAM, SEQPACKET = int(H.Type.STREAM), int(H.Type.SEQPACKET)
REQUEST = HTTP.conversations[0].sent(True)
RESPONSE = HTTP.conversations[0].sent(False)


def book(t: object = HTTP, **kw: object) -> ReplayBook:
    from vsproxy.replay.transcript import Transcript

    assert isinstance(t, Transcript)
    return ReplayBook(scripts_of(t), **kw)  # type: ignore[arg-type]


def test_http_request_in_pieces_gets_the_recorded_response_and_end_of_stream() -> None:
    b = book()
    s = b.session(8080, STREAM)
    assert s.opened() == []
    assert s.received(REQUEST[:20]) == []  # could still become the recorded request
    assert s.received(REQUEST[20:]) == [Send(RESPONSE)]  # the answer at once, as soon as it matches
    assert s.shut() == [EndStream()]  # the recorded server closed after the guest's half-close
    assert b.counters.text() == "matched=1 unmatched=0 exhausted=0"


def test_heartbeat_end_of_stream_waits_for_the_guests_half_close() -> None:
    b = book(NITRO)
    s = b.session(9000, STREAM)
    assert s.received(b"\xb7") == [Send(b"\xb7")]  # the recorded server closed after its client did
    assert s.shut() == [EndStream()]


def test_seqpacket_messages_answered_one_by_one_with_boundaries() -> None:
    b = book(SEQ)
    s = b.session(5005, SEQPACKET)
    assert s.received(b"HELLO", eor=True) == [Send(b"HELLO from the host", False)]
    assert s.received(b"GET region", eor=True) == [Send(b"region=eu-west-1", False)]
    assert s.received(b"BYE", eor=True) == [Send(b"BYE", False)]
    assert b.counters.matched == 3


def test_seqpacket_message_must_match_whole() -> None:
    b = book(SEQ)
    s = b.session(5005, SEQPACKET)
    assert s.received(b"HELLO")  # matched
    # the same bytes as the next recorded message plus more: one message, so no match
    (act,) = s.received(b"GET region!")
    assert isinstance(act, ResetConn) and "recorded message 2" in act.reason
    assert b.counters.unmatched == 1


def test_unmatched_first_message_resets_and_is_counted() -> None:
    b = book()
    s = b.session(8080, STREAM)
    (act,) = s.received(b"POST /other HTTP/1.1\r\n\r\n")
    assert isinstance(act, ResetConn) and "matches no recorded connection" in act.reason
    assert s.received(REQUEST) == []  # over: nothing more is played
    assert b.counters.text() == "matched=0 unmatched=1 exhausted=0"


def test_a_port_the_capture_lacks_is_unmatched() -> None:
    b = book()
    (act,) = b.session(9999, STREAM).received(b"x")
    assert isinstance(act, ResetConn) and "no connection to port 9999" in act.reason


def test_a_recorded_connection_is_used_once_unless_reused() -> None:
    b = book()
    assert b.session(8080, STREAM).received(REQUEST)[0] == Send(RESPONSE)
    (act,) = b.session(8080, STREAM).received(REQUEST)
    assert isinstance(act, ResetConn) and "was used" in act.reason
    assert b.counters.text() == "matched=1 unmatched=0 exhausted=1"
    again = book(reuse=True)
    for _ in range(3):
        assert again.session(8080, STREAM).received(REQUEST)[0] == Send(RESPONSE)
    assert again.counters.matched == 3


def test_forward_mode_hands_over_the_guests_bytes() -> None:
    b = book(forward=True)
    (act,) = b.session(8080, STREAM).received(b"GET /elsewhere HTTP/1.1\r\n\r\n")
    assert isinstance(act, Forward) and act.pending == (b"GET /elsewhere HTTP/1.1\r\n\r\n",)


def test_http_matching_ignores_named_headers_only() -> None:
    changed = REQUEST.replace(b"Accept: application/json", b"Accept: text/plain")
    assert isinstance(book().session(8080, STREAM).received(changed)[0], ResetConn)
    assert isinstance(book(matching=Matching("http")).session(8080, STREAM).received(changed)[0], ResetConn)
    m = Matching.parse("http", ("Accept",))
    assert book(matching=m).session(8080, STREAM).received(changed)[0] == Send(RESPONSE)
    other_path = changed.replace(b"/v1/keys", b"/v1/kez")
    assert isinstance(book(matching=m).session(8080, STREAM).received(other_path)[0], ResetConn)


def test_prefix_matching_compares_the_first_bytes_and_takes_the_recorded_length() -> None:
    m = Matching.parse("prefix:12")
    assert m.check(b"GET /v1/keys", b"GET /v1/keys HTTP", False).result is Result.WAIT
    assert m.check(b"GET /v1/keys XXXX", b"GET /v1/keys HTTP", False).used == 17
    assert m.check(b"GET /v2", b"GET /v1/keys HTTP", False).result is Result.NO
    tail_differs = REQUEST[:-6] + b"zz\r\n\r\n"
    assert book(matching=m).session(8080, STREAM).received(tail_differs)[0] == Send(RESPONSE)


def test_bad_matching_option() -> None:
    for bad in ("fuzzy", "prefix:", "prefix:0", "prefix:x"):
        with pytest.raises(MatchError):
            Matching.parse(bad)


def test_guest_half_close_completes_a_stream_message_in_prefix_mode() -> None:
    b = book(matching=Matching.parse("prefix:4"))
    s = b.session(8080, STREAM)
    assert s.received(REQUEST[:30]) == []
    assert s.shut()[0] == Send(RESPONSE)


def test_host_ports_are_the_peers_the_guests_dialled_not_siblings() -> None:
    assert host_ports(HTTP) == [(2, 8080)]
    assert host_ports(NITRO) == [(3, 9000)]
    assert host_ports(load_transcript(str(CAPTURES / "sibling-denied.pcapng"))) == []
