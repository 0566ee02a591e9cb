"""The guest's rx buffers as the core sees them: the queue and chain interfaces it needs of
the virtqueue walker, and the views of a chain's payload room after the header."""

from __future__ import annotations

from typing import Protocol

from vsproxy.vsock.header import HDR_SIZE


class RxQueue(Protocol):
    """The slice of SplitQueue that fill_rx needs."""

    def pop(self) -> RxChain | None: ...
    def unpop(self) -> None: ...
    def push(self, head: int, length: int) -> None: ...


class RxChain(Protocol):
    @property
    def head(self) -> int: ...
    @property
    def writable(self) -> list[memoryview]: ...
    @property
    def write_len(self) -> int: ...


def payload_views(segs: list[memoryview], want: int) -> list[memoryview]:
    """The writable bytes after the header, ``want`` of them, as views."""
    skip = HDR_SIZE
    out: list[memoryview] = []
    for seg in segs:
        if skip >= len(seg):
            skip -= len(seg)
            continue
        v = seg[skip:] if skip else seg
        skip = 0
        if len(v) >= want:
            out.append(v[:want])
            return out
        out.append(v)
        want -= len(v)
    return out
