"""The detail of one packet as a tree, from the ``-V`` text of ``vsproxy read`` (one dissection,
printed or drawn), with the bytes of the frame each node stands for, so the hex pane can
highlight them. Sans-I/O: text and a frame in, nodes out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from vsproxy.capture import format as fmt
from vsproxy.vsock import header as H

_INDENT: Final = "    "
# Field sizes in bytes, in the order the scapy layers list them (dissectors/layers.py).
_LAYOUT: Final = {
    "vsockmon": (0, (8, 8, 4, 4, 2, 2, 2, 2)),
    "virtio-vsock": (fmt.VSOCKMON.size, (8, 8, 4, 4, 4, 2, 2, 4, 4, 4)),
}
_HEXROW: Final = re.compile(r"([0-9a-f]{4,8})  ")


@dataclass(slots=True)
class Node:
    label: str
    start: int  # the frame's bytes this node stands for: [start, end)
    end: int
    children: list[Node] = field(default_factory=list)


def build(verbose: str, frame_len: int, payload_len: int) -> Node:
    """The tree of ``verbose`` (``vsproxy.read.verbose_text`` of a packet whose frame is
    ``frame_len`` bytes, ``payload_len`` of them payload)."""
    lines = verbose.rstrip("\n").split("\n")
    root = Node(lines[0] if lines else "", 0, frame_len)
    pay_start = frame_len - payload_len
    section: Node | None = None
    layout: tuple[int, tuple[int, ...]] | None = None
    k = 0
    for line in lines[1:]:
        if not line.strip():
            continue
        if line.startswith(_INDENT * 2):
            if section is None:
                continue
            text = line[len(_INDENT) * 2 :]
            start, end = section.start, section.end
            if layout is not None and k < len(layout[1]):
                start = layout[0] + sum(layout[1][:k])
                end = start + layout[1][k]
                k += 1
            elif section.label.startswith("payload"):
                m = _HEXROW.match(text)
                if m:
                    start = pay_start + int(m.group(1), 16)
                    end = min(frame_len, start + 16)
            section.children.append(Node(text, start, end))
            continue
        label = line[len(_INDENT) :]
        name = label.split(" ", 1)[0]
        k = 0
        layout = None
        if name in _LAYOUT:
            layout = _LAYOUT[name]
            off, sizes = layout
            section = Node(label, off, min(frame_len, off + sum(sizes)))
        elif label == "frame":
            section = Node(label, 0, frame_len)
        else:  # the payload, an application message: the payload's bytes
            section = Node(label, pay_start, frame_len)
        root.children.append(section)
    return root


assert H.HDR_SIZE == sum(_LAYOUT["virtio-vsock"][1])
