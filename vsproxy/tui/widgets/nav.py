"""The row of screen names at the top: the current one highlighted, each clickable."""

from __future__ import annotations

from typing import Final

from textual.widgets import Static

SCREENS: Final = (("packets", "1 Packets"), ("connections", "2 Connections"), ("devices", "3 Devices"),
                  ("follow", "4 Follow"), ("help", "? Help"))


class NavBar(Static):
    DEFAULT_CSS = """
    NavBar { height: 1; background: $primary-background; padding: 0 1; }
    """

    def __init__(self, current: str) -> None:
        parts = []
        for name, label in SCREENS:
            style = "bold reverse" if name == current else "bold"
            parts.append(f"[{style}][@click=app.switch_mode('{name}')] {label} [/][/]")
        super().__init__("  ".join(parts))
