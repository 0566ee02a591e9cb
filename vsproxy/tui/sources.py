"""Where the TUI's packets come from. Each source owns a store and fills it from its own thread;
the app only reads the store, the source's ``state`` line, its ``drops``, and (when attached to
a running vsproxy) its latest snapshot and events.

- ``FileSource``: capture files (a rotated set in order), indexed by location; ``follow``: keep
  reading the last one as it grows (``--follow-file``).
- ``StreamSource``: a pcapng stream (stdin: ``vsproxy ctl PATH pcap | vsproxy tui -``), kept in
  the store's ring.
- ``AttachSource``: a running vsproxy's control socket (docs/control.md): packets, snapshots
  every second, events. When the socket goes away the state says so and the data stays.
- ``ProxySource``: a ``Proxy`` in this process (``vsproxy --tui``): ``Proxy.subscribe_packets``
  and ``Proxy.snapshot``.

The live ones (stream, attach, in-process) decode in a process of their own
(``vsproxy.tui.ingest``): the UI's process only takes in its batches of finished rows, so a
fast feed costs the keys little; what that process cannot decode in time it counts as feed
drops rather than hold the writer back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections import deque
from typing import IO, TYPE_CHECKING, Any, Final

from vsproxy.capture.reader import CaptureError, Record
from vsproxy.tui.fileindex import FileAccess, indexed_records
from vsproxy.tui.ingest import HIGH_WATER, NICE, IngestError, IngestProcess
from vsproxy.tui.model import Store

if TYPE_CHECKING:
    from vsproxy.app import Proxy

BATCH: Final = 500  # records fed to the store at once (then the UI's thread gets a turn)
HOLD_S: Final = 0.05  # reading pauses this long after a key press or a click
SNAPSHOT_EVERY: Final = 1.0
EVENTS_KEPT: Final = 1000
DEFAULT_STORE: Final = 200_000
# Live from a vsproxy (attached, or in this process): the payload bytes of each packet asked for
# (tcpdump's -s). Enough for every dissector's messages and a screenful of hex; the data path then
# copies no more than that for the UI, so watching costs vsproxy little (0: every byte).
LIVE_SNAPLEN: Final = 4096


class Source:
    """A source: ``store`` filled from ``run`` on a thread of its own (``start``)."""

    name = ""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.state = "starting"
        self.error: str | None = None  # one line for the user: a damaged file, a socket gone
        self.done = False
        self.live = False
        self.feed_drops = 0  # records the feed lost before the ingest process (a slow reader)
        self.ingest: IngestProcess | None = None  # live: the process that decodes
        self.snapshot: dict[str, Any] | None = None  # attached: the latest snapshot (JSON shape)
        self.snapshots = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._batch: list[tuple[Record, int]] = []
        self._held_until = 0.0
        self._ingest_lock = threading.Lock()
        self.high_water = HIGH_WATER  # live: the ingest process's backlog past which it drops
        self.snaplen = 0  # live from a vsproxy: the payload bytes of each packet asked for (0: all)
        self.started = False

    def start(self) -> None:
        """Start reading (once; a second call does nothing)."""
        if self.started:
            return
        self.started = True
        self._spawn(self._run_guarded, "tui-source")

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except Exception as e:  # the last line of defence: say it, keep what was read
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done = True

    def run(self) -> None:
        raise NotImplementedError

    @property
    def drops(self) -> int:
        """Records the feed lost: before the ingest process, and in it (decoding fell behind)."""
        ingest = self.ingest
        return self.feed_drops + (ingest.drops if ingest is not None else 0)

    def _pump(self, stdin: int, attach: str | None = None) -> str | None:
        """Live: start the ingest process and take its batches in until it ends (its error line)."""
        with self._ingest_lock:
            if self.stopping.is_set():
                return None
            self.ingest = IngestProcess(self.store, stdin, attach, self.high_water, self.snaplen)
        # This thread only takes batches in: on Linux a thread has a niceness of its own, so the
        # UI's thread (keys, drawing) and a vsproxy's data path win the CPU when they want it
        _nice_this_thread(NICE)
        try:
            return self.ingest.pump()
        except IngestError as e:
            return str(e)

    def stop(self) -> None:
        """Stop reading; what was read stays in the store (still readable: a file's records too)."""
        self.stopping.set()
        with self._ingest_lock:
            if self.ingest is not None:
                self.ingest.stop()

    def close(self) -> None:
        """Stop, and let go of the files the store reads rows from."""
        self.stop()
        self.join()
        access = self.store.access
        if isinstance(access, FileAccess):
            access.close()

    def join(self, timeout: float = 2.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def flush(self) -> None:
        if self._batch:
            self.store.feed_many(self._batch)
            self._batch.clear()
            # Let the UI's thread have the interpreter now: decoding never waits on I/O, so
            # without this a key press would wait its turn behind whole switch intervals; and
            # right after the user pressed a key (``hold``), leave it to the UI a little longer.
            pause = self._held_until - time.monotonic()
            time.sleep(min(pause, HOLD_S) if pause > 0 else 0.0005)

    def hold(self, seconds: float = HOLD_S) -> None:
        """The user did something: reading gives way to the UI for ``seconds`` (thread-safe:
        one float written, read at the next batch)."""
        self._held_until = time.monotonic() + seconds


class FileSource(Source):
    def __init__(self, paths: list[str], follow: bool = False) -> None:
        super().__init__(Store(FileAccess(paths)))
        self.paths = paths
        self.follow = follow
        self.live = follow
        self.name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} rotated)"

    def run(self) -> None:
        self.state = "following" if self.follow else "reading"
        store = self.store
        batch = self._batch

        def waiting() -> bool:  # following, at the end of the file: show what came, go on
            self.flush()
            return not self.stopping.is_set()

        try:
            for item in indexed_records(self.paths, waiting if self.follow else None):
                batch.append(item)
                if len(batch) >= BATCH:
                    self.flush()
                    if self.stopping.is_set():
                        return
        except CaptureError as e:
            self.error = f"damaged capture: {e} (read {store.total + len(batch)} packets before it)"
        except OSError as e:
            self.error = f"{e.filename or self.name}: {e.strerror or e}"
        finally:
            self.flush()
        if store.total == 0 and self.error is None:
            self.error = "no vsock packets in this capture (no LINKTYPE_VSOCK records)"
        self.state = "read"


class StreamSource(Source):
    """A live capture stream from a file object (stdin)."""

    def __init__(self, stream: IO[bytes], name: str = "stdin", limit: int = DEFAULT_STORE) -> None:
        super().__init__(Store(limit=limit))
        self.stream = stream
        self.name = name
        self.live = True

    def run(self) -> None:
        self.state = "live"
        error = self._pump(self.stream.fileno())
        if error is not None and not self.stopping.is_set():
            self.error = error if error.startswith("damaged") else f"{self.name}: {error}"
        self.state = "ended"

    def close(self) -> None:
        super().close()
        self.stream.close()


class AttachSource(Source):
    """A running vsproxy's control socket."""

    def __init__(self, path: str, limit: int = DEFAULT_STORE, every: float = SNAPSHOT_EVERY,
                 snaplen: int = LIVE_SNAPLEN) -> None:
        super().__init__(Store(limit=limit))
        self.snaplen = snaplen
        self.path = path
        self.name = f"attached to {path}"
        self.live = True
        self.every = every
        self._sockets: list[socket.socket] = []

    def start(self) -> None:
        from vsproxy.ctl import CtlError, ask, connect

        if self.started:
            return
        try:  # one request first, so a wrong path is one clear line before the screen opens
            s = connect(self.path)
            try:
                ask(s, {"cmd": "snapshot"})
            finally:
                s.close()
        except CtlError as e:
            raise SourceError(str(e)) from None
        super().start()
        self._spawn(self._snapshots, "tui-snapshots")
        self._spawn(self._events, "tui-events")

    def run(self) -> None:
        import subprocess

        self.state = "live"
        error = self._pump(subprocess.DEVNULL, attach=self.path)
        if not self.stopping.is_set():
            if error is None:
                self.error = "control socket closed by vsproxy; what was received is kept"
            elif error.startswith("control socket gone"):
                self.error = error
            else:
                self.error = f"control socket gone: {error}; what was received is kept"
        self.state = "detached"

    def _snapshots(self) -> None:
        from vsproxy.ctl import CtlError, ask, connect

        while not self.stopping.is_set() and self.error is None:
            try:
                s = connect(self.path)
                try:
                    got, _ = ask(s, {"cmd": "snapshot"})
                finally:
                    s.close()
                snap = got.get("snapshot")
                if isinstance(snap, dict):
                    self.snapshot = snap
                    self.snapshots += 1
                    live = (snap.get("capture") or {}).get("live") or {}
                    self.feed_drops = int(live.get("subscriber_dropped", 0)) + int(live.get("ring_dropped", 0))
            except CtlError:
                return  # the packet thread says it (socket gone) when its stream ends
            self.stopping.wait(self.every)

    def _events(self) -> None:
        from vsproxy.ctl import CtlError, ask, connect

        try:
            s = connect(self.path)
            self._sockets.append(s)
            _, rest = ask(s, {"cmd": "subscribe", "what": "events"})
            s.settimeout(None)
            buf = rest
            while not self.stopping.is_set():
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(ev, dict):
                        self.events.append(ev)
                data = s.recv(65536)
                if not data:
                    return
                buf += data
                if len(buf) > 1 << 20:  # no line in a megabyte: not vsproxy's; stop reading it
                    return
        except (CtlError, OSError):
            return

    def stop(self) -> None:
        super().stop()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        super().close()
        for s in self._sockets:
            s.close()


def _nice_this_thread(nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError):  # not Linux, or not allowed: the thread runs as the rest
        pass


class SourceError(Exception):
    """A source that cannot start: one line for the user."""


class ProxySource(Source):
    """vsproxy in this process: its data path runs on its own thread (``Proxy.run``)."""

    def __init__(self, proxy: Proxy, limit: int = DEFAULT_STORE, every: float = SNAPSHOT_EVERY,
                 maxbytes: int | None = None, snaplen: int = LIVE_SNAPLEN) -> None:
        super().__init__(Store(limit=limit))
        self.proxy = proxy
        self.name = "vsproxy (in this process)"
        self.live = True
        self.every = every
        self.snaplen = snaplen
        self.sub = (proxy.subscribe_packets(snaplen=snaplen) if maxbytes is None
                    else proxy.subscribe_packets(maxbytes, snaplen=snaplen))

    def start(self) -> None:
        if self.started:
            return
        super().start()
        self._spawn(self._snapshots, "tui-snapshots")

    def run(self) -> None:
        import subprocess

        self.state = "live"
        self._spawn(self._hand_over, "tui-handover")
        error = self._pump(subprocess.PIPE)
        if error is not None and not self.stopping.is_set():
            self.error = f"live capture: {error}"
        self.state = "stopped"

    def _hand_over(self) -> None:
        """The subscription's bytes to the ingest process, as they come."""
        while self.ingest is None and not self.stopping.is_set():
            time.sleep(0.01)
        ingest = self.ingest
        if ingest is None or ingest.stdin is None:
            return
        sub, out = self.sub, ingest.stdin
        try:
            while not self.stopping.is_set():
                data = sub.take() or sub.read(0.2)
                if data:
                    out.write(data)
                    out.flush()
                elif sub.closed:
                    break
        except (OSError, ValueError):  # the ingest process has gone (stopped): nothing to hand over
            pass
        finally:
            try:
                out.close()
            except OSError:
                pass

    def _snapshots(self) -> None:
        from vsproxy.control import snapshot_json

        while not self.stopping.is_set():
            try:
                snap = self.proxy.snapshot()
            except (TimeoutError, RuntimeError):
                return
            self.snapshot = _jsonable(snapshot_json(snap))
            self.snapshots += 1
            self.feed_drops = self.sub.dropped
            self.stopping.wait(self.every)

    def stop(self) -> None:
        super().stop()
        self.sub.close()


def _jsonable(obj: Any) -> Any:
    """The snapshot as the control socket would send it (tuples as lists, dataclasses as dicts)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
