"""Application-protocol dissectors over reassembled vsock streams. Pure Python, no scapy.

Each dissector is an ``AppDissector`` subclass fed one direction of one connection, in order
(``dissectors.streams.StreamTracker`` does the reassembly and picks the dissector: by port
first, then by the first bytes of the stream). It returns ``AppMessage`` values: a protocol
name, a one-line summary and the detail fields. The registry holds the built-ins below, in
detection order, and the plugins ``load_plugins`` imports; docs/dissectors.md shows how to
write one.
"""

from __future__ import annotations

from dissectors.app.base import MAX_BUFFER, AppDissector, AppMessage, Step, Undecodable
from dissectors.app.http1 import Http1
from dissectors.app.http2 import Http2
from dissectors.app.hybrid import HybridHandshake
from dissectors.app.nitro import NitroHeartbeat
from dissectors.app.notify import SystemdNotify
from dissectors.app.qmp import Qmp
from dissectors.app.registry import (
    ENTRY_POINT_GROUP,
    PluginError,
    load_plugins,
    load_spec,
    register,
    registered,
    unregister,
)
from dissectors.app.tls import Tls
from dissectors.app.ttrpc import Ttrpc

# Detection order: the most specific first bytes first. The hybrid handshake goes before
# HTTP ("CONNECT 52\n" against "CONNECT host:443 HTTP/1.1"), the heartbeat's single byte and
# notify's loose KEY= last.
BUILTINS: tuple[type[AppDissector], ...] = (
    Tls, Http2, HybridHandshake, Http1, Ttrpc, Qmp, SystemdNotify, NitroHeartbeat,
)
for _cls in BUILTINS:
    register(_cls)

__all__ = [
    "BUILTINS", "ENTRY_POINT_GROUP", "MAX_BUFFER", "AppDissector", "AppMessage", "Http1", "Http2",
    "HybridHandshake", "NitroHeartbeat", "PluginError", "Qmp", "Step", "SystemdNotify", "Tls", "Ttrpc",
    "Undecodable", "load_plugins", "load_spec", "register", "registered", "unregister",
]
