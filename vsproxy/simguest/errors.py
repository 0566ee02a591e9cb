"""Typed errors of the simulated guest.

Every wait in the simulated guest ends either in success or in one of these, so a test that
drives a broken backend fails with a message naming what did not happen instead of hanging.
"""

from __future__ import annotations


class SimGuestError(Exception):
    """Base class: something the simulated guest could not do or saw the backend do wrong."""


class SimGuestTimeout(SimGuestError, TimeoutError):
    """A bounded wait ran out (a reply, a used buffer, a RESPONSE, credit...)."""


class ReplyTimeout(SimGuestTimeout):
    """The backend did not answer a vhost-user request in time."""


class NegotiationError(SimGuestError):
    """The backend's features or replies make it unusable the way QEMU would use it."""


class BackendClosed(SimGuestError, ConnectionError):
    """The backend closed the vhost-user socket."""


class BackendNack(SimGuestError):
    """The backend answered a need_reply request with a non-zero status."""


class RingError(SimGuestError):
    """The backend put something impossible on a used ring (unknown id, index jump, bad length)."""


class RingFull(SimGuestError):
    """No free descriptors for a chain; callers wait for used entries and retry."""
