"""``vsproxy replay client|guest ...``: the replay commands (``vsproxy replay KIND --help``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = ("usage: vsproxy replay client FILE --to uds:PATH|tcp:HOST:PORT|auto [options]\n"
         "       vsproxy replay guest FILE --socket PATH [--guest-cid N] [options]\n"
         "       vsproxy replay show FILE [--filter EXPR] [--data]\n"
         "Server replay is part of vsproxy itself: --replay-server FILE or --service CID:PORT=replay:FILE.")


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "client":
        from vsproxy.replay.clientcmd import main as client_main

        return client_main(argv[1:])
    if argv and argv[0] == "guest":
        from vsproxy.replay.guestcmd import main as guest_main

        return guest_main(argv[1:])
    if argv and argv[0] == "show":
        from vsproxy.replay.showcmd import main as show_main

        return show_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    return 2
