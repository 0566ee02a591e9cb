"""The endpoint interface: what a connection's far side must offer the core.

A ``Peer`` is the host-side half of one vsock connection: a unix, TCP or AF_VSOCK socket, a
built-in service or a sibling device's end. The vsock core drives it through these
non-blocking calls and never sees a socket; a peer reports back through the hooks it was
made with (the device's session), never by calling the core directly. ``PeerBase`` gives
the calls a stream-only peer without a descriptor of its own does not need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview


def scatter(data: Buffer, bufs: Sequence[memoryview]) -> int:
    """Copy as much of ``data`` as ``bufs`` hold, in order; the number of bytes copied. The one
    loop every peer and the rx path use to write into scattered buffers."""
    first = bufs[0] if bufs else None
    if first is not None and len(first) >= len(data):
        first[: len(data)] = data  # the usual case: one buffer holds it all
        return len(data)
    n = 0
    for b in bufs:
        k = min(len(b), len(data) - n)
        b[:k] = data[n : n + k]
        n += k
        if n == len(data):
            break
    return n


class Peer(Protocol):
    def send(self, bufs: Sequence[Buffer]) -> int:
        """Write what the peer takes now; return the byte count (0 if full). Raises OSError on reset."""
        ...

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        """Fill bufs in order; return bytes read, 0 at EOF, None if nothing is ready. Raises OSError."""
        ...

    def send_message(self, data: bytes, eor: bool) -> bool:
        """SEQPACKET: the whole message or nothing (False: full, try again when writable)."""
        ...

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        """SEQPACKET: the next whole message and its EOR mark, (b"", False) at EOF, None if none
        is ready. A message longer than ``limit`` comes back longer than it (the core refuses it)."""
        ...

    def shutdown_write(self) -> None:
        """No more data will come from the guest (half-close)."""

    def shutdown_read(self) -> None:
        """The guest receives no more (its SHUTDOWN RCV): a peer whose far side can be told
        (a sibling guest, a unix socket's writer) is; the far side's sends then fail."""

    def far_shutdown(self) -> int:
        """What the far side has shut, as SHUTDOWN flags, in stream order: once every byte it
        sent before is read from this peer, SEND if it sends no more (the EOF is here now), RCV
        if it receives no more. 0 for a socket, whose EOF shows as recv_into() returning 0."""

    def far_closed(self) -> bool:
        """The far side closed both ways, whatever of its bytes is still to be read here (a
        sibling guest's close()): this connection is going away, and its 4-tuple with it."""
        ...

    def hung_up(self) -> bool:
        """Asked once, when the far side's EOF has been read: does it receive no more either (it
        closed, as a kernel peer's close() sends SHUTDOWN 3)? A unix socket can tell (POLLHUP);
        TCP cannot (a FIN says nothing of the read side)."""
        ...

    def close(self, reset: bool) -> None:
        """Drop the peer; ``reset`` makes a TCP peer see RST rather than a clean EOF."""
        ...

    def watch_read(self, on: bool) -> None:
        """Report readability to the hooks while on."""
        ...

    def watch_write(self, on: bool) -> None:
        """Report writability to the hooks while on."""
        ...

    def established(self, local_port: int) -> None:
        """The guest accepted a host-initiated connection (hybrid unix answers ``OK <port>``)."""
        ...

    def fast_fd(self) -> int:
        """The descriptor C may read and write directly for this peer, or -1 (not a socket, or
        bytes of our own must come first)."""
        ...

    def unread(self, data: bytes) -> None:
        """Bytes read ahead from this peer on its behalf (by C) that the guest has not had:
        they come before anything else the peer gives. Only peers with a ``fast_fd`` get them."""
        ...

    def describe(self) -> str: ...


class PeerBase:
    """Defaults for a stream-only peer that has no descriptor C could use."""

    def send_message(self, data: bytes, eor: bool) -> bool:
        raise OSError("this peer carries streams only")

    def recv_message(self, limit: int) -> tuple[bytes, bool] | None:
        raise OSError("this peer carries streams only")

    def fast_fd(self) -> int:
        return -1

    def shutdown_read(self) -> None:
        pass

    def far_shutdown(self) -> int:
        return 0

    def far_closed(self) -> bool:
        return False

    def hung_up(self) -> bool:
        return False

    def unread(self, data: bytes) -> None:
        raise RuntimeError(f"{type(self).__name__} has no descriptor, so nothing is read ahead for it")
