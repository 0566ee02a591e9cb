"""Small text drawings (credit windows as bars), sans-I/O."""

from __future__ import annotations


def bar(used: int, size: int, width: int = 8) -> str:
    """``used`` of ``size`` as a bar of ``width`` cells: full cells, then dots."""
    if size <= 0:
        return "·" * width
    full = min(width, round(width * max(0, used) / size))
    return "█" * full + "·" * (width - full)


def human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"
