"""Device and routing configuration from the command line (``--vm``, single-device flags) and
files (``--config``: TOML, or vhost-device-vsock's YAML).

Every vhost-device-vsock option is accepted with its meaning and default (``guest-cid`` 3,
``queue-size`` 1024 as the largest ring the front-end may set, ``groups``, ``forward-cid``,
``forward-listen``, ``tx-buffer-size``), each key in its ``_`` and ``-`` spelling; vsproxy adds
``name``, ``forward``, ``listen``, ``remap``, ``service``, ``allow-out``, ``allow-in`` and the
limits. A TOML file has ``[[vm]]`` tables with the same keys (lists may be arrays) and top-level
``remap`` and ``service`` lists that apply to every device. Everything is checked before anything
starts, and every problem is collected (``Settings.problems``), not just the first: errors name
the flag or the file and key, and a misspelled key names the nearest valid one.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from vsproxy.device import DEFAULT_QUEUE_SIZE, DeviceConfig
from vsproxy.endpoints.host import HostEndpoints, TcpForward
from vsproxy.endpoints.services import check_spec, service_kinds, split_spec
from vsproxy.endpoints.vsock import VsockFactory
from vsproxy.policy import Allow, DeviceSpec, Policy, Remap, Service
from vsproxy.virtq import MAX_QUEUE_SIZE
from vsproxy.vsock.core import DEFAULT_BUF_ALLOC
from vsproxy.vsock.header import RESERVED_CIDS

T = TypeVar("T")

VM_KEYS = (
    "guest-cid", "socket", "uds-path", "groups", "tx-buffer-size", "forward-cid", "forward-listen", "queue-size",
    "name", "forward", "listen", "remap", "service", "allow-out", "allow-in",
    "max-connections", "max-pending", "max-handshakes", "max-buffered", "max-control",
)
LIMIT_KEYS = ("max-connections", "max-pending", "max-handshakes", "max-buffered", "max-control")
# keys that take one value (the others take a list: ``a+b`` or, in a file, an array)
SCALAR_KEYS = ("guest-cid", "socket", "uds-path", "tx-buffer-size", "forward-cid", "queue-size", "name", *LIMIT_KEYS)
LIMIT_MAX = 1 << 20
# vhost-device-vsock's defaults (its main.rs: DEFAULT_GUEST_CID, DEFAULT_TX_BUFFER_SIZE).
DEFAULT_GUEST_CID = 3
VHOST_DEVICE_VSOCK_TX_BUFFER_SIZE = 64 * 1024  # vsproxy's own default is DEFAULT_BUF_ALLOC (README says why)
TX_BUFFER_MIN = 4096
TX_BUFFER_MAX = 64 * 1024 * 1024
TOML_TOP_KEYS = ("vm", "remap", "service")


class ConfigError(Exception):
    """A setting that cannot work; the message names where it came from. ``problems`` holds
    every problem found when several were collected (one line each)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) or [message]


@dataclass
class Settings:
    devices: list[DeviceConfig] = field(default_factory=list)
    remaps: list[Remap] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    allows: list[Allow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what shorthands such as --nitro set
    vsock_factory: VsockFactory | None = None  # --vsock-via-unix (tests); None: real AF_VSOCK
    problems: list[str] = field(default_factory=list)  # everything wrong, in the order found

    def policy(self) -> Policy:
        specs = [
            DeviceSpec(d.name, d.guest_cid, d.groups, forward_any=d.endpoints.forward_cid is not None)
            for d in self.devices
        ]
        return Policy(specs, list(self.remaps), list(self.services), list(self.allows))

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems[0], self.problems)


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


BYTES_MIN, BYTES_MAX = 1 << 16, 1 << 40
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes_limit(text: str, where: str) -> int:
    """A per-device byte limit: a number with an optional K, M or G (binary units), 64K..1024G."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    digits = t[: len(t) - len(unit)]
    if not digits.isdigit() or not BYTES_MIN <= int(digits) * _UNITS[unit] <= BYTES_MAX:
        raise ConfigError(f"{where}: {text!r} is not a size in 64K..1024G (a number of bytes, or with K, M or G)")
    return int(digits) * _UNITS[unit]


def parse_limit_value(key: str, text: str, where: str) -> int:
    """The value of the limit ``key`` (one of LIMIT_KEYS)."""
    return parse_bytes_limit(text, where) if key == "max-buffered" else parse_limit(text, where)


def _items(value: object, where: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, (str, int)):
        return [v for v in str(value).split("+") if v]
    raise ConfigError(f"{where}: expected a string or a list, got {type(value).__name__}")


def canonical(key: str) -> str:
    """vhost-device-vsock accepts ``guest_cid`` and ``guest-cid`` alike (its --vm parser matches
    both; serde names its YAML fields with ``_``); vsproxy keeps one spelling inside, with ``-``."""
    return key.strip().replace("_", "-")


def nearest(word: str, choices: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown(what: str, word: str, choices: Sequence[str]) -> str:
    """``unknown key 'guest_cdi' (did you mean 'guest_cid'?)``: the suggestion in the spelling the
    user chose (``_`` or ``-``), or the whole list when nothing is close."""
    near = nearest(canonical(word), choices)
    if near is None:
        return f"unknown {what} {word!r} (known: {', '.join(choices)})"
    if "_" in word:
        near = near.replace("-", "_")
    return f"unknown {what} {word!r} (did you mean {near!r}?)"


def parse_queue_size(text: str, where: str) -> int:
    """The largest ring the front-end may set (vhost-device-vsock's queue-size)."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_QUEUE_SIZE:
        raise ConfigError(f"{where}: queue size {text!r} is not a number in 1..{MAX_QUEUE_SIZE}")
    return int(text)


def parse_tx_buffer_size(text: str, where: str) -> int:
    if not text.isdigit() or not TX_BUFFER_MIN <= int(text) <= TX_BUFFER_MAX:
        raise ConfigError(f"{where}: tx-buffer-size {text!r} is not a number in {TX_BUFFER_MIN}..{TX_BUFFER_MAX}")
    return int(text)


def _forward_cid(text: str, where: str) -> int:
    fcid = _u32(text, "forward CID", where)
    if fcid in (0, 0xFFFFFFFF):
        raise ConfigError(f"{where}: forward CID {fcid} cannot be dialled")
    return fcid


def add_vm(settings: Settings, values: Mapping[str, object] | Iterable[tuple[str, object]], where: str,
           *, flags: bool = False) -> DeviceConfig | None:
    """One device from ``--vm``, a file's table, or (``flags``) the single-device flags. Every
    problem found goes to ``settings.problems`` (not just the first); the device is added when
    its CID and socket are usable, so the later checks see it."""
    problems = settings.problems
    pairs = values.items() if isinstance(values, Mapping) else values
    vals: dict[str, object] = {}
    given: dict[str, str] = {}  # canonical key -> the spelling used, for "given twice"

    def at(key: str) -> str:
        return f"--{key}" if flags else f"{where} {key}"

    def name_of(key: str) -> str:
        return f"--{key}" if flags else key

    prefix = "" if flags else f"{where}: "

    seen: set[str] = set()  # every known key given, even with a bad value: no "missing" on top of its problem
    for raw, value in pairs:
        key = canonical(str(raw))
        seen.add(key)
        if key not in VM_KEYS:
            problems.append(f"{where}: {unknown('key', str(raw), VM_KEYS)}")
        elif key in given:
            problems.append(f"{where}: key {key!r} given twice (as {given[key]!r} and {str(raw)!r})")
        elif value is None:
            problems.append(f"{at(key)}: no value")
        elif key in SCALAR_KEYS and (isinstance(value, bool) or not isinstance(value, (str, int))):
            # a file can give a list or a table where one value belongs; say so rather than str() it
            problems.append(f"{at(key)}: expected one value, got {type(value).__name__} {value!r}")
        else:
            vals[key] = value
            given[key] = str(raw)

    def attempt(fn: Callable[..., T], *args: object) -> T | None:
        try:
            return fn(*args)
        except ConfigError as e:
            problems.append(str(e))
            return None

    # vhost-device-vsock: guest_cid.unwrap_or(DEFAULT_GUEST_CID)
    cid = attempt(guest_cid, str(vals.get("guest-cid", DEFAULT_GUEST_CID)), at("guest-cid"))
    socket_path = str(vals["socket"]) if "socket" in vals else None
    if "socket" not in seen:
        problems.append(f"{where}: missing 'socket' (the vhost-user socket QEMU connects to)")
    name = str(vals.get("name", f"cid{cid}"))
    endpoints = HostEndpoints(uds_path=str(vals["uds-path"]) if "uds-path" in vals else None)
    for f in attempt(_items, vals.get("forward", []), at("forward")) or []:
        got = attempt(parse_forward, f, at("forward"))
        if got is not None:
            endpoints.forwards[got[0]] = got[1]
    for item in attempt(_items, vals.get("listen", []), at("listen")) or []:
        listen = attempt(parse_listen, item, at("listen"))
        if listen is not None:
            endpoints.listens.append(listen)
    if "forward-cid" in vals:
        endpoints.forward_cid = attempt(_forward_cid, str(vals["forward-cid"]), at("forward-cid"))
    for item in attempt(_items, vals.get("forward-listen", []), at("forward-listen")) or []:
        port = attempt(_u32, item, "port", at("forward-listen"))
        if port is not None:
            endpoints.forward_listen.append(port)
    # Conflicts vhost-device-vsock also refuses (clap's conflicts_with, and its --vm and YAML
    # parsers' match on (uds_path, forward_cid)): a device has one host backend.
    if "uds-path" in vals and "forward-cid" in vals:
        problems.append(f"{prefix}{name_of('uds-path')} and {name_of('forward-cid')} both given: they are two host "
                        "backends (hybrid unix sockets, AF_VSOCK) and a device has one, as in vhost-device-vsock")
    if "forward-listen" in vals and "forward-cid" not in vals:
        why = (" (with uds-path, host programs connect in through the hybrid socket's CONNECT line)"
               if "uds-path" in vals else "")
        problems.append(f"{prefix}{name_of('forward-listen')} needs {name_of('forward-cid')}: it listens on host "
                        f"AF_VSOCK ports and belongs to the AF_VSOCK backend{why}")
    endpoints.vsock_factory = settings.vsock_factory
    queue_size = attempt(parse_queue_size, str(vals.get("queue-size", DEFAULT_QUEUE_SIZE)), at("queue-size"))
    buf = attempt(parse_tx_buffer_size, str(vals.get("tx-buffer-size", DEFAULT_BUF_ALLOC)), at("tx-buffer-size"))
    groups = frozenset(attempt(_items, vals.get("groups", []), at("groups")) or [])
    limits = {key: attempt(parse_limit_value, key, str(vals[key]), at(key)) for key in LIMIT_KEYS if key in vals}
    dev = None
    if cid is not None and socket_path is not None:
        dev = DeviceConfig(cid, socket_path, name=name, endpoints=endpoints, buf_alloc=buf or DEFAULT_BUF_ALLOC,
                           groups=groups, queue_size=queue_size or DEFAULT_QUEUE_SIZE,
                           max_connections=limits.get("max-connections"), max_pending=limits.get("max-pending"),
                           max_handshakes=limits.get("max-handshakes"), max_buffered=limits.get("max-buffered"),
                           max_control=limits.get("max-control"))
        settings.devices.append(dev)
    for r in attempt(_items, vals.get("remap", []), at("remap")) or []:
        remap = attempt(parse_remap, r, at("remap"), name)
        if remap is not None:
            settings.remaps.append(remap)
    for s in attempt(_items, vals.get("service", []), at("service")) or []:
        service = attempt(parse_service, s, at("service"), name)
        if service is not None:
            settings.services.append(service)
    for direction in ("out", "in"):
        key = f"allow-{direction}"
        for a in attempt(_items, vals.get(key, []), at(key)) or []:
            addr = attempt(_cid_port, a, at(key))
            if addr is not None:
                settings.allows.append(Allow(name, direction, addr[0], addr[1]))
    return dev


def parse_vm_flag(text: str) -> list[tuple[str, str]]:
    """``guest-cid=4,socket=/tmp/v4.sock,groups=a+b`` as (key, value) pairs in order, keys as
    spelled (``add_vm`` reads both spellings and finds a key given twice)."""
    out: list[tuple[str, str]] = []
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--vm {text!r}: {part!r} is not KEY=VALUE")
        out.append((key.strip(), value))
    return out


def _toml(data: dict[str, object], path: str, settings: Settings) -> None:
    problems = settings.problems
    for key in data:
        if key not in TOML_TOP_KEYS:
            problems.append(f"{path}: {unknown('top-level key', key, TOML_TOP_KEYS)}")
    vms = data.get("vm", [])
    if not isinstance(vms, list):
        problems.append(f"{path}: 'vm' must be an array of tables ([[vm]])")
        vms = []
    for i, vm in enumerate(vms):
        if not isinstance(vm, dict):
            problems.append(f"{path}: vm[{i}] must be a table")
            continue
        add_vm(settings, vm, f"{path} vm[{i}]")
    try:
        for item in _items(data.get("remap", []), f"{path} remap"):
            try:
                settings.remaps.append(parse_remap(item, f"{path} remap"))
            except ConfigError as e:
                problems.append(str(e))
        for item in _items(data.get("service", []), f"{path} service"):
            try:
                settings.services.append(parse_service(item, f"{path} service"))
            except ConfigError as e:
                problems.append(str(e))
    except ConfigError as e:  # remap or service is neither a string nor a list
        problems.append(str(e))


def _yaml(data: object, path: str, settings: Settings) -> None:
    """vhost-device-vsock's configuration file: a ``vms:`` list; its keys with ``_`` or ``-``
    (its own README example mixes ``uds_path`` and ``forward-cid``), plus vsproxy's keys."""
    problems = settings.problems
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a 'vms:' list (vhost-device-vsock's format)")
        return
    for key in data:
        if key != "vms":
            problems.append(f"{path}: {unknown('top-level key', str(key), ('vms',))}")
    vms = data.get("vms")
    if not isinstance(vms, list) or not vms:
        problems.append(f"{path}: 'vms' must be a non-empty list of devices (vhost-device-vsock's format)")
        return
    for i, vm in enumerate(vms):
        if not isinstance(vm, dict):
            problems.append(f"{path}: vms[{i}] must be a mapping")
            continue
        add_vm(settings, [(str(k), v) for k, v in vm.items()], f"{path} vms[{i}]")


def load_file(path: str, settings: Settings) -> None:
    """``.toml`` is TOML and ``.yaml``/``.yml`` is YAML; any other name (vhost-device-vsock takes
    any path as YAML) is read as TOML if it parses as TOML, else as YAML."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        settings.problems.append(f"{path}: {e.strerror}")
        return
    is_yaml = path.endswith((".yaml", ".yml"))
    if not is_yaml:
        try:
            data = tomllib.loads(raw.decode("utf-8", "replace"))
        except tomllib.TOMLDecodeError as e:
            if path.endswith(".toml"):
                settings.problems.append(f"{path}: {e}")
                return
            is_yaml = True
        else:
            _toml(data, path, settings)
            return
    try:
        ydata = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        settings.problems.append(f"{path}: {str(e).splitlines()[0]}")
        return
    _yaml(ydata, path, settings)


def check(settings: Settings) -> None:
    """Duplicates and clashes between devices, before anything starts; each goes to
    ``settings.problems``."""
    problems = settings.problems
    if not settings.devices and not problems:
        problems.append("no device: give --socket (with --uds-path or --forward-cid), --vm, or --config")
    seen_cid: dict[int, str] = {}
    seen_sock: dict[str, str] = {}
    seen_uds: dict[str, str] = {}
    seen_listen: dict[int, str] = {}
    seen_name: set[str] = set()
    for d in settings.devices:
        if d.guest_cid in seen_cid:
            problems.append(f"guest CID {d.guest_cid} given to both {seen_cid[d.guest_cid]} and {d.name}")
        if d.socket_path in seen_sock:
            problems.append(f"socket {d.socket_path} given to both {seen_sock[d.socket_path]} and {d.name}")
        if d.name in seen_name and d.guest_cid not in seen_cid:  # cidN twice is the CID's problem, said above
            problems.append(f"device name {d.name!r} given twice")
        seen_cid.setdefault(d.guest_cid, d.name)
        seen_sock.setdefault(d.socket_path, d.name)
        seen_name.add(d.name)
        uds = d.endpoints.uds_path
        if uds is not None:
            if uds in seen_uds:
                problems.append(f"uds-path {uds} given to both {seen_uds[uds]} and {d.name}")
            seen_uds.setdefault(uds, d.name)
        for port in d.endpoints.forward_listen:  # AF_VSOCK ports are the host's, one listener each
            if port in seen_listen and seen_listen[port] != d.name:
                problems.append(f"forward-listen port {port} given to both {seen_listen[port]} and {d.name}")
            seen_listen.setdefault(port, d.name)
    for d in settings.devices:
        if d.endpoints.uds_path is not None and d.endpoints.uds_path in seen_sock:
            problems.append(f"uds-path {d.endpoints.uds_path} of {d.name} is also a vhost-user socket")
    # Devices that say nothing about whom they reach (no groups, no remap, allowlist or service
    # of their own) are where vhost-device-vsock's default group and vsproxy's fence differ.
    ruled = ({r.device for r in settings.remaps} | {a.device for a in settings.allows}
             | {s.device for s in settings.services})
    ungrouped = [d.name for d in settings.devices if not d.groups and d.name not in ruled]
    if len(ungrouped) > 1:
        settings.notes.append(
            f"{', '.join(ungrouped)} give no groups: vhost-device-vsock would put them in group 'default' and let "
            "their guests connect to each other; vsproxy keeps siblings apart unless they share a group "
            "(add groups=default to each to match)")


def path_problems(settings: Settings) -> list[str]:
    """What starting would trip over in the file system (``--check``; nothing is created)."""
    out: list[str] = []
    for d in settings.devices:
        paths = [("socket", d.socket_path)]
        if d.endpoints.uds_path is not None:
            paths.append(("uds-path", d.endpoints.uds_path))
        for what, path in paths:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                out.append(f"{d.name}: {what} {path}: directory {folder} does not exist")
            elif len(os.fsencode(path)) >= 108:
                out.append(f"{d.name}: {what} {path}: longer than a unix socket path may be (107 bytes)")
    return out


def nitro(settings: Settings) -> None:
    """What a Nitro Enclave guest needs: the heartbeat on 3:9000, and CID 3 (the parent) is
    the host for every other port."""
    settings.services.append(Service(3, 9000, "nitro-heartbeat"))
    settings.remaps.append(Remap(3, 2, text="remap 3=2 (--nitro)"))
    settings.notes.append("--nitro: service nitro-heartbeat at 3:9000; remap 3=2 (CID 3, the parent, is the host)")
