"""Playing a plan (vsproxy/replay/client.py) over a channel: the I/O half of client and guest
replay. A ``Channel`` is one live connection (a host socket, or a simulated guest's socket);
``play`` sends what the plan says, at the plan's times when a speed is given, and collects the
answers, waiting for each ``Await`` until it is met, the stream ends, or nothing has come for
``idle`` seconds.

``Timing`` turns ``--speed`` into waits: ``asap`` never sleeps, ``realtime`` keeps the recorded
gaps, ``N`` divides them by N.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vsproxy.replay.bulk import SendStored, StoredStep
from vsproxy.replay.client import Abort, Answers, Await, PlanStep, Send, ShutWrite

SEND_TIMEOUT = 30.0  # seconds a live service may take to make room for what the replay sends


class SpeedError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Timing:
    factor: float | None  # None: as soon as possible; else recorded seconds are divided by it

    @classmethod
    def parse(cls, text: str) -> Timing:
        if text == "asap":
            return cls(None)
        if text == "realtime":
            return cls(1.0)
        try:
            n = float(text)
        except ValueError:
            n = 0.0
        if not n > 0 or n == float("inf"):
            raise SpeedError(f"bad speed {text!r}: asap, realtime or a positive multiplier")
        return cls(n)

    def wait_until(self, start: float, at: float) -> None:
        """Sleep until ``at`` recorded seconds after ``start`` (a ``time.monotonic()``)."""
        if self.factor is None:
            return
        delay = start + at / self.factor - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class Channel(Protocol):
    def send(self, data: bytes, eor: bool) -> None: ...
    def shut_write(self, flags: int) -> None:
        """A half-close as recorded: SEND (1 << 1), or RCV|SEND, a full close."""
        ...
    def abort(self) -> None: ...
    def receive(self, answers: Answers, timeout: float) -> bool:
        """Add what arrives within ``timeout`` to ``answers`` (its data, end or reset); False
        when nothing did."""
        ...
    def close(self) -> None: ...


@runtime_checkable
class StoredChannel(Protocol):
    """A channel with its own way of sending bytes that stayed in the capture file."""

    def send_stored(self, step: SendStored) -> None: ...


def send_stored(channel: Channel, step: SendStored) -> None:
    """Bytes that stayed in the capture file (vsproxy/replay/bulk.py), sent as ``send`` sends
    them: by the channel itself when it has a way, else read back a message or a chunk at a time."""
    if isinstance(channel, StoredChannel):
        channel.send_stored(step)
        return
    for data, eor in step.chunks():
        channel.send(data, eor)


def play(steps: list[PlanStep] | list[StoredStep], channel: Channel, answers: Answers, timing: Timing, idle: float,
         start: float | None = None) -> Answers:
    """Play ``steps`` on ``channel``; ``answers`` holds what came back. Raises ``OSError`` when
    the channel fails while sending (a reset while receiving is an answer: ``answers.reset``)."""
    t0 = time.monotonic() if start is None else start
    for step in steps:
        timing.wait_until(t0, step.at)
        if isinstance(step, Send):
            channel.send(step.data, step.eor)
        elif isinstance(step, SendStored):
            send_stored(channel, step)
        elif isinstance(step, ShutWrite):
            channel.shut_write(step.flags)
        elif isinstance(step, Abort):
            channel.abort()
            return answers
        elif isinstance(step, Await):
            while not (answers.ended or answers.reset):
                if answers.units() >= step.units and not step.end:
                    break
                if not channel.receive(answers, idle):
                    break  # nothing more came: what did is compared
    return answers


class SocketChannel:
    """A host socket: unix STREAM or SEQPACKET, or TCP."""

    def __init__(self, sock: socket.socket, seqpacket: bool) -> None:
        self.sock = sock
        self.seqpacket = seqpacket

    def send(self, data: bytes, eor: bool) -> None:
        # a service that stops reading must not hang the replay: the send fails after a while
        self.sock.settimeout(SEND_TIMEOUT)
        if self.seqpacket:
            self.sock.send(data)
        else:
            self.sock.sendall(data)

    def shut_write(self, flags: int) -> None:
        # a socket's peer cannot be told "I will read no more": SEND is what reaches it
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:  # already gone: what it answered is compared
            pass

    def abort(self) -> None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.sock.close()

    def receive(self, answers: Answers, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except ConnectionResetError:
            answers.reset = True
            return True
        if not data:  # a unix seqpacket socket reads an empty message as the end, too
            answers.ended = True
        else:
            answers.feed(data)
        return True

    def close(self) -> None:
        self.sock.close()


class Stepper:
    """``play`` one step at a time, never blocking on an answer: for a single-threaded driver (the
    simulated guest) that plays several connections at once. ``advance`` does what is due and
    returns True once the plan is done."""

    def __init__(self, steps: list[PlanStep] | list[StoredStep], channel: Channel, answers: Answers, timing: Timing,
                 idle: float, start: float) -> None:
        self.steps = steps
        self.channel = channel
        self.answers = answers
        self.timing = timing
        self.idle = idle
        self.start = start
        self.i = 0
        self.quiet_since: float | None = None  # waiting on an Await since, with nothing coming

    def advance(self, now: float) -> bool:
        """Raises ``OSError`` when the channel fails while sending."""
        a = self.answers
        while self.i < len(self.steps):
            step = self.steps[self.i]
            if self.timing.factor is not None and now < self.start + step.at / self.timing.factor:
                return False
            if isinstance(step, Send):
                self.channel.send(step.data, step.eor)
            elif isinstance(step, SendStored):
                send_stored(self.channel, step)
            elif isinstance(step, ShutWrite):
                self.channel.shut_write(step.flags)
            elif isinstance(step, Abort):
                self.channel.abort()
                self.i = len(self.steps)
                return True
            elif isinstance(step, Await):
                while not (a.ended or a.reset) and (a.units() < step.units or step.end):
                    if not self.channel.receive(a, 0):
                        break
                met = a.ended or a.reset or (a.units() >= step.units and not step.end)
                if not met:
                    if self.quiet_since is None:
                        self.quiet_since = now
                    if now - self.quiet_since < self.idle:
                        return False
                self.quiet_since = None
            self.i += 1
        return True
