"""What keeps one guest or one host program inside its share of the process.

vsproxy serves several guests from one process, and every host connection costs a file
descriptor. Three things keep a flood by one tenant from reaching the others:

- limits per device (open connections, pending connects) and per hybrid socket (connections
  still in their ``CONNECT`` handshake), whose defaults split the file limit between devices
  so the sum stays below it (``default_limits``); and per device on the guest data held for
  host sides that do not read (``max_buffered``) and the control packets waiting for the
  guest's rx buffers (``max_control``);
- descriptor exhaustion (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) handled where a
  descriptor is made: the connection is refused, a listener pauses, the event is counted;
- logging that one peer can trigger is rate-limited per kind (``ratelog``), so a flood shows
  as a few lines and a count, never as megabytes of log.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("vsproxy.limits")

# What the kernel says when descriptors or the memory behind them ran out: the process,
# the system, socket buffers. None of them is the peer's fault; all of them pass.
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# Descriptors the process keeps besides connections: epoll, the wake-up and signal socket
# pairs, stdio, the capture file, the control socket, logging, Python's own.
RESERVE_FDS = 64
# Per device besides connections: the vhost-user listener and the front-end's socket, six
# vring eventfds, up to eight memory-region fds while a table is being mapped, host listeners.
PER_DEVICE_FDS = 24
# vsock has 2^32 ports, but a device never needs more than this many connections at once.
MAX_CONNECTIONS_CAP = 65536
MAX_HANDSHAKES_CAP = 1024
# Hybrid listeners per device (the stream socket and its ``.seqpacket`` twin).
HYBRID_LISTENERS = 2
# Guest data held in vsproxy for host sides that do not read, per device. Credit bounds each
# connection to about two windows (2 MiB by default); this bounds their sum, far above what
# a guest with a few dozen busy connections to slow readers holds. Past it the connection
# that holds the most gets RST (vsock.table.ConnTable._check_buffered).
MAX_BUFFERED = 256 << 20
# Control packets (RST, RESPONSE, credit updates, SHUTDOWN) queued for a guest that posts no
# rx buffers. Past it the guest's tx ring is left alone until it takes them, as Linux's
# vhost-vsock stops reading tx once a ring's worth of replies waits (vhost_vsock_more_replies):
# nothing is dropped, and each packet the guest could still send is one more reply to hold.
# Credit updates are one per connection at most (UPDATE_QUEUED), so a CREDIT_REQUEST flood
# adds nothing; RSTs for REQUESTs past a limit and for unknown connections are what grows.
MAX_CONTROL = 4096


def exhausted(e: OSError) -> bool:
    """True if ``e`` says descriptors (or the memory behind them) ran out."""
    return e.errno in EXHAUSTION_ERRNOS


@dataclass(frozen=True)
class Limits:
    """One device's share. ``max_connections`` counts every connection that holds a host
    resource (open, connecting, or flushing what the guest sent before it closed)."""

    max_connections: int
    max_pending: int
    max_handshakes: int  # per hybrid socket
    max_buffered: int = MAX_BUFFERED  # bytes
    max_control: int = MAX_CONTROL  # packets


def default_limits(nofile: int, devices: int) -> Limits:
    """Each device's equal share of ``nofile`` descriptors, after what the process and the
    devices themselves keep: the sum over all devices stays below the file limit."""
    devices = max(1, devices)
    share = max(8, (nofile - RESERVE_FDS - PER_DEVICE_FDS * devices) // devices)
    handshakes = min(MAX_HANDSHAKES_CAP, max(2, share // 16))
    connections = min(MAX_CONNECTIONS_CAP, max(4, share - HYBRID_LISTENERS * handshakes))
    pending = min(connections, max(64, connections // 4))
    return Limits(connections, pending, handshakes)


def fds_needed(limits: list[Limits]) -> int:
    """Descriptors the given device limits may use together, reserve included."""
    return RESERVE_FDS + sum(PER_DEVICE_FDS + x.max_connections + HYBRID_LISTENERS * x.max_handshakes
                             for x in limits)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # pragma: no cover - refused by the platform
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def nofile_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(slots=True)
class Health:
    """Process-wide events no single device owns; in every snapshot."""

    fd_exhausted: int = 0  # a descriptor could not be made (connect, accept): refused or paused
    accept_pauses: int = 0  # a listener stopped accepting for a moment after EMFILE and the like
    handshakes_dropped: int = 0  # hybrid connections still in their handshake, dropped at the limit
    faults: int = 0  # unexpected exceptions caught by the loop's last line of defence


# -- rate-limited logging -----------------------------------------------------------------------
RATE_INTERVAL = 5.0
RATE_BURST = 5
_MAX_KEYS = 1024


class _Window:
    __slots__ = ("count", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0


_windows: dict[str, _Window] = {}


def ratelog(logger: logging.Logger, level: int, key: str, msg: str, *args: object,
            exc_info: BaseException | None = None) -> bool:
    """Log at most ``RATE_BURST`` lines of kind ``key`` every ``RATE_INTERVAL`` seconds; the
    rest are counted and the next line that passes says how many were left out. True if
    this one was logged."""
    if not logger.isEnabledFor(level):
        return False
    now = time.monotonic()
    w = _windows.get(key)
    if w is None:
        if len(_windows) >= _MAX_KEYS:
            _windows.clear()  # keys are kinds, not peers; this only guards against a bug
        w = _windows[key] = _Window(now)
    elif now - w.start >= RATE_INTERVAL:
        if w.suppressed:
            logger.log(level, "%s: %d similar messages left out in the last %.0f s", key, w.suppressed,
                       now - w.start)
        w.start, w.count, w.suppressed = now, 0, 0
    if w.count >= RATE_BURST:
        w.suppressed += 1
        return False
    w.count += 1
    logger.log(level, msg, *args, exc_info=exc_info)
    return True


def reset_ratelog() -> None:
    """Forget every window (tests)."""
    _windows.clear()
