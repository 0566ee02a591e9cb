"""Save packets to a pcapng: all, the shown (filtered) ones, or the marked ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, RadioButton, RadioSet

if TYPE_CHECKING:
    from vsproxy.tui.app import TuiApp

CHOICES = ("all", "filtered", "marked")


class SaveScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "dismiss_save", "Cancel")]
    DEFAULT_CSS = """
    SaveScreen { align: center middle; }
    #save-box { width: 64; height: auto; border: thick $primary; background: $surface; padding: 0 1; }
    #save-box RadioSet { width: 100%; }
    """

    @property
    def tui(self) -> TuiApp:
        return cast("TuiApp", self.app)

    def compose(self) -> ComposeResult:
        tui = self.tui
        shown = len(tui.selection) if tui.selection is not None else len(tui.store)
        with Vertical(id="save-box"):
            yield Label("Save packets to a pcapng (enter saves, escape cancels)")
            with RadioSet(id="which"):
                yield RadioButton(f"all ({len(tui.store):,})", value=True, id="all")
                yield RadioButton(f"filtered: what the list shows ({shown:,})", id="filtered")
                yield RadioButton(f"marked ({tui.store.marks:,})", id="marked")
            yield Input(value="vsproxy-saved.pcapng", id="path")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        radios = self.query_one(RadioSet)
        pressed = radios.pressed_button
        which = pressed.id if pressed is not None and pressed.id in CHOICES else "all"
        path = event.value.strip()
        if not path:
            self.app.bell()
            return
        try:
            self.tui.save(path, str(which))
        except OSError as e:
            self.notify(f"{path}: {e.strerror or e}", severity="error")
            return
        self.dismiss(None)

    def action_dismiss_save(self) -> None:
        self.dismiss(None)
