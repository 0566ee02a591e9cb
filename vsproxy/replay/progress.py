"""A progress bar on stderr while a replay runs, only when stderr is a terminal (a pipe or a file
gets nothing, so logs stay clean). Redrawn at most ten times a second."""

from __future__ import annotations

import time
from typing import Final, TextIO

WIDTH: Final = 30


class Progress:
    def __init__(self, total: int, out: TextIO, label: str = "replay") -> None:
        self.total = max(total, 1)
        self.done = 0
        self.out = out
        self.label = label
        self.shown = _isatty(out)
        self._last = 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        if not self.shown:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        self.out.write("\r" + bar(self.done, self.total, self.label))
        self.out.flush()

    def close(self) -> None:
        if self.shown:
            self.out.write("\r" + " " * (WIDTH + 40) + "\r")
            self.out.flush()


def bar(done: int, total: int, label: str = "replay") -> str:
    """``replay [#########.....................] 300/1000``"""
    filled = WIDTH * min(done, total) // max(total, 1)
    return f"{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total}"


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
