"""The reference captures in captures/, made by vsproxy with real guests (QEMU 10, -M pc, TCG).

Each test runs one scenario with ``vsproxy --pcap FILE`` (pcapng), checks the file with
real tshark and with vsproxy's reader (``records``/``dissect`` and ``vsproxy read``), and
with the fast fixture test's own fact checks (tests/test_capture_fixtures.py), then:

- with ``VSPROXY_UPDATE_CAPTURES=1`` copies it to ``captures/NAME``;
- otherwise compares its structure with the committed file: per connection and per
  direction the ops, types, flags, payload bytes and comments, in order (not timestamps,
  not ephemeral ports, not credit counters), so a change in what crosses vsproxy shows.

Scenarios (one vsproxy, one or two guests each):

  nitro-heartbeat   device ``enclave`` (CID 16) with ``--nitro``: the guest dials 3:9000,
                    sends 0xB7 and reads vsproxy's built-in heartbeat answer 0xB7.
  http-over-vsock   device ``app`` (CID 5), ``forward=8080=tcp:127.0.0.1:P``: the guest sends
                    ``GET /v1/keys`` to 2:8080 and a Python HTTP server answers 200 with JSON.
  sibling-denied    devices ``app`` (CID 5, ``allow-out=6:5001``) and ``vault`` (CID 6,
                    ``allow-in=5:5001``), two QEMUs: app dials 6:5002 (denied by app's
                    outbound allowlist: the REQUEST carries the denial comment and vsproxy
                    answers RST) and then 6:5001, vault's echo server (allowed).
  seqpacket         device ``app`` (CID 5), ``uds-path=U``: the guest opens a SEQPACKET
                    connection to 2:5005 (the host's SOCK_SEQPACKET socket ``U_5005``) and
                    exchanges three messages each way (EOM, and EOR from the guest).

Regenerate: ``VSPROXY_UPDATE_CAPTURES=1 .venv/bin/pytest tests/e2e/test_captures_e2e.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import harness
import pytest

from vsproxy.vsock import header as H

pytestmark = pytest.mark.e2e

REPO = harness.REPO
CAPTURES = REPO / "captures"
UPDATE = os.environ.get("VSPROXY_UPDATE_CAPTURES") == "1"
QEMU = "qemu10"
MACHINE = "pc"
RUN_TIMEOUT = 90.0  # one QEMU run; a healthy one takes about 5 s
REGENERATE = "VSPROXY_UPDATE_CAPTURES=1 .venv/bin/pytest tests/e2e/test_captures_e2e.py"


# --------------------------------------------------------------------------
# the fast fixture test's checks, applied to every fresh capture too


def _load_fixture_module() -> Any:
    """tests/test_capture_fixtures.py: its check_capture_facts(name, path) and its reader.

    A fresh capture must pass the very checks the committed fixtures are held to on every
    CI run, so a regenerated fixture can never break the fast test.  Loaded by file name:
    tests/e2e is type-checked on its own, without tests/ on the path."""
    path = REPO / "tests" / "test_capture_fixtures.py"
    spec = importlib.util.spec_from_file_location("capture_fixture_facts", path)
    assert spec is not None and spec.loader is not None, path
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_fixtures = _load_fixture_module()
check_capture_facts: Callable[[str, Path], None] = _fixtures.check_capture_facts


# --------------------------------------------------------------------------
# vsproxy with --vm devices (harness.start_vsproxy always adds --socket/--guest-cid)


@contextlib.contextmanager
def running_vsproxy(args: Sequence[str], first_socket: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m vsproxy ARGS`` once ``first_socket`` (the first device's, created last) exists;
    stopped by its own pid on the way out."""
    argv = [sys.executable, "-m", "vsproxy", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT
        )
    try:
        end = time.monotonic() + 10
        while not first_socket.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise harness.HarnessError(
                    f"vsproxy did not create {first_socket} (exit {proc.poll()})\n"
                    f"{argv}\n--- log ---\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        yield proc
    finally:
        harness.stop_process(proc)


def stop_vsproxy(proc: subprocess.Popen[bytes], log: Path) -> str:
    """SIGTERM (the capture is flushed and closed on the way out); its log, checked for a clean end."""
    rc = harness.stop_process(proc)
    text = log.read_text(errors="replace")
    assert rc == 0, f"vsproxy exited {rc}\n{text}"
    assert "dropped=0" in text, f"the capture dropped packets\n{text}"
    return text


@dataclasses.dataclass(frozen=True)
class Made:
    """One scenario's capture and what both sides said."""

    capture: Path
    serial: str  # the (first) guest's script output
    log: str  # vsproxy's log


@dataclasses.dataclass(frozen=True)
class Guest:
    """What boots a guest: the QEMU and the image."""

    qemu: harness.Qemu
    image: harness.GuestImage

    def start(self, vhost: Path, script: str) -> contextlib.AbstractContextManager[harness.GuestRun]:
        return harness.start_guest(self.qemu, MACHINE, vhost, script, RUN_TIMEOUT, image=self.image)


def run_guest(guest: Guest, vhost: Path, script: str) -> str:
    with guest.start(vhost, script) as run:
        rc = run.wait_exit()
        out = run.result().script_output()
        assert rc == 0, run.describe(f"guest script exit {rc}")
        return out


# --------------------------------------------------------------------------
# scenarios


def make_nitro_heartbeat(guest: Guest, d: Path) -> Made:
    vhost, pcap, log = d / "enclave.sock", d / "c.pcapng", d / "vsproxy.log"
    script = (
        "printf '\\267' | vsock_tool connect 3 9000 >/tmp/hb\n"
        'echo "HEARTBEAT-RC $?"\n'
        'echo "HEARTBEAT-REPLY$(od -An -tx1 /tmp/hb)"\n'
    )
    with running_vsproxy(
        ["--vm", f"name=enclave,guest-cid=16,socket={vhost}", "--nitro", "--pcap", str(pcap)], vhost, log
    ) as vp:
        out = run_guest(guest, vhost, script)
        text = stop_vsproxy(vp, log)
    return Made(pcap, out, text)


KEYS_BODY = b'{"keys":[{"id":"k1","alg":"ES256"},{"id":"k2","alg":"RS256"}]}\n'
HTTP_REQUEST = b"GET /v1/keys HTTP/1.1\r\nHost: keys.internal\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
HTTP_PORT = 8080


class KeysHandler(BaseHTTPRequestHandler):
    """A tiny key service.  Fixed Date and Server headers keep the capture's bytes the same
    from run to run (and from one Python version to the next)."""

    protocol_version = "HTTP/1.1"
    server_version = "keys-demo/1.0"
    # Buffered: headers and body leave in one send, so vsproxy reads them in one piece and
    # the guest reads them with one read (one CREDIT_UPDATE) whatever the timing.
    wbufsize = 1 << 16
    seen: list[tuple[str, str]] = []  # (method, path) of every request

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path))
        if self.path != "/v1/keys":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(KEYS_BODY)))
        self.end_headers()
        self.wfile.write(KEYS_BODY)

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        return "Thu, 01 Jan 2026 00:00:00 GMT"

    def log_message(self, format: str, *args: object) -> None:
        pass


def make_http(guest: Guest, d: Path) -> tuple[Made, list[tuple[str, str]]]:
    vhost, pcap, log = d / "app.sock", d / "c.pcapng", d / "vsproxy.log"
    request = HTTP_REQUEST.decode().replace("\r", "\\r").replace("\n", "\\n")
    script = f"printf '{request}' | vsock_tool connect 2 {HTTP_PORT}\necho\necho \"HTTP-RC $?\"\n"

    class Handler(KeysHandler):
        seen: list[tuple[str, str]] = []  # this run's requests only

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        args = [
            "--vm",
            f"name=app,guest-cid=5,socket={vhost},forward={HTTP_PORT}=tcp:127.0.0.1:{port}",
            "--pcap",
            str(pcap),
        ]
        with running_vsproxy(args, vhost, log) as vp:
            out = run_guest(guest, vhost, script)
            text = stop_vsproxy(vp, log)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return Made(pcap, out, text), list(Handler.seen)


DENIAL = "denied by not in app's outbound allowlist; vsproxy answers RST"


def make_sibling_denied(guest: Guest, d: Path) -> tuple[Made, str]:
    app, vault = d / "app.sock", d / "vault.sock"
    pcap, log = d / "c.pcapng", d / "vsproxy.log"
    # The app guest waits for the host's GO (on its serial input) until vault's echo server
    # listens, so every run captures the same packets: no retries, no early RSTs.
    app_script = (
        'echo "APP-WAITING"\n'
        "read -t 60 go </dev/console\n"
        "printf 'ping' | vsock_tool connect 6 5002\n"
        'echo "DENIED-RC $?"\n'
        "printf 'hello vault\\n' | vsock_tool connect 6 5001\n"
        'echo "ALLOWED-RC $?"\n'
    )
    vault_script = "vsock_tool echo-server 5001 1\n"
    args = [
        "--vm",
        f"name=app,guest-cid=5,socket={app},allow-out=6:5001",
        "--vm",
        f"name=vault,guest-cid=6,socket={vault},allow-in=5:5001",
        "--pcap",
        str(pcap),
    ]
    with running_vsproxy(args, app, log) as vp:
        with guest.start(vault, vault_script) as vrun, guest.start(app, app_script) as arun:
            vrun.wait_for(r"LISTENING 5001")
            arun.wait_for(r"APP-WAITING")
            assert arun.proc.stdin is not None
            arun.proc.stdin.write(b"GO\n")
            arun.proc.stdin.flush()
            for run in (arun, vrun):
                rc = run.wait_exit()
                assert rc == 0, run.describe(f"guest script exit {rc}")
            app_out, vault_out = arun.result().script_output(), vrun.result().script_output()
        text = stop_vsproxy(vp, log)
    return Made(pcap, app_out, text), vault_out


SEQ_PORT = 5005
SEQ_REPLIES = {b"HELLO": b"HELLO from the host", b"GET region": b"region=eu-west-1", b"BYE": b"BYE"}


def seqpacket_server(listener: socket.socket, got: list[bytes]) -> None:
    """Answers each message with its SEQ_REPLIES entry until the guest closes.  A guest that
    never comes ends it by the timeout; the test then fails on what ``got`` lacks."""
    listener.settimeout(RUN_TIMEOUT)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(RUN_TIMEOUT)
            while msg := conn.recv(65536):
                got.append(msg)
                conn.send(SEQ_REPLIES.get(msg, b"ERR unknown"))
    except OSError as e:
        got.append(f"server: {e!r}".encode())


def make_seqpacket(guest: Guest, d: Path) -> tuple[Made, list[bytes]]:
    vhost, uds, pcap, log = d / "app.sock", d / "app.vsock", d / "c.pcapng", d / "vsproxy.log"
    script = f"vsock_tool seqpacket 2 {SEQ_PORT} HELLO 'GET region' BYE\n"
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(f"{uds}_{SEQ_PORT}")
        listener.listen(1)
        thread = threading.Thread(target=seqpacket_server, args=(listener, got), daemon=True)
        thread.start()
        with running_vsproxy(
            ["--vm", f"name=app,guest-cid=5,socket={vhost},uds-path={uds}", "--pcap", str(pcap)], vhost, log
        ) as vp:
            out = run_guest(guest, vhost, script)
            text = stop_vsproxy(vp, log)
        thread.join(10)
    return Made(pcap, out, text), got


# --------------------------------------------------------------------------
# structure: what the comparison with the committed fixture looks at


class Row(Protocol):
    """A packet as tests/test_capture_fixtures.py's read_packets gives it."""

    device: str
    src: tuple[int, int]  # (cid, port)
    dst: tuple[int, int]
    op: int
    type: int
    flags: int
    payload: bytes
    comment: str


def reader_rows(path: Path) -> list[Row]:
    rows: list[Row] = _fixtures.read_packets(path)
    return rows


class Item(NamedTuple):
    """One packet of a flow, or several consecutive STREAM RW packets taken together."""

    op: str
    flags: int = 0
    payload: bytes = b""
    comment: str = ""


@dataclasses.dataclass
class Flow:
    """One connection as one device saw it: who dialled what, and each side's packets in order."""

    device: str
    initiator: int
    responder: tuple[int, int]
    type: int
    from_initiator: list[Item] = dataclasses.field(default_factory=list)
    from_responder: list[Item] = dataclasses.field(default_factory=list)
    closed: bool = dataclasses.field(default=False, compare=False)

    def add(self, row: Row) -> None:
        side = self.from_initiator if row.src[0] == self.initiator else self.from_responder
        op = H.Op(row.op).name if row.op in H.Op._value2member_map_ else f"op{row.op}"
        if self.closed and row.op in (H.Op.RST, H.Op.CREDIT_UPDATE):
            # Once a side closed both ways (SHUTDOWN 3), which RSTs and credit updates still
            # cross depends on when each guest read its last bytes, as on a kernel link: Linux
            # answers a SHUTDOWN 3 with RST only when nothing is left unread, and a credit
            # update on the freed 4-tuple gets an RST back.
            return
        if row.op == H.Op.CREDIT_UPDATE and any(i.op == "SHUTDOWN" for i in side):
            return  # a side that shut down: when it still reads, and says so, is timing too
        if row.op == H.Op.SHUTDOWN and row.flags == H.SHUTDOWN_BOTH:
            self.closed = True
        last = side[-1] if side else None
        if (
            self.type == H.Type.STREAM
            and row.op == H.Op.RW
            and not row.comment
            and last is not None
            and last.op == op
            and not last.comment
        ):
            # How a byte stream is cut into packets depends on timing (how TCP delivered
            # it): consecutive STREAM RW packets count as one.
            side[-1] = last._replace(payload=last.payload + row.payload)
            return
        side.append(Item(op, row.flags, row.payload, row.comment))


def structure(path: Path) -> list[Flow]:
    """Connections in order of their first packet; ephemeral ports are left out."""
    flows: list[Flow] = []
    current: dict[tuple[str, frozenset[tuple[int, int]]], Flow] = {}
    for row in reader_rows(path):
        key = (row.device, frozenset((row.src, row.dst)))
        flow = current.get(key)
        if flow is None or row.op == H.Op.REQUEST:
            flow = Flow(row.device, row.src[0], row.dst, row.type)
            current[key] = flow
            flows.append(flow)
        flow.add(row)
    return flows


def keep_or_compare(fresh: Path, name: str) -> None:
    committed = CAPTURES / name
    if UPDATE:
        shutil.copyfile(fresh, committed)
        return
    assert committed.is_file(), f"{committed} is missing; make it with {REGENERATE}"
    assert structure(fresh) == structure(committed), (
        f"what crosses vsproxy changed since {committed} was made; if that is intended, regenerate it with {REGENERATE}"
    )


# --------------------------------------------------------------------------
# tests




def test_nitro_heartbeat_capture(guest: Guest, workdir: Path) -> None:
    made = make_nitro_heartbeat(guest, workdir)
    assert "HEARTBEAT-RC 0" in made.serial and "HEARTBEAT-REPLY b7" in made.serial, made.serial
    check_capture_facts("nitro-heartbeat.pcapng", made.capture)
    [f] = structure(made.capture)
    assert (f.device, f.initiator, f.responder, f.type) == ("enclave", 16, (3, 9000), H.Type.STREAM)
    assert f.from_initiator[:2] == [Item("REQUEST"), Item("RW", 0, b"\xb7")]
    assert f.from_responder[:2] == [Item("RESPONSE"), Item("RW", 0, b"\xb7")]
    keep_or_compare(made.capture, "nitro-heartbeat.pcapng")


def test_http_over_vsock_capture(guest: Guest, workdir: Path) -> None:
    made, seen = make_http(guest, workdir)
    assert seen == [("GET", "/v1/keys")]
    assert "HTTP/1.1 200 OK" in made.serial and KEYS_BODY.decode().strip() in made.serial, made.serial
    check_capture_facts("http-over-vsock.pcapng", made.capture)
    [f] = structure(made.capture)
    assert (f.device, f.initiator, f.responder, f.type) == ("app", 5, (2, HTTP_PORT), H.Type.STREAM)
    assert f.from_initiator[:2] == [Item("REQUEST"), Item("RW", 0, HTTP_REQUEST)]
    assert f.from_responder[0] == Item("RESPONSE")
    assert f.from_responder[1].payload.endswith(b"\r\n\r\n" + KEYS_BODY)
    keep_or_compare(made.capture, "http-over-vsock.pcapng")


def test_sibling_denied_capture(guest: Guest, workdir: Path) -> None:
    made, vault_out = make_sibling_denied(guest, workdir)
    assert "CONNECT-FAIL ECONNRESET" in made.serial and "DENIED-RC 2" in made.serial, made.serial
    assert "hello vault" in made.serial and "ALLOWED-RC 0" in made.serial, made.serial
    assert "ACCEPTED 5 " in vault_out and "ECHOED 12" in vault_out, vault_out
    assert "denied by not in app's outbound allowlist" in made.log, made.log
    check_capture_facts("sibling-denied.pcapng", made.capture)
    flows = structure(made.capture)
    summary = [(f.device, f.initiator, f.responder) for f in flows]
    assert summary == [("app", 5, (6, 5002)), ("app", 5, (6, 5001)), ("vault", 5, (6, 5001))], summary
    denied = flows[0]
    assert denied.from_initiator == [Item("REQUEST", comment=DENIAL)]
    assert denied.from_responder == [Item("RST")]
    for allowed in flows[1:]:
        assert allowed.from_initiator[:2] == [Item("REQUEST"), Item("RW", 0, b"hello vault\n")]
        assert Item("RW", 0, b"hello vault\n") in allowed.from_responder
    keep_or_compare(made.capture, "sibling-denied.pcapng")


def test_seqpacket_capture(guest: Guest, workdir: Path) -> None:
    made, got = make_seqpacket(guest, workdir)
    assert got == list(SEQ_REPLIES), got
    for reply in SEQ_REPLIES.values():
        assert f"MSG {len(reply)} - {reply.decode()}" in made.serial, made.serial
    assert "SEQPACKET-DONE 3" in made.serial, made.serial
    check_capture_facts("seqpacket.pcapng", made.capture)
    [f] = structure(made.capture)
    assert (f.device, f.initiator, f.responder, f.type) == ("app", 5, (2, SEQ_PORT), H.Type.SEQPACKET)
    eom_eor = H.SEQ_EOM | H.SEQ_EOR
    assert [i for i in f.from_initiator if i.op == "RW"] == [Item("RW", eom_eor, m) for m in SEQ_REPLIES]
    # unix SOCK_SEQPACKET has no record marks: the host's messages carry EOM only
    assert [i for i in f.from_responder if i.op == "RW"] == [Item("RW", H.SEQ_EOM, m) for m in SEQ_REPLIES.values()]
    keep_or_compare(made.capture, "seqpacket.pcapng")
