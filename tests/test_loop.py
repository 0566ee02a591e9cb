"""The epoll reactor: callbacks, interest toggles, hang-ups nobody watches, fd reuse."""

from __future__ import annotations

import socket

from vsproxy.loop import Loop


def test_reader_fires_when_readable_and_stops_when_switched_off_then_resumes() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    seen: list[bytes] = []
    try:
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
    finally:
        loop.close()
        a.close()
        b.close()


def test_a_hang_up_on_an_fd_nobody_watches_leaves_the_epoll_set_and_is_seen_on_resume() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    got: list[bytes] = []
    try:
        loop.set_reader(a.fileno(), lambda: got.append(a.recv(100)))
        loop.set_reader(a.fileno(), None)
        b.close()  # HUP arrives while nothing watches the fd
        loop.run_once(0.01)
        assert a.fileno() not in loop._events  # taken out, so the next select cannot spin on it
        loop.set_reader(a.fileno(), lambda: got.append(a.recv(100)))
        loop.run_once(1.0)
        assert got == [b""]  # the reader sees the EOF once it watches again
    finally:
        loop.close()
        a.close()


def test_an_fd_number_reused_after_close_is_watched_afresh() -> None:
    loop = Loop()
    fired: list[str] = []
    try:
        a, b = socket.socketpair()
        fd = a.fileno()
        loop.set_reader(fd, lambda: fired.append("old"))
        loop.set_reader(fd, None)  # registered with a zero mask...
        a.close()  # ...and closed without forget(): the kernel drops it from the set
        b.close()
        c, d = socket.socketpair()
        new = c if c.fileno() == fd else d
        other = d if new is c else c
        loop.set_reader(new.fileno(), lambda: fired.append("new"))
        other.send(b"x")
        loop.run_once(1.0)
        assert fired == ["new"]
        c.close()
        d.close()
    finally:
        loop.close()


def test_writer_and_reader_of_one_fd_are_separate_and_forget_drops_both() -> None:
    loop = Loop()
    a, b = socket.socketpair()
    calls: list[str] = []
    try:
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
    finally:
        loop.close()
        a.close()
        b.close()


def test_timers_run_in_order_and_call_soon_runs_once_per_round() -> None:
    loop = Loop()
    order: list[str] = []
    try:
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
    finally:
        loop.close()
