"""The I/O shell around one vsock device: vhost-user socket, rings, eventfds.

``Device`` owns the listening vhost-user socket and the host listeners; each
front-end connection (a QEMU process) gets a ``FrontendSession`` that feeds the
sans-I/O ``Session`` and ``VsockCore`` and carries out what they return. A bad
front-end ends its session with a logged error; the device keeps listening.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsproxy import fastpath
from vsproxy.endpoints.base import Peer
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.endpoints.sibling import SiblingEnd
from vsproxy.endpoints.sockets import (
    DEFAULT_MAX_HANDSHAKES,
    Acceptor,
    CoreHooks,
    HybridListener,
    SocketPeer,
    TcpListener,
    listen_unix,
)
from vsproxy.fastpath import CreditItem, Run, RxFastPath, Slow, Tail, TxFastPath
from vsproxy.limits import Limits, ratelog
from vsproxy.loop import Loop
from vsproxy.memory import GuestMemory, MemoryError_
from vsproxy.verdict import Mark
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
from vsproxy.virtq import Chain, RingSetupError, SplitQueue
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import (
    DEFAULT_BUF_ALLOC,
    MAX_CONNECTIONS,
    RX_FAST_BURST,
    RX_FAST_BURST_BYTES,
    SHUTDOWN_TIMEOUT,
    VsockCore,
)
from vsproxy.vsock.header import HDR_SIZE
from vsproxy.vsock.header import Type as VsockType

SEQPACKET = VsockType.SEQPACKET

if TYPE_CHECKING:
    from vsproxy.endpoints.vsock import VsockListener
    from vsproxy.switch import Switch

log = logging.getLogger("vsproxy.device")

TX_BATCH = 256  # chains per pump pass, so one busy device cannot starve the loop
PUMP_PASSES = 8
SWEEP_INTERVAL = 0.1  # safety net for a kick lost to the EVENT_IDX race
_ONE = (1).to_bytes(8, "little")


@dataclass
class DeviceConfig:
    guest_cid: int
    socket_path: str
    name: str = ""
    endpoints: HostEndpoints = field(default_factory=HostEndpoints)
    buf_alloc: int = DEFAULT_BUF_ALLOC
    groups: frozenset[str] = frozenset()
    # None: the device's share of the file limit (limits.default_limits), set at start
    max_connections: int | None = None
    max_pending: int | None = None
    max_handshakes: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"cid{self.guest_cid}"

    def limits(self, default: Limits | None = None) -> Limits:
        """This device's limits: those set, the rest from ``default``."""
        return Limits(
            self.max_connections or (default.max_connections if default else MAX_CONNECTIONS),
            self.max_pending or (default.max_pending if default else MAX_CONNECTIONS),
            self.max_handshakes or (default.max_handshakes if default else DEFAULT_MAX_HANDSHAKES),
        )


class Device:
    def __init__(self, config: DeviceConfig, loop: Loop, switch: Switch, limits: Limits | None = None) -> None:
        self.config = config
        self.loop = loop
        self.switch = switch
        self.limits = limits if limits is not None else config.limits()
        switch.register(self)
        self.session: FrontendSession | None = None
        self.sessions_served = 0
        self.listeners: list[HybridListener | TcpListener | VsockListener] = []
        self.acceptor: Acceptor | None = None
        ep = config.endpoints
        hs = self.limits.max_handshakes
        try:
            if ep.uds_path is not None:
                self.listeners.append(HybridListener(ep.uds_path, loop, self._hooks, self._host_connect,
                                                     max_handshakes=hs))
                self.listeners.append(HybridListener(ep.uds_path + ".seqpacket", loop, self._hooks,
                                                     self._host_connect, seqpacket=True, max_handshakes=hs))
            for host, port, guest_port in ep.listens:
                self.listeners.append(TcpListener(host, port, guest_port, loop, self._hooks, self._host_connect))
            for port in ep.forward_listen:
                from vsproxy.endpoints.vsock import AfVsockFactory, VsockListener

                factory = ep.vsock_factory or AfVsockFactory()
                self.listeners.append(VsockListener(factory, port, loop, self._hooks, self._host_connect))
        except BaseException:
            self.close()
            raise

    def listen(self) -> None:
        """Open the vhost-user socket, last: once QEMU (or a test) sees it, the host-side
        listeners already accept."""
        sock = listen_unix(self.config.socket_path, 4)
        self.acceptor = Acceptor(sock, self.loop, f"{self.name}: vhost-user socket", self._accepted)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        s = self.session
        return s is not None and s.running

    def connect_sibling(self, end: SiblingEnd, guest_port: int, type_: int, src_cid: int, src_port: int,
                        window: int, rule: tuple[str, ...], mark: Mark | None) -> bool:
        """A sibling device's connection into this guest's ``guest_port``, seen as coming from
        ``src_cid:src_port``, advertising at most ``window``: True once its REQUEST is queued."""
        s = self.session
        if s is None or not s.running:
            return False
        conn = s.core.host_connect(end, guest_port, type_, src_cid=src_cid, src_port=src_port,
                                   buf_alloc=min(s.core.buf_alloc, window))
        if conn is None:
            return False
        conn.rule = rule
        conn.mark = mark
        end.attach(s, conn)
        s.kick_pump()
        return True

    def _hooks(self) -> CoreHooks | None:
        s = self.session
        return s if s is not None and s.running else None

    def _host_connect(self, peer: SocketPeer, guest_port: int, type_: int) -> Connection | None:
        s = self.session
        if s is None or not s.running:
            return None
        if type_ == SEQPACKET and not s.core.seqpacket:
            return None  # the guest driver did not negotiate SEQPACKET
        verdict = self.switch.inbound_host(self, guest_port)
        if verdict is None:
            return None
        seen_cid, rules = verdict
        conn = s.core.host_connect(peer, guest_port, type_, src_cid=seen_cid)
        if conn is not None:
            conn.rule = rules
            if seen_cid != 2:
                conn.mark = Mark.rewritten_to(rules[-1], 2, conn.peer_port)
        s.kick_pump()
        return conn

    def _accepted(self, sock: socket.socket, _addr: object) -> None:
        if self.session is not None:
            ratelog(log, logging.ERROR, f"{self.name}: second front-end",
                    "%s: a second front-end connected while one is active; refused", self.name)
            sock.close()
            return
        self.sessions_served += 1
        log.info("%s: front-end connected (session %d)", self.name, self.sessions_served)
        self.session = FrontendSession(self, sock)

    def session_ended(self, session: FrontendSession) -> None:
        if self.session is session:
            self.session = None

    def close(self) -> None:
        if self.session is not None:
            session = self.session
            session.end("vsproxy shutting down", error=False)
            session.core.drop_lingering()
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
            try:
                os.unlink(self.config.socket_path)
            except OSError:
                pass


class FrontendSession(CoreHooks):
    def __init__(self, device: Device, sock: socket.socket) -> None:
        self.device = device
        self.loop = device.loop
        self.name = device.name
        self.sock = sock
        sock.setblocking(False)
        self.session = Session(device.config.guest_cid)
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
        )
        self.core.rule_totals = device.switch.rule_totals
        self.core.taps = device.switch.taps
        self.closed = False
        self._pump_scheduled = False
        self.loop.set_reader(sock.fileno(), self._on_message)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    @property
    def running(self) -> bool:
        return not self.closed and self.queues[RX_QUEUE] is not None and self.queues[TX_QUEUE] is not None

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
        c_ok = fastpath.AVAILABLE and q.single_region is not None
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
        self.core.close_all()
        log.info("%s: vring %d stopped at %d", self.name, index, q.last_avail_idx)
        return q.last_avail_idx

    # -- data path -------------------------------------------------------------
    def _on_kick(self, index: int) -> None:
        fd = self.kick_fds[index]
        if fd is None:
            return
        if index == TX_QUEUE and self._c_kick(fd):
            return
        try:
            os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.end(f"kick fd of vring {index}: {e}", error=True)
            return
        self.kick_pump()

    def _c_kick(self, kick_fd: int) -> bool:
        """A tx kick while C runs connections and nothing else waits for Python: C takes the
        guest's credit updates, refills the rx ring and re-enables kicks itself (vq_tx_kick);
        Python steps in only for what C leaves. False: the ordinary pump takes the kick."""
        core, txq, fast = self.core, self.queues[TX_QUEUE], self._fastpaths[TX_QUEUE]
        if (not core.owned or fast is None or txq is None or fast.q is not txq or self._pump_scheduled
                or self.closed or core.control or core.ready or core.taps.active or txq.broken):
            return False
        call_fd = self.call_fds[TX_QUEUE]
        items = fast.kick(kick_fd, -1 if call_fd is None else call_fd)
        if items is None:
            core.counters.pump_kicks += 1
            self._owned_news(fast)
        else:
            core.now = self.loop.time()
            self._process_tx_fast(txq, fast, items)
            self.pump()
        return True

    def kick_pump(self) -> None:
        if not self._pump_scheduled and not self.closed:
            self._pump_scheduled = True
            self.loop.call_soon(self.pump)

    def _sweep(self) -> None:
        if self.closed:
            return
        self.core.tick(self.loop.time())
        self.core.sync_owned()  # counters lag what C does by at most one sweep
        if self.running:
            self.pump()
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def pump(self) -> None:
        self._pump_scheduled = False
        rxq = self.queues[RX_QUEUE]
        txq = self.queues[TX_QUEUE]
        if rxq is None or txq is None or self.closed:
            return
        core = self.core
        core.now = self.loop.time()
        for _ in range(PUMP_PASSES):
            n = self._process_tx(txq) if txq.pending() and not core.tx_blocked() else 0
            m = core.fill_rx(rxq) if core.control or core.ready else 0
            if rxq.publish():
                self._notify(RX_QUEUE)
            if n == 0 and m == 0:
                break
            # The tx chains of this pass are published with the next pass's credit update
            # (_control_first): the guest, woken once, finds both. The last pass publishes them.
        else:
            self._publish_tx(txq)
            self.kick_pump()  # more work: continue after other fds had their turn
            return
        self._publish_tx(txq)
        again = (txq.enable_kicks() and not core.tx_blocked()) or (
            rxq.enable_kicks() and bool(core.control or core.ready)
        )
        if again:
            self.kick_pump()

    def _process_tx(self, txq: SplitQueue) -> int:
        """One batch of tx chains. The caller checks tx_blocked() first, so the control
        backlog can overshoot its bound by at most one batch."""
        core = self.core
        fast = self._fastpaths[TX_QUEUE]
        if fast is not None and fast.q is txq and not core.taps.per_packet:
            return self._process_tx_fast(txq, fast)
        chains = txq.pop_many(TX_BATCH)
        if not chains:
            return 0
        try:
            for chain in chains:
                self._tx_chain(chain)
        finally:
            self._control_first()
            core.flush_host()
            txq.push_many([chain.head for chain in chains], 0)
        return len(chains)

    def _tx_chain(self, chain: Chain) -> None:
        segs = chain.readable
        if chain.read_len < HDR_SIZE:
            self.core.counters.bad_packets += 1
            self.core.counters.drop("short-header")
            return
        first = segs[0]
        flen = len(first)
        if flen == HDR_SIZE:
            # Linux: header and payload in separate descriptors.
            self.core.guest_packet(first, segs[1:], chain.read_len - HDR_SIZE)
        elif flen > HDR_SIZE:
            self.core.guest_packet(first, [first[HDR_SIZE:], *segs[1:]], chain.read_len - HDR_SIZE)
        else:
            hdr, payload = _split_header(segs)
            self.core.guest_packet(hdr, payload, chain.read_len - HDR_SIZE)

    def _process_tx_fast(self, txq: SplitQueue, fast: TxFastPath,
                         items: list[Run | Slow | CreditItem | Tail] | None = None) -> int:
        """One batch of the C path, or what ``fast.kick`` left (``items``)."""
        core = self.core
        if items is None:
            items = fast.batch()
        capture = fast.capture  # capturing: the runs' records already stand in its chunk
        # Chains C handled itself (credit updates of connections it runs), and connections it
        # gave back, which must be Python's again before any item of theirs is looked at.
        done: list[int] = fast.consumed
        if done:
            txq.counters.chains += len(done)
        self._owned_news(fast)
        try:
            for item in items:
                if isinstance(item, Tail):
                    # C took these chains for a connection it ran, and gave it back with them
                    # (nothing is captured while C runs connections)
                    core.guest_rw_tail(item.src_port, item.dst_cid, item.dst_port, item.total, item.segments)
                    txq.counters.chains += len(item.heads)
                    done.extend(item.heads)
                    continue
                if isinstance(item, Slow):
                    capture.finish()  # a slow chain is the batch's last: its record comes after
                    heads = [item.head]
                else:
                    heads = item.heads if isinstance(item, Run) else [item.head]
                    # An item whose records were cut goes through Python, which captures it again.
                    if not capture.was_cut and self._fast_item(item, capture.sink is not None):
                        txq.counters.chains += len(heads)
                        done.extend(heads)
                        capture.went_through(len(heads))
                        continue
                    capture.cut(item.cap_off)  # this item's records and the later ones: Python's now
                for head in heads:  # the Python reference path, one chain at a time
                    chain = txq.take(head)
                    if chain is not None:
                        self._tx_chain(chain)
                        done.append(head)
        finally:
            capture.finish()
            self._control_first()
            core.flush_host()
            txq.push_many(done, 0)
        return len(items)

    def _owned_news(self, fast: TxFastPath) -> None:
        """What C's last call did to the connections it runs: those it gave back are Python's
        again; those whose host socket ran dry are watched for it."""
        core = self.core
        for conn, back in fast.released:
            core.owned_back(conn, back)  # type: ignore[arg-type]
        for conn in fast.waiting:
            core.owned_waiting(conn)  # type: ignore[arg-type]

    def _fast_item(self, item: Run | CreditItem, captured: bool) -> bool:
        """What the C batch read, straight to the core; False if the core needs the chain."""
        if isinstance(item, Run):
            return self.core.guest_rw_run(item.src_port, item.dst_cid, item.dst_port, item.buf_alloc, item.fwd_cnt,
                                          item.total, item.segments, len(item.heads), captured)
        return self.core.guest_credit(item.type, item.op, item.src_port, item.dst_cid, item.dst_port,
                                      item.buf_alloc, item.fwd_cnt, captured)

    def _rx_progress(self) -> None:
        """Publish the rx buffers filled so far; interrupt the guest if it asked for one."""
        rxq = self.queues[RX_QUEUE]
        if rxq is not None and rxq.publish():
            self._notify(RX_QUEUE)

    def _control_first(self) -> None:
        """Before the batch's data goes to the host: the credit updates it made due (bytes
        counted ahead) go to the guest now, so it refills its window during our copy; with
        them, the tx chains of the previous pass, for one wake-up of the guest, not two."""
        rxq = self.queues[RX_QUEUE]
        txq = self.queues[TX_QUEUE]
        if self.core.control and rxq is not None:
            self.core.fill_rx(rxq)
            tx_due = txq is not None and txq.publish()
            self._rx_progress()
            if tx_due:
                self._notify(TX_QUEUE)

    def _publish_tx(self, txq: SplitQueue) -> None:
        if txq.publish():
            self._notify(TX_QUEUE)

    def _notify(self, index: int) -> None:
        fd = self.call_fds[index]
        if fd is None:
            return
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # counter saturated: the guest has an interrupt pending anyway
        except OSError as e:
            log.warning("%s: call fd of vring %d: %s", self.name, index, e)

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


def _split_header(segs: list[memoryview]) -> tuple[bytes, list[memoryview]]:
    """A header spread over several descriptors: gather it, keep the rest as views."""
    hdr = bytearray()
    rest: list[memoryview] = []
    for seg in segs:
        need = HDR_SIZE - len(hdr)
        if need > 0:
            hdr += seg[:need]
            if len(seg) > need:
                rest.append(seg[need:])
        else:
            rest.append(seg)
    return bytes(hdr), rest


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
