"""The packet list's columns, for users who pick their own instead of ``vsproxy read``'s one
line. Sans-I/O: a packet's view in, the cells out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from vsproxy.capture.reader import printable, time_text
from vsproxy.capture.view import PacketView


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    title: str
    width: int  # 0: the rest of the line
    cell: Callable[[PacketView, int], str]  # (the packet, its connection id or 0) -> text


def _hdr(get: Callable[[PacketView], object]) -> Callable[[PacketView, int], str]:
    return lambda v, c: "" if v.hdr is None else str(get(v))


COLUMNS: Final = (
    Column("time", "Time", 15, lambda v, c: time_text(v.time)),
    Column("device", "Device", 8, lambda v, c: printable(v.device)),
    Column("dir", "Dir", 3, lambda v, c: "" if v.from_guest is None else "in" if v.from_guest else "out"),
    Column("src", "Source", 16, _hdr(lambda v: f"{v.hdr.src_cid}:{v.hdr.src_port}" if v.hdr else "")),
    Column("dst", "Destination", 16, _hdr(lambda v: f"{v.hdr.dst_cid}:{v.hdr.dst_port}" if v.hdr else "")),
    Column("type", "Type", 9, lambda v, c: v.type_name),
    Column("op", "Op", 14, lambda v, c: v.op_name),
    Column("flags", "Flags", 6, _hdr(lambda v: f"{v.hdr.flags:#x}" if v.hdr else "")),
    Column("len", "Len", 6, _hdr(lambda v: v.hdr.len if v.hdr else "")),
    Column("buf_alloc", "Buf_alloc", 9, _hdr(lambda v: v.hdr.buf_alloc if v.hdr else "")),
    Column("fwd_cnt", "Fwd_cnt", 9, _hdr(lambda v: v.hdr.fwd_cnt if v.hdr else "")),
    Column("conn", "Conn", 5, lambda v, c: f"#{c}" if c else ""),
    Column("proto", "Proto", 6, lambda v, c: v.proto or ""),
    Column("verdict", "Verdict", 8, lambda v, c: v.verdict),
    Column("app", "Application", 0, lambda v, c: "; ".join(printable(s) for s in v.app)),
    Column("comment", "Comment", 0, lambda v, c: printable(v.comment or "")),
)
BY_NAME: Final = {c.name: c for c in COLUMNS}
DEFAULT: Final = ("time", "device", "src", "dst", "op", "len", "conn", "app")


def cells(view: PacketView, conn: int, names: Sequence[str]) -> str:
    """The picked columns of one packet, padded to their widths, as one line."""
    out = []
    for name in names:
        col = BY_NAME[name]
        text = col.cell(view, conn)
        out.append(text if not col.width else text[: col.width].ljust(col.width))
    return " ".join(out).rstrip()


def header(names: Sequence[str]) -> str:
    return " ".join(BY_NAME[n].title if not BY_NAME[n].width else BY_NAME[n].title.ljust(BY_NAME[n].width)
                    for n in names).rstrip()
