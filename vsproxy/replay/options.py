"""The server-replay flags of ``vsproxy`` (kept here, so the command line only adds one call):
``--replay-server FILE``, ``--replay-match``, ``--replay-ignore-header``, ``--replay-reuse``,
``--replay-unmatched``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vsproxy.config import ConfigError
from vsproxy.policy import Service

if TYPE_CHECKING:
    from vsproxy.app import Proxy

# The replay modules (the decoding pipeline and the dissectors behind them) are imported only when
# a replay flag is given: a vsproxy without them starts as fast as before.


def add_replay_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server replay (answer guests from a capture)")
    g.add_argument("--replay-server", action="append", default=[], metavar="FILE",
                   help="answer every host-side port the guests of the capture FILE dialled from it "
                   "(as --service CID:PORT=replay:FILE for each), and make the connections it shows the host "
                   "making toward a guest (repeatable)")
    g.add_argument("--replay-match", default="exact", metavar="exact|http|prefix:N",
                   help="how a guest message must match the recorded one: the same bytes (default), the same "
                   "HTTP method, target, headers and body, or the same first N bytes")
    g.add_argument("--replay-ignore-header", action="append", default=[], metavar="NAME",
                   help="with --replay-match http: a header whose value may differ (repeatable)")
    g.add_argument("--replay-reuse", action="store_true",
                   help="a recorded connection may answer any number of guest connections (default: once)")
    g.add_argument("--replay-unmatched", choices=("rst", "forward"), default="rst",
                   help="what a connection whose guest message matches nothing gets: RST (default), or handed "
                   "to the host endpoint the configuration would otherwise use, with its bytes so far")


def set_replay_options(args: argparse.Namespace) -> None:
    if not (args.replay_server or args.replay_match != "exact" or args.replay_ignore_header or args.replay_reuse
            or args.replay_unmatched != "rst" or any("=replay" in s for s in args.service)):
        return  # the defaults; a replay rule in a --config file imports the kind with them
    from vsproxy.replay.match import MatchError, Matching
    from vsproxy.replay.service import OPTIONS

    try:
        OPTIONS.matching = Matching.parse(args.replay_match, tuple(args.replay_ignore_header))
    except MatchError as e:
        raise ConfigError(f"--replay-match: {e}") from None
    OPTIONS.reuse = args.replay_reuse
    OPTIONS.unmatched = args.replay_unmatched


def replay_server_rules(path: str) -> list[Service]:
    """A replay rule for every peer the capture's guests dialled (not siblings)."""
    from vsproxy.replay.hosts import host_made
    from vsproxy.replay.server import host_ports
    from vsproxy.replay.service import LIBRARY, ReplayConfigError

    try:
        t = LIBRARY.transcript(path, toward_guest=True)
    except ReplayConfigError as e:
        raise ConfigError(f"--replay-server: {e}") from None
    ports = host_ports(t)
    if not ports and not host_made(t):
        raise ConfigError(f"--replay-server {path}: no connection between a guest and the host")
    return [Service(cid, port, f"replay:{path}") for cid, port in ports]


def start_host_replays(proxy: Proxy, paths: list[str]) -> None:
    """The connections the captures show the host making toward a guest, made again once the
    guest is up (after ``proxy.start()``)."""
    if not paths:
        return
    from vsproxy.replay.hosts import HostReplays, host_made
    from vsproxy.replay.service import LIBRARY

    for path in paths:
        convs = host_made(LIBRARY.transcript(path, toward_guest=True))
        if convs:
            HostReplays(path, convs).attach(proxy)
