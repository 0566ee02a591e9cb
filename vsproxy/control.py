"""The control socket (``--control PATH``): snapshots, counter resets and live event and packet
streams for clients on the same machine (docs/control.md).

Requests are read on the loop, a line at a time, and answered there (a snapshot is taken on
the loop, so it sees one consistent state). A client that subscribes leaves the loop: its socket
goes to a thread of its own that writes the stream, so a client that does not read blocks only
that thread, and the stream's bounded queue drops what it cannot take, counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

from vsproxy.capture.hub import MAX_SNAPLEN, Subscription, split_records
from vsproxy.capture.reader import CaptureError, records
from vsproxy.endpoints.listeners import Acceptor, listen_unix
from vsproxy.eventbus import EventQueue
from vsproxy.filter import FilterError, Predicate, compile_filter
from vsproxy.limits import ratelog
from vsproxy.loop import Loop, TimerHandle
from vsproxy.snapshot import Snapshot, take
from vsproxy.taps import CAP_PCAP

if TYPE_CHECKING:
    from vsproxy.app import Proxy

log = logging.getLogger("vsproxy.control")

MAX_LINE = 65536
IDLE_TIMEOUT = 10.0
_UCRED = struct.Struct("3i")  # pid, uid, gid


def snapshot_json(snap: Snapshot) -> dict[str, Any]:
    return dataclasses.asdict(snap)


class ControlServer:
    def __init__(self, path: str, proxy: Proxy) -> None:
        self.path = path
        self.proxy = proxy
        self.loop: Loop = proxy.loop
        old = os.umask(0o177)  # the socket file is made 0600
        try:
            sock = listen_unix(path, 16)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.acceptor = Acceptor(sock, self.loop, f"control socket {path}", self._accepted)
        self.clients: set[_Client] = set()
        self.refused = 0

    def _accepted(self, s: socket.socket, _addr: object) -> None:
        try:
            _pid, uid, _gid = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            uid = -1
        if uid not in (0, os.getuid()):
            self.refused += 1
            ratelog(log, logging.WARNING, "control refused", "control socket: uid %d refused", uid)
            s.close()
            return
        self.clients.add(_Client(self, s))

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        self.acceptor.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Client:
    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = server.loop
        self.buf = b""
        self.closed = False
        sock.setblocking(False)
        self.loop.set_reader(sock.fileno(), self._read)
        self.timer: TimerHandle | None = self.loop.call_later(IDLE_TIMEOUT, self._idle)

    def on_fault(self, exc: Exception) -> None:
        self.close()

    def _idle(self) -> None:
        self.timer = None
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        self.server.clients.discard(self)

    def _discard_input(self, most: int = 1 << 20) -> None:
        """Read and drop what the client sent that is still waiting (at most ``most`` bytes)."""
        while most > 0:
            try:
                n = len(self.sock.recv(65536))
            except OSError:
                return
            if not n:
                return
            most -= n

    def _send(self, obj: dict[str, Any]) -> bool:
        """One answer. Answers are small: a client that does not read one within a second is gone."""
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.sock.settimeout(1.0)
        try:
            self.sock.sendall(data)
        except OSError:
            self.close()
            return False
        finally:
            if not self.closed:
                self.sock.setblocking(False)
        return True

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.buf += data
        while not self.closed:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE:
                    self._send({"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    self._discard_input()  # unread bytes would turn the close into a reset
                    self.close()
                return
            line, self.buf = self.buf[:nl], self.buf[nl + 1:]
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(IDLE_TIMEOUT, self._idle)
            self._request(line)

    def _request(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            self._send({"ok": False, "error": f"not JSON: {e}"})
            return
        if not isinstance(req, dict):
            self._send({"ok": False, "error": "a request is a JSON object"})
            return
        cmd = req.get("cmd")
        proxy = self.server.proxy
        if cmd == "snapshot":
            self._send({"ok": True, "snapshot": snapshot_json(take(proxy))})
        elif cmd == "reset":
            proxy.reset_counters()
            self._send({"ok": True})
        elif cmd == "subscribe" and req.get("what") == "events":
            q = proxy.switch.events.subscribe()  # before the answer: no event in between is lost
            if self._send({"ok": True}):
                self._hand_off(lambda: _stream_events(self.sock, q))
            else:
                q.close()
        elif cmd == "subscribe" and req.get("what") == "packets":
            self._subscribe_packets(req.get("filter") or "", req.get("snaplen", 0))
        else:
            self._send({"ok": False, "error": f"unknown request {str(cmd)[:40]!r} "
                        "(known: snapshot, reset, subscribe events, subscribe packets)"})

    def _subscribe_packets(self, text: object, snaplen: object) -> None:
        if not isinstance(text, str):
            self._send({"ok": False, "error": "filter must be a string"})
            return
        if type(snaplen) is not int or not 0 <= snaplen <= MAX_SNAPLEN:
            self._send({"ok": False, "error": f"snaplen must be a number of bytes in 0..{MAX_SNAPLEN} (0: all)"})
            return
        try:
            pred = compile_filter(text) if text.strip() else None
        except FilterError as e:
            self._send({"ok": False, "error": f"bad filter: {e}"})
            return
        sub = self.server.proxy.subscribe_packets(snaplen=snaplen)
        fmt = "pcap" if sub.hub.record_mode == CAP_PCAP else "pcapng"
        if self._send({"ok": True, "format": fmt}):
            self._hand_off(lambda: _stream_packets(self.sock, sub, pred))
        else:
            sub.close()

    def _hand_off(self, run: Any) -> None:
        """The client leaves the loop: its socket (blocking now) goes to a thread of its own."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.forget(self.sock.fileno())
        self.server.clients.discard(self)
        self.closed = True  # for the loop: the thread owns the socket now
        self.sock.setblocking(True)
        threading.Thread(target=run, name="vsproxy-control-stream", daemon=True).start()


def _stream_events(sock: socket.socket, q: EventQueue) -> None:
    seen_dropped = 0
    try:
        while not q.closed:
            events = q.get(1.0)
            out = [json.dumps(e.as_dict(), separators=(",", ":")) for e in events]
            if q.dropped != seen_dropped:
                out.append(json.dumps({"dropped": q.dropped - seen_dropped}))
                seen_dropped = q.dropped
            if out:
                sock.sendall(("\n".join(out) + "\n").encode())
            elif _peer_gone(sock):
                return
    except OSError:
        pass
    finally:
        q.close()
        sock.close()


def _stream_packets(sock: socket.socket, sub: Subscription, pred: Predicate | None) -> None:
    """The capture stream to the client: the header as is, then the records the filter matches
    (the filter runs here, in the client's thread, never on the data path)."""
    from vsproxy.decode import Decoder

    decoder = Decoder(pred) if pred is not None else None
    header_sent = False
    pcap = sub.hub.record_mode == CAP_PCAP
    try:
        while not sub.closed or sub.queued:
            piece = sub.read_piece(1.0)
            if piece is None:
                if _peer_gone(sock):
                    return
                continue
            with piece:  # (the ring's chunk, not a copy: given back once sent)
                if not header_sent or decoder is None:
                    sock.sendall(piece.data)
                    if not header_sent:
                        header_sent = True
                        head = bytes(piece.data)
                    continue
                sock.sendall(_matching(head, bytes(piece.data), decoder, pcap))
    except (OSError, CaptureError):
        pass
    finally:
        sub.close()
        sock.close()


def _matching(head: bytes, data: bytes, decoder: Any, pcap: bool) -> bytes:
    """The records of ``data`` (whole records, after the stream ``head``) the decoder's filter
    matches, as they were."""
    import io

    out = []
    off = 0
    for rec in records(io.BytesIO(head + data)):
        size, _ = split_records(memoryview(data)[off:], 1 << 30, pcap, 1)
        raw = data[off:off + size]
        off += size
        if decoder.decode(rec).matched:
            out.append(raw)
    return b"".join(out)


def _peer_gone(sock: socket.socket) -> bool:
    """The client closed its end (a subscriber only ever reads)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
