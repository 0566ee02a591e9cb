"""One vsock connection as vsproxy terminates it: state and credit, no I/O.

vsproxy is the guest's peer (like a TCP proxy): it advertises its own
``buf_alloc``/``fwd_cnt`` for data the guest sends, and honours the guest's
for data it sends. Credit arithmetic is u32 wrap-around (virtio spec 5.10.6.3).
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from vsproxy.endpoints.base import Buffer, Peer
from vsproxy.verdict import Mark
from vsproxy.vsock.credit import Credit


class State(Enum):
    CONNECTING = "connecting"  # guest REQUEST seen, host side still connecting
    REQUESTED = "requested"  # host-initiated: REQUEST sent, waiting for RESPONSE
    ESTABLISHED = "established"
    CLOSED = "closed"


class Connection:
    __slots__ = (
        "created",
        "credit",
        "credit_wait",
        "deadline",
        "flags",
        "guest_port",
        "guest_shut",
        "held",
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
        "real",
        "rule",
        "rx_msg",
        "rx_msg_eor",
        "rx_msg_off",
        "sib_held",
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
    RCV_RELAYED = 128  # the far side's SHUTDOWN RCV went to the guest

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
        self.held = 0  # out_bytes as last counted into the device's ``buffered`` (ConnTable._hold)
        self.sib_held = 0  # bytes it sent that wait in a sibling's inbox (ConnTable.sibling_held)
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
        self.mark: Mark | None = None  # what vsproxy decided of it (rewrite, denial): its capture comment
        self.real: tuple[int, int] | None = None  # the real peer (CID, port) when a remap rewrote it
        self.created = 0.0  # the core's clock when it was made

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.type, self.guest_port, self.peer_cid, self.peer_port)

    def describe(self) -> str:
        return f"guest:{self.guest_port} <-> {self.peer_cid}:{self.peer_port} ({self.peer.describe()})"
