"""What sees the packets that cross vsproxy, after the verdict: shared by every device's core.

Two kinds of observer:

- per-packet taps (the demo's transcript, a TUI feed): called with each packet's header and
  payload views. While one is attached, the data path stays in Python so each packet can be
  shown to it.
- one capture sink (the capture hub, vsproxy.capture.hub: the pcap/pcapng file and live
  subscribers): it takes the same calls from the Python paths, and records the C fast paths
  formatted themselves (``reserve``/``release``), so capturing does not turn the fast paths off.
  It is set while anything subscribes; attaching or removing it between packets is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from vsproxy.endpoints.base import Buffer

CAP_NONE, CAP_PCAP, CAP_PCAPNG = 0, 1, 2  # record layouts the C paths write (vsproxy/_c/capture.c)
CAP_COMMENT_MAX = 512  # the longest capture comment (a connection's mark) the C paths write (capture.h)
CAP_SPARE = 32768  # room the C paths keep in a lent chunk for the updates of rx chains they give back


class Tap(Protocol):
    """Sees every packet that crosses the device. ``to_guest`` is the direction; the payload
    is the first ``hdr.len`` bytes of ``payload`` (the views may be longer), valid only during
    the call: a tap copies what it keeps. ``mark`` is the capture comment (rewrite, denial)."""

    def __call__(
        self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None
    ) -> None: ...


class RecordChunk(Protocol):
    """Capture memory the C paths write records into, in place. ``native`` is the fast path's
    handle on ``view``, kept with the chunk so it is made once."""

    view: memoryview
    size: int
    used: int  # bytes of whole records so far
    records: int
    native: Any


class CaptureSink(Tap, Protocol):
    """A tap whose records the C fast paths also write, straight into its memory:
    ``reserve`` a chunk, let C append records after ``chunk.used``, then ``release`` it with
    how far the records that stand reach (a caller may cut records it then hands to the
    Python path). Between the two, the caller makes no other call on the sink."""

    @property
    def record_mode(self) -> int: ...  # CAP_PCAP or CAP_PCAPNG

    def interface(self, device: str) -> int: ...  # pcapng interface id of a device

    @property
    def snaplen(self) -> int: ...  # payload bytes a record keeps at most (0: all), as tcpdump -s

    def reserve(self) -> RecordChunk | None: ...  # None: no room, the caller counts its packets dropped

    def release(self, chunk: RecordChunk, used: int, records: int) -> None: ...

    def drop(self, count: int) -> None: ...


class Taps:
    __slots__ = ("_callbacks", "active", "sink")

    def __init__(self) -> None:
        self._callbacks: list[Tap] = []
        self.sink: CaptureSink | None = None
        self.active = False  # anything attached: the data path must call us

    @property
    def per_packet(self) -> bool:
        """A per-packet tap is attached: the C fast paths must stand aside."""
        return bool(self._callbacks)

    def add(self, tap: Tap) -> None:
        self._callbacks.append(tap)
        self.active = True

    def remove(self, tap: Tap) -> None:
        self._callbacks.remove(tap)
        self.active = bool(self._callbacks) or self.sink is not None

    def c_comment(self, mark: str | None) -> bytes | None:
        """The capture comment the C paths write for a packet with this mark: b"" for none
        (nothing captured, or no mark), None if it is too long for them (the Python path then)."""
        if mark is None or self.sink is None:
            return b""
        text = mark.encode()
        return text if len(text) <= CAP_COMMENT_MAX else None

    def set_sink(self, sink: CaptureSink | None) -> None:
        self.sink = sink
        self.active = bool(self._callbacks) or sink is not None

    def __call__(
        self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None
    ) -> None:
        for tap in self._callbacks:
            tap(device, to_guest, hdr, payload, mark)
        sink = self.sink  # read once: a live subscriber may attach or leave between packets
        if sink is not None:
            sink(device, to_guest, hdr, payload, mark)
