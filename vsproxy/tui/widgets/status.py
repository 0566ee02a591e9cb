"""The status bar: the source, what is shown, the filter, loading and filtering progress, pause,
and the drop counts of the feed."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from vsproxy.tui import styles


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; color: $text; padding: 0 1; }
    """

    def show(self, parts: list[str], drops: int, error: str | None) -> None:
        text = Text(" │ ".join(p for p in parts if p), no_wrap=True, overflow="ellipsis")
        if drops:
            text.append(" │ ")
            text.append(f"feed drops {drops:,}", style=styles.DROPS)
        if error:
            text.append(" │ ")
            text.append(error, style="bold red")
        self.update(text)
