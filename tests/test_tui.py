"""The terminal UI driven by Textual's Pilot against the captures in captures/: the packet list,
its detail tree and hex pane, the filter bar (caret errors, history, completion), follow,
connections, devices, help, marks, save (checked with tshark), pause and quit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from textual.widgets import DataTable, Input, RadioButton
from tui_helpers import CAPTURES, ROOT, expected, file_app, plist, static_text, status_text, sync, until

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import records
from vsproxy.tui.app import TuiApp
from vsproxy.tui.model import TROUBLE_FILTER, FilterRun
from vsproxy.tui.screens.help import binding_rows, help_text
from vsproxy.tui.sources import FileSource
from vsproxy.tui.widgets.detail import DetailTree, HexPane
from vsproxy.tui.widgets.filterbar import FilterBar, complete
from vsproxy.vsock import header as H

HTTP = "http-over-vsock.pcapng"


def saved_to(app: TuiApp, path: str) -> Callable[[], bool]:
    return lambda: os.path.exists(path) and app.current_mode == "packets"


@sync
async def test_selecting_a_packet_fills_the_tree_and_the_hex_pane_and_a_field_highlights_its_bytes() -> None:
    app = file_app(HTTP)
    async with app.run_test(size=(160, 45)) as pilot:
        pl = plist(app)
        assert pl.count == 9 and pl.tail  # opened at the end, following
        pl.move_to(2)  # packet 3: the guest's GET
        tree = app.screen.query_one(DetailTree)
        await until(pilot, lambda: "GET /v1/keys" in str(tree.root.label) or any(
            "HTTP GET" in str(n.label) for n in tree.root.children), what="detail of packet 3")
        labels = [str(n.label) for n in tree.root.children]
        assert labels[0] == "frame" and labels[1].startswith("vsockmon") and labels[2].startswith("virtio-vsock")
        assert any(lbl.startswith("HTTP GET /v1/keys") for lbl in labels)
        hexp = app.screen.query_one(HexPane)
        with open(CAPTURES / HTTP, "rb") as f:
            frame = list(records(f))[2].frame
        assert hexp.frame == frame
        virtio = tree.root.children[2]
        op = next(n for n in virtio.children if str(n.label).startswith("op "))
        tree.focus()
        tree.move_cursor(op)
        await until(pilot, lambda: (hexp.start, hexp.end) == (32 + 30, 32 + 32), what="op's bytes highlighted")
        assert "0000  " in str(hexp.render())


@sync
async def test_a_bad_filter_shows_the_caret_under_the_bad_token_and_enter_does_not_apply_it() -> None:
    app = file_app(HTTP)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("slash")
        await pilot.press(*"op == rw and bogus == 1")
        bar = app.screen.query_one(FilterBar)
        await until(pilot, lambda: bar.error is not None, what="the error")
        shown = static_text(app, "#filter-error").split("\n")
        assert "bogus" in shown[0]
        assert shown[1] == "op == rw and bogus == 1"
        assert shown[2] == " " * len("op == rw and ") + "^" * len("bogus")
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.selection is None and plist(app).count == 9


@sync
async def test_a_filter_applies_as_vsproxy_read_would_and_goes_into_the_history() -> None:
    app = file_app(HTTP)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("slash", *"proto == http and op == rw", "enter")
        await until(pilot, lambda: app.selection is not None, what="the filter")
        assert list(app.selection or []) == expected(HTTP, "proto == http and op == rw") == [2, 4]
        await until(pilot, lambda: plist(app).count == 2, what="the list to show 2")
        assert "filter: proto == http and op == rw" in status_text(app)
        await pilot.press("slash")
        inp = app.screen.query_one("#filter-input", Input)
        inp.value = ""
        await pilot.press("up")
        assert inp.value == "proto == http and op == rw"
        inp.value = ""
        await pilot.press("enter")  # empty: every packet again
        await until(pilot, lambda: plist(app).count == 9, what="every packet")


@sync
async def test_field_names_complete_in_the_filter_bar() -> None:
    assert complete("dst.po") == "dst.port"
    assert complete("op == rw and verd") == "op == rw and verdict"
    assert complete("op == rw ") is None
    app = file_app(HTTP)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("slash", *"buf_")
        await pilot.pause(0.2)
        await pilot.press("right")  # accept the suggestion
        inp = app.screen.query_one("#filter-input", Input)
        assert inp.value == "buf_alloc"


@sync
async def test_the_trouble_key_shows_only_denied_spoofed_and_reset_packets() -> None:
    app = file_app("sibling-denied.pcapng")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("exclamation_mark")
        await until(pilot, lambda: app.selection is not None, what="the trouble filter")
        want = expected("sibling-denied.pcapng", TROUBLE_FILTER)
        # the denied REQUEST and vsproxy's RST, then whatever resets the closes end in
        assert list(app.selection or []) == want and want[:2] == [0, 1] and len(want) < 20


@sync
async def test_follow_shows_both_directions_of_the_http_exchange_and_toggles_hex() -> None:
    app = file_app(HTTP)
    async with app.run_test(size=(100, 40)) as pilot:
        plist(app).move_to(2)
        await pilot.press("f")
        await until(pilot, lambda: app.current_mode == "follow", what="the follow screen")
        text = static_text(app, "#stream")
        assert "GET /v1/keys HTTP/1.1" in text and "HTTP/1.1 200 OK" in text
        assert ">>> #3 guest -> host 91 bytes" in text and "<<< #5 host -> guest 194 bytes" in text
        assert "⮑ HTTP GET /v1/keys" in text and "⮑ HTTP 200 OK" in text
        await pilot.press("x")
        hexed = static_text(app, "#stream")
        assert "47 45 54 20 2f 76 31 2f" in hexed  # "GET /v1/"
        await pilot.press("g")  # its packets
        await until(pilot, lambda: app.current_mode == "packets" and plist(app).count == 9, what="its packets")
        assert app.selection_label == "connection #1"


@sync
async def test_seqpacket_follow_marks_message_ends_and_record_ends() -> None:
    app = file_app("seqpacket.pcapng")
    async with app.run_test(size=(100, 40)) as pilot:
        plist(app).move_to(2)
        await pilot.press("f")
        await until(pilot, lambda: app.current_mode == "follow", what="the follow screen")
        text = static_text(app, "#stream")
        assert "[EOM] [EOR]" in text  # the guest's messages carry both marks
        assert text.count("message end") >= 6


@sync
async def test_connections_are_listed_sorted_and_enter_opens_their_packets() -> None:
    app = file_app("sibling-denied.pcapng")
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.press("2")
        await until(pilot, lambda: app.current_mode == "connections", what="connections")
        table = app.screen.query_one(DataTable)
        assert table.row_count == 3
        first = [str(c) for c in table.get_row_at(0)]
        assert first[0] == "1" and first[6] == "denied" and "not in app's outbound allowlist" in first[-1]
        await pilot.press("r")  # reverse: the newest first
        assert str(table.get_row_at(0)[0]) == "3"
        await pilot.press("s")  # by device
        assert [str(table.get_row_at(i)[1]) for i in range(3)] == ["vault", "app", "app"]
        table.move_cursor(row=0)
        await pilot.press("enter")
        await until(pilot, lambda: app.current_mode == "packets", what="the packets")
        conn3 = app.store.conn_packets(3)
        assert list(app.selection or []) == conn3 and len(conn3) == 9
        await until(pilot, lambda: plist(app).count == 9, what="the list")


@sync
async def test_devices_from_the_capture_with_their_cids_and_counts() -> None:
    app = file_app("sibling-denied.pcapng")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        await until(pilot, lambda: app.current_mode == "devices", what="devices")
        await pilot.pause(0.2)
        texts = [str(w.render()) for w in app.screen.query(".device")]
        app_dev = next(t for t in texts if t.startswith("app"))
        assert "guest CID 5" in app_dev and "denied 1" in app_dev and "11 packets" in app_dev
        assert any(t.startswith("vault") for t in texts)


@sync
async def test_help_lists_every_binding_and_what_each_colour_means() -> None:
    text = help_text()
    for where, key, what in binding_rows():
        assert what in text and key in text, (where, key)
    for needed in ("denied by a rule", "spoofed", "RST", "rewritten", "feed drops", "marked", "from the guest"):
        assert needed in text
    app = file_app(HTTP)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: app.current_mode == "help", what="help")
        assert "Filter fields" in static_text(app, "#help")
        await pilot.press("1")
        assert app.current_mode == "packets"


@sync
async def test_marks_and_save_write_pcapngs_tshark_reads_with_the_same_packets(tmp_path: object) -> None:
    out_marked = os.path.join(str(tmp_path), "marked.pcapng")
    out_all = os.path.join(str(tmp_path), "all.pcapng")
    out_filtered = os.path.join(str(tmp_path), "filtered.pcapng")
    app = file_app(HTTP)
    async with app.run_test(size=(100, 30)) as pilot:
        plist(app).move_to(2)
        await pilot.press("m")  # marks packet 3, moves to 4
        plist(app).move_to(4)
        await pilot.press("m")
        assert app.store.marked() == [2, 4] and "2 marked" in status_text(app)
        await pilot.press("slash", *"op == rw", "enter")  # the filtered: the two RW packets, 3 and 5
        await until(pilot, lambda: app.selection is not None, what="the filter")
        for which, path in (("marked", out_marked), ("all", out_all), ("filtered", out_filtered)):
            await pilot.press("w")
            await until(pilot, lambda: app.screen.query("#path").first() is not None, what="the save dialog")
            app.screen.query_one(f"#{which}", RadioButton).value = True
            inp = app.screen.query_one("#path", Input)
            inp.value = path
            await pilot.press("enter")
            await until(pilot, saved_to(app, path), what="saved")
    with open(CAPTURES / HTTP, "rb") as f:
        original = list(records(f))
    for path, idx in ((out_marked, [2, 4]), (out_all, list(range(9))), (out_filtered, [2, 4])):
        with open(path, "rb") as f:
            saved = list(records(f))
        assert saved == [original[i] for i in idx]
        t = subprocess.run(["tshark", "-r", path, "-T", "fields", "-e", "frame.len", "-e", "frame.comment"],
                           capture_output=True, text=True, timeout=60)
        assert t.returncode == 0, t.stderr
        assert [int(line.split("\t")[0]) for line in t.stdout.splitlines()] == [len(original[i].frame) for i in idx]


@sync
async def test_pause_freezes_the_list_and_quit_ends_the_app() -> None:
    app = file_app(HTTP)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("p")
        assert app.paused and "PAUSED" in status_text(app)
        await pilot.press("p")
        assert not app.paused
        await pilot.press("q")
        await pilot.pause(0.1)
    assert app.return_code == 0


@pytest.mark.parametrize("screen", ["1", "2", "3", "4", "question_mark"])
@sync
async def test_every_screen_draws_at_80x24(screen: str) -> None:
    app = file_app("sibling-denied.pcapng")
    async with app.run_test(size=(80, 24)) as pilot:
        plist(app).move_to(0)
        await pilot.press("f" if screen == "4" else screen)
        await pilot.pause(0.2)
        assert app.screen.size == (80, 24)
        svg = app.export_screenshot()
        assert "vsproxy" in svg or "Packets" in svg


def test_a_missing_file_is_one_line_and_exit_2() -> None:
    p = subprocess.run([sys.executable, "-m", "vsproxy", "tui", "/nonexistent/x.pcapng"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "vsproxy tui: /nonexistent/x.pcapng: no such file (nor a rotated set /nonexistent/x.pcapng.0, "
        "/nonexistent/x.pcapng.1, ...)"]
    p = subprocess.run([sys.executable, "-m", "vsproxy", "tui"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "give a capture FILE" in p.stderr


@sync
async def test_the_user_picks_the_packet_list_columns_and_can_go_back_to_the_read_line() -> None:
    app = file_app(HTTP)
    async with app.run_test(size=(140, 30)) as pilot:
        pl = plist(app)
        assert pl._row(2)[0].endswith("fwd_cnt=0  #1 HTTP GET /v1/keys")  # vsproxy read's line
        await pilot.press("c")
        await until(pilot, lambda: app.screen.query("#column-list").first() is not None, what="the column picker")
        await pilot.press("enter")  # the default set
        await until(pilot, lambda: app.columns is not None, what="the columns")
        head = static_text(app, "#columns-header")
        assert head.startswith("Time") and "Destination" in head and head.endswith("Application")
        row = plist(app)._row(2)[0]
        assert "10:44:00.612767 app" in row and "2:8080" in row and "#1" in row and row.endswith("HTTP GET /v1/keys")
        assert "buf_alloc" not in row
        await pilot.press("c")
        await until(pilot, lambda: app.screen.query("#column-list").first() is not None, what="the column picker")
        await pilot.press("r")
        await until(pilot, lambda: app.columns is None, what="the read line again")
        assert plist(app)._row(2)[0].endswith("#1 HTTP GET /v1/keys")


def big_capture(path: str, packets: int) -> None:
    with open(path, "wb") as f:
        f.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
        for i in range(packets):
            op = (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RW, H.Op.SHUTDOWN, H.Op.RST)[i % 5]
            payload = b"x" * 10 if op == H.Op.RW else b""
            hdr = H.pack(5, 2, 1024 + i // 5, 8000, len(payload), 1, op, 3 if op == H.Op.SHUTDOWN else 0, 262144, 0)
            f.write(fmt.pcapng_epb(0, 1e9 + i / 1000, fmt.vsockmon_frame(hdr, payload), inbound=i % 2 == 0))


@sync
async def test_a_filter_reports_progress_and_escape_cancels_it(workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(workdir, "big.pcapng")
    big_capture(path, 5000)
    monkeypatch.setattr(FilterRun, "STEP", 1)  # one packet a step: slow enough to cancel half-way
    src = FileSource([path])
    app = TuiApp(src)
    async with app.run_test(size=(120, 30)) as pilot:
        await until(pilot, lambda: src.done and plist(app).count == 5000, what="the capture")
        await pilot.press("slash", *"op == rw and payload contains \"x\"", "enter")
        await until(pilot, lambda: "filtering" in status_text(app) and app.filter_progress > 0, what="progress")
        await pilot.press("escape")
        await until(pilot, lambda: "filter cancelled" in status_text(app), what="the cancel")
        assert app.selection is None and app.filtering is None and plist(app).count == 5000
        monkeypatch.setattr(FilterRun, "STEP", 20_000)
        await pilot.press("slash", "enter")  # the same filter again, to its end
        await until(pilot, lambda: app.selection is not None, what="the filter done")
        assert len(app.selection or []) == 1000


@sync
async def test_the_remaining_bindings_move_focus_the_list_and_the_dialogs(workdir: str) -> None:
    path = os.path.join(workdir, "big.pcapng")
    big_capture(path, 500)
    app = TuiApp(FileSource([path]))
    async with app.run_test(size=(120, 30)) as pilot:
        await until(pilot, lambda: app.source.done and plist(app).count == 500, what="the capture")
        pl = plist(app)
        await pilot.press("home")
        assert pl.cursor == 0 and not pl.tail
        await pilot.press("down", "down", "up")
        assert pl.cursor == 1
        await pilot.press("pagedown")
        page = pl.cursor
        assert page > 5
        await pilot.press("pageup")
        assert pl.cursor == 1
        await pilot.press("end")
        assert pl.cursor == 499 and pl.tail
        await pilot.press("home", "t")
        assert pl.cursor == 499 and pl.tail
        pl.move_to(7)  # packet 8: the RW of connection #2, whose first packet is 6
        await pilot.press("g")
        assert pl.current == 5
        await pilot.press("enter")
        assert app.focused is app.screen.query_one(DetailTree)
        await pilot.press("tab")
        assert app.focused is not app.screen.query_one(DetailTree)
        await pilot.press("escape")  # back to the list
        assert app.focused is pl
        await pilot.press("w")
        await until(pilot, lambda: app.screen.query("#path").first() is not None, what="the save dialog")
        await pilot.press("escape")
        await until(pilot, lambda: app.current_mode == "packets" and app.screen.query("#packets").first() is not None,
                    what="the dialog gone")
        await pilot.press("c")
        await until(pilot, lambda: app.screen.query("#column-list").first() is not None, what="the column picker")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen.query("#packets").first() is not None, what="the picker gone")
        assert app.columns is None
        await pilot.press("4")
        assert app.current_mode == "follow"
        await pilot.press("5")
        assert app.current_mode == "help"
        await pilot.press("2")
        table = app.screen.query_one(DataTable)
        await until(pilot, lambda: table.row_count == 100, what="100 connections")
        table.move_cursor(row=1)
        await pilot.press("f")  # follow connection #2 from the connections screen
        await until(pilot, lambda: app.current_mode == "follow" and app.follow_conn == 2, what="follow #2")
        assert ">>> #8 host -> guest 10 bytes\nxxxxxxxxxx" in static_text(app, "#stream")  # odd packets: to the guest
        await pilot.press("F")  # filter this stream out of the packet list
        await until(pilot, lambda: app.current_mode == "packets", what="the packets")
        assert app.selection is not None and len(app.selection) == 495 and 7 not in app.selection
        assert app.selection_label == "without connection #2"


@sync
async def test_the_filter_applies_to_the_connections_too() -> None:
    app = file_app("sibling-denied.pcapng")
    async with app.run_test(size=(160, 30)) as pilot:
        await pilot.press("slash", *"port == 5001", "enter")
        await until(pilot, lambda: app.selection is not None, what="the filter")
        await pilot.press("2")
        await until(pilot, lambda: app.current_mode == "connections", what="connections")
        table = app.screen.query_one(DataTable)
        assert sorted(str(table.get_row_at(i)[0]) for i in range(table.row_count)) == ["2", "3"]
