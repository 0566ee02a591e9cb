"""Snapshot tests (pytest-textual-snapshot) of every screen, from the captures in captures/, at
80x24 and at 120x40; the baselines are in tests/__snapshots__/. After a deliberate change to
what a screen shows: ``pytest tests/test_tui_snapshots.py --snapshot-update``, then look at
the new SVGs before committing them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input
from tui_helpers import file_app, plist

# screen: (capture, keys after the packet under the cursor is chosen, that packet)
SCREENS = {
    "packets": ("http-over-vsock.pcapng", (), 2),
    "filter-error": ("http-over-vsock.pcapng", ("slash", *"op == rw and bogus > 1"), 2),
    "connections": ("sibling-denied.pcapng", ("2",), 0),
    "devices": ("sibling-denied.pcapng", ("3",), 0),
    "follow": ("http-over-vsock.pcapng", ("f",), 2),
    "follow-seqpacket": ("seqpacket.pcapng", ("f",), 2),
    "help": ("http-over-vsock.pcapng", ("question_mark",), 2),
}
SIZES = [(80, 24), (120, 40)]


def before(packet: int, keys: tuple[str, ...]) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def run(pilot: Pilot[Any]) -> None:
        for inp in pilot.app.screen.query(Input):
            inp.cursor_blink = False  # a blinking cursor would make two screenshots differ
        plist(pilot.app).move_to(packet)  # type: ignore[arg-type]
        await pilot.pause(0.3)  # the detail follows the cursor after a short settle
        if keys:
            await pilot.press(*keys)
        await pilot.pause(0.3)

    return run


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_matches_its_snapshot(screen: str, size: tuple[int, int], snap_compare: Any) -> None:
    capture, keys, packet = SCREENS[screen]
    assert snap_compare(file_app(capture), terminal_size=size, run_before=before(packet, keys))
