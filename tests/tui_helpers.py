"""Shared by the TUI tests: an app over a capture file, waiting for it in Pilot, the screen as text."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Static

from vsproxy.capture.reader import records
from vsproxy.decode import Decoder
from vsproxy.tui.app import TuiApp
from vsproxy.tui.sources import FileSource, Source
from vsproxy.tui.widgets.packet_list import PacketList

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "captures"


def file_app(name: str) -> TuiApp:
    """The app over ``captures/NAME``, the file read to its end before the app starts."""
    src = FileSource([str(CAPTURES / name)])
    src.start()
    src.join(10)
    assert src.done
    return TuiApp(src)


def source_app(src: Source) -> TuiApp:
    return TuiApp(src)


async def until(pilot: Pilot[None], cond: Callable[[], bool], timeout: float = 8.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def plist(app: TuiApp) -> PacketList:
    return app.screen.query_one(PacketList)


def static_text(app: TuiApp, selector: str) -> str:
    w = app.screen.query_one(selector, Static)
    return str(w.render())


def status_text(app: TuiApp) -> str:
    from vsproxy.tui.widgets.status import StatusBar

    return str(app.screen.query_one(StatusBar).render())


def expected(name: str, flt: str = "") -> list[int]:
    """The absolute indices ``vsproxy read``'s pipeline matches in ``captures/NAME``."""
    d = Decoder(flt or None)
    out = []
    with open(CAPTURES / name, "rb") as f:
        for i, rec in enumerate(records(f)):
            if d.decode(rec).matched:
                out.append(i)
    return out


def sync(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async Pilot test as a plain test (no asyncio plugin needed): run in its own loop."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run
