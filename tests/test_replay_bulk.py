"""Guest replay's stored payload (vsproxy/replay/bulk.py), sans-I/O: a transcript that leaves what
the guest sent in the capture file holds the same steps as the ordinary one, its pieces read
back are the very bytes (pcap and pcapng, the committed captures and synthetic ones), it does
not hold the payload in memory, a damaged or changed file is said so, and the replay plan keeps
each send at its recorded time unless asap, where consecutive sends become one."""

from __future__ import annotations

import os
import random
import tracemalloc
from pathlib import Path

import pytest

from vsproxy.capture import format as fmt
from vsproxy.replay.bulk import CaptureSource, SendStored, StoredData, load_indexed, plan_stored
from vsproxy.replay.client import Await, Send, plan
from vsproxy.replay.transcript import Data, load_transcript
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
CAPTURES = sorted((REPO / "captures").glob("*.pcap*"))
GUEST, HOST = 5, 2


class Writer:
    """A capture of one device, pcapng or classic pcap, written packet by packet."""

    def __init__(self, path: Path, pcapng: bool = True) -> None:
        self.f = open(path, "wb")
        self.pcapng = pcapng
        self.ts = 1_800_000_000.0
        self.f.write(fmt.pcapng_shb("test") + fmt.pcapng_idb("app") if pcapng else fmt.pcap_header())

    def packet(self, src: tuple[int, int], dst: tuple[int, int], op: int, payload: bytes = b"", flags: int = 0,
               type: int = H.Type.STREAM) -> None:
        self.ts += 0.001
        hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), type, op, flags, 262144, 0)
        frame = fmt.vsockmon_frame(hdr, payload)
        self.f.write(fmt.pcapng_epb(0, self.ts, frame, inbound=src[0] == GUEST) if self.pcapng
                     else fmt.pcap_record(self.ts, frame))

    def close(self) -> None:
        self.f.close()


def bulk_capture(path: Path, sizes: list[int], pcapng: bool = True, seed: int = 1) -> bytes:
    """A guest connection sending packets of ``sizes`` bytes, then a SEQPACKET one sending two
    messages (the first in two packets, with EOR; the second without); returns what the STREAM
    one sent."""
    rng = random.Random(seed)
    w = Writer(path, pcapng)
    g, h = (GUEST, 40_000), (HOST, 9000)
    w.packet(g, h, H.Op.REQUEST)
    w.packet(h, g, H.Op.RESPONSE)
    sent = bytearray()
    for n in sizes:
        chunk = rng.randbytes(n)
        sent += chunk
        w.packet(g, h, H.Op.RW, chunk)
    w.packet(g, h, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
    w.packet(h, g, H.Op.RW, b"done")
    w.packet(h, g, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    w.packet(g, h, H.Op.RST)
    q, s = (GUEST, 40_001), (HOST, 5005)
    seq = H.Type.SEQPACKET
    w.packet(q, s, H.Op.REQUEST, type=seq)
    w.packet(s, q, H.Op.RESPONSE, type=seq)
    w.packet(q, s, H.Op.RW, b"a" * 65536, type=seq)
    w.packet(q, s, H.Op.RW, b"b" * 1000, flags=H.SEQ_EOM | H.SEQ_EOR, type=seq)
    w.packet(s, q, H.Op.RW, b"ok", flags=H.SEQ_EOM, type=seq)
    w.packet(q, s, H.Op.RW, b"tail", flags=H.SEQ_EOM, type=seq)
    w.packet(q, s, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH, type=seq)
    w.packet(s, q, H.Op.RST, type=seq)
    w.close()
    return bytes(sent)


def read_back(d: StoredData, source: CaptureSource) -> bytes:
    p = d.pieces
    return b"".join(source.read(p.files[k], p.offs[k], p.lens[k]) for k in range(len(p)))


def same_steps_as_ordinary(path: str) -> int:
    """Compare load_indexed with load_transcript step by step; how many steps were stored."""
    plain = load_transcript(path)
    stored, source = load_indexed(path)
    stored_steps = 0
    try:
        assert stored.error == plain.error
        assert len(stored.conversations) == len(plain.conversations)
        for a, b in zip(plain.conversations, stored.conversations, strict=True):
            assert (a.id, a.client, a.server, a.outcome, a.lost, a.cut, a.closed) == \
                   (b.id, b.client, b.server, b.outcome, b.lost, b.cut, b.closed)
            assert len(a.steps) == len(b.steps)
            for x, y in zip(a.steps, b.steps, strict=True):
                if isinstance(y, StoredData):
                    stored_steps += 1
                    assert isinstance(x, Data) and y.data == b""
                    assert b.guest_is_client is not False and y.from_client
                    assert read_back(y, source) == x.data and y.size == len(x.data)
                    assert (x.time, x.eom, x.eor, x.app, x.packets) == (y.time, y.eom, y.eor, y.app, y.packets)
                else:
                    assert x == y
    finally:
        source.close()
    return stored_steps


@pytest.mark.parametrize("capture", CAPTURES, ids=[c.name for c in CAPTURES])
def test_stored_pieces_read_back_are_the_committed_captures_bytes(capture: Path) -> None:
    same_steps_as_ordinary(str(capture))


@pytest.mark.parametrize("pcapng", [True, False], ids=["pcapng", "pcap"])
def test_stored_pieces_read_back_are_the_bytes_the_guest_sent(tmp_path: Path, pcapng: bool) -> None:
    rng = random.Random(7)
    sizes = [rng.randint(1, 65536) for _ in range(60)] + [1, 2, 3, 65536]
    path = tmp_path / "bulk.cap"
    sent = bulk_capture(path, sizes, pcapng)
    t, source = load_indexed(str(path))
    try:
        stream, seq = t.conversations
        # every step of what the guest sent is stored, none held
        assert same_steps_as_ordinary(str(path)) == len(stream.data(True)) + len(seq.data(True))
        assert sum(len(d.pieces) for d in stream.data(True) if isinstance(d, StoredData)) == len(sizes)
        assert b"".join(read_back(d, source) for d in stream.data(True) if isinstance(d, StoredData)) == sent
        messages = [d for d in seq.data(True) if isinstance(d, StoredData)]
        assert [list(m.pieces.flags) for m in messages] == [[0, H.SEQ_EOM | H.SEQ_EOR], [H.SEQ_EOM]]
        assert stream.data(False)[0].data == b"done"  # what the peer answered is held, for comparison
    finally:
        source.close()


def test_indexing_a_large_capture_does_not_hold_its_payload(tmp_path: Path) -> None:
    path = tmp_path / "big.pcapng"
    bulk_capture(path, [65536] * 1024)  # 64 MiB the guest sent
    tracemalloc.start()
    try:
        t, source = load_indexed(str(path))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    source.close()
    assert sum(d.size for d in t.conversations[0].data(True) if isinstance(d, StoredData)) == 64 << 20
    assert peak < 4 << 20, f"indexing 64 MiB of payload took {peak} bytes at its peak"


def test_a_damaged_capture_says_where_as_the_ordinary_transcript_does(tmp_path: Path) -> None:
    path = tmp_path / "cut.pcapng"
    bulk_capture(path, [1000] * 5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 30])
    plain = load_transcript(str(path))
    stored, source = load_indexed(str(path))
    source.close()
    assert plain.error is not None and stored.error == plain.error
    assert same_steps_as_ordinary(str(path)) > 0


def test_a_capture_changed_after_it_was_read_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "changed.pcapng"
    bulk_capture(path, [4096] * 4)
    t, source = load_indexed(str(path))
    os.truncate(path, 200)
    steps = plan_stored(t.conversations[0], source, exact=True, asap=True)
    send = next(s for s in steps if isinstance(s, SendStored))
    with pytest.raises(OSError, match="ended inside a packet"):
        list(send.chunks())
    source.close()


def test_asap_merges_consecutive_sends_and_other_speeds_keep_each_at_its_time(tmp_path: Path) -> None:
    path = tmp_path / "plan.pcapng"
    bulk_capture(path, [100, 200, 300])
    t, source = load_indexed(str(path))
    try:
        stream, seq = t.conversations
        ordinary = plan(load_transcript(str(path)).conversations[0])
        timed = plan_stored(stream, source, exact=False, asap=False)
        assert len(timed) == len(ordinary)
        for a, b in zip(ordinary, timed, strict=True):
            if isinstance(a, Send):
                assert isinstance(b, SendStored) and b.at == a.at and b.pieces.size == len(a.data)
            else:
                assert a == b
        fast = plan_stored(stream, source, exact=False, asap=True)
        sends = [s for s in fast if isinstance(s, SendStored)]
        assert len(sends) == 1 and list(sends[0].pieces.lens) == [100, 200, 300]
        assert len([s for s in timed if isinstance(s, SendStored)]) == len(stream.data(True))
        # SEQPACKET: the answer to the first message is awaited before the second is sent
        kinds = [type(s).__name__ for s in plan_stored(seq, source, exact=False, asap=True)]
        assert kinds == ["SendStored", "Await", "SendStored", "ShutWrite", "Await"]
        assert isinstance(plan_stored(seq, source, False, True)[1], Await)
        chunks = list(sends[0].chunks())  # STREAM: read back a packet at a time, as recorded
        assert [len(c) for c, _ in chunks] == [100, 200, 300] and not any(eor for _, eor in chunks)
        assert b"".join(c for c, _ in chunks) == load_transcript(str(path)).conversations[0].sent(True)
        seq_sends = [s for s in plan_stored(seq, source, False, True) if isinstance(s, SendStored)]
        assert list(seq_sends[0].chunks()) == [(b"a" * 65536 + b"b" * 1000, True)]
        assert list(seq_sends[1].chunks()) == [(b"tail", False)]
    finally:
        source.close()


def test_a_rotated_set_refers_into_each_of_its_files(tmp_path: Path) -> None:
    """``FILE.0``, ``FILE.1`` as vsproxy rotates them: a connection that runs across both."""
    rng = random.Random(3)
    g, h = (GUEST, 40_000), (HOST, 9000)
    first = Writer(tmp_path / "rot.pcapng.0")
    first.packet(g, h, H.Op.REQUEST)
    first.packet(h, g, H.Op.RESPONSE)
    sent = [rng.randbytes(5000) for _ in range(6)]
    for chunk in sent[:3]:
        first.packet(g, h, H.Op.RW, chunk)
    first.close()
    second = Writer(tmp_path / "rot.pcapng.1")
    second.ts = first.ts
    for chunk in sent[3:]:
        second.packet(g, h, H.Op.RW, chunk)
    second.packet(g, h, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
    second.packet(h, g, H.Op.RST)
    second.close()
    path = str(tmp_path / "rot.pcapng")
    same_steps_as_ordinary(path)
    t, source = load_indexed(path)
    try:
        stored = [d for d in t.conversations[0].data(True) if isinstance(d, StoredData)]
        assert sorted({f for d in stored for f in d.pieces.files}) == [0, 1]
        assert b"".join(read_back(d, source) for d in stored) == b"".join(sent)
    finally:
        source.close()
