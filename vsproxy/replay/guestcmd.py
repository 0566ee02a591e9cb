"""``vsproxy replay guest FILE --socket PATH [--guest-cid N]``: play a capture's guest side through a
running vsproxy. The simulated guest (vsproxy/simguest) connects to the vhost-user socket as QEMU
would and makes each connection the capture shows the guest making, so vsproxy's remaps,
allowlists, services and capture apply to it as they did to the real guest; what comes back is
compared with the capture as in client replay (vsproxy/replay/client.py). A connection the
capture shows denied or refused must be refused again.

``--guest-cid N`` picks whose connections to play in a capture of several guests (default: the
device's CID, or the capture's only guest). Connections that overlapped in the capture overlap
(``play_all``), the simulated guest driving them in turn. Connections the peer made toward the
guest are answered as the guest did with ``--serve-inbound S`` (vsproxy/replay/inbound.py): the
guest listens on their ports, and waits up to S seconds after its own connections for them;
without it they are counted and left out.

What the guest sent stays in the capture file until it is sent (vsproxy/replay/bulk.py): memory
does not grow with the capture's guest-to-host bytes, and at ``--speed asap`` the simulated
guest's C sender reads them straight into its tx buffers, each packet as recorded (cut only where
the peer's credit does not hold it, as Linux cuts).

Exit status as ``vsproxy replay client``: 0 all as recorded, 1 a difference or failure (the
socket cannot be reached: one line), 2 bad arguments or nothing to replay.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from vsproxy.replay.bulk import CaptureSource, Pieces, SendStored, StoredStep, load_indexed, plan_stored
from vsproxy.replay.client import Answers, Mismatch, PlanStep, app_aware, compare_answers, plan
from vsproxy.replay.clientcmd import Parser, Result, UsageError, add_common, report
from vsproxy.replay.inbound import InboundServer
from vsproxy.replay.player import SpeedError, Stepper, Timing
from vsproxy.replay.progress import Progress
from vsproxy.replay.server import ReplayBook, scripts_of
from vsproxy.replay.transcript import Conversation, Outcome, Transcript, load_transcript
from vsproxy.simguest import GuestSocket, SimGuest, SimGuestError, SimGuestTimeout
from vsproxy.simguest.cblast import ffi
from vsproxy.simguest.driver import State
from vsproxy.vsock import header as H

PROG: Final = "vsproxy replay guest"
_SEQPACKET: Final = int(H.Type.SEQPACKET)


class GuestChannel:
    """One connection of the simulated guest, as a replay channel."""

    def __init__(self, guest: SimGuest, sock: GuestSocket, seqpacket: bool, timeout: float,
                 pump: Callable[[], None] | None = None) -> None:
        self.guest = guest
        self.sock = sock
        self.seqpacket = seqpacket
        self.timeout = timeout
        self.closed = False
        self.pump = pump  # serves inbound connections while this one waits

    def send(self, data: bytes, eor: bool) -> None:
        if self.seqpacket:
            self.sock.send_message(data, eor)
        else:
            self.sock.sendall(data)

    def send_stored(self, step: SendStored) -> None:
        """Through the C sender when it can take them (each packet as recorded, read from the
        file into a tx buffer), else read back and sent as ``send``."""
        p = step.pieces
        drv = self.guest.driver
        conn = self.sock.conn
        fast = len(p) > 0 and drv.can_send_stored(conn, max(p.lens))
        if fast and self.seqpacket:  # a message must fit the window, as send_message checks
            fast = _largest_message(step) <= min(conn.peer_buf_alloc, conn.buf_alloc)
        if not fast:
            for data, eor in step.chunks():
                self.send(data, eor)
            return
        start = 0
        while start < len(p):  # a run of pieces in one file at a time
            end = start
            while end < len(p) and p.files[end] == p.files[start]:
                end += 1
            fd = step.source.fd(p.files[start])
            drv.send_stored(conn, fd, *_arrays(p, start, end), end - start)
            start = end

    def shut_write(self, flags: int) -> None:
        if flags & H.SHUTDOWN_BOTH == H.SHUTDOWN_BOTH:
            self.close()  # SHUTDOWN(RCV|SEND), then the peer's RST, as Linux's close()
        elif flags & H.SHUTDOWN_SEND:
            self.sock.shutdown_write()

    def abort(self) -> None:
        c = self.sock.conn
        self.guest.send_raw(H.pack(self.guest.guest_cid, c.peer_cid, c.local_port, c.peer_port, 0, c.type, H.Op.RST,
                                   0, c.buf_alloc, c.fwd_cnt))
        self.closed = True

    def receive(self, answers: Answers, timeout: float) -> bool:
        c = self.sock.conn

        def ready() -> bool:
            return bool(c.rx or c.msgs or c.peer_shutdown & H.SHUTDOWN_SEND or c.reset or c.state == State.CLOSED)

        if self.pump is None:
            try:
                self.guest.driver.deadline_wait(ready, timeout, "waiting for an answer")
            except SimGuestTimeout:
                return False
        else:
            deadline = time.monotonic() + timeout
            while not ready():
                self.pump()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.guest.poll(min(left, 0.02))
        if self.seqpacket and c.msgs:
            answers.feed(self.sock.recv_message(0)[0])
        elif not self.seqpacket and c.rx:
            answers.feed(self.sock.recv(1 << 20, 0))
        elif c.reset:
            answers.reset = True
        else:
            answers.ended = True
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close(self.timeout)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Play the guest's side of a capture through a running vsproxy, as a "
                "simulated guest on its vhost-user socket, and compare the answers with the recorded ones.",
                epilog="Exit status: 0 all as recorded, 1 a difference or a failure, 2 bad arguments or nothing "
                "to replay.")
    p.add_argument("file", metavar="FILE", help="a pcap or pcapng capture")
    p.add_argument("--socket", required=True, metavar="PATH", help="the vhost-user socket of a running vsproxy")
    p.add_argument("--guest-cid", type=int, metavar="N", help="play the connections of the capture's guest N")
    p.add_argument("--serve-inbound", type=float, default=0.0, metavar="S",
                   help="also listen on the ports the capture shows the peer connecting to, answer those "
                   "connections as the guest did, and wait up to S seconds after the guest's own for them")
    add_common(p)
    return p


def _largest_message(step: SendStored) -> int:
    p, n, largest = step.pieces, 0, 0
    for k in range(len(p)):
        n += p.lens[k]
        if p.flags[k] & H.SEQ_EOM:
            largest, n = max(largest, n), 0
    return max(largest, n)


def _arrays(p: Pieces, start: int, end: int) -> tuple[Any, Any, Any]:
    """Pieces ``start`` .. ``end - 1`` as the C arrays ``send_stored`` takes (views, no copy)."""
    return (ffi.from_buffer("uint64_t[]", memoryview(p.offs)[start:end]),
            ffi.from_buffer("uint32_t[]", memoryview(p.lens)[start:end]),
            ffi.from_buffer("uint32_t[]", memoryview(p.flags)[start:end]))


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(list(argv))
        timing = Timing.parse(args.speed)
        t, notes, source = load(args.file, args.filter)
    except (UsageError, SpeedError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    ignored = frozenset(h.lower() for h in args.ignore_header)
    try:
        guest = SimGuest(args.socket, timeout=max(args.timeout, 5.0))
        guest.start()
    except (OSError, SimGuestError) as e:
        print(f"{PROG}: cannot attach to {args.socket}: {e}", file=sys.stderr)
        if source is not None:
            source.close()
        return 1
    try:
        results = run(guest, t, args, timing, ignored, source)
    except (OSError, SimGuestError) as e:  # vsproxy went away, or its socket failed, mid-replay
        print(f"{PROG}: {args.socket}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        try:
            guest.close()
        except (OSError, SimGuestError):
            pass
        if source is not None:
            source.close()
    if results is None:
        return 2
    return report(results, args.json, args.quiet, f"through {args.socket}", sys.stdout)


def _made_by(t: Transcript, cid: int) -> list[Conversation]:
    """The whole connections guest ``cid`` made, as the filter selects them."""
    return [c for c in t.conversations if c.selected and c.guest_is_client and c.seen_start
            and not c.lost and not c.cut and c.guest is not None and c.guest[0] == cid]


def run(guest: SimGuest, t: Transcript, args: argparse.Namespace, timing: Timing,
        ignored: frozenset[str], source: CaptureSource | None = None) -> list[Result] | None:
    """Play what the capture shows guest ``--guest-cid`` doing; None when there is nothing to play
    (said on stderr). Raises ``OSError`` and ``SimGuestError`` when vsproxy or its socket fails."""
    cid = args.guest_cid if args.guest_cid is not None else guest.guest_cid
    convs = _made_by(t, cid)
    if not convs and args.guest_cid is None:
        cids = {c.guest[0] for c in t.conversations if c.guest_is_client and c.guest is not None}
        if len(cids) == 1:
            cid = cids.pop()
            convs = _made_by(t, cid)
    inbound = [c for c in t.conversations if c.selected and c.guest_is_client is False and c.guest is not None
               and c.guest[0] == cid and c.outcome is Outcome.ESTABLISHED and not c.lost and not c.cut]
    serving = args.serve_inbound > 0 and bool(inbound)
    if inbound and not serving:
        print(f"{PROG}: {len(inbound)} connection(s) the peer made toward guest {cid} are not replayed "
              "(--serve-inbound S answers them)", file=sys.stderr)
    if not convs and not serving:
        print(f"{PROG}: {args.file}: nothing to replay: no whole connection made by guest {cid}", file=sys.stderr)
        return None
    server = None
    if serving:
        by_id = {c.id for c in inbound}
        book = ReplayBook([s for s in scripts_of(t, made_by_guest=False) if s.conv_id in by_id])
        server = InboundServer(guest, book, len(inbound), max(args.timeout, 5.0))
        server.listen()
    results = play_all(guest, convs, timing, args, ignored, server.pump if server else None, source)
    if server is not None:
        server.serve(time.monotonic() + args.serve_inbound)
        results += inbound_results(server, inbound)
    return results


def load(path: str, filter_text: str, stored: bool = True) -> tuple[Transcript, list[str], CaptureSource | None]:
    """The capture's transcript, what it lacks, and (``stored``, a file: not stdin) the files
    the guest's payload was left in, to close once played; ``UsageError`` when it holds nothing."""
    from vsproxy.filter import FilterError

    source: CaptureSource | None = None
    try:
        if stored and path != "-":
            t, source = load_indexed(path, filter_text)
        else:
            t = load_transcript(path, filter_text)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None
    except FilterError as e:
        raise UsageError(f"bad filter: {e}\n{e.render()}") from None
    if t.error is not None and not t.conversations:
        if source is not None:
            source.close()
        raise UsageError(f"{path}: nothing to replay: {t.error}")
    return t, [f"{path}: {p}" for p in t.problems()], source


def inbound_results(server: InboundServer, inbound: list[Conversation]) -> list[Result]:
    """One result per recorded inbound connection: answered as recorded, not, or never made."""
    by_id = {c.id: c for c in inbound}
    out: list[Result] = []
    seen: set[int] = set()
    for sv in server.finished + server.live:
        script = sv.session.script
        port = sv.sock.local_port
        if script is None:
            conv = inbound[0]
            out.append(Result(conv, f"guest port {port}", sv.mismatch() or Mismatch("matched no recorded connection")))
            continue
        seen.add(script.conv_id)
        conv = by_id[script.conv_id]
        mismatch = sv.mismatch()
        if mismatch is None and sv in server.live:
            mismatch = Mismatch("the peer did not finish the connection")
        out.append(Result(conv, f"guest port {port}", mismatch, back=-1))
    for conv in inbound:
        if conv.id not in seen:
            out.append(Result(conv, f"guest port {conv.server[1]}", error="the peer did not make this connection"))
    return out


@dataclass
class _Active:
    conv: Conversation
    index: int  # where its result goes
    stepper: Stepper
    channel: GuestChannel
    end: float  # its recorded end, seconds after the first connection's start


def play_all(guest: SimGuest, convs: list[Conversation], timing: Timing, args: argparse.Namespace,
             ignored: frozenset[str], pump: Callable[[], None] | None = None,
             source: CaptureSource | None = None) -> list[Result]:
    """Every connection, ``--loop`` times. Connections that overlapped in the capture overlap
    here: one starts at its recorded time (with ``--speed``), or as soon as possible while every
    connection still playing had, in the capture, not ended when it started (asap); otherwise
    once they have all finished, so connections to one port keep their order."""
    results: list[Result] = []
    if not convs:
        return results
    progress = Progress(len(convs) * args.loop, sys.stderr)
    idle = args.timeout
    try:
        for rnd in range(1, args.loop + 1):
            slots: list[Result | None] = [None] * len(convs)
            active: list[_Active] = []
            first = convs[0].start
            t0 = time.monotonic()
            nxt = 0
            while nxt < len(convs) or active:
                now = time.monotonic()
                while nxt < len(convs):
                    conv = convs[nxt]
                    offset = conv.start - first
                    if timing.factor is not None:
                        if now < t0 + offset / timing.factor:
                            break
                    elif active and any(a.end <= offset for a in active):
                        break  # in the capture this one began after one still playing here had ended
                    when = t0 + offset / timing.factor if timing.factor is not None else now
                    started = start_one(guest, conv, idle, args.exact, timing, when, rnd, pump, source)
                    if isinstance(started, Result):
                        slots[nxt] = started
                        progress.step()
                    else:
                        stepper, channel = started
                        active.append(_Active(conv, nxt, stepper, channel, conv.end - first))
                    nxt += 1
                progressed = False
                for a in list(active):
                    try:
                        done = a.stepper.advance(time.monotonic())
                    except (OSError, SimGuestError) as e:
                        slots[a.index] = Result(a.conv, _where(a.conv), error=f"{_where(a.conv)}: {e}", round=rnd)
                        active.remove(a)
                        progress.step()
                        continue
                    if done:
                        slots[a.index] = finish_one(a.conv, a.stepper, a.channel, args.exact, ignored, rnd)
                        active.remove(a)
                        progress.step()
                        progressed = True
                if pump is not None:
                    pump()
                if active and not progressed:
                    guest.poll(0.002)
            results += [r for r in slots if r is not None]
    finally:
        progress.close()
    return results


def _where(conv: Conversation) -> str:
    return f"{conv.server[0]}:{conv.server[1]}"


def start_one(guest: SimGuest, conv: Conversation, idle: float, exact: bool, timing: Timing, start: float, rnd: int,
              pump: Callable[[], None] | None,
              source: CaptureSource | None = None) -> Result | tuple[Stepper, GuestChannel]:
    """Connect: a Result when that is all there is to it (refused, as recorded or not)."""
    peer = conv.server
    where = _where(conv)
    refused_before = conv.outcome in (Outcome.DENIED, Outcome.REFUSED)
    try:
        sock = guest.connect(peer[1], cid=peer[0], type=conv.sock_type, timeout=max(idle, 5.0))
    except ConnectionResetError:
        if refused_before:
            return Result(conv, where, round=rnd)
        return Result(conv, where, Mismatch("refused (RST); the capture shows it accepted"), round=rnd)
    except (OSError, SimGuestError) as e:
        return Result(conv, where, error=f"connecting to {where}: {e}", round=rnd)
    seq = conv.sock_type == _SEQPACKET
    channel = GuestChannel(guest, sock, seq, max(idle, 5.0), pump)
    if refused_before:
        channel.close()
        return Result(conv, where, Mismatch(f"accepted; the capture shows it {conv.outcome.value}"), round=rnd)
    answers = Answers(seq, app_aware(conv, exact))
    steps: list[PlanStep] | list[StoredStep] = (plan(conv, exact) if source is None
                                                else plan_stored(conv, source, exact, timing.factor is None))
    return Stepper(steps, channel, answers, timing, idle, start), channel


def finish_one(conv: Conversation, stepper: Stepper, channel: GuestChannel, exact: bool, ignored: frozenset[str],
               rnd: int) -> Result:
    where = _where(conv)
    try:
        channel.close()
    except (OSError, SimGuestError) as e:
        return Result(conv, where, error=f"{where}: {e}", round=rnd)
    answers = stepper.answers
    back = len(answers.messages) if answers.seqpacket else len(answers.data)
    return Result(conv, where, compare_answers(conv, answers, exact, ignored), back=back, round=rnd)
