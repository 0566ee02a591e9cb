"""The follow screen: one connection's transcript (vsproxy/tui/follow.py), both directions coloured
as in the packet list."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from vsproxy.tui import follow
from vsproxy.tui.widgets.nav import NavBar
from vsproxy.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from vsproxy.tui.app import TuiApp


class FollowScreen(Screen[None]):
    BINDINGS = [
        Binding("x", "toggle_hex", "Text/hex"),
        Binding("F", "hide", "Filter out stream"),
        Binding("g", "first", "Its packets"),
    ]
    DEFAULT_CSS = """
    #stream-box { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._shown: tuple[int, bool, int, bool, int] | None = None

    @property
    def tui(self) -> TuiApp:
        return cast("TuiApp", self.app)

    def compose(self) -> ComposeResult:
        yield NavBar("follow")
        with VerticalScroll(id="stream-box"):
            yield Static("", id="stream")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#stream-box").focus()
        self.refresh_data()

    def on_screen_resume(self) -> None:
        self.refresh_data()

    def refresh_data(self) -> None:
        tui = self.tui
        store = tui.store
        cid = tui.follow_conn
        row = store.conns.get(cid)
        src = tui.source
        ended = src.done or not src.live  # a live source may still add to the connection
        key = (cid, tui.follow_hex, row.last if row is not None else -1, ended, src.drops)
        if key != self._shown:
            self._shown = key
            box = self.query_one("#stream", Static)
            if row is None:
                box.update("No connection followed: select a packet or a connection and press f.")
            else:  # the connection's transcript, the model `vsproxy read --follow` prints
                box.update(follow.render(follow.followed(store, cid, ended), tui.follow_hex, src.drops))
        self.query_one(StatusBar).show(*tui.status_parts())

    def action_toggle_hex(self) -> None:
        self.tui.follow_hex = not self.tui.follow_hex
        self.refresh_data()

    def action_hide(self) -> None:
        if self.tui.follow_conn:
            self.tui.hide_connection(self.tui.follow_conn)

    def action_first(self) -> None:
        if self.tui.follow_conn:
            self.tui.show_connection(self.tui.follow_conn)
