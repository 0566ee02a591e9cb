"""``vsproxy --check``: the resolved configuration as text, from ``config.Settings`` alone.

A pure function: it reads the settings and the policy they make, and opens nothing (no
socket, no file), so a user can see what would run before starting QEMU. Rules are listed in
the order ``policy.Policy`` applies them (its docstring): built-in services at the exact
CID:port dialled, then remaps (per-device before global, a port rule before a CID rule), then
the allowlists (an explicit list, or the default with the siblings it lets through).
"""

from __future__ import annotations

from collections.abc import Sequence

from vsproxy.config import Settings
from vsproxy.device import DeviceConfig
from vsproxy.limits import MAX_BUFFERED, MAX_CONTROL
from vsproxy.policy import Policy, Remap, Service


def _services(settings: Settings, dev: str) -> list[Service]:
    own = [s for s in settings.services if s.device == dev]
    return own + [s for s in settings.services if s.device is None]


def _remaps(settings: Settings, dev: str) -> list[Remap]:
    def order(r: Remap) -> tuple[int, int]:  # Policy._remap's score, highest first
        return (0 if r.device == dev else 1, 0 if r.port is not None else 1)

    return sorted((r for r in settings.remaps if r.device in (None, dev)), key=order)


def _host_sides(d: DeviceConfig) -> list[str]:
    ep = d.endpoints
    out: list[str] = []
    if ep.uds_path is not None:
        out.append(f"hybrid unix {ep.uds_path}: host programs connect here and send 'CONNECT <port>'; "
                   f"the guest's connections to 2:P go to {ep.uds_path}_P")
    for port, fwd in sorted(ep.forwards.items()):
        out.append(f"tcp: the guest's connections to 2:{port} go to {fwd.host}:{fwd.port}")
    for host, port, gport in ep.listens:
        out.append(f"tcp listen {host}:{port} -> guest port {gport}")
    if ep.forward_cid is not None:
        out.append(f"AF_VSOCK: the guest's connections to any CID (siblings only by a shared group, a remap "
                   f"or allow-out) and port P go to {ep.forward_cid}:P")
    if ep.forward_listen:
        ports = ", ".join(str(p) for p in ep.forward_listen)
        out.append(f"AF_VSOCK listen on host ports {ports} -> the same guest port")
    return out or ["none: the guest's connections to the host get RST"]


def _limits(d: DeviceConfig) -> str:
    values = (("max-connections", d.max_connections), ("max-pending", d.max_pending),
              ("max-handshakes", d.max_handshakes))
    given = [f"{name} {value}" for name, value in values if value is not None]
    rest = [name for name, value in values if value is None]
    if rest:  # limits.default_limits, from RLIMIT_NOFILE once vsproxy has raised it
        given.append(f"{', '.join(rest)}: the device's share of the file limit, set at start")
    given.append(f"max-buffered {_size(d.max_buffered or MAX_BUFFERED)}")
    given.append(f"max-control {d.max_control or MAX_CONTROL}")
    return "; ".join(given)


def _size(n: int) -> str:
    """``256M``: the form --max-buffered takes."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _siblings(policy: Policy, settings: Settings, d: DeviceConfig, direction: str) -> str:
    """The devices the default allowlist lets through in ``direction``, and why."""
    names: list[str] = []
    for other in settings.devices:
        if other is d:
            continue
        src, dst = (d, other) if direction == "out" else (other, d)
        if dst.guest_cid in policy.remap_targets(src.name):
            names.append(f"{other.name} (remap target)" if direction == "out" else f"{other.name} (remaps to it)")
        elif src.groups & dst.groups:
            names.append(f"{other.name} (group {sorted(src.groups & dst.groups)[0]})")
    return ", ".join(names) if names else "none"


def render(settings: Settings, process: Sequence[tuple[str, str]] = ()) -> str:
    """The table; ``process``: (label, value) rows for the whole process (capture, control)."""
    policy = settings.policy()
    lines: list[str] = []
    for d in settings.devices:
        lines.append(f"device {d.name}")
        lines.append(f"  guest CID          {d.guest_cid}")
        lines.append(f"  vhost-user socket  {d.socket_path}")
        lines.append(f"  queue-size         {d.queue_size} (the largest ring the front-end may set)")
        lines.append(f"  tx-buffer-size     {d.buf_alloc}")
        lines.append(f"  groups             {'+'.join(sorted(d.groups)) if d.groups else '(none)'}")
        lines.append(f"  limits             {_limits(d)}")
        for i, side in enumerate(_host_sides(d)):
            lines.append(f"  {'host sides' if i == 0 else '':<18} {side}")
        lines.append("  rules, in order:")
        n = 0
        for s in _services(settings, d.name):
            n += 1
            lines.append(f"    {n}. {s.label()}{'' if s.device else ' (every device)'}")
        for r in _remaps(settings, d.name):
            n += 1
            lines.append(f"    {n}. {r.label()}{'' if r.device else ' (every device)'}")
        for direction in ("out", "in"):
            n += 1
            explicit = [a for a in settings.allows if a.device == d.name and a.direction == direction]
            if explicit:
                allowed = ", ".join(a.label().split(" ", 2)[2] for a in explicit)
                lines.append(f"    {n}. allow-{direction}: only {allowed}")
            elif direction == "out":
                lines.append(f"    {n}. allow-out: default (the host, built-in services; siblings: "
                             f"{_siblings(policy, settings, d, 'out')})")
            else:
                lines.append(f"    {n}. allow-in: default (the host; siblings: {_siblings(policy, settings, d, 'in')})")
    for label, value in process:
        lines.append(f"{label:<20} {value}")
    for note in settings.notes:
        lines.append(f"note: {note}")
    count = len(settings.devices)
    lines.append(f"{count} device{'' if count == 1 else 's'}; configuration OK (--check opened no socket)")
    return "\n".join(lines) + "\n"
