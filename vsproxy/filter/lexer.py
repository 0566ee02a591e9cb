"""The filter's tokens: words, punctuation, numbers, hex bytes and double-quoted strings.

``tokenize`` turns the whole text into tokens up front (ending in an ``END`` token), so a
broken number or string is reported before parsing starts, at its own column.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from vsproxy.filter.errors import FilterError

# token kinds
WORD, NUMBER, HEX, STRING, PUNCT, END = "word", "number", "hex", "string", "punct", "end"


class StringLiteral(NamedTuple):
    """A string literal as text (for string fields) and as bytes (for payload)."""

    text: str
    data: bytes


class Token(NamedTuple):
    kind: str
    text: str  # as written
    col: int
    value: int | float | bytes | StringLiteral | None = None

    def describe(self) -> str:
        return "end of filter" if self.kind == END else f"'{self.text}'"


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
HEX_NUMBER: Final = re.compile(r"0[xX][0-9A-Fa-f]+", re.ASCII)
_FLOAT: Final = re.compile(r"[0-9]+\.[0-9]+", re.ASCII)
_ESCAPES: Final = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
_HINTS: Final = {
    "=": "'=' is not an operator: use '=='",
    "&": "use '&&' or 'and'",
    "|": "use '||' or 'or'",
    "'": "strings use double quotes",
}


def tokenize(text: str) -> list[Token]:
    out: list[Token] = []
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
            out.append(Token(WORD, s, m.start()))
        elif kind == "punct":
            out.append(Token(PUNCT, s, m.start()))
        elif kind == "hex":
            out.append(Token(HEX, s, m.start(), bytes.fromhex(s.replace(":", ""))))
        elif kind == "num":
            out.append(Token(NUMBER, s, m.start(), _number(s, text, m.start())))
    out.append(Token(END, "", len(text)))
    return out


def _number(s: str, text: str, col: int) -> int | float:
    try:
        if _DEC.fullmatch(s):
            return int(s)
        if HEX_NUMBER.fullmatch(s):
            return int(s, 16)
        if _FLOAT.fullmatch(s):
            return float(s)
    except ValueError:  # more digits than int() converts (sys.int_info.default_max_str_digits)
        raise FilterError(f"number too long: '{s[:20]}...'", text, col, s) from None
    raise FilterError(f"bad number '{s}' (numbers are decimal, 0x hex or decimal with a point)", text, col, s)


def _string(text: str, start: int, raw: bool) -> Token:
    """A double-quoted string starting at ``start`` (``r"`` for raw: backslashes kept as written)."""
    i = start + (2 if raw else 1)
    chars: list[str] = []
    data = bytearray()
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return Token(STRING, text[start : i + 1], start, StringLiteral("".join(chars), bytes(data)))
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
