"""--busy-poll: after traffic, vsproxy polls for the next turn of a request/response exchange
instead of sleeping (the loop's epoll, and vq_tx_kick for connections C runs); the window
adapts, and an idle vsproxy never polls (it sleeps: ~0 CPU)."""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from helpers import VsproxyProcess, unix_server

from vsproxy.loop import BUSY_POLL_US, BusyPoll, Loop
from vsproxy.simguest import SimGuest

Start = Callable[..., VsproxyProcess]


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` (schedstat, ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _poll_report(vp: VsproxyProcess) -> tuple[int, int]:
    """(hits, misses) of the busy poll line of vsproxy's counters (SIGUSR1)."""
    report = vp.report()
    m = re.search(r"busy poll: max_us=\d+ hits=(\d+) misses=(\d+) spent_ms=[\d.]+", report)
    assert m is not None, report
    return int(m.group(1)), int(m.group(2))


# -- the window (sans-I/O) ------------------------------------------------------------------------

def test_a_poll_that_finds_nothing_halves_the_window_down_to_none() -> None:
    b = BusyPoll(50_000)
    windows = []
    for _ in range(7):
        b.polled(b.window_ns, found=False)
        windows.append(b.window_ns)
    assert windows == [25_000, 12_500, 6_250, 3_125, 0, 0, 0]
    assert (b.hits, b.misses, b.spent_ns) == (0, 7, 50_000 + 25_000 + 12_500 + 6_250 + 3_125)


def test_a_poll_that_finds_an_fd_doubles_the_window_up_to_the_maximum() -> None:
    b = BusyPoll(50_000)
    b.polled(1_000, found=False)
    b.polled(1_000, found=False)
    assert b.window_ns == 12_500
    b.polled(1_000, found=True)
    assert b.window_ns == 25_000
    b.polled(1_000, found=True)
    b.polled(1_000, found=True)
    assert (b.window_ns, b.hits, b.misses) == (50_000, 3, 2)


def test_a_closed_window_opens_again_for_one_pass_in_probe_passes() -> None:
    b = BusyPoll(50_000)
    while b.window_ns:
        b.polled(b.window_ns, found=False)
    opened = []
    for k in range(1, 3 * BusyPoll.PROBE + 1):
        if b.served():
            opened.append(k)
            b.polled(50_000, found=False)
    assert opened == [BusyPoll.PROBE, 2 * BusyPoll.PROBE, 3 * BusyPoll.PROBE]


def test_polling_is_off_with_a_zero_window() -> None:
    b = BusyPoll(0)
    assert [b.served() for _ in range(2 * BusyPoll.PROBE)] == [0] * (2 * BusyPoll.PROBE)


# -- the loop ---------------------------------------------------------------------------------

def _drain(s: socket.socket) -> None:
    s.recv(100)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_loop_that_served_no_fd_never_polls(pair: tuple[socket.socket, socket.socket]) -> None:
    lp = Loop(busy_poll_us=1000)
    try:
        a, _ = pair
        lp.set_reader(a.fileno(), functools.partial(_drain, a))
        fired: list[int] = []
        lp.call_later(0.01, lambda: fired.append(1))
        for _ in range(3):
            lp.run_once(0.02)  # timers and timeouts only
        assert fired == [1]
        assert (lp.busy.hits, lp.busy.misses, lp.busy.spent_ns) == (0, 0, 0)
    finally:
        lp.close()


def test_after_serving_an_fd_the_loop_polls_and_catches_data_that_comes_within_the_window(
    pair: tuple[socket.socket, socket.socket]
) -> None:
    lp = Loop(busy_poll_us=200_000)  # a wide window: the data below comes well within it
    try:
        a, b = pair
        got: list[bytes] = []
        lp.set_reader(a.fileno(), lambda: got.append(a.recv(100)))
        b.send(b"one")
        lp.run_once(1.0)  # served an fd: the next pass polls first
        threading.Timer(0.02, lambda: b.send(b"two")).start()
        t0 = time.monotonic()
        lp.run_once(1.0)
        assert got == [b"one", b"two"] and time.monotonic() - t0 < 0.5
        assert lp.busy.hits >= 1 and lp.busy.spent_ns > 0
    finally:
        lp.close()


def test_a_poll_that_finds_nothing_ends_in_a_sleep_for_the_rest_of_the_timeout(
    pair: tuple[socket.socket, socket.socket]
) -> None:
    lp = Loop(busy_poll_us=2000)
    try:
        a, b = pair
        lp.set_reader(a.fileno(), functools.partial(_drain, a))
        b.send(b"x")
        lp.run_once(1.0)
        t0 = time.monotonic()
        lp.run_once(0.05)
        assert 0.04 < time.monotonic() - t0 < 0.5
        assert lp.busy.misses == 1 and lp.busy.window_ns == 1_000_000  # halved
    finally:
        lp.close()


# -- a vsproxy process ---------------------------------------------------------------------------

def test_busy_poll_default_is_on_and_bounded() -> None:
    assert 0 < BUSY_POLL_US <= 100  # tens of microseconds: a turn's gap, not a time slice


@pytest.mark.parametrize("busy_poll", [0, BUSY_POLL_US])
def test_request_response_turns_through_a_polling_vsproxy_deliver_every_byte_in_order(
    start_vsproxy: Start, workdir: str, busy_poll: int
) -> None:
    """The guest's Python driver (this test runs with and without the C paths in vsproxy)."""
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds, f"--busy-poll={busy_poll}")
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(vp.socket_path) as g:
            s = g.connect(5000)
            for k in range(300):
                msg = b"%d" % k
                s.sendall(msg)
                assert s.recv_exactly(len(msg), timeout=10) == msg
            s.close()
            assert g.stats.protocol_errors == []
        if busy_poll:
            hits, misses = _poll_report(vp)
            assert hits + misses > 0
        else:
            assert "busy poll:" not in vp.report()
    finally:
        echo.close()


def test_an_idle_vsproxy_uses_almost_no_cpu_after_traffic(start_vsproxy: Start, workdir: str) -> None:
    """Polling follows traffic only: once it stops, vsproxy sleeps (its 10 Hz sweep aside)."""
    uds = os.path.join(workdir, "v.sock")
    vp = start_vsproxy("--uds-path", uds)  # the default --busy-poll
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(vp.socket_path) as g:
            s = g.connect(5000)
            for _ in range(200):
                s.sendall(b"p")
                assert s.recv_exactly(1, timeout=10) == b"p"
            time.sleep(0.3)  # the last poll windows end
            c0 = _cpu_seconds(vp.proc.pid)
            time.sleep(3.0)  # idle, the connection open and the guest attached
            used = _cpu_seconds(vp.proc.pid) - c0
            assert used < 0.06, f"an idle vsproxy used {used:.3f} s of CPU in 3 s"
            s.close()
    finally:
        echo.close()
