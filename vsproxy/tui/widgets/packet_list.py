"""The packet list: a virtual list over the store. It holds no row objects: ``render_line`` asks
the store for the line of the packet at that row when the row is drawn (a small cache keeps the
rows on screen), so a million packets cost what the store's arrays cost.

Rows are either every packet held (``indices`` None: rows ``first .. first+count``) or a
selection (``indices``: the absolute numbers a filter matched, or one connection's packets).
Tail mode follows new packets until the user moves up; End (or ``t``) turns it on again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from vsproxy.tui import model, styles
from vsproxy.tui.columns import cells
from vsproxy.tui.model import Store

_CACHE = 512  # rows' text kept: a few screens' worth


class PacketList(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "home", "First", show=False),
        Binding("end,t", "end", "Last (tail)", show=False),
    ]
    DEFAULT_CSS = """
    PacketList { height: 1fr; }
    """

    class Highlighted(Message):
        """The cursor is on packet ``index`` (absolute), or on nothing (-1)."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def __init__(self, store: Store, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self.indices: Sequence[int] | None = None
        self.base = store.first  # first absolute index (all-packets mode)
        self.count = 0
        self.cursor = 0
        self.tail = True
        self._cache: OrderedDict[int, tuple[str, str]] = OrderedDict()
        self._width = 80
        self._last_posted = -2
        self.columns: tuple[str, ...] | None = None  # None: vsproxy read's one line

    # -- what the list shows ------------------------------------------------------------------
    def index_at(self, row: int) -> int:
        if self.indices is not None:
            return int(self.indices[row])
        return self.base + row

    def row_of(self, index: int) -> int | None:
        """The row showing absolute ``index``, if shown."""
        if self.indices is None:
            row = index - self.base
            return row if 0 <= row < self.count else None
        idx = self.indices
        lo, hi = 0, len(idx)
        while lo < hi:  # the selection is in capture order: bisect it
            mid = (lo + hi) // 2
            if idx[mid] < index:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(idx) and idx[lo] == index else None

    def show(self, indices: Sequence[int] | None, count: int | None = None) -> None:
        """Show every packet (None) or these; ``count``: how many of them (all: the store's)."""
        keep = self.current
        self.indices = indices
        self._cache.clear()
        self.sync(count)
        if keep >= 0 and not self.tail:
            row = self.row_of(keep)
            if row is not None:
                self.move_to(row)

    def sync(self, count: int | None = None) -> None:
        """The store or the selection grew (or the ring moved on): resize, follow in tail mode."""
        store = self.store
        with store.lock:
            if self.indices is None:
                if self.base != store.first:
                    self.cursor = max(0, self.cursor - (store.first - self.base))
                    self._cache.clear()
                    self.base = store.first
                self.count = len(store) if count is None else count
            else:
                self.count = len(self.indices) if count is None else count
        self.virtual_size = Size(max(self._width, 200), self.count)
        if self.tail and self.count:
            self.cursor = self.count - 1
            self._scroll_tail()
            self.call_after_refresh(self._scroll_tail)  # again once the new size is laid out
        self.cursor = min(self.cursor, max(0, self.count - 1))
        self._post()
        self.refresh()

    def _scroll_tail(self) -> None:
        if self.tail:
            self.scroll_to(y=max(0, self.count - self.scrollable_content_region.height), animate=False)

    @property
    def current(self) -> int:
        """The absolute index under the cursor, -1 when the list is empty."""
        if not self.count:
            return -1
        try:
            return self.index_at(self.cursor)
        except IndexError:
            return -1

    def move_to(self, row: int) -> None:
        if not self.count:
            return
        old = self.cursor
        self.cursor = max(0, min(self.count - 1, row))
        self.tail = False
        top = int(self.scroll_y)
        h = max(1, self.scrollable_content_region.height)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + h:
            self.scroll_to(y=self.cursor - h + 1, animate=False)
        else:  # no scrolling: only the two rows the cursor left and reached are drawn again (a key
            # moving the cursor costs two lines, not a screenful, while a live feed keeps the CPU busy)
            self._post()
            self.refresh_line(old)
            self.refresh_line(self.cursor)
            return
        self._post()
        self.refresh()

    def _post(self) -> None:
        cur = self.current
        if cur != self._last_posted:
            self._last_posted = cur
            self.post_message(self.Highlighted(cur))

    def set_columns(self, columns: tuple[str, ...] | None) -> None:
        self.columns = columns
        self._cache.clear()
        self.refresh()

    def forget(self, index: int) -> None:
        """Packet ``index`` changed (a mark): draw it again."""
        self._cache.pop(index, None)
        self.refresh()

    # -- keys and mouse ----------------------------------------------------------------------
    def action_cursor(self, delta: int) -> None:
        self.move_to(self.cursor + delta)

    def action_page(self, delta: int) -> None:
        self.move_to(self.cursor + delta * max(1, self.size.height - 1))

    def action_home(self) -> None:
        self.move_to(0)

    def action_end(self) -> None:
        self.move_to(self.count - 1)
        self.tail = True

    def on_click(self, event: events.Click) -> None:
        self.focus()
        self.move_to(int(self.scroll_y) + event.y)

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self.tail = False

    # -- drawing -------------------------------------------------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        self._width = event.size.width
        self.virtual_size = Size(max(self._width, 200), self.count)
        self.call_after_refresh(self._scroll_tail)

    def _row(self, index: int) -> tuple[str, str]:
        got = self._cache.get(index)
        if got is not None:
            return got
        store = self.store
        try:
            if self.columns is None:
                text = store.line(index)
            else:
                view = store.view(index)
                text = "(bad frame)" if view is None else cells(view, store.conn_of(index), self.columns)
            flags = store.flags(index)
            fg = store.side(index)
        except IndexError:
            return f"{index + 1:>8}  (no longer held: the ring has moved on)", ""
        mark = "*" if flags & model.MARKED else " "
        got = (f"{index + 1:>8}{mark} {text}", styles.row_style(flags, fg))
        self._cache[index] = got
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return got

    def render_line(self, y: int) -> Strip:
        row = int(self.scroll_y) + y
        width = self.size.width
        if row >= self.count:
            return Strip.blank(width)
        try:
            index = self.index_at(row)
        except IndexError:
            return Strip.blank(width)
        text, style_text = self._row(index)
        style = Style.parse(style_text) if style_text else Style()
        if index >= self.store.first and self.store.flags(index) & model.MARKED:
            style = Style.parse(styles.MARK)
        if row == self.cursor:
            style += Style(reverse=True, bold=True)
        x = int(self.scroll_x)
        piece = text[x : x + width]
        return Strip([Segment(piece.ljust(width), style)], width)

