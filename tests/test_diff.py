"""``vsproxy diff A B``: captures compared as transcripts. Each committed capture against itself and
against copies edited to differ in one thing (payload, a SEQPACKET boundary, EOR, a half-close's
flags, a verdict, a missing connection) or only in what must not count (timestamps, the ephemeral
port, how a byte stream was cut into packets, credit packets); bad input exits 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from capture_edit import Packet, edited

from vsproxy.capture.reader import Record
from vsproxy.replay.compare import byte_context, first_byte_difference, first_difference
from vsproxy.replay.transcript import load_transcript
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "captures"
HTTP = CAPTURES / "http-over-vsock.pcapng"
SEQ = CAPTURES / "seqpacket.pcapng"
SIBLING = CAPTURES / "sibling-denied.pcapng"
ALL = sorted(p for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng"))


def diff(a: Path, b: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "diff", *more, str(a), str(b)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_a_capture_is_the_same_as_itself(path: Path) -> None:
    proc = diff(path, path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("same: ") and proc.stderr == ""


def test_different_captures_differ() -> None:
    proc = diff(HTTP, SEQ)
    assert proc.returncode == 1
    assert "only in A: B has no such connection" in proc.stdout


def test_timestamps_ephemeral_ports_packet_cuts_and_credit_packets_do_not_count(tmp_path: Path) -> None:
    guest_port = 2157979543

    def edit(rec: Record, h: H.Header, p: bytes) -> Iterable[Packet]:
        rec = Record(rec.ts + 3600.5, rec.interface, rec.inbound, rec.frame, rec.comment)
        h = h._replace(src_port=4242 if h.src_port == guest_port else h.src_port,
                       dst_port=4242 if h.dst_port == guest_port else h.dst_port)
        if h.op == H.Op.CREDIT_UPDATE:
            return []
        if h.op == H.Op.RW and len(p) > 10:  # the response in three packets
            return [(rec, h, p[:3]), (rec, h, p[3:10]), (rec, h, p[10:])]
        return [(rec, h, p)]

    other = edited(HTTP, tmp_path / "moved.pcapng", edit)
    proc = diff(HTTP, other)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == "same: 1 connection\n"


def test_changed_response_shows_the_first_differing_byte_in_context(tmp_path: Path) -> None:
    other = edited(HTTP, tmp_path / "500.pcapng", lambda r, h, p: [(r, h, p.replace(b"200 OK", b"500 Oh"))])
    proc = diff(HTTP, other)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{HTTP} (A) and {other} (B) differ:",
        "#1 app 5:2157979543 > 2:8080 STREAM http",
        "  peer -> guest: item 1: data differs",
        "    first difference at byte 9 (194 and 194 bytes)",
        '    A: "HTTP/1.1 200 OK\\r\\nServer: keys-dem"...',
        '    B: "HTTP/1.1 500 Oh\\r\\nServer: keys-dem"...',
    ]


def test_seqpacket_message_boundaries_count(tmp_path: Path) -> None:
    def split(rec: Record, h: H.Header, p: bytes) -> Iterable[Packet]:
        if h.op == H.Op.RW and p == b"GET region":  # one message made two, same bytes
            return [(rec, h._replace(flags=H.SEQ_EOM), p[:3]), (rec, h, p[3:])]
        return [(rec, h, p)]

    proc = diff(SEQ, edited(SEQ, tmp_path / "split.pcapng", split))
    assert proc.returncode == 1
    assert "guest -> peer: item 2: data differs" in proc.stdout
    assert '    A: "GET region"' in proc.stdout and '    B: "GET"' in proc.stdout


def test_seqpacket_eor_mark_counts(tmp_path: Path) -> None:
    def no_eor(rec: Record, h: H.Header, p: bytes) -> Iterable[Packet]:
        return [(rec, h._replace(flags=h.flags & ~H.SEQ_EOR) if h.op == H.Op.RW else h, p)]

    proc = diff(SEQ, edited(SEQ, tmp_path / "noeor.pcapng", no_eor))
    assert proc.returncode == 1
    assert '    A: 5 bytes EOM EOR "HELLO"' in proc.stdout and '    B: 5 bytes EOM "HELLO"' in proc.stdout


def test_half_close_flags_count(tmp_path: Path) -> None:
    def both(rec: Record, h: H.Header, p: bytes) -> Iterable[Packet]:
        if h.op == H.Op.SHUTDOWN and h.flags == H.SHUTDOWN_SEND and h.src_cid == 2:
            h = h._replace(flags=H.SHUTDOWN_BOTH)
        return [(rec, h, p)]

    proc = diff(HTTP, edited(HTTP, tmp_path / "both.pcapng", both))
    assert proc.returncode == 1
    assert "A: SHUTDOWN SEND" in proc.stdout and "B: SHUTDOWN RCV|SEND" in proc.stdout


def test_a_denial_that_is_gone_counts(tmp_path: Path) -> None:
    def allowed(rec: Record, h: H.Header, p: bytes) -> Iterable[Packet]:
        return [(Record(rec.ts, rec.interface, rec.inbound, rec.frame, None), h, p)]

    proc = diff(SIBLING, edited(SIBLING, tmp_path / "allowed.pcapng", allowed))
    assert proc.returncode == 1
    assert "outcome differs" in proc.stdout and "A: denied" in proc.stdout and "B: refused" in proc.stdout


def test_all_lists_every_differing_connection(tmp_path: Path) -> None:
    other = edited(SIBLING, tmp_path / "x.pcapng", lambda r, h, p: [(r, h, p.upper())])
    one, every = diff(SIBLING, other), diff(SIBLING, other, "--all")
    assert one.returncode == every.returncode == 1
    assert one.stdout.count("data differs") == 1 and every.stdout.count("data differs") == 2


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a capture\n")
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(HTTP.read_bytes()[:-30])
    for a, b, says in ((tmp_path / "absent", HTTP, "No such file"), (HTTP, text, "not a pcap or pcapng"),
                       (cut, HTTP, "truncated")):
        proc = diff(a, b)
        assert proc.returncode == 2, (a, b, proc.stderr)
        assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and says in proc.stderr
        assert "Traceback" not in proc.stderr
    assert diff(HTTP, HTTP, "--no-such-option").returncode == 2


def test_a_capture_that_lacks_connection_starts_says_so_and_still_compares(tmp_path: Path) -> None:
    late = edited(HTTP, tmp_path / "late.pcapng",
                  lambda r, h, p: [] if h.op in (H.Op.REQUEST, H.Op.RESPONSE) else [(r, h, p)])
    proc = diff(late, late)
    assert proc.returncode == 0
    assert "#1: started before the capture" in proc.stderr
    assert diff(HTTP, late).returncode == 1


def test_byte_helpers() -> None:
    assert first_byte_difference(b"abc", b"abc") is None
    assert first_byte_difference(b"abcdef", b"abcxef") == 3
    assert first_byte_difference(b"abc", b"abcd") == 3
    assert first_byte_difference(b"x" * 100_000 + b"a", b"x" * 100_000 + b"b") == 100_000
    assert byte_context(b"same", b"same") == ()
    assert first_difference(load_transcript(str(HTTP)), load_transcript(str(HTTP))) is None
