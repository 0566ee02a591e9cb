"""One vsock connection as vsproxy terminates it: state and credit, no I/O.

vsproxy is the guest's peer (like a TCP proxy): it advertises its own
``buf_alloc``/``fwd_cnt`` for data the guest sends, and honours the guest's
for data it sends. Credit arithmetic is u32 wrap-around (virtio spec 5.10.6.3).
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from vsproxy.endpoints.base import Buffer, Peer
from vsproxy.vsock.header import U32


class State(Enum):
    CONNECTING = "connecting"  # guest REQUEST seen, host side still connecting
    REQUESTED = "requested"  # host-initiated: REQUEST sent, waiting for RESPONSE
    ESTABLISHED = "established"
    CLOSED = "closed"


class Credit:
    """Credit state for both directions of one connection (h2's WindowManager, for vsock)."""

    __slots__ = ("adv_fwd_cnt", "ahead", "buf_alloc", "fwd_cnt", "peer_buf_alloc", "peer_fwd_cnt", "rx_cnt", "tx_cnt")

    def __init__(self, buf_alloc: int) -> None:
        # guest -> vsproxy: what we advertise and what we have forwarded on
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        self.rx_cnt = 0
        self.adv_fwd_cnt = 0  # the fwd_cnt the guest last saw from us
        self.ahead = 0  # bytes counted in fwd_cnt before the peer took them (forward_ahead)
        # vsproxy -> guest: what the guest advertised
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0

    def peer_free(self) -> int:
        """Bytes we may still send the guest. A guest that claims more than it could have
        consumed (hostile fwd_cnt) gets no credit rather than a huge one."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        if in_flight >= self.peer_buf_alloc:
            return 0
        return self.peer_buf_alloc - in_flight

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def sent(self, n: int) -> None:
        self.tx_cnt = (self.tx_cnt + n) & U32

    def receive(self, n: int) -> bool:
        """Account ``n`` bytes from the guest; False if they exceed the credit we gave. The
        guest may count only on the fwd_cnt we advertised, so that is what the check uses."""
        in_flight = (self.rx_cnt - self.adv_fwd_cnt) & U32
        if in_flight + n > self.buf_alloc:
            return False
        self.rx_cnt = (self.rx_cnt + n) & U32
        return True

    def forwarded(self, n: int) -> None:
        """The peer took ``n`` more bytes; those counted ahead are not counted again."""
        ahead = self.ahead
        if ahead:
            if ahead >= n:
                self.ahead = ahead - n
                return
            self.ahead = 0
            n -= ahead
        self.fwd_cnt = (self.fwd_cnt + n) & U32

    def forward_ahead(self, n: int) -> None:
        """Count ``n`` bytes as forwarded now, while their hand-off to the peer is still to
        come in the same pass. The guest, whose credit a Linux sender caps at its own
        buf_alloc, learns of the room before our copy to the peer, not after it: its next
        window overlaps our copy instead of waiting for it."""
        self.ahead += n
        self.fwd_cnt = (self.fwd_cnt + n) & U32

    def guest_view_free(self) -> int:
        """Free space the guest believes we have, from the fwd_cnt it last saw."""
        return self.buf_alloc - ((self.rx_cnt - self.adv_fwd_cnt) & U32)

    def update_due(self) -> bool:
        """Send CREDIT_UPDATE once the guest counts more than a quarter of the usable window as
        outstanding and we have news for it. Linux guests never ask (no CREDIT_REQUEST), and
        since CVE-2026-23086 a Linux sender caps its credit at its own buf_alloc: the usable
        window is the smaller of the two, so the threshold must be taken from that one, or a
        sender with a smaller buffer than ours stalls for good."""
        if self.fwd_cnt == self.adv_fwd_cnt:
            return False
        window = min(self.buf_alloc, self.peer_buf_alloc) if self.peer_buf_alloc else self.buf_alloc
        return ((self.rx_cnt - self.adv_fwd_cnt) & U32) > window // 4


class Connection:
    __slots__ = (
        "credit",
        "credit_wait",
        "deadline",
        "flags",
        "guest_port",
        "guest_shut",
        "host_eof",
        "host_initiated",
        "host_shut_wr",
        "mark",
        "msg_buf",
        "msg_flags",
        "out_bytes",
        "outq",
        "own",
        "own_seen",
        "peer",
        "peer_cid",
        "peer_port",
        "rule",
        "rx_msg",
        "rx_msg_eor",
        "rx_msg_off",
        "state",
        "stats",
        "type",
    )

    # bits in ``flags``: membership of the core's work sets, kept here to avoid set lookups
    IN_FLUSH = 1
    IN_READY = 2
    WAIT_CREDIT = 4
    UPDATE_QUEUED = 8
    CREDIT_REQUESTED = 16
    WATCH_WRITE = 32
    SELF_UPDATES = 64  # the guest sent a CREDIT_UPDATE we had not asked for: it tells unasked

    def __init__(self, type_: int, guest_port: int, peer_cid: int, peer_port: int, peer: Peer, buf_alloc: int) -> None:
        self.type = type_
        self.guest_port = guest_port
        self.peer_cid = peer_cid
        self.peer_port = peer_port
        self.state = State.CONNECTING
        self.peer = peer
        self.credit = Credit(buf_alloc)
        self.guest_shut = 0  # SHUTDOWN flags received from the guest
        self.host_eof = False  # host sent EOF; we told the guest SHUTDOWN SEND
        self.host_shut_wr = False  # we half-closed the host socket
        self.outq: deque[Buffer] = deque()  # guest data not yet taken by the host peer
        self.out_bytes = 0
        self.deadline = 0.0
        self.credit_wait = 0.0  # when the guest's window was last found exhausted
        self.flags = 0
        self.own = -1  # the slot of the C pump's table while C runs it (VsockCore._lend)
        self.own_seen = 0  # the C pump's progress count last seen by tick
        self.host_initiated = False
        # SEQPACKET: the guest message being assembled, the flags of each whole one in outq,
        # and the host message being delivered to the guest in fragments
        self.msg_buf = bytearray()
        self.msg_flags: deque[int] = deque()
        self.rx_msg: bytes | None = None
        self.rx_msg_off = 0
        self.rx_msg_eor = False
        # The routing rules that admitted the connection (counters), and its traffic:
        # [packets to the peer, bytes to the peer, packets to the guest, bytes to the guest]
        self.rule: tuple[str, ...] = ()
        self.stats = [0, 0, 0, 0]
        self.mark: str | None = None  # capture comment for its packets (rewrite, denial)

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.type, self.guest_port, self.peer_cid, self.peer_port)

    def describe(self) -> str:
        return f"guest:{self.guest_port} <-> {self.peer_cid}:{self.peer_port} ({self.peer.describe()})"
