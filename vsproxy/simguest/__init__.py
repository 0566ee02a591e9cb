"""Simulated guest for vsproxy: a Python vhost-user front-end plus a Linux-like virtio-vsock driver.

See ``guest.SimGuest`` for the entry point; tests, benchmarks and replays use it instead of a VM.
"""

from .driver import Stats, peer_free
from .errors import (
    BackendClosed,
    BackendNack,
    NegotiationError,
    ReplyTimeout,
    RingError,
    RingFull,
    SimGuestError,
    SimGuestTimeout,
)
from .guest import SEQPACKET, STREAM, SimGuest
from .memory import GuestMemory
from .ring import Buf, SplitRing
from .sockets import GuestListener, GuestSocket, IncompleteRead

__all__ = [
    "SEQPACKET",
    "STREAM",
    "BackendClosed",
    "BackendNack",
    "Buf",
    "GuestListener",
    "GuestMemory",
    "GuestSocket",
    "IncompleteRead",
    "NegotiationError",
    "ReplyTimeout",
    "RingError",
    "RingFull",
    "SimGuest",
    "SimGuestError",
    "SimGuestTimeout",
    "SplitRing",
    "Stats",
    "peer_free",
]
