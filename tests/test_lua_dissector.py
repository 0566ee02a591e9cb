"""The Wireshark post-dissector dissectors/wireshark/vsproxy.lua, run in real tshark.

Captures are built with vsproxy's own writers (vsproxy.capture.format), so the frames are the
ones vsproxy writes. tshark runs with HOME pointing at an empty directory, so a user's
preferences or an installed copy of the plugin cannot change the result. A Lua error at load
time only shows on stderr (tshark still exits 0) and one at dissection time only in the tree
(``_ws.lua.error``), so every run checks both.
"""

from __future__ import annotations

import os
import shutil
import ssl
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsproxy.capture import format as fmt
from vsproxy.vsock.header import SEQ_EOM, SEQ_EOR, SHUTDOWN_BOTH, Header, Op, Type

LUA = Path(__file__).resolve().parent.parent / "dissectors" / "wireshark" / "vsproxy.lua"

FIELDS = (
    "frame.number", "vsproxy.type", "vsproxy.op", "vsproxy.flags", "vsproxy.flags.eom", "vsproxy.flags.eor",
    "vsproxy.flags.shutdown_rcv", "vsproxy.flags.shutdown_send", "vsproxy.src", "vsproxy.dst", "vsproxy.len",
    "vsproxy.app", "vsproxy.verdict", "vsproxy.rule", "vsproxy.rewritten", "vsproxy.real_peer",
    "http.request.method", "http.request.uri", "http.response.code", "tls.handshake.type",
    "tls.handshake.extensions_server_name", "http2.magic", "http2.type", "http2.header.name",
    "_ws.lua.error", "_ws.expert.message",
)

GUEST, HOST = 3, 2
SNI = "kms.us-east-1.amazonaws.com"
DENIED = "denied by not in enclave1's outbound allowlist; vsproxy answers RST"
REWRITTEN = "rewritten (remap 3=2): real peer 2:19000"
SPOOFED = "spoofed: src_cid 9 is not the guest's CID 3; dropped"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# HEADERS, END_HEADERS, stream 1; HPACK static entries :method GET, :scheme http, :path /
H2_HEADERS = b"\x00\x00\x03\x01\x04\x00\x00\x00\x01\x82\x86\x84"


def header(op: int, *, typ: int = Type.STREAM, flags: int = 0, src: tuple[int, int] = (GUEST, 1024),
           dst: tuple[int, int] = (HOST, 80), length: int = 0) -> bytes:
    return Header(src[0], dst[0], src[1], dst[1], length, typ, op, flags, 262144, 0).pack()


def frame(op: int, payload: bytes = b"", *, typ: int = Type.STREAM, flags: int = 0,
          src: tuple[int, int] = (GUEST, 1024), dst: tuple[int, int] = (HOST, 80)) -> bytes:
    return fmt.vsockmon_frame(header(op, typ=typ, flags=flags, src=src, dst=dst, length=len(payload)), payload)


def client_hello(server_hostname: str) -> bytes:
    """A real TLS ClientHello record, as Python's ssl module sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:  # it waits for the ServerHello, the ClientHello is out
        return outgoing.read()
    raise AssertionError("a TLS handshake with no server cannot complete")


def no_info_frame(payload: bytes) -> bytes:
    """A vsockmon PAYLOAD frame of transport 1 (NO_INFO): no transport header at all."""
    return fmt.VSOCKMON.pack(GUEST, HOST, 1024, 80, fmt.AF_VSOCK_OP_PAYLOAD, 1, 0) + payload


# (frame, pcapng comment), in capture order: frame number = index + 1
FRAMES: list[tuple[bytes, str | None]] = [
    (frame(Op.RW, b"hello", typ=Type.SEQPACKET, flags=SEQ_EOM | SEQ_EOR), None),  # 1
    (frame(Op.SHUTDOWN, flags=SHUTDOWN_BOTH), None),  # 2
    (frame(Op.RW, b"GET /index.html HTTP/1.1\r\nHost: parent\r\n\r\n"), None),  # 3
    (frame(Op.RW, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", src=(HOST, 80), dst=(GUEST, 1024)), None),  # 4
    (frame(Op.RW, client_hello(SNI), dst=(HOST, 8000)), None),  # 5
    (frame(Op.REQUEST, dst=(7, 9)), DENIED),  # 6
    # the header says 100 bytes, the frame carries 8 of them
    (fmt.vsockmon_frame(header(Op.RW, length=100), b"GET / HT"), None),  # 7
    (frame(Op.RW, b"abcd")[:50], None),  # 8: cut inside the virtio header
    (no_info_frame(b"GET /novirtio HTTP/1.1\r\n\r\n"), None),  # 9
    (frame(Op.RW, H2_PREFACE + H2_SETTINGS, dst=(HOST, 81)), None),  # 10
    (frame(Op.RW, H2_HEADERS, dst=(HOST, 81)), None),  # 11: HTTP/2 without the preface
    (frame(Op.RESPONSE, src=(HOST, 9000), dst=(GUEST, 1024)), REWRITTEN),  # 12
    (frame(Op.REQUEST, src=(9, 1024)), SPOOFED),  # 13
    (frame(Op.RW, b"\xb7", dst=(HOST, 9000)), None),  # 14: Nitro heartbeat
    (frame(Op.CREDIT_UPDATE), None),  # 15
    (frame(9, typ=7, flags=0xFF), None),  # 16: unknown type and op
]


def pcapng(frames: Sequence[tuple[bytes, str | None]]) -> bytes:
    blocks = [fmt.pcapng_shb(), fmt.pcapng_idb("enclave1")]
    blocks += [fmt.pcapng_epb(0, 1000.0 + i, f, inbound=True, comment=c) for i, (f, c) in enumerate(frames)]
    return b"".join(blocks)


def pcap(frames: Sequence[bytes]) -> bytes:
    return fmt.pcap_header() + b"".join(fmt.pcap_record(1000.0 + i, f) for i, f in enumerate(frames))


@pytest.fixture(scope="module")
def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.fail("tshark is not installed: DEBIAN_FRONTEND=noninteractive apt-get install -y tshark")
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cap") / "frames.pcapng"
    path.write_bytes(pcapng(FRAMES))
    return path


def run(tshark: str, home: Path, args: Sequence[str], *, script: bool = True) -> str:
    """tshark's stdout; fails on a non-zero exit or anything on stderr but the root warning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIRESHARK")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), LC_ALL="C.UTF-8")
    cmd = [tshark, *(["-X", f"lua_script:{LUA}"] if script else []), *args]
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
    stderr = [ln for ln in done.stderr.decode(errors="replace").splitlines()
              if ln.strip() and not ln.startswith("Running as user")]
    assert done.returncode == 0, (cmd, done.returncode, stderr)
    assert stderr == [], stderr
    return done.stdout.decode(errors="replace")


def field_rows(tshark: str, home: Path, path: Path, *extra: str) -> dict[int, dict[str, str]]:
    """frame number -> field -> value (multiple occurrences joined with '|')."""
    args = ["-r", str(path), *extra, "-T", "fields", "-E", "aggregator=|", "-E", "quote=n"]
    for f in FIELDS:
        args += ["-e", f]
    rows: dict[int, dict[str, str]] = {}
    for line in run(tshark, home, args).splitlines():
        row = dict(zip(FIELDS, line.split("\t"), strict=True))
        assert row["_ws.lua.error"] == "", row
        rows[int(row["frame.number"])] = row
    return rows


@pytest.fixture(scope="module")
def rows(tshark: str, home: Path, capture: Path) -> dict[int, dict[str, str]]:
    return field_rows(tshark, home, capture)


def test_every_frame_is_dissected_without_lua_errors(rows: dict[int, dict[str, str]]) -> None:
    assert sorted(rows) == list(range(1, len(FRAMES) + 1))
    assert all(r["_ws.lua.error"] == "" for r in rows.values())


def test_seqpacket_rw_is_named_and_its_eom_eor_flags_decoded(rows: dict[int, dict[str, str]]) -> None:
    r = rows[1]
    assert (r["vsproxy.type"], r["vsproxy.op"], r["vsproxy.flags"]) == ("SEQPACKET", "RW", "0x00000003")
    assert (r["vsproxy.flags.eom"], r["vsproxy.flags.eor"]) == ("1", "1")
    assert (r["vsproxy.src"], r["vsproxy.dst"], r["vsproxy.len"]) == ("3:1024", "2:80", "5")
    assert r["vsproxy.app"] == ""


def test_shutdown_flags_decode_as_rcv_and_send(rows: dict[int, dict[str, str]]) -> None:
    r = rows[2]
    assert (r["vsproxy.type"], r["vsproxy.op"], r["vsproxy.flags"]) == ("STREAM", "SHUTDOWN", "0x00000003")
    assert (r["vsproxy.flags.shutdown_rcv"], r["vsproxy.flags.shutdown_send"]) == ("1", "1")
    # SEQPACKET bits mean nothing on a SHUTDOWN
    assert (r["vsproxy.flags.eom"], r["vsproxy.flags.eor"]) == ("", "")


def test_http_request_and_response_go_to_the_http_dissector(rows: dict[int, dict[str, str]]) -> None:
    req, resp = rows[3], rows[4]
    assert (req["vsproxy.app"], req["http.request.method"], req["http.request.uri"]) == ("http", "GET", "/index.html")
    assert (resp["vsproxy.app"], resp["http.response.code"]) == ("http", "200")


def test_tls_client_hello_goes_to_the_tls_dissector(rows: dict[int, dict[str, str]]) -> None:
    r = rows[5]
    assert r["vsproxy.app"] == "tls"
    assert r["tls.handshake.type"] == "1"  # ClientHello
    assert r["tls.handshake.extensions_server_name"] == SNI


def test_denied_request_takes_verdict_and_rule_from_the_comment(rows: dict[int, dict[str, str]]) -> None:
    r = rows[6]
    assert (r["vsproxy.op"], r["vsproxy.verdict"]) == ("REQUEST", "denied")
    assert r["vsproxy.rule"] == "not in enclave1's outbound allowlist"
    assert DENIED in r["_ws.expert.message"]
    assert rows[3]["vsproxy.verdict"] == "allowed"


def test_rewritten_and_spoofed_comments_are_decoded(rows: dict[int, dict[str, str]]) -> None:
    rewritten, spoofed = rows[12], rows[13]
    assert (rewritten["vsproxy.verdict"], rewritten["vsproxy.rewritten"], rewritten["vsproxy.real_peer"]) == (
        "allowed", "1", "2:19000")
    assert spoofed["vsproxy.verdict"] == "spoofed"
    assert SPOOFED in spoofed["_ws.expert.message"]


def test_truncated_payload_is_flagged_and_what_is_there_still_handed_off(rows: dict[int, dict[str, str]]) -> None:
    r = rows[7]
    assert (r["vsproxy.op"], r["vsproxy.len"], r["vsproxy.app"]) == ("RW", "100", "http")
    assert "Payload truncated: the header says 100 bytes, the frame has 8" in r["_ws.expert.message"]


def test_frame_cut_inside_the_virtio_header_is_flagged_not_decoded(rows: dict[int, dict[str, str]]) -> None:
    r = rows[8]
    assert r["vsproxy.type"] == r["vsproxy.op"] == r["vsproxy.app"] == ""
    assert "the frame has 18 after it" in r["_ws.expert.message"]


def test_non_virtio_frame_has_no_virtio_fields_but_its_payload_is_handed_off(rows: dict[int, dict[str, str]]) -> None:
    r = rows[9]
    assert r["vsproxy.type"] == r["vsproxy.op"] == r["vsproxy.flags"] == ""
    assert (r["vsproxy.src"], r["vsproxy.dst"]) == ("3:1024", "2:80")
    assert (r["vsproxy.app"], r["http.request.uri"]) == ("http", "/novirtio")


def test_http2_preface_goes_to_the_http2_dissector(rows: dict[int, dict[str, str]]) -> None:
    r = rows[10]
    assert r["vsproxy.app"] == "http2"
    assert r["http2.magic"].startswith("PRI * HTTP/2.0")
    assert r["http2.type"] == "4"  # SETTINGS


def test_http2_frames_without_the_preface_need_the_port_preference(
        tshark: str, home: Path, capture: Path, rows: dict[int, dict[str, str]]) -> None:
    assert rows[11]["vsproxy.app"] == rows[11]["http2.type"] == ""
    with_pref = field_rows(tshark, home, capture, "-o", "vsproxy.ports:81=http2")
    r = with_pref[11]
    assert (r["vsproxy.app"], r["http2.type"]) == ("http2", "1")  # HEADERS
    assert r["http2.header.name"] == ":method|:scheme|:path"


def test_port_preference_wins_over_the_first_bytes(tshark: str, home: Path, capture: Path) -> None:
    by_port = field_rows(tshark, home, capture, "-o", "vsproxy.ports:80=data, 8000=tls")
    assert (by_port[3]["vsproxy.app"], by_port[3]["http.request.method"]) == ("data", "")
    # src port 80 matches too: the response is data as well
    assert by_port[4]["vsproxy.app"] == "data"
    assert by_port[5]["tls.handshake.extensions_server_name"] == SNI


def test_bad_port_preference_entries_are_ignored(tshark: str, home: Path, capture: Path) -> None:
    junk = "vsproxy.ports:abc,=,80=,=http,99999999999999999999=http,81=no-such-dissector,80=http=tls,;"
    r = field_rows(tshark, home, capture, "-o", junk)
    assert r[3]["vsproxy.app"] == "http"  # still recognised by its first bytes
    assert r[11]["vsproxy.app"] == ""


def test_nitro_heartbeat_and_credit_update_are_named(rows: dict[int, dict[str, str]]) -> None:
    assert (rows[14]["vsproxy.op"], rows[14]["vsproxy.app"]) == ("RW", "nitro-heartbeat")
    assert rows[15]["vsproxy.op"] == "CREDIT_UPDATE"
    assert (rows[16]["vsproxy.type"], rows[16]["vsproxy.op"]) == ("unknown type (7)", "unknown op (9)")


def test_info_column_summarises_each_packet(tshark: str, home: Path, capture: Path) -> None:
    lines = run(tshark, home, ["-r", str(capture)]).splitlines()
    assert len(lines) == len(FRAMES)
    assert "3:1024 → 2:80 SEQPACKET RW EOM EOR Len=5" in lines[0]
    assert "STREAM SHUTDOWN RCV SEND" in lines[1]
    assert "STREAM RW Len=42 GET /index.html HTTP/1.1" in lines[2]
    assert " HTTP " in lines[2]  # the Protocol column comes from the HTTP dissector
    assert "Client Hello" in lines[4] and ", Client Hello" not in lines[4]
    assert "[denied] 3:1024 → 7:9 STREAM REQUEST" in lines[5]
    assert "RW Len=100 [truncated]" in lines[6]
    assert "Magic, SETTINGS" in lines[9]
    assert "[spoofed] 9:1024 → 2:80" in lines[12]
    assert "Len=1 nitro-heartbeat" in lines[13]
    assert "CREDIT_UPDATE buf_alloc=262144 fwd_cnt=0" in lines[14]


def test_verbose_tree_shows_the_protocol_and_decoded_flags(tshark: str, home: Path, capture: Path) -> None:
    text = run(tshark, home, ["-r", str(capture), "-V"])
    assert "Lua Error" not in text
    assert "vsproxy vsock inspector, SEQPACKET RW EOM EOR" in text
    assert "End of message (EOM): True" in text and "End of record (EOR): True" in text
    assert "Shutdown receive (RCV): True" in text and "Shutdown send (SEND): True" in text
    assert "[Verdict: denied]" in text
    assert "Server Name: " + SNI in text


def test_classic_pcap_is_dissected_the_same(tshark: str, home: Path, tmp_path: Path) -> None:
    path = tmp_path / "frames.pcap"
    path.write_bytes(pcap([f for f, _ in FRAMES]))
    r = field_rows(tshark, home, path)
    assert (r[1]["vsproxy.type"], r[1]["vsproxy.flags.eom"]) == ("SEQPACKET", "1")
    assert r[3]["http.request.method"] == "GET"
    assert r[6]["vsproxy.verdict"] == "allowed"  # classic pcap has no comments


def test_frames_of_other_link_types_are_left_alone(tshark: str, home: Path, tmp_path: Path) -> None:
    # an Ethernet frame whose bytes would pass as a vsockmon header
    raw = frame(Op.RW, b"GET / HTTP/1.1\r\n\r\n")
    path = tmp_path / "eth.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + fmt.pcap_record(1.0, raw))
    out = run(tshark, home, ["-r", str(path), "-T", "fields", "-e", "vsproxy", "-e", "vsproxy.op"])
    assert out.strip() == ""


def test_installed_in_the_personal_plugins_folder_it_loads_without_x(
        tshark: str, tmp_path: Path, capture: Path) -> None:
    plugins = tmp_path / ".local" / "lib" / "wireshark" / "plugins"
    plugins.mkdir(parents=True)
    shutil.copy(LUA, plugins / "vsproxy.lua")
    out = run(tshark, tmp_path, ["-r", str(capture), "-T", "fields", "-e", "vsproxy.type", "-c", "1"], script=False)
    assert out.strip() == "SEQPACKET"


# -- fuzz: any frame, any link-level damage: no Lua error, no dissector bug -------------------
_PAYLOAD_STARTS = [b"", b"GET ", b"HTTP/1.1 ", b"PRI * HTTP/2.0\r\n", b"\x16\x03\x01", b"\x17\x03\x03\x00", b"\xb7"]


@st.composite
def fuzz_frames(draw: st.DrawFn) -> bytes:
    trans = draw(st.sampled_from([0, 1, 2, 2, 2, 0xFFFF]))
    trans_len = draw(st.sampled_from([0, 44, 44, 43, 45, 0xFFFF]))
    mon = fmt.VSOCKMON.pack(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),
                            draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([80, 81, 8000, 9000, 0])),
                            draw(st.integers(0, 5)), trans, trans_len)
    payload = draw(st.sampled_from(_PAYLOAD_STARTS)) + draw(st.binary(max_size=40))
    hdr = Header(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**32 - 1)),
                 draw(st.sampled_from([80, 81, 8000, 9000, 2**32 - 1])),
                 draw(st.sampled_from([len(payload), 0, 2**32 - 1, len(payload) + 7])),
                 draw(st.integers(0, 3)), draw(st.integers(0, 8)), draw(st.integers(0, 2**32 - 1)),
                 draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))).pack()
    whole = mon + hdr + payload
    return whole[: draw(st.integers(0, len(whole)))]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# each example is one tshark run (about half a second): a few examples of many frames each
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(fuzz_frames(), min_size=1, max_size=80))
def test_damaged_or_random_frames_never_raise_lua_errors(
        tshark: str, home: Path, fuzz_dir: Path, frames: list[bytes]) -> None:
    path = fuzz_dir / "fuzz.pcapng"
    path.write_bytes(pcapng([(f, None) for f in frames]))
    out = run(tshark, home, ["-r", str(path), "-o", "vsproxy.ports:81=http2,9000=json", "-T", "fields",
                             "-e", "frame.number", "-e", "_ws.lua.error", "-e", "_ws.malformed.dissector_bug"])
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(frames) + 1)]
    assert [r for r in rows if r[1:] != ["", ""]] == []


CAPTURES = Path(__file__).resolve().parent.parent / "captures"


def test_the_real_captures_decode_through_the_plugin(tshark: str, home: Path) -> None:
    """The captures real guests made (captures/), not only hand-built frames."""
    http = list(field_rows(tshark, home, CAPTURES / "http-over-vsock.pcapng").values())
    assert [(r["vsproxy.op"], r["http.request.method"], r["http.request.uri"]) for r in http
            if r["http.request.method"]] == [("RW", "GET", "/v1/keys")]
    assert [r["http.response.code"] for r in http if r["http.response.code"]] == ["200"]
    assert {r["vsproxy.app"] for r in http if r["vsproxy.op"] == "RW"} == {"http"}
    denied = [r for r in field_rows(tshark, home, CAPTURES / "sibling-denied.pcapng").values()
              if r["vsproxy.verdict"] == "denied"]
    assert [(r["vsproxy.op"], r["vsproxy.rule"]) for r in denied] == [("REQUEST", "not in app's outbound allowlist")]
    seq = [r for r in field_rows(tshark, home, CAPTURES / "seqpacket.pcapng").values() if r["vsproxy.op"] == "RW"]
    assert seq and {r["vsproxy.type"] for r in seq} == {"SEQPACKET"} and {r["vsproxy.flags.eom"] for r in seq} == {"1"}
    kernel = field_rows(tshark, home, CAPTURES / "kernel-vsockmon-loopback.pcap").values()
    assert {r["vsproxy.type"] for r in kernel} == {"STREAM", "SEQPACKET"}
