"""The committed captures in captures/ that vsproxy's end-to-end tests made (no guest booted here).

Each fixture is read three ways: vsproxy's reader (``records``/``dissect``), the CLI
``vsproxy read`` and real tshark; the three must agree packet by packet, and each file must
still hold what makes it worth keeping (the heartbeat byte, the HTTP request line, the
denial comment, SEQPACKET messages with EOM/EOR).

``check_capture_facts(name, path)`` is also applied by tests/e2e/test_captures_e2e.py to
every fresh capture before it may replace a fixture.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsproxy.capture.reader import dissect, records, summary_line
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "captures"
MAX_FIXTURE_BYTES = 16 * 1024  # fixtures stay small: a few KB each


@dataclass(frozen=True)
class Pkt:
    device: str
    src: tuple[int, int]  # (cid, port)
    dst: tuple[int, int]
    op: int
    type: int
    flags: int
    payload: bytes
    comment: str


def read_packets(path: Path) -> list[Pkt]:
    """vsproxy's reader; every frame must carry a virtio header."""
    out = []
    with open(path, "rb") as f:
        for rec in records(f):
            p = dissect(rec)
            h = p.hdr
            assert h is not None, f"{path}: a frame without a virtio header: {rec}"
            out.append(
                Pkt(
                    rec.interface,
                    (h.src_cid, h.src_port),
                    (h.dst_cid, h.dst_port),
                    h.op,
                    h.type,
                    h.flags,
                    p.payload,
                    rec.comment or "",
                )
            )
    return out


TSHARK_FIELDS = (
    "frame.interface_name",
    "vsock.src_cid",
    "vsock.src_port",
    "vsock.dst_cid",
    "vsock.dst_port",
    "vsock.virtio.op",
    "vsock.virtio.type",
    "vsock.virtio.flags",
    "vsock.payload",
    "frame.comment",
)


def tshark_packets(path: Path) -> list[Pkt]:
    """The same fields as Wireshark's own vsock dissector decodes them."""
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark is required (apt-get install tshark; tests/run.sh installs it)", pytrace=False)
    argv = [tshark, "-r", str(path), "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
    for field in TSHARK_FIELDS:
        argv += ["-e", field]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"tshark -r {path} failed: {proc.stderr}"
    out = []
    for line in proc.stdout.splitlines():
        dev, sc, sp, dc, dp, op, typ, flags, payload, comment = line.split("\t")
        out.append(
            Pkt(
                dev,
                (int(sc), int(sp)),
                (int(dc), int(dp)),
                int(op),
                int(typ),
                int(flags, 16),
                bytes.fromhex(payload.replace(":", "")),
                comment,
            )
        )
    return out


def read_cli(path: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "vsproxy", "read", str(path)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0 and not proc.stderr, f"vsproxy read {path}: exit {proc.returncode}: {proc.stderr}"
    return proc.stdout.splitlines()


def rw(pkts: list[Pkt], src_cid: int) -> list[Pkt]:
    return [p for p in pkts if p.op == H.Op.RW and p.src[0] == src_cid]


# ---- per-fixture facts: (packets, `vsproxy read` lines) -> assertions


def heartbeat_facts(pkts: list[Pkt], lines: list[str]) -> None:
    req = [p for p in pkts if p.op == H.Op.REQUEST]
    assert [(p.device, p.src[0], p.dst) for p in req] == [("enclave", 16, (3, 9000))]
    assert [p.payload for p in rw(pkts, 16)] == [b"\xb7"]
    assert [(p.src[1], p.payload) for p in rw(pkts, 3)] == [(9000, b"\xb7")]
    assert any(" enclave 16:" in ln and " > 3:9000 RW len=1 " in ln for ln in lines), lines
    assert any(" enclave 3:9000 > 16:" in ln and " RW len=1 " in ln for ln in lines), lines


HTTP_REQUEST_LINE = b"GET /v1/keys HTTP/1.1\r\n"
KEYS_BODY = b'{"keys":[{"id":"k1","alg":"ES256"},{"id":"k2","alg":"RS256"}]}\n'


def http_facts(pkts: list[Pkt], lines: list[str]) -> None:
    assert {(p.device, p.type) for p in pkts} == {("app", H.Type.STREAM)}
    request = b"".join(p.payload for p in rw(pkts, 5))
    response = b"".join(p.payload for p in rw(pkts, 2))
    assert request.startswith(HTTP_REQUEST_LINE) and request.endswith(b"\r\n\r\n"), request
    assert b"\r\nHost: keys.internal\r\n" in request
    assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json" in head and body == KEYS_BODY, response
    assert {p.dst for p in rw(pkts, 5)} == {(2, 8080)}
    assert any(" > 2:8080 RW len=" in ln for ln in lines), lines


DENIAL = "denied by not in app's outbound allowlist; vsproxy answers RST"


def sibling_facts(pkts: list[Pkt], lines: list[str]) -> None:
    denied = [i for i, p in enumerate(pkts) if p.comment]
    assert len(denied) == 1, [p.comment for p in pkts]
    req = pkts[denied[0]]
    assert (req.device, req.op, req.src[0], req.dst, req.comment) == ("app", H.Op.REQUEST, 5, (6, 5002), DENIAL)
    # vsproxy's RST for it, on the same interface; nothing of it reaches vault
    answers = [p for p in pkts if p.src == req.dst and p.dst == req.src]
    assert [(p.device, p.op) for p in answers] == [("app", H.Op.RST)]
    assert not [p for p in pkts if p.device == "vault" and 5002 in (p.src[1], p.dst[1])]
    # the allowed connection, seen on both devices' interfaces
    for dev in ("app", "vault"):
        conn = [p for p in pkts if p.device == dev and (6, 5001) in (p.src, p.dst)]
        assert [p.op for p in conn][:2] == [H.Op.REQUEST, H.Op.RESPONSE], dev
        assert [p.payload for p in conn if p.op == H.Op.RW] == [b"hello vault\n"] * 2, dev
    flagged = [ln for ln in lines if "[" in ln]
    assert len(flagged) == 1 and " app 5:" in flagged[0] and " > 6:5002 REQUEST " in flagged[0], flagged
    assert flagged[0].endswith(f"[{DENIAL}]"), flagged


SEQ_MESSAGES = [b"HELLO", b"GET region", b"BYE"]
SEQ_REPLIES = [b"HELLO from the host", b"region=eu-west-1", b"BYE"]


def seqpacket_facts(pkts: list[Pkt], lines: list[str]) -> None:
    assert {p.type for p in pkts} == {H.Type.SEQPACKET}
    assert [(p.payload, p.flags) for p in rw(pkts, 5)] == [(m, H.SEQ_EOM | H.SEQ_EOR) for m in SEQ_MESSAGES]
    # the host end is a unix SOCK_SEQPACKET socket, which has no record marks: EOM only
    assert [(p.payload, p.flags) for p in rw(pkts, 2)] == [(m, H.SEQ_EOM) for m in SEQ_REPLIES]
    assert all(" SEQPACKET" in ln for ln in lines), lines
    assert sum(" RW SEQPACKET flags=0x3 " in ln for ln in lines) == len(SEQ_MESSAGES), lines


FACTS: dict[str, Callable[[list[Pkt], list[str]], None]] = {
    "nitro-heartbeat.pcapng": heartbeat_facts,
    "http-over-vsock.pcapng": http_facts,
    "sibling-denied.pcapng": sibling_facts,
    "seqpacket.pcapng": seqpacket_facts,
}


def check_capture_facts(name: str, path: Path) -> None:
    """The reader, ``vsproxy read`` and tshark agree on ``path``, which holds ``name``'s key facts."""
    pkts = read_packets(path)
    assert pkts, f"{path} holds no packets"
    assert tshark_packets(path) == pkts, f"{path}: tshark and vsproxy's reader disagree"
    lines = read_cli(path)
    assert len(lines) == len(pkts), lines
    for p, line in zip(pkts, lines, strict=True):
        assert f" {p.device} {p.src[0]}:{p.src[1]} > {p.dst[0]}:{p.dst[1]} {H.Op(p.op).name}" in line, line
    FACTS[name](pkts, lines)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_fixture_is_read_alike_by_reader_cli_and_tshark_and_holds_its_facts(name: str) -> None:
    check_capture_facts(name, CAPTURES / name)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_fixture_is_small_pcapng(name: str) -> None:
    data = (CAPTURES / name).read_bytes()
    assert data[:4] == b"\x0a\x0d\x0d\x0a", "not pcapng"
    assert len(data) <= MAX_FIXTURE_BYTES


def test_every_fixture_is_described_in_the_captures_readme() -> None:
    readme = (CAPTURES / "README.md").read_text()
    for name in FACTS:
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize(("name", "other"), [(a, b) for a in sorted(FACTS) for b in sorted(FACTS) if a != b])
def test_facts_of_one_fixture_fail_on_another(name: str, other: str) -> None:
    # the checks tell the captures apart: none of them passes on just any capture
    path = CAPTURES / other
    with open(path, "rb") as f:
        lines = [summary_line(dissect(rec)) for rec in records(f)]
    with pytest.raises(AssertionError):
        FACTS[name](read_packets(path), lines)
