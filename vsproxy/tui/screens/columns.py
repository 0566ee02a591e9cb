"""Pick the packet list's columns, or go back to ``vsproxy read``'s one line."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, SelectionList

from vsproxy.tui.columns import COLUMNS, DEFAULT

if TYPE_CHECKING:
    from vsproxy.tui.app import TuiApp


class ColumnsScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("enter", "apply", "Use these columns", priority=True),  # space toggles a column
        Binding("r", "read_line", "vsproxy read's line"),
        Binding("escape", "dismiss_columns", "Cancel"),
    ]
    DEFAULT_CSS = """
    ColumnsScreen { align: center middle; }
    #columns-box { width: 50; height: auto; max-height: 90%; border: thick $primary; background: $surface; }
    #columns-box SelectionList { height: auto; max-height: 18; }
    """

    @property
    def tui(self) -> TuiApp:
        return cast("TuiApp", self.app)

    def compose(self) -> ComposeResult:
        chosen = self.tui.columns or DEFAULT
        with Vertical(id="columns-box"):
            yield Label("Columns: space toggles, enter uses them,\nr: vsproxy read's one line, escape: cancel")
            yield SelectionList[str](*((c.title, c.name, c.name in chosen) for c in COLUMNS), id="column-list")

    def on_mount(self) -> None:
        self.query_one(SelectionList).focus()

    def action_apply(self) -> None:
        picked = self.query_one(SelectionList).selected
        order = [c.name for c in COLUMNS if c.name in picked]  # the table's order, whatever the clicks
        self.tui.set_columns(tuple(order) if order else None)
        self.dismiss(None)

    def action_read_line(self) -> None:
        self.tui.set_columns(None)
        self.dismiss(None)

    def action_dismiss_columns(self) -> None:
        self.dismiss(None)
