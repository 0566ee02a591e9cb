"""Shared by the TUI tests: an app over a capture file, waiting for it in Pilot, the screen as text."""

from __future__ import annotations

import asyncio
import functools
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
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
    """The app over ``captures/NAME``, the file read to its end before the app starts. The path
    is given as a user in the repository would type it (the screens show it), so snapshots do
    not depend on where the repository is checked out."""
    src = FileSource([os.path.relpath(CAPTURES / name)])
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


PY = shlex.quote(sys.executable)
# A tmux server of these tests' own (its socket named for this process): the sizes asked for
# are the sizes given, whatever another server's options say.
TMUX = ["tmux", "-L", f"vsproxy-tui-{os.getpid()}"]


class Tmux:
    def __init__(self, name: str, command: str, size: tuple[int, int] = (100, 30)) -> None:
        self.name = name
        subprocess.run([*TMUX, "new-session", "-d", "-s", name, "-x", str(size[0]), "-y", str(size[1]),
                        # COLUMNS and LINES (set by some runners) would override the terminal's size
                        f"cd {shlex.quote(str(ROOT))} && unset COLUMNS LINES && {command}; sleep 30"],
                       check=True, timeout=10)

    def screen(self) -> str:
        p = subprocess.run([*TMUX, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                           timeout=10)
        return p.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([*TMUX, "send-keys", "-t", self.name, *keys], check=True, timeout=10)

    def wait(self, cond: Callable[[str], bool], what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if cond(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run([*TMUX, "kill-session", "-t", self.name], capture_output=True, timeout=10)


def tmux_sessions() -> Iterator[Callable[[str, str], Tmux]]:
    """For a fixture: makes tmux sessions, and ends them (and the tests' tmux server) after."""
    made: list[Tmux] = []

    def make(name: str, command: str) -> Tmux:
        t = Tmux(f"{name}-{os.getpid()}", command)
        made.append(t)
        return t

    yield make
    for t in made:
        t.kill()
    subprocess.run([*TMUX, "kill-server"], capture_output=True, timeout=10)
