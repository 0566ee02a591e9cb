"""The filter's parser and compiler: filter text to a ``Filter`` wrapping a tree of closures.

Recursive descent over the grammar in docs/filter.md; each rule returns the predicate for what
it parsed, so there is no syntax tree and judging a packet never looks at the text again.
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

from vsproxy.capture.view import PacketView
from vsproxy.filter import lexer
from vsproxy.filter.errors import FilterError
from vsproxy.filter.fields import FIELD_SPECS, FieldInfo, FieldSpec, FieldType
from vsproxy.filter.lexer import END, HEX, HEX_NUMBER, NUMBER, PUNCT, WORD, StringLiteral, Token
from vsproxy.filter.predicates import Predicate, ValueTest, all_of, any_of, negate, true

# Bounds that keep a hostile filter from costing more than its text: parentheses and `not`
# nest at most this deep (the parser and the closures recurse once per level), and a regular
# expression is at most this long (Python's re has no time bound, so keep patterns small).
MAX_DEPTH: Final = 64
MAX_REGEX: Final = 1024

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


class _Parser:
    """Recursive descent over the grammar in docs/filter.md, compiling as it goes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = lexer.tokenize(text)
        self.i = 0
        self.depth = 0

    def error(self, message: str, tok: Token) -> FilterError:
        return FilterError(message, self.text, tok.col, tok.text)

    def peek(self, ahead: int = 0) -> Token:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def advance(self) -> Token:
        tok = self.toks[self.i]
        if tok.kind != END:
            self.i += 1
        return tok

    @staticmethod
    def keyword(tok: Token) -> str | None:
        """The keyword a token spells (``&&`` spells ``and``), or None."""
        if tok.kind == PUNCT:
            return _SYMBOL_WORDS.get(tok.text)
        if tok.kind == WORD:
            word = tok.text.lower()
            return word if word in _KEYWORDS else None
        return None

    def nest(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"filter nested more than {MAX_DEPTH} deep", tok)

    def parse(self) -> Predicate:
        pred = self.or_expr()
        tok = self.peek()
        if tok.kind != END:
            if tok.text == ")":
                raise self.error("unmatched ')'", tok)
            raise self.error(f"unexpected {tok.describe()} after a complete expression (missing 'and' or 'or'?)", tok)
        return pred

    def or_expr(self) -> Predicate:
        preds = [self.and_expr()]
        while self.keyword(self.peek()) == "or":
            self.advance()
            preds.append(self.and_expr())
        return any_of(preds)

    def and_expr(self) -> Predicate:
        preds = [self.not_expr()]
        while self.keyword(self.peek()) == "and":
            self.advance()
            preds.append(self.not_expr())
        return all_of(preds)

    def not_expr(self) -> Predicate:
        tok = self.peek()
        if self.keyword(tok) != "not":
            return self.primary()
        self.advance()
        self.nest(tok)
        inner = self.not_expr()
        self.depth -= 1
        return negate(inner)

    def primary(self) -> Predicate:
        tok = self.advance()
        if tok.text == "(" and tok.kind == PUNCT:
            self.nest(tok)
            inner = self.or_expr()
            close = self.peek()
            if close.kind == END:
                raise self.error("unclosed '('", tok)
            if close.text != ")":
                raise self.error(f"expected 'and', 'or' or ')', found {close.describe()}", close)
            self.advance()
            self.depth -= 1
            return inner
        if tok.kind == WORD:
            spec = FIELD_SPECS.get(tok.text.lower())
            if spec is not None:
                return self.test(spec)
            if self.keyword(tok) is None:
                raise self.error(f"unknown field '{tok.text}'", tok)
        raise self.error(f"expected a field name or '(', found {tok.describe()}", tok)

    def test(self, spec: FieldSpec) -> Predicate:
        """What follows a field name: a comparison, or nothing (a truth test)."""
        info = spec.info
        tok = self.peek()
        word = self.keyword(tok)
        if tok.kind == PUNCT and tok.text in _RELOPS:
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
            test: ValueTest = frozenset(members).__contains__
            return spec.none(test) if op == "not in" else spec.access(test)
        if op == "matches":
            return spec.access(self.regex(spec, tok))
        value = self.value(spec, self.advance(), tok)
        if op == "contains":
            return spec.access(partial(_contains, value))
        if op == "!=":
            return spec.none(partial(operator.eq, value))
        return spec.access(partial(_ORDER[op], value))

    def members(self, spec: FieldSpec, op_tok: Token) -> list[Any]:
        brace = self.advance()
        if brace.text != "{" or brace.kind != PUNCT:
            raise self.error(f"expected '{{' after '{op_tok.text}', found {brace.describe()}", brace)
        members: list[Any] = []
        while True:
            tok = self.advance()
            if tok.text == "}" and tok.kind == PUNCT:
                if not members:
                    raise self.error("empty set", tok)
                return members
            members.append(self.value(spec, tok, op_tok))
            sep = self.advance()
            if sep.text == "}" and sep.kind == PUNCT:
                return members
            if sep.text != "," or sep.kind != PUNCT:
                if sep.kind == END:
                    raise self.error("unclosed '{'", brace)
                raise self.error(f"expected ',' or '}}', found {sep.describe()}", sep)

    def value(self, spec: FieldSpec, tok: Token, op_tok: Token) -> Any:
        """The constant ``tok`` as a value of ``spec``'s type: a type error is a FilterError."""
        info = spec.info
        if tok.kind == END or tok.kind == PUNCT or self.keyword(tok) is not None:
            raise self.error(f"expected a value after '{op_tok.text}', found {tok.describe()}", tok)
        if info.type is FieldType.NUMBER:
            return self.number_value(info, tok)
        if info.type is FieldType.BOOL:
            if tok.kind == WORD and tok.text.lower() in ("true", "false"):
                return tok.text.lower() == "true"
            if tok.kind == NUMBER and tok.value in (0, 1) and isinstance(tok.value, int):
                return tok.value == 1
            raise self.error(f"'{info.name}' is true or false, not {tok.describe()}", tok)
        if info.type is FieldType.BYTES:
            if isinstance(tok.value, StringLiteral):
                return tok.value.data
            if tok.kind == HEX:
                return tok.value
            if tok.kind == NUMBER and HEX_NUMBER.fullmatch(tok.text):
                digits = tok.text[2:]
                if len(digits) % 2:
                    raise self.error(f"odd number of hex digits in '{tok.text}'", tok)
                return bytes.fromhex(digits)
            raise self.error(
                f"'{info.name}' takes a quoted string or hex bytes (47:45:54 or 0x474554), not {tok.describe()}", tok
            )
        # STRING and STRINGS
        if isinstance(tok.value, StringLiteral):
            text = tok.value.text
        elif tok.kind == WORD:
            text = tok.text
        else:
            raise self.error(f"'{info.name}' takes a word or a quoted string, not {tok.describe()}", tok)
        if spec.fold:
            text = text.lower()
        if info.choices and op_tok.text.lower() != "contains" and text not in info.choices:
            raise self.error(f"unknown {info.name} '{text}' (expected {', '.join(info.choices)})", tok)
        return text

    def number_value(self, info: FieldInfo, tok: Token) -> int | float:
        if tok.kind == NUMBER:
            if isinstance(tok.value, float) and info.name != "time":
                raise self.error(f"'{info.name}' takes a whole number, not '{tok.text}'", tok)
            assert isinstance(tok.value, int | float)
            return tok.value
        if tok.kind == WORD or isinstance(tok.value, StringLiteral):
            word = tok.value.text if isinstance(tok.value, StringLiteral) else tok.text
            if word.lower() in info.names:
                return info.names[word.lower()]
            if info.names:
                raise self.error(
                    f"unknown {info.name} name '{word}' (expected a number or one of {', '.join(info.names)})", tok
                )
        raise self.error(f"'{info.name}' takes a number, not {tok.describe()}", tok)

    def regex(self, spec: FieldSpec, op_tok: Token) -> ValueTest:
        tok = self.advance()
        if not isinstance(tok.value, StringLiteral):
            if tok.kind == END or tok.kind == PUNCT or self.keyword(tok) is not None:
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
        return self.predicate is true


def compile_filter(text: str) -> Filter:
    """Parse and type-check ``text`` once; raise FilterError pointing at the first bad token."""
    if not text.strip():
        return Filter(text, true)
    return Filter(text, _Parser(text).parse())
