"""The devices screen: each device with a rate sparkline. Attached to a running vsproxy: CID,
socket, front-end state, remaps, allowlist rules with their counters, from its snapshots;
otherwise what the capture shows of each device (interface)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Sparkline, Static

from vsproxy.tui.bars import human
from vsproxy.tui.widgets.nav import NavBar
from vsproxy.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from vsproxy.tui.app import TuiApp


class DevicesScreen(Screen[None]):
    DEFAULT_CSS = """
    #devices { height: 1fr; }
    .device { height: auto; padding: 0 1; }
    .spark { height: 2; margin: 0 1 1 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._shown: tuple[int, int] = (-1, -1)

    @property
    def tui(self) -> TuiApp:
        return cast("TuiApp", self.app)

    def compose(self) -> ComposeResult:
        yield NavBar("devices")
        yield VerticalScroll(id="devices")
        yield StatusBar(id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#devices").focus()
        self.refresh_data()

    def on_screen_resume(self) -> None:
        self.refresh_data()

    def refresh_data(self) -> None:
        tui = self.tui
        key = (tui.store.generation, tui.source.snapshots)
        if key != self._shown:
            self._shown = key
            box = self.query_one("#devices", VerticalScroll)
            box.remove_children()
            snap = tui.source.snapshot
            blocks = self._snapshot_blocks(snap) if snap is not None else self._capture_blocks()
            for text, spark in blocks:
                box.mount(Static(text, classes="device"))
                box.mount(Sparkline(spark or [0.0], classes="spark"))
        self.query_one(StatusBar).show(*tui.status_parts())

    def _snapshot_blocks(self, snap: dict[str, Any]) -> list[tuple[str, list[float]]]:
        rules = {r["name"]: r for r in snap.get("rules", [])}
        out = []
        for d in snap.get("devices", []):
            c = d.get("counters", {})
            state = "running" if d.get("running") else "front-end connected" if d.get("frontend") else "no front-end"
            lines = [f"[b]{d['name']}[/b]  CID {d['guest_cid']}  socket {d['socket']}  {state}  "
                     f"sessions {d.get('sessions', 0)}  connections {d.get('connections', 0)}",
                     f"  from the guest {c.get('tx_packets', 0):,} packets {human(int(c.get('tx_bytes', 0)))}B, "
                     f"to it {c.get('rx_packets', 0):,} packets {human(int(c.get('rx_bytes', 0)))}B, "
                     f"RST {c.get('rst_sent', 0)}, refused {c.get('connections_refused', 0)}, "
                     f"spoofed {c.get('spoofed', 0)}"]
            for r in d.get("remaps", []):
                lines.append(f"  remap {r}")
            for a in d.get("allow", []):
                lines.append(f"  allow {a}")
            lines.append("  packets/s, last minute:")
            out.append(("\n".join(lines), list(self.tui.rates.get(str(d["name"]), []))))
        if rules:
            out.append(("\n".join(["[b]rules[/b]"] + [
                f"  {name!r}: connections {r['connections']}, denials {r['denials']}, rewrites {r['rewrites']}, "
                f"packets {r['packets']}, bytes {r['bytes']}" for name, r in rules.items()]), []))
        if not out:
            out.append(("no devices in the snapshot", []))
        return out

    def _capture_blocks(self) -> list[tuple[str, list[float]]]:
        store = self.tui.store
        out = []
        with store.lock:
            devs = list(store.devices.values())
        for d in devs:
            cids = ", ".join(str(c) for c in sorted(d.cids)) or "?"
            name = d.name or "(no device name: classic pcap)"
            text = (f"[b]{name}[/b]  guest CID {cids}  (from the capture; attach to a running vsproxy for its "
                    f"socket, front-end and rules)\n"
                    f"  {d.packets:,} packets, {human(d.bytes)}B, {d.connections} connections, "
                    f"denied {d.denied}, spoofed {d.spoofed}, rewritten {d.rewritten}\n"
                    "  packets/s, last minute of its traffic:")
            out.append((text, d.spark()))
        if not out:
            out.append(("no packets yet", []))
        return out
