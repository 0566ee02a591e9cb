"""``vsproxy replay guest`` sending what the guest sent from the capture file (vsproxy/replay/bulk.py)
through the simulated guest's C sender (``sg_send``), against real vsproxy processes and host
services that hash what they get: the bytes reach the host exactly (a STREAM of packets of every
size, SEQPACKET messages of several packets with and without EOR), the half-close comes after
them, each packet leaves as recorded, a session through a remap and a denial captures the same
again (``vsproxy diff``), the Python fallback (no C) too, and the replay's memory does not grow
with the capture (its peak RSS, VmHWM, well under the capture's size)."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers import VsproxyProcess

from vsproxy.capture import format as fmt
from vsproxy.capture.reader import dissect, records
from vsproxy.simguest import SEQPACKET, SimGuest
from vsproxy.vsock import header as H

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_replay import run_measured  # noqa: E402 (benchmarks/ is put on the path just above)

GUEST = 5


class HashingServices:
    """Unix services: STREAM at ``{d}/u_9100`` reads to the end and answers the SHA-256 of what
    it got; SEQPACKET at ``{d}/u_5005`` answers each message with its length and hash. Both note
    what they answered, one connection after another."""

    def __init__(self, d: str, stream_port: int = 9100) -> None:
        self.digests: list[bytes] = []
        self.messages: list[tuple[int, bytes]] = []
        self.stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stream.bind(f"{d}/u_{stream_port}")
        self.seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.seq.bind(f"{d}/u_5005")
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(s, f), daemon=True)
                        for s, f in ((self.stream, self._stream), (self.seq, self._seqpacket))]
        for s in (self.stream, self.seq):
            s.listen(8)
            s.settimeout(0.2)
        for t in self.threads:
            t.start()

    def _serve(self, listener: socket.socket, handle: object) -> None:
        while not self.stop.is_set():
            try:
                c, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with c:
                c.settimeout(60)
                try:
                    handle(c)  # type: ignore[operator]
                except OSError:
                    pass

    def _stream(self, c: socket.socket) -> None:
        h = hashlib.sha256()
        while data := c.recv(1 << 20):
            h.update(data)
        digest = h.hexdigest().encode()
        self.digests.append(digest)
        c.sendall(digest)
        c.shutdown(socket.SHUT_WR)

    def _seqpacket(self, c: socket.socket) -> None:
        while msg := c.recv(1 << 20):
            self.messages.append((len(msg), hashlib.sha256(msg).digest()))
            c.send(b"got %d %s" % (len(msg), hashlib.sha256(msg).hexdigest()[:16].encode()))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)
        self.stream.close()
        self.seq.close()


@contextmanager
def hashing_services(d: str, stream_port: int = 9100) -> Iterator[HashingServices]:
    s = HashingServices(d, stream_port)
    try:
        yield s
    finally:
        s.close()


def vsproxy_args(d: str, pcap: str) -> list[str]:
    """A remap (3 -> the host) and an allowlist that denies 2:7000, as tests/test_replay_guest.py."""
    return ["--vm", f"name=app,guest-cid={GUEST},socket={d}/v.sock,uds-path={d}/u,remap=3=2,"
            "allow-out=2:9100+2:5005", "--pcap", pcap, "--flush"]


def record(d: str, pcap: str) -> bytes:
    """The original session, by the simulated guest: 3 MiB in packets of every size to 3:9100
    (remapped), a denied connection, SEQPACKET messages of one and two packets. What it sent
    on the STREAM."""
    rng = random.Random(16)
    vp = VsproxyProcess(vsproxy_args(d, pcap), f"{d}/v.sock", f"{d}/record.log")
    sent = bytearray()
    try:
        with SimGuest(vp.socket_path, timeout=20) as g:
            s = g.connect(9100, cid=3)
            while len(sent) < 3 << 20:
                chunk = rng.randbytes(rng.choice([1, 7, 1000, 4096, 40_000, 65_535, 65_536]))
                s.sendall(chunk)
                sent += chunk
            s.shutdown_write()
            assert s.recv_all(timeout=20) == hashlib.sha256(sent).hexdigest().encode()
            s.close(timeout=5)
            try:
                g.connect(7000, cid=2)
                raise AssertionError("the denied connection was accepted")
            except ConnectionResetError:
                pass
            q = g.connect(5005, cid=2, type=SEQPACKET)
            for m, eor in ((rng.randbytes(100_000), True), (b"short", False), (rng.randbytes(70_000), False)):
                q.send_message(m, eor=eor)
                assert q.recv_message(timeout=10)[0].startswith(b"got %d " % len(m))
            q.close(timeout=5)
    finally:
        vp.stop()
    return bytes(sent)


def replay(socket_path: str, capture: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "replay", "guest", capture, "--socket", socket_path],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def diff(a: str, b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsproxy", "diff", a, b], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def grouped(sent: list[tuple[int, int]], recorded: list[tuple[int, int]]) -> bool:
    """``sent`` is ``recorded`` with some packets cut in parts, flags on the last part; none
    merged or reordered."""
    k = 0
    for n, flags in recorded:
        while n > 0:
            if k == len(sent) or sent[k][0] > n:
                return False
            n -= sent[k][0]
            if sent[k][1] != (flags if n == 0 else 0):
                return False
            k += 1
    return k == len(sent)


def guest_packets(path: str) -> dict[int, list[tuple[int, int]]]:
    """Per host port: the (length, flags) of each RW packet the guest sent, in order."""
    out: dict[int, list[tuple[int, int]]] = {}
    with open(path, "rb") as f:
        for rec in records(f):
            p = dissect(rec)
            h = p.hdr
            if h is not None and h.op == H.Op.RW and h.src_cid == GUEST:
                out.setdefault(h.dst_port, []).append((len(p.payload), h.flags))
    return out


def record_and_replay(d: str, env: dict[str, str] | None) -> tuple[HashingServices, bytes, str, str]:
    original, again = f"{d}/original.pcapng", f"{d}/again.pcapng"
    with hashing_services(d) as hs:
        sent = record(d, original)
        vp = VsproxyProcess(vsproxy_args(d, again), f"{d}/v.sock", f"{d}/replay.log")
        try:
            proc = replay(vp.socket_path, original, env)
        finally:
            vp.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == f"3 connections replayed through {d}/v.sock: 3 same, 0 different, 0 failed"
    return hs, sent, original, again


def test_fast_guest_replay_delivers_the_exact_bytes_boundaries_and_half_close(workdir: str) -> None:
    hs, sent, original, again = record_and_replay(workdir, None)
    # the host got the same bytes both times, the half-close after them (it answers at the end)
    assert hs.digests == [hashlib.sha256(sent).hexdigest().encode()] * 2
    # and the same messages, each whole: a 100,000-byte one arrives as one message again
    assert len(hs.messages) == 6 and hs.messages[3:] == hs.messages[:3]
    assert [n for n, _ in hs.messages[3:]] == [100_000, 5, 70_000]
    # the packets left as recorded, or cut where the credit did not hold one (never merged: the
    # Python sender would send a message's bytes in packets of its own sizes); EOM and EOR on
    # the last part of each message, as recorded
    before, after = guest_packets(original), guest_packets(again)
    for port in (9100, 5005):
        assert grouped(after[port], before[port]), (port, after[port], before[port])
    # cuts are the exception (a loaded machine's late credit updates make a few more of them;
    # a sender that cut every packet would double the count)
    assert len(after[9100]) < len(before[9100]) * 1.5 and len(before[9100]) > 50
    assert [f for _, f in after[5005] if f] == [H.SEQ_EOM | H.SEQ_EOR, H.SEQ_EOM, H.SEQ_EOM]
    same = diff(original, again)  # the remap's real peer and the denial included
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout == "same: 3 connections\n"


def test_guest_replay_without_the_c_sender_delivers_the_same(workdir: str) -> None:
    env = dict(os.environ, VSPROXY_NO_C="1")
    hs, sent, original, again = record_and_replay(workdir, env)
    assert hs.digests == [hashlib.sha256(sent).hexdigest().encode()] * 2
    assert hs.messages[3:] == hs.messages[:3]
    assert diff(original, again).returncode == 0


def write_bulk(path: str, chunk: bytes, count: int, port: int) -> bytes:
    """A capture of one guest connection sending ``count`` copies of ``chunk``, half-closing,
    and the host answering the hash of it all, as the hashing service will; returns the hash."""
    h = hashlib.sha256()
    ts = 1_800_000_000.0
    g, p = (GUEST, 41_000), (2, port)
    with open(path, "wb") as f:
        f.write(fmt.pcapng_shb("test") + fmt.pcapng_idb("app"))

        def packet(src: tuple[int, int], dst: tuple[int, int], op: int, payload: bytes = b"", flags: int = 0) -> None:
            nonlocal ts
            ts += 0.000_01
            hdr = H.pack(src[0], dst[0], src[1], dst[1], len(payload), H.Type.STREAM, op, flags, 262144, 0)
            f.write(fmt.pcapng_epb(0, ts, fmt.vsockmon_frame(hdr, payload), inbound=src[0] == GUEST))

        packet(g, p, H.Op.REQUEST)
        packet(p, g, H.Op.RESPONSE)
        for _ in range(count):
            packet(g, p, H.Op.RW, chunk)
            h.update(chunk)
        digest = h.hexdigest().encode()
        packet(g, p, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
        packet(p, g, H.Op.RW, digest)
        packet(p, g, H.Op.SHUTDOWN, flags=H.SHUTDOWN_SEND)
        packet(g, p, H.Op.SHUTDOWN, flags=H.SHUTDOWN_BOTH)
        packet(p, g, H.Op.RST)
    return digest


def test_replaying_a_large_capture_does_not_hold_it_in_memory(workdir: str) -> None:
    d = workdir
    cap = f"{d}/big.pcapng"
    digest = write_bulk(cap, os.urandom(65536), 4096, 9200)  # 256 MiB the guest sent
    size = os.path.getsize(cap)
    with hashing_services(d, 9200) as hs:
        sock = f"{d}/v.sock"
        vp = VsproxyProcess(["--vm", f"name=app,guest-cid={GUEST},socket={sock},uds-path={d}/u"], sock,
                            f"{d}/v.log")
        try:
            rc, out, rss = run_measured([sys.executable, "-m", "vsproxy", "replay", "guest", cap, "--socket", sock], d)
        finally:
            vp.stop()
    assert rc == 0, out
    assert hs.digests == [digest]
    assert rss > 10 << 20, "VmHWM was read while the replay ran"
    # the payload stays in the file: holding it would take more than the capture's size
    assert rss < size // 3, f"replaying a {size >> 20} MiB capture peaked at {rss >> 20} MiB"
