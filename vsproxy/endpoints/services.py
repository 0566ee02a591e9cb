"""Built-in services answered inside vsproxy: ``nitro-heartbeat``, ``echo``, ``discard``.

Each is a ``Peer``: the vsock core hands it the guest's bytes with ``send`` and reads its
answers with ``recv_into``, exactly as for a socket, so services need no special case in
the core. Answers wait in a bounded buffer; a guest that does not read them stops the
service from taking more (``send`` returns 0), which throttles only that connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vsproxy.endpoints.base import Buffer, PeerBase

NITRO_HEARTBEAT = 0xB7
SERVICE_KINDS = ("nitro-heartbeat", "echo", "discard")
PENDING_MAX = 256 * 1024


class ServicePeer(PeerBase):
    def __init__(self, kind: str, schedule: Callable[[Callable[[], None]], None], on_readable: Callable[[], None],
                 on_writable: Callable[[], None]) -> None:
        if kind not in SERVICE_KINDS:
            raise ValueError(f"unknown service {kind!r} (known: {', '.join(SERVICE_KINDS)})")
        self.kind = kind
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
        for b in bufs:
            room = PENDING_MAX - len(self._out)
            if self.kind == "discard":
                taken += len(b)
                continue
            if room <= 0:
                break
            chunk = bytes(b[:room])
            taken += len(chunk)
            if self.kind == "echo":
                self._out += chunk
            else:  # nitro-heartbeat: each 0xB7 is answered with 0xB7, anything else is ignored
                self._out += bytes([NITRO_HEARTBEAT]) * chunk.count(NITRO_HEARTBEAT)
            if len(chunk) < len(b):
                break
        self.received += taken
        if self._out and self._reading:
            self._schedule(self._on_readable)
        return taken

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        if not self._out:
            return 0 if self._eof_in or self.closed else None
        n = 0
        for b in bufs:
            k = min(len(b), len(self._out) - n)
            b[:k] = self._out[n : n + k]
            n += k
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
