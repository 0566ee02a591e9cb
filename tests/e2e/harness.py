"""Real-guest harness for the vsproxy end-to-end tests.

Pieces:
  build_guest()          build (or reuse) the guest kernel + initramfs via
                         tests/guest/build.sh; cached per process and on disk.
  find_qemus()           {"qemu7": Qemu, "qemu10": Qemu}: the system QEMU 7.2 and
                         QEMU 10 from bookworm-backports (tests/guest/qemu10.sh).
  require_qemu(name)     one of them, or QemuMissing with a clear message (the
                         tests fail on a missing QEMU; nothing is skipped).
  start_guest(...)       context manager: start QEMU (TCG) and yield a GuestRun
                         that streams the serial console: wait_for(regex),
                         wait_exit(), serial text, per-boot script exit codes.
  boot_guest(...)        run a guest to completion and return a GuestResult.
  start_vsproxy(...)     start `python -m vsproxy` and wait for its socket;
                         stop_process() ends it (SIGTERM, then SIGKILL, by pid).

Machines (`machine=`):
  "pc"              -machine pc, -device vhost-user-vsock-pci
  "microvm-legacy"  -machine microvm, -device vhost-user-vsock-device
                    (legacy virtio-mmio, QEMU's default)
  "microvm-modern"  the same plus -global virtio-mmio.force-legacy=false

The guest script (a busybox sh script) runs as root in the guest's /tmp with
/bin/vsock_tool available; its stdout+stderr go to the serial console.  The
guest /init prints `VSPROXY-SCRIPT-EXIT <rc>` after it and stops the VM.

Reboot scenario: pass `script=[part1, part2, ...]` (or `boots=N` with one
script that looks at $VSPROXY_BOOT).  QEMU then runs without -no-reboot; the
guest /init asks the host for its boot number over the serial console
(`VSPROXY-BOOT-SYNC` -> host answers `HOSTBOOT <n> <reboot|poweroff>`), runs the
part for that boot, and ends with `reboot -f` (a guest reset inside the same
QEMU: the vsock rings stop and start again on the same vhost-user connection)
on every boot but the last, which powers off.  If the last boot does not make
QEMU exit by itself, the harness kills it after the last exit marker.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

StrPath: TypeAlias = "str | os.PathLike[str]"
QemuSpec: TypeAlias = "Qemu | str | tuple[str | os.PathLike[str], Sequence[str]]"

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = REPO / "tests" / "guest"
SYSTEM_QEMU = Path("/usr/bin/qemu-system-x86_64")
MACHINES = ("pc", "microvm-legacy", "microvm-modern")

EXIT_RE = re.compile(r"VSPROXY-SCRIPT-EXIT (-?\d+)")
INIT_RE = re.compile(r"VSPROXY-INIT (\S+)")

# x86 COMMAND_LINE_SIZE is 2048; longer scripts go into an appended cpio archive.
_MAX_CMDLINE_SCRIPT = 1400


def cache_root() -> Path:
    return Path(os.environ.get("VSPROXY_CACHE") or Path.home() / ".cache" / "vsproxy")


# --------------------------------------------------------------------------
# guest image and QEMU binaries


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_release: str
    vsock_tool: Path  # host copy of the guest's static binary


class HarnessError(RuntimeError):
    pass


class GuestTimeout(HarnessError):
    pass


def _run_script(argv: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(
            f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc.stdout


@functools.cache
def build_guest(cache_dir: str | None = None) -> GuestImage:
    """Build (or reuse) the guest image with tests/guest/build.sh."""
    d = Path(cache_dir) if cache_dir else cache_root() / "guest"
    _run_script(["bash", str(GUEST_SRC / "build.sh"), str(d)], "tests/guest/build.sh")
    img = GuestImage(
        kernel=d / "vmlinuz",
        initrd=d / "initramfs.cpio.gz",
        kernel_release=(d / "kernel-version").read_text().strip(),
        vsock_tool=d / "vsock_tool",
    )
    for p in (img.kernel, img.initrd):
        if not p.is_file():
            raise HarnessError(f"build.sh did not produce {p}")
    return img


@dataclasses.dataclass(frozen=True)
class Qemu:
    name: str
    path: Path
    extra_args: tuple[str, ...] = ()

    @functools.cached_property
    def version(self) -> str:
        out = _run_script([str(self.path), *self.extra_args, "--version"], "qemu --version")
        m = re.search(r"version (\S+)", out)
        return m.group(1) if m else out.strip()

    def as_tuple(self) -> tuple[str, list[str]]:
        return str(self.path), list(self.extra_args)


@functools.cache
def qemu10(cache_dir: str | None = None) -> Qemu:
    """QEMU 10 from bookworm-backports, unpacked by tests/guest/qemu10.sh."""
    d = Path(cache_dir) if cache_dir else cache_root()
    out = _run_script(["bash", str(GUEST_SRC / "qemu10.sh"), str(d)], "tests/guest/qemu10.sh")
    path = Path(out.strip().splitlines()[-1])
    share = path.parent.parent / "share" / "qemu"
    return Qemu("qemu10", path, ("-L", str(share)))


def qemu7() -> Qemu:
    if not SYSTEM_QEMU.exists():
        raise HarnessError(f"{SYSTEM_QEMU} missing (apt-get install qemu-system-x86)")
    return Qemu("qemu7", SYSTEM_QEMU)


class QemuMissing(HarnessError):
    """A QEMU the tests need is not available.  The tests fail on it, never skip."""


QEMU_NAMES = ("qemu7", "qemu10")
_QEMU_ERRORS: dict[str, str] = {}


def require_qemu(name: str) -> Qemu:
    """The QEMU called name ("qemu7" or "qemu10"), or QemuMissing with the reason.

    A failure is remembered for the rest of the process, so a missing QEMU 10
    costs one run of qemu10.sh (apt-get), not one per test."""
    if name not in QEMU_NAMES:
        raise ValueError(f"unknown QEMU {name!r} (one of {QEMU_NAMES})")
    if name in _QEMU_ERRORS:
        raise QemuMissing(_QEMU_ERRORS[name])
    try:
        return qemu7() if name == "qemu7" else qemu10()
    except HarnessError as e:
        how = "apt-get install qemu-system-x86" if name == "qemu7" else "bash tests/guest/qemu10.sh"
        _QEMU_ERRORS[name] = (
            f"{name} is required by the end-to-end tests but is not available; "
            f"missing tools fail the tests, they are never skipped (get it with: {how}).\n{e}"
        )
        raise QemuMissing(_QEMU_ERRORS[name]) from None


def find_qemus() -> dict[str, Qemu]:
    """{"qemu7": system QEMU 7.2, "qemu10": backports QEMU 10}; QemuMissing if either is missing."""
    return {name: require_qemu(name) for name in QEMU_NAMES}


def _as_qemu(qemu: QemuSpec) -> Qemu:
    if isinstance(qemu, Qemu):
        return qemu
    if isinstance(qemu, tuple):
        path, extra = qemu
        p = Path(path)
        name = "qemu7" if p == SYSTEM_QEMU else "qemu10" if "qemu10" in str(p) else p.name
        return Qemu(name, p, tuple(extra))
    if qemu == "qemu7":
        return qemu7()
    if qemu == "qemu10":
        return qemu10()
    return Qemu(Path(qemu).name, Path(qemu))


@functools.cache
def host_tsc_khz() -> int | None:
    """Host CPU kHz from /proc/cpuinfo, for the microvm guest's tsc_early_khz."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


# --------------------------------------------------------------------------
# QEMU command line


def _newc_entry(name: str, data: bytes, mode: int, ino: int) -> bytes:
    nameb = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0]
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = hdr + nameb
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def _script_cpio(script: bytes) -> bytes:
    return (
        _newc_entry("vsproxy", b"", 0o040755, 900001)
        + _newc_entry("vsproxy/script", script, 0o100755, 900002)
        + _newc_entry("TRAILER!!!", b"", 0, 0)
    )


def _combine_scripts(scripts: Sequence[str]) -> str:
    """One script that runs scripts[n-1] on boot n (by $VSPROXY_BOOT)."""
    parts = ['case "$VSPROXY_BOOT" in']
    for i, s in enumerate(scripts, 1):
        enc = base64.b64encode(s.encode()).decode()
        parts.append(f"{i}) echo {enc} | base64 -d > /tmp/part.sh ;;")
    parts.append('*) echo "no script for boot $VSPROXY_BOOT"; exit 99 ;;')
    parts.append("esac")
    parts.append("sh /tmp/part.sh")
    return "\n".join(parts) + "\n"


@dataclasses.dataclass
class GuestConfig:
    qemu: Qemu
    machine: str
    image: GuestImage
    vhost_socket: str | None
    script: str
    boots: int = 1
    mem: str = "256M"
    append: str = ""
    end: str = "poweroff"


def _build_command(cfg: GuestConfig, workdir: Path) -> list[str]:
    if cfg.machine not in MACHINES:
        raise ValueError(f"machine must be one of {MACHINES}, not {cfg.machine!r}")
    microvm = cfg.machine.startswith("microvm")
    reboot = cfg.boots > 1

    # The script: on the kernel command line when short, else in a cpio archive
    # appended to the initramfs (the kernel unpacks concatenated archives).
    enc = base64.b64encode(cfg.script.encode()).decode()
    initrd = cfg.image.initrd
    cmdline = ["console=ttyS0", "loglevel=4", "panic=-1", "edd=off"]
    if microvm:
        khz = host_tsc_khz()
        if khz:
            cmdline.append(f"tsc_early_khz={khz}")
        # Linux's default reboot path probes the absent keyboard controller with
        # TSC-timed delays and often hangs under TCG: use a triple fault.
        cmdline.append("reboot=t")
    # How the guest stops after the script.  poweroff works on pc and on
    # microvm with acpi=on; in the reboot scenario the host tells each boot.
    cmdline.append(f"vsproxy.end={cfg.end}")
    if reboot:
        cmdline.append("vsproxy.bootsync=1")
    if len(enc) <= _MAX_CMDLINE_SCRIPT:
        cmdline.append(f"vsproxy.script={enc}")
    else:
        base = cfg.image.initrd.read_bytes()
        initrd = workdir / "initrd-with-script.cpio"
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + _script_cpio(cfg.script.encode()))
    if cfg.append:
        cmdline.append(cfg.append)

    argv = [
        str(cfg.qemu.path), *cfg.qemu.extra_args,
        "-accel", "tcg",
        "-m", cfg.mem, "-smp", "1",
        "-nodefaults", "-display", "none",
        "-serial", "stdio",
        "-object", f"memory-backend-memfd,id=mem,size={cfg.mem},share=on",
    ]  # fmt: skip
    if not reboot:
        argv.append("-no-reboot")
    if microvm:
        argv += ["-machine", "microvm,memory-backend=mem,acpi=on,rtc=on"]
    else:
        argv += ["-machine", "pc,memory-backend=mem"]
    if cfg.vhost_socket:
        argv += ["-chardev", f"socket,id=c0,path={cfg.vhost_socket}"]
        dev = "vhost-user-vsock-device" if microvm else "vhost-user-vsock-pci"
        argv += ["-device", f"{dev},chardev=c0"]
    if cfg.machine == "microvm-modern":
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    argv += ["-kernel", str(cfg.image.kernel), "-initrd", str(initrd)]
    argv += ["-append", " ".join(cmdline)]
    return argv


# --------------------------------------------------------------------------
# running a guest


@dataclasses.dataclass
class GuestResult:
    serial: str
    exit_codes: list[int]  # script exit code per boot
    timings: dict[str, float]
    qemu_returncode: int | None
    qemu_stderr: str
    log_dir: Path  # removed after a successful run unless kept (see start_guest)

    @property
    def rc(self) -> int:
        """Exit code of the last boot's script."""
        return self.exit_codes[-1]

    def script_output(self, boot: int = 1) -> str:
        return _script_output(self.serial, boot)


def _script_output(serial: str, boot: int) -> str:
    lines = serial.splitlines()
    n = 0
    out: list[str] | None = None
    for line in lines:
        if "VSPROXY-SCRIPT-BEGIN" in line:
            n += 1
            out = [] if n == boot else None
            continue
        if out is not None:
            if EXIT_RE.search(line):
                return "\n".join(out)
            out.append(line)
    return "\n".join(out or [])


class GuestRun:
    """A running QEMU guest whose serial console is streamed line by line."""

    def __init__(self, cfg: GuestConfig, timeout: float, log_dir: Path):
        self.cfg = cfg
        self.timeout = timeout
        self.log_dir = log_dir
        self.serial_path = log_dir / "serial.log"
        self.stderr_path = log_dir / "qemu-stderr.log"
        self.argv = _build_command(cfg, log_dir)
        self.lines: list[str] = []
        self.exit_codes: list[int] = []
        self.timings: dict[str, float] = {}
        self._partial = ""
        self._cursor = 0
        self._boots_seen = 0
        self._cond = threading.Condition()
        self._eof = False
        (log_dir / "cmdline.txt").write_text(shlex.join(self.argv) + "\n")
        self._stderr_f = open(self.stderr_path, "wb")
        self._serial_f = open(self.serial_path, "wb")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_f,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    # ---- reader thread ----
    def _read_loop(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self._serial_f.write(chunk)
            self._serial_f.flush()
            text = self._partial + chunk.decode("utf-8", "replace")
            *complete, self._partial = text.split("\n")
            if complete:
                with self._cond:
                    for line in complete:
                        self._on_line(line.rstrip("\r"))
                    self._cond.notify_all()
        with self._cond:
            if self._partial:
                self._on_line(self._partial.rstrip("\r"))
                self._partial = ""
            self._eof = True
            self._cond.notify_all()

    def _on_line(self, line: str) -> None:
        now = time.monotonic() - self.t0
        self.lines.append(line)
        if INIT_RE.search(line):
            self._boots_seen += 1
            self.timings.setdefault(f"init{self._boots_seen}", now)
        elif "VSPROXY-BOOT-SYNC" in line:
            n = self._boots_seen
            end = "reboot" if n < self.cfg.boots else "poweroff"
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(f"HOSTBOOT {n} {end}\n".encode())
                self.proc.stdin.flush()
            except OSError:
                pass
        else:
            m = EXIT_RE.search(line)
            if m:
                self.exit_codes.append(int(m.group(1)))
                self.timings[f"exit{len(self.exit_codes)}"] = now

    # ---- waiting ----
    @property
    def serial(self) -> str:
        with self._cond:
            return "\n".join(self.lines + ([self._partial] if self._partial else []))

    def _fail(self, msg: str) -> None:
        self.kill()
        raise GuestTimeout(self.describe(msg))

    def describe(self, msg: str) -> str:
        try:
            err = self.stderr_path.read_text(errors="replace")
        except OSError:
            err = ""
        tail = "\n".join(self.serial.splitlines()[-80:])
        return (
            f"{msg}\n  qemu: {self.cfg.qemu.name} machine: {self.cfg.machine} "
            f"returncode: {self.proc.poll()}\n  logs: {self.log_dir}\n"
            f"--- qemu command ---\n{shlex.join(self.argv)}\n"
            f"--- qemu stderr ---\n{err}\n--- serial (last 80 lines) ---\n{tail}"
        )

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float | None = None, from_start: bool = False
    ) -> re.Match[str]:
        """Wait for a serial line matching pattern (re.search).

        Lines are consumed in order: the search starts after the line matched by
        the previous wait_for (or from the first line with from_start=True).
        Fails (killing QEMU) on timeout or when QEMU exits first.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        end = min(self.deadline, time.monotonic() + timeout) if timeout else self.deadline
        i = 0 if from_start else self._cursor
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        self._cursor = max(self._cursor, i)
                        return m
                if self._eof:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        if self._eof:
            self.proc.wait()
            self._fail(f"QEMU ended before a serial line matched {rx.pattern!r}")
        self._fail(f"timeout waiting for serial line {rx.pattern!r}")
        raise AssertionError("unreachable")

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for the last boot's VSPROXY-SCRIPT-EXIT and for QEMU to end.

        Returns the last script exit code.  QEMU is killed if it has not ended
        a few seconds after the last marker (or at once in reboot mode)."""
        end = min(self.deadline, time.monotonic() + timeout) if timeout else self.deadline
        with self._cond:
            while len(self.exit_codes) < self.cfg.boots and not self._eof:
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            done = len(self.exit_codes) >= self.cfg.boots
        if not done:
            if self._eof:
                self.proc.wait()
                self._fail(f"QEMU ended after {len(self.exit_codes)} of {self.cfg.boots} VSPROXY-SCRIPT-EXIT markers")
            self._fail(
                f"timeout ({self.timeout:.0f}s) waiting for VSPROXY-SCRIPT-EXIT "
                f"({len(self.exit_codes)} of {self.cfg.boots} seen)"
            )
        try:
            self.proc.wait(timeout=max(1.0, min(10.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            self.kill()
        self._reader.join(5)
        self.timings.setdefault("qemu_exit", time.monotonic() - self.t0)
        return self.exit_codes[-1]

    def kill(self) -> None:
        """Kill QEMU (by its own pid) if it is still running."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.kill()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._reader.join(5)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        self._stderr_f.close()
        self._serial_f.close()

    def result(self) -> GuestResult:
        return GuestResult(
            serial=self.serial,
            exit_codes=list(self.exit_codes),
            timings=dict(self.timings),
            qemu_returncode=self.proc.poll(),
            qemu_stderr=self.stderr_path.read_text(errors="replace"),
            log_dir=self.log_dir,
        )


@contextlib.contextmanager
def start_guest(
    qemu: QemuSpec,
    machine: str,
    vhost_socket: str | StrPath | None,
    script: str | Sequence[str],
    timeout: float = 120.0,
    *,
    image: GuestImage | None = None,
    boots: int | None = None,
    mem: str = "256M",
    append: str = "",
    end: str = "poweroff",
    log_dir: str | StrPath | None = None,
) -> Iterator[GuestRun]:
    """Start a guest and yield its GuestRun; QEMU is killed on exit.

    qemu: a Qemu, "qemu7"/"qemu10", a path, or a (path, extra_args) tuple.
    script: shell script for the guest, or a list of scripts, one per boot
    (reboot scenario).  timeout: overall deadline in seconds for the run.
    append: extra kernel command-line words.  end: how the guest stops after
    a single-boot script: "poweroff" (default), "reboot" or "halt"; QEMU runs
    with -no-reboot unless there are several boots.
    """
    q = _as_qemu(qemu)
    if isinstance(script, str):
        scripts = None
        text = script
        nboots = boots or 1
    else:
        scripts = list(script)
        text = _combine_scripts(scripts)
        nboots = boots or len(scripts)
    if vhost_socket is not None and not os.path.exists(vhost_socket):
        raise HarnessError(f"vhost-user socket {vhost_socket} does not exist (start the backend first)")
    d = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix=f"vsproxy-{q.name}-{machine}-"))
    d.mkdir(parents=True, exist_ok=True)
    cfg = GuestConfig(
        qemu=q,
        machine=machine,
        image=image or build_guest(),
        vhost_socket=str(vhost_socket) if vhost_socket is not None else None,
        script=text,
        boots=nboots,
        mem=mem,
        append=append,
        end=end,
    )
    run = GuestRun(cfg, timeout, d)
    ok = False
    try:
        yield run
        ok = True
    finally:
        run.close()
        # Logs are kept when the run failed, when log_dir was given, or with
        # VSPROXY_KEEP_LOGS=1; otherwise the temporary directory is removed.
        if ok and not log_dir and not os.environ.get("VSPROXY_KEEP_LOGS"):
            shutil.rmtree(d, ignore_errors=True)


def boot_guest(
    qemu: QemuSpec,
    machine: str,
    vhost_socket: str | StrPath | None,
    script: str | Sequence[str],
    timeout: float = 120.0,
    **kw: Any,
) -> GuestResult:
    """Boot, run the script(s) to the end and return the GuestResult.

    Raises GuestTimeout (with the serial log) on timeout or if QEMU dies early.
    """
    with start_guest(qemu, machine, vhost_socket, script, timeout, **kw) as run:
        run.wait_exit()
        return run.result()


# --------------------------------------------------------------------------
# vsproxy process


def short_tempdir(prefix: str = "vsp-") -> Path:
    """A short directory under /tmp (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class VsproxyProcess(subprocess.Popen[bytes]):
    """A running `python -m vsproxy`."""

    socket_path: Path
    log_path: Path
    argv: list[str]


def start_vsproxy(
    args: Sequence[str] = (),
    *,
    socket_path: StrPath,
    guest_cid: int = 5,
    log_path: str | StrPath | None = None,
    timeout: float = 10.0,
    env: dict[str, str] | None = None,
) -> VsproxyProcess:
    """Start `python -m vsproxy --socket SOCK --guest-cid N ARGS...`.

    Waits until SOCK exists (timeout seconds); output goes to log_path
    (default SOCK + ".log").  The returned Popen has .socket_path, .log_path and .argv.
    """
    sock = Path(socket_path)
    log = Path(log_path) if log_path else sock.with_name(sock.name + ".log")
    argv = [sys.executable, "-m", "vsproxy", "--socket", str(sock), "--guest-cid", str(guest_cid), *args]
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("PYTHONUNBUFFERED", "1")
    logf = open(log, "wb")
    proc = VsproxyProcess(argv, cwd=str(REPO), env=e, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    logf.close()
    proc.socket_path = sock
    proc.log_path = log
    proc.argv = argv
    end = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise HarnessError(
                f"vsproxy exited with {proc.returncode} before creating {sock}\n"
                f"command: {shlex.join(argv)}\n--- log ---\n{log.read_text(errors='replace')}"
            )
        if time.monotonic() > end:
            stop_process(proc)
            raise HarnessError(
                f"vsproxy did not create {sock} within {timeout}s\n"
                f"command: {shlex.join(argv)}\n--- log ---\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.05)
    return proc


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after `grace` seconds, by the process's own pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode
