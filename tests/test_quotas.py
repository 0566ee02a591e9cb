"""Per-device quotas on memory, with plain bytes on the sans-I/O core: the guest data held for
host sides that do not read (``max_buffered``) and the control packets waiting for a guest
that posts no rx buffers (``max_control``); and how the options are read and shown."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from test_vsock_core import GPORT, GUEST, FakePeer, FakeRx, pkt

from vsproxy import config as cfg
from vsproxy.endpoints.sibling import SiblingEnd, pair
from vsproxy.limits import MAX_BUFFERED, MAX_CONTROL, reset_ratelog
from vsproxy.vsock import header as H
from vsproxy.vsock.connection import Connection
from vsproxy.vsock.core import VsockCore
from vsproxy.vsock.header import Header, Op

WINDOW = 65536


class Guest:
    """A core whose every connection gets its own fake host peer, which takes ``accept`` bytes."""

    def __init__(self, accept: int = 1 << 30, **limits: int) -> None:
        self.accept = accept
        self.peers: dict[int, FakePeer] = {}
        self.core = VsockCore(GUEST, self._connector, buf_alloc=WINDOW, **limits)

    def _connector(self, conn: Connection) -> FakePeer:
        peer = self.peers[conn.peer_port] = FakePeer(accept=self.accept)
        return peer

    def send(self, op: int, port: int, payload: bytes = b"", fwd_cnt: int = 0) -> None:
        self.core.guest_packet(*pkt(op, dst_port=port, payload=payload, buf_alloc=WINDOW, fwd_cnt=fwd_cnt))
        self.core.flush_host()

    def open(self, port: int) -> Connection:
        self.send(Op.REQUEST, port)
        conn = self.core.conns[(H.Type.STREAM, GPORT, 2, port)]
        self.core.peer_connected(conn)
        return conn

    def drain(self, room: int = 64) -> list[Header]:
        rx = FakeRx(count=room)
        self.core.fill_rx(rx)
        return [h for h, _ in rx.packets()]

    def fill_window(self, port: int) -> None:
        """The guest sends its whole window: 16 packets of 4 KiB."""
        for _ in range(WINDOW // 4096):
            self.send(Op.RW, port, b"x" * 4096)


def test_data_held_for_hosts_that_do_not_read_is_counted_per_device_and_let_go_as_they_read() -> None:
    g = Guest(accept=0)
    conns = [g.open(p) for p in (1, 2)]
    g.fill_window(1)
    g.fill_window(2)
    assert g.core.buffered == 2 * WINDOW == sum(c.held for c in conns)
    g.peers[1].accept = WINDOW // 2  # host 1 reads half
    g.core.peer_writable(conns[0])
    assert g.core.buffered == WINDOW + WINDOW // 2
    g.send(Op.RST, 2)  # the guest resets connection 2: what it held is gone
    assert g.core.buffered == WINDOW // 2
    g.peers[1].accept = 1 << 30
    g.core.peer_writable(conns[0])
    assert g.core.buffered == 0 and bytes(g.peers[1].sent) == b"x" * WINDOW


def test_past_max_buffered_the_connection_holding_the_most_is_reset_and_the_rest_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    reset_ratelog()
    g = Guest(accept=0, max_buffered=WINDOW + 8192)
    hog, slow, fine = g.open(1), g.open(2), g.open(3)
    g.peers[3].accept = 1 << 30  # connection 3's host reads everything
    g.fill_window(1)
    g.fill_window(3)
    g.send(Op.RW, 2, b"y" * 4096)
    g.drain()
    assert g.core.buffered == WINDOW + 4096 and g.core.counters.buffer_resets == 0
    with caplog.at_level(logging.WARNING, "vsproxy.vsock"):
        g.send(Op.RW, 2, b"y" * 8192)  # connection 2 goes past the device's limit, 1 holds the most
    assert g.core.counters.buffer_resets == 1
    assert [(h.op, h.dst_port) for h in g.drain() if h.op == Op.RST] == [(Op.RST, GPORT)]
    assert hog.key not in g.core.conns and g.peers[1].closed is True  # RST to the guest, reset to the host
    assert slow.key in g.core.conns and fine.key in g.core.conns
    assert g.core.buffered == 12288 == slow.held
    assert any("max-buffered" in r.getMessage() for r in caplog.records)
    g.fill_window(3)  # the others go on
    assert bytes(g.peers[3].sent) == b"x" * 2 * WINDOW


def test_a_closed_connection_still_flushing_counts_until_its_linger_ends() -> None:
    g = Guest(accept=0)
    conn = g.open(1)
    g.fill_window(1)
    g.send(Op.SHUTDOWN, 1)
    g.core.guest_packet(*pkt(Op.SHUTDOWN, dst_port=1, flags=H.SHUTDOWN_BOTH))
    assert g.core.lingering() == 1 and g.core.buffered == WINDOW == conn.held
    g.core.tick(1000.0)  # its host never read: dropped at the linger deadline
    assert g.core.lingering() == 0 and g.core.buffered == 0


def test_a_flood_of_credit_requests_queues_at_most_one_update_per_connection() -> None:
    g = Guest()
    g.open(1)
    g.drain()
    for _ in range(10000):
        g.send(Op.CREDIT_REQUEST, 1)
    assert [h.op for h in g.drain()] == [Op.CREDIT_UPDATE]


def test_a_guest_that_takes_no_replies_has_its_tx_paused_at_max_control_counted_once(
        caplog: pytest.LogCaptureFixture) -> None:
    reset_ratelog()
    g = Guest(max_control=100)
    with caplog.at_level(logging.WARNING, "vsproxy.vsock"):
        for port in range(1, 100):
            g.send(Op.RW, port, b"z")  # unknown connection: each gets RST
        assert not g.core.tx_blocked() and len(g.core.control) == 99
        g.send(Op.RW, 100, b"z")
        assert g.core.tx_blocked() and g.core.tx_blocked()
    assert g.core.counters.control_full == 1
    assert sum("max-control" in r.getMessage() for r in caplog.records) == 1
    assert len(g.drain(room=200)) == 100  # nothing was dropped
    assert not g.core.tx_blocked()
    for port in range(1, 101):
        g.send(Op.RW, port, b"z")
    assert g.core.tx_blocked() and g.core.counters.control_full == 2  # a second time, counted again


def test_the_defaults_are_the_documented_ones() -> None:
    core = VsockCore(GUEST, lambda c: None)
    assert (core.max_buffered, core.max_control) == (MAX_BUFFERED, MAX_CONTROL) == (256 << 20, 4096)


@pytest.mark.parametrize(("text", "value"), [("65536", 65536), ("64K", 65536), ("256M", 256 << 20), ("1g", 1 << 30),
                                             ("2GiB", 2 << 30), ("512MB", 512 << 20)])
def test_max_buffered_takes_bytes_with_binary_units(text: str, value: int) -> None:
    assert cfg.parse_limit_value("max-buffered", text, "--max-buffered") == value


@pytest.mark.parametrize("text", ["", "0", "1K", "12X", "-5M", "2T", "M", "1.5G"])
def test_max_buffered_refuses_what_is_not_a_size_in_range(text: str) -> None:
    with pytest.raises(cfg.ConfigError, match=r"--max-buffered: .* is not a size in 64K\.\.1024G"):
        cfg.parse_limit_value("max-buffered", text, "--max-buffered")


def test_a_devices_own_keys_win_over_the_flags_and_reach_its_limits() -> None:
    s = cfg.Settings()
    cfg.add_vm(s, {"guest-cid": 5, "socket": "/s5", "max-buffered": "8M", "max-control": "300"}, "t")
    cfg.add_vm(s, {"guest-cid": 6, "socket": "/s6"}, "t")
    assert not s.problems
    a, b = (d.limits() for d in s.devices)
    assert (a.max_buffered, a.max_control) == (8 << 20, 300)
    assert (b.max_buffered, b.max_control) == (MAX_BUFFERED, MAX_CONTROL)


def vsproxy_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "--socket", "/tmp/vsp-quota-check.sock", "--guest-cid",
                           "5", *args, "--check"], capture_output=True, text=True, timeout=60)


def test_check_shows_the_quotas_from_the_flags_and_from_a_devices_keys() -> None:
    proc = vsproxy_check("--max-buffered", "8M", "--max-control", "100",
                         "--vm", "name=other,guest-cid=6,socket=/tmp/vsp-quota-6.sock,max-buffered=1G")
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("limits")]
    assert len(rows) == 2
    assert "max-buffered 8M; max-control 100" in rows[0]
    assert "max-buffered 1G; max-control 100" in rows[1]  # its own key wins; the flag fills the rest


def test_a_bad_quota_is_one_line_and_exit_2() -> None:
    proc = vsproxy_check("--max-buffered", "lots")
    assert proc.returncode == 2
    assert "--max-buffered: 'lots' is not a size in 64K..1024G" in proc.stderr and "Traceback" not in proc.stderr


# -- bytes waiting in a sibling's inbox -------------------------------------------------------------
class CoreHooksOf:
    """What a device's session does for its sibling ends: here, only the byte count."""

    def __init__(self, core: VsockCore) -> None:
        self.core = core

    def readable(self, conn: Connection) -> None: ...
    def writable(self, conn: Connection) -> None: ...
    def connected(self, conn: Connection) -> None: ...
    def failed(self, conn: Connection, reason: str) -> None: ...
    def aborted(self, conn: Connection) -> None: ...

    def held(self, conn: Connection, n: int) -> None:
        self.core.sibling_held(conn, n)


def sibling_guest(max_buffered: int = MAX_BUFFERED) -> tuple[VsockCore, list[SiblingEnd]]:
    """A core whose connections each go to a new sibling pair; the far ends are returned."""
    far_ends: list[SiblingEnd] = []
    core: VsockCore

    def connector(conn: Connection) -> SiblingEnd:
        near, far = pair("sibling:b", "sibling:a", lambda f: None)
        near.attach(CoreHooksOf(core), conn)
        far_ends.append(far)
        return near

    core = VsockCore(GUEST, connector, buf_alloc=WINDOW, max_buffered=max_buffered)
    return core, far_ends


def sib_open(core: VsockCore, port: int) -> Connection:
    core.guest_packet(*pkt(Op.REQUEST, dst_port=port, buf_alloc=WINDOW))
    conn = core.conns[(H.Type.STREAM, GPORT, 2, port)]
    core.peer_connected(conn)
    return conn


def sib_send(core: VsockCore, port: int, n: int) -> None:
    for _ in range(n // 4096):
        core.guest_packet(*pkt(Op.RW, dst_port=port, payload=b"s" * 4096, buf_alloc=WINDOW))
        core.flush_host()


def test_bytes_in_a_siblings_inbox_count_for_the_sending_device_until_read_or_closed() -> None:
    core, fars = sibling_guest()
    conn = sib_open(core, 1)
    sib_send(core, 1, WINDOW)
    (far,) = fars
    assert len(far.inbox) == WINDOW and conn.held == 0
    assert core.buffered == WINDOW == conn.sib_held
    buf = bytearray(40000)
    assert far.recv_into([memoryview(buf)]) == 40000  # the other guest reads some
    assert core.buffered == WINDOW - 40000
    far.close(reset=False)  # and closes: what it did not read is let go
    assert core.buffered == 0 == conn.sib_held


def test_past_max_buffered_a_connection_parking_bytes_in_siblings_is_reset_once() -> None:
    core, fars = sibling_guest(max_buffered=WINDOW + 8192)
    hog, small = sib_open(core, 1), sib_open(core, 2)
    sib_send(core, 1, WINDOW)
    sib_send(core, 2, 4096)
    assert core.counters.buffer_resets == 0
    sib_send(core, 2, 8192)  # over: the hog is reset, its bytes are let go when its far end closes
    assert core.counters.buffer_resets == 1 and hog.key not in core.conns and small.key in core.conns
    sib_send(core, 2, 4096)  # meanwhile it is not reset again for the same bytes
    assert core.counters.buffer_resets == 1
    fars[0].close(reset=True)  # the far side's abort, as the other device carries it out
    assert core.buffered == small.sib_held == 16384
