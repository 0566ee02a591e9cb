"""Several devices in one vsproxy: siblings, remap, allowlists, built-in services.

Each guest is a simulated guest with its own vhost-user socket; the accepting side runs in
a thread (each SimGuest is single-threaded and independent)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from helpers import VsproxyProcess, unix_server

from vsproxy.simguest import GuestSocket, SimGuest
from vsproxy.vsock import header as H

Start = Callable[..., VsproxyProcess]


def start_multi(workdir: str, *args: str) -> VsproxyProcess:
    first = os.path.join(workdir, "a.sock")
    return VsproxyProcess(list(args), first, os.path.join(workdir, "multi.log"))


@contextmanager
def echo_guest(path: str, port: int, count: int = 1) -> Iterator[tuple[SimGuest, list[tuple[int, int]]]]:
    """A guest that accepts ``count`` connections on ``port`` and echoes each; yields the
    (source CID, source port) of every accepted connection as its guest saw it."""
    g = SimGuest(path, timeout=15)
    g.start()
    seen: list[tuple[int, int]] = []
    lst = g.listen(port)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            for _ in range(count):
                c = lst.accept(timeout=15)
                seen.append(c.peer)
                data = c.recv_all(timeout=15)
                c.sendall(data)
                c.close()
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield g, seen
    finally:
        t.join(20)
        g.close()
    if errors:
        raise errors[0]


def roundtrip(s: GuestSocket, data: bytes) -> bytes:
    s.sendall(data)
    s.shutdown_write()
    return s.recv_all(timeout=15)


def test_sibling_echo_between_two_devices_in_a_group(workdir: str) -> None:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a},groups=g1", "--vm", f"guest-cid=6,socket={b},groups=g1")
    try:
        with echo_guest(b, 7000) as (_, seen), SimGuest(a) as ga:
            s = ga.connect(7000, cid=6)
            payload = os.urandom(300_000)
            assert roundtrip(s, payload) == payload
            s.close()
        assert seen[0][0] == 5  # B sees A's real CID
        report = vp.report()
        # both halves of the relay count under the rule: 300,000 bytes each way, seen by A and by B
        assert "rule 'group g1': connections=1 denials=0 rewrites=0" in report
        assert "bytes=1200000" in report
    finally:
        vp.stop()


def test_denied_sibling_connect_gets_rst_and_nothing_reaches_the_peer(workdir: str) -> None:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a}", "--vm", f"guest-cid=6,socket={b}")
    try:
        with SimGuest(b) as gb, SimGuest(a) as ga:
            gb.listen(7000)
            with pytest.raises(ConnectionResetError):
                ga.connect(7000, cid=6)
            for _ in range(10):
                gb.poll(0.02)
            assert not [h for h, _ in gb.received_raw if h.op == H.Op.REQUEST]
        report = vp.report()
        assert "denials=1" in report and "not allowed" in report
        assert "denied by default: sibling cid6 not allowed for cid5" in vp.log()
    finally:
        vp.stop()


def test_remap_3_to_host_is_invisible_to_the_guest(workdir: str) -> None:
    a = os.path.join(workdir, "a.sock")
    uds = os.path.join(workdir, "h.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a},uds-path={uds},remap=3=2")
    echo = unix_server(f"{uds}_5000")
    try:
        with SimGuest(a) as g:
            s = g.connect(5000, cid=3)
            assert roundtrip(s, b"to my parent") == b"to my parent"
            s.close()
            from_peer = [h for h, _ in g.received_raw if h.dst_port == s.local_port]
            assert from_peer and {h.src_cid for h in from_peer} == {3}
            # a host program connecting in appears to come from CID 3 as well
            lst = g.listen(6000)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
                host.settimeout(10)
                host.connect(uds)
                host.sendall(b"CONNECT 6000\n")
                c = lst.accept(timeout=10)
                assert c.peer[0] == 3
                assert host.recv(64).startswith(b"OK ")
        assert "rewrites=2" in vp.report()
    finally:
        echo.close()
        vp.stop()


def test_nitro_heartbeat_answers_and_other_parent_ports_go_to_the_host(workdir: str) -> None:
    a = os.path.join(workdir, "a.sock")
    uds = os.path.join(workdir, "h.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=16,socket={a},uds-path={uds}", "--nitro")
    echo = unix_server(f"{uds}_8000")
    try:
        with SimGuest(a) as g:
            hb = g.connect(9000, cid=3)
            hb.sendall(bytes([0xB7]))
            assert hb.recv_exactly(1, timeout=10) == bytes([0xB7])
            hb.close()
            s = g.connect(8000, cid=3)
            assert roundtrip(s, b"kms request") == b"kms request"
            s.close()
        assert "--nitro: service nitro-heartbeat at 3:9000" in vp.log()
    finally:
        echo.close()
        vp.stop()


def test_two_enclaves_each_reach_only_their_own_parent(workdir: str) -> None:
    e1, e2, p1, p2 = (os.path.join(workdir, f"{n}.sock") for n in ("a", "e2", "p1", "p2"))
    vp = start_multi(
        workdir,
        "--vm", f"name=enclave1,guest-cid=5,socket={e1},remap=3=10",
        "--vm", f"name=enclave2,guest-cid=6,socket={e2},remap=3=11",
        "--vm", f"name=parent1,guest-cid=10,socket={p1}",
        "--vm", f"name=parent2,guest-cid=11,socket={p2}",
    )
    try:
        with echo_guest(p1, 7000) as (_, seen1), echo_guest(p2, 7000) as (_, seen2):
            with SimGuest(e1) as g1:
                s = g1.connect(7000, cid=3)
                assert roundtrip(s, b"enclave1") == b"enclave1"
                s.close()
                with pytest.raises(ConnectionResetError):
                    g1.connect(7000, cid=11)  # the other enclave's parent
            with SimGuest(e2) as g2:
                s = g2.connect(7000, cid=3)
                assert roundtrip(s, b"enclave2") == b"enclave2"
                s.close()
        assert seen1[0][0] == 5 and seen2[0][0] == 6
    finally:
        vp.stop()


def test_real_cid_3_and_an_alias_for_3_coexist(workdir: str) -> None:
    d3, e, f = (os.path.join(workdir, f"{n}.sock") for n in ("a", "e", "f"))
    uds = os.path.join(workdir, "h.sock")
    vp = start_multi(
        workdir,
        "--vm", f"name=three,guest-cid=3,socket={d3},groups=g",
        "--vm", f"name=enclave,guest-cid=5,socket={e},uds-path={uds},remap=3=2",
        "--vm", f"name=friend,guest-cid=6,socket={f},groups=g",
    )
    echo = unix_server(f"{uds}_7000")
    try:
        with echo_guest(d3, 7000) as (_, seen):
            with SimGuest(e) as ge:  # its 3 is the host
                s = ge.connect(7000, cid=3)
                assert roundtrip(s, b"via alias") == b"via alias"
                s.close()
            with SimGuest(f) as gf:  # its 3 is the real device
                s = gf.connect(7000, cid=3)
                assert roundtrip(s, b"to real three") == b"to real three"
                s.close()
        assert seen == [(6, seen[0][1])]
    finally:
        echo.close()
        vp.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vm", "guest-cid=5,socket=SOCK", "--vm", "guest-cid=5,socket=SOCK2"], "guest CID 5 given to both"),
        (["--vm", "guest-cid=5,socket=SOCK", "--vm", "guest-cid=6,socket=SOCK"], "given to both"),
        (["--vm", "guest-cid=2,socket=SOCK"], "reserved"),
        (["--vm", "guest-cid=5,socket=SOCK,colour=blue"], "unknown key 'colour'"),
        (["--vm", "guest-cid=5,socket=SOCK,forward-cid=0"], "cannot be dialled"),
        (["--vm", "guest-cid=5,socket=SOCK", "--remap", "3:9000=2"], "port on both sides"),
        (["--vm", "guest-cid=5,socket=SOCK", "--service", "3:9000=ftp"], "service kind 'ftp'"),
        (["--guest-cid", "5"], "--guest-cid needs --socket"),
    ],
)
def test_bad_device_settings_are_refused_before_starting(workdir: str, args: list[str], message: str) -> None:
    import subprocess
    import sys

    args = [a.replace("SOCK2", os.path.join(workdir, "s2")).replace("SOCK", os.path.join(workdir, "s")) for a in args]
    p = subprocess.run([sys.executable, "-m", "vsproxy", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(workdir, "s"))


def test_toml_config_file_sets_up_devices_and_rules(workdir: str) -> None:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    conf = os.path.join(workdir, "vsproxy.toml")
    with open(conf, "w") as f:
        f.write(f'remap = ["3=6"]\n\n[[vm]]\nname = "enclave"\nguest-cid = 5\nsocket = "{a}"\n\n'
                f'[[vm]]\nname = "parent"\nguest-cid = 6\nsocket = "{b}"\n')
    vp = start_multi(workdir, "--config", conf)
    try:
        with echo_guest(b, 7000) as (_, seen), SimGuest(a) as ga:
            s = ga.connect(7000, cid=3)
            assert roundtrip(s, b"from the file") == b"from the file"
            s.close()
        assert seen[0][0] == 5
    finally:
        vp.stop()


def test_bad_toml_names_the_file_and_key(workdir: str) -> None:
    import subprocess
    import sys

    conf = os.path.join(workdir, "bad.toml")
    with open(conf, "w") as f:
        f.write('[[vm]]\nguest-cid = 5\nsocket = "/tmp/x.sock"\nflavour = 1\n')
    p = subprocess.run([sys.executable, "-m", "vsproxy", "--config", conf], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and f"{conf} vm[0]: unknown key 'flavour'" in p.stderr


def test_af_vsock_forward_cid_and_listen_through_the_injected_factory(workdir: str) -> None:
    """QEMU's nitro-enclave recipe, vhost-device-vsock's options unchanged. AF_VSOCK itself is
    never opened here: --vsock-via-unix stands in for it with unix sockets."""
    a = os.path.join(workdir, "a.sock")
    vdir = os.path.join(workdir, "vsock")
    os.mkdir(vdir)
    echo = unix_server(os.path.join(vdir, "vsock-1-9001"))  # "host CID 1, port 9001"
    vp = start_multi(workdir, "--vsock-via-unix", vdir,
                     "--vm", f"guest-cid=4,forward-cid=1,forward-listen=9001+9002,socket={a}")
    try:
        with SimGuest(a) as g:
            s = g.connect(9001, cid=3)  # the enclave dials its parent
            assert roundtrip(s, b"to the parent") == b"to the parent"
            s.close()
            with pytest.raises(ConnectionResetError):
                g.connect(9003, cid=3)  # nothing listens on 1:9003
            lst = g.listen(9002)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
                host.settimeout(10)
                host.connect(os.path.join(vdir, "listen-9002"))
                c = lst.accept(timeout=10)
                host.sendall(b"from a host vsock client")
                assert c.recv_exactly(24, timeout=10) == b"from a host vsock client"
        assert "default: forward-cid" in vp.report()
    finally:
        echo.close()
        vp.stop()


def test_vhost_device_vsock_yaml_file_is_accepted(workdir: str) -> None:
    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    conf = os.path.join(workdir, "vms.yaml")
    with open(conf, "w") as f:
        f.write(f"vms:\n  - guest_cid: 5\n    socket: {a}\n    groups: g1+g2\n    queue_size: 1024\n"
                f"  - guest_cid: 6\n    socket: {b}\n    groups: g2\n")
    vp = start_multi(workdir, "--config", conf)
    try:
        with echo_guest(b, 7000) as (_, seen), SimGuest(a) as ga:
            s = ga.connect(7000, cid=6)
            assert roundtrip(s, b"yaml") == b"yaml"
            s.close()
        assert seen[0][0] == 5
    finally:
        vp.stop()


def test_default_factory_is_real_af_vsock_without_opening_one() -> None:
    from vsproxy.endpoints.vsock import AfVsockFactory

    assert AfVsockFactory.family == socket.AF_VSOCK


def test_slow_sibling_throttles_only_its_connection_and_loses_nothing(workdir: str) -> None:
    import hashlib
    import time

    a, b = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    uds = os.path.join(workdir, "h.sock")
    vp = start_multi(workdir, "--vm", f"guest-cid=5,socket={a},uds-path={uds},groups=g",
                     "--vm", f"guest-cid=6,socket={b},groups=g")
    echo = unix_server(f"{uds}_5000")
    blob = os.urandom(3 << 20)
    release = threading.Event()
    got: list[bytes] = []

    def slow_reader() -> None:
        with SimGuest(b, timeout=30) as gb:
            lst = gb.listen(7000)
            c = lst.accept(timeout=15)
            deadline = time.monotonic() + 20
            while not release.is_set() and time.monotonic() < deadline:
                gb.poll(0.02)  # keeps the driver alive but reads nothing
            got.append(c.recv_all(timeout=30))

    t = threading.Thread(target=slow_reader, daemon=True)
    t.start()
    try:
        with SimGuest(a, timeout=30) as ga:
            deadline = time.monotonic() + 15
            while True:
                try:
                    s = ga.connect(7000, cid=6, timeout=1)
                    break
                except (ConnectionResetError, TimeoutError):
                    assert time.monotonic() < deadline
            sent = 0
            while sent < len(blob) and s.conn.peer_free():
                n = min(s.conn.peer_free(), 65536, len(blob) - sent)
                s.sendall(blob[sent : sent + n])
                sent += n
                ga.poll(0.01)
            assert sent < len(blob)  # the sibling's window, the relay and our window are full
            other = ga.connect(5000)  # the sender's other traffic is not held up
            assert roundtrip(other, b"still flowing") == b"still flowing"
            other.close()
            release.set()
            s.sendall(blob[sent:])
            s.shutdown_write()
            s.close()
            t.join(40)
        assert got and hashlib.sha256(got[0]).digest() == hashlib.sha256(blob).digest()
    finally:
        release.set()
        echo.close()
        vp.stop()
