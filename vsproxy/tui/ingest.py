"""Live ingest in a process of its own: a live pcapng stream is read and decoded away from the
UI's process, whose store only takes in finished rows (``Store.apply``).

Decoding a packet (the stream tracker, the application dissectors) costs the UI's interpreter
tens of microseconds, under the one lock Python has: at 100,000 packets a second that is more
than the whole of it, and keys wait. So a live source starts this module as a child process
(``python -m vsproxy.tui.ingest``) reading the stream (its stdin: a pipe, the TUI's stdin, or a
copy of the data an in-process vsproxy hands over; or ``--attach PATH``: a control socket it
subscribes to itself), feeding the records to a store of its own (the same ``Store._feed``
code, so rows, flags and connections are the ones a file shows) and writing batches to its
stdout, about every 50 ms and whenever the stream goes quiet:

    frame   = u32 length, u32 type, payload           (little-endian)
    BATCH   = u32 header length, header (JSON: names new since the last batch, comments and
              application summaries by place in the batch, the connections the batch changed,
              the devices, counts; a pickle: the child is ours, started by the UI, and a pickle
              loads several times faster than JSON), then the columns: time f64, direction u8, device u16,
              flags u8, connection i32, protocol u8, frame offsets u32 (n + 1), the frames
    END     = JSON: {"error": one line or null, "drops": n}
    READY   = empty: reading (attached: subscribed), sent once before any batch

It never holds the writer back: between records it takes whatever the stream has ready into
its own buffer, and when decoding falls behind by more than ``HIGH_WATER`` records it counts the
records it cannot decode as feed drops (shown in the status bar) until it has caught up to
a quarter of that; it never buffers more than ``BUFFER_CAP`` bytes (big frames: then the
writer waits, and a vsproxy counts its subscriber's drops itself). The UI's store keeps the
frames (its ring) and decodes a row's line, detail and payload again when asked for, as before.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import IO, Any, Final

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import MAX_BLOCK, CaptureError, Record, interface_block, records
from vsproxy.tui.model import ConnRow, DeviceRow, IngestBatch, Store

BATCH: Final = 1
END: Final = 2
READY: Final = 3
SEND_EVERY_S: Final = 0.05  # a batch at least this often while packets come
SEND_ROWS: Final = 8192  # or when this many are waiting
STEP: Final = 256  # records decoded between looks at the stream (and at the clock)
# Records read but not decoded (estimated from the bytes buffered and the mean record size so
# far): past this, records are dropped, counted, until the backlog is down to a quarter. In
# records, not bytes: decoding costs by the record (about a second of it at ~50,000 a second).
HIGH_WATER: Final = 50_000
BUFFER_CAP: Final = 64 << 20  # never buffer more bytes than this: past it, the writer waits
NICE: Final = 10  # the ingest process's niceness, added to the UI's
PIPE_SIZE: Final = 1 << 20  # asked of the kernel for the stream's pipe: ~100 ms at 100,000 packets/s
_FRAME: Final = struct.Struct("<II")
_HDR: Final = struct.Struct("<I")


class IngestError(Exception):
    """The ingest process sent something that is not a batch: one line for the user."""


# -- the wire: sans-I/O ----------------------------------------------------------------------------
def _conn_fields(r: ConnRow) -> tuple[Any, ...]:
    return (r.id, r.device, r.client, r.server, r.sock_type, r.first, r.last, r.first_ts, r.last_ts,
            r.proto, r.state, r.verdict, r.rule, r.rewritten, r.pk0, r.pk1, r.by0, r.by1, r.ba0, r.ba1, r.fc0, r.fc1)


def _conn_row(f: tuple[Any, ...]) -> ConnRow:
    return ConnRow(*f)


def encode_batch(store: Store, recs: list[Record], sent_devs: int, sent_protos: int, lo_sec: int,
                 drops: int) -> bytes:
    """``batch_parts`` as one frame."""
    return b"".join(batch_parts(store, recs, sent_devs, sent_protos, lo_sec, drops))


def batch_parts(store: Store, recs: list[Record], sent_devs: int, sent_protos: int, lo_sec: int,
                drops: int) -> list[bytes]:
    """The BATCH frame for ``recs``, in parts: the last ``len(recs)`` packets ``store`` took (its ring
    holds them: it is at least ``SEND_ROWS`` long). ``sent_devs``, ``sent_protos``: the names
    the other side has; ``lo_sec``: the earliest second of these packets (per-device rates
    from there on are sent). Empties ``store.touched``."""
    n = len(recs)
    start = store.total - n
    pos = start - store.first
    apps = store._apps
    app_items = [(k, a) for k in range(n) if (a := apps.get(start + k))]
    touched = store.touched or set()
    conns = [_conn_fields(store.conns[c]) for c in sorted(touched) if c in store.conns]
    touched.clear()
    devices = [(d.name, d.packets, d.bytes, d.denied, d.spoofed, d.rewritten, d.connections, d.cids,
                {s: v for s, v in d.per_second.items() if s >= lo_sec}) for d in store.devices.values()]
    header = {
        "n": n,
        "dev_names": store.dev_names[sent_devs:],
        "proto_names": store.protos[sent_protos:],
        "comments": {k: r.comment for k, r in enumerate(recs) if r.comment},
        "apps": app_items,
        "conns": conns,
        "devices": devices,
        "bad": store.bad_frames,
        "drops": drops,
    }
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    offsets = array("I", [0])
    offsets.extend(accumulate(len(r.frame) for r in recs))
    parts = [_HDR.pack(len(head)), head, store._ts[pos:].tobytes(), bytes(store._dir[pos:]), store._dev[pos:].tobytes(),
             bytes(store._flags[pos:]), store._conn[pos:].tobytes(), store._proto[pos:].tobytes(), offsets.tobytes()]
    size = sum(map(len, parts)) + offsets[-1]
    # the frames as they are, not joined: written one by one, a big one goes to the pipe uncopied
    return [_FRAME.pack(size, BATCH), *parts, *(r.frame for r in recs)]


def decode_batch(payload: bytes) -> tuple[IngestBatch, int]:
    """A BATCH frame's payload: the batch and the feed drops counted so far. Raises ``IngestError``."""
    try:
        (hl,) = _HDR.unpack_from(payload, 0)
        h = pickle.loads(payload[4 : 4 + hl])  # our own child's, never the stream's bytes
        n = int(h["n"])
        mv = memoryview(payload)
        at = 4 + hl

        def take(code: str, count: int) -> array[Any]:
            nonlocal at
            a = array(code)
            size = a.itemsize * count
            a.frombytes(mv[at : at + size])
            at += size
            return a

        ts = take("d", n)
        dirs = bytes(mv[at : at + n])
        at += n
        devs = take("H", n)
        flags = bytes(mv[at : at + n])
        at += n
        conns = take("i", n)
        protos = bytes(mv[at : at + n])
        at += n
        offsets = take("I", n + 1)
        frames = mv[at:]  # a view: the payload is this batch's alone (no copy of the frames)
        if len(frames) != offsets[-1] or len(ts) != n:
            raise IngestError("a batch shorter than its rows")
        devices = [DeviceRow(*d) for d in h["devices"]]
        batch = IngestBatch(n, ts, dirs, devs, flags, conns, protos, frames, offsets, h["comments"], dict(h["apps"]),
                            h["dev_names"], h["proto_names"], [_conn_row(f) for f in h["conns"]], devices, h["bad"])
        return batch, int(h["drops"])
    except (ValueError, KeyError, TypeError, IndexError, struct.error, pickle.UnpicklingError, EOFError) as e:
        raise IngestError(f"a damaged batch from the ingest process ({type(e).__name__}: {e})") from None


# -- the ingest process ----------------------------------------------------------------------------
class _Input:
    """The stream as ``records`` reads it: ``read(n)`` from a buffer that takes in whatever the
    descriptor has ready each time it runs short (and on ``drain``), so the writer never waits
    on decoding; before it would wait for more, ``idle`` sends what is batched."""

    def __init__(self, fd: int, first: bytes, idle: Callable[[], None]) -> None:
        self.fd = fd
        self.buf = bytearray(first)
        self.pos = 0
        self.eof = False
        self.idle = idle
        # decoding has fallen behind: ``stream_records`` skips packet blocks (counted in
        # ``dropped``, never taken apart) until the backlog is down to ``low``
        self.dropping = False
        self.dropped = 0
        self.low = 0
        self.taken = 0  # bytes handed on (records read or skipped), for the mean record size
        os.set_blocking(fd, False)

    @property
    def backlog(self) -> int:
        return len(self.buf) - self.pos

    def drain(self) -> None:
        if self.pos > max(1 << 20, len(self.buf) - self.pos):  # let go of what was read (amortised O(1))
            del self.buf[: self.pos]
            self.pos = 0
        while not self.eof and len(self.buf) - self.pos < BUFFER_CAP:
            try:
                data = os.read(self.fd, 1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self.eof = True
                return
            self.buf += data

    def ensure(self, n: int) -> bool:
        """At least ``n`` bytes buffered (waiting for them); False: the stream ended short of them."""
        if len(self.buf) - self.pos >= n:
            return True
        self.drain()
        while len(self.buf) - self.pos < n and not self.eof:
            self.idle()
            select.select([self.fd], [], [], 1.0)
            self.drain()
        return len(self.buf) - self.pos >= n

    def read(self, n: int) -> bytes:
        self.ensure(n)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += len(out)
        self.taken += len(out)
        return out


_BLOCK: Final = struct.Struct("<II")
_EPB: Final = struct.Struct("<IIIIIII")
_OPT: Final = struct.Struct("<HH")
_U32: Final = struct.Struct("<I")


def stream_records(inp: _Input) -> Iterator[Record]:
    """``reader.records`` over the stream: a pcapng stream taken apart straight from the buffer
    (the same checks and ``CaptureError`` lines as ``reader``, a third of its cost a packet);
    anything else (classic pcap) through ``reader.records`` itself."""
    if not inp.ensure(4) or bytes(inp.buf[inp.pos : inp.pos + 4]) != _U32.pack(fmt.BT_SHB):
        yield from records(inp)  # type: ignore[arg-type]  # duck-typed: records only calls read()
        return
    interfaces: list[tuple[str, int, float]] = []  # name, linktype, ticks per second
    off = 0
    ensure = inp.ensure
    block, epb, opt, u32 = _BLOCK.unpack_from, _EPB.unpack_from, _OPT.unpack_from, _U32.unpack_from
    bt_epb, bt_shb, bt_idb, vsock = fmt.BT_EPB, fmt.BT_SHB, fmt.BT_IDB, fmt.LINKTYPE_VSOCK
    o_flags, o_comment = fmt.EPB_FLAGS, fmt.OPT_COMMENT
    while True:
        if not ensure(8):
            if inp.backlog == 0:
                return
            if inp.backlog < 4:
                raise CaptureError(f"truncated block at byte {off}")
            raise CaptureError(f"truncated at byte {off + 4}: wanted 4 bytes, got {inp.backlog - 4}")
        buf, pos = inp.buf, inp.pos
        btype, length = block(buf, pos)
        if btype == bt_shb:
            if not ensure(12):
                raise CaptureError(f"truncated at byte {off + 8}: wanted 4 bytes, got {inp.backlog - 8}")
            buf, pos = inp.buf, inp.pos
            if u32(buf, pos + 8)[0] != 0x1A2B3C4D:
                raise CaptureError("big-endian pcapng is not supported")
            if length < 28 or length % 4 or length > MAX_BLOCK:
                raise CaptureError(f"section header at byte {off} has a bad length {length}")
        elif length < 12 or length % 4 or length > MAX_BLOCK:
            raise CaptureError(f"block at byte {off} has a bad length {length}")
        if not ensure(length):
            raise CaptureError(f"truncated at byte {off}: a block of {length} bytes, {inp.backlog} there")
        buf, pos = inp.buf, inp.pos
        if u32(buf, pos + length - 4)[0] != length:
            raise CaptureError(f"block at byte {off}: trailing length does not match")
        inp.taken += length
        if btype == bt_epb and inp.dropping:
            inp.pos = pos + length
            off += length
            inp.dropped += 1
            if len(buf) - inp.pos <= inp.low:
                inp.dropping = False
            continue
        if btype == bt_epb:
            if length < 32:
                raise CaptureError(f"packet block at byte {off} is too short")
            _, _, iface, hi, lo, caplen, _orig = epb(buf, pos)
            if iface >= len(interfaces):
                raise CaptureError(f"packet block at byte {off} names interface {iface}, not described")
            name, linktype, ticks = interfaces[iface]
            end = pos + length - 4
            if caplen > end - pos - 28:
                raise CaptureError(f"packet block at byte {off}: captured length {caplen} beyond the block")
            frame = bytes(buf[pos + 28 : pos + 28 + caplen])
            o = pos + 28 + caplen + (-caplen % 4)
            inbound: bool | None = None
            comment: str | None = None
            seen_flags = seen_comment = False
            while o + 4 <= end:
                code, olen = opt(buf, o)
                if code == 0:
                    break
                if o + 4 + olen > end:
                    raise CaptureError(f"block at byte {off}: option {code} runs past the block")
                if code == o_flags and not seen_flags:
                    seen_flags = True
                    inbound = (u32(buf, o + 4)[0] & 3) == 1 if olen >= 4 else None
                elif code == o_comment and not seen_comment:
                    seen_comment = True
                    comment = bytes(buf[o + 4 : o + 4 + olen]).decode(errors="replace") or None
                o += 4 + olen + (-olen % 4)
            inp.pos = pos + length
            off += length
            if linktype == vsock:
                yield Record(((hi << 32) | lo) / ticks, name, inbound, frame, comment)
            continue
        if btype == bt_shb:
            interfaces = []
        elif btype == bt_idb:
            interfaces.append(interface_block(bytes(buf[pos + 8 : pos + length - 4]), off, len(interfaces)))
        inp.pos = pos + length
        off += length


class Ingest:
    """The ingest process's work: records from ``fd`` into a store, batches to ``out``."""

    def __init__(self, fd: int, out: IO[bytes], limit: int, first: bytes = b"", high_water: int = HIGH_WATER) -> None:
        self.high_water = high_water
        self.low_water = high_water // 4  # dropping stops once the backlog is down to this
        self.store = Store(limit=max(limit, 2 * SEND_ROWS), keep_records=False)
        self.store.touched = set()
        self.out = out
        self.input = _Input(fd, first, self.send)
        self.pending: list[Record] = []
        self.fed = 0  # of pending, how many the store has taken
        self._drops = 0  # dropped here (a classic pcap stream); a pcapng stream's are the reading's
        self._sent_drops = 0
        self._sent_devs = 0
        self._sent_protos = 1  # protos[0], None, every store has
        self._last_send = time.monotonic()
        _grow_pipe(fd)

    def run(self) -> str | None:
        """Read to the end of the stream; the error line, if it ends in one."""
        try:
            self._loop()
        except CaptureError as e:
            self.send()
            return f"damaged stream: {e} (read {self.store.total} packets before it)"
        except OSError as e:
            self.send()
            return f"live stream: {e.strerror or e}"
        self.send()
        return None

    def _loop(self) -> None:
        inp = self.input
        pending = self.pending
        dropping = False
        n = 0
        pcapng = inp.ensure(4) and bytes(inp.buf[inp.pos : inp.pos + 4]) == _U32.pack(fmt.BT_SHB)
        for rec in stream_records(inp):
            n += 1
            if dropping:
                self._drops += 1
            else:
                pending.append(rec)
            if n % STEP:
                continue
            self._feed()
            inp.drain()
            mean = max(1.0, inp.taken / (n + self.drops))
            backlog = inp.backlog / mean  # records, about
            if pcapng:  # the reading itself skips what cannot be decoded (cheaper than taking it apart)
                if not inp.dropping and backlog > self.high_water:
                    inp.dropping = True
                    inp.low = int(self.low_water * mean)
            else:
                dropping = backlog > (self.low_water if dropping else self.high_water)
            if len(pending) >= SEND_ROWS or time.monotonic() - self._last_send >= SEND_EVERY_S:
                self.send()
        self._feed()

    @property
    def drops(self) -> int:
        return self._drops + self.input.dropped

    def _feed(self) -> None:
        if self.fed < len(self.pending):
            self.store.feed_many((r, -1) for r in self.pending[self.fed :])
            self.fed = len(self.pending)

    def send(self) -> None:
        """What is batched, to the UI (and the drop count when only it changed)."""
        self._feed()
        pending = self.pending
        self._last_send = time.monotonic()
        if not pending and self.drops == self._sent_drops:
            return
        store = self.store
        lo = min((int(r.ts) for r in pending), default=0)
        parts = batch_parts(store, pending, self._sent_devs, self._sent_protos, lo, self.drops)
        self._sent_devs, self._sent_protos = len(store.dev_names), len(store.protos)
        self._sent_drops = self.drops
        pending.clear()
        self.fed = 0
        write = self.out.write
        for part in parts:
            write(part)
        self.out.flush()

    def end(self, error: str | None) -> None:
        payload = json.dumps({"error": error, "drops": self.drops}).encode()
        self.out.write(_FRAME.pack(len(payload), END) + payload)
        self.out.flush()


def _grow_pipe(fd: int) -> None:
    """A bigger pipe buffer, when the stream is a pipe (the kernel's limit allowing)."""
    try:
        fcntl.fcntl(fd, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
    except OSError:
        pass


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _attach(path: str, snaplen: int = 0) -> tuple[int, bytes, Any]:
    from vsproxy.ctl import ask, connect

    s = connect(path)
    _, rest = ask(s, {"cmd": "subscribe", "what": "packets", "snaplen": snaplen})
    s.settimeout(None)
    return s.fileno(), rest, s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vsproxy.tui.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200_000, help="the UI's ring size")
    ap.add_argument("--attach", metavar="PATH", help="subscribe to this control socket's packets (else: stdin)")
    ap.add_argument("--snaplen", type=int, default=0, metavar="N",
                    help="--attach: the payload bytes of each packet to ask for (0: all)")
    ap.add_argument("--high-water", type=int, default=HIGH_WATER, metavar="RECORDS",
                    help="records read but not decoded past which records are dropped (counted)")
    args = ap.parse_args(argv)
    # The UI ends this process (terminate); a Ctrl-C meant for the UI is not for it, and when
    # the UI dies without a word (SIGKILL), the kernel ends it too (PR_SET_PDEATHSIG)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    # The UI's process first: when the two want the same CPU, a key is drawn before more packets
    # are decoded (what cannot be decoded in time is counted as dropped, never waited for).
    try:
        os.nice(NICE)
    except OSError:
        pass
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the batches' pipe
    fd, first, keep = 0, b"", None
    if args.attach:
        from vsproxy.ctl import CtlError

        try:
            fd, first, keep = _attach(args.attach, args.snaplen)
        except (CtlError, OSError) as e:
            payload = json.dumps({"error": f"control socket gone: {e}; what was received is kept", "drops": 0})
            out.write(_FRAME.pack(len(payload), END) + payload.encode())
            out.flush()
            return 0
    ingest = Ingest(fd, out, args.limit, first, max(1, args.high_water))
    try:
        out.write(_FRAME.pack(0, READY))
        out.flush()
        error = ingest.run()
        ingest.end(error)
    except BrokenPipeError:  # the UI has gone: nothing to tell
        pass
    except Exception as e:  # the last line of defence: one line for the UI, never a traceback on its screen
        try:
            ingest.end(f"ingest process: {type(e).__name__}: {e}")
        except OSError:
            pass
    if keep is not None:
        keep.close()
    return 0


# -- the UI's side ---------------------------------------------------------------------------------
class IngestProcess:
    """The ingest process of a live source, seen from the UI: ``pump`` (on the source's thread)
    takes its batches into ``store`` until it ends; ``drops``: what it could not decode."""

    def __init__(self, store: Store, stdin: int, attach: str | None = None, high_water: int = HIGH_WATER,
                 snaplen: int = 0) -> None:
        assert store.limit is not None
        cmd = [sys.executable, "-m", "vsproxy.tui.ingest", "--limit", str(store.limit), "--high-water", str(high_water)]
        if attach is not None:
            cmd += ["--attach", attach, "--snaplen", str(snaplen)]
        self.store = store
        self.drops = 0
        self.ready = False  # reading (attached: subscribed)
        self.ended = False
        self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, close_fds=True)
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain_stderr, name="tui-ingest-err", daemon=True).start()

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.proc.stdin

    def _drain_stderr(self) -> None:
        err = self.proc.stderr
        assert err is not None
        with err:
            for line in err:
                if len(self._stderr) < 50:
                    self._stderr.append(line)

    def pump(self) -> str | None:
        """Batches into the store until the process ends: its error line, if any."""
        out = self.proc.stdout
        assert out is not None
        try:
            return self._pump(out)
        except (OSError, ValueError):  # stopped: its pipe closed under the read
            return None
        finally:
            self.ended = True
            out.close()

    def _pump(self, out: IO[bytes]) -> str | None:
        store = self.store
        while True:
            head = out.read(_FRAME.size)
            if len(head) < _FRAME.size:
                self.proc.wait()
                if self._stderr:
                    last = self._stderr[-1].decode(errors="replace").strip()
                    return f"ingest process failed: {last}"
                return None  # stopped
            length, kind = _FRAME.unpack(head)
            payload = out.read(length)
            if len(payload) < length:
                continue  # cut short: the end shows at the next read
            if kind == BATCH:
                batch, self.drops = decode_batch(payload)
                store.apply(batch)
            elif kind == READY:
                self.ready = True
            elif kind == END:
                end = json.loads(payload)
                self.drops = int(end.get("drops", 0))
                err = end.get("error")
                return str(err) if err else None
            else:
                raise IngestError(f"an unknown frame type {kind} from the ingest process")

    def stop(self) -> None:
        """End the process (ours: by its pid, through Popen)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


if __name__ == "__main__":
    raise SystemExit(main())
