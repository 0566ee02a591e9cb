"""Transcripts whose guest-sent payload stays in the capture file: guest replay of a large
capture in bounded memory.

A transcript (vsproxy/replay/transcript.py) holds every payload byte; replaying 1 GiB that a
guest sent would need 1 GiB of memory. ``load_indexed`` builds the same transcript but keeps,
for what the guest sent on the connections it made (in a classic pcap, which does not say which
end is the guest: what the connecting side sent), where each packet's payload lies in the
file (``StoredData``: file, offset, length and RW flags per packet, 28 bytes each) instead of
the bytes; what the peer answered is held as before (replay compares it). The player sends a
``SendStored`` step by reading the pieces back: the simulated guest's C sender reads them with
``pread`` straight into its tx buffers (``VsockDriver.send_stored``), anything else reads them a
packet (STREAM) or a message (SEQPACKET) at a time (``chunks``).

Where a payload lies: ``vsproxy.capture.reader.records`` reads each record's frame with one
``read`` (pcap: the frame; pcapng: the packet block's body, the frame 20 bytes into it) and
yields the record before the next; ``_Tracked`` notes where the last read larger than a block
header started, and the first bytes of the frame are checked against the file's before a
reference is kept (else the bytes are held, as without this module). The payload is the
frame's tail (``reader.dissect``).

``plan_stored`` is client replay's ``plan`` with those steps: one ``SendStored`` for each
``Send`` of stored data, and at ``--speed asap`` consecutive ones (nothing to wait for between
them) merged into one, so the C sender takes them in one call.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Final

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, Record, records
from vsproxy.decode import Decoded, Decoder, capture_files
from vsproxy.replay.client import PlanStep, Send, plan
from vsproxy.replay.transcript import MAX_BYTES, Conversation, Data, Transcript, TranscriptBuilder, _Live
from vsproxy.vsock import header as H

_PCAPNG_MAGIC: Final = fmt.BT_SHB.to_bytes(4, "little")
_BIG_READ: Final = 16  # block and record headers are read in pieces of at most this many bytes
_EPB_FRAME: Final = 20  # the frame's offset in a pcapng packet block's body
_CHECK: Final = 16  # frame bytes compared with the file's before a reference is kept
_SEQPACKET: Final = int(H.Type.SEQPACKET)
_READ_BUFFER: Final = 1 << 20  # a packet block is read from this buffer: a syscall per MiB, not per block


class Pieces:
    """Packets' payloads in capture files: parallel arrays, one entry per packet (file index,
    offset, length, RW flags)."""

    __slots__ = ("files", "flags", "lens", "offs")

    def __init__(self) -> None:
        self.files = array("I")
        self.offs = array("Q")
        self.lens = array("I")
        self.flags = array("I")

    def add(self, file: int, off: int, length: int, flags: int) -> None:
        self.files.append(file)
        self.offs.append(off)
        self.lens.append(length)
        self.flags.append(flags)

    def extend(self, other: Pieces) -> None:
        self.files.extend(other.files)
        self.offs.extend(other.offs)
        self.lens.extend(other.lens)
        self.flags.extend(other.flags)

    def __len__(self) -> int:
        return len(self.lens)

    @property
    def size(self) -> int:
        return sum(self.lens)


@dataclass(frozen=True, slots=True)
class StoredData(Data):
    """A ``Data`` step whose bytes (``data`` is empty) are ``pieces`` of the capture files."""

    pieces: Pieces = field(default_factory=Pieces)
    size: int = 0


class CaptureSource:
    """The capture files stored pieces point into, opened when first read."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._fds: dict[int, int] = {}

    def fd(self, file: int) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(self.paths[file], os.O_RDONLY | os.O_CLOEXEC)
        return fd

    def read(self, file: int, off: int, length: int) -> bytes:
        """Raises ``OSError``, also when the file has become shorter than the piece."""
        data = os.pread(self.fd(file), length, off)
        if len(data) != length:
            raise OSError(f"{self.paths[file]}: ended inside a packet at byte {off} (changed since it was read?)")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True, slots=True)
class SendStored:
    """Send stored pieces as recorded: STREAM bytes, or SEQPACKET messages (a message ends at a
    piece with EOM; EOR as recorded)."""

    at: float
    source: CaptureSource
    pieces: Pieces
    seqpacket: bool

    def chunks(self) -> Iterator[tuple[bytes, bool]]:
        """The bytes read back: (a whole message, its EOR) for SEQPACKET (a message the capture
        ended inside: what it holds), else (one packet's, False), as they were sent."""
        p, src = self.pieces, self.source
        buf: list[bytes] = []
        for k in range(len(p)):
            data = src.read(p.files[k], p.offs[k], p.lens[k])
            if not self.seqpacket:
                yield data, False
                continue
            buf.append(data)
            if p.flags[k] & H.SEQ_EOM:
                yield b"".join(buf), bool(p.flags[k] & H.SEQ_EOR)
                buf = []
        if buf:
            yield b"".join(buf), False


StoredStep = PlanStep | SendStored


class _Tracked:
    """A capture file that notes where its last large read started (see the module docstring)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pos = 0
        self.big = -1  # where the last read of more than _BIG_READ bytes started
        self.last = b""  # and what it read
        self.pcapng: bool | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.pcapng is None:
            self.pcapng = data[:4] == _PCAPNG_MAGIC
        if len(data) > _BIG_READ:
            self.big, self.last = self.pos, data
        self.pos += len(data)
        return data

    def frame_at(self, frame: bytes) -> int:
        """Where ``frame``, the record just yielded, starts in the file; -1 when not known."""
        at = _EPB_FRAME if self.pcapng else 0
        if self.big < 0 or self.last[at : at + _CHECK] != frame[:_CHECK] or len(self.last) < at + len(frame):
            return -1
        return self.big + at


class _IndexBuilder(TranscriptBuilder):
    """A ``TranscriptBuilder`` that keeps references instead of the connecting side's payload on
    the connections the guest made (or, the file not saying, either end); ``where``: the file
    and offset of the payload of the packet being fed."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.where: tuple[int, int] | None = None
        self._pieces: dict[int, Pieces] = {}  # by connection id: the client's pending pieces

    def _data(self, live: _Live, side: int, d: Decoded, now: int) -> None:
        payload = d.view.payload
        h = d.view.hdr
        if side == 0 and live.conv.guest_is_client is not False and payload and self.where is not None \
                and h is not None:
            pieces = self._pieces.get(live.conv.id)
            if pieces is None:
                pieces = self._pieces[live.conv.id] = Pieces()
            pieces.add(self.where[0], self.where[1], len(payload), h.flags & (H.SEQ_EOM | H.SEQ_EOR))
            self.held -= len(payload)  # referred to, not held
        super()._data(live, side, d, now)

    def _flush(self, live: _Live, side: int, eom: bool = False, eor: bool = False) -> None:
        conv = live.conv
        pieces = self._pieces.pop(conv.id, None) if side == 0 else None
        p = live.pending[side]
        if pieces is None or not p.packets:
            if pieces is not None:
                self._pieces[conv.id] = pieces
            super()._flush(live, side, eom, eor)
            return
        if len(pieces) != len(p.chunks):  # some payload came without a reference: hold it all
            super()._flush(live, side, eom, eor)
            return
        p.chunks = []
        super()._flush(live, side, eom, eor)
        d = conv.steps[-1]
        assert isinstance(d, Data)
        conv.steps[-1] = StoredData(d.time, d.from_client, b"", d.eom, d.eor, d.app, d.packets, pieces, pieces.size)


def load_indexed(path: str, filter: str | None = None, max_bytes: int = MAX_BYTES) -> tuple[Transcript, CaptureSource]:
    """``load_transcript`` for a capture in files (not stdin), the guest's payload on the
    connections it made left in them (``StoredData``). Raises as ``load_transcript``."""
    files = capture_files(path)
    if not files:
        raise FileNotFoundError(2, "No such file or directory", path)
    decoder = Decoder(filter or None)
    builder = _IndexBuilder(max_bytes)
    error: str | None = None
    try:
        for i, name in enumerate(files):
            with open(name, "rb", buffering=_READ_BUFFER) as f:
                tracked = _Tracked(f)
                for rec in records(tracked):  # type: ignore[arg-type]  # read() is all it calls
                    builder.where = _where(tracked, i, rec)
                    builder.feed(decoder.decode(rec))
                    if builder.full:
                        error = f"more than {max_bytes} bytes of payload: a transcript holds them all, so it stops here"
                        break
            if error:
                break
    except CaptureError as e:
        error = str(e)
    return builder.finish(error), CaptureSource(files)


def _where(tracked: _Tracked, file: int, rec: Record) -> tuple[int, int] | None:
    at = tracked.frame_at(rec.frame)
    if at < 0 or len(rec.frame) < fmt.VSOCKMON.size:
        return None
    _sc, _dc, _sp, _dp, _op, _transport, tlen = fmt.VSOCKMON.unpack_from(rec.frame)
    start = fmt.VSOCKMON.size + tlen  # the payload, as reader.dissect cuts it
    return (file, at + start) if start <= len(rec.frame) else None


def plan_stored(conv: Conversation, source: CaptureSource, exact: bool, asap: bool) -> list[StoredStep]:
    """``client.plan(conv)`` with a ``SendStored`` for each ``Send`` of stored data (the plan has
    one ``Send`` per Data step of the connecting side, in order); ``asap``: consecutive ones
    merged."""
    seqpacket = conv.sock_type == _SEQPACKET
    out: list[StoredStep] = []
    sent = iter([s for s in conv.steps if isinstance(s, Data) and s.from_client])
    for step in plan(conv, exact):
        if isinstance(step, Send):
            d = next(sent)
            if isinstance(d, StoredData):
                last = out[-1] if out else None
                if asap and isinstance(last, SendStored):
                    last.pieces.extend(d.pieces)  # its own copy (made below), never the step's
                    continue
                mine = Pieces()
                mine.extend(d.pieces)
                out.append(SendStored(step.at, source, mine, seqpacket))
                continue
        out.append(step)
    return out
