"""The README's screenshots of each TUI screen (docs/tui/*.svg) are what the TUI draws today from
the captures in captures/. After a change to a screen, make them again with
``VSPROXY_UPDATE_SCREENSHOTS=1 .venv/bin/pytest tests/test_tui_screenshots.py`` and commit them."""

from __future__ import annotations

import os
import re

import pytest
from tui_helpers import ROOT, file_app, plist, sync

DOCS = ROOT / "docs" / "tui"
SIZE = (120, 34)
# name: (capture, packet under the cursor, keys, what the README says it shows)
SHOTS = {
    "packets": ("http-over-vsock.pcapng", 2, ()),
    "filter": ("http-over-vsock.pcapng", 2, ("slash", *"proto == http and op == rw and lenn > 0")),
    "connections": ("sibling-denied.pcapng", 0, ("2",)),
    "devices": ("sibling-denied.pcapng", 0, ("3",)),
    "follow": ("http-over-vsock.pcapng", 2, ("f",)),
    "help": ("http-over-vsock.pcapng", 2, ("question_mark",)),
}


async def screenshot(name: str) -> str:
    capture, packet, keys = SHOTS[name]
    app = file_app(capture)
    async with app.run_test(size=SIZE) as pilot:
        from textual.widgets import Input

        for inp in app.screen.query(Input):
            inp.cursor_blink = False
        plist(app).move_to(packet)
        await pilot.pause(0.3)
        if keys:
            await pilot.press(*keys)
        await pilot.pause(0.3)
        return app.export_screenshot(title=f"vsproxy tui captures/{capture}")


@pytest.mark.parametrize("name", list(SHOTS))
@sync
async def test_the_readme_screenshot_is_current(name: str) -> None:
    got = await screenshot(name)
    path = DOCS / f"{name}.svg"
    if os.environ.get("VSPROXY_UPDATE_SCREENSHOTS"):
        DOCS.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: make it with VSPROXY_UPDATE_SCREENSHOTS=1"
    assert path.read_text() == got, f"{path} is not what the TUI draws now: VSPROXY_UPDATE_SCREENSHOTS=1 remakes it"


def test_the_readme_shows_every_screenshot() -> None:
    text = (ROOT / "README.md").read_text()
    shown = re.findall(r"!\[[^\]]*\]\(docs/tui/([a-z]+)\.svg\)", text)
    assert sorted(shown) == sorted(SHOTS)
