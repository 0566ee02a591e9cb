"""``vsproxy ctl PATH COMMAND``: what a running vsproxy's control socket gives (docs/control.md).

    stats            devices and rules, as the SIGUSR1 report
    conns [--json]   one connection a line, like ss
    events           a live tail of connection and device events
    pcap [FILTER]    the live capture stream on stdout (| tshark -r - ..., | vsproxy read -);
                     --snaplen N keeps each packet's first N payload bytes
    watch            stats again every second, with rates per device

``--seconds S`` ends a stream (events, pcap, watch) after S seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

MAX_ANSWER = 64 << 20


class CtlError(Exception):
    """One line for the user; exit status 2."""


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as e:
        s.close()  # now, not by the garbage collector (a long-lived client, the TUI, retries)
        if isinstance(e, FileNotFoundError):
            raise CtlError(f"{path}: no such socket (is vsproxy running with --control {path}?)") from None
        if isinstance(e, PermissionError):
            raise CtlError(f"{path}: permission denied (the control socket is for root and vsproxy's user)") from None
        raise CtlError(f"{path}: {e.strerror or e}") from None
    return s


def ask(s: socket.socket, req: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Send one request; its answer, and any bytes that came after the answer's line."""
    s.sendall(json.dumps(req).encode() + b"\n")
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = s.recv(65536)
        except OSError as e:
            raise CtlError(f"control socket: {e.strerror or e}") from None
        if not chunk:
            raise CtlError("control socket: closed without an answer (refused, or not vsproxy's)")
        buf += chunk
        if len(buf) > MAX_ANSWER:
            raise CtlError("control socket: the answer is too long: not vsproxy's?")
    line, rest = buf.split(b"\n", 1)
    try:
        got = json.loads(line)
    except ValueError:
        raise CtlError("control socket: the answer is not JSON: not vsproxy's control socket?") from None
    if not isinstance(got, dict) or "ok" not in got:
        raise CtlError("control socket: an unexpected answer: not vsproxy's control socket?")
    if not got["ok"]:
        raise CtlError(f"vsproxy: {got.get('error', 'refused')}")
    return got, rest


def snapshot(path: str) -> dict[str, Any]:
    s = connect(path)
    try:
        got, _ = ask(s, {"cmd": "snapshot"})
    finally:
        s.close()
    snap = got.get("snapshot")
    if not isinstance(snap, dict):
        raise CtlError("control socket: no snapshot in the answer")
    return snap


def stats_lines(snap: dict[str, Any]) -> list[str]:
    lines = []
    for d in snap["devices"]:
        c = d["counters"]
        state = "running" if d["running"] else "front-end connected" if d["frontend"] else "no front-end"
        lines.append(f"{d['name']}: cid {d['guest_cid']} {state} conns={d['connections']} "
                     f"tx_pkts={c['tx_packets']} tx_bytes={c['tx_bytes']} rx_pkts={c['rx_packets']} "
                     f"rx_bytes={c['rx_bytes']} rst={c['rst_sent']} refused={c['connections_refused']} "
                     f"limit_refused={c['limit_refused']} spoofed={c['spoofed']}")
    for r in snap["rules"]:
        lines.append(f"rule {r['name']!r}: connections={r['connections']} denials={r['denials']} "
                     f"rewrites={r['rewrites']} packets={r['packets']} bytes={r['bytes']}")
    for name, counts in (snap.get("services") or {}).items():
        lines.append(f"{name}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    p = snap["process"]
    lines.append(f"process: fd_exhausted={p['fd_exhausted']} accept_pauses={p['accept_pauses']} "
                 f"handshakes_dropped={p['handshakes_dropped']} faults={p['faults']}")
    return lines


def conn_lines(snap: dict[str, Any]) -> list[str]:
    rows = [("DEVICE", "TYPE", "STATE", "LOCAL", "PEER", "REAL PEER", "TX", "RX", "INFLIGHT", "QUEUED", "C", "AGE")]
    for c in snap["connections"]:
        real = f"{c['real_cid']}:{c['real_port']}"
        peer = f"{c['peer_cid']}:{c['peer_port']}"
        rows.append((c["device"], c["type"], c["state"], f"{c['guest_cid']}:{c['guest_port']}", peer,
                     real if real != peer else "-", str(c["to_peer_bytes"]), str(c["to_guest_bytes"]),
                     str(c["credit"]["in_flight"]), str(c["credit"]["queued"]), "C" if c["in_c"] else "-",
                     f"{c['age']:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def stream(path: str, req: dict[str, Any], seconds: float, out: Any) -> None:
    """Copy a subscription's stream to ``out`` until the socket closes or ``seconds`` pass."""
    s = connect(path)
    try:
        _, rest = ask(s, req)
        if rest:
            out.write(rest)
        end = time.monotonic() + seconds if seconds else None
        while end is None or time.monotonic() < end:
            s.settimeout(0.5 if end is None else max(0.05, min(0.5, end - time.monotonic())))
            try:
                data = s.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                break
            out.write(data)
            out.flush()
    finally:
        s.close()


def watch(path: str, seconds: float, out: Any) -> None:
    prev: dict[str, tuple[int, int]] = {}
    t_prev = time.monotonic()
    end = time.monotonic() + seconds if seconds else None
    while end is None or time.monotonic() < end:
        snap = snapshot(path)
        now = time.monotonic()
        dt = max(1e-6, now - t_prev)
        out.write(time.strftime("%H:%M:%S\n"))
        for line in stats_lines(snap):
            out.write(line + "\n")
        for d in snap["devices"]:
            c = d["counters"]
            tot = (c["tx_bytes"], c["rx_bytes"])
            if d["name"] in prev:
                tx = (tot[0] - prev[d["name"]][0]) / dt
                rx = (tot[1] - prev[d["name"]][1]) / dt
                out.write(f"{d['name']}: {tx / 1e6:,.1f} MB/s from the guest, {rx / 1e6:,.1f} MB/s to it\n")
            prev[d["name"]] = tot
        out.write("\n")
        out.flush()
        t_prev = now
        time.sleep(1.0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vsproxy ctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", metavar="PATH", help="the control socket (vsproxy --control PATH)")
    ap.add_argument("command", choices=("stats", "conns", "events", "pcap", "watch"))
    ap.add_argument("filter", nargs="*", help="pcap: only packets this filter matches (the language of vsproxy read)")
    ap.add_argument("--json", action="store_true", help="conns, stats: the snapshot's JSON")
    ap.add_argument("--seconds", type=float, default=0.0, help="end a stream after this long (0: never)")
    ap.add_argument("--snaplen", "-s", type=int, default=0, metavar="N",
                    help="pcap: keep only the first N payload bytes of each packet, as tcpdump -s (0: all); "
                         "while nothing else needs more, vsproxy copies no more than that")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    if args.snaplen and args.command != "pcap":
        print("vsproxy ctl: --snaplen goes with pcap", file=sys.stderr)
        return 2
    try:
        if args.command in ("stats", "conns"):
            snap = snapshot(args.path)
            if args.json:
                print(json.dumps(snap if args.command == "stats" else snap["connections"], indent=1))
            else:
                print("\n".join(stats_lines(snap) if args.command == "stats" else conn_lines(snap)))
        elif args.command == "events":
            stream(args.path, {"cmd": "subscribe", "what": "events"}, args.seconds, sys.stdout.buffer)
        elif args.command == "pcap":
            req = {"cmd": "subscribe", "what": "packets", "filter": " ".join(args.filter), "snaplen": args.snaplen}
            stream(args.path, req, args.seconds, sys.stdout.buffer)
        else:
            watch(args.path, args.seconds, sys.stdout)
    except CtlError as e:
        print(f"vsproxy ctl: {e}", file=sys.stderr)
        return 2
    except (BrokenPipeError, KeyboardInterrupt):
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    return 0
