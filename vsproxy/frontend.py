"""One front-end connection (a QEMU process) to a device: the vhost-user messages fed to the
sans-I/O ``vhost_user.session.Session`` and what it returns carried out (memory mapped, rings
started and stopped, eventfds kept), the connections' hooks, and the session's end. A bad
front-end ends its session with a logged error; the device keeps listening for the next."""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import TYPE_CHECKING

from vsproxy import fastpath
from vsproxy.datapath import SWEEP_INTERVAL, TX_BATCH, DataPath
from vsproxy.endpoints.base import Peer
from vsproxy.endpoints.sockets import CoreHooks
from vsproxy.events import EventKind
from vsproxy.fastpath import RxFastPath, TxFastPath
from vsproxy.limits import ratelog
from vsproxy.memory import GuestMemory, MemoryError_
from vsproxy.vhost_user import codec
from vsproxy.vhost_user.codec import MessageReader, ProtocolError
from vsproxy.vhost_user.session import (
    RX_QUEUE,
    TX_QUEUE,
    CloseFds,
    Reply,
    Session,
    SetMemTable,
    SetVringFd,
    StartRing,
    StopRing,
)
from vsproxy.virtq import RingSetupError, SplitQueue
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import RX_FAST_BURST, RX_FAST_BURST_BYTES, SHUTDOWN_TIMEOUT, VsockCore

if TYPE_CHECKING:
    from vsproxy.device import Device

log = logging.getLogger("vsproxy.device")


class FrontendSession(DataPath, CoreHooks):
    def __init__(self, device: Device, sock: socket.socket) -> None:
        self.device = device
        self.loop = device.loop
        self.name = device.name
        self.sock = sock
        sock.setblocking(False)
        self.session = Session(device.config.guest_cid, max_queue_size=device.config.queue_size)
        self.reader = MessageReader()
        self.mem: GuestMemory | None = None
        self.queues: list[SplitQueue | None] = [None, None]
        self._fastpaths: list[TxFastPath | None] = [None, None]
        self._rx_path: RxFastPath | None = None
        self.kick_fds: list[int | None] = [None, None]
        self.call_fds: list[int | None] = [None, None]
        self.err_fds: list[int | None] = [None, None]
        self.core = VsockCore(
            device.config.guest_cid,
            self._connector,
            buf_alloc=device.config.buf_alloc,
            name=device.name,
            max_connections=device.limits.max_connections,
            max_pending=device.limits.max_pending,
            max_buffered=device.limits.max_buffered,
            max_control=device.limits.max_control,
        )
        self.core.rule_totals = device.switch.rule_totals
        self.core.taps = device.switch.taps
        self.core.events = self.events = device.switch.events
        self.closed = False
        self._pump_scheduled = False
        self.loop.set_reader(sock.fileno(), self._on_message)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- vhost-user messages -------------------------------------------------
    def _on_message(self) -> None:
        try:
            data, fds, msg_flags, _ = socket.recv_fds(self.sock, self.reader.wanted(), codec.MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.end(f"front-end socket error: {e}", error=True)
            return
        if msg_flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            # the kernel drops fds that did not fit: too many for one message, or this process
            # is out of descriptors (EMFILE); either way the message cannot be carried out
            self.end("front-end's fds were cut (more than a message may carry, or vsproxy is out of descriptors)",
                     error=True)
            return
        if not data:
            _close_fds(fds)
            self.end("front-end disconnected", error=False)
            return
        try:
            got = self.reader.feed(data, fds)
        except ProtocolError as e:
            _close_fds(self.reader.pending_fds())
            self.end(f"protocol error: {e}", error=True)
            return
        if got is None:
            return
        msg, msg_fds = got
        log.debug(
            "%s: <- %s flags=%#x size=%d fds=%d",
            self.name,
            _req_name(msg.request),
            msg.flags,
            len(msg.payload),
            len(msg_fds),
        )
        try:
            actions = self.session.handle(msg, msg_fds)
        except ProtocolError as e:
            _close_fds(msg_fds)
            self.end(f"protocol error: {e}", error=True)
            return
        try:
            for action in actions:
                self._do(action)
        except (ProtocolError, MemoryError_, RingSetupError) as e:
            self.end(f"{_req_name(msg.request)}: {e}", error=True)

    def _do(self, action: object) -> None:
        if isinstance(action, Reply):
            self._send(action.data)
        elif isinstance(action, SetMemTable):
            try:
                mem = GuestMemory.map_fds(action.regions, action.fds)
            finally:
                _close_fds(action.fds)  # the mappings keep the memory; the fds are no longer needed
            running = [i for i, q in enumerate(self.queues) if q is not None]
            old = self.mem
            self.mem = mem
            for i in running:
                # Re-create live queues over the new table, keeping their position.
                self._start_ring(i)
            if old is not None:
                old.close()
            log.info(
                "%s: memory table: %s", self.name, ", ".join(f"gpa {r.guest_addr:#x}+{r.size:#x}" for r in mem.regions)
            )
        elif isinstance(action, SetVringFd):
            fds = {"kick": self.kick_fds, "call": self.call_fds, "err": self.err_fds}[action.kind]
            old_fd = fds[action.index]
            if action.kind == "kick" and old_fd is not None:
                self.loop.forget(old_fd)
            if old_fd is not None:
                os.close(old_fd)
            fds[action.index] = action.fd
            if action.kind == "kick" and action.fd is not None:
                os.set_blocking(action.fd, False)
                idx = action.index
                self.loop.set_reader(action.fd, functools.partial(self._on_kick, idx))
        elif isinstance(action, StartRing):
            self._start_ring(action.index)
        elif isinstance(action, StopRing):
            last = self._stop_ring(action.index)
            if action.reply:
                self._send(self.session.reply_vring_base(action.index, last))
        elif isinstance(action, CloseFds):
            _close_fds(action.fds)
        else:  # pragma: no cover - the session returns only the types above
            raise ProtocolError(f"unknown action {action!r}")

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:
            # Replies are tiny; a front-end that does not read them is broken.
            raise ProtocolError("front-end does not read its replies") from None

    def _start_ring(self, index: int) -> None:
        v = self.session.vrings[index]
        if self.mem is None or v.addr is None:
            raise RingSetupError(f"vring {index}: started without memory or addresses")
        # C gives its connections back first: it may still write the old queue's used ring (the
        # rx chains it holds for them), and the new queue reads used->idx from memory.
        self._close_fastpaths(index)
        old = self.queues[index]
        base = old.last_avail_idx if old is not None else v.base
        q = SplitQueue(
            self.mem,
            v.num,
            v.addr.desc,
            v.addr.avail,
            v.addr.used,
            last_avail_idx=base,
            event_idx=self.session.has(codec.VIRTIO_RING_F_EVENT_IDX),
            indirect=self.session.has(codec.VIRTIO_RING_F_INDIRECT_DESC),
            device_writes=index == RX_QUEUE,
            name=f"{self.name}/{'rx' if index == RX_QUEUE else 'tx'}",
        )
        self.queues[index] = q
        self.core.seqpacket = self.session.has(codec.VIRTIO_VSOCK_F_SEQPACKET)
        c_ok = fastpath.AVAILABLE and fastpath.memory_ok(q.mem)
        self._fastpaths[index] = (
            TxFastPath(q, self.device.config.guest_cid, TX_BATCH, self.core.taps, self.name)
            if index == TX_QUEUE and c_ok
            else None
        )
        if index == RX_QUEUE:
            self._rx_path = RxFastPath(q, self.core.taps, self.name) if c_ok else None
            self.core.rx_fill_c = self._rx_path.fill if self._rx_path is not None else None
            self.core.rx_put = self._rx_path.put if self._rx_path is not None else None
            self.core.rx_progress = self._rx_progress
            self.core.rx_pending = q.pending
        tx_fast, rx_path = self._fastpaths[TX_QUEUE], self._rx_path
        if tx_fast is not None and index == TX_QUEUE:
            tx_fast.set_poll(self.loop.busy.max_ns)
        if tx_fast is not None and rx_path is not None and tx_fast.attach_rx(
                rx_path, self._rx_call_fd, RX_FAST_BURST_BYTES, RX_FAST_BURST):
            self.core.owner = tx_fast
        log.info(
            "%s: vring %d started: size %d base %d event_idx=%s indirect=%s version_1=%s",
            self.name,
            index,
            v.num,
            base,
            q.event_idx,
            q.indirect,
            self.session.has(codec.VIRTIO_F_VERSION_1),
        )
        if self.running:
            self.events.publish(EventKind.RINGS_STARTED, self.name, detail=f"ring sizes {self.session.vrings[0].num}")
        self.kick_pump()

    def _close_rx_path(self) -> None:
        if self._rx_path is not None:
            self._rx_path.close()
            self._rx_path = None
        self.core.rx_fill_c = None
        self.core.rx_put = None

    def _rx_call_fd(self) -> int:
        fd = self.call_fds[RX_QUEUE]
        return -1 if fd is None else fd

    def _close_fastpaths(self, index: int) -> None:
        # The C pump needs both queues: the connections it runs come back first.
        self.core.detach_owner()
        tx_fast = self._fastpaths[TX_QUEUE]
        if tx_fast is not None:
            tx_fast.detach_rx()
            self.loop.busy.add(*tx_fast.poll_counts())
        fast = self._fastpaths[index]
        if fast is not None:
            fast.close()
            self._fastpaths[index] = None
        if index == RX_QUEUE:
            self._close_rx_path()

    def _stop_ring(self, index: int) -> int:
        q = self.queues[index]
        self.queues[index] = None
        self._close_fastpaths(index)
        if q is None:
            return self.session.vrings[index].base
        # The guest driver is going away (poweroff, reboot, reset): its connections end with it.
        self.events.publish(EventKind.RINGS_STOPPED, self.name, detail=f"vring {index} stopped")
        self.core.close_all()
        log.info("%s: vring %d stopped at %d", self.name, index, q.last_avail_idx)
        return q.last_avail_idx

    # -- CoreHooks ---------------------------------------------------------------
    # Each one is about one connection: an unexpected error in it ends that connection
    # (fault), never the session or the process.
    def readable(self, conn: Connection) -> None:
        try:
            if self.core.peer_readable(conn):
                self.kick_pump()
        except Exception as e:
            self.fault(conn, e)

    def writable(self, conn: Connection) -> None:
        try:
            self.core.peer_writable(conn)
            self.kick_pump()
        except Exception as e:
            self.fault(conn, e)

    def connected(self, conn: Connection) -> None:
        try:
            self.core.peer_connected(conn)
            self.kick_pump()
        except Exception as e:
            self.fault(conn, e)

    def failed(self, conn: Connection, reason: str) -> None:
        try:
            self.core.peer_failed(conn, reason)
            self.kick_pump()
        except Exception as e:
            self.fault(conn, e)

    def _connector(self, conn: Connection) -> Peer | None:
        return self.device.switch.open(self.device, conn, self)

    def held(self, conn: Connection, n: int) -> None:
        self.core.sibling_held(conn, n)

    def aborted(self, conn: Connection) -> None:
        try:
            self.core.host_abort(conn)
            self.kick_pump()
        except Exception as e:
            self.fault(conn, e)

    def fault(self, conn: Connection, exc: Exception) -> None:
        """The last line of defence for one connection: reset it, count it, log it (at a
        bounded rate); if even that fails, the session ends (the device resets)."""
        self.loop.health.faults += 1
        ratelog(log, logging.ERROR, "unexpected error", "%s: unexpected error on %s: %r; connection reset",
                self.name, conn.describe(), exc, exc_info=exc)
        try:
            self.core.abandon(conn)
            self.kick_pump()
        except Exception as e:
            self.on_fault(e)

    def on_fault(self, exc: Exception) -> None:
        """An unexpected error in the session's own handlers (vhost-user messages, kicks, the
        pump): the guest's rings can no longer be trusted, so this session ends; QEMU may
        connect again, and every other device goes on."""
        self.end(f"internal error: {exc!r}", error=True)

    # -- teardown ----------------------------------------------------------------
    def end(self, reason: str, *, error: bool) -> None:
        if self.closed:
            return
        (log.error if error else log.info)("%s: front-end session ended: %s", self.name, reason)
        self.events.publish(EventKind.FRONTEND_GONE, self.name, detail=reason)
        self.closed = True
        self.core.close_all()
        if self.core.lingering():
            core, loop = self.core, self.loop
            loop.call_later(SHUTDOWN_TIMEOUT + 0.05, lambda: core.tick(loop.time()))
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        for fds in (self.kick_fds, self.call_fds, self.err_fds):
            for i, fd in enumerate(fds):
                if fd is not None:
                    self.loop.forget(fd)
                    os.close(fd)
                    fds[i] = None
        self.queues = [None, None]
        self._close_fastpaths(TX_QUEUE)
        self._close_fastpaths(RX_QUEUE)
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.device.session_ended(self)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _req_name(r: int) -> str:
    try:
        return codec.Request(r).name
    except ValueError:
        return f"request {r}"
