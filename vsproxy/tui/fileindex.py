"""Random access to the records of capture files: the packet list reads a record again when it
draws its row, so the store keeps only where each record is.

A location is ``file number << 48 | offset``: for pcapng the offset of the end of the record's
Enhanced Packet Block (its trailing length says where it starts), for classic pcap the offset
of the record's header. ``indexed_records`` reads the files in turn with
``vsproxy.capture.reader.records`` (so damaged files end in its ``CaptureError``) and pairs each
record with its location.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, Final

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import CaptureError, Record, records

_SHIFT: Final = 48
_MASK: Final = (1 << _SHIFT) - 1
_PCAPNG_MAGIC: Final = struct.pack("<I", fmt.BT_SHB)


class FileAccess:
    """The records of ``paths`` by location. Its own file handles, apart from the reading thread's."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._files: dict[int, BinaryIO] = {}
        self._pcapng: dict[int, bool] = {}
        self._endian: dict[int, str] = {}
        self._lock = threading.Lock()

    def _file(self, n: int) -> BinaryIO:
        f = self._files.get(n)
        if f is None:
            f = self._files[n] = open(self.paths[n], "rb")
            magic = f.read(4)
            self._pcapng[n] = magic == _PCAPNG_MAGIC
            self._endian[n] = ">" if magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d") else "<"
        return f

    def read(self, loc: int) -> tuple[bytes, str | None]:
        """The frame and comment of the record at ``loc``."""
        n, off = loc >> _SHIFT, loc & _MASK
        with self._lock:
            f = self._file(n)
            if self._pcapng[n]:
                f.seek(off - 4)
                (total,) = struct.unpack("<I", f.read(4))
                f.seek(off - total)
                block = f.read(total)
                return epb_parts(block)
            f.seek(off)
            head = f.read(16)
            (incl,) = struct.unpack_from(self._endian[n] + "I", head, 8)
            return f.read(incl), None

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def epb_parts(block: bytes) -> tuple[bytes, str | None]:
    """An Enhanced Packet Block's frame and comment (the block was checked when first read)."""
    (caplen,) = struct.unpack_from("<I", block, 20)
    frame = block[28 : 28 + caplen]
    i = 28 + caplen + (-caplen % 4)
    end = len(block) - 4
    while i + 4 <= end:
        code, length = struct.unpack_from("<HH", block, i)
        if code == fmt.OPT_ENDOFOPT:
            break
        if code == fmt.OPT_COMMENT:
            return frame, block[i + 4 : i + 4 + length].decode(errors="replace")
        i += 4 + length + (-length % 4)
    return frame, None


class _Tell:
    """A file whose position the caller can read after each record: ``records`` reads through it."""

    def __init__(self, f: BinaryIO, wait: Callable[[], bool] | None = None) -> None:
        self.f = f
        self.pos = 0
        self._wait = wait  # following a growing file: called at EOF; False ends the wait

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if self._wait is not None and len(data) < n:
            while len(data) < n:  # the writer has not written it yet: wait for it
                if not self._wait():
                    break
                more = self.f.read(n - len(data))
                if more:
                    data += more
                else:
                    time.sleep(0.05)
        self.pos += len(data)
        return data


def indexed_records(paths: list[str], follow: Callable[[], bool] | None = None) -> Iterator[tuple[Record, int]]:
    """Each record of each file with its location. ``follow``: keep reading the last file as it
    grows while ``follow()`` is True. Raises ``OSError`` and ``CaptureError``."""
    for n, path in enumerate(paths):
        last = n == len(paths) - 1
        with open(path, "rb") as f:
            t = _Tell(f, follow if last else None)
            magic = f.read(4)
            f.seek(0)
            pcapng = magic == _PCAPNG_MAGIC
            base = n << _SHIFT
            for rec in records(t):  # type: ignore[arg-type]  # duck-typed: records only calls read()
                if pcapng:
                    yield rec, base | t.pos
                else:
                    yield rec, base | (t.pos - 16 - len(rec.frame))


__all__ = ["CaptureError", "FileAccess", "epb_parts", "indexed_records"]
