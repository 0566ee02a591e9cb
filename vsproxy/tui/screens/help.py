"""The help screen: every binding (read from the bindings themselves, so it cannot go stale),
what each colour means, and the filter's fields."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from vsproxy.filter import FIELDS
from vsproxy.tui import styles
from vsproxy.tui.widgets.nav import NavBar

EXTRA = (  # bindings Textual itself provides, and mouse use
    ("tab / shift+tab", "next / previous pane (list, detail tree, filter bar)"),
    ("up, down, pgup, pgdn, home", "move in the packet list; home: first packet"),
    ("end, t", "last packet, and follow new ones (tail mode; scrolling up leaves it)"),
    ("up, down in the filter bar", "filter history"),
    ("right arrow in the filter bar", "accept the completion (field names, keywords)"),
    ("escape", "cancel a running filter; back to the packet list"),
    ("mouse", "click a row, a tree node, a screen name at the top, a column heading (sorts)"),
)


def binding_rows() -> list[tuple[str, str, str]]:
    """(where, keys, what) for every binding of the app, its screens and widgets."""
    from vsproxy.tui.app import TuiApp
    from vsproxy.tui.screens.columns import ColumnsScreen
    from vsproxy.tui.screens.connections import ConnectionsScreen
    from vsproxy.tui.screens.follow import FollowScreen
    from vsproxy.tui.screens.packets import PacketsScreen
    from vsproxy.tui.screens.save import SaveScreen

    rows = []
    where_list: tuple[tuple[str, list[BindingType]], ...] = (
        ("everywhere", TuiApp.BINDINGS), ("packets", PacketsScreen.BINDINGS),
        ("connections", ConnectionsScreen.BINDINGS), ("follow", FollowScreen.BINDINGS),
        ("save", SaveScreen.BINDINGS), ("columns", ColumnsScreen.BINDINGS))
    for where, bindings in where_list:
        for b in bindings:
            if isinstance(b, Binding):
                rows.append((where, b.key, b.description))
    return rows


def help_text() -> str:
    lines = ["[b]Keys[/b]"]
    for where, key, what in binding_rows():
        lines.append(f"  {where:<12} {key:<22} {what}")
    for key, what in EXTRA:
        lines.append(f"  {'':<12} {key:<22} {what}")
    lines += ["", "[b]Colours[/b]"]
    for _, style, what in styles.MEANINGS:
        lines.append(f"  [{style}] sample [/] {what}")
    lines.append(f"  [{styles.MARK}] sample [/] marked (m); save the marked packets with w")
    lines.append(f"  [{styles.FROM_GUEST}] sample [/] from the guest (client side when the file has no direction)")
    lines.append(f"  [{styles.TO_GUEST}] sample [/] to the guest (server side when the file has no direction)")
    lines.append(f"  [{styles.DROPS}] feed drops [/] packets the live feed lost (the TUI read too slowly)")
    lines += ["", "[b]Filter fields[/b] (docs/filter.md)"]
    for f in FIELDS.values():
        lines.append(f"  {f.name:<10} {f.type.value:<8} {f.description}")
    return "\n".join(lines)


class HelpScreen(Screen[None]):
    DEFAULT_CSS = """
    #help-box { height: 1fr; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        yield NavBar("help")
        with VerticalScroll(id="help-box"):
            yield Static(help_text(), id="help")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#help-box").focus()
