"""Socket-like handles the tests use, thin wrappers over the driver's connection table.

They mirror the Linux AF_VSOCK socket calls a guest program makes, so a test reads like the
guest-side C program it replaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .driver import Conn, Sink, State, VsockDriver
from .errors import SimGuestError, SimGuestTimeout

if TYPE_CHECKING:
    from .driver import Listener


class IncompleteRead(SimGuestError, EOFError):
    """The peer ended the stream before recv_exactly got its bytes."""


class GuestSocket:
    """One connected stream in the guest."""

    def __init__(self, driver: VsockDriver, conn: Conn) -> None:
        self._drv = driver
        self.conn = conn

    @property
    def local_port(self) -> int:
        return self.conn.local_port

    @property
    def peer(self) -> tuple[int, int]:
        return (self.conn.peer_cid, self.conn.peer_port)

    @property
    def open(self) -> bool:
        return self.conn.state == State.ESTABLISHED

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Send everything, in packets of at most 64 KiB and within the peer's credit."""
        self._drv.sendall(self.conn, data)

    def send_message(self, data: bytes, eor: bool = False) -> None:
        """SEQPACKET: one message (EOM on its last packet, EOR too if asked)."""
        self._drv.send_message(self.conn, data, eor)

    def recv_message(self, timeout: float | None = None) -> tuple[bytes, int]:
        """SEQPACKET: the next whole message and its flags (SEQ_EOM, SEQ_EOR)."""
        return self._drv.recv_message(self.conn, timeout)

    def recv(self, max_bytes: int = 65536, timeout: float | None = None) -> bytes:
        """Up to ``max_bytes``; b"" once the peer shut down sending (or reset) and the queue is empty."""
        return self._drv.recv(self.conn, max_bytes, timeout)

    def recv_exactly(self, n: int, timeout: float | None = None) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.recv(n - len(out), timeout)
            if not chunk:
                raise IncompleteRead(f"peer closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_all(self, timeout: float | None = None) -> bytes:
        """Everything until EOF."""
        out = bytearray()
        while chunk := self.recv(1 << 20, timeout):
            out += chunk
        return bytes(out)

    def shutdown_write(self) -> None:
        """SHUTDOWN flags=2 (SEND), like shutdown(SHUT_WR)."""
        self._drv.shutdown_write(self.conn)

    def close(self, timeout: float | None = None) -> bool:
        """SHUTDOWN flags=3, wait for RST (True) or time out and send RST (False)."""
        return self._drv.close(self.conn, timeout)

    def blast(self, payload: bytes, count: int) -> float:
        """Send ``count`` copies of ``payload`` as RW packets at full speed; returns elapsed seconds."""
        return self._drv.blast(self.conn, payload, count)

    def drain(self, nbytes: int, sink: Sink | None = None) -> int:
        """Receive ``nbytes`` (fewer only at EOF) without keeping them; returns the count."""
        return self._drv.drain(self.conn, nbytes, sink)

    def ping(self, rounds: int, size: int = 1) -> list[int]:
        """``rounds`` requests of ``size`` bytes, each sent once the previous answer (``size``
        bytes) is in, from C (``sg_rtt``); each round's nanoseconds."""
        return self._drv.request_response(self.conn, rounds, size, echo=False)

    def echo(self, rounds: int, size: int = 1) -> None:
        """Answer each of ``rounds`` requests of ``size`` bytes with ``size`` bytes, from C (``sg_rtt``)."""
        self._drv.request_response(self.conn, rounds, size, echo=True)

    def send_credit_request(self) -> None:
        from vsproxy.vsock.header import Op

        self._drv._send(self.conn, Op.CREDIT_REQUEST)

    def send_credit_update(self) -> None:
        from vsproxy.vsock.header import Op

        self._drv._send(self.conn, Op.CREDIT_UPDATE)


class GuestListener:
    """A listening port in the guest; incoming REQUESTs get RESPONSE and queue here."""

    def __init__(self, driver: VsockDriver, listener: Listener) -> None:
        self._drv = driver
        self._lst = listener

    @property
    def port(self) -> int:
        return self._lst.port

    def accept(self, timeout: float | None = None) -> GuestSocket:
        q = self._lst.queue
        try:
            self._drv.deadline_wait(lambda: bool(q), timeout, f"accepting on port {self._lst.port}")
        except SimGuestTimeout:
            raise
        return GuestSocket(self._drv, q.popleft())

    def close(self) -> None:
        self._drv.listeners.pop((self._lst.port, self._lst.type), None)
