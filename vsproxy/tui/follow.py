"""A connection's stream as the follow screen draws it, sans-I/O: chunks in, styled text out.
Directions take the packet list's colours; SEQPACKET message ends (EOM) and record ends (EOR)
are marked; the application messages that end in a packet follow its bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.text import Text

from dissectors.streams import FollowChunk
from vsproxy.capture.view import PacketView
from vsproxy.read import escaped, hexdump
from vsproxy.tui import styles
from vsproxy.vsock import header as H

MAX_CHUNK_BYTES = 64 * 1024  # a chunk's bytes drawn at most (the rest is counted)


def render(chunks: Sequence[tuple[int, FollowChunk, PacketView]], apps: Callable[[int], tuple[str, ...]],
           as_hex: bool, title: str) -> Text:
    out = Text(no_wrap=False)
    out.append(f"=== {title} ===\n", style="bold")
    if not chunks:
        out.append("(no payload in this connection)\n", style="italic")
        return out
    for index, chunk, view in chunks:
        style = styles.direction_style(chunk.from_guest, chunk.from_client)
        arrow = ">>>" if chunk.from_client else "<<<"
        if chunk.from_guest is None:
            who = "client -> server" if chunk.from_client else "server -> client"
        else:
            who = "guest -> host" if chunk.from_guest else "host -> guest"
        marks = ""
        if chunk.conn.sock_type == int(H.Type.SEQPACKET):
            flags = view.hdr.flags if view.hdr is not None else 0
            marks = (" [EOM]" if chunk.eom else "") + (" [EOR]" if flags & H.SEQ_EOR else "")
        n = len(chunk.data)
        out.append(f"{arrow} #{index + 1} {who} {n} byte{'' if n == 1 else 's'}{marks}\n", style=f"bold {style}")
        data = chunk.data[:MAX_CHUNK_BYTES]
        if data:
            body = "\n".join(hexdump(data)) + "\n" if as_hex else escaped(data)
            out.append(body, style=style)
        if n > len(data):
            out.append(f"... {n - len(data)} more bytes\n", style="italic")
        for summary in apps(index):
            out.append(f"    ⮑ {summary}\n", style=f"italic {style}")
        if chunk.conn.sock_type == int(H.Type.SEQPACKET) and chunk.eom:
            out.append("─" * 20 + " message end\n", style="dim")
    return out
