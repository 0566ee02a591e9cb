"""Connection and device events, typed. The vsock core and the session report what happens
to an ``EventSink`` the shell injects (``eventbus.EventBus``); nothing is built while nobody
listens (``active``). Sans-I/O: no clock, no threads here."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class EventKind(Enum):
    REQUESTED = "requested"  # a REQUEST went out or came in (who: detail)
    ESTABLISHED = "established"
    REFUSED = "refused"  # nothing serves it, a limit, or the guest refused: RST
    DENIED = "denied"  # a rule refused it (rule)
    HALF_CLOSED = "half-closed"  # one direction shut (detail: by whom, which way)
    CLOSED = "closed"  # an orderly close
    RESET = "reset"  # an RST or a reset host side (detail: why)
    FRONTEND_CONNECTED = "frontend-connected"
    RINGS_STARTED = "rings-started"
    RINGS_STOPPED = "rings-stopped"  # the guest driver went away: reboot, reset or poweroff
    FRONTEND_GONE = "frontend-gone"


@dataclass(frozen=True, slots=True)
class Event:
    time: float  # wall clock, seconds since the epoch
    kind: EventKind
    device: str
    # the connection as the guest sees it: (type, guest port, peer CID, peer port), or None
    conn: tuple[int, int, int, int] | None = None
    detail: str = ""
    rule: str = ""

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"time": self.time, "event": self.kind.value, "device": self.device}
        if self.conn is not None:
            t, gport, pcid, pport = self.conn
            d.update(type="seqpacket" if t == 2 else "stream", guest_port=gport, peer_cid=pcid, peer_port=pport)
        if self.detail:
            d["detail"] = self.detail
        if self.rule:
            d["rule"] = self.rule
        return d


class EventSink(Protocol):
    active: bool

    def publish(self, kind: EventKind, device: str, conn: tuple[int, int, int, int] | None = None,
                detail: str = "", rule: str = "") -> None: ...


class NoEvents:
    """The sink while nobody listens."""

    active = False

    def publish(self, kind: EventKind, device: str, conn: tuple[int, int, int, int] | None = None,
                detail: str = "", rule: str = "") -> None:
        pass
