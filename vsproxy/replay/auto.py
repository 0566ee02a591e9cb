"""``vsproxy replay client --to auto``: each connection goes where a vsproxy configuration would
route it (``--config FILE``, or vsproxy's own options after ``--``): the device the capture shows,
the policy's verdict on the peer the guest dialled (remaps, allowlists, services), and that
device's host endpoints (``--forward`` TCP, ``--uds-path`` unix, SEQPACKET on unix only).

A connection the configuration would not send to a host socket (denied, a built-in service, a
sibling guest, AF_VSOCK) cannot be played against one: connecting says why (``OSError``), and it
is reported as a failed connection.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from vsproxy.config import ConfigError, Settings
from vsproxy.policy import Policy
from vsproxy.replay.transcript import Conversation
from vsproxy.vsock import header as H


class AutoError(ValueError):
    pass


class NotRoutable(OSError):
    """The configuration would not send this connection to a host socket."""


def settings_from(options: Sequence[str]) -> Settings:
    """A vsproxy configuration from vsproxy's own command-line options (nothing is started)."""
    from vsproxy import cli

    try:
        args = cli.build_parser().parse_args(list(options))
        return cli.settings_from_args(args)
    except (cli.UsageError, ConfigError) as e:
        raise AutoError(f"the vsproxy configuration: {e}") from None


class AutoTarget:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policy: Policy = settings.policy()
        self.devices = {d.name: d for d in settings.devices}

    def _route(self, conv: Conversation) -> tuple[str, str]:
        """(kind, address): kind "tcp" (HOST:PORT), "unix" or "seqpacket" (a path). Raises NotRoutable."""
        dev = self.devices.get(conv.device)
        if dev is None:
            if len(self.devices) != 1:
                raise NotRoutable(f"the configuration has no device {conv.device!r}")
            dev = next(iter(self.devices.values()))
        cid, port = conv.server
        route = self.policy.outbound(dev.name, cid, port)
        if not route.allowed:
            raise NotRoutable(f"the configuration denies it ({route.rule})")
        if route.kind != "host":
            what = f"service {route.service}" if route.kind == "service" else f"{route.kind} {route.device or ''}"
            raise NotRoutable(f"the configuration sends it to {what.strip()}, not a host socket")
        ep = dev.endpoints
        if conv.sock_type == int(H.Type.SEQPACKET):
            if ep.uds_path is None:
                raise NotRoutable("SEQPACKET goes to unix sockets only, and the device has no uds-path")
            return "seqpacket", f"{ep.uds_path}_{route.port}"
        fwd = ep.forwards.get(route.port)
        if fwd is not None:
            return "tcp", f"{fwd.host}:{fwd.port}"
        if ep.forward_cid is not None:
            raise NotRoutable(f"the configuration sends it to AF_VSOCK {ep.forward_cid}:{route.port}, not replayed")
        if ep.uds_path is not None:
            return "unix", f"{ep.uds_path}_{route.port}"
        raise NotRoutable(f"the configuration has no host endpoint for port {route.port}")

    def where(self, conv: Conversation) -> str:
        try:
            kind, addr = self._route(conv)
        except NotRoutable:
            return "auto"
        return f"tcp:{addr}" if kind == "tcp" else f"uds:{addr}"

    def connect(self, conv: Conversation, timeout: float) -> socket.socket:
        kind, addr = self._route(conv)
        if kind == "tcp":
            host, _, port = addr.rpartition(":")
            return socket.create_connection((host, int(port)), timeout=timeout)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET if kind == "seqpacket" else socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            raise
        return s
