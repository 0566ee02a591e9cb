"""--pcap-lossless: when the file falls behind, the data path waits for it instead of dropping,
so the file has every packet; the wait ends when the file fails or the process stops."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import VsproxyProcess

from vsproxy.capture.reader import dissect, records
from vsproxy.capture.writer import MIN_QUEUE_BYTES, CaptureOptions, CaptureWriter
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H

RECORD = 65536  # a record's payload: a 2 MiB ring holds about 30


class SlowReader(threading.Thread):
    """Reads a FIFO after ``delay`` seconds, ``chunk`` bytes every ``every`` seconds."""

    def __init__(self, path: str, delay: float, chunk: int = 1 << 20, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.path, self.delay, self.chunk, self.every = path, delay, chunk, every
        self.data = bytearray()
        self.start()

    def run(self) -> None:
        with open(self.path, "rb", buffering=0) as f:
            time.sleep(self.delay)
            while block := f.read(self.chunk):
                self.data += block
                time.sleep(self.every)


def fifo_writer(workdir: str, *, lossless: bool, delay: float) -> tuple[CaptureWriter, SlowReader]:
    path = os.path.join(workdir, "cap.fifo")
    os.mkfifo(path)
    reader = SlowReader(path, delay)
    return CaptureWriter(CaptureOptions(path, queue_bytes=MIN_QUEUE_BYTES, lossless=lossless), ["dev"]), reader


def rw_header(n: int) -> bytes:
    return H.Header(3, 2, 1024, 5000, n, H.Type.STREAM, H.Op.RW, 0, 262144, 0).pack()


def commit_many(w: CaptureWriter, count: int) -> None:
    payload = memoryview(bytes(RECORD))
    for _ in range(count):
        w("dev", False, rw_header(RECORD), [payload])


@pytest.mark.parametrize("lossless", [True, False])
def test_a_lossless_capture_waits_for_a_slow_file_and_has_every_record_where_an_ordinary_one_drops(
        workdir: str, lossless: bool) -> None:
    w, reader = fifo_writer(workdir, lossless=lossless, delay=0.5)
    count = 200  # about 13 MiB of records through a 2 MiB ring
    commit_many(w, count)
    w.close()
    reader.join(30)
    got = sum(1 for _ in records(io.BytesIO(bytes(reader.data))))
    if lossless:
        assert (got, w.stats.dropped, w.counters.dropped) == (count, 0, 0)
        assert w.stats.waits > 0 and w.stats.waited > 0.2  # the data path waited for the reader
    else:  # the same run without it drops: the test above could fail
        assert w.stats.dropped > 0 and got == count - w.counters.dropped


def test_when_the_file_fails_the_data_path_stops_waiting_and_drops_are_counted(workdir: str) -> None:
    path = os.path.join(workdir, "cap.fifo")
    os.mkfifo(path)
    opened = threading.Event()

    def read_a_little_then_go() -> None:
        with open(path, "rb", buffering=0) as f:
            opened.set()
            f.read(4096)
            time.sleep(0.3)  # the ring fills and the data path waits; then the reader goes away

    t = threading.Thread(target=read_a_little_then_go, daemon=True)
    t.start()
    w = CaptureWriter(CaptureOptions(path, queue_bytes=MIN_QUEUE_BYTES, lossless=True), ["dev"])
    start = time.monotonic()
    commit_many(w, 200)  # returns: the writer's EPIPE ends the waiting
    elapsed = time.monotonic() - start
    w.close()
    t.join(5)
    assert elapsed < 10
    assert not w.lossless and w.counters.dropped > 0


def test_an_interrupted_process_waits_for_a_stuck_file_only_for_the_grace(workdir: str) -> None:
    path = os.path.join(workdir, "cap.fifo")
    os.mkfifo(path)
    rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        w = CaptureWriter(CaptureOptions(path, queue_bytes=MIN_QUEUE_BYTES, lossless=True), ["dev"])
        threading.Timer(0.5, w.interrupt, kwargs={"grace": 0.5}).start()
        start = time.monotonic()
        commit_many(w, 100)
        elapsed = time.monotonic() - start
        assert 0.9 <= elapsed < 5 and w.stats.dropped > 0
    finally:
        os.close(rfd)  # the writer's next write fails: close() does not wait either
        w.close()


def test_lossless_with_the_idle_writer_is_refused_before_anything_opens(workdir: str) -> None:
    path = os.path.join(workdir, "x.pcapng")
    with pytest.raises(ValueError, match="choose one"):
        CaptureWriter(CaptureOptions(path, idle=True, lossless=True), ["dev"])
    for argv, msg in (([ "--pcap", path, "--pcap-lossless", "--pcap-idle"], "choose one"),
                      (["--pcap-lossless"], "needs --pcap FILE")):
        r = subprocess.run([sys.executable, "-m", "vsproxy", "--socket", os.path.join(workdir, "s"),
                            "--uds-path", os.path.join(workdir, "u"), *argv],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(path)


def test_a_guest_stream_through_a_lossless_capture_read_slowly_is_in_the_file_byte_for_byte(workdir: str) -> None:
    """vsproxy's data path (C paths included) waits for a FIFO read late and slowly: the guest's
    transfer completes, and the capture holds every RW packet and every byte of it."""
    a = os.path.join(workdir, "a.sock")
    uds = os.path.join(workdir, "h.sock")
    fifo = os.path.join(workdir, "cap.fifo")
    os.mkfifo(fifo)
    reader = SlowReader(fifo, delay=1.0, chunk=256 * 1024, every=0.005)
    vp = VsproxyProcess(["--socket", a, "--guest-cid", "5", "--uds-path", uds, "--pcap", fifo, "--pcap-lossless",
                         "--pcap-buffer", str(MIN_QUEUE_BYTES)], a, os.path.join(workdir, "vsproxy.log"))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{uds}_5000")
    srv.listen(1)
    received = bytearray()

    def sink() -> None:
        c, _ = srv.accept()
        with c:
            while data := c.recv(1 << 20):
                received.extend(data)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    sent = bytes(range(256)) * (32 * 4096)  # 32 MiB: 16 times the capture's ring
    try:
        with SimGuest(a, timeout=60) as g:
            s = g.connect(5000, cid=2)
            s.sendall(sent)
            s.close()
        t.join(60)
    finally:
        status = vp.stop()
        srv.close()
    reader.join(60)
    assert bytes(received) == sent
    report = vp.log()
    exits = re.findall(r"capture: packets=(\d+) bytes=\d+ dropped=(\d+) files=\d+ waits=(\d+)", report)
    assert status == 0 and exits, report[-3000:]
    m = re.match(r"(\d+) (\d+) (\d+)", " ".join(exits[-1]))  # the exit report: every packet written
    assert m
    assert int(m.group(2)) == 0 and int(m.group(3)) > 0, report
    pkts = [dissect(r) for r in records(io.BytesIO(bytes(reader.data)))]
    rw = b"".join(p.payload for p in pkts
                  if p.hdr is not None and p.hdr.op == H.Op.RW and p.hdr.dst_port == 5000)
    assert rw == sent
    assert len(pkts) == int(m.group(1))
