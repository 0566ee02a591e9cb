"""``vsproxy replay client FILE --to uds:PATH|tcp:HOST:PORT``: check a live host service against a
capture. Each connection a guest made (and its peer accepted) is played from the guest's side
against the service, and what the service answers is compared with what the capture recorded
(vsproxy/replay/client.py). Connections overlap as the worker pool lets them (``--jobs``), or
start at their recorded times (``--speed realtime|N``).

``--to uds:PATH`` is where vsproxy's ``--uds-path PATH`` would send them: ``PATH_PORT`` (a
SOCK_SEQPACKET socket for SEQPACKET), or PATH itself when it is a socket; ``tcp:HOST:PORT``
takes every connection (STREAM only); ``auto`` routes each as a vsproxy configuration would
(vsproxy/replay/auto.py).

Exit status: 0 every connection answered as recorded; 1 a mismatch or a connection that
failed (a service that is down: one line saying so); 2 a bad command line or nothing to
replay (a damaged capture, not LINKTYPE_VSOCK, no connection a guest made).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TextIO

from vsproxy.filter import FilterError
from vsproxy.replay.auto import AutoError, AutoTarget, NotRoutable, settings_from
from vsproxy.replay.client import Answers, Mismatch, app_aware, compare_answers, plan, replayable
from vsproxy.replay.player import SocketChannel, SpeedError, Timing, play
from vsproxy.replay.progress import Progress
from vsproxy.replay.transcript import Conversation, Transcript, load_transcript
from vsproxy.vsock import header as H

PROG: Final = "vsproxy replay client"
_SEQPACKET: Final = int(H.Type.SEQPACKET)


class UsageError(Exception):
    """Exit 2 with this message."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "uds" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Target:
        kind, _, rest = text.partition(":")
        if kind == "uds" and rest:
            return cls("uds", path=rest)
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            if host and port.isdigit() and 0 < int(port) < 65536:
                return cls("tcp", host=host.strip("[]"), port=int(port))
        raise UsageError(f"--to {text!r}: expected uds:PATH or tcp:HOST:PORT")

    def where(self, conv: Conversation) -> str:
        if self.kind == "tcp":
            return f"tcp:{self.host}:{self.port}"
        if _is_socket(self.path):
            return f"uds:{self.path}"
        port = conv.real_peer[1] if conv.real_peer else conv.server[1]
        return f"uds:{self.path}_{port}"

    def connect(self, conv: Conversation, timeout: float) -> socket.socket:
        """A connected socket for ``conv``. Raises ``OSError``."""
        seq = conv.sock_type == _SEQPACKET
        if self.kind == "tcp":
            if seq:
                raise OSError("TCP carries STREAM only; this connection is SEQPACKET")
            return socket.create_connection((self.host, self.port), timeout=timeout)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if seq else socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.where(conv).removeprefix("uds:"))
        except OSError:
            s.close()
            raise
        return s


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Result:
    conv: Conversation
    where: str
    mismatch: Mismatch | None = None
    error: str | None = None
    back: int = 0  # bytes (or messages) that came back; -1: it was answered, not asked (guest replay's inbound)
    round: int = 1

    @property
    def word(self) -> str:
        return "error" if self.error is not None else "different" if self.mismatch is not None else "same"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Play the guest's side of each connection in a capture against a live "
                "host service and compare its answers with the recorded ones.",
                epilog="Exit status: 0 all answered as recorded, 1 a mismatch or a failed connection, 2 bad "
                "arguments or nothing to replay.")
    p.add_argument("file", metavar="FILE", help="a pcap or pcapng capture")
    p.add_argument("--to", required=True, metavar="uds:PATH|tcp:HOST:PORT|auto",
                   help="the live service; auto: where the vsproxy configuration (--config FILE, or vsproxy's "
                   "options after --) routes each connection")
    p.add_argument("--config", metavar="FILE", help="with --to auto: a vsproxy configuration file")
    add_common(p)
    p.add_argument("--jobs", type=_positive, default=8, metavar="N", help="connections played at once (asap; 8)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S", help="seconds to connect (5)")
    return p


def add_common(p: argparse.ArgumentParser) -> None:
    """The options client and guest replay share."""
    p.add_argument("--filter", metavar="EXPR", default="",
                   help="replay the connections a packet of which matches EXPR (docs/filter.md)")
    p.add_argument("--speed", default="asap", metavar="asap|realtime|N",
                   help="as fast as answers come (default), at the recorded times, or N times as fast")
    p.add_argument("--loop", type=_positive, default=1, metavar="N", help="play the capture N times")
    p.add_argument("--exact", action="store_true", help="compare bytes only, also for HTTP")
    p.add_argument("--ignore-header", action="append", default=[], metavar="NAME",
                   help="an HTTP response header whose value may differ (repeatable)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for an answer that does not come (2)")
    p.add_argument("--json", action="store_true", help="a JSON report on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="print only connections that differ or fail")


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return n


def selected(path: str, filter_text: str) -> tuple[Transcript, list[Conversation], list[str]]:
    """The capture's replayable connections the filter picks, and why others are left out.
    Raises ``UsageError`` when nothing can be replayed."""
    try:
        t = load_transcript(path, filter_text)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    except FilterError as e:
        raise UsageError(f"bad filter: {e}\n{e.render()}") from None
    notes = [f"{path}: {p}" for p in t.problems()]
    chosen = [c for c in t.conversations if c.selected and replayable(c) and not c.lost and not c.cut]
    if not chosen:
        problems = t.problems()
        why = t.error or ("no connection matches the filter" if filter_text else
                          f"no connection a guest made and its peer accepted, whole ({'; '.join(problems)})"
                          if problems else "no connection a guest made and its peer accepted")
        raise UsageError(f"{path}: nothing to replay: {why}")
    return t, chosen, notes


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    options: list[str] = []
    if "--" in argv:  # vsproxy's own options, for --to auto
        i = argv.index("--")
        argv, options = argv[:i], argv[i + 1 :]
    try:
        args = build_parser().parse_args(argv)
        target: Target | AutoTarget
        if args.to == "auto":
            if args.config:
                options = [*options, "--config", args.config]
            if not options:
                raise UsageError("--to auto needs a vsproxy configuration: --config FILE, or vsproxy's options "
                                 "after --")
            target = AutoTarget(settings_from(options))
        elif options or args.config:
            raise UsageError("--config and vsproxy's options after -- go with --to auto")
        else:
            target = Target.parse(args.to)
        timing = Timing.parse(args.speed)
        _t, convs, notes = selected(args.file, args.filter)
    except (UsageError, SpeedError, AutoError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    ignored = frozenset(h.lower() for h in args.ignore_header)

    def one(conv: Conversation, start: float | None, rnd: int) -> Result:
        return replay_one(conv, target, timing, args.timeout, args.connect_timeout, args.exact, ignored, start, rnd)

    try:
        results = run_all(convs, one, timing, args.loop, args.jobs)
    except KeyboardInterrupt:
        return 130
    return report(results, args.json, args.quiet, f"--to {args.to}", sys.stdout)


def replay_one(conv: Conversation, target: Target | AutoTarget, timing: Timing, idle: float, connect_timeout: float,
               exact: bool, ignored: frozenset[str], start: float | None, rnd: int) -> Result:
    where = target.where(conv)
    try:
        sock = target.connect(conv, connect_timeout)
    except NotRoutable as e:
        return Result(conv, where, error=f"not replayed: {e}", round=rnd)
    except OSError as e:
        return Result(conv, where, error=f"cannot connect to {where}: {e.strerror or e}", round=rnd)
    channel = SocketChannel(sock, conv.sock_type == _SEQPACKET)
    answers = Answers(conv.sock_type == _SEQPACKET, app_aware(conv, exact))
    try:
        play(plan(conv, exact), channel, answers, timing, idle, start)
    except OSError as e:
        return Result(conv, where, error=f"{where}: {e.strerror or e}", round=rnd)
    finally:
        channel.close()
    back = len(answers.messages) if answers.seqpacket else len(answers.data)
    return Result(conv, where, compare_answers(conv, answers, exact, ignored), back=back, round=rnd)


OneFn = Callable[[Conversation, "float | None", int], Result]


def run_all(convs: list[Conversation], one: OneFn, timing: Timing, loops: int, jobs: int) -> list[Result]:
    """Every connection, ``loops`` times: asap through a pool of ``jobs``; with a speed, each
    connection starts at its recorded time (so connections that overlapped overlap)."""
    total = len(convs) * loops
    progress = Progress(total, sys.stderr)
    results: list[Result] = []
    lock = threading.Lock()

    def done(f: Future[Result]) -> None:
        with lock:
            progress.step()

    workers = jobs if timing.factor is None else max(jobs, min(256, len(convs)))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for rnd in range(1, loops + 1):
                futures = []
                t0 = time.monotonic()
                first = convs[0].start
                for conv in convs:
                    start: float | None = None
                    if timing.factor is not None:
                        offset = (conv.start - first) / timing.factor
                        delay = t0 + offset - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        start = t0 + offset
                    fut = pool.submit(one, conv, start, rnd)
                    fut.add_done_callback(done)
                    futures.append(fut)
                results += [f.result() for f in futures]
    finally:
        progress.close()
    return results


def report(results: list[Result], as_json: bool, quiet: bool, against: str, out: TextIO) -> int:
    same = sum(r.word == "same" for r in results)
    different = sum(r.word == "different" for r in results)
    errors = [r for r in results if r.error is not None]
    if as_json:
        json.dump({"against": against, "connections": [_json(r) for r in results], "same": same,
                   "different": different, "errors": len(errors)}, out)
        out.write("\n")
    else:
        for r in results:
            if quiet and r.word == "same":
                continue
            rnd = f" (round {r.round})" if r.round > 1 else ""
            if r.error is not None:
                out.write(f"{r.conv.title()}{rnd}: error: {r.error}\n")
            elif r.mismatch is not None:
                out.write(f"{r.conv.title()}{rnd}: different: {r.mismatch.what}\n")
                for line in r.mismatch.lines()[1:]:
                    out.write(f"  {line}\n")
            elif r.back < 0:
                out.write(f"{r.conv.title()}{rnd}: same (answered as recorded on {r.where})\n")
            else:
                unit = "messages" if r.conv.sock_type == _SEQPACKET else "bytes"
                out.write(f"{r.conv.title()}{rnd}: same ({r.back} {unit} back)\n")
        n = len(results)
        out.write(f"{n} connection{'' if n == 1 else 's'} replayed {against}: {same} same, {different} different, "
                  f"{len(errors)} failed\n")
    out.flush()
    if errors and len(errors) == len(results) and all((r.error or "").startswith("cannot connect") for r in errors):
        reasons = {r.error.split(": ", 1)[-1] for r in errors if r.error}
        print(f"{PROG}: the service is not answering ({'; '.join(sorted(reasons))})", file=sys.stderr)
    return 0 if same == len(results) else 1


def _json(r: Result) -> dict[str, object]:
    obj: dict[str, object] = {"id": r.conv.id, "round": r.round, "connection": r.conv.title(), "to": r.where,
                              "result": r.word}
    if r.error is not None:
        obj["error"] = r.error
    if r.mismatch is not None:
        obj["difference"] = r.mismatch.what
        obj["context"] = r.mismatch.lines()[1:]
    return obj
