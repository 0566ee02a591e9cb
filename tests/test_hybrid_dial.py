"""hybrid_dial: a host program's side of the hybrid handshake, against real unix sockets."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from vsproxy.endpoints.listeners import hybrid_dial


def serve_once(path: str, answer: bytes) -> threading.Thread:
    """Accept one connection, read its CONNECT line, write ``answer`` and close."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        with srv:
            c, _ = srv.accept()
            with c:
                assert c.recv(64) == b"CONNECT 5000\n"
                c.sendall(answer)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_ok_line_is_returned_and_what_follows_it_stays_in_the_socket(workdir: str) -> None:
    path = os.path.join(workdir, "h.sock")
    t = serve_once(path, b"OK 1073741824\nguest data")
    s, line = hybrid_dial(path, 5000, timeout=10)
    with s:
        assert line == b"OK 1073741824\n"
        assert s.recv(64) == b"guest data"
    t.join(5)


@pytest.mark.parametrize("answer", [b"", b"OK 1", b"NO\n", b"x" * 100])
def test_a_close_before_the_line_or_another_answer_is_a_connection_error(workdir: str, answer: bytes) -> None:
    path = os.path.join(workdir, "h.sock")
    t = serve_once(path, answer)
    with pytest.raises(ConnectionError, match="hybrid connect to port 5000"):
        hybrid_dial(path, 5000, timeout=10)
    t.join(5)
