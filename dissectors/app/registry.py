"""The dissector registry: built-ins, classes registered in-process with ``register``, and
plugins named by ``module:Class`` strings (a config line or a CLI option) or installed under
the entry-point group ``vsproxy.dissectors``.

Order matters twice: a port claimed by two dissectors goes to the earlier one, and first-bytes
detection asks them in order. Plugins loaded with ``load_plugins`` go before the built-ins,
and a class whose ``name`` is already registered replaces the one registered under it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Iterable
from typing import TypeVar

from dissectors.app.base import AppDissector

ENTRY_POINT_GROUP = "vsproxy.dissectors"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")

D = TypeVar("D", bound=type[AppDissector])

_registry: list[type[AppDissector]] = []


class PluginError(Exception):
    """A dissector class or plugin spec that cannot be used; the text is one line."""


def _check(cls: object, what: str) -> type[AppDissector]:
    if not (isinstance(cls, type) and issubclass(cls, AppDissector)):
        raise PluginError(f"{what} is not an AppDissector subclass")
    if not isinstance(cls.name, str) or not _NAME.fullmatch(cls.name):
        raise PluginError(f"{what} needs a name of lower-case letters, digits, '-' or '_' (got {cls.name!r})")
    ports = cls.ports
    if not isinstance(ports, frozenset) or not all(isinstance(p, int) and 0 <= p <= 0xFFFFFFFF for p in ports):
        raise PluginError(f"{what}: ports must be a frozenset of vsock ports (0..4294967295)")
    if cls.parse is AppDissector.parse:
        raise PluginError(f"{what} does not implement parse()")
    return cls


def register(cls: D, *, first: bool = False) -> D:
    """Add a dissector class (usable as a decorator). ``first`` puts it before those already
    registered. A class with the name of a registered one replaces it."""
    _check(cls, f"dissector {getattr(cls, '__qualname__', cls)!r}")
    _registry[:] = [c for c in _registry if c.name != cls.name]
    if first:
        _registry.insert(0, cls)
    else:
        _registry.append(cls)
    return cls


def unregister(name: str) -> None:
    _registry[:] = [c for c in _registry if c.name != name]


def registered() -> tuple[type[AppDissector], ...]:
    """The registered dissectors, in the order ports and detection consult them."""
    return tuple(_registry)


def load_spec(spec: str) -> type[AppDissector]:
    """Import ``module:Class`` (the class may be dotted, ``module:Outer.Inner``)."""
    spec = spec.strip()
    if not _SPEC.fullmatch(spec):
        raise PluginError(f"dissector plugin {spec!r}: expected module:Class")
    module_name, _, qualname = spec.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as e:  # an import runs arbitrary code: any failure is the plugin's
        raise PluginError(f"dissector plugin {spec!r}: cannot import {module_name}: {type(e).__name__}: {e}") from e
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"dissector plugin {spec!r}: {module_name} has no {qualname}") from None
    return _check(obj, f"dissector plugin {spec!r}")


def entry_point_classes() -> list[type[AppDissector]]:
    """The classes installed packages declare under ``[project.entry-points."vsproxy.dissectors"]``."""
    out: list[type[AppDissector]] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        what = f"dissector entry point {ep.name!r} ({ep.value})"
        try:
            obj = ep.load()
        except Exception as e:  # as for load_spec: the plugin's own import failed
            raise PluginError(f"{what}: cannot load: {type(e).__name__}: {e}") from e
        out.append(_check(obj, what))
    return out


def load_plugins(specs: Iterable[str] = (), *, entry_points: bool = True) -> list[type[AppDissector]]:
    """Register the ``module:Class`` specs, then (``entry_points``) the installed entry points,
    ahead of the built-ins, in that order. Returns the classes loaded. Raises ``PluginError``
    before registering anything when one of them is bad."""
    classes = [load_spec(s) for s in specs]
    if entry_points:
        classes += entry_point_classes()
    for cls in reversed(classes):
        register(cls, first=True)
    return classes
