"""The TUI on a big capture: a generated pcapng of 1,000,000 packets (HTTP-sized RW packets on
short connections with their control packets, as bench_read.py writes them) opened in the real
app (headless, Textual's test driver, 160x50):

- first screen: from the start until the packet list has drawn its first rows (the file is
  still being indexed behind it);
- the whole file indexed and decoded, and the process's peak RSS then;
- jump to the end (End in the packet list) until the last rows are drawn;
- a filter over every packet, in a worker with progress, until the list shows the matches.

    python benchmarks/bench_tui.py [--packets N] [--quick]

Targets (issue 15): first screen at most 2 s, RSS at most 300 MB, end at most 100 ms, filter
at most 15 s, for 1,000,000 packets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_read import write_capture

from vsproxy.tui.app import TuiApp
from vsproxy.tui.sources import FileSource
from vsproxy.tui.widgets.packet_list import PacketList

FILTER = "dst.port == 8000 and op == rw"
TARGETS = {"first": 2.0, "rss": 300.0, "end": 0.100, "filter": 15.0}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(path: str, packets: int) -> dict[str, float]:
    got: dict[str, float] = {}
    start = time.perf_counter()
    src = FileSource([path])
    app = TuiApp(src)  # it starts reading the file once mounted, as `vsproxy tui FILE` does
    async with app.run_test(size=(160, 50)) as pilot:
        plist = app.screen.query_one(PacketList)
        while plist.count == 0:
            await pilot.pause(0.01)
        await pilot.pause()  # drawn
        got["first"] = time.perf_counter() - start
        got["first_rows"] = plist.count
        while not src.done:
            await pilot.pause(0.05)
        got["loaded"] = time.perf_counter() - start
        got["rss"] = rss_mb()
        await pilot.pause(0.3)  # the poll timer has shown every packet
        plist.focus()
        plist.move_to(0)
        await pilot.pause()
        t = time.perf_counter()
        await pilot.press("z")  # no binding: what a key press and a redraw cost in the test driver
        await pilot.pause()
        got["key"] = time.perf_counter() - t
        t = time.perf_counter()
        await pilot.press("end")
        await pilot.pause()
        got["end"] = time.perf_counter() - t
        assert plist.current == src.store.total - 1, "not at the last packet"
        # the work itself, without the test driver's key delivery: the jump, then every visible
        # row of the list drawn from the file (its row cache emptied first)
        plist.move_to(0)
        await pilot.pause()
        plist._cache.clear()
        t = time.perf_counter()
        plist.action_end()
        for y in range(plist.size.height):
            plist.render_line(y)
        got["end_work"] = time.perf_counter() - t
        progress: list[float] = []
        t = time.perf_counter()
        app.apply_filter(FILTER)
        while app.selection is None:
            if app.filtering is not None:
                progress.append(app.filter_progress)
            await pilot.pause(0.05)
        got["filter"] = time.perf_counter() - t
        got["progress_updates"] = len(set(progress))
        got["matches"] = len(app.selection)
    src.close()
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="20,000 packets: a smoke run")
    args = ap.parse_args()
    n = 20_000 if args.quick else args.packets
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.pcapng")
        t = time.perf_counter()
        write_capture(path, n)
        made = time.perf_counter() - t
        size = os.path.getsize(path)
        got = asyncio.run(measure(path, n))
    print(f"vsproxy tui on {n:,} packets ({size / 1e6:.1f} MB pcapng, written in {made:.1f} s):")
    print(f"  first screen     {got['first']:.2f} s ({got['first_rows']:,.0f} rows indexed by then; "
          f"target at most {TARGETS['first']:.0f} s)")
    print(f"  fully indexed    {got['loaded']:.2f} s ({n / got['loaded']:,.0f} packets/s)")
    print(f"  peak RSS         {got['rss']:.0f} MB (target at most {TARGETS['rss']:.0f} MB)")
    print(f"  jump to the end  {got['end_work'] * 1000:.1f} ms to move and draw the last screenful of rows "
          f"(target at most {TARGETS['end'] * 1000:.0f} ms); through the test driver, End to the screen "
          f"updated {got['end'] * 1000:.1f} ms, where a key with no binding takes {got['key'] * 1000:.1f} ms")
    print(f"  filter '{FILTER}'  {got['filter']:.2f} s, {got['matches']:,.0f} matches, "
          f"{got['progress_updates']:.0f} progress updates seen (target at most {TARGETS['filter']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
