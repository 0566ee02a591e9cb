"""Routing policy: CID remap, built-in services and per-device allowlists, as pure functions.

Given which device a connection comes from and the address its guest dialled, ``outbound``
says where it really goes (the host, a sibling device or a built-in service), whether it is
allowed, and which rule decided. ``inbound`` answers the same for a connection that arrives
at a device (from the host or a sibling), including the source CID its guest sees: the
rewrite of a remap is kept for the whole connection, so a guest never sees it.

Resolution, in order (README "Routing"):
1. a built-in service at the exact CID:port dialled (per-device before global);
2. a remap of the dialled CID (per-device before global, a rule with a port before one
   without); aliases beat real CIDs, so a device that remaps 3 reaches its target even
   when another device really has CID 3;
3. the real target: CID 2 is the host, a device's CID is that sibling, anything else has
   no route;
4. the allowlists: the source device's outbound list, then the target's inbound list.
   Without explicit lists: the host, built-in services and the device's own remap targets
   are allowed; a device accepts connections from devices whose remap target it is; devices
   sharing a group may connect both ways; other siblings are denied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HOST_CID = 2


@dataclass(frozen=True, slots=True)
class Remap:
    cid: int
    to_cid: int
    port: int | None = None  # only connections to this port (then to_port applies)
    to_port: int | None = None
    device: str | None = None  # None: every device
    text: str = ""

    def label(self) -> str:
        return self.text or (
            f"remap {self.cid}{'' if self.port is None else f':{self.port}'}="
            f"{self.to_cid}{'' if self.to_port is None else f':{self.to_port}'}"
        )


@dataclass(frozen=True, slots=True)
class Service:
    cid: int
    port: int
    kind: str  # KIND[:ARG]: "nitro-heartbeat", "echo", "discard", "replay:FILE"
    device: str | None = None

    def label(self) -> str:
        return f"service {self.kind} at {self.cid}:{self.port}"


@dataclass(frozen=True, slots=True)
class Allow:
    device: str
    direction: str  # "out": the guest may connect to cid[:port]; "in": cid may connect to the guest
    cid: int
    port: int | None = None

    def label(self) -> str:
        return f"allow-{self.direction} {self.device} {self.cid}{'' if self.port is None else f':{self.port}'}"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    name: str
    cid: int
    groups: frozenset[str] = frozenset()
    # forward-cid: like vhost-device-vsock, any CID that is no device goes to the host side
    forward_any: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    allowed: bool
    kind: str  # "host", "device", "service" or "none"
    cid: int  # the real peer
    port: int
    rule: str  # the rule that decided
    remap: str | None = None  # the remap applied, if any
    service: str | None = None
    device: str | None = None  # the target device's name for kind "device"


@dataclass
class Policy:
    devices: list[DeviceSpec]
    remaps: list[Remap] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    allows: list[Allow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name = {d.name: d for d in self.devices}
        self._by_cid = {d.cid: d for d in self.devices}

    def device(self, name: str) -> DeviceSpec:
        return self._by_name[name]

    # -- lookups -------------------------------------------------------------------
    def _service(self, dev: str, cid: int, port: int) -> Service | None:
        best = None
        for s in self.services:
            if s.cid == cid and s.port == port and s.device in (None, dev):
                if s.device == dev:
                    return s
                best = best or s
        return best

    def _remap(self, dev: str, cid: int, port: int) -> Remap | None:
        def score(r: Remap) -> int:
            return (2 if r.device == dev else 0) + (1 if r.port is not None else 0)

        matches = [r for r in self.remaps if r.cid == cid and r.device in (None, dev) and r.port in (None, port)]
        return max(matches, key=score) if matches else None

    def remap_targets(self, dev: str) -> set[int]:
        """Real CIDs this device reaches through its remaps (per-device or global)."""
        return {r.to_cid for r in self.remaps if r.device in (None, dev)}

    def _explicit(self, dev: str, direction: str) -> list[Allow]:
        return [a for a in self.allows if a.device == dev and a.direction == direction]

    # -- decisions -----------------------------------------------------------------
    def outbound(self, dev: str, cid: int, port: int, services: bool = True) -> Route:
        """The guest of ``dev`` dialled cid:port. ``services=False``: where it would go if no
        built-in service were there (a replay service forwarding what it cannot answer)."""
        src = self._by_name[dev]
        svc = self._service(dev, cid, port) if services else None
        if svc is not None:
            return Route(True, "service", cid, port, svc.label(), service=svc.kind)
        remap = self._remap(dev, cid, port)
        real_cid, real_port = cid, port
        if remap is not None:
            real_cid = remap.to_cid
            real_port = remap.to_port if remap.port is not None and remap.to_port is not None else port
            svc = self._service(dev, real_cid, real_port) if services else None
            if svc is not None:
                return Route(True, "service", real_cid, real_port, svc.label(), remap=remap.label(),
                             service=svc.kind)
        rlabel = remap.label() if remap is not None else None
        if real_cid == HOST_CID:
            kind, target = "host", None
        elif real_cid in self._by_cid and real_cid != src.cid and self._sibling_chosen(src, real_cid, remap):
            kind, target = "device", self._by_cid[real_cid]
        elif src.forward_any and real_cid != src.cid:
            kind, target = "host", None
        else:
            why = "loop to itself" if real_cid == src.cid else "no route"
            return Route(False, "none", real_cid, real_port, why, remap=rlabel)
        ok, rule = self._out_allowed(src, real_cid, real_port, target)
        if not ok:
            return Route(False, kind, real_cid, real_port, rule, remap=rlabel)
        if target is not None:
            ok, in_rule = self._in_allowed(target, src.cid, real_port)
            if not ok:
                return Route(False, kind, real_cid, real_port, in_rule, remap=rlabel, device=target.name)
        return Route(True, kind, real_cid, real_port, rule, remap=rlabel,
                     device=target.name if target is not None else None)

    def _sibling_chosen(self, src: DeviceSpec, cid: int, remap: Remap | None) -> bool:
        """Whether a device's connection to ``cid`` (another device's) goes to that sibling. A
        forward-cid device sends every CID to its host side, as vhost-device-vsock does (its
        sibling routing is for unix-backend devices only), unless vsproxy's own rules ask for
        the sibling: a remap to it, a shared group, or an allow-out entry naming it."""
        if not src.forward_any:
            return True
        target = self._by_cid[cid]
        return ((remap is not None and remap.to_cid == cid) or bool(src.groups & target.groups)
                or any(a.cid == cid for a in self._explicit(src.name, "out")))

    def _out_allowed(self, src: DeviceSpec, cid: int, port: int, target: DeviceSpec | None) -> tuple[bool, str]:
        explicit = self._explicit(src.name, "out")
        if explicit:
            for a in explicit:
                if a.cid == cid and a.port in (None, port):
                    return True, a.label()
            return False, f"not in {src.name}'s outbound allowlist"
        if target is None:
            return True, "default: host" if cid == HOST_CID else "default: forward-cid"
        if cid in self.remap_targets(src.name):
            return True, f"default: {target.name} is {src.name}'s remap target"
        shared = src.groups & target.groups
        if shared:
            return True, f"group {sorted(shared)[0]}"
        return False, f"default: sibling {target.name} not allowed for {src.name}"

    def _in_allowed(self, dst: DeviceSpec, src_cid: int, port: int) -> tuple[bool, str]:
        explicit = self._explicit(dst.name, "in")
        if explicit:
            for a in explicit:
                if a.cid == src_cid and a.port in (None, port):
                    return True, a.label()
            return False, f"not in {dst.name}'s inbound allowlist"
        if src_cid == HOST_CID:
            return True, "default: host"
        src = self._by_cid.get(src_cid)
        if src is None:
            return False, "unknown source"
        if dst.cid in self.remap_targets(src.name):
            return True, f"default: {dst.name} is {src.name}'s remap target"
        shared = src.groups & dst.groups
        if shared:
            return True, f"group {sorted(shared)[0]}"
        return False, f"default: sibling {src.name} not allowed into {dst.name}"

    def inbound(self, dev: str, src_cid: int, port: int) -> Route:
        """Something real at ``src_cid`` (the host, a sibling) connects to ``dev``'s guest port."""
        ok, rule = self._in_allowed(self._by_name[dev], src_cid, port)
        return Route(ok, "device", self._by_name[dev].cid, port, rule)

    def guest_view(self, dev: str, real_cid: int) -> tuple[int, str | None]:
        """The CID ``dev``'s guest sees for a peer really at ``real_cid``: the reverse of a
        CID-only remap that is in force for this device (so dialling the CID it sees leads
        back to the same peer), per-device first."""
        candidates = [r for r in self.remaps if r.to_cid == real_cid and r.port is None and r.device in (None, dev)]
        for r in sorted(candidates, key=lambda r: r.device != dev):
            effective = self._remap(dev, r.cid, -1)  # -1: a port no port-specific rule names
            if effective is r:
                return r.cid, r.label()
        return real_cid, None
