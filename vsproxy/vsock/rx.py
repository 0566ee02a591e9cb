"""Filling the guest's rx ring: control packets first, then host data for the connections
that are ready, through the C path where the shell injected one, else chain by chain."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

from vsproxy.endpoints.base import scatter
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.header import HDR, HDR_SIZE, Op
from vsproxy.vsock.rxbuf import RxChain, RxQueue, payload_views
from vsproxy.vsock.tohost import HostFlush

# What one connection may fill before the next ready one gets a turn, and before the filled
# buffers are handed to the guest (published; an interrupt only if the guest's used_event asks):
# 256 KiB, or 128 chains (a Linux guest's 256 KiB window is 70 of its 3776-byte rx buffers: a
# lower count would hand the connection back to Python several times a window).
RX_FAST_BURST = 128
RX_FAST_BURST_BYTES = 256 * 1024
# How the C rx fill ended (vq_rx_fill): burst or credit used up, next chain not the Linux
# shape, socket dry, EOF, error, socket dry after a short read.
RX_LIMIT, RX_SLOW, RX_AGAIN, RX_EOF, RX_ERROR, RX_SHORT = range(6)


class RxFill(NamedTuple):
    packets: int
    bytes: int
    status: int
    err: int


class RxFastFill(Protocol):
    def __call__(self, fd: int, credit: int, max_packets: int, hdr: bytes, comment: bytes = b"",
                 msg_limit: int = -1) -> RxFill: ...


class RxPath(HostFlush):
    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        # Injected by the shell when the C rx path can serve this device's rx ring.
        self.rx_fill_c: RxFastFill | None = None
        # The shell's "publish the rx buffers filled so far" (and interrupt if the guest asks).
        self.rx_progress: Callable[[], None] | None = None
        # The C writer of header-only packets into Linux-shaped rx chains (RxFastPath.put).
        self.rx_put: Callable[[bytes], bool] | None = None
        self.rx_pending: Callable[[], int] = lambda: 0

    def _lend(self, conn: Connection) -> None:
        """Hook: hand a connection whose guest window is shut to the C pump (lending.Lending)."""

    def fill_rx(self, rxq: RxQueue) -> int:
        """Fill posted rx buffers: control packets first, then host data round-robin.
        Returns the number of chains used.

        A ready connection keeps its read interest while it is served; it is switched off
        only while the connection cannot be served (no rx buffers, no guest credit), so a
        guest that posts nothing pauses host reads without a busy loop."""
        used = 0
        control = self.control
        ready = self.ready
        c = self.counters
        taps = self.taps.active
        tapped = self.taps
        fill_c = self.rx_fill_c if not tapped.per_packet else None
        rx_put = self.rx_put if fill_c is not None else None
        while control or ready:
            if not control:
                conn = ready.popleft()
                conn.flags &= ~Connection.IN_READY
                if conn.state is not State.ESTABLISHED or conn.guest_shut & H.SHUTDOWN_RCV or conn.host_eof:
                    continue
                if self._far_shutdown(conn):
                    continue
                credit = conn.credit.peer_free()
                if credit == 0:
                    if not conn.flags & Connection.WAIT_CREDIT:
                        conn.flags |= Connection.WAIT_CREDIT
                        conn.credit_wait = self.now
                    conn.peer.watch_read(False)
                    if not conn.flags & (Connection.CREDIT_REQUESTED | Connection.SELF_UPDATES):
                        # A guest that has not shown it sends updates unasked is asked at once;
                        # one that has (Linux: when its free space falls below 64 KiB) is asked
                        # only if its window stays shut (tick), not once a window.
                        self._request_credit(conn)
                    if conn.own < 0:
                        self._lend(conn)
                    continue
                # C writes the capture comment (the mark) too, unless it is too long for it.
                # SEQPACKET: C reads whole messages (at most the guest's buf_alloc), unless
                # Python is delivering one in parts.
                seq = conn.type == H.Type.SEQPACKET
                comment = tapped.c_comment(conn.mark) if not seq or conn.rx_msg is None else None
                if fill_c is not None and comment is not None:
                    fd = conn.peer.fast_fd()
                    if fd >= 0:
                        done, more = self._fill_from_c(fill_c, conn, fd, credit, comment,
                                                       conn.credit.peer_buf_alloc if seq else -1)
                        used += done
                        if more is None:
                            continue
                        if not more:
                            # no rx buffers of any shape: wait for the guest to post some
                            self._make_ready(conn, front=True)
                            for r in ready:
                                r.peer.watch_read(False)
                            break
                chain = rxq.pop()
                if chain is None:
                    self._make_ready(conn, front=True)
                    for r in ready:
                        r.peer.watch_read(False)
                    break
                used += 1
                if chain.write_len < HDR_SIZE:
                    # Cannot hold even a header: give it back empty, count it, try the next.
                    c.short_rx_buffers += 1
                    rxq.push(chain.head, 0)
                    self._make_ready(conn, front=True)
                    continue
                rx_one = self._rx_seq_chain if conn.type == H.Type.SEQPACKET else self._rx_chain
                if not rx_one(rxq, chain, conn, credit):
                    used -= 1
                elif conn.peer.far_shutdown() and not conn.host_eof:
                    # what the far side shut goes right after its last bytes, in this same pass
                    # (queued now, written before anything is published), not a wake-up later
                    self._far_shutdown(conn)
                continue
            conn_or_none, op, flags, raw = control[0]
            if conn_or_none is not None and conn_or_none.state is State.CLOSED and op != Op.RST:
                control.popleft()  # nothing more goes out for a closed connection
                if op == Op.CREDIT_UPDATE:
                    conn_or_none.flags &= ~Connection.UPDATE_QUEUED
                continue
            data = raw if conn_or_none is None else HDR.pack(*self._fields(conn_or_none, op, flags, 0))
            # C writes it, and its capture record, into a Linux-shaped chain; else the walker.
            if rx_put is None or not rx_put(data):
                chain = rxq.pop()
                if chain is None:
                    for r in ready:
                        r.peer.watch_read(False)
                    break
                if chain.write_len < HDR_SIZE:
                    c.short_rx_buffers += 1
                    rxq.push(chain.head, 0)
                    used += 1
                    continue
                scatter(data, chain.writable)
                if taps:
                    self._tap(True, data, ())
                rxq.push(chain.head, HDR_SIZE)
            control.popleft()
            if conn_or_none is not None:
                conn_or_none.credit.advertised()  # the guest sees it now
                if op == Op.CREDIT_UPDATE:
                    conn_or_none.flags &= ~Connection.UPDATE_QUEUED
                    if (conn_or_none.type == H.Type.SEQPACKET and conn_or_none.own < 0
                            and not conn_or_none.out_bytes):
                        # A SEQPACKET connection counts the guest's messages forwarded once the
                        # host took them: the update that makes due is queued after the flush,
                        # where a stream's went out before it, and the flush could not lend the
                        # connection to C with it queued. It can now.
                        self._lend_sender(conn_or_none)
            c.rx_packets += 1
            used += 1
        return used

    def _fill_from_c(self, fill_c: RxFastFill, conn: Connection, fd: int, credit: int,
                     comment: bytes, msg_limit: int = -1) -> tuple[int, bool | None]:
        """Serve ``conn`` through the C path (``msg_limit`` >= 0: SEQPACKET, whole messages of
        at most that many bytes). Returns (chains used, more): more is None when the
        connection was fully dealt with, True when the Python path should take the next chain
        (an unusual shape, or a message C leaves to it), False when the ring has no buffers at
        all."""
        cr = conn.credit
        hdr = HDR.pack(*self._fields(conn, Op.RW, 0, 0))  # C patches len (and flags) per packet
        credit = min(credit, RX_FAST_BURST_BYTES)
        if msg_limit < 0:
            r = fill_c(fd, credit, RX_FAST_BURST, hdr, comment)
        else:
            r = fill_c(fd, credit, RX_FAST_BURST, hdr, comment, msg_limit=msg_limit)
        if r.packets and self.rx_progress is not None:
            # The guest may start on these while we read the next burst.
            self.rx_progress()
        if r.packets:
            cr.sent(r.bytes)
            cr.advertised()
            self.counters.rx_packets += r.packets
            self.counters.rx_bytes += r.bytes
            conn.stats[2] += r.packets
            conn.stats[3] += r.bytes
        status = r.status
        if status == RX_LIMIT:
            self._make_ready(conn)  # credit or burst used up: back of the line
        elif status in (RX_SHORT, RX_AGAIN):
            conn.peer.watch_read(True)
        elif status == RX_EOF:
            self._host_eof(conn)
        elif status == RX_ERROR:
            self._peer_error(conn, OSError(r.err, os.strerror(r.err)))
        else:  # RX_SLOW: the next chain is not the Linux shape, or there is none
            if r.packets:
                self._make_ready(conn, front=True)
                return r.packets, None
            return 0, self.rx_pending() > 0
        return r.packets, None

    def _rx_chain(self, rxq: RxQueue, chain: RxChain, conn: Connection, credit: int) -> bool:
        """One host read into one rx chain (the Python path). False if the chain went unused."""
        writable = chain.writable
        first = writable[0]
        room = chain.write_len - HDR_SIZE
        want = credit if credit < room else room
        if want > H.MAX_PKT_PAYLOAD:
            want = H.MAX_PKT_PAYLOAD
        if len(first) >= HDR_SIZE + want:
            bufs = [first[HDR_SIZE : HDR_SIZE + want]]
        else:
            bufs = payload_views(writable, want)
        try:
            n = conn.peer.recv_into(bufs)
        except OSError as e:
            return self._chain_unused(rxq, conn, e)
        if not n:
            return self._chain_unused(rxq, conn, n == 0)
        cr = conn.credit
        cr.sent(n)
        cr.advertised()
        if len(first) >= HDR_SIZE:
            HDR.pack_into(first, 0, *self._fields(conn, Op.RW, 0, n))
            if self.taps.active:
                self._tap(True, bytes(first[:HDR_SIZE]), bufs, conn.mark)
        else:
            data = self._header(conn, Op.RW, 0, n)
            scatter(data, writable)
            if self.taps.active:
                self._tap(True, data, bufs, conn.mark)
        rxq.push(chain.head, HDR_SIZE + n)
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n
        conn.stats[2] += 1
        conn.stats[3] += n
        if n == want:
            self._make_ready(conn)  # more may be waiting: back of the line, for fairness
        else:
            conn.peer.watch_read(True)
        return True
