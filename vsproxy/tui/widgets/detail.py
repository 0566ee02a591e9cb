"""The detail tree (the ``-V`` dissection) and the hex pane that highlights the selected node's
bytes."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import Static, Tree

from vsproxy.read import hexdump
from vsproxy.tui.detail import Node


class DetailTree(Tree[tuple[int, int]]):
    DEFAULT_CSS = """
    DetailTree { width: 1fr; height: 1fr; }
    """

    class Range(Message):
        """The selected node stands for the frame's bytes [start, end)."""

        def __init__(self, start: int, end: int) -> None:
            super().__init__()
            self.start = start
            self.end = end

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("no packet", id=id)
        self.show_root = True

    def show_packet(self, node: Node | None) -> None:
        self.clear()
        if node is None:
            self.root.set_label("no packet")
            return
        self.root.set_label(Text(node.label))
        self.root.data = (node.start, node.end)
        for sec in node.children:
            branch = self.root.add(Text(sec.label), data=(sec.start, sec.end), expand=True)
            for leaf in sec.children:
                branch.add_leaf(Text(leaf.label), data=(leaf.start, leaf.end))
        self.root.expand()

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[tuple[int, int]]) -> None:
        data = event.node.data
        if data is not None:
            self.post_message(self.Range(*data))


class HexPane(Static):
    """``hexdump -C`` rows of the whole frame; the selected field's bytes in reverse video."""

    DEFAULT_CSS = """
    HexPane { width: 42; height: 1fr; overflow-y: auto; }
    HexPane.-wide { width: 76; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.frame = b""
        self.start = 0
        self.end = 0

    def show_frame(self, frame: bytes, start: int = 0, end: int = 0) -> None:
        self.frame, self.start, self.end = frame, start, end
        self.update(self.text())

    def highlight(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.update(self.text())

    @property
    def per_row(self) -> int:
        """16 bytes a row (``vsproxy read -V``'s rows) when wide, 8 on a narrow terminal."""
        return 16 if self.has_class("-wide") else 8

    def text(self) -> Text:
        out = Text(no_wrap=True)
        per = self.per_row
        rows = hexdump(self.frame, digits=4) if per == 16 else narrow_rows(self.frame)
        hex_width = 48 if per == 16 else 23
        for n, row in enumerate(rows):
            line = Text(row)
            base = n * per
            for k in range(per):
                b = base + k
                if self.start <= b < self.end:
                    col = 6 + 3 * k + (1 if k >= 8 else 0)
                    line.stylize("reverse bold", col, col + 2)
                    line.stylize("reverse bold", 6 + hex_width + 3 + k, 6 + hex_width + 4 + k)
            out.append_text(line)
            out.append("\n")
        return out


def narrow_rows(data: bytes) -> list[str]:
    """``hexdump`` with 8 bytes a row, for terminals as narrow as 80 columns."""
    rows = []
    for off in range(0, len(data), 8):
        row = data[off : off + 8]
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        rows.append(f"{off:04x}  {' '.join(f'{b:02x}' for b in row):<23}  |{text}|")
    return rows
