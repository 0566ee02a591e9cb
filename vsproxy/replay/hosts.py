"""Server replay's other direction: the connections a capture shows the host making toward a
guest, made again by vsproxy (``--replay-server FILE``), each at its recorded time after the
device's guest is first up (its offset from the capture's first connection), its host side
played by a ``ClientSession`` (vsproxy/replay/client.py) behind a ``ReplayPeer``. A guest that
does not listen yet is asked again every ``RETRY`` seconds for ``PATIENCE`` seconds (a service
in the guest may start after its driver does).

Counted per capture and device (``replay FILE toward DEVICE``), as each connection ends:
``made`` connections the guest accepted, ``same`` and ``different`` (what the guest answered
against the capture), ``refused`` ones it never accepted. The host-side bytes are the recorded
ones; what the guest answers is compared byte for byte.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Final

from vsproxy.endpoints.services import COUNTERS
from vsproxy.replay.client import ClientSession
from vsproxy.replay.service import ReplayPeer
from vsproxy.replay.transcript import Conversation, Outcome, Transcript

if TYPE_CHECKING:
    from vsproxy.app import Proxy
    from vsproxy.device import Device
    from vsproxy.vsock.connection import Connection

log = logging.getLogger("vsproxy.replay")

HOST_CID: Final = 2
POLL: Final = 0.05  # seconds between looks at whether the guest is up
RETRY: Final = 0.2
PATIENCE: Final = 15.0


@dataclass
class HostCounters:
    made: int = 0
    same: int = 0
    different: int = 0
    refused: int = 0


def host_made(t: Transcript) -> list[Conversation]:
    """The connections ``t`` shows the host (as the guest saw it: CID 2, or a remapped alias whose
    real peer is the host) making toward a guest, whole."""
    out = []
    for c in t.conversations:
        if c.guest_is_client is not False or c.outcome is not Outcome.ESTABLISHED or c.lost or c.cut:
            continue
        real = c.real_peer or c.client
        if real[0] == HOST_CID:
            out.append(c)
    return out


@dataclass
class HostReplays:
    path: str
    convs: list[Conversation]
    counters: dict[str, HostCounters] = field(default_factory=dict)

    def attach(self, proxy: Proxy) -> None:
        """Make the connections once each one's device is up (called after ``proxy.start()``)."""
        COUNTERS.append(self.rows)
        by_device: dict[str, list[Conversation]] = {}
        for c in self.convs:
            dev = next((d for d in proxy.devices if d.name == c.device), None)
            if dev is None and len(proxy.devices) == 1:
                dev = proxy.devices[0]
            if dev is None:
                log.warning("replay %s: no device %r for the connection toward %s:%d", self.path, c.device,
                            c.server[0], c.server[1])
                continue
            by_device.setdefault(dev.name, []).append(c)
        for name, convs in by_device.items():
            dev = next(d for d in proxy.devices if d.name == name)
            self.counters[name] = HostCounters()
            self._wait_for(proxy, dev, convs)

    def rows(self) -> dict[str, dict[str, int]]:
        return {f"replay {self.path} toward {name}": asdict(c) for name, c in self.counters.items()}

    def _wait_for(self, proxy: Proxy, dev: Device, convs: list[Conversation]) -> None:
        loop = proxy.loop

        def look() -> None:
            if not dev.running:
                loop.call_later(POLL, look)
                return
            first = min(c.start for c in self.convs)
            for c in convs:
                loop.call_later(max(0.0, c.start - first), functools.partial(self._make, proxy, dev, c, PATIENCE))

        loop.call_later(POLL, look)

    def _make(self, proxy: Proxy, dev: Device, conv: Conversation, patience: float) -> None:
        loop = proxy.loop
        counters = self.counters[dev.name]
        hooks = dev.hooks()
        holder: list[Connection] = []
        session = ClientSession(conv)

        def readable() -> None:
            if holder and hooks is not None:
                hooks.readable(holder[0])

        def writable() -> None:
            if holder and hooks is not None:
                hooks.writable(holder[0])

        def closed() -> None:
            if session.started:
                counters.made += 1
                session.answers.ended = True  # the connection is over: the guest's stream with it
                mismatch = session.result()
                if mismatch is None:
                    counters.same += 1
                else:
                    counters.different += 1
                    log.info("replay %s: the guest answered %s differently: %s", self.path, conv.title(),
                             mismatch.what)
            elif patience > 0:
                loop.call_later(RETRY, lambda: self._make(proxy, dev, conv, patience - RETRY))
            else:
                counters.refused += 1
                log.info("replay %s: the guest did not accept %s", self.path, conv.title())

        peer = ReplayPeer(session, f"replay:{self.path}", loop.call_soon, readable, writable, on_close=closed)
        if hooks is None:
            peer.close(True)
            return
        conn = dev.connect_from_host(peer, conv.server[1], conv.sock_type)
        if conn is None:
            peer.close(True)
            return
        holder.append(conn)
