"""One packet as the reader, the filter language and (later) the TUI see it.

Built from a capture record (``vsproxy read``) or from a live tap; the filter language
(``vsproxy.filter``) and the printers only ever look at this record, so a packet from a
file and a packet from the data path are judged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vsproxy.verdict import rewritten_in, verdict_of
from vsproxy.vsock import header as H


@dataclass(slots=True)
class PacketView:
    time: float
    device: str  # pcapng interface name; "" when the file does not say (classic pcap)
    from_guest: bool | None  # None when the file does not say
    hdr: H.Header | None  # None for a vsockmon frame whose transport is not virtio
    mon_op: int  # af_vsockmon_hdr op: 1 CONNECT, 2 DISCONNECT, 3 CONTROL, 4 PAYLOAD
    payload: bytes
    comment: str | None = None
    proto: str | None = None  # application protocol of this packet's stream, when known
    app: tuple[str, ...] = field(default=())  # application summaries of messages ending here

    @property
    def verdict(self) -> str:
        """``allowed``, ``denied``, ``spoofed`` or ``refused``, from vsproxy's capture comment."""
        return verdict_of(self.comment).word

    @property
    def rewritten(self) -> bool:
        return rewritten_in(self.comment)

    @property
    def op_name(self) -> str:
        if self.hdr is None:
            return ""
        op = self.hdr.op
        return H.Op(op).name.lower() if op in H.Op._value2member_map_ else f"op{op}"

    @property
    def type_name(self) -> str:
        if self.hdr is None:
            return ""
        t = self.hdr.type
        return H.Type(t).name.lower() if t in H.Type._value2member_map_ else f"type{t}"
