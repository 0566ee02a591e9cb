"""The connections screen: one row per connection, sortable; enter opens its packets, f its
stream. Attached to a running vsproxy, the rows are its snapshot's (live state, the real peer
after remap, credit both ways, whether C runs it); otherwise they come from the capture."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from vsproxy.tui.bars import bar, human
from vsproxy.tui.model import ConnRow
from vsproxy.tui.widgets.nav import NavBar
from vsproxy.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from vsproxy.tui.app import TuiApp

MAX_ROWS: Final = 5000  # the newest connections shown when a capture has more


@dataclass(slots=True)
class Row:
    """One table row: the cells, the values it sorts by, the capture connection it opens."""

    cells: tuple[str | Text, ...]
    keys: tuple[Any, ...]
    conn: int  # the store's connection id (0: none known)
    style: str


COLUMNS: Final = ("#", "device", "guest end", "peer", "real peer", "type", "state", "age", "→ peer", "← guest",
                  "rate", "credit →", "credit ←", "proto", "verdict / rule")


class ConnectionsScreen(Screen[None]):
    BINDINGS = [
        Binding("enter", "open", "Packets"),
        Binding("f", "follow", "Follow"),
        Binding("s", "sort", "Sort"),
        Binding("r", "reverse", "Reverse"),
    ]
    DEFAULT_CSS = """
    #conn-title { height: 1; padding: 0 1; color: $text-muted; }
    DataTable { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.sort_col = 0
        self.descending = False
        self.rows: list[Row] = []
        self._prev_bytes: dict[int, tuple[int, float]] = {}

    @property
    def tui(self) -> TuiApp:
        return cast("TuiApp", self.app)

    def compose(self) -> ComposeResult:
        yield NavBar("connections")
        yield Static("", id="conn-title")
        table: DataTable[str | Text] = DataTable(cursor_type="row", zebra_stripes=True, id="conns")
        yield table
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for c in COLUMNS:
            table.add_column(c, key=c)
        table.focus()
        self.refresh_data()

    def on_screen_resume(self) -> None:
        self.refresh_data()

    # -- rows ----------------------------------------------------------------------------------------
    def refresh_data(self) -> None:
        if not self.query_one(DataTable).columns:
            return  # composed, not mounted yet: on_mount adds the columns, then draws
        tui = self.tui
        snap = tui.source.snapshot
        if snap is not None:
            self.rows = self._from_snapshot(snap)
            origin = "from vsproxy's snapshot (live state)"
        else:
            self.rows = self._from_capture()
            origin = "from the capture"
        self.rows.sort(key=lambda r: r.keys[self.sort_col], reverse=self.descending)
        arrow = "▼" if self.descending else "▲"
        self.query_one("#conn-title", Static).update(
            f"{len(self.rows):,} connections {origin}; sorted by {COLUMNS[self.sort_col]} {arrow} "
            "(s: next column, r: reverse; enter: packets, f: follow)")
        table = self.query_one(DataTable)
        row_now = table.cursor_row
        table.clear()
        for r in self.rows:
            table.add_row(*(Text(c, style=r.style) if isinstance(c, str) else c for c in r.cells))
        if self.rows:
            table.move_cursor(row=min(row_now, len(self.rows) - 1))
        self.query_one(StatusBar).show(*tui.status_parts())

    def _from_capture(self) -> list[Row]:
        store = self.tui.store
        matched: set[int] | None = None
        sel = self.tui.selection
        if sel is not None and self.tui.run_filter is not None:  # the filter applies here too
            matched = {store.conn_of(i) for i in sel if i >= store.first}
        with store.lock:
            conns = list(store.conns.values())[-MAX_ROWS:]
        rows = []
        for c in conns:
            if matched is not None and c.id not in matched:
                continue
            rows.append(self._capture_row(c))
        return rows

    def _capture_row(self, c: ConnRow) -> Row:
        age = max(0.0, c.last_ts - c.first_ts)
        rate = (c.bytes[0] + c.bytes[1]) / age if age > 0 else 0.0
        style = _state_style(c.verdict, c.state, c.rewritten)
        verdict = c.verdict + (f" ({c.rule})" if c.rule else "")
        cells = (str(c.id), c.device, f"{c.client[0]}:{c.client[1]}", f"{c.server[0]}:{c.server[1]}",
                 "-", c.type_name, c.state, f"{age:.2f}s", human(c.bytes[0]), human(c.bytes[1]),
                 f"{human(rate)}B/s", _credit(c.in_flight(1), c.buf_alloc[1]),
                 _credit(c.in_flight(0), c.buf_alloc[0]), c.proto or "", verdict)
        keys = (c.id, c.device, c.client, c.server, c.server, c.type_name, c.state, age, c.bytes[0], c.bytes[1],
                rate, c.in_flight(1), c.in_flight(0), c.proto or "", verdict)
        return Row(cells, keys, c.id, style)

    def _from_snapshot(self, snap: dict[str, Any]) -> list[Row]:
        store = self.tui.store
        by_ends: dict[tuple[str, int, int, int], int] = {}
        with store.lock:
            for c in store.conns.values():
                for g_end, p_end in ((c.client, c.server), (c.server, c.client)):
                    by_ends[(c.device, g_end[1], p_end[0], p_end[1])] = c.id
        now = time.monotonic()
        rows = []
        for n, c in enumerate(snap.get("connections", []), 1):
            cr = c.get("credit", {})
            total = int(c["to_peer_bytes"]) + int(c["to_guest_bytes"])
            key = (str(c["device"]), int(c["guest_port"]), int(c["peer_cid"]), int(c["peer_port"]))
            prev = self._prev_bytes.get(n)
            rate = (total - prev[0]) / (now - prev[1]) if prev and now > prev[1] else 0.0
            self._prev_bytes[n] = (total, now)
            mine = store.conns.get(by_ends.get(key, 0))
            proto = (mine.proto if mine is not None else None) or ""  # from the packets the UI decoded
            real = f"{c['real_cid']}:{c['real_port']}"
            peer = f"{c['peer_cid']}:{c['peer_port']}"
            rules = ", ".join(c.get("rules", []))
            verdict = str(c.get("verdict", "")) + (f" ({rules})" if rules else "")
            cells = (str(n), str(c["device"]), f"{c['guest_cid']}:{c['guest_port']}", peer,
                     real if real != peer else "-", str(c["type"]), str(c["state"]) + (" C" if c.get("in_c") else ""),
                     f"{float(c['age']):.1f}s", human(int(c["to_peer_bytes"])), human(int(c["to_guest_bytes"])),
                     f"{human(rate)}B/s", _credit(int(cr.get("queued", 0)), int(cr.get("buf_alloc", 0))),
                     _credit(int(cr.get("in_flight", 0)), int(cr.get("peer_buf_alloc", 0))), proto, verdict)
            keys = (n, c["device"], c["guest_port"], peer, real, c["type"], c["state"], float(c["age"]),
                    int(c["to_peer_bytes"]), int(c["to_guest_bytes"]), rate, int(cr.get("queued", 0)),
                    int(cr.get("in_flight", 0)), proto, verdict)
            style = _state_style(str(c.get("verdict", "")), str(c["state"]), real != peer)
            rows.append(Row(cells, keys, by_ends.get(key, 0), style))
        return rows

    # -- actions --------------------------------------------------------------------------------------
    def _selected(self) -> int:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row < 0:
            return 0
        return self.rows[min(table.cursor_row, len(self.rows) - 1)].conn

    def action_open(self) -> None:
        cid = self._selected()
        if cid:
            self.tui.show_connection(cid)
        else:
            self.notify("no packets of this connection in the store", severity="warning")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if event.column_index == self.sort_col:
            self.descending = not self.descending
        self.sort_col = event.column_index
        self.refresh_data()

    def action_follow(self) -> None:
        cid = self._selected()
        if cid:
            self.tui.follow(cid)

    def action_sort(self) -> None:
        self.sort_col = (self.sort_col + 1) % len(COLUMNS)
        self.refresh_data()

    def action_reverse(self) -> None:
        self.descending = not self.descending
        self.refresh_data()


def _credit(used: int, size: int) -> str:
    return f"{bar(used, size, 6)} {human(used)}/{human(size)}"


def _state_style(verdict: str, state: str, rewritten: bool) -> str:
    from vsproxy.tui import styles

    if verdict == "denied":
        return styles.DENIED
    if verdict == "refused":
        return styles.REFUSED
    if verdict == "spoofed":
        return styles.SPOOFED
    if state == "reset":
        return styles.RST
    if rewritten:
        return styles.REWRITTEN
    return ""
