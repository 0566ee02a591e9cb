"""The data path of one front-end session: kicks in, tx chains to the vsock core (through the
C batch where it serves the ring, else the Python walker, chain by chain), rx chains filled,
used rings published and the guest interrupted. A mixin of ``frontend.FrontendSession``,
which owns the rings and eventfds this reads and writes."""

from __future__ import annotations

import logging
import os

from vsproxy.fastpath import SEQPACKET, CreditItem, Run, RxFastPath, Slow, Tail, TxFastPath
from vsproxy.loop import Loop
from vsproxy.vhost_user.session import RX_QUEUE, TX_QUEUE
from vsproxy.virtq import Chain, SplitQueue
from vsproxy.vsock.core import VsockCore
from vsproxy.vsock.header import HDR_SIZE

log = logging.getLogger("vsproxy.device")

TX_BATCH = 256  # chains per pump pass, so one busy device cannot starve the loop
PUMP_PASSES = 8
SWEEP_INTERVAL = 0.1  # safety net for a kick lost to the EVENT_IDX race
_ONE = (1).to_bytes(8, "little")


class DataPath:
    # what the session sets up (frontend.FrontendSession.__init__ and its ring handling)
    loop: Loop
    name: str
    core: VsockCore
    queues: list[SplitQueue | None]
    _fastpaths: list[TxFastPath | None]
    _rx_path: RxFastPath | None
    kick_fds: list[int | None]
    call_fds: list[int | None]
    closed: bool
    _pump_scheduled: bool

    @property
    def running(self) -> bool:
        return not self.closed and self.queues[RX_QUEUE] is not None and self.queues[TX_QUEUE] is not None

    def end(self, reason: str, *, error: bool) -> None:
        """End the session (frontend.FrontendSession)."""
        raise NotImplementedError

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
        guest's credit updates, refills the rx ring and re-enables kicks itself (vq_tx_kick),
        writing the capture records as it goes; Python steps in only for what C leaves.
        False: the ordinary pump takes the kick."""
        core, txq, fast = self.core, self.queues[TX_QUEUE], self._fastpaths[TX_QUEUE]
        if (not core.owned or fast is None or txq is None or fast.q is not txq or self._pump_scheduled
                or self.closed or core.control or core.ready or core.taps.per_packet or txq.broken):
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
        fast = self._fastpaths[TX_QUEUE]
        if fast is not None:
            self.loop.busy.add(*fast.poll_counts())  # C's polling, in the loop's figures
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
                    # (their records, if captured, are C's and stand)
                    core.guest_rw_tail(item.src_port, item.dst_cid, item.dst_port, item.total, item.segments,
                                       item.type, item.flags)
                    txq.counters.chains += len(item.heads)
                    done.extend(item.heads)
                    continue
                if isinstance(item, Slow):
                    capture.finish()  # a slow chain is the batch's last: its record comes after
                    heads = [item.head]
                else:
                    heads = item.heads if isinstance(item, Run) else [item.head]
                    # An item whose records were cut goes through Python, which captures it again.
                    # A run C ran for a marked connection has its comment in its records already.
                    captured = capture.open and not (isinstance(item, Run) and item.marked)
                    if not capture.was_cut and self._fast_item(item, captured):
                        txq.counters.chains += len(heads)
                        done.extend(heads)
                        capture.dropped(len(heads))  # (only with no room in the sink)
                        continue
                    capture.cut(item.cap_off, item.cap_rec)  # this item's records and the later ones: Python's now
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
            if item.type == SEQPACKET:
                return self.core.guest_seq_run(item.src_port, item.dst_cid, item.dst_port, item.buf_alloc,
                                               item.fwd_cnt, item.segments, item.flags, captured)
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
