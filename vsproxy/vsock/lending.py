"""Lending connections to the C pump (fastpath.TxFastPath), which runs them between Python's
turns: takes the guest's CREDIT_UPDATEs, reads the host socket into the rx ring, sends the
guest's data. The records C gives back and the flags it shares are defined here, sans-I/O;
the shell injects the pump (``owner``), so nothing here imports the C wrapper."""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Protocol

from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.header import HDR, Op
from vsproxy.vsock.rx import RxPath
from vsproxy.vsock.table import Counters

log = logging.getLogger("vsproxy.vsock")

# Flags shared with C (vq_own.flags).
OWN_F_REQUESTED, OWN_F_SELF, OWN_F_WAIT, OWN_F_TX = 1, 2, 4, 8
# Why C gave a connection back (vq_own.release); OWN_TAKEN: Python took it; OWN_BLOCKED: the
# host socket did not take all of the guest's data (the rest comes as a Tail item).
OWN_TAKEN, OWN_GUEST, OWN_EOF, OWN_ERROR, OWN_SLOW, OWN_LIMIT, OWN_ALL, OWN_BLOCKED = range(8)


class OwnedCounts(NamedTuple):
    """What C did for a connection it runs, since Python last looked."""

    credit_items: int = 0  # CREDIT_UPDATEs C took
    packets: int = 0  # RW packets C wrote to the guest, and their payload bytes
    bytes: int = 0
    tx_packets: int = 0  # RW packets C took from the guest (OWN_F_TX), and their payload bytes
    tx_bytes: int = 0
    updates_sent: int = 0  # CREDIT_UPDATEs C wrote to the guest
    sends: int = 0  # runs C sent to the host socket
    read_ahead: int = 0  # host bytes C read ahead while the guest's window was shut


class OwnedBack(NamedTuple):
    """An owned connection's state as C gives it back, with what it did meanwhile."""

    why: int
    err: int
    tx_cnt: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    flags: int
    counts: OwnedCounts = OwnedCounts()
    # with OWN_F_TX: the guest -> host credit (Credit's fields)
    rx_cnt: int = 0
    fwd_cnt: int = 0
    adv_fwd_cnt: int = 0
    ahead: int = 0
    # host bytes C read ahead and the guest has not had yet: they go before the socket's
    prebuf: bytes = b""


def add_counts(c: Counters, n: OwnedCounts) -> None:
    """What C did for a connection, into a device's counters."""
    c.tx_packets += n.credit_items + n.tx_packets
    c.tx_bytes += n.tx_bytes
    c.pump_updates += n.credit_items
    c.pump_sends += n.sends
    c.pump_read_ahead += n.read_ahead
    c.rx_packets += n.packets + n.updates_sent
    c.rx_bytes += n.bytes


class Owner(Protocol):
    """The C pump (fastpath.TxFastPath) that runs connections between Python's turns."""

    def own(self, token: object, key: tuple[int, int, int, int], fd: int, tx_cnt: int, peer_buf_alloc: int,
            peer_fwd_cnt: int, hdr: bytes, flags: int, tx: tuple[int, int, int, int] | None = None,
            comment: bytes = b"") -> int: ...
    def take_back(self, slot: int) -> OwnedBack: ...
    def fill(self, slot: int) -> OwnedBack | bool: ...
    def progress(self, slot: int) -> int: ...
    def shut(self, slot: int) -> bool: ...
    def counts(self, slot: int) -> OwnedCounts: ...
    def peek(self, slot: int) -> OwnedBack: ...


class Lending(RxPath):
    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)
        # Injected by the shell when C can run connections between Python's turns (_lend): take
        # the guest's CREDIT_UPDATEs, read the host socket into the rx ring, send the guest's data.
        self.owner: Owner | None = None

    def _reclaim_if_lent(self, conn: Connection) -> None:
        if conn.own >= 0:
            self._reclaim(conn, act=False)

    def _lend(self, conn: Connection) -> None:
        """Let C take this connection's next CREDIT_UPDATEs and refill the rx ring from its host
        socket without coming back here, for as long as nothing else happens on it; and, while
        both directions are open, send the guest's data to the host socket and the credit
        updates that makes due (OWN_F_TX). Only a plain connection qualifies: nothing queued
        for the peer, no control packet of its own queued, no per-packet tap; SEQPACKET too
        (C sends the guest's one-packet messages and reads the host's whole ones), with no
        message in parts. Captured, C writes
        its packets' records, with the connection's mark as their comment; a capture that
        starts while C runs it gets them too (C writes the mark whether or not anything
        captures, so it is there when something does)."""
        if self.owner is None:
            return
        cr = conn.credit
        if (self.taps.per_packet or conn.out_bytes or conn.flags & Connection.UPDATE_QUEUED
                or (conn.type == H.Type.SEQPACKET and conn.rx_msg is not None)):
            # (SEQPACKET: C sends whole messages and reads whole ones; the one Python delivers
            # in parts to the guest, and one it assembles from the guest, stay Python's)
            return
        comment = conn.mark.encode() if conn.mark is not None else b""
        tx: tuple[int, int, int, int] | None = None
        if conn.state is State.ESTABLISHED and not conn.guest_shut and not conn.host_shut_wr and not cr.ahead:
            tx = cr.rx_state()
        elif cr.fwd_cnt != cr.adv_fwd_cnt:
            return  # an update may be due, and C would not send it
        fd = conn.peer.fast_fd()
        if fd < 0:
            return
        flags = (OWN_F_REQUESTED if conn.flags & Connection.CREDIT_REQUESTED else 0) | (
            OWN_F_SELF if conn.flags & Connection.SELF_UPDATES else 0)
        if not conn.flags & Connection.WAIT_CREDIT:
            flags |= OWN_F_WAIT  # the guest's window is open: C waits for the host socket
        hdr = HDR.pack(*self._fields(conn, Op.RW, 0, 0))
        conn.own = self.owner.own(conn, conn.key, fd, *cr.tx_state(), hdr, flags, tx, comment)
        if conn.own >= 0:
            self.owned += 1
            conn.own_seen = 0
            if flags & OWN_F_WAIT:
                conn.peer.watch_read(True)  # Python watches the socket for C (peer_readable)

    def _lend_sender(self, conn: Connection) -> None:
        """After a flush that left nothing queued for the peer: a connection with nothing else
        going on (its guest window open, not waiting for rx buffers, its host socket watched)
        goes to C, which then sends the guest's next data itself, with no turn through here."""
        if (self.owner is not None and conn.state is State.ESTABLISHED and not conn.host_eof
                and not conn.flags & (Connection.IN_READY | Connection.WAIT_CREDIT | Connection.WATCH_WRITE)):
            self._lend(conn)

    def _reclaim(self, conn: Connection, act: bool = True) -> OwnedBack:
        """Python needs the connection: take it back from C first. Returns what C gave back."""
        assert self.owner is not None
        back = self.owner.take_back(conn.own)
        self.owned_back(conn, back, act)
        return back

    def owned_back(self, conn: Connection, back: OwnedBack, act: bool = True) -> None:
        """C gave the connection back (or Python took it): its credit state and counts become
        Python's again, and what made C stop is dealt with as the Python path would."""
        conn.own = -1
        self.owned -= 1
        cr = conn.credit
        cr.restore_tx(back.tx_cnt, back.peer_buf_alloc, back.peer_fwd_cnt)
        flags = conn.flags & ~(Connection.CREDIT_REQUESTED | Connection.SELF_UPDATES)
        if back.flags & OWN_F_REQUESTED:
            flags |= Connection.CREDIT_REQUESTED
        if back.flags & OWN_F_SELF:
            flags |= Connection.SELF_UPDATES
        conn.flags = flags
        if back.flags & OWN_F_TX:
            cr.restore_rx(back.rx_cnt, back.fwd_cnt, back.adv_fwd_cnt, back.ahead)
        elif back.counts.packets:
            cr.advertised()  # what C's headers carried
        self._fold(conn, back.counts)
        if back.prebuf:
            # what C read ahead goes to the guest first: fast_fd is -1 until the Python path sent it
            conn.peer.unread(back.prebuf)
        if not act or conn.state is not State.ESTABLISHED:
            return
        why = back.why
        if why == OWN_BLOCKED:
            self.counters.pump_blocked += 1
        if why == OWN_EOF:
            conn.flags &= ~(Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED)
            self._host_eof(conn)
        elif why == OWN_ERROR:
            self._peer_error(conn, OSError(back.err, os.strerror(back.err)))
        else:
            # Python's WAIT_CREDIT is from when C took the connection; the guest's window may have
            # opened or shut since. The pump finds out: it serves the connection, or finds the
            # window shut and waits (asking if it must) and lends it again.
            if cr.peer_free():
                conn.flags &= ~(Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED)
            elif not conn.flags & Connection.WAIT_CREDIT:
                conn.flags |= Connection.WAIT_CREDIT
                conn.credit_wait = self.now
            self._credit_changed(conn)
            self._make_ready(conn)

    def owned_waiting(self, conn: Connection) -> None:
        """C keeps the connection with credit left and its host socket dry: Python watches the
        socket for C (peer_readable)."""
        conn.peer.watch_read(True)

    def _fold(self, conn: Connection, n: OwnedCounts) -> None:
        add_counts(self.counters, n)
        st = conn.stats
        st[0] += n.tx_packets
        st[1] += n.tx_bytes
        st[2] += n.packets
        st[3] += n.bytes

    def sync_owned(self) -> None:
        """Fold what C did for the connections it still runs into the counters."""
        if self.owned and self.owner is not None:
            for conn in self.conns.values():
                if conn.own >= 0:
                    self._fold(conn, self.owner.counts(conn.own))

    def detach_owner(self) -> None:
        """The C pump goes away (a ring stops): every connection it runs comes back."""
        if self.owner is not None and self.owned:
            held = 0
            for conn in list(self.conns.values()):
                if conn.own >= 0:
                    held += len(self._reclaim(conn).prebuf)
            if held:
                log.info("C pump detached: %d bytes it had read ahead go to the guest from Python", held)
        self.owner = None
