"""Device and routing configuration from the command line (``--vm``) and TOML files.

``--vm`` keys match vhost-device-vsock's where they overlap (``guest-cid``, ``socket``,
``uds-path``, ``groups``, ``tx-buffer-size``), list values joined with ``+``; vsproxy adds
``name``, ``forward``, ``listen``, ``remap``, ``service``, ``allow-out`` and ``allow-in``.
A TOML file (``--config``) has ``[[vm]]`` tables with the same keys (lists may be arrays)
and top-level ``remap`` and ``service`` lists that apply to every device. Everything is
checked before anything starts; errors name the flag or the file and key.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field

from vsproxy.device import DeviceConfig
from vsproxy.endpoints.host import HostEndpoints, TcpForward
from vsproxy.endpoints.services import check_spec, service_kinds, split_spec
from vsproxy.endpoints.vsock import VsockFactory
from vsproxy.policy import Allow, DeviceSpec, Policy, Remap, Service
from vsproxy.vsock.core import DEFAULT_BUF_ALLOC
from vsproxy.vsock.header import RESERVED_CIDS

VM_KEYS = (
    "guest-cid", "socket", "uds-path", "groups", "tx-buffer-size", "forward-cid", "forward-listen", "queue-size",
    "name", "forward", "listen", "remap", "service", "allow-out", "allow-in",
    "max-connections", "max-pending", "max-handshakes",
)
LIMIT_KEYS = ("max-connections", "max-pending", "max-handshakes")
LIMIT_MAX = 1 << 20


class ConfigError(Exception):
    """A setting that cannot work; the message names where it came from."""


@dataclass
class Settings:
    devices: list[DeviceConfig] = field(default_factory=list)
    remaps: list[Remap] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    allows: list[Allow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what shorthands such as --nitro set
    vsock_factory: VsockFactory | None = None  # --vsock-via-unix (tests); None: real AF_VSOCK

    def policy(self) -> Policy:
        specs = [
            DeviceSpec(d.name, d.guest_cid, d.groups, forward_any=d.endpoints.forward_cid is not None)
            for d in self.devices
        ]
        return Policy(specs, list(self.remaps), list(self.services), list(self.allows))


def _u32(text: str, what: str, where: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise ConfigError(f"{where}: {what} {text!r} is not a number in 0..4294967295")
    return int(text)


def guest_cid(text: str, where: str) -> int:
    try:
        cid = int(text, 0)
    except ValueError:
        raise ConfigError(f"{where}: guest CID {text!r} is not a number") from None
    if cid in RESERVED_CIDS or not 3 <= cid < 0xFFFFFFFF:
        raise ConfigError(f"{where}: guest CID {cid} is reserved or out of range (3..4294967294)")
    return cid


def _cid_port(text: str, where: str) -> tuple[int, int | None]:
    cid, _, port = text.partition(":")
    return _u32(cid, "CID", where), (_u32(port, "port", where) if port else None)


def parse_remap(text: str, where: str, device: str | None = None) -> Remap:
    """``3=42`` (a CID) or ``3:9000=2:19000`` (one port of it, to another port)."""
    src, sep, dst = text.partition("=")
    if not sep:
        raise ConfigError(f"{where}: remap {text!r} is not CID[:PORT]=CID[:PORT]")
    cid, port = _cid_port(src, where)
    to_cid, to_port = _cid_port(dst, where)
    if (port is None) != (to_port is None):
        raise ConfigError(f"{where}: remap {text!r} must give a port on both sides or on neither")
    if to_cid in (0, 1, 0xFFFFFFFF):
        raise ConfigError(f"{where}: remap {text!r} targets reserved CID {to_cid}")
    return Remap(cid, to_cid, port, to_port, device, text=f"remap {text}" + (f" ({device})" if device else ""))


def parse_service(text: str, where: str, device: str | None = None) -> Service:
    """``CID:PORT=KIND[:ARG]``, KIND one of nitro-heartbeat, echo, discard, replay (``replay:FILE``)."""
    addr, sep, kind = text.partition("=")
    cid, port = _cid_port(addr, where)
    if not sep or port is None:
        raise ConfigError(f"{where}: service {text!r} is not CID:PORT=KIND[:ARG]")
    if split_spec(kind)[0] not in service_kinds():
        import vsproxy.replay.service  # noqa: F401  (registers the replay kind, imported when first named)
    if split_spec(kind)[0] not in service_kinds():
        raise ConfigError(f"{where}: service kind {kind!r} unknown (known: {', '.join(service_kinds())})")
    try:
        check_spec(kind, cid, port)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Service(cid, port, kind, device)


_HOSTPORT = re.compile(r"^tcp:(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+):(?P<port>\d+)$")


def tcp_addr(text: str, where: str) -> tuple[str, int]:
    m = _HOSTPORT.match(text)
    if not m or int(m.group("port")) > 65535:
        raise ConfigError(f"{where}: {text!r} is not tcp:HOST:PORT")
    return m.group("host").strip("[]"), int(m.group("port"))


def parse_forward(text: str, where: str) -> tuple[int, TcpForward]:
    port, sep, target = text.partition("=")
    if not sep:
        raise ConfigError(f"{where}: forward {text!r} is not VSOCKPORT=tcp:HOST:PORT")
    host, hport = tcp_addr(target, where)
    return _u32(port, "vsock port", where), TcpForward(host, hport)


def parse_listen(text: str, where: str) -> tuple[str, int, int]:
    addr, sep, gport = text.rpartition("=")
    if not sep:
        raise ConfigError(f"{where}: listen {text!r} is not tcp:HOST:PORT=GUESTPORT")
    host, port = tcp_addr(addr, where)
    return host, port, _u32(gport, "guest port", where)


def parse_limit(text: str, where: str) -> int:
    """A per-device limit: a count from 1 to 2^20."""
    if not text.isdigit() or not 1 <= int(text) <= LIMIT_MAX:
        raise ConfigError(f"{where}: {text!r} is not a number in 1..{LIMIT_MAX}")
    return int(text)


def _items(value: object, where: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, (str, int)):
        return [v for v in str(value).split("+") if v]
    raise ConfigError(f"{where}: expected a string or a list, got {type(value).__name__}")


def add_vm(settings: Settings, values: dict[str, object], where: str) -> None:
    for key in values:
        if key not in VM_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(VM_KEYS)})")
    for key in ("guest-cid", "socket"):
        if key not in values:
            raise ConfigError(f"{where}: missing {key!r}")
    cid = guest_cid(str(values["guest-cid"]), f"{where} guest-cid")
    name = str(values.get("name", f"cid{cid}"))
    endpoints = HostEndpoints(uds_path=str(values["uds-path"]) if "uds-path" in values else None)
    for f in _items(values.get("forward", []), f"{where} forward"):
        port, fwd = parse_forward(f, f"{where} forward")
        endpoints.forwards[port] = fwd
    for item in _items(values.get("listen", []), f"{where} listen"):
        endpoints.listens.append(parse_listen(item, f"{where} listen"))
    if "forward-cid" in values:
        fcid = _u32(str(values["forward-cid"]), "forward-cid", f"{where} forward-cid")
        if fcid in (0, 0xFFFFFFFF):
            raise ConfigError(f"{where} forward-cid: {fcid} cannot be dialled")
        endpoints.forward_cid = fcid
    for item in _items(values.get("forward-listen", []), f"{where} forward-listen"):
        endpoints.forward_listen.append(_u32(item, "port", f"{where} forward-listen"))
    endpoints.vsock_factory = settings.vsock_factory
    if "queue-size" in values:
        settings.notes.append(f"{where}: queue-size ignored (the front-end, QEMU, sets the ring size)")
    buf = values.get("tx-buffer-size", DEFAULT_BUF_ALLOC)
    if not str(buf).isdigit() or not 4096 <= int(str(buf)) <= 64 << 20:
        raise ConfigError(f"{where} tx-buffer-size: {buf!r} is not between 4096 and 67108864")
    groups = frozenset(_items(values.get("groups", []), f"{where} groups"))
    limits = {key: parse_limit(str(values[key]), f"{where} {key}") for key in LIMIT_KEYS if key in values}
    settings.devices.append(
        DeviceConfig(cid, str(values["socket"]), name=name, endpoints=endpoints, buf_alloc=int(str(buf)),
                     groups=groups, max_connections=limits.get("max-connections"),
                     max_pending=limits.get("max-pending"), max_handshakes=limits.get("max-handshakes"))
    )
    for r in _items(values.get("remap", []), f"{where} remap"):
        settings.remaps.append(parse_remap(r, f"{where} remap", name))
    for s in _items(values.get("service", []), f"{where} service"):
        settings.services.append(parse_service(s, f"{where} service", name))
    for direction in ("out", "in"):
        for a in _items(values.get(f"allow-{direction}", []), f"{where} allow-{direction}"):
            acid, aport = _cid_port(a, f"{where} allow-{direction}")
            settings.allows.append(Allow(name, direction, acid, aport))


def parse_vm_flag(text: str) -> dict[str, object]:
    """``guest-cid=4,socket=/tmp/v4.sock,groups=a+b``"""
    out: dict[str, object] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--vm {text!r}: {part!r} is not KEY=VALUE")
        if key in out:
            raise ConfigError(f"--vm {text!r}: key {key!r} given twice")
        out[key.strip()] = value
    return out


def load_toml(path: str, settings: Settings) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key in data:
        if key not in ("vm", "remap", "service"):
            raise ConfigError(f"{path}: unknown top-level key {key!r} (known: vm, remap, service)")
    vms = data.get("vm", [])
    if not isinstance(vms, list):
        raise ConfigError(f"{path}: 'vm' must be an array of tables ([[vm]])")
    for i, vm in enumerate(vms):
        if not isinstance(vm, dict):
            raise ConfigError(f"{path}: vm[{i}] must be a table")
        add_vm(settings, vm, f"{path} vm[{i}]")
    for r in _items(data.get("remap", []), f"{path} remap"):
        settings.remaps.append(parse_remap(r, f"{path} remap"))
    for s in _items(data.get("service", []), f"{path} service"):
        settings.services.append(parse_service(s, f"{path} service"))


def load_yaml(path: str, settings: Settings) -> None:
    """vhost-device-vsock's configuration file: a ``vms:`` list, keys with underscores."""
    import yaml

    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - {"vms"} or not isinstance(data.get("vms"), list):
        raise ConfigError(f"{path}: expected a 'vms:' list (vhost-device-vsock's format)")
    for i, vm in enumerate(data["vms"]):
        if not isinstance(vm, dict):
            raise ConfigError(f"{path}: vms[{i}] must be a mapping")
        add_vm(settings, {str(k).replace("_", "-"): v for k, v in vm.items()}, f"{path} vms[{i}]")


def load_file(path: str, settings: Settings) -> None:
    if path.endswith((".yaml", ".yml")):
        load_yaml(path, settings)
    else:
        load_toml(path, settings)


def check(settings: Settings) -> None:
    """Duplicates and dangling references, before anything starts."""
    if not settings.devices:
        raise ConfigError("no device: give --socket and --guest-cid, --vm, or --config")
    seen_cid: dict[int, str] = {}
    seen_sock: dict[str, str] = {}
    seen_name: set[str] = set()
    for d in settings.devices:
        if d.guest_cid in seen_cid:
            raise ConfigError(f"guest CID {d.guest_cid} given to both {seen_cid[d.guest_cid]} and {d.name}")
        if d.socket_path in seen_sock:
            raise ConfigError(f"socket {d.socket_path} given to both {seen_sock[d.socket_path]} and {d.name}")
        if d.name in seen_name:
            raise ConfigError(f"device name {d.name!r} given twice")
        seen_cid[d.guest_cid] = d.name
        seen_sock[d.socket_path] = d.name
        seen_name.add(d.name)
        if d.endpoints.uds_path is not None and d.endpoints.uds_path in seen_sock:
            raise ConfigError(f"uds-path {d.endpoints.uds_path} is also a vhost-user socket")


def nitro(settings: Settings) -> None:
    """What a Nitro Enclave guest needs: the heartbeat on 3:9000, and CID 3 (the parent) is
    the host for every other port."""
    settings.services.append(Service(3, 9000, "nitro-heartbeat"))
    settings.remaps.append(Remap(3, 2, text="remap 3=2 (--nitro)"))
    settings.notes.append("--nitro: service nitro-heartbeat at 3:9000; remap 3=2 (CID 3, the parent, is the host)")
