"""The capture writer: a tap on every device feeding a bounded queue, drained by a thread.

The data path only copies the packet's bytes and puts them on the queue (``put_nowait``);
when the queue is full the packet is dropped from the capture and counted, never waited
for. The writer thread encodes frames and writes them to a file (or stdout, for
``--pcap - | tshark -l -i -``), flushing per packet when asked, and rotates files by size,
time and count like tcpdump's -C/-G/-W.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from vsproxy.capture import format as fmt
from vsproxy.endpoints.base import Buffer
from vsproxy.vsock import header as H

log = logging.getLogger("vsproxy.capture")

QUEUE_MAX = 65536


@dataclass
class CaptureOptions:
    path: str  # "-" for stdout
    fmt: str = "pcapng"  # or "pcap"
    flush: bool = False
    rotate_bytes: int = 0  # 0: no size rotation
    rotate_seconds: float = 0.0
    max_files: int = 0  # 0: keep every file
    queue_max: int = QUEUE_MAX


@dataclass
class CaptureCounters:
    packets: int = 0  # written
    bytes: int = 0
    dropped: int = 0  # queue full
    files: int = 0


class CaptureWriter:
    def __init__(self, options: CaptureOptions, devices: Sequence[str]) -> None:
        if options.fmt not in ("pcapng", "pcap"):
            raise ValueError(f"capture format {options.fmt!r}: pcapng or pcap")
        self.options = options
        self.devices = list(devices)
        self._index = {name: i for i, name in enumerate(self.devices)}
        self._queue: queue.Queue[tuple[float, int, bool, bytes, bytes, str | None] | None] = queue.Queue(
            options.queue_max
        )
        self.counters = CaptureCounters()
        self._out: BinaryIO | None = None
        self._opened_at = 0.0
        self._written = 0
        self._files: list[str] = []
        self._open()
        self._thread = threading.Thread(target=self._run, name="vsproxy-capture", daemon=True)
        self._thread.start()

    # -- the tap (data path) ------------------------------------------------------------
    def tap(self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None) -> None:
        n = int.from_bytes(hdr[24:28], "little")  # virtio header len
        if not n or hdr[30] != H.Op.RW:
            data = b""
        elif len(payload) == 1:
            data = bytes(payload[0][:n])  # one copy, out of guest memory
        else:
            data = b"".join(bytes(p) for p in payload)[:n]
        try:
            self._queue.put_nowait((time.time(), self._index.get(device, 0), to_guest, bytes(hdr[:44]), data, mark))
        except queue.Full:
            self.counters.dropped += 1

    # -- writer thread --------------------------------------------------------------------
    def _path(self) -> str:
        o = self.options
        if o.path == "-" or not (o.rotate_bytes or o.rotate_seconds):
            return o.path
        return f"{o.path}.{self.counters.files}"

    def _open(self) -> None:
        o = self.options
        if o.path == "-":
            self._out = sys.stdout.buffer
        else:
            path = self._path()
            self._out = open(path, "wb")
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
        if o.fmt == "pcap":
            self._write(fmt.pcap_header())
        else:
            self._write(fmt.pcapng_shb())
            for name in self.devices:
                self._write(fmt.pcapng_idb(name, f"vsproxy device {name}"))
        self._out.flush()

    def _write(self, data: bytes) -> None:
        assert self._out is not None
        self._out.write(data)
        self._written += len(data)

    def _rotate_due(self) -> bool:
        o = self.options
        if o.path == "-":
            return False
        if o.rotate_bytes and self._written >= o.rotate_bytes:
            return True
        return bool(o.rotate_seconds and time.monotonic() - self._opened_at >= o.rotate_seconds)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            try:
                self._record(item)
                if self.options.flush or self._queue.empty():
                    assert self._out is not None
                    self._out.flush()
            except (OSError, ValueError) as e:  # e.g. the reader of stdout went away
                log.error("capture stopped: %s", e)
                break

    def _record(self, item: tuple[float, int, bool, bytes, bytes, str | None]) -> None:
        ts, iface, to_guest, hdr, data, mark = item
        head, body = fmt.vsockmon_parts(hdr, data)
        if self.options.fmt == "pcap":
            parts = fmt.pcap_record_parts(ts, head, body)
        else:
            parts = fmt.pcapng_epb_parts(iface, ts, head, body, inbound=not to_guest, comment=mark)
        for part in parts:
            if part:
                self._write(part)
        self.counters.packets += 1
        self.counters.bytes += len(head) + len(body)
        if self._rotate_due():
            assert self._out is not None
            self._out.close()
            self._open()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)
        if self._out is not None and self.options.path != "-":
            self._out.close()
        elif self._out is not None:
            try:
                self._out.flush()
            except (OSError, ValueError):
                pass
        log.info("capture: %d packets written, %d dropped (queue full), %d file(s)",
                 self.counters.packets, self.counters.dropped, self.counters.files)
