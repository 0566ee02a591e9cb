"""Packet predicates, what a compiled filter is made of, and the combinators that join them.

The combinators unroll the common small cases into one lambda, so judging a packet against
``a and b`` is one call and two tests rather than a loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vsproxy.capture.view import PacketView

Predicate = Callable[[PacketView], bool]
ValueTest = Callable[[Any], bool]  # a test on one field value


def true(p: PacketView) -> bool:
    """The empty filter's predicate: ``Filter.matches_all`` recognises it by identity."""
    return True


def all_of(preds: list[Predicate]) -> Predicate:
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


def any_of(preds: list[Predicate]) -> Predicate:
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


def negate(inner: Predicate) -> Predicate:
    return lambda p: not inner(p)
