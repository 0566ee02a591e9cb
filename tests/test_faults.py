"""The last line of defence in a running proxy: an unexpected exception in one connection's
handler resets that connection; one in a device's session handler ends that session (the
device resets and takes the next front-end); the process and every other device go on."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from helpers import running, unix_server

from vsproxy.app import Proxy
from vsproxy.device import DeviceConfig
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.frontend import FrontendSession
from vsproxy.simguest import BackendClosed, SimGuest, SimGuestError
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import VsockCore


@pytest.fixture
def proxy(workdir: str) -> Iterator[Proxy]:
    cfgs = [DeviceConfig(5, os.path.join(workdir, "a.sock"), name="A",
                         endpoints=HostEndpoints(uds_path=os.path.join(workdir, "ha"))),
            DeviceConfig(6, os.path.join(workdir, "b.sock"), name="B",
                         endpoints=HostEndpoints(uds_path=os.path.join(workdir, "hb")))]
    with running(Proxy(cfgs)) as p:
        yield p


def echo(s: object, data: bytes) -> bytes:
    s.sendall(data)  # type: ignore[attr-defined]
    return bytes(s.recv_exactly(len(data), timeout=10))  # type: ignore[attr-defined]


def test_an_error_in_one_connections_handler_resets_only_that_connection(
        proxy: Proxy, workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = VsockCore.peer_connected

    def broken(self: VsockCore, conn: Connection) -> None:
        if conn.peer_port == 5001:
            raise KeyError("a bug in the connected handler")
        real(self, conn)

    monkeypatch.setattr(VsockCore, "peer_connected", broken)
    servers = [unix_server(os.path.join(workdir, f"ha_{p}")) for p in (5000, 5001)]
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            good = g.connect(5000)
            with pytest.raises(ConnectionResetError):
                g.connect(5001)  # the broken one: RST, as for any connection vsproxy gives up
            assert echo(good, b"still here") == b"still here"
            again = g.connect(5000)  # new connections work too
            assert echo(again, b"and new ones") == b"and new ones"
            good.close()
            again.close()
        assert proxy.loop.health.faults == 1
        assert proxy.snapshot().process.faults == 1
    finally:
        for s in servers:
            s.close()


def test_an_error_in_a_devices_session_handler_ends_that_session_and_spares_the_others(
        proxy: Proxy, workdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    armed = threading.Event()
    real = FrontendSession._process_tx

    def broken(self: FrontendSession, txq: object) -> int:
        if armed.is_set() and self.name == "A":
            armed.clear()
            raise RuntimeError("a bug in the tx pump")
        return real(self, txq)  # type: ignore[arg-type]

    monkeypatch.setattr(FrontendSession, "_process_tx", broken)
    servers = [unix_server(os.path.join(workdir, f"{d}_5000")) for d in ("ha", "hb")]
    try:
        with SimGuest(os.path.join(workdir, "b.sock")) as gb:
            b_conn = gb.connect(5000)
            with SimGuest(os.path.join(workdir, "a.sock"), timeout=3) as ga:
                armed.set()
                with pytest.raises((BackendClosed, SimGuestError, ConnectionResetError, TimeoutError)):
                    ga.connect(5000)  # A's session ends under it
            assert echo(b_conn, b"B is unaffected") == b"B is unaffected"
            with SimGuest(os.path.join(workdir, "a.sock")) as ga2:  # A's device takes a new front-end
                s = ga2.connect(5000)
                assert echo(s, b"A is back") == b"A is back"
                s.close()
            b_conn.close()
        assert proxy.loop.health.faults == 1
    finally:
        for srv in servers:
            srv.close()
