"""The filter's fields: their types, how each reaches its value in a PacketView, the field table.

``FIELDS`` (name -> ``FieldInfo``) is the public table for help screens; ``FIELD_SPECS`` adds
what the compiler needs: the accessor, case folding and the bare-name truth test.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from vsproxy.capture import format as fmt
from vsproxy.capture.view import PacketView
from vsproxy.filter.predicates import Predicate, ValueTest
from vsproxy.verdict import Verdict
from vsproxy.vsock import header as H


class FieldType(StrEnum):
    NUMBER = "number"
    STRING = "string"
    BYTES = "bytes"
    BOOL = "bool"
    STRINGS = "strings"  # a list of strings: a test holds when it holds for any element


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One row of the field table: what the TUI's help shows and what the type checker uses."""

    name: str
    type: FieldType
    description: str
    # value names of a number field (rw -> 5)
    names: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    choices: tuple[str, ...] = ()  # the only values a closed string field takes (verdict)
    header: bool = False  # from the virtio header: absent when the packet has none


# --- how a field's value is reached ------------------------------------------------------
#
# An accessor turns a test on one value into a packet predicate that holds when some value of
# the field passes (false when the field is absent). ``!=`` and ``not in`` are "present and no
# value passes": ``FieldSpec.none``.

_Access = Callable[[ValueTest], Predicate]


def _header(i: int) -> _Access:
    def access(test: ValueTest) -> Predicate:
        def pred(p: PacketView) -> bool:
            h = p.hdr
            return h is not None and test(h[i])

        return pred

    return access


def _header_either(s: int, d: int) -> _Access:
    """``cid`` and ``port``: the source or the destination."""

    def access(test: ValueTest) -> Predicate:
        def pred(p: PacketView) -> bool:
            h = p.hdr
            return h is not None and (test(h[s]) or test(h[d]))

        return pred

    return access


def _attr(get: Callable[[PacketView], Any]) -> _Access:
    """A value every packet has."""
    return lambda test: lambda p: test(get(p))


def _each(get: Callable[[PacketView], Sequence[Any]]) -> _Access:
    """A list of values (``app``)."""
    return lambda test: lambda p: any(map(test, get(p)))


_DIRECTIONS: Final = {True: "from_guest", False: "to_guest", None: "unknown"}


def _dir(p: PacketView) -> str:
    return _DIRECTIONS[p.from_guest]


def _proto(p: PacketView) -> str:
    return (p.proto or "none").lower()


def _comment(p: PacketView) -> str:
    return p.comment or ""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A field as the compiler sees it: its table row and how to test its values."""

    info: FieldInfo
    access: _Access
    fold: bool = False  # compare lowercased: the getter yields lowercase, literals are lowered
    truth: ValueTest = bool  # what a bare field name tests

    def none(self, test: ValueTest) -> Predicate:
        """The field is present and none of its values passes ``test``."""
        some = self.access(test)
        if self.info.header:
            return lambda p: p.hdr is not None and not some(p)
        return lambda p: not some(p)


# --- the field table ------------------------------------------------------------------------

_HDR_INDEX: Final = {name: i for i, name in enumerate(H.Header._fields)}
_CID_NAMES: Final = {
    "hypervisor": H.VMADDR_CID_HYPERVISOR,
    "local": H.VMADDR_CID_LOCAL,
    "host": H.VMADDR_CID_HOST,
    "any": H.VMADDR_CID_ANY,
}
_OP_NAMES: Final = {op.name.lower(): int(op) for op in H.Op}
_TYPE_NAMES: Final = {t.name.lower(): int(t) for t in H.Type}
# af_vsockmon_hdr op (linux/vsockmon.h)
_MON_OP_NAMES: Final = {op.name.lower(): int(op) for op in fmt.MonOp}


def _hdr_field(name: str, description: str, names: Mapping[str, int] | None = None) -> FieldSpec:
    info = FieldInfo(name, FieldType.NUMBER, description, names=MappingProxyType(dict(names or {})), header=True)
    if name in ("cid", "port"):
        return FieldSpec(info, _header_either(_HDR_INDEX[f"src_{name}"], _HDR_INDEX[f"dst_{name}"]))
    return FieldSpec(info, _header(_HDR_INDEX[name.replace(".", "_")]))  # src.cid is Header.src_cid


def _view_field(
    name: str,
    type: FieldType,
    description: str,
    get: Callable[[PacketView], Any],
    choices: tuple[str, ...] = (),
    names: Mapping[str, int] | None = None,
    truth: ValueTest = bool,
) -> FieldSpec:
    # A closed set of words (verdict, dir) and proto names compare case-insensitively.
    fold = bool(choices) or name == "proto"
    access = _each(get) if type is FieldType.STRINGS else _attr(get)
    return FieldSpec(
        FieldInfo(name, type, description, names=MappingProxyType(dict(names or {})), choices=choices),
        access,
        fold,
        truth,
    )


_N, _S = FieldType.NUMBER, FieldType.STRING
_FIELD_LIST: Final = (
    _hdr_field("src.cid", "source CID", _CID_NAMES),
    _hdr_field("dst.cid", "destination CID", _CID_NAMES),
    _hdr_field("cid", "either CID (source or destination)", _CID_NAMES),
    _hdr_field("src.port", "source port"),
    _hdr_field("dst.port", "destination port"),
    _hdr_field("port", "either port (source or destination)"),
    _hdr_field("op", "virtio-vsock operation", names=_OP_NAMES),
    _hdr_field("type", "socket type", names=_TYPE_NAMES),
    _hdr_field("flags", "header flags (SHUTDOWN: 1 rcv, 2 send; SEQPACKET: 1 EOM, 2 EOR)"),
    _hdr_field("len", "payload length in the virtio header"),
    _hdr_field("buf_alloc", "sender's receive buffer size (credit)"),
    _hdr_field("fwd_cnt", "bytes the sender has consumed (credit)"),
    _view_field("mon_op", _N, "vsockmon operation", operator.attrgetter("mon_op"), names=_MON_OP_NAMES),
    _view_field("time", _N, "capture time, seconds since the epoch (decimals allowed)", operator.attrgetter("time")),
    _view_field("device", _S, "device (capture interface) name; case-sensitive", operator.attrgetter("device")),
    _view_field("dir", _S, "direction; bare: the direction is known", _dir,
                choices=("from_guest", "to_guest", "unknown"), truth=lambda v: v != "unknown"),
    _view_field("verdict", _S, "vsproxy's verdict; bare: not allowed", operator.attrgetter("verdict"),
                choices=tuple(v.word for v in Verdict), truth=lambda v: v != "allowed"),
    _view_field("rewritten", FieldType.BOOL, "vsproxy rewrote the packet's addresses",
                operator.attrgetter("rewritten")),
    _view_field("proto", _S, "application protocol of the stream (http, tls, nitro, ...) or none; bare: known",
                _proto, truth=lambda v: v != "none"),
    _view_field("payload", FieldType.BYTES, "payload bytes; bare: non-empty", operator.attrgetter("payload")),
    _view_field("comment", _S, "capture comment, empty when none; case-sensitive", _comment),
    _view_field("app", FieldType.STRINGS, "application summaries of messages ending in this packet",
                operator.attrgetter("app")),
)  # fmt: skip
FIELD_SPECS: Final[Mapping[str, FieldSpec]] = MappingProxyType({f.info.name: f for f in _FIELD_LIST})
"""The compiler's view of the field table: name -> FieldSpec."""

FIELDS: Final[Mapping[str, FieldInfo]] = MappingProxyType({name: f.info for name, f in FIELD_SPECS.items()})
"""The field table, in documentation order: name -> FieldInfo."""
