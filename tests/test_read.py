"""`vsproxy read`: captures written by vsproxy (pcap and pcapng) and by hand-built vsockmon
files read back; damaged files end in a one-line error. Then the command over the real captures
in captures/: one-line summaries with the connection and application messages, filters, -V,
--follow, -c, --json, plugin dissectors, errors, and the README's examples run as written."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsproxy import read
from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, Packet, dissect, records, summary_line
from vsproxy.vsock import header as H

REQ = H.pack(5, 2, 1024, 9000, 0, 1, H.Op.REQUEST, 0, 262144, 0)
RW = H.pack(5, 2, 1024, 9000, 1, 1, H.Op.RW, 0, 262144, 0)
RST = H.pack(2, 5, 9000, 1024, 0, 1, H.Op.RST, 0, 0, 0)


def pcapng_file() -> bytes:
    out = fmt.pcapng_shb() + fmt.pcapng_idb("enclave1")
    out += fmt.pcapng_epb(0, 1.5, fmt.vsockmon_frame(REQ, b""), inbound=True)
    out += fmt.pcapng_epb(0, 1.6, fmt.vsockmon_frame(RW, b"\xb7"), inbound=True)
    out += fmt.pcapng_epb(0, 1.7, fmt.vsockmon_frame(RST, b""), inbound=False, comment="denied by test")
    return out


def pcap_file() -> bytes:
    return fmt.pcap_header() + b"".join(
        fmt.pcap_record(t, fmt.vsockmon_frame(h, p)) for t, h, p in ((1.5, REQ, b""), (1.6, RW, b"\xb7"))
    )


def test_pcapng_records_keep_interface_direction_comment_and_time() -> None:
    recs = list(records(io.BytesIO(pcapng_file())))
    assert [(r.interface, r.inbound, r.comment) for r in recs] == [
        ("enclave1", True, None),
        ("enclave1", True, None),
        ("enclave1", False, "denied by test"),
    ]
    assert recs[1].ts == pytest.approx(1.6)
    p = dissect(recs[1])
    assert p.hdr is not None and p.hdr.op == H.Op.RW and p.payload == b"\xb7"
    assert summary_line(p) == ("00:00:01.600000 enclave1 5:1024 > 2:9000 RW len=1 buf_alloc=262144 fwd_cnt=0")
    assert summary_line(dissect(recs[2])).endswith("  [denied by test]")


def test_classic_pcap_in_both_byte_orders() -> None:
    little = pcap_file()
    assert [dissect(r).hdr.op for r in records(io.BytesIO(little))] == [H.Op.REQUEST, H.Op.RW]  # type: ignore[union-attr]
    # big-endian file header and record headers, as a big-endian capturer writes them
    big = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 271)
    frame = fmt.vsockmon_frame(RW, b"\xb7")
    big += struct.pack(">IIII", 7, 0, len(frame), len(frame)) + frame
    (rec,) = list(records(io.BytesIO(big)))
    assert rec.ts == 7 and dissect(rec).payload == b"\xb7"


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage!", pcap_file()[:30], pcapng_file()[:-3], fmt.pcap_header()[:-4] + struct.pack("<I", 1)],
    ids=["empty", "garbage", "cut-record", "cut-block", "ethernet"],
)
def test_damaged_files_raise_capture_error(data: bytes) -> None:
    with pytest.raises(CaptureError):
        for r in records(io.BytesIO(data)):
            dissect(r)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400))
def test_random_corruption_never_escapes_as_anything_but_capture_error(noise: bytes, at: int) -> None:
    data = bytearray(pcapng_file())
    data[at : at + len(noise)] = noise
    try:
        for r in records(io.BytesIO(bytes(data))):
            summary_line(dissect(r))
    except CaptureError:
        pass


def test_vsproxy_read_prints_one_line_per_packet_and_json(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "c.pcapng")
    with open(path, "wb") as f:
        f.write(pcapng_file())
    p = subprocess.run([sys.executable, "-m", "vsproxy", "read", path], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 3
    assert "5:1024 > 2:9000 REQUEST" in p.stdout
    j = subprocess.run(
        [sys.executable, "-m", "vsproxy", "read", "--json", path], capture_output=True, text=True, timeout=30
    )
    objs = [json.loads(line) for line in j.stdout.splitlines()]
    assert [o["op"] for o in objs] == ["REQUEST", "RW", "RST"] and objs[2]["comment"] == "denied by test"
    with open(path, "r+b") as f:
        f.truncate(len(pcapng_file()) - 5)
    bad = subprocess.run([sys.executable, "-m", "vsproxy", "read", path], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "truncated" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stdout.splitlines()) == 2  # what could be read was printed


# --- vsproxy read over the real captures ------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "captures"
HTTP = CAPTURES / "http-over-vsock.pcapng"
NITRO = CAPTURES / "nitro-heartbeat.pcapng"
SIBLING = CAPTURES / "sibling-denied.pcapng"
SEQ = CAPTURES / "seqpacket.pcapng"
KERNEL = CAPTURES / "kernel-vsockmon-loopback.pcap"
DENIAL = "denied by not in app's outbound allowlist; vsproxy answers RST"


class Result(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """``vsproxy read ARGS`` in this process (fast); plugins are only loaded in subprocesses,
    since the registry is process-wide."""

    def go(*args: object) -> Result:
        code = read.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return go


def cli(*args: object, env: dict[str, str] | None = None, stdin: bytes | None = None) -> Result:
    """``python -m vsproxy read ARGS`` from the repository root, as a user runs it."""
    p = subprocess.run(
        [sys.executable, "-m", "vsproxy", "read", *map(str, args)],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    return Result(p.returncode, p.stdout.decode(), p.stderr.decode())


def packets(path: Path) -> list[Packet]:
    with open(path, "rb") as f:
        return [dissect(r) for r in records(f)]


def rw_payloads(path: Path) -> list[tuple[int, bytes, int]]:
    """(source CID, payload, flags) of every RW packet, in capture order."""
    return [(p.hdr.src_cid, p.payload, p.hdr.flags) for p in packets(path) if p.hdr and p.hdr.op == H.Op.RW]


# The application tails one-line mode adds, by packet index; every other line is the reader's
# summary line unchanged (and so are the kernel capture's, whose test pins that format).
TAILS = {
    HTTP: {2: "  #1 HTTP GET /v1/keys", 4: "  #1 HTTP 200 OK"},
    NITRO: {2: "  #1 Nitro heartbeat 0xB7", 3: "  #1 Nitro heartbeat 0xB7"},
    SEQ: {},
    SIBLING: {},
    KERNEL: {},
}


@pytest.mark.parametrize("path", list(TAILS), ids=lambda p: p.name)
def test_one_line_mode_adds_connection_and_app_summaries_to_the_packets_that_end_messages(
    run: Callable[..., Result], path: Path
) -> None:
    r = run(path)
    assert (r.code, r.err) == (0, "")
    assert r.out.splitlines() == [summary_line(p, TAILS[path].get(i, "")) for i, p in enumerate(packets(path))]


def test_the_denied_request_keeps_its_comment_last_and_verdict_filter_finds_only_it(run: Callable[..., Result]) -> None:
    r = run(SIBLING, "verdict", "==", "denied")
    (line,) = r.out.splitlines()
    assert " app 5:" in line and " > 6:5002 REQUEST " in line and line.endswith(f"  [{DENIAL}]")
    assert run(SIBLING, "verdict == allowed").out.count("\n") == len(packets(SIBLING)) - 1


@pytest.mark.parametrize(
    ("path", "words", "expect"),
    [
        (HTTP, ["port", "==", "8080", "and", "op", "==", "rw"], ["RW len=91", "RW len=194"]),
        (HTTP, ['payload contains "keys.internal"'], ["RW len=91"]),
        (HTTP, ["proto == http and not app"], ["SHUTDOWN", "SHUTDOWN"]),
        (HTTP, ['app matches r"^HTTP [0-9]{3} "'], ["HTTP 200 OK"]),
        (NITRO, ["payload == 0xb7 and dir == to_guest"], ["3:9000 > 16:"]),
        (SEQ, ["op == rw and flags == 3"], ["len=5 ", "len=10 ", "len=3 "]),
        (SEQ, ["op == rw && !(src.cid == 5)"], ["len=19 ", "len=16 ", "len=3 "]),
        (SIBLING, ["device == vault or verdict == denied and op == request"], ["6:5002 REQUEST"] + ["vault"] * 9),
        (KERNEL, ["type == seqpacket and op == rst"], ["RST SEQPACKET", "RST SEQPACKET"]),
        (KERNEL, ['payload contains "hello"'], ["1:5000 RW", "1:5000 > 1:"]),
        (KERNEL, ["dir"], []),  # classic pcap: no direction, so "direction known" matches nothing
        (KERNEL, ['device == "" and dir == unknown and port == 5999'], ["REQUEST", "RST"]),
    ],
)
def test_filters_select_packets(run: Callable[..., Result], path: Path, words: list[str], expect: list[str]) -> None:
    r = run(path, *words)
    assert (r.code, r.err) == (0, "")
    lines = r.out.splitlines()
    assert len(lines) == len(expect), lines
    for line, part in zip(lines, expect, strict=True):
        assert part in line, (part, line)


def test_a_bad_filter_is_one_message_and_a_caret_under_the_token_exit_2(run: Callable[..., Result]) -> None:
    r = run(HTTP, "op == rw and", "src.cdi == 3")
    assert (r.code, r.out) == (2, "")
    assert r.err.splitlines() == [
        "vsproxy read: bad filter: unknown field 'src.cdi' (column 13)",
        "op == rw and src.cdi == 3",
        "             ^^^^^^^",
    ]


def test_dash_c_stops_after_n_printed_packets(run: Callable[..., Result]) -> None:
    assert run("-c", 3, KERNEL).out.splitlines() == [summary_line(p) for p in packets(KERNEL)[:3]]
    (line,) = run(HTTP, "-c", "1", "op == rw").out.splitlines()
    assert line.endswith("  #1 HTTP GET /v1/keys")


def test_json_adds_connection_protocol_and_app_summaries(run: Callable[..., Result]) -> None:
    objs = [json.loads(line) for line in run("--json", HTTP).out.splitlines()]
    assert [(o["op"], o["conn"], o["proto"], o["app"]) for o in objs] == [
        ("REQUEST", 1, None, []),
        ("RESPONSE", 1, None, []),
        ("RW", 1, "http", ["HTTP GET /v1/keys"]),
        ("SHUTDOWN", 1, "http", []),
        ("RW", 1, "http", ["HTTP 200 OK"]),
        ("SHUTDOWN", 1, "http", []),
        # after both SHUTDOWNs the tracker has closed #1; its trailing packets still name it
        ("CREDIT_UPDATE", 1, None, []),
        ("SHUTDOWN", 1, None, []),
        ("RST", 1, None, []),
    ]
    assert objs[2]["device"] == "app" and objs[2]["from_guest"] is True and objs[2]["payload_len"] == 91
    kernel = [json.loads(line) for line in run("--json", KERNEL).out.splitlines()]
    assert [o["conn"] for o in kernel] == [1] * 10 + [2] * 2 + [3] * 9
    assert {(o["device"], o["from_guest"], o["proto"]) for o in kernel} == {(None, None, None)}


# --- -V ---------------------------------------------------------------------------------------------


def verbose_blocks(text: str) -> list[list[str]]:
    """-V output split per packet (a blank line ends each)."""
    assert text.endswith("\n\n")
    return [block.splitlines() for block in text[:-2].split("\n\n")]


def test_verbose_shows_the_frame_scapy_header_fields_app_fields_and_payload(run: Callable[..., Result]) -> None:
    r = run("-V", HTTP, "app")
    get, ok = verbose_blocks(r.out)
    assert get[0] == summary_line(packets(HTTP)[2], "  #1 HTTP GET /v1/keys")
    for line in [
        "    frame",
        "        interface  = app",
        "        direction  = from the guest (inbound)",
        "        length     = 167 bytes",
        "        connection = #1 app 5:2157979543 > 2:8080 STREAM http",
        "    vsockmon (af_vsockmon_hdr)",
        "        op        = PAYLOAD (4)",
        "        transport = VIRTIO (2)",
        "        len       = 44",
        "    virtio-vsock (virtio_vsock_hdr)",
        "        src_port  = 2157979543",
        "        len       = 91",
        "        type      = STREAM (1)",
        "        op        = RW (5)",
        "        flags     = 0",
        "    HTTP GET /v1/keys",
        "        request: GET /v1/keys HTTP/1.1",
        "        host: keys.internal",
        "    payload (91 bytes)",
        "        0000  47 45 54 20 2f 76 31 2f  6b 65 79 73 20 48 54 54  |GET /v1/keys HTT|",
        "        0050  3a 20 63 6c 6f 73 65 0d  0a 0d 0a                 |: close....|",
    ]:
        assert line in get, line
    assert "        status: HTTP/1.1 200 OK" in ok and "        content-length: 63" in ok
    assert (
        get.index("    vsockmon (af_vsockmon_hdr)")
        < get.index("    HTTP GET /v1/keys")
        < get.index("    payload (91 bytes)")
    )


def test_verbose_decodes_seqpacket_and_shutdown_flags_by_op(run: Callable[..., Result]) -> None:
    blocks = verbose_blocks(run("-V", SEQ, "op in {rw, shutdown} and src.cid == 5").out)
    assert len(blocks) == 4
    for block in blocks[:3]:
        assert "        type      = SEQPACKET (2)" in block and "        flags     = EOM+EOR (3)" in block
    assert "        op        = SHUTDOWN (4)" in blocks[3] and "        flags     = RCV+SEND (3)" in blocks[3]
    assert "        op        = DISCONNECT (2)" in blocks[3]  # the vsockmon op of a SHUTDOWN


def test_verbose_shows_the_comment_and_classic_pcap_unknowns(run: Callable[..., Result]) -> None:
    (denied,) = verbose_blocks(run("-V", SIBLING, "verdict == denied").out)
    assert f"        comment    = {DENIAL}" in denied
    assert "        connection = #1 app 5:2400453637 > 6:5002 STREAM" in denied
    kernel = verbose_blocks(run("-V", "-c", 1, KERNEL).out)[0]
    assert "        interface  = (not in the file)" in kernel
    assert "        direction  = unknown (not in the file)" in kernel
    assert "        op        = REQUEST (1)" in kernel and "        op        = CONNECT (1)" in kernel


def test_verbose_payload_dump_is_bounded(run: Callable[..., Result], tmp_path: Path) -> None:
    path = tmp_path / "big.pcapng"
    data = bytes(range(256)) + b"x" * 44
    hdr = H.pack(5, 2, 1024, 9000, len(data), 1, H.Op.RW, 0, 262144, 0)
    frame = fmt.vsockmon_frame(hdr, data)
    path.write_bytes(fmt.pcapng_shb() + fmt.pcapng_idb("vm") + fmt.pcapng_epb(0, 1.0, frame, inbound=True))
    (block,) = verbose_blocks(run("-V", path).out)
    assert "    payload (300 bytes)" in block and block[-1] == "        ... 44 more bytes"
    assert block[-2] == "        00f0  f0 f1 f2 f3 f4 f5 f6 f7  f8 f9 fa fb fc fd fe ff  |................|"


# --- --follow ---------------------------------------------------------------------------------------


class Chunk(NamedTuple):
    head: str  # the ">>> ..." line
    data: bytes


class Followed(NamedTuple):
    header: str  # the "=== ... ===" line
    notes: list[str]  # the indented lines under it (before its first step)
    steps: list[Chunk]


def parse_follow(text: str) -> list[Followed]:
    """Follow output back into (connection header, notes, steps); the payload text is unescaped.
    Notes are the lines between a header and its first step; bytes are the lines after a step."""
    conns: list[Followed] = []
    body: list[str] = []

    def close() -> None:
        if body:
            head = conns[-1].steps.pop()
            conns[-1].steps.append(Chunk(head.head, codecs.escape_decode("".join(body).encode())[0]))
            body.clear()

    for line in text.splitlines():
        if line.startswith("=== "):
            close()
            conns.append(Followed(line, [], []))
        elif line.startswith((">>> ", "<<< ")):
            close()
            conns[-1].steps.append(Chunk(line, b""))
        elif not conns[-1].steps:
            conns[-1].notes.append(line)
        else:
            body.append(line)
    close()
    return conns


def test_follow_prints_the_connection_with_directions_messages_half_closes_and_the_exact_bytes(
        run: Callable[..., Result]) -> None:
    r = run("--follow", "1", HTTP)
    assert (r.code, r.err) == (0, "")
    ((header, notes, chunks),) = parse_follow(r.out)
    assert header == "=== #1 app 5:2157979543 > 2:8080 STREAM http ===" and notes == []
    assert [c.head for c in chunks] == [
        ">>> guest -> host 91 bytes  HTTP GET /v1/keys",
        ">>> guest -> host SHUTDOWN SEND (the guest sends no more)",
        "<<< host -> guest 194 bytes  HTTP 200 OK",
        "<<< host -> guest SHUTDOWN SEND (the host sends no more)",
        ">>> guest -> host SHUTDOWN RCV|SEND (the guest sends and receives no more)",
        "<<< host -> guest RST",
    ]
    assert [c.data for c in chunks if c.data] == [p for _, p, _ in rw_payloads(HTTP)]
    assert "GET /v1/keys HTTP/1.1\\r\\n\nHost: keys.internal\\r\\n\n" in r.out  # text, one line per \n


def test_follow_shows_seqpacket_message_marks(run: Callable[..., Result]) -> None:
    ((header, _, chunks),) = parse_follow(run("--follow", "#1", SEQ).out)
    assert header == "=== #1 app 5:2571319154 > 2:5005 SEQPACKET ==="
    assert [(c.head, c.data) for c in chunks] == [
        (">>> guest -> host 5 bytes EOM EOR", b"HELLO"),
        ("<<< host -> guest 19 bytes EOM", b"HELLO from the host"),
        (">>> guest -> host 10 bytes EOM EOR", b"GET region"),
        ("<<< host -> guest 16 bytes EOM", b"region=eu-west-1"),
        (">>> guest -> host 3 bytes EOM EOR", b"BYE"),
        ("<<< host -> guest 3 bytes EOM", b"BYE"),
        (">>> guest -> host SHUTDOWN RCV|SEND (the guest sends and receives no more)", b""),
        ("<<< host -> guest RST", b""),
    ]


def test_follow_all_on_the_kernel_capture_says_client_and_server_and_shows_the_refusal(
        run: Callable[..., Result]) -> None:
    conns = parse_follow(run("--follow", "all", KERNEL).out)
    assert [h for h, _, _ in conns] == [
        "=== #1 1:2165647820 > 1:5000 STREAM ===",
        "=== #2 1:2165647821 > 1:5999 STREAM [refused] ===",
        "=== #3 1:2165647822 > 1:5001 SEQPACKET ===",
    ]
    assert [(c.head, c.data) for _, _, chunks in conns for c in chunks if c.data] == [
        (">>> client -> server 11 bytes", b"hello vsock"),
        ("<<< server -> client 11 bytes", b"hello vsock"),
        (">>> client -> server 21 bytes EOM EOR", b"one seqpacket message"),
        ("<<< server -> client 21 bytes EOM EOR", b"one seqpacket message"),
    ]
    assert [c.head for c in conns[1].steps] == ["<<< server -> client RST"]  # nothing listened on 5999


def test_follow_by_endpoint_shows_both_devices_with_a_header_at_each_switch(run: Callable[..., Result]) -> None:
    conns = parse_follow(run("--follow", "5:2400453638", SIBLING).out)
    # the steps of #2 (app's interface) and #3 (vault's) interleave in capture order
    assert [h.split()[1] for h, _, _ in conns] == ["#2", "#3", "#2", "#3"]
    assert {c.data for _, _, chunks in conns for c in chunks if c.data} == {b"hello vault\n"}
    vault = parse_follow(run("--follow", "6:5001,5:2400453638", SIBLING, "device == vault").out)
    assert [h for h, _, _ in vault] == ["=== #3 vault 5:2400453638 > 6:5001 STREAM ==="]
    assert [c.head for c in vault[0].steps if c.data] == [">>> host -> guest 12 bytes", "<<< guest -> host 12 bytes"]


def test_follow_of_a_denied_connection_names_the_rule(run: Callable[..., Result]) -> None:
    (denied,) = parse_follow(run("--follow", "1", SIBLING).out)
    assert denied.header == "=== #1 app 5:2400453637 > 6:5002 STREAM [denied] ==="
    assert denied.notes == ["    [denied by not in app's outbound allowlist; vsproxy answers RST]"]
    assert [c.head for c in denied.steps] == ["<<< host -> guest RST"]


def test_follow_of_the_heartbeat_escapes_the_byte_and_c_counts_data(run: Callable[..., Result]) -> None:
    r = run("--follow", "all", "-c", 1, NITRO)
    assert r.out == ("=== #1 enclave 16:2431434711 > 3:9000 STREAM nitro ===\n"
                     ">>> guest -> host 1 byte  Nitro heartbeat 0xB7\n\\xb7\n")


def test_follow_hex_dumps_the_payload(run: Callable[..., Result]) -> None:
    r = run("--follow", 1, "--hex", HTTP)
    rows = [line for line in r.out.splitlines() if line[:8].isdigit() or line.startswith("000000")]
    assert rows[0] == "00000000  47 45 54 20 2f 76 31 2f  6b 65 79 73 20 48 54 54  |GET /v1/keys HTT|"
    dumped = b"".join(bytes.fromhex(row[10:58].replace("  ", " ")) for row in rows)
    assert dumped == b"".join(p for _, p, _ in rw_payloads(HTTP))


def test_follow_of_nothing_or_with_a_bad_selector(run: Callable[..., Result]) -> None:
    r = run("--follow", 9, KERNEL)  # there are three connections
    assert (r.code, r.out, r.err) == (0, "", "vsproxy read: --follow 9: nothing to show\n")
    bad = run("--follow", "5:", KERNEL)
    assert bad.code == 2 and bad.out == ""
    assert bad.err.startswith("vsproxy read: --follow: bad connection selector '5:'") and bad.err.count("\n") == 1
    assert run("--hex", KERNEL).err == "vsproxy read: --hex goes with --follow\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_follow_text_reads_back_as_the_exact_bytes(data: bytes) -> None:
    text = read.escaped(data)
    assert text.endswith("\n") and all(c == "\n" or 0x20 <= ord(c) < 0x7F for c in text)
    assert codecs.escape_decode("".join(text.split("\n")).encode())[0] == data


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.lists(st.text(max_size=300), max_size=8))
def test_app_tail_is_one_bounded_printable_line(conn: int, summaries: list[str]) -> None:
    tail = read.app_tail(conn, tuple(summaries))
    assert tail.startswith(f"  #{conn} ") and tail.isprintable()
    assert len(tail) <= 4 + len(str(conn)) + 3 * (4 * read.MAX_SUMMARY + 2) + 12
    if len(summaries) > read.MAX_SUMMARIES:
        assert tail.endswith(f"; +{len(summaries) - read.MAX_SUMMARIES} more")


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([HTTP, SEQ, KERNEL]),
    st.binary(min_size=1, max_size=64),
    st.integers(0, 2000),
    st.sampled_from([[], ["-V"], ["--json"], ["--follow", "all"], ["--follow", "all", "--hex"]]),
)
def test_a_corrupted_capture_in_any_mode_ends_in_exit_0_or_1_never_a_traceback(
    path: Path, noise: bytes, at: int, mode: list[str]
) -> None:
    data = bytearray(path.read_bytes())
    data[at : at + len(noise)] = noise
    with tempfile.NamedTemporaryFile(suffix=".pcapng") as f:
        f.write(bytes(data))
        f.flush()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = read.main([*mode, f.name])
    if code == 1:
        assert err.getvalue().startswith("vsproxy read: ") and err.getvalue().count("\n") == 1, err.getvalue()
    else:
        assert code == 0 and err.getvalue() in ("", "vsproxy read: --follow all: nothing to show\n")


# --- plugins, inputs, errors -----------------------------------------------------------------------

PLUGIN = '''
from typing import ClassVar

from dissectors.app import AppDissector, Step


class Greeting(AppDissector):
    """Port 5000 of the kernel capture: whatever arrives is one greeting."""

    name: ClassVar[str] = "greeting"
    label: ClassVar[str] = "GREET"
    ports: ClassVar[frozenset[int]] = frozenset({5000})

    def parse(self, buf: bytearray, eom: bool) -> Step | None:
        if not buf:
            return None
        text = bytes(buf).decode()
        return len(buf), self.message(f"GREET {text}", ("words", str(len(text.split()))))


NotADissector = object
'''


def test_a_plugin_dissector_loaded_with_dissector_names_its_protocol(tmp_path: Path) -> None:
    (tmp_path / "greetplug.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = cli("--dissector", "greetplug:Greeting", KERNEL, "proto == greeting and app", env=env)
    assert (r.code, r.err) == (0, "")
    lines = r.out.splitlines()
    assert len(lines) == 2 and all(line.endswith("  #1 GREET hello vsock") for line in lines)
    v = cli("-V", "-c", 1, "--dissector", "greetplug:Greeting", KERNEL, "app", env=env)
    assert "    GREET hello vsock\n        words: 2\n" in v.out
    without = cli(KERNEL, "app", env=env)  # not loaded unless asked for
    assert (without.code, without.out) == (0, "")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no colon", "dissector plugin 'no colon': expected module:Class"),
        ("nosuchmodule_xyz:Foo", "dissector plugin 'nosuchmodule_xyz:Foo': cannot import nosuchmodule_xyz"),
        ("greetplug:Missing", "dissector plugin 'greetplug:Missing': greetplug has no Missing"),
        ("greetplug:NotADissector", "is not an AppDissector subclass"),
    ],
)
def test_a_bad_plugin_spec_is_one_line_exit_2(
    run: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, message: str
) -> None:
    (tmp_path / "greetplug.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "greetplug", raising=False)
    r = run("--dissector", spec, KERNEL)
    assert (r.code, r.out) == (2, "")
    assert r.err.startswith("vsproxy read: ") and message in r.err and r.err.count("\n") == 1


def test_stdin_and_a_filter_work_together() -> None:
    r = cli("-", "proto", "==", "http", stdin=HTTP.read_bytes())
    assert (r.code, r.err) == (0, "")
    assert r.out.splitlines() == [
        summary_line(p, TAILS[HTTP].get(i, "")) for i, p in enumerate(packets(HTTP)) if i in (2, 3, 4, 5)
    ]  # the RWs and SHUTDOWNs while #1 is known as http


def test_an_unreadable_file_is_exit_2_and_a_damaged_one_prints_what_it_can_then_exit_1(
    run: Callable[..., Result], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.pcapng"
    r = run(missing)
    assert (r.code, r.out, r.err) == (2, "", f"vsproxy read: {missing}: No such file or directory\n")
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(HTTP.read_bytes()[:-40])
    follow = run("--follow", "all", cut)
    assert follow.code == 1 and ">>> guest -> host 91 bytes" in follow.out
    assert follow.err.startswith(f"vsproxy read: {cut}: ") and follow.err.endswith(" (after 8 packets)\n")
    v = run("-V", cut)
    assert v.code == 1 and len(verbose_blocks(v.out)) == 8 and v.err.count("\n") == 1


def test_comments_and_device_names_cannot_break_the_line_or_drive_the_terminal(
    run: Callable[..., Result], tmp_path: Path
) -> None:
    path = tmp_path / "evil.pcapng"
    path.write_bytes(
        fmt.pcapng_shb()
        + fmt.pcapng_idb("vm\n1")
        + fmt.pcapng_epb(0, 1.0, fmt.vsockmon_frame(REQ, b""), inbound=True, comment="ok\n\x1b[2Jgone")
    )
    (line,) = run(path).out.splitlines()
    assert line.endswith(" REQUEST len=0 buf_alloc=262144 fwd_cnt=0  [ok\\n\\x1b[2Jgone]") and " vm\\n1 " in line
    assert "\x1b" not in run("-V", path).out


def test_a_closed_pipe_ends_the_read_quietly(tmp_path: Path) -> None:
    path = tmp_path / "many.pcapng"
    with open(path, "wb") as f:
        f.write(fmt.pcapng_shb() + fmt.pcapng_idb("vm"))
        for i in range(20000):
            f.write(fmt.pcapng_epb(0, i / 1000, fmt.vsockmon_frame(RW, b"\xb7"), inbound=True))
    for mode in ([], ["-V"], ["--follow", "all"]):
        with subprocess.Popen(
            [sys.executable, "-m", "vsproxy", "read", *mode, str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as p:
            assert p.stdout is not None and p.stderr is not None
            assert p.stdout.readline()
            p.stdout.close()  # the reader goes away, as `| head -1` does
            err = p.stderr.read()
            assert p.wait(timeout=60) == 0, err
        assert err == b"", err


# --- the README's examples ----------------------------------------------------------------------------


def readme_examples() -> list[tuple[str, str]]:
    """(command, what it prints) for every ``$ vsproxy read ...`` line in README.md's console blocks."""
    text = (ROOT / "README.md").read_text()
    examples: list[tuple[str, str]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        for part in re.split(r"^(?=\$ )", block, flags=re.M):
            if part.startswith("$ vsproxy read "):
                command, _, output = part.partition("\n")
                examples.append((command[2:], output))
    return examples


def test_the_readme_shows_each_kind_of_read_example() -> None:
    commands = [c for c, _ in README_EXAMPLES]
    assert any(" -V " in c for c in commands) and any("--follow" in c for c in commands)
    assert any("verdict == denied" in c for c in commands) and any("http-over-vsock" in c for c in commands)
    assert len(commands) >= 6


README_EXAMPLES = readme_examples()


@pytest.mark.parametrize(
    ("command", "output"), README_EXAMPLES, ids=[c[len("vsproxy read ") :] for c, _ in README_EXAMPLES]
)
def test_readme_read_example_prints_what_the_readme_shows(command: str, output: str) -> None:
    argv = shlex.split(command)
    assert argv[:2] == ["vsproxy", "read"]
    r = subprocess.run(
        [sys.executable, "-m", "vsproxy", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == (2 if r.stderr.startswith("vsproxy read: bad filter") else 0), r.stderr
    assert (r.stdout + r.stderr).rstrip("\n") == output.rstrip("\n")


def test_an_interface_block_with_an_empty_or_short_timestamp_resolution_is_a_capture_error() -> None:
    """Found by the corruption property: an if_tsresol option of length 0 raised IndexError."""
    import io
    import struct

    from vsproxy.capture import format as cfmt
    from vsproxy.capture.reader import CaptureError, records

    def idb(options: bytes) -> bytes:
        body = struct.pack("<HHI", cfmt.LINKTYPE_VSOCK, 0, 0) + options
        return struct.pack("<II", cfmt.BT_IDB, len(body) + 12) + body + struct.pack("<I", len(body) + 12)

    empty_tsresol = struct.pack("<HH", cfmt.IF_TSRESOL, 0) + struct.pack("<HH", 0, 0)
    for block in (idb(empty_tsresol), struct.pack("<II", cfmt.BT_IDB, 16) + b"\0" * 4 + struct.pack("<I", 16)):
        with pytest.raises(CaptureError):
            list(records(io.BytesIO(cfmt.pcapng_shb() + block)))
