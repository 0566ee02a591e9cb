"""``vsproxy demo``: vsproxy, a host echo service and a simulated guest, in one process.

No VM needed: the simulated guest is a real vhost-user front-end speaking to vsproxy
over its unix socket and shared memory, exactly as QEMU and a Linux guest would. The
demo prints every packet that crossed the proxy (bulk data folded into one line per
burst) and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from vsproxy import config as cfg
from vsproxy import read
from vsproxy.app import Proxy
from vsproxy.capture.writer import CaptureOptions
from vsproxy.device import DeviceConfig
from vsproxy.endpoints.base import Buffer
from vsproxy.endpoints.host import HostEndpoints
from vsproxy.policy import Service
from vsproxy.simguest import SimGuest
from vsproxy.vsock import header as H

GUEST_CID = 5
ECHO_PORT = 5000
GUEST_SERVICE_PORT = 6000
CLOSED_PORT = 7000
NITRO_HEARTBEAT = 0xB7


class Transcript:
    """A tap that prints packets as they cross, folding bulk RW into bursts."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.burst: tuple[bool, int, int, int, int] | None = None
        self.burst_pkts = 0
        self.burst_bytes = 0
        self.packets = 0
        self.bytes = 0

    def __call__(
        self, device: str, to_guest: bool, hdr: bytes, payload: Sequence[Buffer], mark: str | None = None
    ) -> None:
        h = H.unpack(hdr)
        with self.lock:
            self.packets += 1
            self.bytes += h.len
            key = (to_guest, h.src_cid, h.src_port, h.dst_cid, h.dst_port)
            if h.op == H.Op.RW and h.len > 48:
                if self.burst != key:
                    self._flush()
                    self.burst = key
                self.burst_pkts += 1
                self.burst_bytes += h.len
                return
            self._flush()
            self._line(to_guest, h, _preview(payload, h.len) if h.op == H.Op.RW else _detail(h))

    def _line(self, to_guest: bool, h: H.Header, what: str) -> None:
        arrow = "host  -> guest" if to_guest else "guest -> host "
        op = H.Op(h.op).name if h.op in H.Op._value2member_map_ else f"op{h.op}"
        line = f"  {arrow}  {h.src_cid}:{h.src_port} > {h.dst_cid}:{h.dst_port}  {op:<14} {what}"
        print(line.rstrip(), file=self.out)

    def _flush(self) -> None:
        if self.burst is None:
            return
        to_guest, sc, sp, dc, dp = self.burst
        arrow = "host  -> guest" if to_guest else "guest -> host "
        print(f"  {arrow}  {sc}:{sp} > {dc}:{dp}  RW x{self.burst_pkts:<11} {self.burst_bytes} bytes",
              file=self.out)
        self.burst = None
        self.burst_pkts = self.burst_bytes = 0

    def flush(self) -> None:
        with self.lock:
            self._flush()


def _preview(payload: Sequence[Buffer], n: int) -> str:
    data = b"".join(bytes(p) for p in payload)[:n]
    return f"{n} bytes {data!r}"


def _detail(h: H.Header) -> str:
    if h.op == H.Op.SHUTDOWN:
        names = [n for bit, n in ((H.SHUTDOWN_RCV, "RCV"), (H.SHUTDOWN_SEND, "SEND")) if h.flags & bit]
        return "flags=" + "|".join(names)
    if h.op in (H.Op.REQUEST, H.Op.RESPONSE, H.Op.CREDIT_UPDATE):
        return f"buf_alloc={h.buf_alloc} fwd_cnt={h.fwd_cnt}"
    return ""


def _echo_server(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(10)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def _show_capture(path: str, out: TextIO) -> bool:
    """``vsproxy read PATH app``: the packets that ended application messages (the heartbeat)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = read.main([path, "app"])
    lines = buf.getvalue().splitlines()
    for line in lines:
        print(f"   {line}", file=out)
    return rc == 0 and any("Nitro heartbeat" in line for line in lines)


def run_demo(out: TextIO, bulk: int = 1 << 20) -> int:
    tmp = tempfile.mkdtemp(prefix="vsproxy-demo-")
    vhost = os.path.join(tmp, "vhost.sock")
    uds = os.path.join(tmp, "vsock.sock")
    capture = os.path.join(tmp, "demo.pcapng")
    transcript = Transcript(out)
    settings = cfg.Settings([DeviceConfig(GUEST_CID, vhost, name="demo", endpoints=HostEndpoints(uds_path=uds))])
    settings.services.append(Service(3, 9000, "nitro-heartbeat"))  # an enclave's parent, as --nitro sets it up
    proxy = Proxy(settings.devices, settings.policy())
    proxy.start_capture(CaptureOptions(capture))
    proxy.start()
    stop = threading.Event()
    echo = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    echo.bind(f"{uds}_{ECHO_PORT}")
    echo.listen(16)
    threading.Thread(target=_echo_server, args=(echo, stop), daemon=True).start()
    loop_thread = threading.Thread(target=proxy.run, daemon=True)
    print(f"vsproxy demo: vhost-user socket {vhost}, hybrid unix socket {uds}", file=out)
    print(f"  host echo service listening on {uds}_{ECHO_PORT} (guest CID 2 port {ECHO_PORT})", file=out)
    ok = True
    guest = SimGuest(vhost, timeout=10.0)
    try:
        loop_thread.start()
        guest.start()
        for dev in proxy.devices:
            if dev.session is not None:
                dev.session.core.taps.add(transcript)
        print(f"  simulated guest attached: CID {guest.guest_cid}, features {guest.acked_features:#x}\n", file=out)

        print("1. the guest connects to the host echo service and says hello", file=out)
        s = guest.connect(ECHO_PORT)
        s.sendall(b"hello from the guest")
        reply = s.recv_exactly(20, timeout=10)
        transcript.flush()
        print(f"   guest got back {reply!r}\n", file=out)

        print(f"2. the guest sends {bulk} random bytes and checks the echo", file=out)
        data = os.urandom(bulk)
        got = bytearray()
        for i in range(0, bulk, 65536):
            s.sendall(data[i : i + 65536])
            while len(got) < i - 131072:
                got += s.recv(1 << 20, timeout=10)
        s.shutdown_write()
        got += s.recv_all(timeout=20)
        s.close()
        transcript.flush()
        same = hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        ok &= same
        print(f"   sha256 {'matches' if same else 'DIFFERS'}: {hashlib.sha256(got).hexdigest()[:16]}...\n", file=out)

        print(f"3. a host program connects into the guest (CONNECT {GUEST_SERVICE_PORT})", file=out)
        listener = guest.listen(GUEST_SERVICE_PORT)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(10)
        host.connect(uds)
        host.sendall(b"CONNECT %d\n" % GUEST_SERVICE_PORT)
        gs = listener.accept(timeout=10)
        ok_line = host.recv(64)
        host.sendall(b"ping from the host")
        msg = gs.recv_exactly(18, timeout=10)
        gs.sendall(msg.upper())
        answer = host.recv(64)
        host.close()
        gs.recv_all(timeout=10)
        gs.close()
        transcript.flush()
        print(f"   host got {ok_line.strip()!r}, then {answer!r}\n", file=out)
        ok &= ok_line.startswith(b"OK ") and answer == b"PING FROM THE HOST"

        print(f"4. the guest dials port {CLOSED_PORT}, where nothing listens", file=out)
        try:
            guest.connect(CLOSED_PORT)
            ok = False
            print("   unexpectedly connected", file=out)
        except ConnectionResetError:
            transcript.flush()
            print("   refused with RST, as a Linux guest would see ECONNRESET\n", file=out)
        time.sleep(0.1)
        transcript.flush()

        print(f"5. like a Nitro Enclave, the guest sends its heartbeat 0x{NITRO_HEARTBEAT:02X} to CID 3 port 9000",
              file=out)
        hb = guest.connect(9000, cid=3)
        hb.sendall(bytes([NITRO_HEARTBEAT]))
        beat = hb.recv_exactly(1, timeout=10)
        hb.close()
        time.sleep(0.1)
        transcript.flush()
        print(f"   vsproxy's built-in nitro-heartbeat service answered {beat!r}\n", file=out)
        ok &= beat == bytes([NITRO_HEARTBEAT])

        proxy.stop_capture()
        print("6. vsproxy captured the whole session (--pcap, pcapng as Wireshark reads it); the packets that\n"
              "   carried application messages, as 'vsproxy read FILE app' shows them:", file=out)
        ok &= _show_capture(capture, out)
        print(f"\n{transcript.packets} packets, {transcript.bytes} payload bytes crossed vsproxy. "
              f"{'Demo OK.' if ok else 'Demo FAILED.'}", file=out)
    finally:
        stop.set()
        guest.close()
        proxy.stop()
        loop_thread.join(5)
        proxy.close()
        echo.close()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vsproxy demo", description=__doc__)
    p.add_argument("--bytes", type=int, default=1 << 20, help="size of the bulk transfer (default 1 MiB)")
    args = p.parse_args(argv)
    return run_demo(sys.stdout, args.bytes)
