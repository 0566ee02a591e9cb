"""Colours that carry meaning, in one place: the packet list, the follow view, the connections
screen and the help screen's legend all read them here, so they cannot drift apart."""

from __future__ import annotations

from typing import Final

from vsproxy.tui import model

# Directions: the same two colours in the packet list and the follow view. When the capture
# does not say (classic pcap), the client (the side that connected) takes the guest's colour.
FROM_GUEST: Final = "green"
TO_GUEST: Final = "dodger_blue1"

DENIED: Final = "bold white on dark_red"
SPOOFED: Final = "bold white on dark_magenta"
REFUSED: Final = "bold white on red3"
RST: Final = "bold yellow"
REWRITTEN: Final = "bold cyan"
BAD: Final = "bold white on grey37"
MARK: Final = "bold black on gold1"
DROPS: Final = "bold white on red"  # feed/capture drops in the status bar
CURSOR: Final = "reverse"

# (flag, style, what it means): the order is the priority when several apply.
MEANINGS: Final = (
    (model.BAD, BAD, "bad frame: shorter than af_vsockmon_hdr, not decoded"),
    (model.DENIED, DENIED, "denied by a rule (the comment names it); vsproxy answered RST"),
    (model.SPOOFED, SPOOFED, "spoofed: the guest used a CID not its own; dropped"),
    (model.REFUSED, REFUSED, "refused by a limit (max-connections, max-pending); vsproxy answered RST"),
    (model.RST, RST, "RST: a connection reset"),
    (model.REWRITTEN, REWRITTEN, "rewritten: a remap sent it to another real peer"),
)


def row_style(flags: int, from_guest: bool | None) -> str:
    """The style of a packet row: its meaning if it has one, else its direction's colour."""
    for flag, style, _ in MEANINGS:
        if flags & flag:
            return style
    if from_guest is None:
        return ""
    return FROM_GUEST if from_guest else TO_GUEST


def direction_style(from_guest: bool | None, from_client: bool) -> str:
    if from_guest is None:
        return FROM_GUEST if from_client else TO_GUEST
    return FROM_GUEST if from_guest else TO_GUEST
