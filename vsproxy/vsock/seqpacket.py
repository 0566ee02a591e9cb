"""SEQPACKET: guest messages assembled from their fragments and handed to the peer whole;
host messages cut into fragments the guest's buffers and credit take, EOM (and EOR) on the
last. Message boundaries survive; record marks reach peers that can carry them."""

from __future__ import annotations

from collections.abc import Sequence

from vsproxy.endpoints.base import scatter
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.credit_flow import CreditFlow
from vsproxy.vsock.header import HDR_SIZE, Op
from vsproxy.vsock.rxbuf import RxChain, RxQueue


class SeqPacket(CreditFlow):
    def _guest_seq_rw(self, conn: Connection, n: int, payload: Sequence[memoryview], flags: int) -> None:
        """SEQPACKET data: fragments are assembled (bounded by the credit we gave) and each
        whole message goes to the peer as one message, EOR kept where the peer can carry it."""
        if not self._rw_admitted(conn, n):
            return
        self.counters.tx_bytes += n
        conn.stats[0] += 1
        conn.stats[1] += n
        msg_buf = conn.msg_buf
        # a message whole in one packet (the usual case) goes out with one copy, not two
        whole = bool(flags & H.SEQ_EOM) and not msg_buf and len(payload) == 1 and len(payload[0]) == n
        if not whole:
            left = n
            for seg in payload:
                if left <= 0:
                    break
                msg_buf += seg[:left]
                left -= len(seg)
        conn.out_bytes += n
        if flags & H.SEQ_EOM:
            conn.outq.append(bytes(payload[0]) if whole else bytes(msg_buf))
            conn.msg_flags.append(flags & (H.SEQ_EOM | H.SEQ_EOR))
            msg_buf.clear()
            if not conn.flags & Connection.IN_FLUSH:
                conn.flags |= Connection.IN_FLUSH
                self._flush.append(conn)

    def _rx_seq_chain(self, rxq: RxQueue, chain: RxChain, conn: Connection, credit: int) -> bool:
        """SEQPACKET to the guest: one host message at a time, in fragments sized to the rx
        buffers and the credit, EOM (and EOR) on the last one only."""
        if conn.rx_msg is None:
            limit = conn.credit.peer_buf_alloc
            try:
                got = conn.peer.recv_message(limit)
            except OSError as e:
                return self._chain_unused(rxq, conn, e)
            if got is None or not got[0]:
                return self._chain_unused(rxq, conn, got is not None)
            data, eor = got
            if len(data) > limit:
                # The guest could never take it whole (Linux: EMSGSIZE): the stream of messages is broken.
                rxq.unpop()
                self.counters.drop("message-too-large")
                self._reset(conn, f"host message of {len(data)} bytes exceeds the guest's buf_alloc {limit}")
                return False
            conn.rx_msg, conn.rx_msg_off, conn.rx_msg_eor = data, 0, eor
        msg = conn.rx_msg
        off = conn.rx_msg_off
        n = min(len(msg) - off, chain.write_len - HDR_SIZE, credit, H.MAX_PKT_PAYLOAD)
        last = off + n == len(msg)
        flags = (H.SEQ_EOM | (H.SEQ_EOR if conn.rx_msg_eor else 0)) if last else 0
        cr = conn.credit
        cr.sent(n)
        data_hdr = self._header(conn, Op.RW, flags, n)
        scatter(data_hdr + msg[off : off + n], chain.writable)
        if self.taps.active:
            self._tap(True, data_hdr, [memoryview(msg)[off : off + n]], conn.mark)
        rxq.push(chain.head, HDR_SIZE + n)
        self.counters.rx_packets += 1
        self.counters.rx_bytes += n
        conn.stats[2] += 1
        conn.stats[3] += n
        if last:
            conn.rx_msg = None
        else:
            conn.rx_msg_off = off + n
        self._make_ready(conn)  # the rest of this message, or the next one
        return True

    def _send_messages(self, conn: Connection) -> int:
        """Whole guest messages to the peer, as many as it takes now; the bytes sent. Raises
        OSError as the peer does (the caller resets the connection)."""
        outq = conn.outq
        total = 0
        while outq:
            msg = outq[0]
            if not conn.peer.send_message(bytes(msg), bool(conn.msg_flags[0] & H.SEQ_EOR)):
                break
            outq.popleft()
            conn.msg_flags.popleft()
            total += len(msg)
        return total
