"""Fan-out of the capture stream (vsproxy.capture.hub): every subscriber has its own bounded
queue and drop counts; a stalled one loses records, counted, and slows nobody; a live
subscriber's stream is a capture on its own; attaching one never turns the C paths off."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import unix_server, wait_for

from vsproxy.app import Proxy
from vsproxy.capture import format as fmt
from vsproxy.capture.hub import CaptureHub, Piece, Subscription, stream_header
from vsproxy.capture.reader import records
from vsproxy.capture.writer import CaptureOptions, CaptureWriter
from vsproxy.device import DeviceConfig
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.simguest import SimGuest
from vsproxy.taps import CAP_PCAP, CAP_PCAPNG
from vsproxy.vsock import header as H

MiB = 1 << 20


class Reader(threading.Thread):
    """A live subscriber's consumer thread: reads until the subscription ends, keeping the
    first ``keep`` bytes of whole pieces (a valid capture prefix) and counting the rest."""

    def __init__(self, sub: Subscription, keep: int = 1 << 62) -> None:
        super().__init__(daemon=True)
        self.sub = sub
        self.keep = keep
        self.kept = bytearray()
        self.total = 0
        self.start()

    def run(self) -> None:
        while True:
            data = self.sub.read(1.0)
            if not data:
                if self.sub.closed:
                    return
                continue
            self.total += len(data)
            if len(self.kept) + len(data) <= self.keep:
                self.kept += data


class CountingSink(threading.Thread):
    """A host service that reads and counts (keeps nothing)."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.got = 0
        self.start()

    def run(self) -> None:
        c, _ = self.srv.accept()
        buf = bytearray(1 << 20)
        while n := c.recv_into(buf):
            self.got += n
        c.close()
        self.srv.close()


@pytest.fixture
def proxy(workdir: str) -> Iterator[Proxy]:
    cfg = DeviceConfig(5, os.path.join(workdir, "a.sock"), name="A",
                       endpoints=HostEndpoints(uds_path=os.path.join(workdir, "h")))
    p = Proxy([cfg])
    yield p
    p.stop()
    p.close()


def run(p: Proxy) -> threading.Thread:
    p.start()
    t = threading.Thread(target=p.run, daemon=True)
    t.start()
    return t


def record_blob(i: int, n: int) -> bytes:
    head, body = fmt.vsockmon_parts(H.pack(5, 2, 1, 2, n, 1, H.Op.RW, 0, 0, i), bytes([i & 0xFF]) * n)
    return b"".join(fmt.pcapng_epb_parts(0, 1.0, head, body, inbound=True))


def is_subsequence(part: list[bytes], whole: list[bytes]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def tshark_count(stream: bytes) -> int:
    p = subprocess.run(["tshark", "-r", "-", "-T", "fields", "-e", "frame.number"], input=stream,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    return len(p.stdout.split())


def test_a_stalled_subscriber_loses_records_counted_and_the_reading_one_gets_every_record_byte_exact() -> None:
    hub = CaptureHub(["dev"], ring_bytes=16 * MiB)  # room for every record: the ring itself drops nothing
    reading = hub.subscribe(64 * MiB)
    stalled = hub.subscribe(100_000)
    reader = Reader(reading)
    blobs = [record_blob(i, 1 + (i * 53) % 1500) for i in range(3000)]
    for i in range(0, len(blobs), 10):  # ten records at a time, as a Python batch commits them
        hub.commit(b"".join(blobs[i : i + 10]), 10)
    hub.close()
    reader.join(10)
    assert hub.stats.dropped == 0 and hub.stats.py_records == 3000
    assert bytes(reader.kept) == stream_header(CAP_PCAPNG, ["dev"]) + b"".join(blobs)  # every record, in order
    assert reading.dropped == 0 and reading.records == 3000
    # the stalled one: what fit its queue, whole records, and the count of the rest
    kept = stalled.take()
    got = list(records(io.BytesIO(kept)))
    assert 0 < len(got) and stalled.dropped > 0 and len(got) + stalled.dropped == 3000
    assert [r.frame for r in got] == [r.frame for r in records(io.BytesIO(reader.kept))][: len(got)]
    assert len(kept) <= 100_000 and stalled.dropped_bytes == len(b"".join(blobs)) - (len(kept) - len(
        stream_header(CAP_PCAPNG, ["dev"])))
    assert stalled.closed and stalled.read(0) == b""


def test_two_live_subscribers_beside_the_pcap_file_the_reading_one_matches_the_file_byte_for_byte(
        proxy: Proxy, workdir: str) -> None:
    cap = os.path.join(workdir, "out.pcapng")
    proxy.start_capture(CaptureOptions(cap))
    t = run(proxy)
    reading = proxy.subscribe_packets(256 * MiB)
    stalled = proxy.subscribe_packets(MiB)  # never read until the end
    reader = Reader(reading)
    assert proxy.capture_hub is proxy.capture and not proxy.switch.taps.per_packet
    sinks = [unix_server(os.path.join(workdir, f"h_{5000 + i}"), sink=True) for i in range(3)]
    payloads = [os.urandom(3 * MiB + 17 * i) for i in range(3)]
    try:
        with SimGuest(os.path.join(workdir, "a.sock"), timeout=30) as g:
            for i, data in enumerate(payloads):
                s = g.connect(5000 + i)
                s.sendall(data)
                s.shutdown_write()
                assert s.recv_all(timeout=30) == b""
                s.close()
        wait_for(lambda: len([r for s in sinks for r in s.received]) == 3, what="the host services to finish")
        assert sorted(r for s in sinks for r in s.received) == sorted(payloads)
        rows = proxy.snapshot().capture
        assert rows is not None
        live = rows["live"]
        assert live["subscribers"] == 2 and live["subscriber_dropped"] == stalled.dropped > 0
    finally:
        for srv in sinks:
            srv.close()
    proxy.stop()
    t.join(10)
    proxy.stop_capture()  # the file is complete, and the live streams end
    reader.join(10)
    with open(cap, "rb") as f:
        file_bytes = f.read()
    counters = proxy.capture.counters if proxy.capture is not None else None
    assert counters is not None and counters.dropped == 0 and reading.dropped == 0
    assert bytes(reader.kept) == file_bytes  # the same header, the same records, byte for byte
    recs = list(records(io.BytesIO(file_bytes)))
    assert len(recs) == counters.packets == reading.records
    assert sum(len(r.frame) - 44 for r in recs) >= sum(map(len, payloads))  # the data crossed, captured
    got = list(records(io.BytesIO(stalled.take())))  # what fit, whole records, and it knows what it missed
    assert got and is_subsequence([r.frame for r in got], [r.frame for r in recs])
    assert len(got) + stalled.dropped == counters.packets


@pytest.mark.c_paths
def test_a_subscriber_attached_during_a_bulk_transfer_keeps_the_c_paths_on_and_reads_a_valid_capture(
        proxy: Proxy, workdir: str) -> None:
    t = run(proxy)
    assert proxy.switch.taps.sink is None  # no --pcap: nothing captures until someone subscribes
    sink = CountingSink(os.path.join(workdir, "h_6000"))
    count, payload = 8000, 65536
    errors: list[BaseException] = []

    def blast() -> None:
        try:
            with SimGuest(os.path.join(workdir, "a.sock"), timeout=60, rx_buf_size=65580, record_limit=0) as g:
                s = g.connect(6000)
                s.blast(b"\xa5" * payload, count)
                s.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    guest = threading.Thread(target=blast, daemon=True)
    guest.start()
    wait_for(lambda: sink.got > 32 * MiB, 30, "the transfer to be under way")
    sub = proxy.subscribe_packets(64 * MiB)
    reader = Reader(sub, keep=16 * MiB)
    hub = proxy.capture_hub
    assert hub is not None and not proxy.switch.taps.per_packet
    wait_for(lambda: hub.stats.c_records > 0, 10, "records written by the C paths")
    first = hub.stats.c_records
    wait_for(lambda: hub.stats.c_records > first + 100, 10, "the C paths to go on writing records")
    assert sink.got < count * payload, "the transfer ended before the C paths were seen capturing"
    guest.join(120)
    sink.join(30)
    assert not errors, errors
    assert sink.got == count * payload
    sub.close()  # the last subscriber: the sink goes
    assert proxy.switch.taps.sink is None and proxy.capture_hub is None
    reader.join(10)
    assert hub.stats.c_records > hub.stats.py_records  # the bulk went through C, captured
    recs = list(records(io.BytesIO(reader.kept)))
    assert len(recs) > 100 and all(r.interface == "A" for r in recs)
    assert tshark_count(bytes(reader.kept)) == len(recs)
    assert sub.dropped_bytes == 0  # the reader kept up (a 64 MiB queue): its queue dropped nothing
    # a subscriber after the last left: a fresh sink, and a fresh stream header
    again = proxy.subscribe_packets()
    assert proxy.switch.taps.sink is again.hub and again.take() == stream_header(CAP_PCAPNG, ["A"])
    again.close()
    assert proxy.switch.taps.sink is None
    proxy.stop()
    t.join(10)


def test_a_live_stream_is_classic_pcap_when_the_file_capture_chose_pcap(proxy: Proxy, workdir: str) -> None:
    proxy.start_capture(CaptureOptions(os.path.join(workdir, "out.pcap"), "pcap", flush=True))
    t = run(proxy)
    sub = proxy.subscribe_packets()
    srv = unix_server(os.path.join(workdir, "h_7000"))
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(7000)
            s.sendall(b"hello pcap")
            assert s.recv_exactly(10, timeout=10) == b"hello pcap"
            s.close()
    finally:
        srv.close()
    stream = bytearray()

    def more() -> bool:
        stream.extend(sub.take())
        return b"hello pcap" in stream

    wait_for(more, 10, "the records")
    assert bytes(stream).startswith(stream_header(CAP_PCAP, ["A"]))
    recs = list(records(io.BytesIO(bytes(stream))))
    assert any(r.frame.endswith(b"hello pcap") for r in recs)
    assert tshark_count(bytes(stream)) == len(recs)
    sub.close()
    assert proxy.switch.taps.sink is proxy.capture  # the file capture goes on
    proxy.stop()
    t.join(10)


def test_subscription_read_waits_and_ends() -> None:
    hub = CaptureHub(["a", "b"], flush=True)
    sub = hub.subscribe(MiB)
    assert sub.read(0) == stream_header(CAP_PCAPNG, ["a", "b"])
    start = time.monotonic()
    assert sub.read(0.2) == b"" and time.monotonic() - start >= 0.19  # nothing yet: waits, then b""
    blob = record_blob(1, 10)
    hub.commit(blob, 1)
    assert sub.read(5) == blob
    sub.close()
    assert sub.closed and sub.read(None) == b"" and hub.subscriptions == ()
    hub.close()


def test_when_every_subscriber_is_stalled_the_data_path_writes_no_records_and_counts_them_dropped() -> None:
    hub = CaptureHub(["dev"], ring_bytes=4 * MiB)
    stalled = hub.subscribe(300_000)
    blob = record_blob(1, 1000)
    try:
        assert hub.accepting and hub.reserve() is not None  # a taker with room: records are written
        hub.release(hub._filling, hub._filling.used, 0)
        for _ in range(400):  # more than the stalled queue holds
            hub.commit(blob, 1)
        wait_for(lambda: not hub.accepting, 5, "the gate to close behind a full queue")
        before = hub.stats.py_records
        assert hub.reserve() is None  # C lends no chunk: nothing written, the caller counts its packets
        hub.drop(7)
        hub.commit(blob, 1)  # nor does the Python path copy one
        assert hub.stats.py_records == before
        missed = stalled.dropped
        assert missed >= 8  # its drops include what the data path did not write
        got = stalled.take()  # it reads again: the gate opens at once
        assert got and hub.accepting
        hub.commit(blob, 1)
        assert hub.stats.py_records == before + 1
    finally:
        hub.close()


def test_a_file_keeps_the_gate_open_whatever_the_live_subscribers_do(workdir: str) -> None:
    w = CaptureWriter(CaptureOptions(os.path.join(workdir, "f.pcapng")), ["dev"])
    stalled = w.subscribe(10_000)
    try:
        for _ in range(200):
            w.commit(record_blob(2, 1000), 1)
        time.sleep(0.5)  # the distribution thread's turns
        assert w.accepting and stalled.dropped > 0
    finally:
        w.close()


def test_a_second_lend_while_one_chunk_is_lent_gets_nothing_instead_of_the_same_chunk() -> None:
    hub = CaptureHub(["dev"], ring_bytes=4 * MiB)
    sub = hub.subscribe(MiB)
    try:
        chunk = hub.reserve()
        assert chunk is not None
        assert hub.reserve() is None  # two writers in one chunk would corrupt it
        before = hub.stats.dropped
        hub.commit(record_blob(3, 10), 1)  # a Python record while C writes past used: dropped, counted
        assert hub.stats.dropped == before + 1
        hub.release(chunk, chunk.used, 0)
        hub.commit(record_blob(3, 10), 1)
        assert hub.stats.py_records == 1
    finally:
        sub.close()
        hub.close()


def _free(hub: CaptureHub) -> int:
    with hub._lock:
        return len(hub._free)


def test_pieces_are_views_of_the_ring_and_give_the_chunk_back_when_released() -> None:
    hub = CaptureHub(["dev"], ring_bytes=16 * MiB, flush=True)  # 4 chunks: 3 free, 1 filling
    sub = hub.subscribe(8 * MiB, header=False)
    try:
        blob = record_blob(1, 100)
        hub.commit(blob, 1)
        wait_for(lambda: sub.queued > 0, 5, "the record to reach the subscriber")
        piece = sub.read_piece(0)
        assert piece is not None and isinstance(piece.data, memoryview) and bytes(piece.data) == blob
        assert piece.records == 1
        away, view = _free(hub), piece.data
        piece.release()
        assert _free(hub) == away + 1  # the chunk is back in the ring, and only now
        assert len(piece.data) == 0
        with pytest.raises(ValueError):
            bytes(view)  # the view was let go with it: the chunk may be written again
        piece.release()  # idempotent
        assert _free(hub) == away + 1
    finally:
        hub.close()


def test_pieces_a_subscriber_holds_take_at_most_half_the_ring_then_it_gets_copies() -> None:
    hub = CaptureHub(["dev"], ring_bytes=32 * MiB, flush=True)  # 8 chunks of 4 MiB: 3 may be shared
    sub = hub.subscribe(64 * MiB, header=False)  # room for far more than the ring
    held = []
    try:
        blob = record_blob(1, 100)
        for _ in range(8):
            hub.commit(blob, 1)
            wait_for(lambda: sub.queued > 0, 5, "the record to reach the subscriber")
            piece = sub.read_piece(0)
            assert piece is not None and bytes(piece.data) == blob
            held.append(piece)  # never released: a client stuck in sendall
        shared = [p for p in held if isinstance(p.data, memoryview)]
        assert len(shared) == 3 and all(isinstance(p.data, bytes) for p in held[3:])
        assert _free(hub) == 4  # the data path keeps the larger part (and one chunk being filled)
        for p in held:
            p.release()
        wait_for(lambda: _free(hub) == 7, 5, "every chunk back in the ring")
    finally:
        hub.close()


def test_a_detached_subscription_keeps_what_it_had_queued_but_lets_the_ring_have_its_chunks() -> None:
    hub = CaptureHub(["dev"], ring_bytes=32 * MiB, flush=True)
    sub = hub.subscribe(8 * MiB, header=False)
    try:
        blobs = [record_blob(1, n) for n in (10, 20, 30)]
        for n, b in enumerate(blobs, 1):
            hub.commit(b, 1)
            wait_for(lambda n=n: sub.records >= n, 5, "the record to reach the subscriber")  # type: ignore[misc]
        before = _free(hub)
        sub.close()
        assert _free(hub) == before + 3  # each piece's chunk went back
        assert sub.take() == b"".join(blobs)  # and what was queued is still there, unchanged
    finally:
        hub.close()


def test_a_piece_cut_to_fit_a_queue_holds_its_chunk_until_read() -> None:
    hub = CaptureHub(["dev"], ring_bytes=16 * MiB)
    small = record_blob(1, 50_000)
    sub = hub.subscribe(len(small) * 3, header=False)  # room for three of the ten records
    try:
        before = _free(hub)
        hub.commit(small * 10, 10)
        with hub._lock:  # the chunk goes out now (as a full one would)
            hub._next_chunk(hub._filling)
        wait_for(lambda: sub.records == 3, 5, "the records that fit")
        assert sub.dropped == 7
        assert _free(hub) == before - 1  # the cut piece still holds the chunk
        piece = sub.read_piece(0)
        assert piece is not None and bytes(piece.data) == small * 3
        piece.release()
        assert _free(hub) == before
    finally:
        hub.close()


MON = fmt.VSOCKMON.size  # af_vsockmon_hdr


def _epb_lengths(stream: bytes) -> list[tuple[int, int]]:
    """(captured, original) length of every Enhanced Packet Block of a pcapng stream."""
    out, off = [], 0
    while off + 12 <= len(stream):
        btype, total = struct.unpack_from("<II", stream, off)
        if btype == fmt.BT_EPB:
            out.append(struct.unpack_from("<II", stream, off + 20))
        off += total
    return out


@pytest.mark.parametrize("c_paths", [pytest.param(True, marks=pytest.mark.c_paths), False], ids=["c", "python"])
def test_a_snaplen_subscriber_gets_records_cut_to_its_snaplen_with_each_packets_whole_length(
        proxy: Proxy, workdir: str, c_paths: bool) -> None:
    if not c_paths:  # a per-packet tap turns the C paths off: every record is formatted in Python
        proxy.switch.taps.add(lambda *a: None)
    t = run(proxy)
    sub = proxy.subscribe_packets(64 * MiB, snaplen=100)
    assert proxy.capture_hub is not None and proxy.capture_hub.snaplen == 100
    reader = Reader(sub)
    srv = unix_server(os.path.join(workdir, "h_7000"))
    data = os.urandom(300_000)
    try:
        with SimGuest(os.path.join(workdir, "a.sock"), timeout=30, rx_buf_size=65580) as g:
            s = g.connect(7000)
            s.sendall(data)
            got = b""
            while len(got) < len(data):
                got += s.recv(1 << 20, timeout=10)
            assert got == data
            s.close()
    finally:
        srv.close()
    wait_for(lambda: sub.records > 0 and proxy.capture_hub is not None and proxy.capture_hub.stats.chunks > 0, 5,
             "records")
    time.sleep(0.3)  # the chunk being filled reaches the subscriber
    hub = proxy.capture_hub
    assert hub is not None and (hub.stats.c_records > 0 if c_paths else hub.stats.c_records == 0)
    sub.close()
    reader.join(10)
    stream = bytes(reader.kept)
    lengths = _epb_lengths(stream)
    recs = list(records(io.BytesIO(stream)))
    rw = [(r, n) for r, n in zip(recs, lengths, strict=True) if r.frame[MON + 30] == H.Op.RW]
    assert rw and sum(struct.unpack_from("<I", r.frame, MON + 24)[0] for r, _ in rw) == 2 * len(data)  # both ways
    head = MON + H.HDR_SIZE
    for r, (cap, orig) in rw:
        plen = struct.unpack_from("<I", r.frame, MON + 24)[0]
        assert cap == len(r.frame) == head + min(plen, 100) and orig == head + plen
        assert r.frame[head:] in data  # the payload's first bytes
    assert any(orig > cap for cap, orig in lengths)
    p = subprocess.run(["tshark", "-r", "-", "-T", "fields", "-e", "frame.len", "-e", "frame.cap_len"], input=stream,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    pairs = [tuple(int(x) for x in line.split("\t")) for line in p.stdout.decode().splitlines()]
    assert pairs == [(orig, cap) for cap, orig in lengths]
    proxy.stop()
    t.join(10)


def test_the_records_keep_what_the_subscriber_that_needs_most_needs_and_a_file_needs_everything(
        workdir: str) -> None:
    hub = CaptureHub(["dev"])
    try:
        a = hub.subscribe(MiB, snaplen=64)
        assert hub.snaplen == 64
        b = hub.subscribe(MiB, snaplen=4096)
        assert hub.snaplen == 4096
        full = hub.subscribe(MiB)
        assert hub.snaplen == 0
        full.close()
        b.close()
        assert hub.snaplen == 64
        a.close()
        assert hub.snaplen == 0
    finally:
        hub.close()
    w = CaptureWriter(CaptureOptions(os.path.join(workdir, "f.pcapng")), ["dev"])
    try:
        w.subscribe(MiB, snaplen=64)
        assert w.snaplen == 0  # the file keeps every byte
    finally:
        w.close()
    with pytest.raises(ValueError):
        CaptureHub(["dev"]).subscribe(MiB, snaplen=-1)


def test_subscribers_holding_and_releasing_pieces_out_of_order_lose_nothing_uncounted_and_leak_no_chunk() -> None:
    import random

    rng = random.Random(7)
    hub = CaptureHub(["dev"], ring_bytes=32 * MiB, flush=True)
    nchunks = len(hub._free) + 1
    holder = hub.subscribe(16 * MiB, header=False)  # keeps up to 6 pieces, lets them go in any order
    copier = hub.subscribe(16 * MiB, header=False)  # read(): copies
    leaver = hub.subscribe(4 * MiB, header=False)  # never reads; detaches half way
    blobs = [record_blob(i, 1 + rng.randrange(20_000)) for i in range(4000)]
    got: dict[str, list[bytes]] = {"holder": [], "copier": []}
    done = threading.Event()

    def hold() -> None:
        held: list[Piece] = []
        while not (done.is_set() and holder.closed and not holder.queued):
            piece = holder.read_piece(0.05)
            if piece is not None:
                got["holder"].append(bytes(piece.data))
                held.append(piece)
            while len(held) > 6 or (held and (piece is None or rng.random() < 0.3)):
                held.pop(rng.randrange(len(held))).release()
        for piece in held:
            piece.release()

    def copy() -> None:
        while not (done.is_set() and copier.closed and not copier.queued):
            data = copier.read(0.05)
            if data:
                got["copier"].append(data)

    threads = [threading.Thread(target=hold), threading.Thread(target=copy)]
    for t in threads:
        t.start()
    for i in range(0, len(blobs), 8):
        hub.commit(b"".join(blobs[i : i + 8]), 8)
        if i == len(blobs) // 2:
            leaver.close()
        if i % 400 == 0:
            time.sleep(0.01)
    hub.close()
    done.set()
    for t in threads:
        t.join(30)
    produced = [r.frame for r in records(io.BytesIO(fmt.pcapng_shb() + fmt.pcapng_idb("dev") + b"".join(blobs)))]
    for name, sub in (("holder", holder), ("copier", copier)):
        frames = [r.frame for r in records(io.BytesIO(fmt.pcapng_shb() + fmt.pcapng_idb("dev")
                                                      + b"".join(got[name])))]
        assert is_subsequence(frames, produced)  # in order, byte for byte
        assert len(frames) + sub.dropped == len(produced), name  # and every missing record counted
    with hub._lock:
        assert len(hub._free) == nchunks - 1 and hub._away == 0  # every chunk came back
