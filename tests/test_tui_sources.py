"""The TUI's sources and bad input: damaged, foreign and garbage files open with a clear message
and what could be read; a live pcapng stream from a pipe into the bounded ring, in tail mode;
a capture file followed as it grows; rotated sets in order."""

from __future__ import annotations

import os
import struct

from tui_helpers import CAPTURES, plist, status_text, sync, until

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import records
from vsproxy.tui.app import TuiApp
from vsproxy.tui.model import BAD
from vsproxy.tui.sources import FileSource, StreamSource
from vsproxy.vsock import header as H


def frame(i: int, payload: bytes = b"") -> bytes:
    hdr = H.pack(5, 2, 1024, 8000 + i % 3, len(payload), 1, H.Op.RW if payload else H.Op.REQUEST, 0, 262144, 0)
    return fmt.vsockmon_frame(hdr, payload)


def loaded(path: str, follow: bool = False) -> FileSource:
    src = FileSource([path], follow=follow)
    src.start()
    if not follow:
        src.join(10)
    return src


@sync
async def test_a_damaged_capture_opens_with_a_clear_message_and_what_could_be_read(workdir: str) -> None:
    data = (CAPTURES / "http-over-vsock.pcapng").read_bytes()
    path = os.path.join(workdir, "cut.pcapng")
    with open(path, "wb") as f:
        f.write(data[: len(data) - 100])  # the last record cut short
    app = TuiApp(loaded(path))
    async with app.run_test(size=(120, 24)) as pilot:
        await pilot.pause(0.3)
        status = status_text(app)
        assert "damaged capture: truncated" in status and "(read 8 packets before it)" in status
        assert plist(app).count == 8


@sync
async def test_a_capture_of_another_link_type_or_no_capture_at_all_says_so(workdir: str) -> None:
    eth = os.path.join(workdir, "eth.pcap")
    with open(eth, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    junk = os.path.join(workdir, "junk.pcapng")
    with open(junk, "wb") as f:
        f.write(b"this is not a capture at all\n" * 10)
    for path, want in ((eth, "link type 1 is not LINKTYPE_VSOCK"), (junk, "not a pcap or pcapng file")):
        app = TuiApp(loaded(path))
        async with app.run_test(size=(100, 24)) as pilot:
            await pilot.pause(0.2)
            assert want in status_text(app)
            assert plist(app).count == 0


@sync
async def test_a_frame_too_short_to_decode_is_shown_as_bad_and_counted(workdir: str) -> None:
    path = os.path.join(workdir, "short.pcapng")
    with open(path, "wb") as f:
        f.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
        f.write(fmt.pcapng_epb(0, 1.0, frame(0), inbound=True))
        f.write(fmt.pcapng_epb(0, 2.0, b"\x01\x02\x03", inbound=True))
        f.write(fmt.pcapng_epb(0, 3.0, frame(1, b"hi"), inbound=True))
    src = loaded(path)
    assert src.error is None and src.store.bad_frames == 1 and src.store.flags(1) & BAD
    app = TuiApp(src)
    async with app.run_test(size=(100, 24)) as pilot:
        plist(app).move_to(1)
        await pilot.pause(0.2)
        assert "1 bad frames" in status_text(app)
        assert "bad frame: 3 bytes" in src.store.line(1)


@sync
async def test_a_live_stream_from_a_pipe_fills_the_ring_in_tail_mode() -> None:
    r, w = os.pipe()
    src = StreamSource(os.fdopen(r, "rb"), "pipe", limit=5)
    src.start()
    writer = os.fdopen(w, "wb")
    try:
        writer.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
        for i in range(3):
            writer.write(fmt.pcapng_epb(0, 100.0 + i, frame(i), inbound=True))
        writer.flush()
        app = TuiApp(src)
        async with app.run_test(size=(100, 24)) as pilot:
            await until(pilot, lambda: plist(app).count == 3, what="3 packets")
            assert plist(app).current == 2  # tail mode: on the newest
            for i in range(3, 12):
                writer.write(fmt.pcapng_epb(0, 100.0 + i, frame(i), inbound=True))
            writer.flush()
            await until(pilot, lambda: src.store.total == 12, what="12 packets")
            await until(pilot, lambda: plist(app).current == 11, what="the tail")
            assert plist(app).count == 5 and src.store.first == 7  # the ring keeps the newest 5
            assert "ring: 7 oldest dropped (--store 5)" in status_text(app)
            plist(app).move_to(0)  # the user scrolls up: tail mode ends
            assert not plist(app).tail
            writer.write(fmt.pcapng_epb(0, 200.0, frame(20), inbound=True))
            writer.flush()
            await until(pilot, lambda: src.store.total == 13, what="13 packets")
            await pilot.pause(0.4)
            assert not plist(app).tail and plist(app).current != 12
            await pilot.press("p")  # paused: the store still takes packets, the list stays
            shown = plist(app).count
            writer.write(fmt.pcapng_epb(0, 201.0, frame(21), inbound=True))
            writer.flush()
            await until(pilot, lambda: src.store.total == 14, what="14 packets")
            await pilot.pause(0.4)
            assert "PAUSED (+1 new)" in status_text(app) and plist(app).count == shown
    finally:
        writer.close()
        src.close()


@sync
async def test_a_growing_capture_file_is_followed(workdir: str) -> None:
    path = os.path.join(workdir, "grow.pcapng")
    f = open(path, "wb")
    try:
        f.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
        f.write(fmt.pcapng_epb(0, 1.0, frame(0), inbound=True))
        f.flush()
        src = loaded(path, follow=True)
        app = TuiApp(src)
        async with app.run_test(size=(100, 24)) as pilot:
            await until(pilot, lambda: plist(app).count == 1, what="the first packet")
            block = fmt.pcapng_epb(0, 2.0, frame(1, b"more"), inbound=False)
            f.write(block[:10])  # half a block: nothing new yet, no error
            f.flush()
            await pilot.pause(0.3)
            assert src.error is None and plist(app).count == 1
            f.write(block[10:])
            f.flush()
            await until(pilot, lambda: plist(app).count == 2, what="the appended packet")
            assert "RW" in src.store.line(1)
    finally:
        f.close()


def test_a_rotated_set_is_read_in_number_order(workdir: str) -> None:
    base = os.path.join(workdir, "rot.pcapng")
    for n, ts in ((1, 20.0), (0, 10.0), (2, 30.0)):
        with open(f"{base}.{n}", "wb") as f:
            f.write(fmt.pcapng_shb() + fmt.pcapng_idb("app"))
            f.write(fmt.pcapng_epb(0, ts, frame(n), inbound=True))
    from vsproxy.decode import capture_files

    src = FileSource(capture_files(base))
    src.start()
    src.join(10)
    assert [src.store.record(i).ts for i in range(3)] == [10.0, 20.0, 30.0]
    with open(f"{base}.2", "rb") as f:
        assert src.store.record(2) == next(records(f))
    src.close()
