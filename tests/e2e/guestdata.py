"""Python twins of the data functions in tests/guest/vsock_tool.c.

prng_bytes(seed, n): the xorshift64* byte stream that `vsock_tool send/multi/
source-server` produce:
    s = seed (mod 2**64), or 0x9E3779B97F4A7C15 if seed is 0
    per 8-byte block: s ^= s >> 12; s ^= (s << 25) mod 2**64; s ^= s >> 27;
                      v = (s * 0x2545F4914F6CDD1D) mod 2**64
                      emit v as 8 bytes little-endian
    the first n bytes of the concatenation.

fnv1a64(data): 64-bit FNV-1a as 16 lowercase hex digits (the `REPLY`,
`RECEIVED` lines of vsock_tool).
"""

from __future__ import annotations

import functools
import sys
from array import array

MASK64 = (1 << 64) - 1
_MUL = 0x2545F4914F6CDD1D
_ZERO_SEED = 0x9E3779B97F4A7C15

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

__all__ = ["Fnv1a64", "PrngStream", "fnv1a64", "prng_bytes"]


def _blocks(state: int, nblocks: int) -> tuple[array[int], int]:
    """Return (array of nblocks uint64 outputs, new state)."""
    out = array("Q", bytes(8 * nblocks))
    s = state
    m = MASK64
    mul = _MUL
    for i in range(nblocks):
        s ^= s >> 12
        s ^= (s << 25) & m
        s ^= s >> 27
        out[i] = (s * mul) & m
    return out, s


def _to_le_bytes(a: array[int]) -> bytes:
    if sys.byteorder != "little":
        a = array("Q", a)
        a.byteswap()
    return a.tobytes()


@functools.lru_cache(maxsize=32)
def prng_bytes(seed: int, n: int) -> bytes:
    """The first n bytes of the vsock_tool PRNG stream for seed (about 50 ms per MiB)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    s = seed & MASK64 or _ZERO_SEED
    a, _ = _blocks(s, (n + 7) // 8)
    return _to_le_bytes(a)[:n]


class PrngStream:
    """Incremental version of prng_bytes: read(k) returns the next k bytes."""

    def __init__(self, seed: int) -> None:
        self._s = seed & MASK64 or _ZERO_SEED
        self._buf = b""

    def read(self, k: int) -> bytes:
        if k > len(self._buf):
            need = k - len(self._buf)
            a, self._s = _blocks(self._s, (need + 7) // 8)
            self._buf += _to_le_bytes(a)
        r, self._buf = self._buf[:k], self._buf[k:]
        return r


class Fnv1a64:
    """Incremental FNV-1a 64 (update(data), hexdigest())."""

    def __init__(self) -> None:
        self.h = FNV_OFFSET

    def update(self, data: bytes) -> None:
        h = self.h
        p = FNV_PRIME
        m = MASK64
        for b in data:
            h = ((h ^ b) * p) & m
        self.h = h

    def hexdigest(self) -> str:
        return f"{self.h:016x}"


def fnv1a64(data: bytes) -> str:
    """FNV-1a 64 of data as 16 lowercase hex digits."""
    f = Fnv1a64()
    f.update(data)
    return f.hexdigest()
