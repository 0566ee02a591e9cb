"""The epoll reactor: callbacks, interest toggles, hang-ups nobody watches, fd reuse."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vsproxy.loop import Loop


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_reader_fires_when_readable_and_stops_when_switched_off_then_resumes(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    seen: list[bytes] = []
    loop.set_reader(a.fileno(), lambda: seen.append(a.recv(100)))
    b.send(b"one")
    loop.run_once(1.0)
    assert seen == [b"one"]
    loop.set_reader(a.fileno(), None)  # out of credit: interest off, data left unread
    b.send(b"two")
    loop.run_once(0.01)
    assert seen == [b"one"]
    loop.set_reader(a.fileno(), lambda: seen.append(a.recv(100)))
    loop.run_once(1.0)
    assert seen == [b"one", b"two"]


def test_a_hang_up_on_an_fd_nobody_watches_leaves_the_epoll_set_and_is_seen_on_resume(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    got: list[bytes] = []
    loop.set_reader(a.fileno(), lambda: got.append(a.recv(100)))
    loop.set_reader(a.fileno(), None)
    b.close()  # HUP arrives while nothing watches the fd
    loop.run_once(0.01)
    assert a.fileno() not in loop._events  # taken out, so the next select cannot spin on it
    loop.set_reader(a.fileno(), lambda: got.append(a.recv(100)))
    loop.run_once(1.0)
    assert got == [b""]  # the reader sees the EOF once it watches again


def test_an_fd_number_reused_after_close_is_watched_afresh(loop: Loop) -> None:
    fired: list[str] = []
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.set_reader(fd, lambda: fired.append("old"))
    loop.set_reader(fd, None)  # registered with a zero mask...
    a.close()  # ...and closed without forget(): the kernel drops it from the set
    b.close()
    c, d = socket.socketpair()
    new, other = (c, d) if c.fileno() == fd else (d, c)
    loop.set_reader(new.fileno(), lambda: fired.append("new"))
    other.send(b"x")
    loop.run_once(1.0)
    assert fired == ["new"]
    c.close()
    d.close()


def test_writer_and_reader_of_one_fd_are_separate_and_forget_drops_both(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    calls: list[str] = []
    loop.set_writer(a.fileno(), lambda: calls.append("w"))
    loop.set_reader(a.fileno(), lambda: calls.append("r"))
    loop.run_once(1.0)
    assert calls == ["w"]  # writable, nothing to read
    b.send(b"x")
    loop.run_once(1.0)
    assert calls == ["w", "r", "w"]
    loop.forget(a.fileno())
    loop.run_once(0.01)
    assert calls == ["w", "r", "w"]


def test_timers_run_in_order_and_call_soon_runs_once_per_round(loop: Loop) -> None:
    order: list[str] = []
    loop.call_later(0.02, lambda: order.append("late"))
    loop.call_later(0.0, lambda: order.append("now"))

    def again() -> None:
        order.append("soon")
        loop.call_soon(again)  # re-scheduled work waits for the next round

    loop.call_soon(again)
    loop.run_once(0.0)
    assert order == ["now", "soon"]
    while "late" not in order:
        loop.run_once(0.1)
    assert order[:2] == ["now", "soon"] and order.count("soon") >= 2
