"""The live ingest process (``vsproxy.tui.ingest``): what it indexes is what the store indexes
when it decodes in-process (same rows, flags, connections, devices, lines) on every capture in
captures/; the UI's ring stays bounded under a long live feed; a damaged record in a live
stream is counted as bad and shown; when decoding falls behind, records are dropped, counted
and shown, and the writer is not held back."""

from __future__ import annotations

import io
import os
import threading

import pytest
from tui_helpers import CAPTURES, plist, status_text, sync, until

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, records
from vsproxy.tui.app import TuiApp
from vsproxy.tui.ingest import SEND_ROWS, IngestProcess
from vsproxy.tui.model import BAD, Store
from vsproxy.tui.sources import StreamSource
from vsproxy.vsock import header as H

FIXTURES = sorted(p.name for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng"))


def in_process(path: str) -> Store:
    store = Store(limit=1_000_000)
    with open(path, "rb") as f:
        store.feed_many((r, -1) for r in records(f))
    return store


def through_ingest(path: str, limit: int = 1_000_000) -> Store:
    store = Store(limit=limit)
    with open(path, "rb") as f:
        ingest = IngestProcess(store, f.fileno())
        try:
            assert ingest.pump() is None
        finally:
            ingest.stop()
    assert ingest.drops == 0
    return store


@pytest.mark.parametrize("name", FIXTURES)
def test_the_ingest_process_indexes_each_capture_as_the_in_process_decoder_does(name: str) -> None:
    path = str(CAPTURES / name)
    want, got = in_process(path), through_ingest(path)
    assert got.total == want.total > 0 and got.bad_frames == want.bad_frames
    for i in range(want.total):
        assert got.record(i) == want.record(i), i
        assert got.flags(i) == want.flags(i), i
        assert got.conn_of(i) == want.conn_of(i), i
        assert got.direction(i) == want.direction(i), i
        assert got.app(i) == want.app(i), i
        assert got.line(i) == want.line(i), i
        gv, wv = got.view(i), want.view(i)
        if wv is None:
            assert gv is None, i
        else:
            assert gv is not None and (gv.proto, gv.app, gv.comment) == (wv.proto, wv.app, wv.comment), i
    assert got.conns == want.conns
    assert got.devices == want.devices
    assert got.dev_names == want.dev_names


def test_the_denied_capture_keeps_its_verdicts_and_rules_through_the_ingest_process() -> None:
    got = through_ingest(str(CAPTURES / "sibling-denied.pcapng"))
    denied = [row for row in got.conns.values() if row.verdict == "denied"]
    assert denied and all(row.rule for row in denied)  # the rule named in the comment
    assert any(got.flags(i) & 1 for i in range(got.total))  # DENIED on its packets
    assert sum(d.denied for d in got.devices.values()) > 0


def packet(i: int, payload: bytes = b"") -> bytes:
    """A packet of connection i // 4: REQUEST, RESPONSE, then two RW (HTTP, so messages end)."""
    op = (H.Op.REQUEST, H.Op.RESPONSE, H.Op.RW, H.Op.RW)[i % 4]
    payload = b"GET /k HTTP/1.1\r\n\r\n" if op == H.Op.RW else payload
    server = i % 4 == 1
    src = (2, 8000) if server else (5, 1024 + (i // 4) % 50000)
    dst = (5, 1024 + (i // 4) % 50000) if server else (2, 8000)
    hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), 1, op, 0, 262144, i)
    return fmt.pcapng_epb(0, 1000.0 + i / 1000, fmt.vsockmon_frame(hdr, payload), inbound=not server)


def write_stream(w: int, blocks: list[bytes]) -> threading.Thread:
    def run() -> None:
        with os.fdopen(w, "wb") as out:
            out.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
            for k in range(0, len(blocks), 1000):
                out.write(b"".join(blocks[k : k + 1000]))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_ring_stays_bounded_under_a_long_live_feed() -> None:
    r, w = os.pipe()
    src = StreamSource(os.fdopen(r, "rb"), "pipe", limit=1000)
    src.start()
    n = 40_000
    writer = write_stream(w, [packet(i) for i in range(n)])
    try:
        writer.join(60)
        src.join(60)
        store = src.store
        assert src.error is None and src.drops == 0 and store.total == n
        assert len(store) == 1000 and store.first == n - 1000 and store.evicted == n - 1000
        # the frames held: the ring's packets and at most one batch more
        assert sum(len(off) - 1 for _, _, off in store._chunks) <= 1000 + SEND_ROWS
        assert all(k >= store.first for k in store._apps) and len(store._apps) <= 1000
        assert len(store.conns) <= 2 * 1000 // 4 + 1024 + 2  # gone connections leave too
        assert len(store._ts) == len(store._flags) == len(store._conn) == len(store._dir) == 1000
        assert store.record(n - 1).ts == pytest.approx(1000.0 + (n - 1) / 1000)
        assert "#" in store.line(n - 1) and "GET /k" in store.line(n - 1)  # its HTTP message, by the ingest process
        with pytest.raises(IndexError):
            store.record(n - 1001)
    finally:
        src.close()


@sync
async def test_a_damaged_record_in_a_live_stream_is_counted_as_bad_and_shown() -> None:
    r, w = os.pipe()
    src = StreamSource(os.fdopen(r, "rb"), "pipe", limit=100)
    src.start()
    blocks = [packet(i) for i in range(5)]
    blocks.append(fmt.pcapng_epb(0, 2000.0, b"\x01\x02\x03", inbound=True))  # shorter than af_vsockmon_hdr
    blocks += [packet(i) for i in range(5, 9)]
    writer = write_stream(w, blocks)
    try:
        app = TuiApp(src)
        async with app.run_test(size=(120, 24)) as pilot:
            await until(pilot, lambda: src.store.total == 10, what="10 packets")
            store = src.store
            assert store.bad_frames == 1 and store.flags(5) & BAD
            assert "bad frame: 3 bytes" in store.line(5)
            assert "RW" in store.line(8) and "HTTP GET /k" in store.line(8)  # the packets after it decoded as ever
            plist(app).move_to(5)
            await until(pilot, lambda: "1 bad frames" in status_text(app), what="the bad frame count")
        writer.join(10)
    finally:
        src.close()


@sync
async def test_a_damaged_block_ends_the_live_stream_with_one_line_and_keeps_what_came() -> None:
    r, w = os.pipe()
    src = StreamSource(os.fdopen(r, "rb"), "pipe", limit=100)
    src.start()
    bad = bytearray(packet(3))
    bad[-4:] = b"\xff\xff\x00\x00"  # its trailing length says otherwise
    writer = write_stream(w, [packet(i) for i in range(3)] + [bytes(bad)])
    try:
        app = TuiApp(src)
        async with app.run_test(size=(120, 24)) as pilot:
            await until(pilot, lambda: src.error is not None, what="the error")
            assert src.error is not None and src.error.startswith("damaged stream: block at byte ")
            assert "trailing length does not match (read 3 packets before it)" in src.error
            assert src.store.total == 3
            await until(pilot, lambda: "damaged stream" in status_text(app), what="the error shown")
        writer.join(10)
    finally:
        src.close()


@sync
async def test_when_decoding_falls_behind_records_are_dropped_counted_and_shown() -> None:
    r, w = os.pipe()
    src = StreamSource(os.fdopen(r, "rb"), "pipe", limit=100_000)
    src.high_water = 500  # a small backlog: the burst below is more than it decodes in time
    src.start()
    n = 60_000
    writer = write_stream(w, [packet(i) for i in range(n)])
    try:
        app = TuiApp(src)
        async with app.run_test(size=(140, 24)) as pilot:
            writer.join(30)
            assert not writer.is_alive()  # the writer was never held back for decoding
            await until(pilot, lambda: src.done, timeout=60, what="the end of the stream")
            assert src.error is None
            assert src.drops > 0 and src.store.total + src.drops == n
            await until(pilot, lambda: f"feed drops {src.drops:,}" in status_text(app), what="the drops shown")
    finally:
        src.close()


def test_a_truncated_stream_is_the_reader_s_error() -> None:
    """The ingest's own pcapng reading ends a cut stream as ``reader.records`` does."""
    from vsproxy.tui.ingest import _Input, stream_records

    data = fmt.pcapng_shb() + fmt.pcapng_idb("app") + packet(0) + packet(1)[:20]
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    got = []
    with pytest.raises(CaptureError, match="truncated"):
        for rec in stream_records(_Input(r, b"", lambda: None)):
            got.append(rec)
    os.close(r)
    assert len(got) == 1 and got[0].ts == 1000.0


def test_a_damaged_batch_is_one_error_line_not_a_traceback() -> None:
    from vsproxy.tui.ingest import IngestError, decode_batch, encode_batch

    store = Store(limit=100, keep_records=False)
    store.touched = set()
    recs = list(records(io.BytesIO(fmt.pcapng_shb() + fmt.pcapng_idb("app") + packet(0))))
    store.feed_many((r, -1) for r in recs)
    frame = encode_batch(store, recs, 0, 1, 0, 0)
    batch, drops = decode_batch(frame[8:])
    assert batch.n == 1 and drops == 0 and batch.dev_names == ["app"] and batch.frames == recs[0].frame
    for cut in (frame[8:20], frame[8:-3], b"\x05\x00\x00\x00junk!"):
        with pytest.raises(IngestError, match=r"a damaged batch from the ingest process|shorter than its rows"):
            decode_batch(cut)
