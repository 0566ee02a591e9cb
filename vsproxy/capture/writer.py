"""The capture writer: the capture sink of every device, drained by a thread.

The data path puts whole, formatted records into preallocated chunks: the C fast paths write
theirs straight into a chunk lent to them (``reserve``/``release``), the Python paths copy
theirs in (``tap``, ``commit``). Nothing on
the data path waits for the file: when every chunk is full the packet is dropped from the
capture and counted. The writer thread writes full chunks (and, after a short wait or at
once with ``--flush``, the one being filled) to a file or stdout (``--pcap - | tshark -l -i -``)
and gives them back; it rotates files by size, time and count like tcpdump's -C/-G/-W,
always at record boundaries. The chunks are allocated once and reused, so the capture
never faults in fresh memory on the data path, and its memory is bounded by ``queue_bytes``.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vsproxy.capture import format as fmt
from vsproxy.endpoints.base import Buffer
from vsproxy.limits import exhausted, ratelog
from vsproxy.taps import CAP_PCAP, CAP_PCAPNG, RecordChunk
from vsproxy.vsock import header as H

log = logging.getLogger("vsproxy.capture")

QUEUE_BYTES = 64 << 20  # records waiting for the file, at most
MIN_QUEUE_BYTES = 2 << 20  # two chunks of 1 MiB
CHUNK = 4 << 20  # the unit handed to the writer thread
RESERVE_ROOM = 1 << 17  # a chunk lent to the C paths has room for at least one largest record
FLUSH_EVERY = 0.5  # seconds, without --flush
IOV_MAX = 1024


@dataclass
class CaptureOptions:
    path: str  # "-" for stdout
    fmt: str = "pcapng"  # or "pcap"
    flush: bool = False
    rotate_bytes: int = 0  # 0: no size rotation
    rotate_seconds: float = 0.0
    max_files: int = 0  # 0: keep every file
    queue_bytes: int = QUEUE_BYTES
    idle: bool = False  # the writer thread runs as SCHED_IDLE (--pcap-idle)


@dataclass
class CaptureCounters:
    packets: int = 0  # written
    bytes: int = 0
    dropped: int = 0  # buffer full
    files: int = 0
    rotate_failed: int = 0  # a new file could not be made (out of descriptors): the current one went on


class _Chunk:
    __slots__ = ("native", "records", "size", "used", "view")

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
        self.size = size
        self.used = 0
        self.records = 0
        self.native: Any = None  # the C paths' handle on view (vsproxy.fastpath)


class CaptureWriter:
    def __init__(self, options: CaptureOptions, devices: Sequence[str]) -> None:
        if options.fmt not in ("pcapng", "pcap"):
            raise ValueError(f"capture format {options.fmt!r}: pcapng or pcap")
        self.options = options
        self.devices = list(devices)
        self._index = {name: i for i, name in enumerate(self.devices)}
        self.record_mode = CAP_PCAP if options.fmt == "pcap" else CAP_PCAPNG
        self._lock = threading.Lock()
        self._wake = threading.Event()
        chunk = max(1 << 16, min(CHUNK, options.queue_bytes // 2))
        nchunks = max(2, options.queue_bytes // chunk)
        self._free = [_Chunk(chunk) for _ in range(nchunks - 1)]  # guarded by _lock
        self._full: list[_Chunk] = []  # guarded by _lock, oldest first
        self._filling = _Chunk(chunk)  # guarded by _lock
        self._reserved = False  # the data path's C code is writing into _filling
        self._closing = False
        self.counters = CaptureCounters()
        self._out: io.FileIO | None = None  # the file, None for stdout
        self._fd = -1
        self._pending: list[memoryview] = []  # written by the next _flush
        self._opened_at = 0.0
        self._written = 0
        self._file_records = 0
        self._files: list[str] = []
        self._open()
        self._thread = threading.Thread(target=self._run, name="vsproxy-capture", daemon=True)
        self._thread.start()

    # -- the sink (data path) -------------------------------------------------------------
    def interface(self, device: str) -> int:
        return self._index.get(device, 0)

    def __call__(
        self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None
    ) -> None:
        """A packet from a Python path: formatted here, as the C paths format theirs."""
        n = int.from_bytes(hdr[24:28], "little")  # virtio header len
        if not n or hdr[30] != H.Op.RW:
            data = b""
        elif len(payload) == 1:
            data = bytes(payload[0][:n])  # one copy, out of guest memory
        else:
            data = b"".join(bytes(p) for p in payload)[:n]
        head, body = fmt.vsockmon_parts(hdr, data)
        ts = time.time()
        if self.record_mode == CAP_PCAP:
            parts = fmt.pcap_record_parts(ts, head, body)
        else:
            parts = fmt.pcapng_epb_parts(self.interface(device), ts, head, body, inbound=not to_guest, comment=mark)
        self.commit(b"".join(parts), 1)

    tap = __call__

    def reserve(self) -> _Chunk | None:
        """The chunk the C paths write into, with room for at least one largest record;
        None when every chunk waits for the file (the caller counts its packets dropped)."""
        with self._lock:
            c = self._filling
            if c.size - c.used < RESERVE_ROOM:
                if not self._free:
                    return None
                if c.used:
                    self._full.append(c)
                    self._wake.set()
                c = self._filling = self._free.pop()
            self._reserved = True
            return c

    def release(self, chunk: RecordChunk, used: int, records: int) -> None:
        with self._lock:
            self._reserved = False
            chunk.used = used
            chunk.records += records
        if self.options.flush and records and not self._wake.is_set():
            self._wake.set()

    def drop(self, count: int) -> None:
        with self._lock:
            self.counters.dropped += count

    def commit(self, records: Buffer, count: int) -> None:
        n = len(records)
        with self._lock:
            c = self._filling
            if c.used + n > c.size:
                if not self._free or n > c.size:
                    self.counters.dropped += count
                    return
                if c.used:
                    self._full.append(c)
                c = self._filling = self._free.pop()
                self._wake.set()
            c.view[c.used : c.used + n] = records
            c.used += n
            c.records += count
        if self.options.flush and not self._wake.is_set():
            self._wake.set()

    # -- writer thread --------------------------------------------------------------------
    def _path(self) -> str:
        o = self.options
        if o.path == "-" or not (o.rotate_bytes or o.rotate_seconds):
            return o.path
        return f"{o.path}.{self.counters.files}"

    def _open(self) -> None:
        o = self.options
        if o.path == "-":
            sys.stdout.flush()
            self._fd = sys.stdout.fileno()
        else:
            path = self._path()
            self._out = open(path, "wb", buffering=0)
            self._fd = self._out.fileno()
            self._files.append(path)
            if o.max_files and len(self._files) > o.max_files:
                old = self._files.pop(0)
                try:
                    os.unlink(old)
                except OSError:
                    pass
        self.counters.files += 1
        self._opened_at = time.monotonic()
        self._written = 0
        self._file_records = 0
        if o.fmt == "pcap":
            self._write(fmt.pcap_header())
        else:
            self._write(fmt.pcapng_shb())
            for name in self.devices:
                self._write(fmt.pcapng_idb(name, f"vsproxy device {name}"))
        self._flush()

    def _write(self, data: Buffer) -> None:
        """Queue ``data`` for the next ``_flush``: whole chunks go out in one writev, which
        holds no GIL, so the data path and the disk work at the same time."""
        self._pending.append(memoryview(data))
        self._written += len(data)

    def _flush(self) -> None:
        pending = self._pending
        while pending:
            batch = pending[:IOV_MAX]
            n = os.writev(self._fd, batch)
            done = 0
            for v in batch:
                if n >= len(v):
                    n -= len(v)
                    done += 1
                else:
                    pending[done] = v[n:]  # a short write (a pipe): the rest goes next
                    break
            del pending[:done]

    def _time_to_rotate(self) -> bool:
        """Rotation by time; rotation by size happens in _records, between records."""
        o = self.options
        return bool(o.path != "-" and o.rotate_seconds and time.monotonic() - self._opened_at >= o.rotate_seconds)

    def _take(self, partial: bool) -> list[_Chunk]:
        """The full chunks, and with ``partial`` the one being filled too."""
        with self._lock:
            self._wake.clear()
            out, self._full = self._full, []
            c = self._filling
            if partial and c.used and self._free and not self._reserved:
                out.append(c)
                self._filling = self._free.pop()
        return out

    def _give_back(self, chunks: list[_Chunk]) -> None:
        for c in chunks:
            c.used = c.records = 0
        with self._lock:
            self._free.extend(chunks)

    def _run(self) -> None:
        if self.options.idle:
            # Only when a CPU would otherwise be idle (SCHED_IDLE, this thread only): copying
            # records into the page cache then never delays the data path's wake-ups, which set
            # its throughput; if idle time runs short, chunks fill and the capture drops, counted.
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except (OSError, AttributeError):  # not Linux, or refused: an ordinary thread then
                log.warning("capture: cannot run the writer in idle time; it runs as usual")
        last_flush = time.monotonic()
        try:
            while True:
                self._wake.wait(FLUSH_EVERY)
                now = time.monotonic()
                partial = self.options.flush or self._closing or now - last_flush >= FLUSH_EVERY
                chunks = self._take(partial)
                try:
                    for c in chunks:
                        self._records(c.view[: c.used], c.records)
                    self._flush()
                finally:
                    self._pending.clear()
                    self._give_back(chunks)
                if partial:
                    last_flush = now
                if self._time_to_rotate():
                    self._rotate()
                if self._closing and not chunks:
                    return
        except (OSError, ValueError) as e:  # e.g. the reader of stdout went away
            log.error("capture stopped: %s", e)

    def _records(self, data: memoryview, count: int) -> None:
        """Write whole records; with size rotation, split them at record boundaries."""
        limit = self.options.rotate_bytes if self.options.path != "-" else 0
        while limit and self._written + len(data) > limit:
            cut, records = self._split(data, limit - self._written)
            if cut == 0 and self._file_records == 0:
                cut, records = self._split(data, 1)  # one record larger than a file: alone
            if cut:
                self._write(data[:cut])
                self.counters.packets += records
                self.counters.bytes += cut
                self._file_records += records
                count -= records
                data = data[cut:]
            if not data:  # a lone record larger than a file: the next write starts a new one
                return
            self._rotate()
        self._write(data)
        self.counters.packets += count
        self.counters.bytes += len(data)
        self._file_records += count

    def _split(self, data: memoryview, room: int) -> tuple[int, int]:
        """(bytes, records) of the longest run of whole records within ``room`` bytes
        (at least one record when ``room`` is 1)."""
        off = records = 0
        pcap = self.record_mode == CAP_PCAP
        while off < len(data):
            if pcap:  # record header, then incl_len bytes
                size = 16 + struct.unpack_from("<I", data, off + 8)[0]
            else:  # block total length
                size = struct.unpack_from("<I", data, off + 4)[0]
            if off + size > room and not (room == 1 and records == 0):
                break
            off += size
            records += 1
        return off, records

    def _rotate(self) -> None:
        self._flush()
        old = self._out
        try:
            self._open()  # the new file first: if it cannot be made, the old one goes on
        except OSError as e:
            if not exhausted(e):
                raise
            self.counters.rotate_failed += 1
            ratelog(log, logging.WARNING, "capture rotation", "capture: cannot start a new file (%s); the current "
                    "one goes on and rotation is tried again later", e.strerror or e)
            self._written = 0
            self._opened_at = time.monotonic()
            return
        if old is not None:
            old.close()

    def close(self) -> None:
        """Write what is buffered, then close (the counters are final afterwards)."""
        self._closing = True
        tid = self._thread.native_id
        if tid is not None and self.options.idle:
            try:  # what is left goes out now, at full priority, not in idle time
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except (OSError, AttributeError):
                pass
        self._wake.set()
        self._thread.join(10)
        if self._out is not None:
            self._out.close()
        log.info("capture: %d packets written, %d dropped (buffer full), %d file(s)",
                 self.counters.packets, self.counters.dropped, self.counters.files)
