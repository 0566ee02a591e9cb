"""SEQPACKET: message boundaries (EOM) and records (EOR) across vsproxy."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from helpers import VsproxyProcess

from vsproxy.simguest import SEQPACKET, SimGuest
from vsproxy.vsock import header as H

EOM, EOR = H.SEQ_EOM, H.SEQ_EOR
MESSAGES = [(b"a", False), (os.urandom(10_000), True), (b"", False), (os.urandom(70_000), False), (b"end", True)]


def start(workdir: str, *args: str) -> VsproxyProcess:
    return VsproxyProcess(list(args), os.path.join(workdir, "a.sock"), os.path.join(workdir, "seq.log"))


def test_messages_and_records_survive_exactly_between_siblings(workdir: str) -> None:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    vp = start(workdir, "--vm", f"guest-cid=5,socket={a},groups=g", "--vm", f"guest-cid=6,socket={b},groups=g")
    got: list[tuple[bytes, int]] = []
    errors: list[BaseException] = []
    sendable = [(m, eor) for m, eor in MESSAGES if m]  # an empty message would read as EOF on the way back

    def receiver() -> None:
        try:
            with SimGuest(b, timeout=15) as gb:
                c = gb.listen(7000, type=SEQPACKET).accept(timeout=15)
                for _ in sendable:
                    got.append(c.recv_message(timeout=15))
                for m, eor in reversed(sendable):
                    c.send_message(m, eor)
                c.recv_message(timeout=15)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    try:
        with SimGuest(a, timeout=15) as ga:
            for _ in range(100):
                try:
                    s = ga.connect(7000, cid=6, type=SEQPACKET, timeout=1)
                    break
                except (ConnectionResetError, TimeoutError):
                    continue
            for m, eor in sendable:
                s.send_message(m, eor)
            back = [s.recv_message(timeout=15) for _ in sendable]
            s.close()
        t.join(20)
        assert not errors, errors
        assert got == [(m, EOM | (EOR if eor else 0)) for m, eor in sendable]
        assert back == [(m, EOM | (EOR if eor else 0)) for m, eor in reversed(sendable)]
    finally:
        vp.stop()


def test_guest_to_host_seqpacket_unix_socket_keeps_message_bounds(workdir: str) -> None:
    uds = os.path.join(workdir, "h.sock")
    vp = start(workdir, "--socket", os.path.join(workdir, "a.sock"), "--guest-cid", "5", "--uds-path", uds)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(f"{uds}_5000")
    srv.listen()
    received: list[bytes] = []

    def host() -> None:
        c, _ = srv.accept()
        c.settimeout(15)
        for _ in range(3):
            received.append(c.recv(1 << 20))
        c.send(b"reply one")
        c.send(os.urandom(9000))
        c.close()

    t = threading.Thread(target=host, daemon=True)
    t.start()
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000, type=SEQPACKET)
            big = os.urandom(100_000)
            s.send_message(b"first")
            s.send_message(big, eor=True)
            s.send_message(b"third")
            m1, f1 = s.recv_message(timeout=15)
            m2, f2 = s.recv_message(timeout=15)
            assert (m1, f1) == (b"reply one", EOM)
            assert len(m2) == 9000 and f2 == EOM  # 9000 bytes arrive in three rx buffers, EOM on the last
            assert s.recv_message(timeout=15) == (b"", 0)  # host closed
            s.close()
        t.join(10)
        assert received == [b"first", big, b"third"]
    finally:
        srv.close()
        vp.stop()


def test_host_initiated_seqpacket_through_the_seqpacket_socket(workdir: str) -> None:
    uds = os.path.join(workdir, "h.sock")
    vp = start(workdir, "--socket", os.path.join(workdir, "a.sock"), "--guest-cid", "5", "--uds-path", uds)
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            lst = g.listen(6000, type=SEQPACKET)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as host:
                host.settimeout(10)
                host.connect(uds + ".seqpacket")
                host.send(b"CONNECT 6000\n")
                c = lst.accept(timeout=10)
                assert host.recv(64).startswith(b"OK ")
                host.send(b"one message")
                host.send(b"another")
                assert c.recv_message(timeout=10) == (b"one message", EOM)
                assert c.recv_message(timeout=10) == (b"another", EOM)
                c.send_message(b"answer")
                assert host.recv(64) == b"answer"
    finally:
        vp.stop()


def test_seqpacket_to_tcp_or_a_service_is_refused(workdir: str) -> None:
    vp = start(workdir, "--socket", os.path.join(workdir, "a.sock"), "--guest-cid", "5", "--forward",
               "5000=tcp:127.0.0.1:1", "--service", "3:9000=echo")
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            with pytest.raises(ConnectionResetError):
                g.connect(5000, type=SEQPACKET)
            with pytest.raises(ConnectionResetError):
                g.connect(9000, cid=3, type=SEQPACKET)
    finally:
        vp.stop()


def test_seqpacket_is_offered_and_negotiated() -> None:
    from vsproxy.vhost_user import codec
    from vsproxy.vhost_user.session import default_features

    assert default_features() & (1 << codec.VIRTIO_VSOCK_F_SEQPACKET)
