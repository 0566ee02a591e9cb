"""The TUI attached to a running vsproxy driven by the simulated guest: over the control socket
(``--attach``) a connection appears, its bytes grow, a denial is flagged with its rule, the
connection closes, and the socket going away is shown with what was received kept; in the same
process (``vsproxy --tui``'s source) the feed's drop count shows when the TUI reads too slowly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from helpers import running, unix_server, wait_for
from textual.widgets import DataTable
from tui_helpers import plist, status_text, sync, until

from vsproxy.app import Proxy
from vsproxy.config import Settings, add_vm
from vsproxy.simguest import SimGuest
from vsproxy.tui import model
from vsproxy.tui.app import TuiApp
from vsproxy.tui.sources import LIVE_SNAPLEN, AttachSource, ProxySource, SourceError


def make_proxy(workdir: str) -> Proxy:
    settings = Settings()
    add_vm(settings, {"name": "A", "guest-cid": 5, "socket": os.path.join(workdir, "a.sock"),
                      "uds-path": os.path.join(workdir, "ha"), "allow-out": "2"}, "A")
    add_vm(settings, {"name": "B", "guest-cid": 6, "socket": os.path.join(workdir, "b.sock")}, "B")
    p = Proxy(settings.devices, settings.policy())
    p.start_control(os.path.join(workdir, "ctl.sock"))
    return p


@pytest.fixture
def proxy(workdir: str) -> Iterator[Proxy]:
    with running(make_proxy(workdir)) as p:
        yield p


def cells(app: TuiApp) -> list[list[str]]:
    table = app.screen.query_one(DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


@sync
async def test_attached_a_connection_appears_grows_a_denial_is_flagged_and_it_closes(workdir: str) -> None:
    srv = unix_server(os.path.join(workdir, "ha_5000"))  # an echo service
    stack = contextlib.ExitStack()
    stack.enter_context(running(make_proxy(workdir)))
    src = AttachSource(os.path.join(workdir, "ctl.sock"), limit=10_000, every=0.1)
    src.start()
    app = TuiApp(src)
    try:
        async with app.run_test(size=(180, 30)) as pilot:
            await pilot.press("2")
            with SimGuest(os.path.join(workdir, "a.sock")) as g:
                s = g.connect(5000)
                s.sendall(b"x" * 1000)
                assert s.recv_exactly(1000, timeout=10) == b"x" * 1000
                await until(pilot, lambda: any(r[6].startswith("established") and r[8] == "1.0K"
                                               for r in cells(app)), what="the connection, 1000 bytes")
                s.sendall(b"y" * 5000)
                assert s.recv_exactly(5000, timeout=10) == b"y" * 5000
                await until(pilot, lambda: any(r[8] == "6.0K" for r in cells(app)), what="its bytes grow")
                with pytest.raises(ConnectionResetError):
                    g.connect(7000, cid=6)  # B is not in A's allow-out
                await until(pilot, lambda: any(src.store.flags(i) & model.DENIED
                                               for i in range(src.store.first, src.store.total)),
                            what="the denied packet")
                denied = next(i for i in range(src.store.first, src.store.total)
                              if src.store.flags(i) & model.DENIED)
                assert "denied by" in src.store.line(denied) and "allow" in src.store.line(denied)
                await until(pilot, lambda: any(e.get("event") == "denied" and e.get("rule")
                                               for e in list(src.events)), what="the denied event")
                await pilot.press("3")  # devices, from the snapshot: CID, socket, state, allowlist, rules
                await until(pilot, lambda: any(str(w.render()).startswith("A  CID 5")
                                               for w in app.screen.query(".device")), what="device A")
                texts = [str(w.render()) for w in app.screen.query(".device")]
                a = next(t for t in texts if t.startswith("A  CID 5"))
                assert "a.sock" in a and "running" in a and "allow" in a
                rules = next(t for t in texts if t.startswith("rules"))
                assert "denials 1" in rules
                await pilot.press("2")
                s.close()
                await until(pilot, lambda: not any(r[3] == "2:5000" for r in cells(app)), what="the close")
            # the capture's view of the same connection: closed (its last packets may come a
            # feed turn after the snapshot that no longer lists it), and the denial with its rule
            await until(pilot, lambda: any(c.server == (2, 5000) and c.state in ("closed", "reset")
                                           for c in list(src.store.conns.values())), what="the close packets")
            conns = list(src.store.conns.values())
            assert any(c.verdict == "denied" and "allow" in c.rule for c in conns)
            held = src.store.total
            await pilot.press("1")
            await until(pilot, lambda: plist(app).count == held, what="the packets listed")
            stack.close()  # vsproxy stops: the control socket goes away mid-session
            await until(pilot, lambda: "control socket" in status_text(app), what="the loss shown")
            assert src.store.total == held and plist(app).count == held  # what was received is kept
    finally:
        stack.close()
        src.close()
        srv.close()


def test_attaching_to_a_missing_socket_is_one_line(workdir: str) -> None:
    with pytest.raises(SourceError, match="no such socket"):
        AttachSource(os.path.join(workdir, "nothing.sock")).start()


@sync
async def test_in_process_the_feed_drop_count_shows_when_the_tui_is_too_slow(proxy: Proxy, workdir: str) -> None:
    srv = unix_server(os.path.join(workdir, "ha_5000"))
    src = ProxySource(proxy, limit=1000, every=0.1, maxbytes=4096)  # a tiny queue, not read yet
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000)
            for _ in range(40):
                s.sendall(b"z" * 1000)
                assert s.recv_exactly(1000, timeout=10) == b"z" * 1000
            s.close()
        wait_for(lambda: src.sub.dropped > 0, 10, "drops in the tiny queue")
        src.start()
        app = TuiApp(src)
        async with app.run_test(size=(140, 24)) as pilot:
            await until(pilot, lambda: "feed drops" in status_text(app), what="the drop count")
            assert f"feed drops {src.sub.dropped:,}" in status_text(app)
            with SimGuest(os.path.join(workdir, "a.sock")) as g:  # the TUI reads now: packets arrive
                s = g.connect(5000)
                s.sendall(b"late")
                assert s.recv_exactly(4, timeout=10) == b"late"
                await until(pilot, lambda: any("RW" in src.store.line(i) for i in range(src.store.total)),
                            what="the packets read in time")
                s.close()
    finally:
        src.close()
        srv.close()


@sync
@pytest.mark.parametrize("snaplen", [LIVE_SNAPLEN, 0], ids=["default", "all"])
async def test_attached_the_tui_asks_for_each_packets_first_bytes_and_says_so(workdir: str, snaplen: int) -> None:
    from vsproxy.tui.app import build_parser, open_source

    srv = unix_server(os.path.join(workdir, "ha_5000"))
    stack = contextlib.ExitStack()
    p = stack.enter_context(running(make_proxy(workdir)))
    argv = ["--attach", os.path.join(workdir, "ctl.sock")] + ([] if snaplen == LIVE_SNAPLEN else ["--snaplen", "0"])
    src = open_source(build_parser().parse_args(argv))
    src.start()
    app = TuiApp(src)
    data = os.urandom(20_000)
    try:
        async with app.run_test(size=(180, 30)) as pilot:
            await until(pilot, lambda: p.capture_hub is not None and p.capture_hub.live == 1, what="subscribed")
            hub = p.capture_hub
            assert hub is not None and hub.snaplen == snaplen  # what the data path copies for the UI
            with SimGuest(os.path.join(workdir, "a.sock"), rx_buf_size=65580) as g:
                s = g.connect(5000)
                s.sendall(data)
                assert s.recv_exactly(len(data), timeout=10) == data
                s.close()
            store = src.store
            await until(pilot, lambda: any("RW" in store.line(i) for i in range(store.first, store.total)),
                        what="the data packets")
            rw = [i for i in range(store.first, store.total) if "RW" in store.line(i)]
            views = [store.view(i) for i in rw]
            assert all(v is not None and v.hdr is not None for v in views)
            big = [v for v in views if v is not None and v.hdr is not None and v.hdr.len > 4096]
            assert big  # the guest's 20,000 bytes crossed in packets larger than the snaplen
            if snaplen:
                assert all(len(v.payload) == LIVE_SNAPLEN for v in big)
                assert "snaplen 4,096" in status_text(app)
            else:
                assert all(v.hdr is not None and len(v.payload) == v.hdr.len for v in big)
                assert "snaplen" not in status_text(app)
    finally:
        src.close()
        stack.close()
        srv.close()


def test_a_bad_snaplen_is_a_usage_error() -> None:
    from vsproxy.tui.app import build_parser

    for bad in ("-1", "lots", str(1 << 30)):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--attach", "x", "--snaplen", bad])
