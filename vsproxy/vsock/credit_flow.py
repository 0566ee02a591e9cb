"""Credit flow for one device's connections: when the guest is told of room (CREDIT_UPDATE),
when it is asked for its own (CREDIT_REQUEST), and whether what it sends fits the window we
gave. The arithmetic itself is ``connection.Credit``'s, the only place it happens."""

from __future__ import annotations

from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection, State
from vsproxy.vsock.header import Op
from vsproxy.vsock.table import ConnTable


class CreditFlow(ConnTable):
    def _rw_admitted(self, conn: Connection, n: int) -> bool:
        """What every RW of ``n`` payload bytes passes first, STREAM or SEQPACKET; counted."""
        if conn.state is not State.ESTABLISHED or conn.guest_shut & H.SHUTDOWN_SEND:
            self.counters.drop("rw-not-established")
            self._reset(conn, "data on a connection that is not open for it")
            return False
        if not conn.credit.receive(n):
            # The guest ignored the credit we advertised: RST, never unbounded buffering.
            self.counters.credit_violations += 1
            self._reset(conn, "guest exceeded advertised credit")
            return False
        return True

    def _credit_changed(self, conn: Connection) -> None:
        if conn.state is State.CLOSED:
            return
        if conn.credit.update_due():
            self._queue_credit_update(conn)
        if conn.flags & Connection.WAIT_CREDIT and conn.credit.peer_free() > 0:
            conn.flags &= ~(Connection.WAIT_CREDIT | Connection.CREDIT_REQUESTED)
            self._make_ready(conn)

    def _request_credit(self, conn: Connection) -> None:
        conn.flags |= Connection.CREDIT_REQUESTED
        self._queue(conn, Op.CREDIT_REQUEST)

    def _guest_credit_update(self, conn: Connection) -> None:
        if not conn.flags & Connection.CREDIT_REQUESTED:
            conn.flags |= Connection.SELF_UPDATES

    def _queue_credit_update(self, conn: Connection) -> None:
        if not conn.flags & Connection.UPDATE_QUEUED:
            conn.flags |= Connection.UPDATE_QUEUED
            self._queue(conn, Op.CREDIT_UPDATE)
