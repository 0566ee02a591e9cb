"""The capture writer (``--pcap``): the capture hub with the file as its first subscriber.

The data path puts whole, formatted records into the hub's preallocated chunks
(vsproxy.capture.hub); nothing on the data path waits for the file: when every chunk is full
the packet is dropped from the capture and counted. The hub's thread hands each chunk's
records to the file's subscription (and to any live subscriber) and gives the chunk back; the
writer thread writes them to a file or stdout (``--pcap - | tshark -l -i -``) as they come
(the chunk being filled goes out after a short wait, or at once with ``--flush``); it rotates
files by size, time and count like tcpdump's -C/-G/-W, always at record boundaries. If the
file cannot keep up, its queue (``queue_bytes``) fills and what does not fit is dropped,
counted, without slowing the data path or a live subscriber. The chunks are allocated once and
reused, so the capture never faults in fresh memory on the data path; its memory is bounded by
``queue_bytes`` twice (the ring and the file's queue), plus each live subscription's own.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vsproxy.capture.hub import CaptureHub, split_records, stream_header
from vsproxy.endpoints.base import Buffer
from vsproxy.limits import exhausted, ratelog
from vsproxy.taps import CAP_PCAP, CAP_PCAPNG

log = logging.getLogger("vsproxy.capture")

QUEUE_BYTES = 64 << 20  # the ring, and records waiting for the file, at most
MIN_QUEUE_BYTES = 2 << 20  # two chunks of 1 MiB
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
    idle: bool = False  # the hub's and the writer's threads run as SCHED_IDLE (--pcap-idle)
    lossless: bool = False  # the data path waits for the file instead of dropping (--pcap-lossless)


@dataclass
class CaptureCounters:
    packets: int = 0  # written
    bytes: int = 0
    dropped: int = 0  # buffer full
    files: int = 0
    rotate_failed: int = 0  # a new file could not be made (out of descriptors): the current one went on
    failed: int = 0  # records offered after the file failed (disk full, stdout's reader gone); in dropped too


class CaptureWriter(CaptureHub):
    """The capture hub writing the file (or stdout) itself: the ``--pcap`` sink.

    The hub's thread writes each chunk of the ring straight to the file, with no copy, as it
    did before there were live subscribers; live subscribers (``subscribe``) get a copy
    beside it. ``counters.dropped`` is every record the file missed (the ring was full, or
    the file failed)."""

    consumes_all = True  # the file takes every record (CaptureHub's gate)

    def __init__(self, options: CaptureOptions, devices: Sequence[str]) -> None:
        if options.fmt not in ("pcapng", "pcap"):
            raise ValueError(f"capture format {options.fmt!r}: pcapng or pcap")
        if options.idle and options.lossless:
            raise ValueError("--pcap-idle and --pcap-lossless: the data path would wait for a thread that "
                             "runs only when the CPU is idle; choose one")
        self.options = options
        self._fcounters = CaptureCounters()
        self._out: io.FileIO | None = None  # the file, None for stdout
        self._fd = -1
        self._pending: list[memoryview] = []  # written by the next _flush
        self._opened_at = 0.0
        self._written = 0
        self._file_records = 0
        self._files: list[str] = []
        self._failed = 0  # records offered after the file failed (stdout's reader went away)
        self._broken = False
        self.error: str | None = None  # why the file stopped (its path and the error), once it did
        self._good = 0  # bytes of the current file that end at a record boundary (_flush)
        self._head: memoryview | None = None  # the queued view partly written (a pipe, a full disk)
        self._head_done = 0  # how much of it
        self.devices = list(devices)
        self.record_mode = CAP_PCAP if options.fmt == "pcap" else CAP_PCAPNG
        self._open()  # before the hub starts: a file that cannot be made is an error at once
        super().__init__(devices, self.record_mode, ring_bytes=options.queue_bytes, flush=options.flush,
                         idle=options.idle, lossless=options.lossless)

    @property
    def counters(self) -> CaptureCounters:
        """The file's counters; ``dropped``: records it missed (the ring was full, or it failed)."""
        c = self._fcounters
        stats = getattr(self, "stats", None)
        ring = stats.dropped if stats is not None else 0
        return CaptureCounters(c.packets, c.bytes, ring + self._failed, c.files, c.rotate_failed, self._failed)

    # -- writer thread --------------------------------------------------------------------
    def _path(self) -> str:
        o = self.options
        if o.path == "-" or not (o.rotate_bytes or o.rotate_seconds):
            return o.path
        return f"{o.path}.{self._fcounters.files}"

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
        self._fcounters.files += 1
        self._opened_at = time.monotonic()
        self._written = 0
        self._good = 0
        self._file_records = 0
        self._write(stream_header(self.record_mode, self.devices))
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
                    self._good += len(v) + self._head_done  # each queued view ends at a record boundary
                    self._head, self._head_done = None, 0
                    done += 1
                else:
                    if self._head is None:
                        self._head = v
                    self._head_done += n
                    pending[done] = v[n:]  # a short write (a pipe): the rest goes next
                    break
            del pending[:done]

    def _time_to_rotate(self) -> bool:
        """Rotation by time; rotation by size happens in _records, between records."""
        o = self.options
        return bool(o.path != "-" and o.rotate_seconds and time.monotonic() - self._opened_at >= o.rotate_seconds)

    def _consume(self, view: memoryview, records: int) -> None:
        """On the hub's thread: a chunk of whole records, written from the ring in place."""
        if self._broken:
            self._failed += records
            return
        before = self._fcounters.packets
        try:
            self._records(view, records)
            self._flush()
        except (OSError, ValueError) as e:  # e.g. the reader of stdout went away, the disk is full
            self._failed += records - (self._fcounters.packets - before)  # never queued
            self._stop(e)
        finally:
            self._pending.clear()

    def _tick(self) -> None:
        if not self._broken and self._time_to_rotate():
            try:
                self._rotate()
            except (OSError, ValueError) as e:
                self._stop(e)

    def _stop(self, e: OSError | ValueError) -> None:
        """The file failed: one message, the file cut back to its last whole record (a full
        disk leaves half a record, which readers call a file cut short), no more writing."""
        self._broken = True
        where = "stdout" if self.options.path == "-" else self._files[-1] if self._files else self.options.path
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        self.error = f"{where}: {why}"
        pcap = self.record_mode == CAP_PCAP
        keep, lost, lost_bytes = self._good, 0, 0
        try:
            for i, v in enumerate(self._pending):  # queued, counted as written, not (all) in the file
                size, records = split_records(v if i or self._head is None else self._head, 1 << 62, pcap)
                lost += records
                lost_bytes += size
            if self._head is not None and self._pending and self._head_done > 1:
                cut, whole = split_records(self._head, self._head_done, pcap)
                keep += cut
                lost -= whole
                lost_bytes -= cut
        except struct.error:  # (a header's view, not records): count nothing more
            lost = lost_bytes = 0
        self._fcounters.packets -= lost
        self._fcounters.bytes -= lost_bytes
        self._failed += lost
        if self._out is not None:
            try:
                if os.fstat(self._fd).st_size > keep:
                    os.ftruncate(self._fd, keep)
            except OSError:
                pass  # not a regular file, or the disk refuses even that: as it is
        log.error("capture stopped: %s; traffic goes on without it (%d packets written)", self.error,
                  self._fcounters.packets)
        self.stop_waiting("the capture file failed")

    def _records(self, data: memoryview, count: int) -> None:
        """Write whole records; with size rotation, split them at record boundaries."""
        limit = self.options.rotate_bytes if self.options.path != "-" else 0
        while limit and self._written + len(data) > limit:
            cut, records = self._split(data, limit - self._written)
            if cut == 0 and self._file_records == 0:
                cut, records = self._split(data, 1)  # one record larger than a file: alone
            if cut:
                self._write(data[:cut])
                self._fcounters.packets += records
                self._fcounters.bytes += cut
                self._file_records += records
                count -= records
                data = data[cut:]
            if not data:  # a lone record larger than a file: the next write starts a new one
                return
            self._rotate()
        self._write(data)
        self._fcounters.packets += count
        self._fcounters.bytes += len(data)
        self._file_records += count

    def _split(self, data: memoryview, room: int) -> tuple[int, int]:
        return split_records(data, room, self.record_mode == CAP_PCAP)

    def _rotate(self) -> None:
        self._flush()
        old = self._out
        try:
            self._open()  # the new file first: if it cannot be made, the old one goes on
        except OSError as e:
            if not exhausted(e):
                raise
            self._fcounters.rotate_failed += 1
            ratelog(log, logging.WARNING, "capture rotation", "capture: cannot start a new file (%s); the current "
                    "one goes on and rotation is tried again later", e.strerror or e)
            self._written = 0
            self._opened_at = time.monotonic()
            return
        if old is not None:
            old.close()

    def close(self) -> None:
        """Write what is buffered, then close (the counters are final afterwards)."""
        super().close()  # the hub's thread writes what the ring holds, then stops
        if self._out is not None:
            self._out.close()
        if self.error is not None:
            log.error("capture: %d packets written, then the file failed (%s): %d not written, %d dropped "
                      "before (buffer full), %d file(s)", self._fcounters.packets, self.error, self._failed,
                      self.counters.dropped - self._failed, self._fcounters.files)
            return
        log.info("capture: %d packets written, %d dropped (buffer full), %d file(s)",
                 self._fcounters.packets, self.counters.dropped, self._fcounters.files)
