"""The endpoint interface: what a connection's far side must offer the core.

A ``Peer`` is the host-side half of one vsock connection: a unix or TCP socket
today, an AF_VSOCK socket, a built-in service or a sibling device later. The
vsock core drives it through these few non-blocking calls and never sees a
socket. Peers report back through ``PeerEvents`` (implemented by the core).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class Peer(Protocol):
    def send(self, bufs: Sequence[Buffer]) -> int:
        """Write what the peer takes now; return the byte count (0 if full). Raises OSError on reset."""
        ...

    def recv_into(self, bufs: Sequence[memoryview]) -> int | None:
        """Fill bufs in order; return bytes read, 0 at EOF, None if nothing is ready. Raises OSError."""
        ...

    def shutdown_write(self) -> None:
        """No more data will come from the guest (half-close)."""
        ...

    def close(self, reset: bool) -> None:
        """Drop the peer; ``reset`` makes a TCP peer see RST rather than a clean EOF."""
        ...

    def watch_read(self, on: bool) -> None:
        """Report readability through PeerEvents.peer_readable while on."""
        ...

    def watch_write(self, on: bool) -> None:
        """Report writability through PeerEvents.peer_writable while on."""
        ...

    def established(self, local_port: int) -> None:
        """The guest accepted a host-initiated connection (hybrid unix answers ``OK <port>``)."""
        ...

    def describe(self) -> str: ...
