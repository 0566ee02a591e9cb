"""Credit for one vsock connection, both directions: the only place its arithmetic happens.

vsproxy is the guest's peer (like a TCP proxy): it advertises its own ``buf_alloc`` and
``fwd_cnt`` for data the guest sends, and honours the guest's for data it sends. Counters
wrap at 2^32 (virtio spec 5.10.6.3); a guest's claim beyond what it could have consumed
gives it no credit rather than a huge one.
"""

from __future__ import annotations

from vsproxy.vsock.header import U32


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
        """``n`` more bytes went to the guest."""
        self.tx_cnt = (self.tx_cnt + n) & U32

    def advertised(self) -> None:
        """A header carrying our fwd_cnt went to the guest: it counts on that one now."""
        self.adv_fwd_cnt = self.fwd_cnt

    def limit_window(self, most: int) -> None:
        """Advertise at most ``most`` bytes of buffer (a sibling's relay: no more than the
        receiving guest's own window)."""
        self.buf_alloc = min(self.buf_alloc, most)

    def tx_state(self) -> tuple[int, int, int]:
        """(tx_cnt, peer_buf_alloc, peer_fwd_cnt): the guest-bound half, as C takes it."""
        return self.tx_cnt, self.peer_buf_alloc, self.peer_fwd_cnt

    def rx_state(self) -> tuple[int, int, int, int]:
        """(buf_alloc, rx_cnt, fwd_cnt, adv_fwd_cnt): the guest-to-host half, as C takes it."""
        return self.buf_alloc, self.rx_cnt, self.fwd_cnt, self.adv_fwd_cnt

    def restore_tx(self, tx_cnt: int, peer_buf_alloc: int, peer_fwd_cnt: int) -> None:
        """The guest-bound half as C gives it back."""
        self.tx_cnt, self.peer_buf_alloc, self.peer_fwd_cnt = tx_cnt & U32, peer_buf_alloc, peer_fwd_cnt & U32

    def restore_rx(self, rx_cnt: int, fwd_cnt: int, adv_fwd_cnt: int, ahead: int) -> None:
        """The guest-to-host half as C gives it back (when C received for the connection)."""
        self.rx_cnt, self.fwd_cnt, self.adv_fwd_cnt, self.ahead = rx_cnt & U32, fwd_cnt & U32, adv_fwd_cnt & U32, ahead

    def receive(self, n: int) -> bool:
        """Account ``n`` bytes from the guest; False if they exceed the credit we gave. The
        guest may count only on the fwd_cnt we advertised, so that is what the check uses."""
        in_flight = (self.rx_cnt - self.adv_fwd_cnt) & U32
        if in_flight + n > self.buf_alloc:
            return False
        self.rx_cnt = (self.rx_cnt + n) & U32
        return True

    def fits(self, n: int) -> bool:
        """``receive(n)`` would take them (the same check, nothing accounted)."""
        return ((self.rx_cnt - self.adv_fwd_cnt) & U32) + n <= self.buf_alloc

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
