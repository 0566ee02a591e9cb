"""Built-in services answered inside vsproxy: ``nitro-heartbeat``, ``echo``, ``discard`` (and
``replay``, registered by vsproxy/replay/service.py).

A service kind is one class registered under its name (``register``): what it answers to the
guest's bytes. A rule names it as ``KIND`` or ``KIND:ARG`` (``replay:FILE``); a kind that takes
an ARG checks it when the configuration is made (``check_arg``) and may make its own peer, for
SEQPACKET too (``open_peer``). ``ServicePeer`` is the ``Peer`` every kind runs behind: the vsock core hands it
the guest's bytes with ``send`` and reads the answers with ``recv_into``, exactly as for a
socket, so services need no special case in the core. Answers wait in a bounded buffer; a
guest that does not read them stops the service from taking more (``send`` returns 0), which
throttles only that connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from vsproxy.endpoints.base import Buffer, Peer, PeerBase, scatter

if TYPE_CHECKING:
    from vsproxy.endpoints.sockets import CoreHooks

# Opens the endpoint a guest connection would reach without the service, reporting to the
# hooks given (None: there is none). A service may hand a connection over to it.
Fallback = Callable[["CoreHooks"], Peer | None]

NITRO_HEARTBEAT = 0xB7
PENDING_MAX = 256 * 1024


class Service:
    """One kind of built-in service. A new kind is a subclass and ``@register``."""

    kind: ClassVar[str]
    # Answers wait in the peer's bounded buffer, so input is taken only while it has room;
    # a service that never answers takes everything.
    answers: ClassVar[bool] = True

    def answer(self, data: bytes) -> bytes:
        """What goes back to the guest for ``data`` (may be empty)."""
        raise NotImplementedError

    @classmethod
    def check_arg(cls, arg: str | None, cid: int, port: int) -> None:
        """When the rule ``CID:PORT=KIND[:ARG]`` is made: raise ``ValueError`` (its text is the
        error shown) for an ARG this kind cannot use. The built-in kinds take none."""
        if arg is not None:
            raise ValueError(f"service kind {cls.kind!r} takes no argument (got {arg!r})")

    @classmethod
    def open_peer(cls, arg: str | None, sock_type: int, cid: int, port: int,
                  schedule: Callable[[Callable[[], None]], None], on_readable: Callable[[], None],
                  on_writable: Callable[[], None], fallback: Fallback | None = None) -> Peer | None:
        """The peer for one guest connection of ``sock_type``; None when this kind does not
        carry it (the guest gets RST). The built-in kinds carry STREAM only."""
        if sock_type != STREAM:
            return None
        return ServicePeer(cls.kind, schedule, on_readable, on_writable)


SERVICES: dict[str, type[Service]] = {}
STREAM = 1  # virtio-vsock VIRTIO_VSOCK_TYPE_STREAM


def register(cls: type[Service]) -> type[Service]:
    if cls.kind in SERVICES:
        raise ValueError(f"service kind {cls.kind!r} registered twice")
    SERVICES[cls.kind] = cls
    return cls


@register
class NitroHeartbeat(Service):
    """An AWS Nitro Enclave's parent: each heartbeat byte 0xB7 is answered with 0xB7."""

    kind = "nitro-heartbeat"

    def answer(self, data: bytes) -> bytes:
        return bytes([NITRO_HEARTBEAT]) * data.count(NITRO_HEARTBEAT)


@register
class Echo(Service):
    kind = "echo"

    def answer(self, data: bytes) -> bytes:
        return data


@register
class Discard(Service):
    kind = "discard"
    answers = False

    def answer(self, data: bytes) -> bytes:
        return b""


def service_kinds() -> tuple[str, ...]:
    return tuple(SERVICES)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``KIND[:ARG]`` -> (KIND, ARG or None)."""
    kind, sep, arg = spec.partition(":")
    return kind, arg if sep else None


def check_spec(spec: str, cid: int, port: int) -> None:
    """Raise ``ValueError`` for a rule whose kind is unknown or cannot use its ARG."""
    kind, arg = split_spec(spec)
    cls = SERVICES.get(kind)
    if cls is None:
        raise ValueError(f"service kind {kind!r} unknown (known: {', '.join(SERVICES)})")
    cls.check_arg(arg, cid, port)


def open_service(spec: str, sock_type: int, cid: int, port: int, schedule: Callable[[Callable[[], None]], None],
                 on_readable: Callable[[], None], on_writable: Callable[[], None],
                 fallback: Fallback | None = None) -> Peer | None:
    """The peer of one guest connection to the service rule ``spec`` at ``cid:port``."""
    kind, arg = split_spec(spec)
    cls = SERVICES.get(kind)
    if cls is None:
        raise ValueError(f"unknown service {kind!r} (known: {', '.join(SERVICES)})")
    return cls.open_peer(arg, sock_type, cid, port, schedule, on_readable, on_writable, fallback)


# Counters kinds keep per rule (the replay kind: matched, unmatched, exhausted), by a name for the
# rule: the snapshot carries them, so the SIGUSR1 report and ``vsproxy ctl stats`` show them.
COUNTERS: list[Callable[[], dict[str, dict[str, int]]]] = []


def service_rows() -> dict[str, dict[str, int]]:
    rows: dict[str, dict[str, int]] = {}
    for source in COUNTERS:
        rows.update(source())
    return rows


class ServicePeer(PeerBase):
    def __init__(self, kind: str, schedule: Callable[[Callable[[], None]], None], on_readable: Callable[[], None],
                 on_writable: Callable[[], None]) -> None:
        cls = SERVICES.get(kind)
        if cls is None:
            raise ValueError(f"unknown service {kind!r} (known: {', '.join(SERVICES)})")
        self.kind = kind
        self.service = cls()
        self._schedule = schedule
        self._on_readable = on_readable
        self._on_writable = on_writable
        self._out = bytearray()
        self._eof_in = False  # the guest half-closed: we answer what we have, then EOF
        self._reading = False
        self._writing = False
        self.closed = False
        self.received = 0

    def describe(self) -> str:
        return f"service:{self.kind}"

    def send(self, bufs: Sequence[Buffer]) -> int:
        if self.closed:
            raise BrokenPipeError("service closed")
        taken = 0
        bounded = self.service.answers
        for b in bufs:
            room = PENDING_MAX - len(self._out) if bounded else len(b)
            if room <= 0:
                break
            chunk = bytes(b[:room])
            taken += len(chunk)
            self._out += self.service.answer(chunk)
            if len(chunk) < len(b):
                break
        self.received += taken
        if self._out and self._reading:
            self._schedule(self._on_readable)
        return taken

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self._out:
            return 0 if self._eof_in or self.closed else None
        n = scatter(self._out, bufs)
        del self._out[:n]
        if self._writing:
            self._schedule(self._on_writable)
        return n

    def shutdown_write(self) -> None:
        self._eof_in = True
        if self._reading:
            self._schedule(self._on_readable)

    def close(self, reset: bool) -> None:
        self.closed = True
        self._out.clear()

    def watch_read(self, on: bool) -> None:
        self._reading = on
        if on and (self._out or self._eof_in):
            self._schedule(self._on_readable)

    def watch_write(self, on: bool) -> None:
        self._writing = on
        if on and len(self._out) < PENDING_MAX:
            self._schedule(self._on_writable)

    def established(self, local_port: int) -> None:
        pass
