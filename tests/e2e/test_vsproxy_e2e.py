"""vsproxy against real Linux guests under QEMU 7.2 and QEMU 10 (TCG).

Every boot costs seconds, so the scenarios share boots.  A *group* is one QEMU
version on one machine type with one vsproxy process.  Its QEMU runs and all
host-side work happen once, on first use (``group_facts``); the tests below
check the facts gathered.  Groups (ids ``qemu7-pc``, ``qemu10-microvm-legacy``...):

  qemu{7,10}-pc (vhost-user-vsock-pci), every scenario:
    run A, boot 1  guest -> host unix 1 MiB (the host answers after EOF);
                   host -> guest 1 MiB through a hybrid CONNECT (no echo);
                   connects to a unix and a TCP port with no listener;
                   20 concurrent connections to a host unix echo server;
                   guest -> --forward TCP echo server; the guest's echo server
                   fed at once by a hybrid CONNECT (1 MiB) and by a --listen
                   TCP connection; a hybrid CONNECT to a guest port with no
                   listener; barrier
    run A, boot 2  after `reboot -f` in the same QEMU (rings stopped and
                   restarted on the same vhost-user connection): 1 MiB to the
                   host, hybrid echo, barrier
    run B          a second QEMU process, same vsproxy: 1 MiB to the host,
                   hybrid echo, barrier
  qemu{7,10}-microvm-{legacy,modern} (vhost-user-vsock-device): run A, one
    boot: 1 MiB to the host, 1 MiB from the host, hybrid echo, barrier.

The guest script runs its steps in order, each bracketed by
``STEP-BEGIN <name>`` / ``STEP-END <name> <rc>`` and bounded by ``timeout``.
The host answers guest markers with ``wait_for``.  The last step of every boot
connects to the host "barrier" socket (``<uds>_6900``) and names itself; the
host takes vsproxy's SIGUSR1 counters while the guest is still up and only
then lets it go on.

All AF_VSOCK sockets are inside the guest; the host side uses unix sockets and
TCP on 127.0.0.1 only.  Logs stay in the printed /tmp/vsp-* directory when
something went wrong (or always with VSPROXY_KEEP_LOGS=1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import harness
import pytest
from guestdata import fnv1a64, prng_bytes

pytestmark = pytest.mark.e2e

MIB = 1 << 20
GUEST_CID = 5
IO_TIMEOUT = 60.0  # seconds a host-side socket waits for progress
STEP_TIMEOUT = 20  # seconds, per guest step (a healthy one takes under 2 s)
RUN_TIMEOUT = 180.0  # deadline for one QEMU run (all its boots); a healthy run takes 5-15 s

Key = tuple[str, int]  # (QEMU run, boot)

# guest -> host (CID 2) ports
SINK_PORTS: dict[Key, int] = {("A", 1): 6001, ("A", 2): 6101, ("B", 1): 6201}  # host sinks at <uds>_P
MULTI_PORT = 6002  # host unix echo server
NO_LISTENER_PORT = 6999  # nothing at <uds>_6999
FORWARD_PORT = 7000  # --forward 7000=tcp:127.0.0.1:<host TCP echo server>
DEAD_FORWARD_PORT = 7001  # --forward 7001=tcp:127.0.0.1:<port nobody listens on>
BARRIER_PORT = 6900
# guest echo-server ports (host -> guest)
ECHO_PORTS: dict[Key, int] = {("A", 1): 5000, ("A", 2): 5100, ("B", 1): 5200}
LISTEN_GUEST_PORT = 5000  # --listen tcp:127.0.0.1:<free port>=5000
GUEST_SINK_PORT = 5300  # guest sink-server in boot A1 (host -> guest only)
NO_GUEST_LISTENER_PORT = 5999

SINK_SEEDS: dict[Key, int] = {("A", 1): 101, ("A", 2): 111, ("B", 1): 121}
SINK_REPLY_BYTES = 64 * 1024  # sent by the host sink after the guest's EOF, seed = sink seed + 1000
HYBRID_SEEDS: dict[Key, int] = {("A", 1): 201, ("A", 2): 211, ("B", 1): 221}
GUEST_SINK_SEED = 301
LISTEN_SEED, LISTEN_BYTES = 202, 256 * 1024
FORWARD_SEED, FORWARD_BYTES = 203, 256 * 1024
MULTI_CONNS, MULTI_BYTES = 20, 64 * 1024
BARRIER_GO = b"BARRIER-GO\n"

# Counters in vsproxy's SIGUSR1 report that must stay 0.
ERROR_COUNTERS = ("spoofed", "bad_pkts", "credit_violations", "bad_chains")


@dataclasses.dataclass(frozen=True)
class Group:
    qemu: str
    machine: str

    @property
    def id(self) -> str:
        return f"{self.qemu}-{self.machine}"

    @property
    def full(self) -> bool:
        """pc groups run every scenario; microvm groups the 1 MiB and echo ones."""
        return self.machine == "pc"

    @property
    def runs(self) -> list[str]:
        return ["A", "B"] if self.full else ["A"]

    def boots(self, run: str) -> list[int]:
        """Run A reboots once on pc; run B (pc only) boots once."""
        if run == "A":
            return [1, 2] if self.full else [1]
        return [1] if run == "B" and self.full else []

    def keys(self) -> list[Key]:
        return [(r, b) for r in self.runs for b in self.boots(r)]

    def is_first_boot(self, key: Key) -> bool:
        return self.full and key == ("A", 1)


ALL_GROUPS = [Group(q, m) for q in harness.QEMU_NAMES for m in harness.MACHINES]
PC_GROUPS = [g for g in ALL_GROUPS if g.full]


def params(groups: list[Group]) -> list[object]:
    return [pytest.param(g, id=g.id) for g in groups]


def label(key: Key) -> str:
    return f"{key[0]}{key[1]}"


# --------------------------------------------------------------------------
# guest scripts

STEP_FN = f'step() {{ n=$1; shift; echo "STEP-BEGIN $n"; timeout {STEP_TIMEOUT} "$@"; echo "STEP-END $n $?"; }}\n'


def guest_script(group: Group, key: Key) -> str:
    lines = [f"step send-unix vsock_tool send 2 {SINK_PORTS[key]} {MIB} {SINK_SEEDS[key]}"]
    if key == ("A", 1):
        lines.append(f"step guest-sink vsock_tool sink-server {GUEST_SINK_PORT}")
    maxconn = 1
    if group.is_first_boot(key):
        lines += [
            f"step no-listener vsock_tool connect 2 {NO_LISTENER_PORT}",
            f"step no-listener-tcp vsock_tool connect 2 {DEAD_FORWARD_PORT}",
            f"step multi vsock_tool multi 2 {MULTI_PORT} {MULTI_CONNS} {MULTI_BYTES}",
            f"step send-tcp vsock_tool send 2 {FORWARD_PORT} {FORWARD_BYTES} {FORWARD_SEED}",
        ]
        maxconn = 2  # the hybrid CONNECT and the --listen TCP connection
    lines.append(f"step echo-server vsock_tool echo-server {ECHO_PORTS[key]} {maxconn}")
    lines.append(f'step barrier sh -c "echo {label(key)} | vsock_tool connect 2 {BARRIER_PORT}"')
    return STEP_FN + "\n".join(lines) + "\nexit 0\n"


@dataclasses.dataclass
class Step:
    lines: list[str]
    rc: int | None  # None: the step never ended


def parse_steps(output: str) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    cur: Step | None = None
    for line in output.splitlines():
        if m := re.search(r"STEP-BEGIN (\S+)", line):
            cur = steps[m.group(1)] = Step([], None)
        elif m := re.search(r"STEP-END (\S+) (\d+)", line):
            if m.group(1) in steps:
                steps[m.group(1)].rc = int(m.group(2))
            cur = None
        elif cur is not None:
            cur.lines.append(line.strip())
    return steps


# --------------------------------------------------------------------------
# host side: threaded servers and clients (unix sockets and 127.0.0.1 only)


def first_mismatch(got: bytes, want: bytes) -> str:
    n = min(len(got), len(want))
    k = next((i for i in range(n) if got[i] != want[i]), n)
    return f"got {len(got)} bytes, want {len(want)}; first difference at offset {k}"


def recv_all(s: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while b := s.recv(65536):
        chunks.append(b)
    return b"".join(chunks)


@dataclasses.dataclass
class Received:
    """What a host server got on one connection."""

    data: bytes = b""
    error: str | None = None


Handler = Callable[[socket.socket], None]


class Server:
    """A listening socket; each accepted connection is handled in its own thread."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self.sock = sock
        self.handler = handler
        self.stopping = False
        sock.settimeout(0.2)
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    @classmethod
    def unix(cls, path: str, handler: Handler) -> Server:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(64)
        return cls(s, handler)

    @classmethod
    def tcp(cls, handler: Handler) -> Server:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        return cls(s, handler)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.settimeout(IO_TIMEOUT)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        with c:
            self.handler(c)

    def close(self) -> None:
        self.stopping = True
        self.acceptor.join(5)
        self.sock.close()
        for t in self.threads:
            t.join(5)


def sink_handler(results: list[Received], reply: bytes) -> Handler:
    """Read to EOF (the guest's SHUT_WR), then answer with `reply` on the half-open
    connection and close."""

    def handle(c: socket.socket) -> None:
        r = Received()
        results.append(r)
        chunks: list[bytes] = []
        try:
            while b := c.recv(65536):
                chunks.append(b)
            c.sendall(reply)
        except OSError as e:
            r.error = f"{type(e).__name__}: {e} (after receiving {sum(map(len, chunks))} bytes)"
        r.data = b"".join(chunks)

    return handle


def echo_handler(results: list[Received]) -> Handler:
    """Echo to EOF, then half-close and drain; keeps what was echoed."""

    def handle(c: socket.socket) -> None:
        r = Received()
        results.append(r)
        chunks: list[bytes] = []
        try:
            while b := c.recv(65536):
                chunks.append(b)
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
            recv_all(c)
        except OSError as e:
            r.error = f"{type(e).__name__}: {e}"
        r.data = b"".join(chunks)

    return handle


REPORT_RE = re.compile(rf"^cid{GUEST_CID}: sessions=\d+.*$", re.MULTILINE)


def take_counters(vp: harness.VsproxyProcess, timeout: float = 15.0) -> dict[str, int]:
    """SIGUSR1 vsproxy and parse the report line it prints (key=value counters)."""
    start = vp.log_path.stat().st_size
    os.kill(vp.pid, signal.SIGUSR1)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = REPORT_RE.search(vp.log_path.read_bytes()[start:].decode(errors="replace"))
        if m:
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(0))}
        time.sleep(0.05)
    raise AssertionError(f"no SIGUSR1 report from vsproxy within {timeout}s")


def barrier_handler(vp: harness.VsproxyProcess, results: dict[str, dict[str, int] | str]) -> Handler:
    """The guest names its boot and waits here: take vsproxy's counters, then let it go on."""

    def handle(c: socket.socket) -> None:
        try:
            name = recv_all(c).decode(errors="replace").strip()  # the guest half-closes after its name
        except OSError as e:
            results[f"?{len(results)}"] = f"barrier read: {e}"
            return
        try:
            results[name] = take_counters(vp)
        except AssertionError as e:
            results[name] = str(e)
        with contextlib.suppress(OSError):
            c.sendall(BARRIER_GO)

    return handle


@dataclasses.dataclass
class EchoResult:
    """A host client that sent data into the guest's echo server."""

    ok_line: str = ""
    sent: int = 0
    received: bytes = b""
    error: str | None = None


def echo_exchange(s: socket.socket, data: bytes, r: EchoResult) -> None:
    """Write data (then SHUT_WR) in a thread while reading the echo to EOF here."""
    werr: list[str] = []

    def writer() -> None:
        try:
            s.sendall(data)
            r.sent = len(data)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            werr.append(f"write: {type(e).__name__}: {e}")

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    chunks: list[bytes] = []
    try:
        while b := s.recv(65536):
            chunks.append(b)
    except OSError as e:
        r.error = f"read: {type(e).__name__}: {e}"
    w.join(IO_TIMEOUT)
    r.received = b"".join(chunks)
    if werr:
        r.error = "; ".join(filter(None, [r.error, *werr]))


def hybrid_connect(uds: Path, guest_port: int, r: EchoResult, timeout: float = IO_TIMEOUT) -> socket.socket | None:
    """`CONNECT <port>` on the hybrid socket; reads the answer line into r.ok_line.

    Returns the connected socket, or None (r.error set) if vsproxy closed it first."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(uds))
        s.sendall(b"CONNECT %d\n" % guest_port)
        line = b""
        while not line.endswith(b"\n"):  # byte by byte: nothing after the line is consumed
            b = s.recv(1)
            if not b:
                r.error = f"hybrid socket closed after {line!r} (no OK line)"
                s.close()
                return None
            line += b
            if len(line) > 64:
                raise OSError(f"no newline in {line!r}")
        r.ok_line = line.decode(errors="replace").rstrip("\n")
        return s
    except OSError as e:
        r.error = f"{type(e).__name__}: {e}"
        s.close()
        return None


def hybrid_echo(uds: Path, guest_port: int, data: bytes) -> EchoResult:
    r = EchoResult()
    s = hybrid_connect(uds, guest_port, r)
    if s is not None:
        with s:
            echo_exchange(s, data, r)
    return r


def hybrid_send(uds: Path, guest_port: int, data: bytes) -> EchoResult:
    """CONNECT, send data, half-close, read until the guest closes."""
    r = EchoResult()
    s = hybrid_connect(uds, guest_port, r)
    if s is not None:
        with s:
            try:
                s.sendall(data)
                r.sent = len(data)
                s.shutdown(socket.SHUT_WR)
                r.received = recv_all(s)
            except OSError as e:
                r.error = f"{type(e).__name__}: {e} (after sending {r.sent} bytes)"
    return r


def tcp_echo(port: int, data: bytes) -> EchoResult:
    r = EchoResult()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
            echo_exchange(s, data, r)
    except OSError as e:
        r.error = f"{type(e).__name__}: {e}"
    return r


def free_tcp_ports(n: int) -> list[int]:
    """n different 127.0.0.1 ports nobody listens on (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


# --------------------------------------------------------------------------
# one group: its vsproxy, its QEMU runs, the facts


@dataclasses.dataclass(repr=False)
class RunFacts:
    run: str
    steps: dict[int, dict[str, Step]]  # boot -> step name -> Step
    exit_codes: list[int]
    qemu_returncode: int | None
    vsproxy_alive_after: bool
    seconds: float
    error: str | None  # harness failure (timeout, QEMU or vsproxy died early), with the serial log
    serial: str

    def __repr__(self) -> str:
        return f"RunFacts({self.run}, exit_codes={self.exit_codes}, error={bool(self.error)})"


@dataclasses.dataclass(repr=False)
class GroupFacts:
    group: Group
    workdir: Path
    runs: dict[str, RunFacts] = dataclasses.field(default_factory=dict)
    sinks: dict[int, list[Received]] = dataclasses.field(default_factory=dict)  # port -> connections
    multi_echo: list[Received] = dataclasses.field(default_factory=list)
    forward_echo: list[Received] = dataclasses.field(default_factory=list)
    hybrid: dict[int, EchoResult] = dataclasses.field(default_factory=dict)  # guest port -> result
    hybrid_to_guest_sink: EchoResult | None = None
    hybrid_no_listener: EchoResult | None = None
    hybrid_no_listener_seconds: float = 0.0
    listen: EchoResult | None = None
    barriers: dict[str, dict[str, int] | str] = dataclasses.field(default_factory=dict)  # "A1" -> counters
    vsproxy_returncode: int | None = None
    vsproxy_log: str = ""
    setup_error: str | None = None
    logs_kept: bool = False

    def __repr__(self) -> str:
        return f"GroupFacts({self.group.id}, runs={list(self.runs.values())})"

    # -- for the tests --
    def run_facts(self, run: str) -> RunFacts:
        if self.setup_error:
            pytest.fail(f"{self.group.id}: {self.setup_error}\n{self.log_tail()}", pytrace=False)
        if run not in self.runs:
            pytest.fail(
                f"{self.group.id}: QEMU run {run} did not happen (an earlier run failed)\n{self.log_tail()}",
                pytrace=False,
            )
        return self.runs[run]

    def step(self, key: Key, name: str) -> Step:
        run, boot = key
        rf = self.run_facts(run)
        st = rf.steps.get(boot, {}).get(name)
        if st is None or st.rc is None:
            pytest.fail(
                f"{self.group.id}: run {run} boot {boot}: step {name!r} "
                f"{'never started' if st is None else 'never ended'}\n{self.run_detail(run)}",
                pytrace=False,
            )
        return st

    def detail(self, key: Key, st: Step) -> str:
        return f"\n{self.group.id} {label(key)}: guest step output: {st.lines} rc={st.rc}\n{self.run_detail(key[0])}"

    def run_detail(self, run: str) -> str:
        rf = self.runs.get(run)
        if rf is None:
            return self.log_tail()
        tail = "\n".join(rf.serial.splitlines()[-60:])
        return f"{rf.error or ''}\n--- serial (last 60 lines) ---\n{tail}\n{self.log_tail()}"

    def log_tail(self) -> str:
        lines = [line for line in self.vsproxy_log.splitlines() if " DEBUG " not in line]
        where = f"logs: {self.workdir}" if self.logs_kept else "logs removed; rerun with VSPROXY_KEEP_LOGS=1"
        return "--- vsproxy log (last 40 non-debug lines) ---\n" + "\n".join(lines[-40:]) + f"\n({where})"

    def barrier(self, key: Key) -> dict[str, int]:
        b = self.barriers.get(label(key))
        if b is None or isinstance(b, str):
            pytest.fail(
                f"{self.group.id}: barrier {label(key)}: {b or 'never reached'} (all: {self.barriers})\n"
                f"{self.run_detail(key[0])}",
                pytrace=False,
            )
        return b

    def looks_bad(self) -> bool:
        """Anything off: keep the logs."""
        if self.setup_error or any(r.error or not r.vsproxy_alive_after for r in self.runs.values()):
            return True
        for rf in self.runs.values():
            for steps in rf.steps.values():
                for name, st in steps.items():
                    if st.rc != (2 if name.startswith("no-listener") else 0):
                        return True
        received = [*self.multi_echo, *self.forward_echo, *(r for rs in self.sinks.values() for r in rs)]
        echoes = [*self.hybrid.values(), self.listen, self.hybrid_to_guest_sink]
        return (
            any(r.error for r in received)
            or any(r is not None and r.error for r in echoes)
            or any(isinstance(b, str) for b in self.barriers.values())
            or self.vsproxy_returncode != 0
            or "Traceback" in self.vsproxy_log
        )


def drive_boot(group: Group, key: Key, guest: harness.GuestRun, uds: Path, listen_port: int, f: GroupFacts) -> None:
    """The host's part of one boot: feed the guest's sink and echo servers once they listen."""
    if key == ("A", 1):
        guest.wait_for(rf"\bLISTENING {GUEST_SINK_PORT}\b")
        f.hybrid_to_guest_sink = hybrid_send(uds, GUEST_SINK_PORT, prng_bytes(GUEST_SINK_SEED, MIB))
    port = ECHO_PORTS[key]
    guest.wait_for(rf"\bLISTENING {port}\b")
    unfinished = f"host client still running after {IO_TIMEOUT * 2:.0f}s"
    f.hybrid[port] = EchoResult(error=unfinished)
    data = prng_bytes(HYBRID_SEEDS[key], MIB)

    def do_hybrid() -> None:
        f.hybrid[port] = hybrid_echo(uds, port, data)

    def do_listen() -> None:
        f.listen = tcp_echo(listen_port, prng_bytes(LISTEN_SEED, LISTEN_BYTES))

    jobs = [threading.Thread(target=do_hybrid, daemon=True)]
    if group.is_first_boot(key):
        f.listen = EchoResult(error=unfinished)
        jobs.append(threading.Thread(target=do_listen, daemon=True))
    for t in jobs:
        t.start()
    if group.is_first_boot(key):
        # The guest driver is up: a CONNECT to a port nobody listens on gets a closed socket.
        t0 = time.monotonic()
        f.hybrid_no_listener = r = EchoResult()
        s = hybrid_connect(uds, NO_GUEST_LISTENER_PORT, r, timeout=20)
        if s is not None:
            with s:
                r.received = recv_all(s)  # anything after a wrong OK line
        f.hybrid_no_listener_seconds = time.monotonic() - t0
    for t in jobs:
        t.join(IO_TIMEOUT * 2)


@contextlib.contextmanager
def vsproxy_watchdog(vp: harness.VsproxyProcess, guest: harness.GuestRun, note: list[str]) -> Iterator[None]:
    """If vsproxy dies during the run, kill QEMU at once (its guest would only hang)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            if vp.poll() is not None:
                note.append(f"vsproxy exited with status {vp.returncode} during the QEMU run")
                guest.kill()
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)


def run_group(group: Group, qemu: harness.Qemu, image: harness.GuestImage) -> GroupFacts:
    workdir = harness.short_tempdir()
    f = GroupFacts(group, workdir)
    uds = workdir / "h.sock"
    servers: list[Server] = []
    vp: harness.VsproxyProcess | None = None
    try:
        for key in group.keys():
            port, seed = SINK_PORTS[key], SINK_SEEDS[key]
            f.sinks[port] = []
            reply = prng_bytes(seed + 1000, SINK_REPLY_BYTES)
            servers.append(Server.unix(f"{uds}_{port}", sink_handler(f.sinks[port], reply)))
        servers.append(Server.unix(f"{uds}_{MULTI_PORT}", echo_handler(f.multi_echo)))
        fwd = Server.tcp(echo_handler(f.forward_echo))
        servers.append(fwd)
        listen_port, dead_port = free_tcp_ports(2)
        args = [
            "--uds-path", str(uds),
            "--forward", f"{FORWARD_PORT}=tcp:127.0.0.1:{fwd.port}",
            "--forward", f"{DEAD_FORWARD_PORT}=tcp:127.0.0.1:{dead_port}",
            "--listen", f"tcp:127.0.0.1:{listen_port}={LISTEN_GUEST_PORT}",
            "-v",
        ]  # fmt: skip
        vp = harness.start_vsproxy(args, socket_path=workdir / "vhost.sock", guest_cid=GUEST_CID)
        servers.append(Server.unix(f"{uds}_{BARRIER_PORT}", barrier_handler(vp, f.barriers)))

        for run in group.runs:
            boots = group.boots(run)
            scripts = [guest_script(group, (run, b)) for b in boots]
            t0 = time.monotonic()
            note: list[str] = []
            error: str | None = None
            with (
                harness.start_guest(
                    qemu,
                    group.machine,
                    vp.socket_path,
                    scripts if len(scripts) > 1 else scripts[0],
                    RUN_TIMEOUT,
                    image=image,
                    log_dir=workdir / f"run{run}",
                ) as guest,
                vsproxy_watchdog(vp, guest, note),
            ):
                try:
                    for b in boots:
                        drive_boot(group, (run, b), guest, uds, listen_port, f)
                    guest.wait_exit()
                except harness.GuestTimeout as e:
                    error = "\n".join([*note, str(e)])
                res = guest.result()
            f.runs[run] = RunFacts(
                run=run,
                steps={b: parse_steps(res.script_output(b)) for b in boots},
                exit_codes=res.exit_codes,
                qemu_returncode=res.qemu_returncode,
                vsproxy_alive_after=vp.poll() is None,
                seconds=time.monotonic() - t0,
                error=error,
                serial=res.serial,
            )
            if error is not None or vp.poll() is not None:
                break
    except Exception as e:  # recorded, so every test of the group reports it (and the group is not rerun)
        f.setup_error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        if vp is not None:
            f.vsproxy_returncode = harness.stop_process(vp, grace=10)
            f.vsproxy_log = vp.log_path.read_text(errors="replace")
        for s in servers:
            s.close()
        f.logs_kept = bool(os.environ.get("VSPROXY_KEEP_LOGS")) or f.looks_bad()
        if f.logs_kept:
            print(f"{group.id}: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return f


@pytest.fixture(scope="session")
def group_facts(
    guest_image: harness.GuestImage, qemu_by_name: Callable[[str], harness.Qemu]
) -> Callable[[Group], GroupFacts]:
    """group_facts(group) -> GroupFacts; each group runs once per session, on first use."""
    cache: dict[Group, GroupFacts] = {}

    def get(group: Group) -> GroupFacts:
        if group not in cache:
            qemu = qemu_by_name(group.qemu)  # fails (never skips) when that QEMU is missing
            t0 = time.monotonic()
            cache[group] = f = run_group(group, qemu, guest_image)
            runs = ", ".join(f"run {r.run} {r.seconds:.1f}s" for r in f.runs.values())
            print(f"\n{group.id} (QEMU {qemu.version}): {time.monotonic() - t0:.1f}s ({runs})")
        return cache[group]

    return get


GroupFactsFn = Callable[[Group], GroupFacts]


# --------------------------------------------------------------------------
# checks shared by several scenarios


def expect_line(st: Step, line: str, detail: str) -> None:
    assert line in st.lines, f"the guest did not print {line!r}{detail}"


def check_send_to_sink(f: GroupFacts, key: Key) -> None:
    """Guest `send` of 1 MiB to the host sink at <uds>_P: the host got exactly the PRNG
    stream; its answer, written after the guest's half-close, reached the guest."""
    st = f.step(key, "send-unix")
    detail = f.detail(key, st)
    reply = prng_bytes(SINK_SEEDS[key] + 1000, SINK_REPLY_BYTES)
    conns = f.sinks[SINK_PORTS[key]]
    assert len(conns) == 1, f"host sink saw {len(conns)} connections{detail}"
    want = prng_bytes(SINK_SEEDS[key], MIB)
    got = conns[0]
    assert got.data == want, f"host sink: {first_mismatch(got.data, want)}; error: {got.error}{detail}"
    assert got.error is None, got.error + detail
    assert st.rc == 0, detail
    expect_line(st, f"SENT {MIB}", detail)
    expect_line(st, f"REPLY {SINK_REPLY_BYTES} {fnv1a64(reply)}", detail)


def check_hybrid_echo(f: GroupFacts, key: Key) -> None:
    """Host CONNECT into the guest's echo server: OK <port>, 1 MiB echoed byte for byte."""
    port = ECHO_PORTS[key]
    st = f.step(key, "echo-server")
    detail = f.detail(key, st)
    r = f.hybrid.get(port)
    assert r is not None, f"the host never connected to guest port {port}{detail}"
    assert r.error is None, f"{r.error} (OK line {r.ok_line!r}, {len(r.received)} bytes back){detail}"
    m = re.fullmatch(r"OK (\d+)", r.ok_line)
    assert m, f"bad hybrid answer {r.ok_line!r}{detail}"
    want = prng_bytes(HYBRID_SEEDS[key], MIB)
    assert r.sent == MIB, detail
    assert r.received == want, first_mismatch(r.received, want) + detail
    # The guest saw the connection come from CID 2 and from the port vsproxy reported.
    expect_line(st, f"ACCEPTED 2 {m.group(1)}", detail)
    expect_line(st, f"ECHOED {MIB}", detail)
    nconn = 2 if f.group.is_first_boot(key) else 1
    expect_line(st, f"ECHO-SERVER-DONE {nconn}", detail)
    assert st.rc == 0, detail


def expected_bytes(group: Group, key: Key) -> tuple[int, int]:
    """Payload bytes (guest -> host, host -> guest) moved in key's boot before its barrier report."""
    tx = MIB + MIB  # 1 MiB to the sink, 1 MiB echoed back to the hybrid client
    rx = SINK_REPLY_BYTES + MIB
    if key == ("A", 1):
        rx += MIB  # into the guest's sink server
    if group.is_first_boot(key):
        tx += MULTI_CONNS * MULTI_BYTES + FORWARD_BYTES + LISTEN_BYTES
        rx += MULTI_CONNS * MULTI_BYTES + FORWARD_BYTES + LISTEN_BYTES
    tx += len(label(key)) + 1  # the barrier connection's name line
    return tx, rx


def check_barrier(f: GroupFacts, key: Key) -> dict[str, int]:
    """vsproxy's counters while the guest waits at the end of key's boot."""
    c = f.barrier(key)
    where = f"{f.group.id}: counters at barrier {label(key)}: {c}\n{f.log_tail()}"
    for k in ERROR_COUNTERS:
        assert c.get(k) == 0, f"{k}={c.get(k)}; " + where
    # One front-end session per QEMU process: run A's reboot keeps session 1.
    assert c.get("sessions") == f.group.runs.index(key[0]) + 1, where
    # Only the barrier connection is left open: nothing leaked from earlier steps.
    assert c.get("conns") == 1, where
    # Byte counters are per session, so they add up over run A's two boots.
    tx = rx = 0
    for step in f.group.keys():
        if step[0] == key[0] and step[1] <= key[1]:
            t, r = expected_bytes(f.group, step)
            tx, rx = tx + t, rx + r + (len(BARRIER_GO) if step != key else 0)
    assert (c.get("tx_bytes"), c.get("rx_bytes")) == (tx, rx), f"want tx_bytes={tx} rx_bytes={rx}; " + where
    return c


# --------------------------------------------------------------------------
# the scenarios


@pytest.mark.parametrize("group", params(ALL_GROUPS))
def test_guest_to_host_unix_1mib(group: Group, group_facts: GroupFactsFn) -> None:
    check_send_to_sink(group_facts(group), ("A", 1))


@pytest.mark.parametrize("group", params(ALL_GROUPS))
def test_host_to_guest_hybrid_echo_1mib(group: Group, group_facts: GroupFactsFn) -> None:
    check_hybrid_echo(group_facts(group), ("A", 1))


@pytest.mark.parametrize("group", params(ALL_GROUPS))
def test_host_to_guest_hybrid_1mib(group: Group, group_facts: GroupFactsFn) -> None:
    """Host -> guest only (no echo): the guest's credit updates keep the host side going."""
    f = group_facts(group)
    key = ("A", 1)
    st = f.step(key, "guest-sink")
    detail = f.detail(key, st)
    r = f.hybrid_to_guest_sink
    assert r is not None, "the host never connected" + detail
    assert r.error is None, f"{r.error} (OK line {r.ok_line!r}){detail}"
    assert re.fullmatch(r"OK \d+", r.ok_line), f"bad hybrid answer {r.ok_line!r}{detail}"
    assert (r.sent, r.received) == (MIB, b""), detail
    expect_line(st, f"RECEIVED {MIB} {fnv1a64(prng_bytes(GUEST_SINK_SEED, MIB))}", detail)
    assert st.rc == 0, detail


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_20_concurrent_guest_connections(group: Group, group_facts: GroupFactsFn) -> None:
    f = group_facts(group)
    key = ("A", 1)
    st = f.step(key, "multi")
    detail = f.detail(key, st)
    expect_line(st, f"MULTI-OK {MULTI_CONNS}", detail)
    assert st.rc == 0, detail
    # The host echo server saw 20 connections, each carrying one intact PRNG stream.
    assert len(f.multi_echo) == MULTI_CONNS, detail
    assert [r.error for r in f.multi_echo] == [None] * MULTI_CONNS, detail
    want = {prng_bytes(i + 1, MULTI_BYTES): i for i in range(MULTI_CONNS)}
    assert sorted(want.get(r.data, -1) for r in f.multi_echo) == list(range(MULTI_CONNS)), detail


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_guest_connect_without_listener_gets_reset(group: Group, group_facts: GroupFactsFn) -> None:
    f = group_facts(group)
    key = ("A", 1)
    for name in ("no-listener", "no-listener-tcp"):  # no <uds>_P socket; a --forward to a closed TCP port
        st = f.step(key, name)
        assert "CONNECT-FAIL ECONNRESET" in st.lines, f.detail(key, st)
        assert st.rc == 2, f.detail(key, st)


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_hybrid_connect_without_guest_listener_is_closed(group: Group, group_facts: GroupFactsFn) -> None:
    f = group_facts(group)
    r = f.hybrid_no_listener
    detail = f"\n{f.run_detail('A')}"
    assert r is not None, "never tried" + detail
    assert r.ok_line == "" and r.received == b"", f"got {r.ok_line!r} {r.received[:64]!r}{detail}"
    assert r.error == "hybrid socket closed after b'' (no OK line)", f"{r.error}{detail}"
    assert f.hybrid_no_listener_seconds < 10, f"closed only after {f.hybrid_no_listener_seconds:.1f}s{detail}"


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_guest_to_host_tcp_forward(group: Group, group_facts: GroupFactsFn) -> None:
    f = group_facts(group)
    key = ("A", 1)
    st = f.step(key, "send-tcp")
    detail = f.detail(key, st)
    want = prng_bytes(FORWARD_SEED, FORWARD_BYTES)
    assert st.rc == 0, detail
    expect_line(st, f"SENT {FORWARD_BYTES}", detail)
    expect_line(st, f"REPLY {FORWARD_BYTES} {fnv1a64(want)}", detail)
    assert len(f.forward_echo) == 1, detail
    assert f.forward_echo[0].error is None, f.forward_echo[0].error + detail
    assert f.forward_echo[0].data == want, first_mismatch(f.forward_echo[0].data, want) + detail


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_host_tcp_listen_into_guest(group: Group, group_facts: GroupFactsFn) -> None:
    f = group_facts(group)
    key = ("A", 1)
    st = f.step(key, "echo-server")
    detail = f.detail(key, st)
    r = f.listen
    assert r is not None, "the host never connected to the --listen port" + detail
    assert r.error is None, f"{r.error} ({len(r.received)} bytes back){detail}"
    want = prng_bytes(LISTEN_SEED, LISTEN_BYTES)
    assert r.received == want, first_mismatch(r.received, want) + detail
    expect_line(st, f"ECHOED {LISTEN_BYTES}", detail)
    assert sum(line.startswith("ACCEPTED 2 ") for line in st.lines) == 2, detail  # hybrid + TCP


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_guest_reboot_in_same_qemu(group: Group, group_facts: GroupFactsFn) -> None:
    """Boot 1 and, after `reboot -f` (rings stopped and restarted on the same vhost-user
    connection), boot 2 both move data both ways, within one front-end session."""
    f = group_facts(group)
    rf = f.run_facts("A")
    assert rf.error is None, f.run_detail("A")
    assert rf.exit_codes == [0, 0], f.run_detail("A")
    assert rf.serial.count("VSPROXY-INIT ") == 2, f.run_detail("A")
    for key in (("A", 1), ("A", 2)):
        check_send_to_sink(f, key)
        check_hybrid_echo(f, key)
        st = f.step(key, "barrier")
        assert st.lines == [BARRIER_GO.decode().strip()], f.detail(key, st)
        check_barrier(f, key)


@pytest.mark.parametrize("group", params(PC_GROUPS))
def test_second_qemu_same_vsproxy(group: Group, group_facts: GroupFactsFn) -> None:
    f = group_facts(group)
    assert f.run_facts("A").vsproxy_alive_after, "vsproxy died with the first QEMU\n" + f.log_tail()
    rf = f.run_facts("B")
    assert rf.error is None, f.run_detail("B")
    assert rf.exit_codes == [0], f.run_detail("B")
    check_send_to_sink(f, ("B", 1))
    check_hybrid_echo(f, ("B", 1))
    assert check_barrier(f, ("B", 1))["sessions"] == 2


@pytest.mark.parametrize("group", params(ALL_GROUPS))
def test_vsproxy_counters(group: Group, group_facts: GroupFactsFn) -> None:
    """At every barrier: no error counters, no leaked connection, every payload byte counted."""
    f = group_facts(group)
    assert sorted(f.barriers) == sorted(label(k) for k in group.keys()), f"{f.barriers}\n{f.log_tail()}"
    for key in group.keys():
        check_barrier(f, key)


@pytest.mark.parametrize("group", params(ALL_GROUPS))
@pytest.mark.c_paths
def test_a_real_guests_data_crosses_the_c_paths(group: Group, group_facts: GroupFactsFn) -> None:
    """Linux's chains take the C paths: guest data sent to the host socket from C (c_pump_sends),
    with the exact byte counts test_vsproxy_counters checks. On -M pc guest memory is one region;
    on microvm (legacy and modern virtio-mmio) it is two, the second behind a non-zero
    mmap_offset, which the C paths' memory table translates as the Python walker does."""
    f = group_facts(group)
    c = f.barrier(group.keys()[0])
    assert c.get("c_pump_sends", 0) > 0, f"{c}\n{f.log_tail()}"


@pytest.mark.parametrize("group", params(ALL_GROUPS))
def test_vsproxy_healthy(group: Group, group_facts: GroupFactsFn) -> None:
    """vsproxy outlived every QEMU run and stopped cleanly on SIGTERM, without a traceback."""
    f = group_facts(group)
    for run in group.runs:
        rf = f.run_facts(run)
        assert rf.vsproxy_alive_after, f"vsproxy died during run {run}\n{f.run_detail(run)}"
        assert rf.error is None, f.run_detail(run)
        assert rf.qemu_returncode == 0, f"QEMU did not power off cleanly\n{f.run_detail(run)}"
    assert f.vsproxy_returncode == 0, f"vsproxy exit status {f.vsproxy_returncode} after SIGTERM\n{f.log_tail()}"
    assert "Traceback" not in f.vsproxy_log, f.vsproxy_log
    errors = [line for line in f.vsproxy_log.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert not errors, "\n".join(errors)
