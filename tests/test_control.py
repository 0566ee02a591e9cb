"""The control socket (docs/control.md): snapshots, resets, event and packet streams; several
clients; bad, oversized and silent clients; another uid refused; the socket's mode."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers import VsproxyProcess, running, unix_server, wait_for

from vsproxy import control
from vsproxy.app import Proxy
from vsproxy.device import DeviceConfig
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.simguest import SimGuest


@pytest.fixture
def proxy(workdir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5)
    cfg = DeviceConfig(5, os.path.join(workdir, "a.sock"), name="A",
                       endpoints=HostEndpoints(uds_path=os.path.join(workdir, "ha")))
    p = Proxy([cfg])
    p.start_control(os.path.join(workdir, "ctl.sock"))
    with running(p) as p:
        yield p


class Client:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        self.f = self.s.makefile("rb")

    def ask(self, req: object) -> dict[str, object]:
        self.s.sendall(json.dumps(req).encode() + b"\n")
        return self.line()

    def line(self) -> dict[str, object]:
        got = json.loads(self.f.readline())
        assert isinstance(got, dict)
        return got

    def close(self) -> None:
        self.f.close()
        self.s.close()


def test_the_socket_is_made_0600_and_answers_snapshots_to_several_clients(proxy: Proxy, workdir: str) -> None:
    path = os.path.join(workdir, "ctl.sock")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    srv = unix_server(os.path.join(workdir, "ha_5000"))
    clients = [Client(path) for _ in range(3)]
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000)
            s.sendall(b"hello")
            assert s.recv_exactly(5, timeout=10) == b"hello"
            for c in clients:
                got = c.ask({"cmd": "snapshot"})
                snap = got["snapshot"]
                assert got["ok"] is True and isinstance(snap, dict)
                (conn,) = snap["connections"]
                assert conn["state"] == "established" and conn["peer_port"] == 5000 and conn["to_peer_bytes"] == 5
                assert conn["credit"]["buf_alloc"] == 1 << 20
                (dev,) = snap["devices"]
                assert dev["name"] == "A" and dev["counters"]["tx_bytes"] >= 5
            assert clients[0].ask({"cmd": "reset"}) == {"ok": True}
            dev = clients[1].ask({"cmd": "snapshot"})["snapshot"]["devices"][0]  # type: ignore[index]
            assert dev["counters"]["tx_bytes"] == 0
            s.close()
    finally:
        for c in clients:
            c.close()
        srv.close()


def test_bad_requests_get_an_error_and_the_client_stays(proxy: Proxy, workdir: str) -> None:
    c = Client(os.path.join(workdir, "ctl.sock"))
    try:
        c.s.sendall(b"this is not json\n")
        assert c.line()["ok"] is False
        assert c.ask([1, 2])["ok"] is False
        bad = c.ask({"cmd": "frobnicate"})
        assert bad["ok"] is False and "unknown request" in str(bad["error"])
        assert c.ask({"cmd": "subscribe", "what": "packets", "filter": "port ==="})["ok"] is False
        for snaplen in (-1, "100", 1.5, True, 1 << 30):
            bad = c.ask({"cmd": "subscribe", "what": "packets", "snaplen": snaplen})
            assert bad["ok"] is False and "snaplen" in str(bad["error"])
        assert c.ask({"cmd": "snapshot"})["ok"] is True  # still served
    finally:
        c.close()


def test_an_oversized_line_is_refused_and_a_silent_client_is_closed(proxy: Proxy, workdir: str) -> None:
    path = os.path.join(workdir, "ctl.sock")
    big = Client(path)
    silent = Client(path)
    try:
        big.s.sendall(b"x" * (control.MAX_LINE + 10))
        got = big.line()
        assert got["ok"] is False and "longer than" in str(got["error"])
        assert big.f.readline() == b""  # closed
        assert silent.f.readline() == b""  # closed after the idle timeout, having said nothing
        again = Client(path)
        assert again.ask({"cmd": "snapshot"})["ok"] is True  # the server goes on
        again.close()
    finally:
        big.close()
        silent.close()


def test_a_client_of_another_uid_is_refused(proxy: Proxy, workdir: str) -> None:
    path = os.path.join(workdir, "ctl.sock")
    if os.getuid() != 0:
        pytest.fail("this test runs as root (tests/run.sh does): it needs a client of another uid")
    os.chmod(workdir, 0o755)
    os.chmod(path, 0o666)  # past the file's mode, SO_PEERCRED is what refuses it
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(b'{\"cmd\": \"snapshot\"}\\n'); print(repr(s.recv(100)))\n"
            "except (ConnectionResetError, BrokenPipeError):\n"
            "    print('refused')\n")
    # the system's Python: the venv's interpreter lies under root's home, which uid 65534 cannot enter
    out = subprocess.run(["/usr/bin/python3", "-c", code, path], capture_output=True, text=True, timeout=30,
                         preexec_fn=lambda: os.setuid(65534), cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("b''", "refused")  # closed (or reset) without an answer
    wait_for(lambda: proxy.control is not None and proxy.control.refused == 1, what="the refusal counted")
    root = Client(path)
    assert root.ask({"cmd": "snapshot"})["ok"] is True  # root still served
    root.close()


def test_events_stream_as_json_lines(proxy: Proxy, workdir: str) -> None:
    c = Client(os.path.join(workdir, "ctl.sock"))
    try:
        assert c.ask({"cmd": "subscribe", "what": "events"}) == {"ok": True}
        time.sleep(0.2)  # the stream thread is subscribed
        with SimGuest(os.path.join(workdir, "a.sock")):
            pass
        kinds: list[object] = []
        while "frontend-gone" not in kinds:
            kinds.append(c.line().get("event"))
        assert kinds[0] == "frontend-connected" and "rings-started" in kinds
    finally:
        c.close()


def test_a_packet_subscription_streams_a_capture_tshark_reads_with_the_filter_applied(proxy: Proxy,
                                                                                       workdir: str) -> None:
    srv = unix_server(os.path.join(workdir, "ha_5000"))
    other = unix_server(os.path.join(workdir, "ha_6000"))
    c = Client(os.path.join(workdir, "ctl.sock"))
    try:
        assert c.ask({"cmd": "subscribe", "what": "packets", "filter": "port == 5000"}) == \
            {"ok": True, "format": "pcapng"}
        wait_for(lambda: proxy.switch.taps.sink is not None, what="the subscription to attach")
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            for port in (5000, 6000):
                s = g.connect(port)
                s.sendall(b"ping %d" % port)
                assert s.recv_exactly(9, timeout=10) == b"ping %d" % port
                s.close()
        c.s.settimeout(3)
        data = b""
        try:
            while True:
                # through the buffered reader: its readline() of the answer may already hold
                # the stream's first bytes (they came in one recv with it)
                chunk = c.f.read1(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        cap = os.path.join(workdir, "live.pcapng")
        with open(cap, "wb") as f:
            f.write(data)
        out = subprocess.run(["tshark", "-r", cap, "-T", "fields", "-e", "vsock.src_port", "-e", "vsock.dst_port"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        ports = {p for line in out.stdout.split() for p in line.split()}
        assert "5000" in ports and "6000" not in ports  # the filter ran, in the client's thread
    finally:
        c.close()
        srv.close()
        other.close()


# --- vsproxy ctl, against a vsproxy process ---------------------------------------------------------
def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "ctl", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def served(workdir: str) -> Iterator[tuple[VsproxyProcess, str]]:
    path = os.path.join(workdir, "ctl.sock")
    vp = VsproxyProcess(["--socket", os.path.join(workdir, "a.sock"), "--guest-cid", "5", "--uds-path",
                         os.path.join(workdir, "ha"), "--control", path], os.path.join(workdir, "a.sock"),
                        os.path.join(workdir, "vsproxy.log"))
    wait_for(lambda: os.path.exists(path), what="the control socket")
    yield vp, path
    vp.stop()


def test_ctl_stats_conns_and_watch_show_a_live_connection(served: tuple[VsproxyProcess, str], workdir: str) -> None:
    _, path = served
    srv = unix_server(os.path.join(workdir, "ha_5000"))
    try:
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000)
            s.sendall(b"x" * 3000)
            assert s.recv_exactly(3000, timeout=10) == b"x" * 3000
            stats = ctl(path, "stats")
            assert stats.returncode == 0, stats.stderr
            assert stats.stdout.startswith("cid5: cid 5 running conns=1 ") and "tx_bytes=3000" in stats.stdout
            conns = ctl(path, "conns")
            head, row = conns.stdout.splitlines()
            assert head.split()[:3] == ["DEVICE", "TYPE", "STATE"]
            assert row.split()[:5] == ["cid5", "stream", "established", f"5:{s.local_port}", "2:5000"]
            (c,) = json.loads(ctl(path, "conns", "--json").stdout)
            assert c["to_peer_bytes"] == 3000 and c["to_guest_bytes"] == 3000
            w = ctl(path, "watch", "--seconds", "1.5")
            assert w.returncode == 0 and "MB/s from the guest" in w.stdout
            s.close()
    finally:
        srv.close()


def live_packet_subscribers(path: str) -> int:
    from vsproxy.ctl import ask, connect

    s = connect(path)
    try:
        got, _ = ask(s, {"cmd": "snapshot"})
    finally:
        s.close()
    return int(((got["snapshot"].get("capture") or {}).get("live") or {}).get("subscribers", 0))


def has_socket(pid: int) -> bool:
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link.startswith("socket:") for link in links)


def test_ctl_pcap_into_tshark_and_events_live(served: tuple[VsproxyProcess, str], workdir: str) -> None:
    _, path = served
    srv = unix_server(os.path.join(workdir, "ha_5000"))
    cap = os.path.join(workdir, "live.pcapng")
    evs = os.path.join(workdir, "events.jsonl")
    cmd = (f"{sys.executable} -m vsproxy ctl {path} pcap --seconds 4 | tshark -r - -T fields -e vsock.dst_port"
           f" > {cap}.txt; {sys.executable} -m vsproxy ctl {path} pcap --seconds 0.1 > {cap}")
    try:
        pipe = subprocess.Popen(["bash", "-c", cmd])
        with open(evs, "wb") as evf:
            events = subprocess.Popen([sys.executable, "-m", "vsproxy", "ctl", path, "events", "--seconds", "4"],
                                      stdout=evf)
        # both are subscribed before the guest comes (a fixed sleep was too short under load)
        wait_for(lambda: live_packet_subscribers(path) >= 1, 30, "ctl pcap subscribed")
        wait_for(lambda: has_socket(events.pid), 30, "ctl events connected")
        time.sleep(0.3)  # (its request follows its connect at once)
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000)
            s.sendall(b"live")
            assert s.recv_exactly(4, timeout=10) == b"live"
            s.close()
        assert pipe.wait(30) == 0 and events.wait(30) == 0
        with open(f"{cap}.txt") as f:
            ports = f.read().split()
        assert "5000" in ports  # tshark read the live stream
        with open(evs) as f:
            kinds = [json.loads(line)["event"] for line in f if line.strip()]
        assert "established" in kinds and "closed" in kinds
    finally:
        srv.close()


def test_ctl_errors_are_one_line(workdir: str) -> None:
    missing = ctl(os.path.join(workdir, "nope.sock"), "stats")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such socket" in missing.stderr
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(os.path.join(workdir, "other.sock"))
    other.listen(1)
    proc = subprocess.Popen([sys.executable, "-m", "vsproxy", "ctl", os.path.join(workdir, "other.sock"), "stats"],
                            stderr=subprocess.PIPE, text=True)
    c, _ = other.accept()
    c.recv(100)
    c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    c.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and err.count("\n") == 1 and "not vsproxy" in err
    other.close()


def test_ctl_pcap_snaplen_keeps_the_first_bytes_of_each_packet_and_says_its_whole_length(
        served: tuple[VsproxyProcess, str], workdir: str) -> None:
    _, path = served
    srv = unix_server(os.path.join(workdir, "ha_5000"))
    cap = os.path.join(workdir, "snapped.pcapng")
    try:
        with open(cap, "wb") as out:
            pcap = subprocess.Popen([sys.executable, "-m", "vsproxy", "ctl", path, "pcap", "--snaplen", "16",
                                     "--seconds", "4"], stdout=out)
        wait_for(lambda: live_packet_subscribers(path) >= 1, 30, "ctl pcap subscribed")
        data = bytes(range(256)) * 40
        with SimGuest(os.path.join(workdir, "a.sock")) as g:
            s = g.connect(5000)
            s.sendall(data)
            assert s.recv_exactly(len(data), timeout=10) == data
            s.close()
        assert pcap.wait(30) == 0
    finally:
        srv.close()
    p = subprocess.run(["tshark", "-r", cap, "-Y", "vsock.virtio.op == 5", "-T", "fields", "-e", "frame.cap_len",
                        "-e", "frame.len", "-e", "vsock.virtio.len"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [tuple(int(x) for x in line.split("\t")) for line in p.stdout.splitlines()]
    assert rows and sum(n for _, _, n in rows) == 2 * len(data)  # every RW both ways, each cut at 16
    assert all(cap_len == 32 + 44 + min(16, n) and length == 32 + 44 + n for cap_len, length, n in rows)
    shown = subprocess.run([sys.executable, "-m", "vsproxy", "read", cap, "-V"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "payload (the first 16 of " in shown.stdout
    wrong = ctl(path, "stats", "--snaplen", "16")
    assert wrong.returncode == 2 and "--snaplen goes with pcap" in wrong.stderr
