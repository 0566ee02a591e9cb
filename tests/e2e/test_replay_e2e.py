"""Server replay with a real Linux guest (QEMU 10, -M pc, TCG): vsproxy answers from the captures in
captures/, with no host service behind it.

- The HTTP-over-vsock session with the HTTP server gone: the guest gets the recorded response
  byte for byte, and the session captured again is the committed capture as a transcript
  (``vsproxy diff`` exits 0).
- One guest run, answered from three captures: the Nitro heartbeat served from
  ``captures/nitro-heartbeat.pcapng`` (``--nitro``'s built-in service is not used), the SEQPACKET
  exchange with its message boundaries, and a request the capture does not have, which gets
  RST and is counted (``unmatched=1`` in vsproxy's report).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.e2e

REPO = harness.REPO
CAPTURES = REPO / "captures"
HTTP, NITRO, SEQ = (str(CAPTURES / n) for n in ("http-over-vsock.pcapng", "nitro-heartbeat.pcapng",
                                                  "seqpacket.pcapng"))
RUN_TIMEOUT = 90.0
REQUEST = ("GET /v1/keys HTTP/1.1\\r\\nHost: keys.internal\\r\\nAccept: application/json\\r\\n"
           "Connection: close\\r\\n\\r\\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: keys-demo/1.0\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 63\r\n\r\n"
            b'{"keys":[{"id":"k1","alg":"ES256"},{"id":"k2","alg":"RS256"}]}\n')


@contextlib.contextmanager
def vsproxy(args: Sequence[str], vhost: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "vsproxy", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 15
        while not vhost.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise harness.HarnessError(f"vsproxy did not start\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield proc
    finally:
        harness.stop_process(proc)


def run_guest(qemu: harness.Qemu, image: harness.GuestImage, vhost: Path, script: str) -> str:
    with harness.start_guest(qemu, "pc", vhost, script, RUN_TIMEOUT, image=image) as run:
        rc = run.wait_exit()
        out = run.result().script_output()
        assert rc == 0, run.describe(f"guest script exit {rc}")
        return out


def test_http_answered_from_the_capture_byte_for_byte_and_captured_again_the_same(
        guest_image: harness.GuestImage, qemu_by_name: Callable[[str], harness.Qemu], workdir: Path) -> None:
    vhost, pcap, log = workdir / "app.sock", workdir / "again.pcapng", workdir / "vsproxy.log"
    script = f"printf '{REQUEST}' | vsock_tool connect 2 8080 >/tmp/resp\necho \"HTTP-RC $?\"\nbase64 /tmp/resp\n"
    with vsproxy(["--vm", f"name=app,guest-cid=5,socket={vhost}", "--replay-server", HTTP, "--pcap", str(pcap)],
                 vhost, log) as vp:
        out = run_guest(qemu_by_name("qemu10"), guest_image, vhost, script)
        assert harness.stop_process(vp) == 0
    text = log.read_text(errors="replace")
    assert "HTTP-RC 0" in out, out
    import base64

    b64 = "".join(line.strip() for line in out.split("HTTP-RC 0", 1)[1].splitlines() if line.strip())
    assert base64.b64decode(b64) == RESPONSE, out
    assert f"replay {HTTP} at 2:8080: matched=1 unmatched=0 exhausted=0" in text, text
    diff = subprocess.run([sys.executable, "-m", "vsproxy", "diff", HTTP, str(pcap)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_heartbeat_and_seqpacket_from_captures_and_an_unmatched_request_reset_and_counted(
        guest_image: harness.GuestImage, qemu_by_name: Callable[[str], harness.Qemu], workdir: Path) -> None:
    vhost, log = workdir / "app.sock", workdir / "vsproxy.log"
    script = (
        "printf '\\267' | vsock_tool connect 3 9000 >/tmp/hb\n"
        'echo "HEARTBEAT-RC $?"\n'
        'echo "HEARTBEAT-REPLY$(od -An -tx1 /tmp/hb)"\n'
        "vsock_tool seqpacket 2 5005 HELLO 'GET region' BYE\n"
        "printf 'GET /not-recorded HTTP/1.1\\r\\n\\r\\n' | vsock_tool connect 2 8080 >/tmp/un\n"
        'echo "UNMATCHED-RC $? BYTES $(wc -c </tmp/un)"\n'
    )
    pcap = workdir / "c.pcapng"
    args = ["--vm", f"name=app,guest-cid=5,socket={vhost}", "--nitro", "--replay-server", NITRO,
            "--replay-server", SEQ, "--replay-server", HTTP, "--pcap", str(pcap)]
    with vsproxy(args, vhost, log) as vp:
        out = run_guest(qemu_by_name("qemu10"), guest_image, vhost, script)
        assert harness.stop_process(vp) == 0
    text = log.read_text(errors="replace")
    assert "HEARTBEAT-RC 0" in out and "HEARTBEAT-REPLY b7" in out, out
    assert f"replay {NITRO} at 3:9000: matched=1 unmatched=0 exhausted=0" in text, text
    # each answer its own message; EOM only, as the unix socket the capture was made against sent them
    for reply in ("MSG 19 - HELLO from the host", "MSG 16 - region=eu-west-1", "MSG 3 - BYE", "SEQPACKET-DONE 3"):
        assert reply in out, out
    assert f"replay {SEQ} at 2:5005: matched=3 unmatched=0 exhausted=0" in text, text
    # Linux reads the end of the stream after an RST: nothing came, and the capture shows the RST
    assert "UNMATCHED-RC 0 BYTES 0" in out, out
    assert f"replay {HTTP} at 2:8080: matched=0 unmatched=1 exhausted=0" in text, text
    from vsproxy.replay.transcript import Data, Reset, load_transcript

    (unmatched,) = [c for c in load_transcript(str(pcap)).conversations if c.server == (2, 8080)]
    # vsproxy's RST, and nothing else from the host side (a second RST answers whatever the guest
    # sent before it saw the first)
    assert {type(s) for s in unmatched.steps if not s.from_client} == {Reset}
    assert [s.data for s in unmatched.steps if isinstance(s, Data)] == [b"GET /not-recorded HTTP/1.1\r\n\r\n"]
