"""Soak: mixed traffic through one vsproxy for a given time, checked as it goes.

    python benchmarks/soak.py [--seconds S]

One vsproxy process serves two simulated guests in one group: ``churn`` (CID 5: a hybrid
socket, a unix echo on port 5000, a TCP echo on 5001 through ``forward``, a digest service on
5002, an allowlist of those ports and CID 6) and ``b`` (CID 6, an echo on port 7000, run in a
process of its own). Each round, guest ``churn`` does:

- bulk guest -> host: 4 MiB of random bytes to the digest service, whose SHA-256 comes back;
- bulk host -> guest: a host program sends 4 MiB through ``CONNECT 6001``; the guest returns
  the SHA-256 of what it read;
- request/response: 50 exchanges of 1..16384 bytes on each of two connections held open for
  the whole run (unix and TCP);
- churn: 50 connect/transfer/close cycles of each kind of benchmarks/bench_churn.py;
- a denial: a connect to 2:9999, outside the allowlist: the guest gets RST, the rules'
  denial count rises by one, and the host listener at ``uds_9999`` never sees a connection;
- a sibling pair: 1 MiB to guest ``b``'s echo, compared when it comes back.

After each round (once the table is down to the two held connections): vsproxy is alive, its
stderr has no traceback, its counters are consistent (denials exactly as many as tried; the
device's byte counters equal what the guest counted; no faults, bad chains, spoofed packets,
credit violations), and its descriptors and connection table are back at the baseline of the
first round and its RSS within ``--rss-bound`` KiB of it. Prints what it checked, with
figures; exit status 1 on the first failure (with what failed).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.synchronize import Event
from typing import Any

from bench_churn import TCP_PORT, UNIX_PORT, ChurnRig

from vsproxy.simguest import GuestSocket, SimGuest, SimGuestError, SimGuestTimeout

MiB = 1 << 20
DIGEST_PORT, H2G_PORT, DENIED_PORT, SIBLING_PORT, SIBLING_CID = 5002, 6001, 9999, 7000, 6
BULK = 4 * MiB
SIBLING_BYTES = 1 * MiB
EXCHANGES = 50
CHURN = 50
RSS_BOUND_KIB = 16384
FD_SLACK = 0  # descriptors back exactly


class SoakFailure(Exception):
    """A check failed: the message says which and with what figures."""


def _digest_host(path: str, stop: Event, ready: Pipe) -> None:
    """Reads each connection to EOF, answers the SHA-256 of what it read, closes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    srv.settimeout(0.2)
    ready.send(True)
    while not stop.is_set():
        try:
            c, _ = srv.accept()
        except TimeoutError:
            continue
        with c:
            c.settimeout(60)
            h = hashlib.sha256()
            try:
                while data := c.recv(1 << 20):
                    h.update(data)
                c.sendall(h.digest())
            except OSError:
                continue  # vsproxy reset it: the guest's side sees that and fails the check
    srv.close()


def _sibling_echo(vhost: str, stop: Event, ready: Pipe, result: Pipe) -> None:
    """Guest ``b``: echoes every connection to its port 7000 (read to EOF, send back, close).
    Reports how many it served, the protocol errors it saw, and what ended it early if
    something did (vsproxy gone, a timeout)."""
    served = 0
    errors: list[str] = []
    failed = ""
    started = False
    try:
        with SimGuest(vhost, timeout=30, record_limit=0) as g:
            lst = g.listen(SIBLING_PORT, backlog=8)
            ready.send(True)
            started = True
            while not stop.is_set():
                try:
                    c = lst.accept(timeout=0.2)
                except SimGuestTimeout:
                    continue
                c.sendall(c.recv_all(timeout=30))
                c.close(timeout=30)
                served += 1
            errors = g.stats.protocol_errors[:5]
    except (SimGuestError, OSError) as e:
        failed = f"{type(e).__name__}: {e}"
        if not started:
            ready.send(False)
    result.send((served, errors, failed))


@dataclass
class Tally:
    """What the soak did and checked, for the report."""

    rounds: int = 0
    bulk_g2h: int = 0
    bulk_h2g: int = 0
    exchanges: int = 0
    exchange_bytes: int = 0
    churn_cycles: int = 0
    denials: int = 0
    sibling_bytes: int = 0
    checks: dict[str, int] = field(default_factory=dict)
    max_fds: int = 0
    max_rss_kib: int = 0
    max_table: int = 0

    def checked(self, what: str) -> None:
        self.checks[what] = self.checks.get(what, 0) + 1


class Soak:
    def __init__(self, tmp: str, rss_bound_kib: int) -> None:
        self.rss_bound_kib = rss_bound_kib
        self.tally = Tally()
        self.rng = random.Random(2)
        self.stop = mp.Event()
        keys = (f",groups=pair,allow-out=2:{UNIX_PORT}+2:{TCP_PORT}+2:{DIGEST_PORT}+{SIBLING_CID}")
        self.b_vhost = os.path.join(tmp, "b.sock")
        self.rig = ChurnRig(tmp, keys, ("--vm", f"name=b,guest-cid={SIBLING_CID},socket={self.b_vhost},groups=pair"))
        self.procs: list[mp.Process] = []
        self.denied_listener: socket.socket | None = None
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise

    def _set_up(self) -> None:
        self.g = self.rig.guest
        self.h2g = self.g.listen(H2G_PORT, backlog=4)
        r, w = mp.Pipe()
        self._start(_digest_host, f"{self.rig.uds}_{DIGEST_PORT}", self.stop, w)
        r.recv()
        r, w = mp.Pipe()
        self._sib_result, sib_w = mp.Pipe()
        self._start(_sibling_echo, self.b_vhost, self.stop, w, sib_w)
        if not r.recv():
            raise SoakFailure(f"guest b could not start: {self._sib_result.recv()[2]}")
        # a host listener behind the denied port: nothing may ever reach it
        self.denied_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.denied_listener.bind(f"{self.rig.uds}_{DENIED_PORT}")
        self.denied_listener.listen(16)
        self.denied_listener.setblocking(False)
        self.held = [self.g.connect(UNIX_PORT), self.g.connect(TCP_PORT)]
        self.base: tuple[int, int, int] | None = None  # fds, RSS KiB, table
        self.last_counters: dict[str, int] = {}

    def _start(self, target: Any, *args: Any) -> None:
        p = mp.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)

    # -- traffic -------------------------------------------------------------------------------

    def bulk_g2h(self) -> None:
        data = self.rng.randbytes(BULK)
        s = self.g.connect(DIGEST_PORT)
        s.sendall(data)
        s.shutdown_write()
        digest = s.recv_all(timeout=60)
        s.close()
        if digest != hashlib.sha256(data).digest():
            raise SoakFailure(f"bulk guest->host: the host's SHA-256 of {BULK} bytes differs")
        self.tally.bulk_g2h += BULK

    def bulk_h2g(self) -> None:
        data = self.rng.randbytes(BULK)
        answer: list[bytes] = []
        errors: list[BaseException] = []

        def host() -> None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as h:
                    h.settimeout(60)
                    h.connect(self.rig.uds)
                    h.sendall(b"CONNECT %d\n" % H2G_PORT + data)
                    h.shutdown(socket.SHUT_WR)
                    back = bytearray()
                    while chunk := h.recv(65536):
                        back += chunk
                    answer.append(bytes(back))
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        t = threading.Thread(target=host)
        t.start()
        gs = self.h2g.accept(timeout=30)
        h = hashlib.sha256()
        while chunk := gs.recv(1 << 20, timeout=60):
            h.update(chunk)
        gs.sendall(h.digest())
        gs.close(timeout=30)
        t.join(60)
        if errors:
            raise SoakFailure(f"bulk host->guest: the host program failed: {errors[0]!r}")
        line, _, digest = answer[0].partition(b"\n") if answer else (b"", b"", b"")
        if not line.startswith(b"OK ") or digest != hashlib.sha256(data).digest():
            raise SoakFailure(f"bulk host->guest: line {line[:40]!r}; the guest's SHA-256 of {BULK} bytes differs")
        self.tally.bulk_h2g += BULK

    def exchanges(self) -> None:
        for _ in range(EXCHANGES):
            for s in self.held:
                req = self.rng.randbytes(self.rng.randint(1, 16384))
                s.sendall(req)
                got = s.recv_exactly(len(req), timeout=30)
                if got != req:
                    raise SoakFailure(f"request/response to {s.peer}: the echo of {len(req)} bytes differs")
                self.tally.exchanges += 1
                self.tally.exchange_bytes += 2 * len(req)

    def churn(self) -> None:
        for cycle in self.rig.kinds().values():
            for _ in range(CHURN):
                cycle()
                self.tally.churn_cycles += 1

    def denial(self) -> None:
        try:
            s = self.g.connect(DENIED_PORT)
        except ConnectionResetError:
            self.tally.denials += 1
            return
        s.close()
        raise SoakFailure(f"denial: the connect to 2:{DENIED_PORT} outside the allowlist was accepted")

    def sibling(self) -> None:
        data = self.rng.randbytes(SIBLING_BYTES)
        s: GuestSocket = self.g.connect(SIBLING_PORT, cid=SIBLING_CID)
        s.sendall(data)
        s.shutdown_write()
        got = s.recv_all(timeout=60)
        s.close()
        if got != data:
            raise SoakFailure(f"sibling pair: {len(got)} bytes came back for {len(data)}, or different")
        self.tally.sibling_bytes += 2 * SIBLING_BYTES

    # -- checks --------------------------------------------------------------------------------

    def check(self) -> None:
        t = self.tally
        rig = self.rig
        if not rig.alive():
            raise SoakFailure(f"vsproxy exited with {rig.proc.returncode}:\n{rig.log()[-3000:]}")
        t.checked("vsproxy alive")
        if "Traceback" in rig.log():
            raise SoakFailure(f"vsproxy's stderr has a traceback:\n{rig.log()[-3000:]}")
        t.checked("no traceback on vsproxy's stderr")
        want_table = len(self.held)
        base = rig.settle(want_fds=self.base[0] if self.base else None, want_table=want_table)
        if base.table != want_table:
            raise SoakFailure(f"connection table: {base.table} connections, {want_table} expected (the held ones)")
        if self.base is None:
            self.base = (base.fds, base.rss_kib, base.table)
        fds0, rss0, _ = self.base
        t.max_fds, t.max_rss_kib, t.max_table = max(t.max_fds, base.fds), max(t.max_rss_kib, base.rss_kib), \
            max(t.max_table, base.table)
        if base.fds > fds0 + FD_SLACK:
            raise SoakFailure(f"open descriptors: {base.fds}, baseline {fds0}")
        t.checked("descriptors at the baseline")
        t.checked("connection table at the baseline")
        if base.rss_kib - rss0 > self.rss_bound_kib:
            raise SoakFailure(f"RSS {base.rss_kib} KiB, {base.rss_kib - rss0} KiB above the baseline's {rss0} "
                              f"(bound {self.rss_bound_kib})")
        t.checked("RSS within the bound")
        self._check_counters(rig.snapshot())
        assert self.denied_listener is not None
        try:
            c, _ = self.denied_listener.accept()
        except BlockingIOError:
            t.checked("nothing reached the denied port's host listener")
        else:
            c.close()
            raise SoakFailure(f"a connection reached the host listener of the denied port {DENIED_PORT}")

    def _check_counters(self, snap: dict[str, Any]) -> None:
        t = self.tally
        dev = {d["name"]: d for d in snap["devices"]}
        denials = sum(int(r["denials"]) for r in snap["rules"])
        if denials != t.denials:
            raise SoakFailure(f"denials counted {denials}, {t.denials} tried")
        t.checked("denials counted exactly")
        c = dev["churn"]["counters"]
        st = self.g.stats
        if (c["tx_bytes"], c["rx_bytes"]) != (st.tx_bytes, st.rx_bytes):
            raise SoakFailure(f"bytes: vsproxy counted {c['tx_bytes']} from and {c['rx_bytes']} to the guest, the "
                              f"guest {st.tx_bytes} sent and {st.rx_bytes} received")
        t.checked("byte counters equal the guest's")
        for name, d in dev.items():
            bad = {k: d["counters"][k] for k in ("faults", "spoofed", "credit_violations", "bad_packets")
                   if d["counters"][k]}
            if d["bad_chains"]:
                bad["bad_chains"] = d["bad_chains"]
            if d["sessions"] != 1:
                bad["sessions"] = d["sessions"]
            if bad:
                raise SoakFailure(f"device {name}: {bad}")
        if snap["process"]["faults"] or snap["process"]["fd_exhausted"]:
            raise SoakFailure(f"process counters: {snap['process']}")
        t.checked("no faults, bad chains, spoofed packets or credit violations")
        for key in ("tx_bytes", "rx_bytes", "connections_opened"):
            if c[key] < self.last_counters.get(key, 0):
                raise SoakFailure(f"counter {key} went back from {self.last_counters[key]} to {c[key]}")
            self.last_counters[key] = c[key]
        t.checked("counters never go back")
        if st.protocol_errors:
            raise SoakFailure(f"the guest saw protocol errors: {st.protocol_errors[:5]}")
        t.checked("the guest saw no protocol error")

    def round(self) -> None:
        self.bulk_g2h()
        self.bulk_h2g()
        self.exchanges()
        self.churn()
        self.denial()
        self.sibling()
        self.tally.rounds += 1
        self.check()

    def finish(self) -> None:
        """Close the held connections: the table must empty; guest ``b`` must have served every pair."""
        for s in self.held:
            s.close()
        self.held = []
        after = self.rig.settle(want_table=0)
        if after.table != 0:
            raise SoakFailure(f"connection table: {after.table} connections after closing everything")
        self.tally.checked("connection table empty at the end")
        self.stop.set()
        served, errors, failed = self._sib_result.recv()
        if served != self.tally.rounds or errors or failed:
            raise SoakFailure(f"guest b served {served} sibling connections ({self.tally.rounds} made); "
                              f"errors {errors} {failed}")
        self.tally.checked("guest b served every sibling connection, no protocol error")

    def close(self) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        if self.denied_listener is not None:
            self.denied_listener.close()
        self.rig.close()


def run_soak(seconds: float, rss_bound_kib: int = RSS_BOUND_KIB, out: Any = sys.stdout) -> int:
    with tempfile.TemporaryDirectory(prefix="vsp-soak-") as tmp:
        try:
            soak = Soak(tmp, rss_bound_kib)
        except (SoakFailure, RuntimeError, OSError, SimGuestError) as e:
            print(f"FAILED: could not set up: {e}", file=out)
            return 1
        start = time.monotonic()
        failure: SoakFailure | None = None
        try:
            while True:
                soak.round()
                if soak.tally.rounds == 1:
                    fds, rss, table = soak.base or (0, 0, 0)
                    print(f"baseline after round 1: {fds} descriptors, RSS {rss:,} KiB, {table} connections "
                          "(the two held ones)", file=out, flush=True)
                if time.monotonic() - start >= seconds:
                    break
            soak.finish()
        except SoakFailure as e:
            failure = e
        except Exception as e:  # a guest call that failed (vsproxy gone, a timeout): a failure too
            failure = SoakFailure(f"{type(e).__name__}: {e} (vsproxy {'alive' if soak.rig.alive() else 'exited'})"
                                  f"\n{soak.rig.log()[-2000:]}")
        finally:
            soak.close()
        elapsed = time.monotonic() - start
        t = soak.tally
        print(f"soak: {elapsed:.0f} s, {t.rounds} rounds against one vsproxy (pid {soak.rig.proc.pid})", file=out)
        print(f"  bulk guest->host   {t.bulk_g2h / MiB:,.0f} MiB, SHA-256 checked per 4 MiB", file=out)
        print(f"  bulk host->guest   {t.bulk_h2g / MiB:,.0f} MiB, SHA-256 checked per 4 MiB", file=out)
        print(f"  request/response   {t.exchanges:,} exchanges, {t.exchange_bytes / MiB:,.1f} MiB, each echo compared",
              file=out)
        print(f"  churn              {t.churn_cycles:,} connect/transfer/close cycles, each echo compared", file=out)
        print(f"  denials            {t.denials:,} (RST each, counted exactly)", file=out)
        print(f"  sibling pair       {t.sibling_bytes / MiB:,.0f} MiB echoed by guest b, compared", file=out)
        fds0, rss0, _ = soak.base or (0, 0, 0)
        print(f"  descriptors        baseline {fds0}, highest after a round {t.max_fds}", file=out)
        print(f"  RSS                baseline {rss0:,} KiB, highest after a round {t.max_rss_kib:,} KiB "
              f"(+{t.max_rss_kib - rss0:,}; bound +{rss_bound_kib:,})", file=out)
        print("checks passed:", file=out)
        for what, n in t.checks.items():
            print(f"  {what}: {n}x", file=out)
        if failure is not None:
            print(f"FAILED: {failure}", file=out)
            return 1
        print("soak: OK", file=out)
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="how long to run (default 120; at least one round)")
    ap.add_argument("--rss-bound", type=int, default=RSS_BOUND_KIB, metavar="KIB",
                    help=f"RSS growth allowed over the first round's (default {RSS_BOUND_KIB} KiB)")
    args = ap.parse_args()
    return run_soak(args.seconds, args.rss_bound)


if __name__ == "__main__":
    sys.exit(main())
