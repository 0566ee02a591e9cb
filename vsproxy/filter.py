"""vsproxy's packet filter language: ``op == rw and dst.port == 9000 and payload contains "GET"``.

A small display-filter language in the style of tcpdump and Wireshark, judged against a
``PacketView``. ``compile_filter`` parses the text once into a tree of closures, so judging a
packet is a few function calls and never parses anything. Every mistake in the text (unknown
field, a word that is not a name for a numeric field, an operator that does not fit the field's
type, a broken string, a missing operand, junk at the end) is a ``FilterError`` that carries the
column and the token it is about. The grammar, fields and operators are documented in
docs/filter.md; ``FIELDS`` holds the field table for help screens.

Semantics in one line each:
- a field that is absent (a virtio-header field of a packet without one) makes every comparison
  false, ``!=`` included, so ``not <comparison>`` matches it, as in Wireshark;
- ``cid`` and ``port`` mean either side, ``app`` means any summary: ``==`` and the other
  comparisons hold when one value does, and ``!=`` / ``not in`` when none does;
- a bare field is a truth test: non-zero, non-empty, or "known" for ``proto`` and ``dir``.
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from vsproxy.capture.view import PacketView
from vsproxy.vsock import header as H

__all__ = ["FIELDS", "FieldInfo", "FieldType", "Filter", "FilterError", "Predicate", "compile_filter"]

Predicate = Callable[[PacketView], bool]
_Test = Callable[[Any], bool]  # a test on one field value

# Bounds that keep a hostile filter from costing more than its text: parentheses and `not`
# nest at most this deep (the parser and the closures recurse once per level), and a regular
# expression is at most this long (Python's re has no time bound, so keep patterns small).
MAX_DEPTH: Final = 64
MAX_REGEX: Final = 1024


class FilterError(ValueError):
    """A filter that does not parse or does not type-check.

    ``column`` is the 0-based offset of ``token`` in ``text``; at the end of the text the
    column is ``len(text)`` and the token is empty.
    """

    def __init__(self, message: str, text: str, column: int, token: str) -> None:
        super().__init__(message)
        self.message = message
        self.text = text
        self.column = column
        self.token = token

    def __str__(self) -> str:
        return f"{self.message} (column {self.column})"

    def render(self) -> str:
        """Two lines: the filter, then carets under the bad token."""
        # Tabs and newlines become spaces so the caret line stays aligned with the text.
        line = self.text.translate(_FLATTEN)
        return f"{line}\n{' ' * self.column}{'^' * max(1, len(self.token))}"


_FLATTEN = str.maketrans("\t\n\r\v\f", "     ")


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
# value passes": ``_Field.none``.

_Access = Callable[[_Test], Predicate]


def _header(i: int) -> _Access:
    def access(test: _Test) -> Predicate:
        def pred(p: PacketView) -> bool:
            h = p.hdr
            return h is not None and test(h[i])

        return pred

    return access


def _header_either(s: int, d: int) -> _Access:
    """``cid`` and ``port``: the source or the destination."""

    def access(test: _Test) -> Predicate:
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
class _Field:
    info: FieldInfo
    access: _Access
    fold: bool = False  # compare lowercased: the getter yields lowercase, literals are lowered
    truth: _Test = bool  # what a bare field name tests

    def none(self, test: _Test) -> Predicate:
        """The field is present and none of its values passes ``test``."""
        some = self.access(test)
        if self.info.header:
            return lambda p: p.hdr is not None and not some(p)
        return lambda p: not some(p)


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
_MON_OP_NAMES: Final = {"unknown": 0, "connect": 1, "disconnect": 2, "control": 3, "payload": 4}


def _hdr_field(name: str, description: str, names: Mapping[str, int] | None = None) -> _Field:
    info = FieldInfo(name, FieldType.NUMBER, description, names=MappingProxyType(dict(names or {})), header=True)
    if name in ("cid", "port"):
        return _Field(info, _header_either(_HDR_INDEX[f"src_{name}"], _HDR_INDEX[f"dst_{name}"]))
    return _Field(info, _header(_HDR_INDEX[name.replace(".", "_")]))  # src.cid is Header.src_cid


def _view_field(
    name: str,
    type: FieldType,
    description: str,
    get: Callable[[PacketView], Any],
    choices: tuple[str, ...] = (),
    names: Mapping[str, int] | None = None,
    truth: _Test = bool,
) -> _Field:
    # A closed set of words (verdict, dir) and proto names compare case-insensitively.
    fold = bool(choices) or name == "proto"
    access = _each(get) if type is FieldType.STRINGS else _attr(get)
    return _Field(
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
                choices=("allowed", "denied", "spoofed"), truth=lambda v: v != "allowed"),
    _view_field("rewritten", FieldType.BOOL, "vsproxy rewrote the packet's addresses",
                operator.attrgetter("rewritten")),
    _view_field("proto", _S, "application protocol of the stream (http, tls, nitro, ...) or none; bare: known",
                _proto, truth=lambda v: v != "none"),
    _view_field("payload", FieldType.BYTES, "payload bytes; bare: non-empty", operator.attrgetter("payload")),
    _view_field("comment", _S, "capture comment, empty when none; case-sensitive", _comment),
    _view_field("app", FieldType.STRINGS, "application summaries of messages ending in this packet",
                operator.attrgetter("app")),
)  # fmt: skip
_FIELDS: Final = {f.info.name: f for f in _FIELD_LIST}

FIELDS: Final[Mapping[str, FieldInfo]] = MappingProxyType({name: f.info for name, f in _FIELDS.items()})
"""The field table, in documentation order: name -> FieldInfo."""


# --- tokens -------------------------------------------------------------------------------

_WORD, _NUMBER, _HEX, _STRING, _PUNCT, _END = "word", "number", "hex", "string", "punct", "end"


class _Str(NamedTuple):
    """A string literal as text (for string fields) and as bytes (for payload)."""

    text: str
    data: bytes


class _Tok(NamedTuple):
    kind: str
    text: str  # as written
    col: int
    value: int | float | bytes | _Str | None = None

    def describe(self) -> str:
        return "end of filter" if self.kind == _END else f"'{self.text}'"


_SCAN: Final = re.compile(
    r"""
    (?P<ws>\s+)
    | (?P<hex>[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})+)(?![\w.:-])
    | (?P<num>[0-9][\w.]*)
    | (?P<str>r?")
    | (?P<word>[A-Za-z_][\w.-]*)
    | (?P<punct>==|!=|<=|>=|&&|\|\||[<>!(){},])
    """,
    re.VERBOSE | re.ASCII,
)
_DEC: Final = re.compile(r"[0-9]+", re.ASCII)
_HEXNUM: Final = re.compile(r"0[xX][0-9A-Fa-f]+", re.ASCII)
_FLOAT: Final = re.compile(r"[0-9]+\.[0-9]+", re.ASCII)
_ESCAPES: Final = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
_HINTS: Final = {
    "=": "'=' is not an operator: use '=='",
    "&": "use '&&' or 'and'",
    "|": "use '||' or 'or'",
    "'": "strings use double quotes",
}


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _SCAN.match(text, pos)
        if m is None:
            ch = text[pos]
            hint = _HINTS.get(ch)
            raise FilterError(f"unexpected character '{ch}'" + (f" ({hint})" if hint else ""), text, pos, ch)
        kind = m.lastgroup
        if kind == "str":
            tok = _string(text, pos, raw=m.group() == 'r"')
            pos += len(tok.text)
            out.append(tok)
            continue
        pos = m.end()
        s = m.group()
        if kind == "word":
            out.append(_Tok(_WORD, s, m.start()))
        elif kind == "punct":
            out.append(_Tok(_PUNCT, s, m.start()))
        elif kind == "hex":
            out.append(_Tok(_HEX, s, m.start(), bytes.fromhex(s.replace(":", ""))))
        elif kind == "num":
            out.append(_Tok(_NUMBER, s, m.start(), _number(s, text, m.start())))
    out.append(_Tok(_END, "", len(text)))
    return out


def _number(s: str, text: str, col: int) -> int | float:
    try:
        if _DEC.fullmatch(s):
            return int(s)
        if _HEXNUM.fullmatch(s):
            return int(s, 16)
        if _FLOAT.fullmatch(s):
            return float(s)
    except ValueError:  # more digits than int() converts (sys.int_info.default_max_str_digits)
        raise FilterError(f"number too long: '{s[:20]}...'", text, col, s) from None
    raise FilterError(f"bad number '{s}' (numbers are decimal, 0x hex or decimal with a point)", text, col, s)


def _string(text: str, start: int, raw: bool) -> _Tok:
    """A double-quoted string starting at ``start`` (``r"`` for raw: backslashes kept as written)."""
    i = start + (2 if raw else 1)
    chars: list[str] = []
    data = bytearray()
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return _Tok(_STRING, text[start : i + 1], start, _Str("".join(chars), bytes(data)))
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if raw:
                piece = ch + nxt
            elif nxt in _ESCAPES:
                piece = _ESCAPES[nxt]
            elif nxt == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 2 : i + 4], re.ASCII):
                byte = int(text[i + 2 : i + 4], 16)
                chars.append(chr(byte))
                data.append(byte)
                i += 4
                continue
            else:
                bad = text[i : i + 2]
                raise FilterError(
                    f"bad escape '{bad}' in string (escapes: \\xNN \\n \\r \\t \\\\ \\\"; "
                    'write regular expressions as r"...")',
                    text,
                    i,
                    bad,
                )
            chars.append(piece)
            data += _utf8(piece, text, i)
            i += 2
            continue
        chars.append(ch)
        data += _utf8(ch, text, i)
        i += 1
    raise FilterError("unterminated string", text, start, text[start:])


def _utf8(s: str, text: str, col: int) -> bytes:
    try:
        # surrogateescape: an argv byte that was not UTF-8 comes back as that byte
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FilterError("string holds a character that is not valid text", text, col, text[col]) from None


# --- parser and compiler --------------------------------------------------------------------

_RELOPS: Final = {op: op for op in ("==", "!=", "<", "<=", ">", ">=")} | {
    "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
}  # fmt: skip
_KEYWORDS: Final = frozenset({"and", "or", "not", "contains", "matches", "in", "eq", "ne", "lt", "le", "gt", "ge"})
_SYMBOL_WORDS: Final = {"&&": "and", "||": "or", "!": "not"}
# The value test for `field OP constant`: v < c is c > v, so bind the constant first.
_ORDER: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq, "<": operator.gt, "<=": operator.ge, ">": operator.lt, ">=": operator.le,
}  # fmt: skip
_TEXT_OPS: Final = frozenset({"==", "!=", "contains", "matches", "in"})
_OPS_FOR: Final = {
    FieldType.NUMBER: frozenset({"==", "!=", "<", "<=", ">", ">=", "in"}),
    FieldType.STRING: _TEXT_OPS,
    FieldType.BYTES: _TEXT_OPS,
    FieldType.BOOL: frozenset({"==", "!=", "in"}),
    FieldType.STRINGS: _TEXT_OPS,
}


def _true(p: PacketView) -> bool:
    return True


def _all_of(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda p: a(p) and b(p)
    if len(preds) == 3:
        a, b, c = preds
        return lambda p: a(p) and b(p) and c(p)

    def pred(p: PacketView) -> bool:
        for q in preds:
            if not q(p):
                return False
        return True

    return pred


def _any_of(preds: list[Predicate]) -> Predicate:
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda p: a(p) or b(p)

    def pred(p: PacketView) -> bool:
        for q in preds:
            if q(p):
                return True
        return False

    return pred


def _negate(inner: Predicate) -> Predicate:
    return lambda p: not inner(p)


class _Parser:
    """Recursive descent over the grammar in docs/filter.md, compiling as it goes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def error(self, message: str, tok: _Tok) -> FilterError:
        return FilterError(message, self.text, tok.col, tok.text)

    def peek(self, ahead: int = 0) -> _Tok:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def advance(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != _END:
            self.i += 1
        return tok

    @staticmethod
    def keyword(tok: _Tok) -> str | None:
        """The keyword a token spells (``&&`` spells ``and``), or None."""
        if tok.kind == _PUNCT:
            return _SYMBOL_WORDS.get(tok.text)
        if tok.kind == _WORD:
            word = tok.text.lower()
            return word if word in _KEYWORDS else None
        return None

    def nest(self, tok: _Tok) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"filter nested more than {MAX_DEPTH} deep", tok)

    def parse(self) -> Predicate:
        pred = self.or_expr()
        tok = self.peek()
        if tok.kind != _END:
            if tok.text == ")":
                raise self.error("unmatched ')'", tok)
            raise self.error(f"unexpected {tok.describe()} after a complete expression (missing 'and' or 'or'?)", tok)
        return pred

    def or_expr(self) -> Predicate:
        preds = [self.and_expr()]
        while self.keyword(self.peek()) == "or":
            self.advance()
            preds.append(self.and_expr())
        return _any_of(preds)

    def and_expr(self) -> Predicate:
        preds = [self.not_expr()]
        while self.keyword(self.peek()) == "and":
            self.advance()
            preds.append(self.not_expr())
        return _all_of(preds)

    def not_expr(self) -> Predicate:
        tok = self.peek()
        if self.keyword(tok) != "not":
            return self.primary()
        self.advance()
        self.nest(tok)
        inner = self.not_expr()
        self.depth -= 1
        return _negate(inner)

    def primary(self) -> Predicate:
        tok = self.advance()
        if tok.text == "(" and tok.kind == _PUNCT:
            self.nest(tok)
            inner = self.or_expr()
            close = self.peek()
            if close.kind == _END:
                raise self.error("unclosed '('", tok)
            if close.text != ")":
                raise self.error(f"expected 'and', 'or' or ')', found {close.describe()}", close)
            self.advance()
            self.depth -= 1
            return inner
        if tok.kind == _WORD:
            spec = _FIELDS.get(tok.text.lower())
            if spec is not None:
                return self.test(spec)
            if self.keyword(tok) is None:
                raise self.error(f"unknown field '{tok.text}'", tok)
        raise self.error(f"expected a field name or '(', found {tok.describe()}", tok)

    def test(self, spec: _Field) -> Predicate:
        """What follows a field name: a comparison, or nothing (a truth test)."""
        info = spec.info
        tok = self.peek()
        word = self.keyword(tok)
        if tok.kind == _PUNCT and tok.text in _RELOPS:
            op = _RELOPS[tok.text]
        elif word is not None and (word in _RELOPS or word in ("contains", "matches", "in")):
            op = _RELOPS.get(word, word)
        elif word == "not" and self.keyword(self.peek(1)) == "in":
            self.advance()  # `not in`: the `in` is checked below
            tok = self.peek()
            op = "not in"
        else:
            return spec.access(spec.truth)
        if op.removeprefix("not ") not in _OPS_FOR[info.type]:
            raise self.error(f"'{tok.text}' does not apply to {info.type} field '{info.name}'", tok)
        self.advance()
        if op in ("in", "not in"):
            members = self.members(spec, tok)
            test: _Test = frozenset(members).__contains__
            return spec.none(test) if op == "not in" else spec.access(test)
        if op == "matches":
            return spec.access(self.regex(spec, tok))
        value = self.value(spec, self.advance(), tok)
        if op == "contains":
            return spec.access(partial(_contains, value))
        if op == "!=":
            return spec.none(partial(operator.eq, value))
        return spec.access(partial(_ORDER[op], value))

    def members(self, spec: _Field, op_tok: _Tok) -> list[Any]:
        brace = self.advance()
        if brace.text != "{" or brace.kind != _PUNCT:
            raise self.error(f"expected '{{' after '{op_tok.text}', found {brace.describe()}", brace)
        members: list[Any] = []
        while True:
            tok = self.advance()
            if tok.text == "}" and tok.kind == _PUNCT:
                if not members:
                    raise self.error("empty set", tok)
                return members
            members.append(self.value(spec, tok, op_tok))
            sep = self.advance()
            if sep.text == "}" and sep.kind == _PUNCT:
                return members
            if sep.text != "," or sep.kind != _PUNCT:
                if sep.kind == _END:
                    raise self.error("unclosed '{'", brace)
                raise self.error(f"expected ',' or '}}', found {sep.describe()}", sep)

    def value(self, spec: _Field, tok: _Tok, op_tok: _Tok) -> Any:
        """The constant ``tok`` as a value of ``spec``'s type: a type error is a FilterError."""
        info = spec.info
        if tok.kind == _END or tok.kind == _PUNCT or self.keyword(tok) is not None:
            raise self.error(f"expected a value after '{op_tok.text}', found {tok.describe()}", tok)
        if info.type is FieldType.NUMBER:
            return self.number_value(info, tok)
        if info.type is FieldType.BOOL:
            if tok.kind == _WORD and tok.text.lower() in ("true", "false"):
                return tok.text.lower() == "true"
            if tok.kind == _NUMBER and tok.value in (0, 1) and isinstance(tok.value, int):
                return tok.value == 1
            raise self.error(f"'{info.name}' is true or false, not {tok.describe()}", tok)
        if info.type is FieldType.BYTES:
            if isinstance(tok.value, _Str):
                return tok.value.data
            if tok.kind == _HEX:
                return tok.value
            if tok.kind == _NUMBER and _HEXNUM.fullmatch(tok.text):
                digits = tok.text[2:]
                if len(digits) % 2:
                    raise self.error(f"odd number of hex digits in '{tok.text}'", tok)
                return bytes.fromhex(digits)
            raise self.error(
                f"'{info.name}' takes a quoted string or hex bytes (47:45:54 or 0x474554), not {tok.describe()}", tok
            )
        # STRING and STRINGS
        if isinstance(tok.value, _Str):
            text = tok.value.text
        elif tok.kind == _WORD:
            text = tok.text
        else:
            raise self.error(f"'{info.name}' takes a word or a quoted string, not {tok.describe()}", tok)
        if spec.fold:
            text = text.lower()
        if info.choices and op_tok.text.lower() != "contains" and text not in info.choices:
            raise self.error(f"unknown {info.name} '{text}' (expected {', '.join(info.choices)})", tok)
        return text

    def number_value(self, info: FieldInfo, tok: _Tok) -> int | float:
        if tok.kind == _NUMBER:
            if isinstance(tok.value, float) and info.name != "time":
                raise self.error(f"'{info.name}' takes a whole number, not '{tok.text}'", tok)
            assert isinstance(tok.value, int | float)
            return tok.value
        if tok.kind == _WORD or isinstance(tok.value, _Str):
            word = tok.value.text if isinstance(tok.value, _Str) else tok.text
            if word.lower() in info.names:
                return info.names[word.lower()]
            if info.names:
                raise self.error(
                    f"unknown {info.name} name '{word}' (expected a number or one of {', '.join(info.names)})", tok
                )
        raise self.error(f"'{info.name}' takes a number, not {tok.describe()}", tok)

    def regex(self, spec: _Field, op_tok: _Tok) -> _Test:
        tok = self.advance()
        if not isinstance(tok.value, _Str):
            if tok.kind == _END or tok.kind == _PUNCT or self.keyword(tok) is not None:
                raise self.error(
                    f"expected a quoted regular expression after '{op_tok.text}', found {tok.describe()}", tok
                )
            raise self.error(f"'matches' takes a quoted regular expression, not {tok.describe()}", tok)
        if len(tok.value.text) > MAX_REGEX:
            raise self.error(f"regular expression longer than {MAX_REGEX} characters", tok)
        pattern: str | bytes = tok.value.data if spec.info.type is FieldType.BYTES else tok.value.text
        try:
            with warnings.catch_warnings():
                # re warns about some valid patterns ("possible nested set" for "[[]"): not the user's problem here
                warnings.simplefilter("ignore")
                compiled = re.compile(pattern, re.IGNORECASE if spec.fold else 0)
        except (re.error, OverflowError, RecursionError, ValueError) as e:
            raise self.error(f"bad regular expression: {e}", tok) from None
        search = compiled.search
        return lambda v: search(v) is not None


def _contains(needle: Any, haystack: Any) -> bool:
    return needle in haystack


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled filter: call it with a PacketView. ``predicate`` is the bare function, for hot loops."""

    text: str
    predicate: Predicate = field(compare=False, repr=False)

    def __call__(self, packet: PacketView) -> bool:
        return self.predicate(packet)

    @property
    def matches_all(self) -> bool:
        """True for the empty filter (a caller may skip calling it)."""
        return self.predicate is _true


def compile_filter(text: str) -> Filter:
    """Parse and type-check ``text`` once; raise FilterError pointing at the first bad token."""
    if not text.strip():
        return Filter(text, _true)
    return Filter(text, _Parser(text).parse())
