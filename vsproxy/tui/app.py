"""The TUI application and ``vsproxy tui``'s command line.

The app holds what the screens share: the source and its store, the selection the packet list
shows (every packet, a filter's matches, one connection's packets), the filter history, pause,
and the connection being followed. A timer polls the store (sources fill it from their threads)
and tells the current screen to redraw when something changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from array import array
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from textual import events
from textual.app import App
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.worker import Worker, get_current_worker

from vsproxy.capture.hub import MAX_SNAPLEN
from vsproxy.decode import capture_files
from vsproxy.filter import FilterError
from vsproxy.tui.model import FilterRun, Store, pcapng_bytes
from vsproxy.tui.screens.connections import ConnectionsScreen
from vsproxy.tui.screens.devices import DevicesScreen
from vsproxy.tui.screens.follow import FollowScreen
from vsproxy.tui.screens.help import HelpScreen
from vsproxy.tui.screens.packets import PacketsScreen
from vsproxy.tui.screens.save import SaveScreen
from vsproxy.tui.sources import (
    DEFAULT_STORE,
    LIVE_SNAPLEN,
    AttachSource,
    FileSource,
    ProxySource,
    Source,
    SourceError,
    StreamSource,
)

if TYPE_CHECKING:
    from vsproxy.app import Proxy

PROG: Final = "vsproxy tui"
POLL_S: Final = 0.25
SWITCH_S: Final = 0.001
SPARK_SAMPLES: Final = 60


class TuiApp(App[None]):
    TITLE = "vsproxy"
    MODES = {
        "packets": PacketsScreen,
        "connections": ConnectionsScreen,
        "devices": DevicesScreen,
        "follow": FollowScreen,
        "help": HelpScreen,
    }
    DEFAULT_MODE = "packets"
    BINDINGS = [
        Binding("1", "switch_mode('packets')", "Packets", show=False),
        Binding("2", "switch_mode('connections')", "Conns", show=False),
        Binding("3", "switch_mode('devices')", "Devices", show=False),
        Binding("4", "switch_mode('follow')", "Follow view", show=False),
        Binding("question_mark,5", "switch_mode('help')", "Help"),
        Binding("p", "pause", "Pause"),
        Binding("w", "save", "Save"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self.store: Store = source.store
        self.history: list[str] = []
        self.selection: Sequence[int] | None = None  # None: every packet
        self.selection_label = ""
        self.run_filter: FilterRun | None = None  # the applied filter (kept up to date live)
        self.filtering: Worker[None] | None = None
        self.filter_progress = 0.0
        self.paused = False
        self.paused_at = 0
        self.follow_conn = 0
        self.follow_hex = False
        self.columns: tuple[str, ...] | None = None  # the packet list's; None: vsproxy read's line
        self.message = ""  # the last thing done (saved, cancelled): one line in the status
        self._generation = -1
        self._snapshots = -1
        self.rates: dict[str, deque[float]] = {}  # attached: packets/s per device, per snapshot
        self._last_counts: dict[str, tuple[int, float]] = {}

    # -- life ---------------------------------------------------------------------------------------
    def on_mount(self) -> None:
        # The sources decode on their own threads: a short switch interval hands the
        # interpreter back to this one (keys, drawing) within a millisecond, not five.
        sys.setswitchinterval(SWITCH_S)
        self.set_interval(POLL_S, self.poll)
        # scapy, which the detail's -V layers use, takes a third of a second to import: do it
        # now, off this thread, not when the first packet is selected
        threading.Thread(target=_import_scapy_layers, name="tui-warm", daemon=True).start()
        # a file is read from here, not before: the first screen is drawn without the reading
        # thread competing for the interpreter (a source started already is left as it is)
        self.source.start()

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key | events.MouseDown | events.MouseScrollUp | events.MouseScrollDown):
            self.source.hold()  # what the user asked for first, the reading thread after
        await super().on_event(event)

    def poll(self) -> None:
        """Redraw the current screen when the store or the snapshot changed."""
        src = self.source
        changed = self.store.generation != self._generation or src.snapshots != self._snapshots
        if src.snapshots != self._snapshots and src.snapshot is not None:
            self._rates(src.snapshot)
        self._generation = self.store.generation
        self._snapshots = src.snapshots
        run = self.run_filter
        if run is not None and self.filtering is None and not self.paused and self.store.total > run.end:
            run.extend_to(self.store.total)  # live: judge the new packets too
            run.run()
            self.selection = run.matches
        if changed or src.error:
            self._redraw()

    def _rates(self, snap: dict[str, Any]) -> None:
        import time

        now = time.monotonic()
        for d in snap.get("devices", []):
            c = d.get("counters", {})
            total = int(c.get("tx_packets", 0)) + int(c.get("rx_packets", 0))
            name = str(d.get("name"))
            prev = self._last_counts.get(name)
            if prev is not None and now > prev[1]:
                self.rates.setdefault(name, deque(maxlen=SPARK_SAMPLES)).append(
                    max(0.0, (total - prev[0]) / (now - prev[1])))
            self._last_counts[name] = (total, now)

    def on_unmount(self) -> None:
        self.source.close()

    # -- what the status bar says ---------------------------------------------------------------------
    def status_parts(self) -> tuple[list[str], int, str | None]:
        src, store = self.source, self.store
        held = len(store)
        shown = len(self.selection) if self.selection is not None else held
        parts = [src.name, f"{shown:,} of {held:,} packets" if self.selection is not None else f"{held:,} packets"]
        if self.selection_label:
            parts.append(self.selection_label)
        if not src.done and not src.live:
            parts.append("loading…")
        if self.filtering is not None:
            parts.append(f"filtering {self.filter_progress:.0%} (Esc cancels)")
        if store.marks:
            parts.append(f"{store.marks} marked")
        if store.evicted:
            parts.append(f"ring: {store.evicted:,} oldest dropped (--store {store.limit:,})")
        if src.live and src.snaplen and not src.error:  # (a lost source's line says more)
            parts.append(f"snaplen {src.snaplen:,}")
        if self.paused:
            parts.append(f"PAUSED (+{max(0, store.total - self.paused_at):,} new)")
        if store.bad_frames:
            parts.append(f"{store.bad_frames} bad frames")
        if self.message:
            parts.append(self.message)
        return parts, src.drops, src.error

    # -- the selection --------------------------------------------------------------------------------
    def apply_filter(self, text: str) -> None:
        self.cancel_filter()
        text = text.strip()
        if not text:
            self.run_filter = None
            self.selection = None
            self.selection_label = ""
            self._redraw()
            return
        try:
            run = FilterRun(self.store, text)
        except FilterError as e:
            self.message = f"bad filter: {e}"
            self._redraw()
            return
        self.filter_progress = 0.0
        self.filtering = self.run_worker(lambda: self._filter(run), thread=True, exclusive=True, group="filter")

    def _filter(self, run: FilterRun) -> None:
        worker = get_current_worker()

        def progress(f: float) -> None:
            self.filter_progress = f
            self.call_from_thread(self._redraw_status)

        run.run(lambda: worker.is_cancelled, progress)
        if not run.cancelled:
            self.call_from_thread(self._filtered, run)

    def _filtered(self, run: FilterRun) -> None:
        self.filtering = None
        self.run_filter = run
        self.selection = run.matches
        self.selection_label = f"filter: {run.text}"
        self.message = ""
        self._redraw()

    def cancel_filter(self) -> None:
        if self.filtering is not None:
            self.filtering.cancel()
            self.filtering = None
            self.message = "filter cancelled"
            self._redraw()

    def show_connection(self, cid: int) -> None:
        """The packet list shows connection ``cid``'s packets."""
        self.cancel_filter()
        self.run_filter = None
        self.selection = array("q", self.store.conn_packets(cid))
        self.selection_label = f"connection #{cid}"
        self.switch_mode("packets")
        self._redraw()

    def hide_connection(self, cid: int) -> None:
        """Every packet but connection ``cid``'s (follow's "filter out this stream")."""
        self.cancel_filter()
        self.run_filter = None
        store = self.store
        with store.lock:
            first = store.first
            self.selection = array("q", (i for i in range(first, store.total) if store.conn_of(i) != cid))
        self.selection_label = f"without connection #{cid}"
        self.switch_mode("packets")
        self._redraw()

    def follow(self, cid: int) -> None:
        self.follow_conn = cid
        self.switch_mode("follow")  # the screen draws it when it mounts or resumes

    def _redraw(self) -> None:
        refresh = getattr(self.screen, "refresh_data", None)
        if refresh is not None:
            try:
                refresh()
            except NoMatches:  # switched to a screen not composed yet: it draws when mounted
                pass

    def _redraw_status(self) -> None:
        from vsproxy.tui.widgets.status import StatusBar

        for bar in self.screen.query(StatusBar):
            bar.show(*self.status_parts())

    # -- actions ----------------------------------------------------------------------------------------
    def set_columns(self, columns: tuple[str, ...] | None) -> None:
        self.columns = columns
        self._redraw()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.paused_at = self.store.total
        self.message = "paused: packets still arrive into the store" if self.paused else ""
        self._redraw()

    def action_save(self) -> None:
        self.push_screen(SaveScreen())

    def save(self, path: str, which: str) -> int:
        """Write all, the filtered (shown) or the marked packets to a pcapng; how many."""
        store = self.store
        if which == "marked":
            indices: Sequence[int] = store.marked()
        elif which == "filtered" and self.selection is not None:
            indices = self.selection
        else:
            with store.lock:
                indices = range(store.first, store.total)
        with open(path, "wb") as f:
            for block in pcapng_bytes(store, indices):
                f.write(block)
        written = len(indices)
        self.message = f"saved {written:,} packets to {path}"
        self._redraw()
        return written


def _import_scapy_layers() -> None:
    import dissectors.layers  # noqa: F401  (imported for its cost, once)


# -- the command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The interactive terminal UI: a capture file (or a rotated set), a live pcapng stream on "
        "stdin (-), or a running vsproxy's control socket (--attach PATH).",
        epilog="Keys: ? in the UI lists them all. Exit status: 0 done, 2 bad arguments or a source that cannot open.",
    )
    p.add_argument("files", metavar="FILE", nargs="*", help="pcap/pcapng files (a rotated set FILE.0, FILE.1, ...); "
                   "- for a pcapng stream on stdin")
    p.add_argument("--attach", metavar="PATH", help="a running vsproxy's control socket (vsproxy --control PATH)")
    p.add_argument("--follow-file", action="store_true", help="keep reading the capture file as it grows")
    p.add_argument("--store", metavar="N", type=_positive, default=DEFAULT_STORE,
                   help=f"live sources: keep at most N packets (a ring; default {DEFAULT_STORE:,})")
    p.add_argument("--snaplen", "-s", metavar="N", type=_snaplen, default=LIVE_SNAPLEN,
                   help=f"--attach: the first N payload bytes of each packet (tcpdump's -s; default {LIVE_SNAPLEN}, "
                   "0: all); vsproxy copies no more than that for the UI")
    return p


def _snaplen(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= MAX_SNAPLEN:
        raise argparse.ArgumentTypeError(f"expected a number of bytes in 0..{MAX_SNAPLEN} (0: all), got {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return n


class UsageError(Exception):
    pass


def open_source(args: argparse.Namespace) -> Source:
    if args.attach:
        if args.files:
            raise UsageError("--attach takes no FILE")
        src: Source = AttachSource(args.attach, limit=args.store, snaplen=args.snaplen)
        return src
    if not args.files:
        raise UsageError("give a capture FILE, - for stdin, or --attach PATH")
    if args.files == ["-"]:
        if sys.stdin.isatty():
            raise UsageError("-: stdin is a terminal; pipe a pcapng stream into it "
                             "(vsproxy ctl PATH pcap | vsproxy tui -)")
        return StreamSource(_stdin_stream(), "stdin", limit=args.store)
    if "-" in args.files:
        raise UsageError("- reads stdin alone; give it without files")
    paths: list[str] = []
    for name in args.files:
        found = capture_files(name)
        if not found:
            raise UsageError(f"{name}: no such file (nor a rotated set {name}.0, {name}.1, ...)")
        paths += found
    for path in paths:
        if not os.access(path, os.R_OK) or os.path.isdir(path):
            raise UsageError(f"{path}: cannot be read")
    return FileSource(paths, follow=args.follow_file)


def _stdin_stream() -> Any:
    """stdin's pipe for the reader thread; the terminal for Textual. Textual reads keys from
    stdin, so when stdin is a pipe the pipe moves to a new descriptor and /dev/tty takes fd 0."""
    fd = os.dup(0)
    try:
        tty = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        raise UsageError("-: no terminal to draw on (/dev/tty cannot be opened)") from None
    os.dup2(tty, 0)
    os.close(tty)
    return os.fdopen(fd, "rb")


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2
    try:
        source = open_source(args)
        if not isinstance(source, FileSource):
            source.start()  # live sources: a socket that cannot be reached is one line, before the screen
    except (UsageError, SourceError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    app = TuiApp(source)
    try:
        app.run()
    finally:
        source.stop()
    if source.error:
        print(f"{PROG}: {source.error}", file=sys.stderr)
    return 0


def run_with_proxy(proxy: Proxy, limit: int = DEFAULT_STORE, snaplen: int = LIVE_SNAPLEN) -> int:
    """``vsproxy --tui``: the started ``proxy``'s loop on its own thread, the TUI on this one;
    quitting the TUI stops vsproxy (its report goes to stderr after the screen is restored)."""
    # vsproxy's log lines would draw over the screen: they wait in memory (the newest
    # LOG_KEPT) and are printed once the terminal is back
    held = _HeldLogs()
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [held]
    loop = threading.Thread(target=proxy.run, name="vsproxy-loop", daemon=True)
    loop.start()
    source = ProxySource(proxy, limit=limit, snaplen=snaplen)
    source.start()
    try:
        TuiApp(source).run()
    finally:
        source.close()
        root.handlers = saved
        for line in held.lines:
            print(line, file=sys.stderr)
        proxy.stop()
        loop.join(10)
        proxy.stop_capture()
        proxy.report()
        proxy.close()
    return 0


LOG_KEPT: Final = 1000


class _HeldLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: deque[str] = deque(maxlen=LOG_KEPT)
        self.setFormatter(logging.Formatter("vsproxy: %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
