"""Command line: ``vsproxy [options]`` runs the proxy; ``vsproxy demo`` shows it working.

Logs and reports go to stderr; stdout stays free for a capture stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from vsproxy import config as cfg
from vsproxy.app import ConfigError, Proxy
from vsproxy.capture.writer import MIN_QUEUE_BYTES, QUEUE_BYTES, CaptureOptions
from vsproxy.device import DEFAULT_QUEUE_SIZE
from vsproxy.limits import raise_nofile_limit
from vsproxy.loop import BUSY_POLL_US
from vsproxy.replay.options import add_replay_options, replay_server_rules, set_replay_options, start_host_replays
from vsproxy.vsock.core import DEFAULT_BUF_ALLOC

log = logging.getLogger("vsproxy")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), as ``--version`` prints it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vsproxy")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from vsproxy import __version__

        return f"{__version__} (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vsproxy",
        # no abbreviations (clap takes none either): a misspelled flag is an error naming the nearest one,
        # not silently another flag
        allow_abbrev=False,
        description="vhost-user-vsock backend that routes, fences and shows vsock traffic.",
        epilog="Subcommands: 'vsproxy demo' runs a self-contained session with a simulated guest; "
        "'vsproxy read FILE [FILTER]' prints a capture like tcpdump -r (-V, --follow, --json; "
        "see 'vsproxy read --help'); 'vsproxy ctl PATH stats|conns|events|pcap|watch' talks to --control PATH; "
        "'vsproxy diff A B' compares two captures as transcripts; 'vsproxy replay client|guest FILE' replays one; "
        "'vsproxy tui FILE...|-|--attach PATH' is the terminal UI (see 'vsproxy tui --help'); "
        "'vsproxy eif build|describe' and 'vsproxy enclave run' emulate a Nitro Enclave.",
    )
    p.add_argument("--version", action="version", version=f"vsproxy {package_version()}")
    p.add_argument("--check", action="store_true",
                   help="check the flags, --vm and --config: print the devices and rules that would run (exit 0), "
                   "or every problem found (exit 2); opens no socket")
    p.add_argument("--socket", metavar="PATH", help="vhost-user socket QEMU connects to (one device)")
    p.add_argument("--guest-cid", metavar="N", help="the guest's CID (3..2^32-2; default 3, as vhost-device-vsock)")
    p.add_argument(
        "--uds-path",
        metavar="PATH",
        help="hybrid unix socket: host programs send 'CONNECT <port>\\n'; guest connections to "
        "CID 2 port P go to PATH_P",
    )
    p.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="PORT=tcp:HOST:HPORT",
        help="guest connections to CID 2 PORT go to a TCP address (repeatable)",
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="tcp:HOST:PORT=GUESTPORT",
        help="accept host TCP connections and connect them to GUESTPORT in the guest (repeatable)",
    )
    p.add_argument(
        "--tx-buffer-size",
        metavar="BYTES",
        help=f"per-connection buffer (the buf_alloc advertised to the guest), default {DEFAULT_BUF_ALLOC} "
        "(vhost-device-vsock: 65536; see README)",
    )
    p.add_argument("--queue-size", metavar="N",
                   help=f"the largest ring the front-end may set (default {DEFAULT_QUEUE_SIZE}); a larger one ends "
                   "the session with an error")
    p.add_argument("--groups", metavar="NAME+NAME",
                   help="with --socket: the device's groups; devices sharing one may connect to each other")
    p.add_argument(
        "--vm",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="a device: guest-cid, socket, uds-path, forward-cid, forward-listen, tx-buffer-size, queue-size, "
        "groups (as vhost-device-vsock; _ or -), name, forward, listen, remap, service, allow-out, allow-in, "
        "max-connections, max-pending, max-handshakes, max-buffered, max-control; lists joined with + (repeatable)",
    )
    p.add_argument("--config", metavar="FILE",
                   help="devices and rules from a TOML file ([[vm]] tables) or vhost-device-vsock's YAML (vms:)")
    p.add_argument("--forward-cid", metavar="CID",
                   help="with --socket: guest connections to any CID (siblings only by a group, remap or "
                   "allow-out) go to AF_VSOCK CID:port on the host, as vhost-device-vsock's --forward-cid")
    p.add_argument("--forward-listen", metavar="PORT+PORT",
                   help="with --socket: listen on these host AF_VSOCK ports and connect into the same guest port")
    p.add_argument("--vsock-via-unix", metavar="DIR",
                   help="stand in for AF_VSOCK host sockets with unix sockets in DIR (tests; see README)")
    p.add_argument(
        "--remap",
        action="append",
        default=[],
        metavar="CID[:PORT]=CID[:PORT]",
        help="what guests dial as the first CID goes to the second, for every device (repeatable)",
    )
    p.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="CID:PORT=KIND[:ARG]",
        help="a built-in service (nitro-heartbeat, echo, discard, replay:FILE) at CID:PORT for every device "
        "(repeatable)",
    )
    add_replay_options(p)
    p.add_argument("--allow-out", action="append", default=[], metavar="CID[:PORT]",
                   help="with --socket: the guest may connect only to these (besides services)")
    p.add_argument("--allow-in", action="append", default=[], metavar="CID[:PORT]",
                   help="with --socket: only these may connect to the guest")
    p.add_argument("--nitro", action="store_true",
                   help="what a Nitro Enclave guest needs: heartbeat on 3:9000 and CID 3 remapped to the host")
    p.add_argument("--max-connections", metavar="N",
                   help="per device: connections open at once (host resources held); more get RST "
                   "(default: the device's share of the open-file limit, at most 65536)")
    p.add_argument("--max-pending", metavar="N",
                   help="per device: connections still connecting; more get RST (default: a quarter of "
                   "--max-connections, at least 64)")
    p.add_argument("--max-handshakes", metavar="N",
                   help="per hybrid socket: host connections that have not finished their CONNECT line; "
                   "one more drops the oldest (default: a 16th of the device's share, 2..1024)")
    p.add_argument("--max-buffered", metavar="BYTES",
                   help="per device: guest data held for host sides that do not read (K, M, G allowed); past it "
                   "the connection holding the most gets RST (default 256M)")
    p.add_argument("--max-control", metavar="N",
                   help="per device: control packets (RST, credit updates, ...) waiting for the guest's rx "
                   "buffers; past it the guest's tx ring waits (default 4096)")
    p.add_argument("--control", metavar="PATH",
                   help="serve a control socket at PATH (mode 0600): snapshots, events and live packets for "
                   "'vsproxy ctl PATH ...' (docs/control.md)")
    p.add_argument("--tui", action="store_true",
                   help="watch it in the terminal UI (the data path runs on its own thread; q stops both)")
    p.add_argument("--pcap", metavar="FILE",
                   help="write every packet to FILE (- for stdout) as LINKTYPE_VSOCK, as the kernel's vsockmon")
    p.add_argument("--pcap-format", choices=("pcapng", "pcap"), default="pcapng",
                   help="pcapng (default: one interface per device, direction and marks) or classic pcap")
    p.add_argument("--flush", action="store_true", help="flush the capture after every packet (like tcpdump -U)")
    p.add_argument("--pcap-rotate-size", type=int, default=0, metavar="BYTES",
                   help="start a new capture file (FILE.0, FILE.1, ...) past this size")
    p.add_argument("--pcap-rotate-seconds", type=float, default=0.0, metavar="S",
                   help="start a new capture file every S seconds")
    p.add_argument("--pcap-files", type=int, default=0, metavar="N", help="keep only the newest N capture files")
    p.add_argument("--pcap-buffer", type=int, default=QUEUE_BYTES, metavar="BYTES",
                   help="memory for records waiting to be written (default 64 MiB, at least 2 MiB); "
                   "when it is full, packets are dropped from the capture and counted")
    p.add_argument("--pcap-idle", action="store_true",
                   help="capture only in idle CPU time: the data path never competes with the capture threads, "
                   "and a capture that cannot keep up drops more (counted)")
    p.add_argument("--pcap-lossless", action="store_true",
                   help="never drop a packet from the capture: when the file falls behind, vsproxy stops taking "
                   "from the rings and host sockets until it catches up (the guests are slowed instead)")
    p.add_argument("--busy-poll", type=int, default=BUSY_POLL_US, metavar="USEC",
                   help=f"after traffic, poll for up to USEC microseconds before sleeping (default {BUSY_POLL_US}; "
                   "adaptive, never while idle; 0: always sleep): shorter request/response turns for some CPU")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for every message)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


# The single-device flags, as the --vm keys they stand for (vhost-device-vsock's own flags first).
SINGLE_DEVICE = ("socket", "guest-cid", "uds-path", "forward-cid", "forward-listen", "tx-buffer-size", "queue-size",
                 "groups", "forward", "listen", "allow-out", "allow-in")


def unknown_arguments(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """A problem for each argument argparse did not know, naming the nearest flag."""
    flags = sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--")})
    out: list[str] = []
    after_flag = False
    for item in extra:
        if item.startswith("-") and item != "-":
            word = item.split("=", 1)[0]
            near = cfg.nearest(word.replace("_", "-"), flags)
            out.append(f"unknown option {word!r}" + (f" (did you mean {near!r}?)" if near else ""))
            after_flag = "=" not in item
        elif not after_flag:
            out.append(f"unexpected argument {item!r}")
        else:
            after_flag = False
    return out


def settings_from_args(args: argparse.Namespace, problems: list[str] | None = None, *,
                       paths: bool = False) -> cfg.Settings:
    """Every device and rule from the flags and the config file, checked as a whole (with
    ``paths``, also the folders of the sockets to be made). Every problem found is collected;
    ConfigError carries them all."""
    settings = cfg.Settings()
    settings.problems.extend(problems or [])
    try:
        set_replay_options(args)  # before any rule is made: replay rules take them when made
    except cfg.ConfigError as e:
        settings.problems.append(str(e))
    if args.vsock_via_unix:
        from vsproxy.endpoints.vsock import UnixVsockFactory

        if not os.path.isdir(args.vsock_via_unix):
            settings.problems.append(f"--vsock-via-unix {args.vsock_via_unix}: not a directory")
        else:
            settings.vsock_factory = UnixVsockFactory(args.vsock_via_unix)
    single: list[tuple[str, object]] = []
    for key in SINGLE_DEVICE:
        value = getattr(args, key.replace("-", "_"))
        if value is not None and value != []:
            single.append((key, value))
    if args.socket is not None:
        cfg.add_vm(settings, single, "", flags=True)
    elif single:
        flags = ", ".join("--" + k for k, _ in single)
        settings.problems.append(f"{flags} {'needs' if len(single) == 1 else 'need'} --socket: the single-device "
                                 "flags describe the device served on it (or use --vm)")
    for i, text in enumerate(args.vm):
        try:
            cfg.add_vm(settings, cfg.parse_vm_flag(text), f"--vm #{i + 1}")
        except cfg.ConfigError as e:
            settings.problems.append(str(e))
    if args.config:
        cfg.load_file(args.config, settings)
    for text in args.remap:
        try:
            settings.remaps.append(cfg.parse_remap(text, "--remap"))
        except cfg.ConfigError as e:
            settings.problems.append(str(e))
    for text in args.service:
        try:
            settings.services.append(cfg.parse_service(text, "--service"))
        except cfg.ConfigError as e:
            settings.problems.append(str(e))
    for path in args.replay_server:  # before --nitro's heartbeat, so the capture answers 3:9000
        try:
            settings.services += replay_server_rules(path)
        except cfg.ConfigError as e:
            settings.problems.append(str(e))
            continue
        settings.notes.append(f"--replay-server {path}: " + ", ".join(
            f"{s.cid}:{s.port}" for s in settings.services if s.kind == f"replay:{path}"))
    if args.nitro:
        cfg.nitro(settings)
    limits: dict[str, int | None] = {}
    for key in cfg.LIMIT_KEYS:
        text = getattr(args, key.replace("-", "_"))
        limits[key] = None
        if text is not None:
            try:
                limits[key] = cfg.parse_limit_value(key, text, f"--{key}")
            except cfg.ConfigError as e:
                settings.problems.append(str(e))
    for d in settings.devices:  # the flags apply to every device that does not set its own
        d.max_connections = d.max_connections or limits["max-connections"]
        d.max_pending = d.max_pending or limits["max-pending"]
        d.max_handshakes = d.max_handshakes or limits["max-handshakes"]
        d.max_buffered = d.max_buffered or limits["max-buffered"]
        d.max_control = d.max_control or limits["max-control"]
    cfg.check(settings)
    if paths:
        settings.problems.extend(cfg.path_problems(settings))
    settings.raise_problems()
    return settings


def _folder_missing(path: str) -> str | None:
    folder = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(folder) else folder


def check_process(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    """--check of the process-wide options: their problems, and their rows in the table."""
    problems = capture_problems(args)
    rows: list[tuple[str, str]] = []
    if args.pcap:
        if args.pcap != "-" and (missing := _folder_missing(args.pcap)):
            problems.append(f"--pcap {args.pcap}: directory {missing} does not exist")
        rotate = [f"{flag} {value}" for flag, value in (("rotate-size", args.pcap_rotate_size),
                  ("rotate-seconds", args.pcap_rotate_seconds), ("files", args.pcap_files)) if value]
        rotate += ["lossless"] if args.pcap_lossless else []
        rows.append(("capture", f"{args.pcap} ({args.pcap_format}{', ' if rotate else ''}{', '.join(rotate)})"))
    if args.control:
        if missing := _folder_missing(args.control):
            problems.append(f"--control {args.control}: directory {missing} does not exist")
        rows.append(("control socket", args.control))
    return problems, rows


def capture_problems(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.pcap_rotate_size < 0 or args.pcap_rotate_seconds < 0 or args.pcap_files < 0:
        out.append("--pcap-rotate-size, --pcap-rotate-seconds and --pcap-files must not be negative")
    if args.pcap_buffer < MIN_QUEUE_BYTES:
        out.append(f"--pcap-buffer {args.pcap_buffer}: at least {MIN_QUEUE_BYTES} bytes (2 MiB)")
    if args.pcap_lossless and args.pcap_idle:
        out.append("--pcap-lossless and --pcap-idle: the data path would wait for a writer that runs only in "
                   "idle CPU time; choose one")
    if args.pcap_lossless and not args.pcap:
        out.append("--pcap-lossless needs --pcap FILE (live subscribers never slow the data path)")
    return out


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO if verbose == 0 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="vsproxy: %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "demo":
        from vsproxy.demo import main as demo_main

        return demo_main(args_list[1:])
    if args_list and args_list[0] == "ctl":
        from vsproxy.ctl import main as ctl_main

        return ctl_main(args_list[1:])
    if args_list and args_list[0] == "diff":
        from vsproxy.replay.diffcmd import main as diff_main

        return diff_main(args_list[1:])
    if args_list and args_list[0] == "replay":
        from vsproxy.replay.cmd import main as replay_main

        return replay_main(args_list[1:])
    if args_list and args_list[0] == "read":
        from vsproxy.read import main as read_main

        return read_main(args_list[1:])
    if args_list and args_list[0] == "tui":
        from vsproxy.tui.app import main as tui_main

        return tui_main(args_list[1:])
    if args_list and args_list[0] == "eif":
        from vsproxy.enclave.run import eif_main

        return eif_main(args_list[1:])
    if args_list[:2] == ["enclave", "run"]:
        from vsproxy.enclave.run import run_main

        return run_main(args_list[2:])
    return serve(args_list)


def serve(args_list: list[str], start_children: Callable[[], list[subprocess.Popen[bytes]]] | None = None,
          prog: str = "vsproxy") -> int:
    """vsproxy with these options until a signal stops it (or, with --tui, until the terminal UI
    quits). ``start_children``: programs started once vsproxy serves its sockets (vsproxy
    enclave run's QEMUs); vsproxy stops when the last of them exits, and stops those still
    running when it stops; the status is then the first failure among theirs (0 when every
    one exited with 0)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(args_list)
        problems = unknown_arguments(parser, extra)
        process_problems, process_rows = check_process(args)
        if args.check:
            problems += process_problems
        settings = settings_from_args(args, problems, paths=args.check)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except cfg.ConfigError as e:
        for problem in e.problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
        if args_list and "--check" in args_list:
            print(f"{prog}: {len(e.problems)} problem{'s' if len(e.problems) > 1 else ''} found; nothing was "
                  "started", file=sys.stderr)
        return 2
    if args.check:
        from vsproxy.checkview import render

        sys.stdout.write(render(settings, process_rows))
        return 0
    setup_logging(args.verbose, args.quiet)
    raise_nofile_limit()  # the figure is logged with the limits it gives, at start
    for note in settings.notes:
        print(f"vsproxy: {note}", file=sys.stderr)
    proxy = Proxy(settings.devices, settings.policy(), busy_poll_us=max(0, args.busy_poll))
    try:
        for problem in capture_problems(args):
            raise ConfigError(problem)
        if args.pcap:
            proxy.start_capture(CaptureOptions(args.pcap, args.pcap_format, args.flush, args.pcap_rotate_size,
                                               args.pcap_rotate_seconds, args.pcap_files,
                                               args.pcap_buffer, idle=args.pcap_idle,
                                               lossless=args.pcap_lossless))
        if args.control:
            proxy.start_control(args.control)
        proxy.start()
        start_host_replays(proxy, args.replay_server)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        proxy.close()
        return 2
    children: list[subprocess.Popen[bytes]] = []
    done = threading.Event()
    try:
        if start_children is not None:
            try:
                children = start_children()
            except OSError as e:
                print(f"{prog}: error: cannot start {e.filename or 'a child'}: {e.strerror or e}", file=sys.stderr)
                return 2

            def all_exited() -> None:
                for c in children:
                    c.wait()
                    log.info("%s (pid %d) exited with status %s", c.args[0] if isinstance(c.args, list) else c.args,
                             c.pid, c.returncode)
                if not done.is_set():
                    proxy.stop()

            threading.Thread(target=all_exited, name="vsproxy-children", daemon=True).start()
        stopped_by: list[int] = []

        def stop_children_first(signum: int) -> None:
            """QEMU shuts its vhost-user devices down through their back-end: it is stopped (with
            the signal vsproxy got) while vsproxy still serves it, and vsproxy stops after it."""
            stopped_by.append(signum)

            def run() -> None:
                for c in children:
                    _stop_child(c, signum)
                proxy.stop()

            threading.Thread(target=run, name="vsproxy-stop-children", daemon=True).start()

        if args.tui:
            from vsproxy.tui.app import run_with_proxy

            run_with_proxy(proxy)  # the data path on its own thread; quitting the UI stops it
        else:
            with proxy.signals(stop_children_first if children else None):
                proxy.run()
    finally:
        done.set()
        rcs = [_stop_child(c) for c in children]
        if not args.tui:  # (run_with_proxy reports and closes itself, once the screen is back)
            proxy.stop_capture()
            proxy.report()
        proxy.close()
    if children and stopped_by:  # stopped by Ctrl-C or SIGTERM: the status a shell gives a program it stopped
        return 128 + stopped_by[0]
    # a child ended by a signal reports as a shell would: 128 + the signal
    status = next((rc if rc > 0 else 128 - rc for rc in rcs if rc != 0), 0)
    if not status and proxy.capture is not None and proxy.capture.error is not None:
        return 1  # the capture asked for stopped early (disk full): said at the time and in the report
    return status


def _stop_child(child: subprocess.Popen[bytes], signum: int = signal.SIGTERM, grace: float = 5.0) -> int:
    """The child's exit status, ending it (``signum``, then SIGKILL after ``grace``) if it runs."""
    if child.poll() is None:
        child.send_signal(signum)
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return child.returncode
