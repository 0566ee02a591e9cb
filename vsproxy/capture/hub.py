"""The capture hub: the capture sink of every device, fanning the record stream out.

The data path puts whole, formatted records into preallocated chunks: the C fast paths write
theirs straight into a chunk lent to them (``reserve``/``release``), the Python paths copy
theirs in (``tap``, ``commit``). Nothing on the data path waits: when every chunk is full the
packet is dropped from the capture and counted (``CaptureHub.stats.dropped``).

The hub's distribution thread takes full chunks (and, after a short wait or at once with
``flush``, the one being filled) and hands each chunk's records to every subscriber's queue
without copying them: a piece is a view of the chunk, and the chunk goes back to the ring when
the file and every subscriber are done with it (``Piece.release``; ``read`` and ``take`` copy
the piece for the caller and release it at once). So that no subscriber can hold the ring,
pieces share less than half of its chunks; past that the chunk's records are copied once into a
``bytes`` object, shared by every subscriber, and the chunk goes back at once. So the ring never
waits for a subscriber, and a subscriber never waits for another.

A ``Subscription`` is a bounded queue (``maxbytes``) of whole records. When a piece does not
fit, it is dropped for that subscriber alone and counted (``dropped``, ``dropped_bytes``);
``dropped`` also counts what the ring itself dropped while the subscription was attached, so a
subscriber learns of every record it missed. A live subscription's stream begins with the
stream header (the pcapng section header and one interface block per device, or the pcap
global header), so its bytes are a capture on their own (``vsproxy read -``, ``tshark -r -``).
The record format is the hub's: pcapng, or classic pcap when the file capture chose pcap.

When no one would take a record now (no file, and every subscription's queue is full or it
gave up reading), the data path does not write records at all: ``reserve`` lends no chunk and
``commit`` takes nothing, and the packets count as dropped (every subscription's ``dropped``
includes them), so a stalled subscriber costs the data path nothing, not even the copy. The
gate opens again as soon as a subscriber reads (or at the distribution thread's next turn).

Memory is bounded: the ring (allocated once, reused) plus each subscription's ``maxbytes``.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vsproxy.capture import format as fmt
from vsproxy.endpoints.base import Buffer
from vsproxy.taps import CAP_PCAP, CAP_PCAPNG, RecordChunk
from vsproxy.vsock import header as H

log = logging.getLogger("vsproxy.capture")

RING_BYTES = 64 << 20  # the chunk ring of a hub with live subscribers only
CHUNK = 4 << 20  # the unit handed to the distribution thread
RESERVE_ROOM = 1 << 17  # a chunk lent to the C paths has room for at least one largest record
FLUSH_EVERY = 0.5  # seconds: the chunk being filled goes out at least this often
LIVE_FLUSH_EVERY = 0.1  # the same while a live subscriber is attached
LIVE_BYTES = 8 << 20  # a live subscription's queue, by default
MAX_SNAPLEN = 1 << 18  # a subscription's snaplen at most (the largest frame a record holds)
SPLIT_RECORDS = 4096  # a piece that does not fit whole: at most this many of its records are kept
WAIT_WARN = 5.0  # lossless: a wait this long is logged (the file takes nothing: a hung disk?)
INTERRUPT_GRACE = 5.0  # lossless: how long a stopping process still waits for the file


@dataclass
class HubCounters:
    c_records: int = 0  # records the C fast paths wrote into the ring
    py_records: int = 0  # records the Python paths wrote (tap, commit)
    dropped: int = 0  # records the ring had no room for (every chunk waited for distribution)
    chunks: int = 0  # chunks distributed
    waits: int = 0  # lossless: times the data path waited for a chunk
    waited: float = 0.0  # lossless: seconds it waited in all


class _Chunk:
    __slots__ = ("native", "records", "refs", "size", "used", "view")

    def __init__(self, size: int) -> None:
        self.view = memoryview(bytearray(size))
        self.size = size
        self.used = 0
        self.records = 0
        self.refs = 0  # pieces of it still queued or being read (guarded by the hub's _lock)
        self.native: Any = None  # the C paths' handle on view (vsproxy.fastpath)


class Piece:
    """Whole records of the stream as a subscriber reads them: ``data`` is a view of the ring's
    chunk (or a private copy), valid until ``release``, which gives the chunk back to the ring
    once every subscriber has let go of it. Release it soon: until then the chunk is not reused."""

    __slots__ = ("_chunk", "_hub", "data", "records")

    def __init__(self, data: memoryview | bytes, records: int, hub: CaptureHub | None = None,
                 chunk: _Chunk | None = None) -> None:
        self.data = data
        self.records = records
        self._hub = hub
        self._chunk = chunk

    def cut(self, size: int, records: int) -> Piece:
        """The first ``size`` bytes (``records`` whole records) as a piece of the same chunk;
        this one is released."""
        chunk, hub = self._chunk, self._hub
        if chunk is not None and hub is not None:
            hub._hold(chunk)
        piece = Piece(self.data[:size], records, hub, chunk)
        self.release()
        return piece

    def release(self) -> None:
        """Done with ``data`` (idempotent): the view is let go, and the chunk too when it was the
        last piece of it."""
        chunk, self._chunk = self._chunk, None
        if isinstance(self.data, memoryview):
            self.data.release()
        self.data = b""
        if chunk is not None and self._hub is not None:
            self._hub._unhold(chunk)

    def __enter__(self) -> Piece:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def split_records(data: Buffer, room: int, pcap: bool, most: int = -1) -> tuple[int, int]:
    """(bytes, records) of the longest run of whole records at the start of ``data`` within
    ``room`` bytes (at least one record when ``room`` is 1), and of at most ``most`` records."""
    off = records = 0
    n = len(data)
    while off < n and records != most:
        if pcap:  # record header, then incl_len bytes
            size = 16 + struct.unpack_from("<I", data, off + 8)[0]
        else:  # block total length
            size = struct.unpack_from("<I", data, off + 4)[0]
        if off + size > room and not (room == 1 and records == 0):
            break
        off += size
        records += 1
    return off, records


def stream_header(record_mode: int, devices: Sequence[str]) -> bytes:
    """What a capture of these records starts with: the pcap global header, or the pcapng
    section header and one interface description per device (interface id = index)."""
    if record_mode == CAP_PCAP:
        return fmt.pcap_header()
    return fmt.pcapng_shb() + b"".join(fmt.pcapng_idb(name, f"vsproxy device {name}") for name in devices)


class Subscription:
    """One subscriber's bounded queue of whole records. Thread-safe: the hub's thread fills
    it; the subscriber reads it from any thread (``read`` blocks, ``take`` does not)."""

    def __init__(self, hub: CaptureHub, maxbytes: int, header: bytes | None, snaplen: int = 0) -> None:
        if maxbytes < 1:
            raise ValueError("a subscription needs room for at least one byte")
        if not 0 <= snaplen <= MAX_SNAPLEN:
            raise ValueError(f"snaplen: 0 (every byte) to {MAX_SNAPLEN}")
        self.hub = hub
        self.maxbytes = maxbytes
        self.snaplen = snaplen  # payload bytes its records need at least (0: all)
        self.live = header is not None
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[Piece] = collections.deque()
        self._queued = 0  # bytes in _queue
        self.records = 0  # records queued for the subscriber so far
        self.bytes = 0
        self._dropped = 0  # records that did not fit this queue
        self.dropped_bytes = 0
        self._ring_base = hub.stats.dropped  # the ring's drops before this subscription
        self._ring_end: int | None = None  # the ring's drops when this subscription ended
        self._ended = False  # no more records will come: closed, or the hub stopped
        self._discarding = False  # the subscriber gave up reading: everything offered is dropped
        if header is not None:
            self._queue.append(Piece(header, 0))
            self._queued = len(header)

    # -- the subscriber -------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        """Records this subscriber missed: its queue was full, or the ring was."""
        ring = self.hub.stats.dropped if self._ring_end is None else self._ring_end
        return self._dropped + ring - self._ring_base

    @property
    def closed(self) -> bool:
        """No more records will come (what is queued can still be read)."""
        return self._ended

    @property
    def queued(self) -> int:
        return self._queued

    def read_piece(self, timeout: float | None = None) -> Piece | None:
        """The next piece of the stream without a copy (whole records; the stream header first),
        waiting up to ``timeout`` seconds (None: until there is one); the caller releases it.
        None: nothing came in time, or the subscription has ended (``closed``) and everything
        queued was read."""
        with self._cond:
            if not self._queue and not self._ended:
                self._cond.wait_for(lambda: bool(self._queue) or self._ended, timeout)
            if not self._queue:
                return None
            piece = self._queue.popleft()
            self._queued -= len(piece.data)
        self.hub._room()
        return piece

    def read(self, timeout: float | None = None) -> bytes:
        """``read_piece``, copied: b"" when nothing came in time or the subscription has ended
        and everything queued was read."""
        piece = self.read_piece(timeout)
        if piece is None:
            return b""
        with piece:
            return bytes(piece.data)

    def take(self) -> bytes:
        """Everything queued now, without waiting (b"" when nothing is)."""
        with self._cond:
            pieces, self._queue = self._queue, collections.deque()
            self._queued = 0
        self.hub._room()
        try:
            return b"".join(piece.data for piece in pieces)
        finally:
            for piece in pieces:
                piece.release()

    def close(self) -> None:
        """Detach from the hub (idempotent); what is queued can still be read."""
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hub's thread -----------------------------------------------------------------
    def _has_room(self, n: int) -> bool:
        """Would some of ``n`` bytes offered now be queued: room for all of it, or for one of the
        largest records (a stalled subscriber's queue has neither, and is not copied for)."""
        return (not self._ended and not self._discarding
                and self.maxbytes - self._queued >= min(n, RESERVE_ROOM))

    def _miss(self, records: int, n: int) -> None:
        """Records offered while this queue was full, dropped without being copied."""
        with self._cond:
            if not self._ended:
                self._dropped += records
                self.dropped_bytes += n

    def _offer(self, piece: Piece, pcap: bool) -> None:
        """Queue ``piece`` (whole records; this queue's own) if it fits; else queue the records at
        its start that fit and drop the rest here, counted. Released if nothing is queued."""
        n, records = len(piece.data), piece.records
        with self._cond:
            if self._ended or self._discarding:
                if self._discarding:
                    self._dropped += records
                    self.dropped_bytes += n
                piece.release()
                return
            room = self.maxbytes - self._queued
            if n > room:
                # the records that fit, found by walking at most SPLIT_RECORDS of them (the
                # walk holds the GIL, which the data path needs too); the rest are dropped
                cut, kept = split_records(piece.data, room, pcap, SPLIT_RECORDS) if room > 0 else (0, 0)
                self._dropped += records - kept
                self.dropped_bytes += n - cut
                if not kept:
                    piece.release()
                    return
                piece = piece.cut(cut, kept)
                records, n = kept, cut
            self._queue.append(piece)
            self._queued += n
            self.records += records
            self.bytes += n
            self._cond.notify_all()

    def discard(self) -> None:
        """Stay attached but read no more: what is queued and everything offered from now on
        count as dropped (a subscriber whose output failed, still reporting what it missed)."""
        with self._cond:
            self._discarding = True
            self._dropped += sum(piece.records for piece in self._queue)
            self.dropped_bytes += self._queued
            pieces, self._queue = self._queue, collections.deque()
            self._queued = 0
        for piece in pieces:
            piece.release()

    def _end(self, detached: bool) -> None:
        """No more records. ``detached``: the subscriber left, so later ring drops are not its
        own; when the hub stops, they still are (the ring fills, nobody takes it)."""
        with self._cond:
            if not self._ended:
                self._ended = True
            if detached and self._ring_end is None:
                self._ring_end = self.hub.stats.dropped
            # what is queued can still be read, but no longer holds the ring's chunks (nobody
            # may ever read it)
            if any(piece._chunk is not None for piece in self._queue):
                held, self._queue = self._queue, collections.deque(
                    Piece(bytes(piece.data), piece.records) for piece in self._queue)
                for piece in held:
                    piece.release()
            self._cond.notify_all()


class CaptureHub:
    """The capture sink (``vsproxy.taps.CaptureSink``) and its fan-out to subscriptions."""

    consumes_all = False  # a subclass whose _consume takes every chunk (the file): the gate stays open

    def __init__(self, devices: Sequence[str], record_mode: int = CAP_PCAPNG, *, ring_bytes: int = RING_BYTES,
                 flush: bool = False, idle: bool = False, lossless: bool = False,
                 on_empty: Callable[[CaptureHub], None] | None = None) -> None:
        if record_mode not in (CAP_PCAP, CAP_PCAPNG):
            raise ValueError(f"record mode {record_mode}: CAP_PCAP or CAP_PCAPNG")
        self.devices = list(devices)
        self._index = {name: i for i, name in enumerate(self.devices)}
        self.record_mode = record_mode
        self.flush = flush
        self.idle = idle
        self._on_empty = on_empty  # called (outside any lock) when the last subscription leaves
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # a chunk came back to _free (lossless waits)
        self.lossless = lossless
        self._lossless_until = float("inf")  # monotonic time the data path stops waiting (interrupt)
        self._wake = threading.Event()
        chunk = max(1 << 16, min(CHUNK, ring_bytes // 2))
        nchunks = max(2, ring_bytes // chunk)
        self._free = [_Chunk(chunk) for _ in range(nchunks - 1)]  # guarded by _lock
        # chunks pieces may hold at once: less than half the ring (none of a ring of two or three),
        # so the data path and the file always have the larger part (the module docstring)
        self._share_most = max(0, nchunks // 2 - 1)
        self._away = 0  # chunks the hub is done with that pieces still hold (guarded by _lock)
        self._full: list[_Chunk] = []  # guarded by _lock, oldest first
        self._filling = _Chunk(chunk)  # guarded by _lock
        self._reserved = False  # the data path's C code is writing into _filling
        # Would anyone take a record now (the module docstring's gate)? Written by the
        # distribution thread and by readers; the data path only reads it.
        self.accepting = True
        self._closing = False
        self.stats = HubCounters()
        # payload bytes a record keeps (0: all): read by the data path, set under _sub_lock
        self.snaplen = 0
        self._subs: tuple[Subscription, ...] = ()  # replaced, never changed in place, under _sub_lock
        self._sub_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vsproxy-capture", daemon=True)
        self._thread.start()

    # -- subscriptions ----------------------------------------------------------------------
    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return self._subs

    @property
    def live(self) -> int:
        """Live subscriptions attached."""
        return sum(1 for s in self._subs if s.live)

    def header(self) -> bytes:
        return stream_header(self.record_mode, self.devices)

    def subscribe(self, maxbytes: int = LIVE_BYTES, *, header: bool = True, snaplen: int = 0) -> Subscription:
        """A new subscription: records from the next chunk distributed on. With ``header``, its
        stream starts with the stream header (a capture on its own). ``snaplen``: the payload
        bytes of each packet it needs (0: all of them); while every taker of the records needs
        fewer than all, the data path copies only as many as the one that needs most (records
        then say the packet's whole length, as tcpdump -s writes them)."""
        sub = Subscription(self, maxbytes, self.header() if header else None, snaplen)
        with self._sub_lock:
            if self._closing:
                sub._end(True)
            else:
                self._subs = (*self._subs, sub)
                self._set_snaplen()
        if sub.live:
            self._wake.set()  # the distribution thread shortens its turn for live subscribers
        self.accepting = True
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._sub_lock:
            if sub not in self._subs:
                sub._end(True)
                return
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._set_snaplen()
            empty = not self._subs
        sub._end(True)
        if empty and self._on_empty is not None:
            self._on_empty(self)

    def _set_snaplen(self) -> None:
        """Holding ``_sub_lock``: the payload bytes records keep, for the taker that needs most
        (the file needs all)."""
        subs = self._subs
        if self.consumes_all or not subs or any(s.snaplen == 0 for s in subs):
            self.snaplen = 0
        else:
            self.snaplen = max(s.snaplen for s in subs)

    # -- the sink (data path) ---------------------------------------------------------------
    def interface(self, device: str) -> int:
        return self._index.get(device, 0)

    def __call__(
        self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None
    ) -> None:
        """A packet from a Python path: formatted here, as the C paths format theirs."""
        n = int.from_bytes(hdr[24:28], "little")  # virtio header len
        orig = 0
        if not n or hdr[30] != H.Op.RW:
            data = b""
        else:
            if (snap := self.snaplen) and n > snap:
                orig, n = fmt.VSOCKMON.size + H.HDR_SIZE + n, snap  # (the whole frame's length)
            if len(payload) == 1:
                data = bytes(payload[0][:n])  # one copy, out of guest memory
            else:
                data = b"".join(bytes(p) for p in payload)[:n]
        head, body = fmt.vsockmon_parts(hdr, data)
        ts = time.time()
        if self.record_mode == CAP_PCAP:
            parts = fmt.pcap_record_parts(ts, head, body, orig)
        else:
            parts = fmt.pcapng_epb_parts(self.interface(device), ts, head, body, inbound=not to_guest, comment=mark,
                                         orig=orig)
        self.commit(b"".join(parts), 1)

    tap = __call__

    def reserve(self) -> _Chunk | None:
        """The chunk the C paths write into, with room for at least one largest record;
        None when every chunk waits for distribution (the caller counts its packets dropped),
        when nobody would take the records (the gate, in the module docstring), or when a chunk
        is lent already (one data path call never nests in another's; if one did, two writers
        in one chunk would corrupt it: the second gets none instead)."""
        if not self.accepting:
            return None
        with self._lock:
            if self._reserved:
                return None
            while (c := self._filling).size - c.used < RESERVE_ROOM:
                if self._free:
                    c = self._next_chunk(c)
                    break
                # (while it waits, the distribution thread may take the chunk being filled and
                # put a free one in its place: look again)
                if not self._wait_free():
                    return None
            self._reserved = True
            return c

    def release(self, chunk: RecordChunk, used: int, records: int) -> None:
        with self._lock:
            self._reserved = False
            chunk.used = used
            chunk.records += records
            self.stats.c_records += records
        if self.flush and records and not self._wake.is_set():
            self._wake.set()

    def drop(self, count: int) -> None:
        with self._lock:
            self.stats.dropped += count

    def commit(self, records: Buffer, count: int) -> None:
        n = len(records)
        with self._lock:
            if self._reserved or not self.accepting:  # (lent: C writes past c.used, these would overwrite it)
                self.stats.dropped += count
                return
            while (c := self._filling).used + n > c.size:
                if n > c.size:
                    self.stats.dropped += count
                    return
                if self._free:  # (c holds records: n fits an empty chunk)
                    c = self._next_chunk(c)
                    break
                if not self._wait_free():  # (then look again, as in reserve)
                    self.stats.dropped += count
                    return
            c.view[c.used : c.used + n] = records
            c.used += n
            c.records += count
            self.stats.py_records += count
        if self.flush and not self._wake.is_set():
            self._wake.set()

    def _next_chunk(self, c: _Chunk) -> _Chunk:
        """Holding ``_lock``, a chunk free: ``c`` (the chunk being filled) goes to the
        distribution thread if it holds records, and a free chunk takes its place."""
        if c.used:
            self._full.append(c)
            self._wake.set()
        self._filling = self._free.pop()
        return self._filling

    def _wait_free(self) -> bool:
        """Lossless, called holding ``_lock`` with no chunk free: wait until one comes back.
        False (the caller drops, counted) when not lossless or waiting has ended (the file
        failed, the hub closes, or the interrupt's grace ran out)."""
        if not self.lossless:
            return False
        self._wake.set()  # the full chunks go out now, not at the next flush
        start = time.monotonic()
        self.stats.waits += 1
        warned = False
        try:
            while not self._free:
                now = time.monotonic()
                if not self.lossless or self._closing or now >= self._lossless_until:
                    return False
                if not warned and now - start > WAIT_WARN:
                    warned = True
                    log.warning("capture: the file has taken nothing for %.0f s; the data path waits for it "
                                "(--pcap-lossless)", now - start)
                self._freed.wait(min(0.25, self._lossless_until - now))
            return True
        finally:
            self.stats.waited += time.monotonic() - start

    def stop_waiting(self, reason: str) -> None:
        """Lossless no more (the file failed): the data path stops waiting, records that find no
        room are dropped and counted again."""
        with self._lock:
            if self.lossless:
                self.lossless = False
                log.error("capture: %s; packets the capture has no room for are dropped from now on", reason)
            self._freed.notify_all()

    def interrupt(self, grace: float = INTERRUPT_GRACE) -> None:
        """The process is stopping (SIGTERM): the data path waits for the file at most ``grace``
        seconds more, so a file that takes nothing cannot hold the exit."""
        # No lock: this runs in a signal handler, perhaps on the thread that holds it (waiters
        # look at the deadline at least every 0.25 s).
        self._lossless_until = min(self._lossless_until, time.monotonic() + grace)

    # -- the distribution thread ------------------------------------------------------------
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

    def _room(self) -> None:
        """A subscriber read: records have a taker again."""
        if not self.accepting:
            self.accepting = True

    def _gate(self) -> None:
        """The distribution thread: would anyone take the next records? A subscription with half
        its queue free (or a largest record's room, if that is less) would."""
        self.accepting = self.consumes_all or self._closing or any(
            sub._has_room(min(sub.maxbytes // 2, RESERVE_ROOM)) for sub in self._subs)

    def _hold(self, c: _Chunk) -> None:
        with self._lock:
            c.refs += 1

    def _unhold(self, c: _Chunk, distributed: bool = False) -> None:
        """A piece of ``c`` was released (or, ``distributed``, the hub is done with it): the last
        one gives it back to the ring."""
        with self._lock:
            c.refs -= 1
            if c.refs:
                if distributed:
                    self._away += 1
                return
            if not distributed:
                self._away -= 1
            c.used = c.records = 0
            self._free.append(c)
            self._freed.notify()

    def _offer(self, c: _Chunk, subs: Sequence[Subscription], pcap: bool) -> None:
        """``c``'s records to each subscriber: a view of the chunk while pieces hold less than
        their share of the ring, else one copy shared by all."""
        view = c.view[: c.used]
        with self._lock:
            share = self._away < self._share_most
            if share:
                c.refs += len(subs)
        copy = b"" if share else bytes(view)
        for sub in subs:
            sub._offer(Piece(view[:], c.records, self, c) if share else Piece(copy, c.records), pcap)
        view.release()

    def _run(self) -> None:
        if self.idle:
            # Only when a CPU would otherwise be idle (SCHED_IDLE, this thread only): moving
            # records never delays the data path's wake-ups, which set its throughput; if idle
            # time runs short, chunks fill and the capture drops, counted.
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except (OSError, AttributeError):  # not Linux, or refused: an ordinary thread then
                log.warning("capture: cannot run the capture threads in idle time; they run as usual")
        pcap = self.record_mode == CAP_PCAP
        last_flush = time.monotonic()
        try:
            while True:
                every = LIVE_FLUSH_EVERY if self.live else FLUSH_EVERY
                self._wake.wait(every)
                now = time.monotonic()
                partial = self.flush or self._closing or now - last_flush >= every
                chunks = self._take(partial)
                for c in chunks:
                    c.refs = 1  # the hub's own, until every subscriber has its piece
                    view, records = c.view[: c.used], c.records
                    self._consume(view, records)  # the --pcap file: straight from the ring, no copy
                    view.release()
                    subs = self._subs
                    if subs:
                        if any(sub._has_room(c.used) for sub in subs):
                            self._offer(c, subs, pcap)
                        else:  # every queue is full: nothing offered, the chunk is dropped for each, counted
                            for sub in subs:
                                sub._miss(records, c.used)
                    self._unhold(c, distributed=True)
                    self.stats.chunks += 1
                self._tick()
                self._gate()
                if partial:
                    last_flush = now
                if self._closing and not chunks:
                    return
        finally:
            with self._sub_lock:
                subs, self._subs = self._subs, ()
            for sub in subs:
                sub._end(False)

    def _consume(self, view: memoryview, records: int) -> None:
        """Hook, on the hub's thread: the consumer that reads chunks in place (the --pcap file,
        capture.writer.CaptureWriter), before the live subscribers get their copy."""

    def _tick(self) -> None:
        """Hook, on the hub's thread, after each pass (time-based file rotation)."""

    def close(self) -> None:
        """Distribute what the ring holds, then end every subscription (idempotent)."""
        with self._sub_lock:
            self._closing = True
        with self._lock:
            self._freed.notify_all()
        tid = self._thread.native_id
        if tid is not None and self.idle and self._thread.is_alive():
            try:  # what is left goes out now, at full priority, not in idle time
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except (OSError, AttributeError):
                pass
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(10)
