"""Loading an optional cffi extension: vsproxy runs without its C (pure Python) when it was not
built, or when ``VSPROXY_NO_C`` is set (the reference paths, in tests and by hand)."""

from __future__ import annotations

import importlib
import os
from typing import Any


def load(module: str) -> tuple[Any, Any]:
    """``(ffi, lib)`` of the extension ``module``, or ``(None, None)``."""
    if os.environ.get("VSPROXY_NO_C"):
        return None, None
    try:
        ext = importlib.import_module(module)
    except ImportError:  # pragma: no cover - exercised when the extension was not built
        return None, None
    return ext.ffi, ext.lib
