"""The TUI on a big capture: a generated pcapng of 1,000,000 packets (HTTP-sized RW packets on
short connections with their control packets, as bench_read.py writes them) opened in the real
app (headless, Textual's test driver, 160x50):

- first screen: from the start until the packet list has drawn its first rows (the file is
  still being indexed behind it);
- the whole file indexed and decoded, and the process's peak RSS then;
- jump to the end (End in the packet list) until the last rows are drawn;
- a filter over every packet, in a worker with progress, until the list shows the matches;
- live: a pcapng stream offered at 100,000 packets/s for 30 s through a pipe into the app's
  stdin source (a ring of 200,000), decoded by the TUI's ingest process: the rate the UI took
  in against the rate offered, the records the ingest process could not decode in time (feed
  drops: it never holds the writer back), the latency of a key (an Up key event posted every
  50 ms, until the cursor has moved), and the peak RSS of the UI's process and of the ingest
  process against the ring's bound.

    python benchmarks/bench_tui.py [--packets N] [--live-seconds S] [--live-only] [--quick]

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

from textual import events
from textual.strip import Strip

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
        assert src.error is None, src.error
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


def live_stream(packets: int) -> list[bytes]:
    """Pre-built records (HTTP-sized RW packets among their control packets), to offer fast."""
    from vsproxy.capture import format as fmt
    from vsproxy.vsock import header as H

    out = []
    for i in range(packets):
        op = (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RW, H.Op.RW, H.Op.CREDIT_UPDATE)[i % 5]
        payload = b"GET /v1/keys HTTP/1.1\r\n\r\n" if op == H.Op.RW else b""
        hdr = H.pack(5, 2, 1024 + (i // 5) % 60000, 8000, len(payload), 1, op, 0, 262144, i)
        out.append(fmt.pcapng_epb(0, 1e9 + i / 1e5, fmt.vsockmon_frame(hdr, payload), inbound=i % 2 == 0))
    return out


def feed(rate: int, seconds: float) -> None:
    """The live stream on stdout, paced at ``rate`` packets a second (in 1 ms slices), as
    ``vsproxy ctl PATH pcap`` would write it; the pipe pushes back when the reader is slower."""
    from vsproxy.capture import format as fmt

    block = live_stream(10_000)
    out = sys.stdout.buffer
    out.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
    start = time.perf_counter()
    sent = k = 0
    try:
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * rate)
            if sent < due:
                n = due - sent
                chunk = [block[(k + j) % len(block)] for j in range(n)]
                out.write(b"".join(chunk))
                out.flush()
                k = (k + n) % len(block)
                sent += n
            else:
                time.sleep(0.001)
    except BrokenPipeError:
        pass
    print(sent, file=sys.stderr)


async def measure_live(seconds: float, rate: int, ring: int) -> dict[str, float]:
    import subprocess
    import threading

    from vsproxy.tui.sources import StreamSource

    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--feed", str(rate), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    src = StreamSource(proc.stdout, "bench", limit=ring)
    app = TuiApp(src)
    stop = threading.Event()
    lat: list[float] = []
    handled_lat: list[float] = []  # until the cursor moved (the action ran), before the drawing
    ingest_rss = ingest_cpu = 0.0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    async with app.run_test(size=(160, 50)) as pilot:
        t0 = time.perf_counter()
        plist = app.screen.query_one(PacketList)

        # A key's latency: from posting it, as the terminal delivers it, until the packet list
        # has handled it and then drawn a line (the screen updated). Not "until the cursor
        # moved": a ring that moves on shifts the cursor by itself.
        handled = threading.Event()
        drawn = threading.Event()
        action, render = plist.action_cursor, plist.render_line

        moved: list[float] = []

        def on_action(delta: int) -> None:
            action(delta)
            handled.set()
            moved.append(time.perf_counter())

        def on_render(y: int) -> Strip:
            if handled.is_set():
                drawn.set()
            return render(y)

        plist.action_cursor = on_action  # type: ignore[method-assign]
        plist.render_line = on_render  # type: ignore[method-assign]

        def keys() -> None:
            while not stop.is_set():
                handled.clear()
                drawn.clear()
                key = "down" if plist.cursor < plist.count // 2 else "up"  # never against an end
                t = time.perf_counter()
                app.post_message(events.Key(key, None))
                if drawn.wait(10):
                    lat.append(time.perf_counter() - t)
                    handled_lat.append(moved[-1] - t)
                time.sleep(0.05)

        t_k = threading.Thread(target=keys, daemon=True)
        t_k.start()
        while proc.poll() is None and not src.done:
            await pilot.pause(0.1)
            if src.ingest is not None:  # its peak, read while it runs (it ends with the stream)
                ingest_rss = max(ingest_rss, _peak_rss_mb(src.ingest.proc.pid))
                ingest_cpu = max(ingest_cpu, _cpu_s(src.ingest.proc.pid))
        assert src.error is None, src.error
        elapsed = time.perf_counter() - t0
        offered = int(proc.stderr.read().decode().split()[-1])
        stop.set()
        took = src.store.total
        drops = src.drops
        await pilot.pause(0.2)  # the last batch is in
        while t_k.is_alive():  # its last call runs on this loop: wait for it here, not by blocking
            await pilot.pause(0.05)
        rss = rss_mb()
        held = len(src.store)
        ui_cpu = resource.getrusage(resource.RUSAGE_SELF)
        if src.ingest is not None:
            ingest_cpu = max(ingest_cpu, _cpu_s(src.ingest.proc.pid))
    src.close()
    proc.kill()
    proc.wait(10)
    proc.stderr.close()
    lat.sort()
    handled_lat.sort()
    return {"offered": offered / elapsed, "taken": took / elapsed, "p50": lat[len(lat) // 2],
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "keys": len(lat),
            "moved50": handled_lat[len(handled_lat) // 2],
            "moved99": handled_lat[min(len(handled_lat) - 1, int(len(handled_lat) * 0.99))], "rss": rss, "held": held,
            "drops": drops, "ingest_rss": ingest_rss, "sent": offered, "took": took, "elapsed": elapsed,
            "ui_cpu": ui_cpu.ru_utime + ui_cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime, "ingest_cpu": ingest_cpu}


def _cpu_s(pid: int) -> float:
    """A process's CPU seconds so far (user and system)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _peak_rss_mb(pid: int) -> float:
    """A process's peak RSS (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--live-seconds", type=float, default=30.0)
    ap.add_argument("--live-rate", type=int, default=100_000, help="packets a second offered live")
    ap.add_argument("--quick", action="store_true", help="20,000 packets and 3 s live: a smoke run")
    ap.add_argument("--live-only", action="store_true", help="only the live figures")
    ap.add_argument("--feed", nargs=2, metavar=("RATE", "SECONDS"), help=argparse.SUPPRESS)  # the live writer
    args = ap.parse_args()
    if args.feed:
        feed(int(args.feed[0]), float(args.feed[1]))
        return 0
    n = 20_000 if args.quick else args.packets
    live_s = 3.0 if args.quick else args.live_seconds
    if not args.live_only:
        big(n)
    live(live_s, args.live_rate)
    return 0


def big(n: int) -> None:
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


def live(live_s: float, rate: int) -> None:
    ring = 200_000
    live = asyncio.run(measure_live(live_s, rate, ring))
    print(f"live, {rate:,} packets/s offered for {live_s:.0f} s through a pipe (--store {ring:,}):")
    print(f"  taken in         {live['taken']:,.0f} packets/s, offered {live['offered']:,.0f}/s by a writer process "
          f"({live['took']:,.0f} of {live['sent']:,.0f} records; the ingest process never holds the writer back)")
    print(f"  feed drops       {live['drops']:,.0f} records the ingest process could not decode in time "
          f"({live['drops'] / max(1, live['sent']):.1%}; shown in the status bar)")
    print(f"  key latency      p50 {live['p50'] * 1000:.1f} ms, p99 {live['p99'] * 1000:.1f} ms over "
          f"{live['keys']:.0f} key presses, to the screen drawn (target p99 at most 100 ms); to the cursor "
          f"moved p50 {live['moved50'] * 1000:.1f} ms, p99 {live['moved99'] * 1000:.1f} ms")
    print(f"  memory           peak RSS {live['rss']:.0f} MB (UI process; {live['ingest_rss']:.0f} MB the ingest "
          f"process) with {live['held']:,.0f} packets held (the ring's bound: {ring:,} packets)")
    el = live["elapsed"]
    print(f"  CPU              UI process {live['ui_cpu'] / el:.0%} of a core, ingest process "
          f"{live['ingest_cpu'] / el:.0%} (this machine: {os.cpu_count()} CPUs, the writer on them too)")


if __name__ == "__main__":
    raise SystemExit(main())
