"""Guest data toward the host peers: queued as views of guest memory while a tx batch is
being handled, handed to the peer before the chains go back (zero copy when the peer takes
it all), copied out of guest memory only for what the peer refused."""

from __future__ import annotations

from collections.abc import Sequence

from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.seqpacket import SeqPacket

SENDMSG_MAX_IOV = 512


class HostFlush(SeqPacket):
    def _lend_sender(self, conn: Connection) -> None:
        """Hook: hand an idle sender to the C pump (lending.Lending)."""

    def _guest_rw(self, conn: Connection, n: int, payload: Sequence[memoryview]) -> None:
        if not self._rw_admitted(conn, n) or n == 0:
            return
        cr = conn.credit
        queued = conn.out_bytes
        if queued == cr.ahead and (queued == 0 or conn.flags & Connection.IN_FLUSH):
            # Nothing of an earlier pass is waiting for the peer, so these bytes go to it
            # before this pass ends: count them forwarded already (Credit.forward_ahead).
            # Data the peer then refuses stays queued and stops this until it drains, so the
            # queue never holds more than one window beyond buf_alloc.
            cr.forward_ahead(n)
        self.counters.tx_bytes += n
        st = conn.stats
        st[0] += 1
        st[1] += n
        outq = conn.outq
        first = payload[0]
        if len(first) >= n:
            # One payload buffer (the Linux layout): no loop.
            outq.append(first if len(first) == n else first[:n])
        else:
            left = n
            for seg in payload:
                if len(seg) >= left:
                    outq.append(seg[:left] if len(seg) > left else seg)
                    break
                outq.append(seg)
                left -= len(seg)
        conn.out_bytes += n
        if not conn.flags & Connection.IN_FLUSH:
            conn.flags |= Connection.IN_FLUSH
            self._flush.append(conn)

    def flush_host(self) -> None:
        """Hand queued guest data to the peers. Must run before tx chains go back to the guest:
        afterwards nothing may point into their buffers."""
        pending = self._flush
        self._flush = []
        for conn in pending:
            conn.flags &= ~Connection.IN_FLUSH
            if conn.state is not State.CLOSED or conn in self._lingering:
                self._flush_conn(conn)
            self._own_outq(conn)
            self._hold(conn)
            if conn.own < 0 and not conn.out_bytes:
                self._lend_sender(conn)
        if self.buffered > self.max_buffered:
            self._check_buffered()

    def _own_outq(self, conn: Connection) -> None:
        # Copy what is left out of guest memory: the chain is about to be returned.
        outq = conn.outq
        for i in range(len(outq)):
            b = outq[i]
            if isinstance(b, memoryview):
                outq[i] = bytes(b)

    def _flush_conn(self, conn: Connection) -> None:
        outq = conn.outq
        total = 0
        try:
            if conn.type == H.Type.SEQPACKET:
                total = self._send_messages(conn)
            while outq and conn.type != H.Type.SEQPACKET:
                whole = len(outq) <= SENDMSG_MAX_IOV
                bufs = list(outq) if whole else [outq[i] for i in range(SENDMSG_MAX_IOV)]
                left = conn.out_bytes - total  # what outq holds
                sent = conn.peer.send(bufs)
                if sent <= 0:
                    break
                total += sent
                if whole and sent == left:
                    outq.clear()  # the peer took it all: the common case, no walk
                    break
                while sent:
                    b = outq[0]
                    if len(b) <= sent:
                        sent -= len(b)
                        outq.popleft()
                    else:
                        outq[0] = b[sent:]
                        sent = 0
        except OSError as e:
            conn.out_bytes -= total
            self._peer_error(conn, e)
            return
        conn.out_bytes -= total
        if conn.held:
            self._hold(conn)  # (a pass's bytes are counted once copied, in flush_host)
        if total:
            conn.credit.forwarded(total)
        if outq:
            if not conn.flags & Connection.WATCH_WRITE:
                conn.flags |= Connection.WATCH_WRITE
                conn.peer.watch_write(True)
            return
        if conn.flags & Connection.WATCH_WRITE:
            conn.flags &= ~Connection.WATCH_WRITE
            conn.peer.watch_write(False)
        if conn in self._lingering:
            self._lingering.discard(conn)
            conn.peer.close(reset=False)
            return
        if conn.guest_shut & H.SHUTDOWN_SEND and not conn.host_shut_wr:
            conn.host_shut_wr = True
            conn.peer.shutdown_write()
            if conn.host_eof:
                # Both directions are finished; the vsock side waits for the guest's close.
                conn.peer.close(reset=False)
        self._credit_changed(conn)
