"""The packets screen: filter bar, packet list, and the selected packet's detail tree and hex."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Static

from vsproxy.read import verbose_text
from vsproxy.tui import detail
from vsproxy.tui.columns import header
from vsproxy.tui.widgets.detail import DetailTree, HexPane
from vsproxy.tui.widgets.filterbar import FilterBar
from vsproxy.tui.widgets.nav import NavBar
from vsproxy.tui.widgets.packet_list import PacketList
from vsproxy.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from vsproxy.tui.app import TuiApp

TAIL_NOTE = "following new packets (tail mode): move to a packet to see its detail"


class PacketsScreen(Screen[None]):
    BINDINGS = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("enter", "detail", "Detail"),
        Binding("f", "follow", "Follow"),
        Binding("m", "mark", "Mark"),
        Binding("g", "first_of_conn", "Conn start"),
        Binding("exclamation_mark", "trouble", "Denied/spoofed/RST"),
        Binding("c", "columns", "Columns"),
        Binding("escape", "escape", "Cancel/list", show=False),
    ]
    DEFAULT_CSS = """
    #panes { height: 40%; min-height: 6; border-top: solid $primary; }
    #columns-header { height: 1; padding: 0 0 0 10; text-style: bold; display: none; }
    #columns-header.-on { display: block; }
    """

    _pending = -1
    _tail_note = False

    @property
    def tui(self) -> TuiApp:
        return cast("TuiApp", self.app)

    def compose(self) -> ComposeResult:
        yield NavBar("packets")
        yield FilterBar(self.tui.history, id="filterbar")
        yield Static("", id="columns-header")
        yield PacketList(self.tui.store, id="packets")
        with Horizontal(id="panes"):
            yield DetailTree(id="detail")
            yield HexPane(id="hex")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(PacketList).focus()
        self.refresh_data()

    def on_screen_resume(self) -> None:
        self.refresh_data()  # back from a dialog, or from another screen

    def on_resize(self, event: events.Resize) -> None:
        # the hex pane takes 16-byte rows (as `vsproxy read -V` prints) only when the tree keeps room
        hexp = self.query_one(HexPane)
        hexp.set_class(event.size.width >= 140, "-wide")
        hexp.update(hexp.text())

    @property
    def packets(self) -> PacketList:
        return self.query_one(PacketList)

    def refresh_data(self) -> None:
        """The store or the selection changed: the list follows (unless paused)."""
        tui = self.tui
        plist = self.packets
        if plist.columns != tui.columns:
            plist.set_columns(tui.columns)
            head = self.query_one("#columns-header", Static)
            head.set_class(tui.columns is not None, "-on")
            head.update(header(tui.columns) if tui.columns else "")
        if plist.indices is not tui.selection:
            plist.show(tui.selection)
        elif not tui.paused:
            plist.sync()
        self.query_one(StatusBar).show(*tui.status_parts())

    # -- the selected packet --------------------------------------------------------------------
    def on_packet_list_highlighted(self, event: PacketList.Highlighted) -> None:
        self._pending = event.index
        if self.packets.tail and not self.tui.source.done:
            # following packets as they come (tail mode): no detail, which would change faster
            # than anyone reads it and take the time keys need; it shows where the cursor stops
            if not self._tail_note:
                self._tail_note = True
                self.query_one(DetailTree).show_packet(detail.Node(TAIL_NOTE, 0, 0))
                self.query_one(HexPane).show_frame(b"")
            return
        self._tail_note = False
        self.set_timer(0.03, lambda: self._show(event.index))

    def _show(self, index: int) -> None:
        if self._pending != index:
            return  # the cursor moved on: draw only where it stopped
        tree = self.query_one(DetailTree)
        hexp = self.query_one(HexPane)
        store = self.tui.store
        if index < 0:
            tree.show_packet(None)
            hexp.show_frame(b"")
            return
        try:
            rec = store.record(index)
            d = store.decoded(index)
        except IndexError:
            return
        if d is None:
            tree.show_packet(detail.Node(f"bad frame ({len(rec.frame)} bytes)", 0, len(rec.frame)))
        else:
            tree.show_packet(detail.build(verbose_text(d), len(rec.frame), len(d.packet.payload)))
        hexp.show_frame(rec.frame)

    def on_detail_tree_range(self, event: DetailTree.Range) -> None:
        self.query_one(HexPane).highlight(event.start, event.end)

    def on_filter_bar_applied(self, event: FilterBar.Applied) -> None:
        self.tui.apply_filter(event.text)
        self.packets.focus()

    # -- actions ----------------------------------------------------------------------------------
    def action_focus_filter(self) -> None:
        self.query_one(FilterBar).input.focus()

    def action_detail(self) -> None:
        self.query_one(DetailTree).focus()

    def action_escape(self) -> None:
        if self.tui.filtering is not None:
            self.tui.cancel_filter()
        else:
            self.packets.focus()

    def action_follow(self) -> None:
        cid = self._conn()
        if cid:
            self.tui.follow(cid)

    def action_mark(self) -> None:
        plist = self.packets
        i = plist.current
        if i < 0:
            return
        self.tui.store.toggle_mark(i)
        plist.forget(i)
        plist.action_cursor(1)
        self.query_one(StatusBar).show(*self.tui.status_parts())

    def action_first_of_conn(self) -> None:
        cid = self._conn()
        first = self.tui.store.first_of(cid) if cid else None
        if first is None:
            return
        plist = self.packets
        row = plist.row_of(first)
        if row is None:  # not in the selection: show every packet, then go there
            self.tui.apply_filter("")
            plist.show(None)
            row = plist.row_of(first)
        if row is not None:
            plist.move_to(row)

    def action_columns(self) -> None:
        from vsproxy.tui.screens.columns import ColumnsScreen

        self.app.push_screen(ColumnsScreen())

    def action_trouble(self) -> None:
        from vsproxy.tui.model import TROUBLE_FILTER

        bar = self.query_one(FilterBar)
        bar.input.value = TROUBLE_FILTER
        self.tui.apply_filter(TROUBLE_FILTER)

    def _conn(self) -> int:
        i = self.packets.current
        return self.tui.store.conn_of(i) if i >= 0 else 0
