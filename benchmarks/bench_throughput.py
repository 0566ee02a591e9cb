"""Throughput of vsproxy driven by the simulated guest, each figure beside its floor.

    python benchmarks/bench_throughput.py [--seconds S] [--quick]

Guest to host: the simulated guest sends RW packets (``blast``: a full tx ring of reused
indirect chains) to CID 2 port P; vsproxy hands them to a unix socket ``uds_P``; a separate
reader process drains it with recv_into. Host to guest: a host process connects through the
hybrid socket and sends one payload per send(); the guest drains its rx ring. Rates are
counted where the guest sees them (tx buffers returned / rx buffers filled), over the time
until the host side has seen every byte too.

Floor: the same payloads written from an mmapped memfd into the same kind of host socket
(unix stream), one send per payload, by a minimal loop, with a separate reader draining it
(recv_into) - no vsock processing at all. The ratio says what vsproxy costs.

Also: RSS that 1,000 idle connections add to the vsproxy process.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from typing import NamedTuple

from vsproxy.endpoints.listeners import hybrid_dial
from vsproxy.simguest import SEQPACKET, STREAM, SimGuest
from vsproxy.simguest.memory import DEFAULT_SIZE

MiB = 1 << 20
LINUX_BUF_ALLOC = 262144  # a Linux guest socket's default window
BIG_RX_BUF = 64 * 1024 + 44  # rx buffers that hold a whole 64 KiB packet
LINUX_RX_BUF = 3776  # the rx buffers a Linux guest posts, header included
EXTRA: list[str] = []  # --vsproxy-arg


def _drain_server(path: str, ready: Pipe, result: Pipe, expect: int, kind: int = socket.SOCK_STREAM) -> None:
    """Host reader: accept one unix connection, recv_into until `expect` bytes or EOF (on a
    SOCK_SEQPACKET socket each recv_into takes one message)."""
    srv = socket.socket(socket.AF_UNIX, kind)
    srv.bind(path)
    srv.listen(4)
    ready.send(True)
    c, _ = srv.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    while got < expect:
        n = c.recv_into(view)
        if n == 0:
            break
        got += n
    result.send((got, time.monotonic()))
    c.close()
    srv.close()


class HostReader:
    """A host reader process on ``path`` (``_drain_server``), listening once made; ``result()``
    waits for it: (bytes read, when the last arrived)."""

    def __init__(self, path: str, expect: int, kind: int = socket.SOCK_STREAM) -> None:
        r_ready, w_ready = mp.Pipe()
        self._result, w_res = mp.Pipe()
        self._proc = mp.Process(target=_drain_server, args=(path, w_ready, w_res, expect, kind))
        self._proc.start()
        r_ready.recv()

    def result(self) -> tuple[int, float]:
        got, end = self._result.recv()
        self._proc.join()
        return int(got), float(end)


def _floor_sender(path: str, payload: int, count: int, ready: Pipe) -> None:
    """The floor: one send() per payload from an mmapped memfd."""
    fd = os.memfd_create("floor")
    os.ftruncate(fd, max(payload, 4096))
    mm = mmap.mmap(fd, max(payload, 4096))
    view = memoryview(mm)[:payload]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ready.recv()
    s.connect(path)
    send = s.send
    for _ in range(count):
        sent = send(view)
        while sent < payload:
            sent += send(view[sent:])
    s.shutdown(socket.SHUT_WR)
    s.close()
    view.release()
    mm.close()
    os.close(fd)


def _floor_receiver(path: str, payload: int, count: int, ready: Pipe, result: Pipe) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.send(True)
    c, _ = srv.accept()
    buf = bytearray(max(payload, 1 << 16))
    view = memoryview(buf)
    got = 0
    start = time.monotonic()
    while True:
        n = c.recv_into(view)
        if n == 0:
            break
        got += n
    result.send((got, time.monotonic() - start))


def floor(tmp: str, payload: int, count: int) -> float:
    """Seconds for the floor loop to move count x payload through a unix socket."""
    path = os.path.join(tmp, f"floor-{payload}")
    r_ready, w_ready = mp.Pipe()
    r_res, w_res = mp.Pipe()
    recv = mp.Process(target=_floor_receiver, args=(path, payload, count, w_ready, w_res))
    recv.start()
    r_ready.recv()
    s_ready_r, s_ready_w = mp.Pipe()
    send = mp.Process(target=_floor_sender, args=(path, payload, count, s_ready_r))
    send.start()
    s_ready_w.send(True)
    got, elapsed = r_res.recv()
    send.join()
    recv.join()
    os.unlink(path)
    assert got == payload * count, (got, payload * count)
    return float(elapsed)


def _host_sender(uds: str, port: int, payload: int, count: int, result: Pipe) -> None:
    """Host to guest: connect through the hybrid socket, then one send() per payload."""
    fd = os.memfd_create("h2g")
    os.ftruncate(fd, max(payload, 4096))
    mm = mmap.mmap(fd, max(payload, 4096))
    view = memoryview(mm)[:payload]
    try:
        s, _ = hybrid_dial(uds, port)
    except ConnectionError as e:
        raise SystemExit(str(e)) from None
    start = time.monotonic()
    for _ in range(count):
        sent = s.send(view)
        while sent < payload:
            sent += s.send(view[sent:])
    s.shutdown(socket.SHUT_WR)
    result.send(start)
    s.recv(1)
    s.close()


def _task_cpu(pid: int) -> float:
    """Seconds on a CPU of every thread of ``pid`` (/proc/PID/task/*/schedstat, in ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total / 1e9


# Enclave-shaped guests (issue 19 item 4): the memory layout and virtio transport of QEMU's
# microvm and nitro-enclave machines, each beside a one-region guest (-M pc's layout) in the same
# run. Two regions: the simulated guest's layout for those machines (a 960 KiB first region, the
# second behind a hole of guest addresses and at memfd offset 1 MiB, its non-zero mmap_offset).
# Ring 1024: virtio-mmio's queue size on those machines (the one-region guest's is 128). Legacy:
# virtio-mmio without VERSION_1 (the legacy ring layout, used ring on a 4 KiB boundary).
class Shape(NamedTuple):
    regions: int = 1
    ring_size: int = 128
    version_1: bool = True

    @property
    def mem_size(self) -> int:
        """1024 rx buffers of 64 KiB need more than the default 64 MiB of guest memory (a sparse
        memfd: what is never touched costs nothing)."""
        return 256 << 20 if self.ring_size > 128 else DEFAULT_SIZE


ONE_REGION = Shape()
SHAPES = {
    "1-region": ONE_REGION,
    "2-regions": Shape(regions=2),
    "ring-1024": Shape(ring_size=1024),
    "microvm": Shape(regions=2, ring_size=1024),
    "nitro-legacy": Shape(regions=2, ring_size=1024, version_1=False),
}


class Rig:
    def __init__(self, tmp: str, guest_buf_alloc: int = LINUX_BUF_ALLOC, extra: tuple[str, ...] = (),
                 rx_buf: int = BIG_RX_BUF, shape: Shape = ONE_REGION) -> None:
        self.tmp = tmp
        self.vhost = os.path.join(tmp, "vhost.sock")
        self.uds = os.path.join(tmp, "uds")
        self.log = open(os.path.join(tmp, "vsproxy.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vsproxy", "--socket", self.vhost, "--guest-cid", "5", "--uds-path", self.uds,
             "-q", *EXTRA, *extra], stderr=self.log,
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(self.vhost):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("vsproxy did not start")
            time.sleep(0.02)
        # no packet log (record_limit=0): a guest only counts what it gets
        self.guest = SimGuest(self.vhost, timeout=60, rx_buf_size=rx_buf, buf_alloc=guest_buf_alloc, record_limit=0,
                              regions=shape.regions, ring_size=shape.ring_size, version_1=shape.version_1,
                              mem_size=shape.mem_size)
        self.guest.start()
        self.port = 10000
        self.guest_buf_alloc = guest_buf_alloc

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time so far of vsproxy and of this process (the simulated guest), in nanoseconds'
        resolution (schedstat): clock ticks (10 ms) read 0 for a short quick-mode row."""
        return _task_cpu(self.proc.pid), _task_cpu(os.getpid())

    def run(self, direction: str, payload: int, count: int) -> tuple[float, int, float, float]:
        """One transfer: seconds, packets, and the CPU share of vsproxy and of the guest over it."""
        v0, g0 = self.cpu_seconds()
        el, pkts = self.g2h(payload, count) if direction == "guest->host" else self.h2g(payload, count)
        v1, g1 = self.cpu_seconds()
        return el, pkts, (v1 - v0) / el, (g1 - g0) / el

    def g2h(self, payload: int, count: int, seqpacket: bool = False) -> tuple[float, int]:
        """Guest to host: seconds and packets seen by the guest."""
        self.port += 1
        path = f"{self.uds}_{self.port}"
        reader = HostReader(path, payload * count, socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM)
        s = self.guest.connect(self.port, type=SEQPACKET if seqpacket else STREAM)
        before = self.guest.stats.tx_packets
        start = time.monotonic()
        s.blast(b"\xa5" * payload, count)
        got, end = reader.result()
        s.close()
        assert got == payload * count, (got, payload * count)
        packets = self.guest.stats.tx_packets - before
        return max(end, start) - start, packets

    def h2g(self, payload: int, count: int) -> tuple[float, int]:
        self.port += 1
        lst = self.guest.listen(self.port)
        r_res, w_res = mp.Pipe()
        p = mp.Process(target=_host_sender, args=(self.uds, self.port, payload, count, w_res))
        p.start()
        s = lst.accept(timeout=10)
        before = self.guest.stats.rx_packets
        got = s.drain(payload * count)
        end = time.monotonic()
        start = r_res.recv()
        packets = self.guest.stats.rx_packets - before
        s.close()
        p.join()
        lst.close()
        assert got == payload * count, (got, payload * count)
        return end - start, packets

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def idle_connections(self, n: int) -> tuple[int, int]:
        """RSS before and after opening n idle guest connections to one host listener."""
        path = f"{self.uds}_9999"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(4096)
        srv.setblocking(False)
        held: list[socket.socket] = []
        time.sleep(0.2)
        before = self.rss_kib()
        socks = []
        for _ in range(n):
            socks.append(self.guest.connect(9999))
            while True:
                try:
                    held.append(srv.accept()[0])
                except BlockingIOError:
                    break
        for _ in range(20):
            self.guest.poll(0.01)
        time.sleep(0.2)
        after = self.rss_kib()
        for s in socks:
            s.close()
        for h in held:
            h.close()
        srv.close()
        return before, after

    def c_pump(self) -> int:
        """What the C pump has done so far (kicks, credit updates, sends it took without
        Python), from vsproxy's SIGUSR1 report."""
        size = os.path.getsize(self.log.name)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(self.log.name, errors="replace") as f:
                f.seek(size)
                text = f.read()
            counts = re.findall(r"\bc_pump_(?:updates|kicks|sends)=(\d+)", text)
            if len(counts) == 3:
                return sum(int(c) for c in counts)
            time.sleep(0.02)
        raise SystemExit("vsproxy gave no counters report after SIGUSR1")

    def close(self) -> str:
        """Stop vsproxy; returns its closing report (counters)."""
        self.guest.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()
        with open(self.log.name, errors="replace") as f:
            return f.read()


def shape_table(tmp: str, scale: float, repeat: int, only: set[tuple[str, ...]] | None = None) -> None:
    """Each case on every shape, runs interleaved shape by shape (these machines are noisy), the
    best of ``repeat`` per shape, its ratio to the one-region guest's; vsproxy's CPU time per
    payload (the median over the runs), which other processes on the machine disturb far less
    than a rate, beside the one-region guest's; and the C pump's counters of the shape's vsproxy
    (zero would mean the guest ran on the Python walker)."""
    cases = [
        ("guest->host", 65536, int(20000 * scale), BIG_RX_BUF),
        ("guest->host", 4096, int(100000 * scale), BIG_RX_BUF),
        ("guest->host", 64, int(600000 * scale), BIG_RX_BUF),
        ("host->guest", 65536, int(10000 * scale), BIG_RX_BUF),
        ("host->guest", 65536, int(10000 * scale), LINUX_RX_BUF),
        ("host->guest", 64, int(200000 * scale), BIG_RX_BUF),
    ]
    if only:  # --only DIR:PAYLOAD[:WINDOW_K[:RX_BUF]] (the window is always 256 KiB here)
        names = {"guest->host": "g2h", "host->guest": "h2g"}
        cases = [c for c in cases if {(names[c[0]], str(c[1])), (names[c[0]], str(c[1]), "256"),
                                      (names[c[0]], str(c[1]), "256", str(c[3]))} & only]
    print(f"\nenclave-shaped guests, each beside the one-region guest (best of {repeat}, runs interleaved)")
    print(f"{'shape':<13} {'direction':<12} {'payload':>8} {'rx buf':>6} {'vsproxy':>16} {'vs 1-region':>11} "
          f"{'cpu/pay':>9} {'vs 1-region':>11} {'c_pump':>7}")
    for rx_buf in sorted({c[3] for c in cases}, reverse=True):
        rigs = {name: Rig(tempfile.mkdtemp(dir=tmp), LINUX_BUF_ALLOC, rx_buf=rx_buf, shape=shape)
                for name, shape in SHAPES.items()}
        try:
            for direction, payload, count, buf in cases:
                if buf != rx_buf:
                    continue
                best: dict[str, float] = {}
                cpu: dict[str, list[float]] = {name: [] for name in rigs}
                for _ in range(repeat):
                    for name, rig in rigs.items():
                        el, _pkts, vcpu, _gcpu = rig.run(direction, payload, count)
                        best[name] = min(best.get(name, el), el)
                        cpu[name].append(vcpu * el / count * 1e9)  # ns of vsproxy CPU per payload
                ns = {name: statistics.median(v) for name, v in cpu.items()}
                for name, rig in rigs.items():
                    el = best[name]
                    ours = (f"{count / el:,.0f} pay/s" if payload == 64 else f"{payload * count / el / 1e6:,.0f} MB/s")
                    cpu_shown = f"{ns[name]:,.0f} ns"
                    print(f"{name:<13} {direction:<12} {payload:>8} {rx_buf:>6} {ours:>16} "
                          f"{best['1-region'] / el:>11.0%} {cpu_shown:>9} {ns[name] / ns['1-region']:>11.0%} "
                          f"{rig.c_pump():>7}", flush=True)
        finally:
            for r in rigs.values():
                r.close()


def _sibling_receiver(sock: str, ports: list[int], expect: int, ready: Pipe, result: Pipe) -> None:
    """The receiving guest of a sibling pair, in its own process (a simulated guest runs only
    inside its caller's calls), one front-end session for every run: for each port, listen,
    accept, drain ``expect`` bytes, and say when the last arrived."""
    with SimGuest(sock, timeout=60, rx_buf_size=BIG_RX_BUF, record_limit=0) as g:
        for port in ports:
            lst = g.listen(port)
            ready.send(True)
            s = lst.accept(timeout=30)
            got = s.drain(expect)
            result.send((got, time.monotonic()))
            s.close()
            lst.close()


def sibling_runs(sender: SimGuest, sock: str, payload: int, count: int, repeat: int,
                 between: Callable[[], None]) -> float:
    """The best of ``repeat`` runs of ``count`` payloads from ``sender`` to its sibling (CID 6),
    a receiving guest on ``sock``; ``between`` runs before each (the floor, interleaved)."""
    ports = [7000 + k for k in range(repeat)]
    r_ready, w_ready = mp.Pipe()
    r_res, w_res = mp.Pipe()
    p = mp.Process(target=_sibling_receiver, args=(sock, ports, payload * count, w_ready, w_res))
    p.start()
    best = float("inf")
    try:
        for port in ports:
            between()
            r_ready.recv()
            s = sender.connect(port, cid=6, timeout=10)
            start = time.monotonic()
            s.blast(b"\xa5" * payload, count)
            got, end = r_res.recv()
            s.close()
            assert got == payload * count, (got, payload * count)
            best = min(best, float(end) - start)
    finally:
        p.join(60)
    return best


def row(case: str, count: int, seconds: float, beside: str, its_seconds: float, payload: int = 65536) -> None:
    """One row of the SEQPACKET and siblings table: the rate of the case and of what it stands
    beside (``stream``: STREAM through the same vsproxy; ``floor``: the guest-to-host floor), and
    their ratio; MB/s, or payloads (messages) a second for payloads below 4 KiB."""
    if payload < 4096:
        ours, its = f"{count / seconds:,.0f} pay/s", f"{count / its_seconds:,.0f} pay/s"
    else:
        ours, its = f"{payload * count / seconds / 1e6:,.0f} MB/s", f"{payload * count / its_seconds / 1e6:,.0f} MB/s"
    print(f"{case:<10} {payload:>8} {ours:>14} {beside:<8} {its:>14} {its_seconds / seconds:>6.0%}", flush=True)


def seqpacket_sibling_table(tmp: str, scale: float, repeat: int) -> None:
    """SEQPACKET (issue 19 item 5): 64 KiB messages guest to host (one message per packet, EOM
    on each, into a unix SOCK_SEQPACKET listener) beside STREAM through the same vsproxy, runs
    interleaved; and guest to guest: two simulated guests, siblings in one group of one vsproxy,
    beside the guest-to-host floor measured in the same run."""
    count = int(20000 * scale)
    print(f"\nSEQPACKET and siblings, guest to host and guest to guest (best of {repeat}, runs interleaved)")
    print(f"{'case':<10} {'payload':>8} {'vsproxy':>14} {'beside':<8} {'its rate':>14} {'ratio':>6}")
    rig = Rig(tempfile.mkdtemp(dir=tmp))
    try:
        # 64 KiB messages, and small ones (64 bytes: one message per packet, what a
        # request/response protocol sends), each beside STREAM with the same payloads
        for payload, n in ((65536, count), (64, int(300000 * scale))):
            stream = seq = float("inf")
            for _ in range(repeat):
                stream = min(stream, rig.g2h(payload, n)[0])
                seq = min(seq, rig.g2h(payload, n, seqpacket=True)[0])
            row("seqpacket", n, seq, "stream", stream, payload)
    finally:
        rig.close()
    sub = tempfile.mkdtemp(dir=tmp)
    a, b = os.path.join(sub, "a.sock"), os.path.join(sub, "b.sock")
    log = open(os.path.join(sub, "vsproxy.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vsproxy", "-q", "--vm", f"guest-cid=5,socket={a},groups=g",
                             "--vm", f"guest-cid=6,socket={b},groups=g", *EXTRA], stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not (os.path.exists(a) and os.path.exists(b)):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("vsproxy did not start")
            time.sleep(0.02)
        floors: list[float] = []
        with SimGuest(a, timeout=60, record_limit=0) as sender:
            sib = sibling_runs(sender, b, 65536, count, repeat, lambda: floors.append(floor(tmp, 65536, count)))
        fl = min(floors)
        row("siblings", count, sib, "floor", fl)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def file_write_rate(directory: str, total: int = 1 << 30) -> float:
    """What the kernel takes into a new file in ``directory``: on these VMs, allocating the
    page cache for new file pages, not copying, is the limit (about 1 GB/s on tmpfs)."""
    chunk = bytes(4 << 20)
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        start = time.monotonic()
        for _ in range(total // len(chunk)):
            os.write(fd, chunk)
        return total / (time.monotonic() - start)
    finally:
        os.close(fd)
        os.unlink(path)


def capture_table(tmp: str, scale: float, repeat: int, capture_dir: str) -> None:
    """Guest to host with capture off, then to a pcap and a pcapng file, in the same run.

    The files go to ``capture_dir``: a tmpfs (/dev/shm) by default, because what is measured
    is vsproxy's cost, and these machines' disks take about 400 MB/s sustained once the page
    cache is full of dirty pages - below the 64 KiB rate, so a disk would only measure itself
    (and the capture would drop what the disk cannot take, counted)."""
    file_rate = max(file_write_rate(capture_dir) for _ in range(repeat))
    print(f"\ncapture files in {capture_dir}: a new file there takes {file_rate / 1e6:,.0f} MB/s "
          "from one thread doing nothing else (4 MiB writes): the file-write floor")
    print(f"{'capture':<8} {'payload':>8} {'vsproxy':>16} {'vs off':>7} {'written':>9} {'bytes':>12} {'drops':>6} "
          f"{'vs lower of off and file floor':>31}")
    for payload, count in ((65536, int(20000 * scale)), (64, int(300000 * scale))):
        base = 0.0
        # "idle": pcapng with --pcap-idle (the writer only in idle CPU time);
        # "lossless": pcapng with --pcap-lossless (the data path waits for the file, no drops);
        # "null": pcapng to /dev/null, what capturing costs vsproxy itself, without the file;
        # "null-ll": the same, lossless
        for mode in ("off", "pcap", "pcapng", "idle", "lossless", "null", "null-ll"):
            sub = tempfile.mkdtemp(dir=tmp)
            null = mode.startswith("null")
            cap = os.devnull if null else os.path.join(tempfile.mkdtemp(dir=capture_dir), f"bench.{mode}")
            extra: tuple[str, ...] = ()
            if mode != "off":
                extra = ("--pcap", cap, "--pcap-format", "pcap" if mode == "pcap" else "pcapng")
            if mode == "idle":
                extra += ("--pcap-idle",)
            if mode in ("lossless", "null-ll"):
                extra += ("--pcap-lossless",)
            rig = Rig(sub, LINUX_BUF_ALLOC, extra)
            try:
                el = min(rig.g2h(payload, count)[0] for _ in range(repeat))
            finally:
                report = rig.close()
                if not null:
                    shutil.rmtree(os.path.dirname(cap), ignore_errors=True)
            rate = payload * count / el
            base = base or rate
            written = re.search(r"capture: packets=(\d+) bytes=(\d+) dropped=(\d+)", report)
            w, b, d = written.groups() if written else ("-", "-", "-")
            shown = f"{rate / 1e6:,.0f} MB/s" if payload > 64 else f"{count / el:,.0f} pay/s"
            # a file capture cannot run faster than the file takes its records (bytes written
            # per payload byte: the records' headers too)
            # (only a capture without drops wrote every record; a lossy one's file has fewer)
            vs_floor = "-"
            if written and int(d) == 0:
                per_byte = 0 if null else int(b) / (payload * count * repeat)
                floor_rate = min(base, file_rate / per_byte) if per_byte else base
                vs_floor = f"{rate / floor_rate:.0%}"
            print(f"{mode:<8} {payload:>8} {shown:>16} {rate / base:>7.0%} {w:>9} {b:>12} {d:>6} {vs_floor:>31}",
                  flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run, figures are noisy)")
    ap.add_argument("--no-capture", action="store_true", help="skip the capture on/off table")
    ap.add_argument("--capture-only", action="store_true", help="only the capture on/off table")
    ap.add_argument("--no-shapes", action="store_true", help="skip the enclave-shaped guests table")
    ap.add_argument("--shapes-only", action="store_true", help="only the enclave-shaped guests table")
    ap.add_argument("--no-seqpacket", action="store_true", help="skip the SEQPACKET and siblings table")
    ap.add_argument("--seqpacket-only", action="store_true", help="only the SEQPACKET and siblings table")
    ap.add_argument("--capture-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                    help="where the capture files go (default: /dev/shm, a tmpfs)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure, best taken (default 3)")
    ap.add_argument("--vsproxy-arg", action="append", default=[], help="extra vsproxy option (repeatable)")
    ap.add_argument("--only", action="append", default=[], metavar="DIR:PAYLOAD[:WINDOW_K[:RX_BUF]]",
                    help="run only this case, e.g. g2h:65536:256 or h2g:65536:256:3776 (repeatable; skips the "
                         "idle and capture tables)")
    args = ap.parse_args()
    EXTRA.extend(args.vsproxy_arg)
    scale = 0.1 if args.quick else 1.0
    if args.quick:
        args.repeat = 1
    # (direction, payload, count, guest window, guest rx buffer size): the guest window is a
    # Linux socket's default 256 KiB (a Linux 6.1.192+ sender also caps its credit at it,
    # CVE-2026-23086), and for 64 KiB also 2 MiB, what SO_VM_SOCKETS_BUFFER_SIZE allows. The
    # guest's rx buffers hold a whole 64 KiB packet, and for host->guest 64 KiB also the 3776
    # bytes a Linux guest posts (its data then crosses in 70 packets a window).
    cases = [
        ("guest->host", 65536, int(20000 * scale), LINUX_BUF_ALLOC, BIG_RX_BUF),
        ("guest->host", 65536, int(20000 * scale), 2 * MiB, BIG_RX_BUF),
        ("guest->host", 4096, int(100000 * scale), LINUX_BUF_ALLOC, BIG_RX_BUF),
        ("guest->host", 64, int(600000 * scale), LINUX_BUF_ALLOC, BIG_RX_BUF),
        ("host->guest", 65536, int(10000 * scale), LINUX_BUF_ALLOC, BIG_RX_BUF),
        ("host->guest", 65536, int(10000 * scale), LINUX_BUF_ALLOC, LINUX_RX_BUF),
        ("host->guest", 65536, int(10000 * scale), 2 * MiB, BIG_RX_BUF),
        ("host->guest", 4096, int(60000 * scale), LINUX_BUF_ALLOC, BIG_RX_BUF),
        ("host->guest", 64, int(200000 * scale), LINUX_BUF_ALLOC, BIG_RX_BUF),
    ]
    if args.only:
        names = {"guest->host": "g2h", "host->guest": "h2g"}
        wanted = {tuple(o.split(":")) for o in args.only}
        cases = [c for c in cases
                 if (names[c[0]], str(c[1])) in wanted or (names[c[0]], str(c[1]), str(c[3] // 1024)) in wanted
                 or (names[c[0]], str(c[1]), str(c[3] // 1024), str(c[4])) in wanted]
        if not cases:
            ap.error(f"--only matches no case: {', '.join(args.only)}")
    if args.shapes_only or args.seqpacket_only:
        with tempfile.TemporaryDirectory(prefix="vsp-bench-") as tmp:
            if args.shapes_only:
                shape_table(tmp, scale, args.repeat, {tuple(o.split(":")) for o in args.only})
            if args.seqpacket_only:
                seqpacket_sibling_table(tmp, scale, args.repeat)
        return 0
    # cpu: the share of one core vsproxy and the simulated guest used during the best run; on a
    # 2-vCPU machine the two of them and the host reader share two cores.
    print(f"{'direction':<12} {'payload':>8} {'window':>7} {'rx buf':>6} {'vsock pkts':>10} {'vsproxy':>16} "
          f"{'floor':>16} {'ratio':>6} {'cpu vsp':>8} {'guest':>6}")
    if args.capture_only:
        with tempfile.TemporaryDirectory(prefix="vsp-bench-") as tmp:
            capture_table(tmp, scale, args.repeat, args.capture_dir)
        return 0

    with tempfile.TemporaryDirectory(prefix="vsp-bench-") as tmp:
        rigs: dict[tuple[int, int], Rig] = {}
        try:
            for direction, payload, count, window, rx_buf in cases:
                if (window, rx_buf) not in rigs:
                    rigs[window, rx_buf] = Rig(tempfile.mkdtemp(dir=tmp), window, rx_buf=rx_buf)
                rig = rigs[window, rx_buf]
                # Best of `repeat` for both sides: these 2-core machines are noisy.
                fl = min(floor(tmp, payload, count) for _ in range(args.repeat))
                el, pkts, vcpu, gcpu = min(rig.run(direction, payload, count) for _ in range(args.repeat))
                if payload == 64:
                    # 64-byte payloads: rate of payloads; host->guest stream data is coalesced into
                    # fewer, larger vsock packets, whose count is shown beside it.
                    ours, base = f"{count / el:,.0f} pay/s", f"{count / fl:,.0f} pay/s"
                else:
                    ours, base = f"{payload * count / el / 1e6:,.0f} MB/s", f"{payload * count / fl / 1e6:,.0f} MB/s"
                print(f"{direction:<12} {payload:>8} {window // 1024:>6}K {rx_buf:>6} {pkts:>10} {ours:>16} {base:>16} "
                      f"{fl / el:>6.0%} {vcpu:>8.0%} {gcpu:>6.0%}", flush=True)
            if args.only:
                return 0
            n = 100 if args.quick else 1000
            before, after = rigs[LINUX_BUF_ALLOC, BIG_RX_BUF].idle_connections(n)
            print(f"{n} idle connections: vsproxy RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB "
                  f"(+{(after - before) / 1024:.1f} MiB, {(after - before) * 1024 / n:,.0f} bytes each)")
        finally:
            for r in rigs.values():
                r.close()
        if not args.no_shapes:
            shape_table(tmp, scale, args.repeat)
        if not args.no_seqpacket:
            seqpacket_sibling_table(tmp, scale, args.repeat)
        if not args.no_capture:
            capture_table(tmp, scale, args.repeat, args.capture_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
