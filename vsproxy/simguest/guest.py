"""SimGuest: QEMU's vhost-user-vsock device plus a Linux guest's vsock driver, in one process.

It talks to the backend only through the vhost-user socket, the memfd guest RAM and eventfds,
exactly as QEMU and the guest would, so tests, benchmarks and replays need no VM.
Single-threaded: nothing happens unless a call (``poll``, ``recv``, ``connect``...) runs the loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from vsproxy.vhost_user import codec
from vsproxy.vsock.header import Header, Type

from .driver import Listener, Stats, VsockDriver
from .errors import SimGuestError
from .frontend import FrontendConfig, SentMessage, VsockFrontend
from .memory import DEFAULT_SIZE, GuestMemory
from .ring import SplitRing
from .sockets import GuestListener, GuestSocket

STREAM = Type.STREAM
SEQPACKET = Type.SEQPACKET


class SimGuest:
    """A simulated QEMU + Linux 6.1 guest driving a vhost-user-vsock backend."""

    def __init__(
        self,
        socket_path: str,
        ring_size: int = 128,
        regions: int = 1,
        version_1: bool = True,
        event_idx: bool = True,
        indirect: bool = True,
        qemu10: bool = False,
        rx_buf_size: int = 3776,
        buf_alloc: int = 262144,
        timeout: float = 10.0,
        *,
        reply_ack: bool = True,
        mq: bool = True,
        mem_size: int = DEFAULT_SIZE,
        credit_request: bool = False,
        record_limit: int = 4096,
        seqpacket: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.ring_size = ring_size
        self.config = FrontendConfig(version_1=version_1, event_idx=event_idx, indirect=indirect,
                                     reply_ack=reply_ack, mq=mq, qemu10=qemu10, seqpacket=seqpacket)
        self.rx_buf_size = rx_buf_size
        self.buf_alloc = buf_alloc
        self.timeout = timeout
        self.credit_request = credit_request
        self.record_limit = record_limit
        self.mem = GuestMemory(mem_size, regions)
        self.frontend: VsockFrontend | None = None
        self.rings: list[SplitRing] = []
        self._driver: VsockDriver | None = None
        self._generation = 0
        self.last_vring_bases: list[int] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, realize the device (GET_CONFIG gives guest_cid) and start the driver with fresh rings."""
        if self.frontend is not None:
            raise SimGuestError("already started")
        self.frontend = VsockFrontend(self.socket_path, self.config, self.timeout)
        try:
            self.frontend.realize()
            self._start_driver()
        except BaseException:
            self.frontend.close()
            self.frontend = None
            raise

    def _start_driver(self) -> None:
        fe = self._fe
        ev = fe.offered_features >> codec.VIRTIO_RING_F_EVENT_IDX & 1 and self.config.event_idx
        ind = fe.offered_features >> codec.VIRTIO_RING_F_INDIRECT_DESC & 1 and self.config.indirect
        legacy = not self.config.version_1
        self.rings = [SplitRing(self.mem, q, self.ring_size, event_idx=bool(ev), indirect=bool(ind),
                                legacy_layout=legacy) for q in (0, 1)]
        fe.start(self.mem, self.rings)
        self._driver = VsockDriver(fe, self.mem, self.rings[0], self.rings[1], rx_buf_size=self.rx_buf_size,
                                   buf_alloc=self.buf_alloc, timeout=self.timeout,
                                   credit_request=self.credit_request, record_limit=self.record_limit)

    def stop_rings(self) -> list[int]:
        """SET_VRING_ENABLE 0 and GET_VRING_BASE per ring, as at guest poweroff/reboot; returns the bases."""
        self.last_vring_bases = self._fe.stop()
        self._driver = None
        return self.last_vring_bases

    def restart(self) -> None:
        """Guest reboot on the same connection: RAM cleared, new rings elsewhere, features and table again."""
        if self._fe.running:
            self.stop_rings()
        self._generation += 1
        self.mem.reset(skew=0x10000 * (self._generation % 16))
        self._start_driver()

    def close(self) -> None:
        """Drop the vhost-user socket like an exiting QEMU, and free guest RAM."""
        if self.frontend is not None:
            self.frontend.close()
            self.frontend = None
        if self._driver is not None:
            self._driver.release()
        self._driver = None
        self.mem.close()

    def __enter__(self) -> SimGuest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ----------------------------------------------------------------------------------

    @property
    def _fe(self) -> VsockFrontend:
        if self.frontend is None:
            raise SimGuestError("SimGuest is not started (or was closed)")
        return self.frontend

    @property
    def driver(self) -> VsockDriver:
        if self._driver is None:
            raise SimGuestError("the guest driver is not running (start() or restart() first)")
        return self._driver

    @property
    def guest_cid(self) -> int:
        return self._fe.guest_cid

    @property
    def acked_features(self) -> int:
        return self._fe.acked_features

    @property
    def sent_messages(self) -> list[SentMessage]:
        return self._fe.client.log

    @property
    def stats(self) -> Stats:
        return self.driver.stats

    @property
    def received_raw(self) -> deque[tuple[Header, int]]:
        return self.driver.received_raw

    def set_packet_hook(self, hook: Callable[[Header, memoryview], None] | None) -> None:
        """Call ``hook(header, payload_view)`` for every packet received (the view is valid only during the call)."""
        self.driver.on_packet = hook

    # -- data path -----------------------------------------------------------------------------------

    def poll(self, timeout: float | None = 0) -> int:
        """Run the event loop once: returns how many used buffers were processed."""
        return self.driver.poll(timeout)

    def connect(self, port: int, cid: int = 2, type: int = STREAM, *, local_port: int | None = None,
                timeout: float | None = None) -> GuestSocket:
        return GuestSocket(self.driver, self.driver.connect(cid, port, type, local_port, timeout))

    def connect_timed(self, port: int, cid: int = 2, type: int = STREAM) -> tuple[GuestSocket, int]:
        """A connect whose REQUEST and answer the C loop handles (``driver.connect_timed``):
        the socket and the nanoseconds from REQUEST to RESPONSE."""
        conn, ns = self.driver.connect_timed(cid, port, type)
        return GuestSocket(self.driver, conn), ns

    def listen(self, port: int, type: int = STREAM, backlog: int = 16) -> GuestListener:
        drv = self.driver
        if (port, type) in drv.listeners:
            raise SimGuestError(f"port {port} already listening")
        lst = Listener(port, type, backlog)
        drv.listeners[(port, type)] = lst
        return GuestListener(drv, lst)

    def send_raw(self, header: bytes, payload: bytes = b"") -> None:
        """Inject any packet (e.g. spoofed src_cid, bad op) as a header + payload tx chain."""
        self.driver.send_raw(header, payload)
