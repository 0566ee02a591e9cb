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

Modules: ``lexer`` (tokens), ``fields`` (the field table and how each field reaches its value),
``predicates`` (the closures' type and combinators), ``compiler`` (parser, ``Filter``,
``compile_filter``), ``errors`` (``FilterError``).
"""

from __future__ import annotations

from vsproxy.filter.compiler import MAX_DEPTH, MAX_REGEX, Filter, compile_filter
from vsproxy.filter.errors import FilterError
from vsproxy.filter.fields import FIELDS, FieldInfo, FieldType
from vsproxy.filter.predicates import Predicate

__all__ = [
    "FIELDS",
    "MAX_DEPTH",
    "MAX_REGEX",
    "FieldInfo",
    "FieldType",
    "Filter",
    "FilterError",
    "Predicate",
    "compile_filter",
]
